"""Task graphs of ADMM iterations: wiring only, no arithmetic.

- :mod:`.nodes`: graph nodes, task keys, the dict-graph conversion and the critical path;
- :mod:`.chunked`: the one builder of a window of iterations, for every algorithm (tasks per
  block and chunk, dependencies derived from the chunks each task declares it reads and
  writes), with the state in a chunked store or, on the dataflow backend, in the task
  outputs (the in-memory engine: one chunk).
"""

from __future__ import annotations

from .nodes import (
    Node,
    Ref,
    critical_path_length,
    default_window,
    iteration_stats,
    key,
    to_dask_graph,
)

__all__ = [
    "Node",
    "Ref",
    "critical_path_length",
    "default_window",
    "iteration_stats",
    "key",
    "to_dask_graph",
]
