"""The Zarr-resident engine's chunk tasks: per-(block, chunk) task bodies, the reductions
between them and each algorithm's iteration plan (NumPy only: the graph is wired by
:mod:`daskadmm.graph.chunked`, and only the engine talks to Dask).

- :mod:`.common`: the chunk a task works on, reading and writing it, checkpoint copies, the
  forward pass on stored data, the reductions every plan uses;
- :mod:`.radmm3`: RADMM-3, RADMM-3L and RADMM-3A;
- :mod:`.radmm2`: RADMM-2 (backtracked steps as trial passes and decisions);
- :mod:`.mlp`: pdADMM and dlADMM.

A :class:`ChunkAlgorithm` is what the engine needs of an algorithm; the functions below make
each algorithm's, for its record in :data:`daskadmm.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..model import Architecture
from ..splitting import dladmm, pdadmm
from ..splitting import radmm2 as radmm2_splitting
from ..splitting.base import Stats
from . import mlp, radmm2, radmm3
from .common import Array, Small, sample_vars

__all__ = [
    "ChunkAlgorithm",
    "dladmm_plan",
    "pdadmm_plan",
    "radmm2_plan",
    "radmm3_plan",
]


@dataclass(frozen=True)
class ChunkAlgorithm:
    """What the Zarr-resident engine needs of an algorithm:

    - ``layout``: the variables of each block, ``(rows, "n")`` for the sample-sized ones, the
      shape for ``W``;
    - ``state_vars``: the sample-sized variables that make up block i's state (what a
      checkpoint copies);
    - ``init_small``: the small state of iteration 0;
    - ``plan``: its iteration plan, ``plan(ctx, specs, pen, k, small)`` (see
      :class:`~daskadmm.chunks.common.PlanContext`);
    - ``init``: the task that starts one chunk, ``init(chunk, name, arch, weights, n, options,
      rho, names)`` (``names[i - 1]``: block i's state variables), writing slot 0 and returning
      its share of L^0;
    - ``start_chunk``, ``start_sum``: the start's statistics, fresh or resumed (see
      :class:`~daskadmm.chunks.common.StartContext`): ``start_chunk(ctx, chunk, arch)``
      appends a chunk's statistics task and returns its ref; ``start_sum(ctx, refs, arch) ->
      (gram key, W_1 statistics key or None)`` appends their sums;
    - ``stats``: the task that sums a block's statistics of one iteration, ``stats(small,
      *chunk outputs or StatsGroups)``;
    - ``slots``: the live slots of each variable;
    - ``eager``: its reductions, which the builder submits right after their inputs (see
      :func:`daskadmm.graph.chunked.eager_order`)."""

    layout: Callable[[Architecture], list[dict[str, tuple]]]
    state_vars: Callable[[Architecture, int], tuple[str, ...]]
    init_small: Callable[[Architecture, list[Array]], list[Small]]
    plan: Callable[..., dict[int, str]]
    init: Callable[..., dict]
    start_chunk: Callable[..., Any] = mlp.start_chunk
    start_sum: Callable[..., tuple[str, str | None]] = mlp.start_sum
    stats: Callable[..., Stats] = mlp.layer_stats
    slots: int = 2
    eager: frozenset[Callable] = frozenset()


def radmm3_plan(name: str) -> ChunkAlgorithm:
    """RADMM-3's, RADMM-3L's or RADMM-3A's (``name``): :mod:`.radmm3`."""
    return ChunkAlgorithm(
        layout=partial(radmm3.layout, name),
        state_vars=lambda arch, i: sample_vars(radmm3.layout(name, arch)[i - 1]),
        init_small=lambda arch, weights: [{"W": np.array(W, copy=True)} for W in weights],
        plan=partial(radmm3.plan_iteration, name),
        init=radmm3.init_chunk, start_chunk=radmm3.start_chunk, start_sum=radmm3.start_sum,
        stats=radmm3.block_stats,
        eager=frozenset({radmm3.pick_partials, radmm3.reduce_weights, radmm3.gram_add}))


def radmm2_plan() -> ChunkAlgorithm:
    """RADMM-2's: :mod:`.radmm2`, started by its splitting's ``init_state`` per chunk."""
    return ChunkAlgorithm(radmm2.layout, radmm2.state_vars, radmm2.init_small,
                          radmm2.plan_iteration,
                          partial(mlp.init_chunk, init_state=radmm2_splitting.init_state),
                          eager=frozenset({radmm2.sum_w}))


def pdadmm_plan() -> ChunkAlgorithm:
    """pdADMM's: :mod:`.mlp`."""
    return ChunkAlgorithm(mlp.pd_layout, mlp.pd_state_vars, mlp.pd_init_small, mlp.plan_pdadmm,
                          partial(mlp.init_chunk, init_state=pdadmm.init_state))


def dladmm_plan() -> ChunkAlgorithm:
    """dlADMM's: :mod:`.mlp`, three live slots."""
    return ChunkAlgorithm(mlp.dl_layout, mlp.dl_state_vars, mlp.dl_init_small, mlp.plan_dladmm,
                          partial(mlp.init_chunk, init_state=dladmm.init_state), slots=3)
