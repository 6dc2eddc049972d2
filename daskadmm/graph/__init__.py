"""Task graphs of ADMM iterations: wiring only, no arithmetic.

- :mod:`.nodes`: graph nodes, task keys, the dict-graph conversion and the critical path;
- :mod:`.memory`: a window of iterations with the state in worker memory (one task per block
  and step);
- :mod:`.chunked`: a window of iterations with the state in the chunked store (tasks per block
  and chunk, dependencies derived from the chunks each task declares it reads and writes).
"""

from __future__ import annotations

from .memory import WindowGraph, build_window, evaluate_weights, run_step
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
    "WindowGraph",
    "build_window",
    "critical_path_length",
    "default_window",
    "evaluate_weights",
    "iteration_stats",
    "key",
    "run_step",
    "to_dask_graph",
]
