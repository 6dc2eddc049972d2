"""The serial reference solver: the same per-block updates in a plain loop.

This is the oracle every other execution path is tested against. One iteration runs the
splitting's steps in order, each over the blocks in the step's order, handing every task exactly
the inputs its :class:`~daskadmm.splitting.Input` s name (for RADMM: block i gets the left
neighbour's ``V`` of this iteration and the right neighbour's state of the previous one). The
Dask engines' chunk tasks (:mod:`daskadmm.chunks`) call the same update functions on the same
values; with one chunk (the in-memory engine) they reproduce these iterates bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np

from ..model import Architecture, loss_sum
from ..monitor import IterationStats, Monitor
from ..result import Result
from ..schedules import PenaltySchedule, RestartGuard
from ..splitting import BlockSpec, Input, Options, Splitting, select
from ..splitting.base import restarts_after

__all__ = ["block_states", "initial_objective", "initial_outputs", "solve", "sweep"]

Array = np.ndarray
State = dict[str, Array]


def _resolve(inp: Input, i: int, N: int, cur: dict, prev: dict, X: Array):
    j = i + inp.block
    if j < 0:
        return X
    if j >= N:
        return None
    outs = (cur if inp.lag == 0 else prev).get(inp.step)
    if outs is None or outs[j] is None:
        raise RuntimeError(f"step input {inp} of block {i + 1} is not computed yet: "
                           "the splitting's steps are not in a valid order")
    if inp.key is not None:
        return outs[j][inp.key]
    return outs[j] if inp.keys is None else select(outs[j], inp.keys)


def sweep(splitting: Splitting, specs: list[BlockSpec], pen, prev: dict[str, list[State]],
          X: Array, Y: Array) -> tuple[dict[str, list[State]], list[dict[str, float]]]:
    """One iteration: every step of the splitting, blocks in the step's order.

    ``prev`` maps each step name to the per-block outputs of the previous iteration (at
    iteration 1, the initial states). Returns this iteration's outputs and the per-block
    statistics (the last step's, with ``capped`` summed over all steps).
    """
    N = len(specs)
    cur: dict[str, list[State | None]] = {}
    capped = [0.0] * N
    stats: list[dict[str, float]] = []
    for step in splitting.steps:
        outs: list[State | None] = [None] * N
        cur[step.name] = outs  # filled in block order: lag-0 inputs of earlier blocks resolve
        stats = [{}] * N
        order = range(N) if step.order == "ascending" else range(N - 1, -1, -1)
        for i in order:
            args = [_resolve(inp, i, N, cur, prev, X) for inp in step.inputs]
            st, s = step.fn(specs[i], pen, *args, Y=Y if i == N - 1 else None)
            outs[i] = st
            stats[i] = s
            capped[i] += s.get("capped", 0.0)
    stats = [dict(s, capped=c) for s, c in zip(stats, capped, strict=True)]
    return cast(dict[str, list[State]], cur), stats  # every block's output is filled in


def block_states(splitting: Splitting, outputs: dict[str, list[State]]) -> list[State]:
    """The blocks' states of an iteration: the outputs of its last step."""
    return outputs[splitting.steps[-1].name]


def initial_outputs(splitting: Splitting, states: list[State]) -> dict[str, list[State]]:
    return {step.name: states for step in splitting.steps}


def initial_objective(splitting: Splitting, specs: list[BlockSpec], pen, states: list[State],
                      X: Array, Y: Array) -> float:
    total = 0.0
    for i, spec in enumerate(specs):
        left = X if i == 0 else states[i - 1][splitting.objective_left]
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
    states = splitting.init_state(arch, weights0, X, Y, options)
    outputs = initial_outputs(splitting, states)
    pen = schedule.at(1)
    monitor.start(initial_objective(splitting, specs, pen, states, X, Y),
                  [s["W"] for s in states], pen.rho, pen.beta)
    guard = RestartGuard() if options.restart_guard else None

    def start_objective(states: list[State], weights: list[Array]) -> float:
        # F of a start, as every engine computes it (RestartGuard.start_objective)
        share = loss_sum(arch.loss, states[-1]["U"], Y) / n
        return RestartGuard.start_objective([share], specs, weights, schedule.at(1).lam)

    if guard is not None:
        guard.begin(start_objective(states, weights0), weights0)
    status, k = "max_iter", 0
    for k in range(1, monitor.iterations + 1):
        if restarts_after(options, k - 1, guard):  # start again from W^{k-1}
            weights = [s["W"] for s in states]
            states = splitting.init_state(arch, weights, X, Y, options)
            if guard is not None:
                back = guard.decide(k - 1, start_objective(states, weights), weights, schedule)
                if guard.note is not None:
                    from .cluster import say  # (distributed's import only when needed)

                    say(guard.note)
                if back is not None:  # rejected: from the accepted weights, rho raised
                    states = splitting.init_state(arch, back, X, Y, options)
            outputs = initial_outputs(splitting, states)
        pen = schedule.at(k)
        outputs, stats = sweep(splitting, specs, pen, outputs, X, Y)
        states = block_states(splitting, outputs)
        it = IterationStats.from_blocks(stats, n, pen.rho)
        monitor.step(k, it, pen.rho, pen.beta)
        rec = (monitor.record(k, it, [s["W"] for s in states], pen.rho, pen.beta)
               if monitor.is_eval(k) else None)
        schedule.observe(k, it.primal, None if rec is None else rec.get("train_loss"))
        if state_callback is not None:
            state_callback(k, states)
        if rec is not None:
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
            "steady_seconds_per_iteration": monitor.steady_seconds_per_iteration(),
            "objective_increases": len(monitor.increases),
            "inner_solver_caps_hit": monitor.capped_total,
            "schedule_changes": schedule.changes,
            **({"restart_guard": guard.info()} if guard is not None else {}),
        },
    )
