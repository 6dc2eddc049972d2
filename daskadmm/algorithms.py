"""The ADMM algorithms: one record each, in one registry.

An :class:`Algorithm` is everything the library runs of a formulation:

- ``splitting``: its iteration as the serial reference runs it
  (:class:`~daskadmm.splitting.Splitting`: the start, per-block steps with declared inputs, the
  block objective), the oracle every engine is tested against;
- ``plan``: its chunk plan (:class:`~daskadmm.chunks.ChunkAlgorithm`: the store layout, the
  start, the per-(block, chunk) tasks of an iteration with the chunks each reads and writes, the
  reductions between them), which the Dask engine runs with its state in a chunked Zarr store or,
  as one chunk, in the task outputs.

Both call the same update functions of :mod:`daskadmm.splitting` (the math, once): the chunk
tasks on a chunk of the samples, the reference on all of them. Adding an algorithm: its update
functions and :class:`~daskadmm.splitting.Splitting` in ``splitting/<name>.py``, its chunk
tasks and plan in ``chunks/``, its record here, and its configuration (the keys it reads in
:data:`daskadmm.config.ALGORITHM_KEYS`, ``conf/algorithm/<name>.yaml``); a test checks that the
configuration's names are this registry's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from .chunks import ChunkAlgorithm, dladmm_plan, pdadmm_plan, radmm2_plan, radmm3_plan
from .splitting import Splitting, dladmm, gauss_seidel, pdadmm, radmm2, radmm3, radmm3a

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """One ADMM formulation: its ``name``, its serial ``splitting`` and its chunk ``plan``."""

    name: str
    splitting: Splitting
    plan: ChunkAlgorithm


def _radmm3_family(name: str, init_state, block_update, block_objective) -> Algorithm:
    return Algorithm(name, Splitting(name, init_state,
                                     gauss_seidel(f"{name}_block", block_update),
                                     block_objective),
                     radmm3_plan(name))


ALGORITHMS: dict[str, Algorithm] = {
    "radmm3": _radmm3_family("radmm3", radmm3.init_state, radmm3.block_update,
                             radmm3.block_objective),
    "radmm3l": _radmm3_family("radmm3l", radmm3.init_state,
                              partial(radmm3.block_update, variant="radmm3l"),
                              radmm3.block_objective),
    "radmm3a": _radmm3_family("radmm3a", radmm3a.init_state, radmm3a.block_update,
                              radmm3a.block_objective),
    "radmm2": Algorithm("radmm2",
                        Splitting("radmm2", radmm2.init_state,
                                  gauss_seidel("radmm2_block", radmm2.block_update),
                                  radmm2.block_objective),
                        radmm2_plan()),
    "pdadmm": Algorithm("pdadmm", pdadmm.SPLITTING, pdadmm_plan()),
    "dladmm": Algorithm("dladmm", dladmm.SPLITTING, dladmm_plan()),
}
"""Every ADMM algorithm, by name."""


def get_algorithm(name: str) -> Algorithm:
    """The record of algorithm ``name``; a ValueError names the known ones."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown ADMM algorithm {name!r} (known: {', '.join(ALGORITHMS)})") \
            from None
