"""The serial reference solver: the same per-block updates in a plain loop.

This is the oracle every other execution path is tested against. One iteration k -> k+1 runs
``block_update`` for blocks 1..N in order, handing block i the left neighbour's output of
iteration k+1 and the right neighbour's state of iteration k: exactly the dependencies the Dask
graph encodes, so the Dask execution reproduces these iterates bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .model import Architecture
from .monitor import IterationStats, Monitor
from .result import Result
from .schedules import PenaltySchedule
from .splitting import BlockSpec, Options, Splitting

__all__ = ["initial_objective", "solve", "sweep"]

Array = np.ndarray
State = dict[str, Array]


def sweep(splitting: Splitting, specs: list[BlockSpec], pen, states: list[State], X: Array,
          Y: Array) -> tuple[list[State], list[dict[str, float]]]:
    """One iteration over all blocks (Gauss-Seidel, blocks 1..N)."""
    N = len(specs)
    new: list[State] = []
    stats: list[dict[str, float]] = []
    for i in range(N):
        left = X if i == 0 else new[i - 1][splitting.left_key]
        right = states[i + 1] if i + 1 < N else None
        target = Y if i == N - 1 else None
        st, s = splitting.block_update(specs[i], pen, states[i], left, right, target)
        new.append(st)
        stats.append(s)
    return new, stats


def initial_objective(splitting: Splitting, specs: list[BlockSpec], pen, states: list[State],
                      X: Array, Y: Array) -> float:
    total = 0.0
    for i, spec in enumerate(specs):
        left = X if i == 0 else states[i - 1][splitting.left_key]
        total += splitting.block_objective(spec, pen, states[i], left,
                                           Y if i == len(specs) - 1 else None)
    return total


def solve(splitting: Splitting, arch: Architecture, X: Array, Y: Array, weights0: list[Array],
          schedule: PenaltySchedule, monitor: Monitor, options: Options | None = None,
          state_callback: Callable[[int, list[State]], None] | None = None) -> Result:
    """Run ``monitor.iterations`` iterations (or until a stopping rule fires).

    ``state_callback(k, states)`` is called after every iteration (tests use it to inspect
    iterates).
    """
    options = options or Options()
    n = X.shape[1]
    specs = [BlockSpec(arch, i, n, options) for i in range(1, arch.depth + 1)]
    states = splitting.init_state(arch, weights0, X, Y)
    pen = schedule.at(1)
    monitor.start(initial_objective(splitting, specs, pen, states, X, Y),
                  [s["W"] for s in states], pen.rho, pen.beta)
    status, k = "max_iter", 0
    for k in range(1, monitor.iterations + 1):
        pen = schedule.at(k)
        states, stats = sweep(splitting, specs, pen, states, X, Y)
        it = IterationStats.from_blocks(stats, n, pen.rho)
        monitor.step(k, it, pen.rho, pen.beta)
        schedule.observe(k, it.primal)
        if state_callback is not None:
            state_callback(k, states)
        if monitor.is_eval(k):
            rec = monitor.record(k, it, [s["W"] for s in states], pen.rho, pen.beta)
            stop = monitor.check(rec)
            if stop is not None:
                status = stop
                break
    return Result(
        status=status,
        message=monitor.message(status, k),
        iterations=k,
        weights=[s["W"] for s in states],
        arch=arch,
        metric="",
        history=monitor.history,
        wall_time=monitor.elapsed(),
        info={
            "engine": "reference",
            "objective_increases": len(monitor.increases),
            "inner_solver_caps_hit": monitor.capped_total,
            "schedule_changes": schedule.changes,
        },
    )
