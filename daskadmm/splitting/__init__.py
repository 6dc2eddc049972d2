"""The ADMM formulations, each as pure NumPy per-block update functions.

A :class:`Splitting` describes one iteration as an ordered tuple of :class:`Step` s. Each step
runs one task per block; a task's inputs are named by :class:`Input` s: which block (self, left or
right neighbour), which step produced the value, and from which iteration (``lag`` 0: the
current one, 1: the previous one). The serial reference (:mod:`daskadmm.engines.reference`)
executes the steps in order, blocks ascending or descending. The Dask engine runs each
algorithm's chunk plan (:mod:`daskadmm.chunks`), whose tasks call the same update functions on a
chunk of the samples (with one chunk: the same products in the same order, so the same bits).
Each algorithm's record (its splitting and its chunk plan) is in :mod:`daskadmm.algorithms`.

Every task function has the signature ``fn(spec, pen, *inputs, Y=None) -> StepOut(state,
stats)`` (:class:`~daskadmm.splitting.base.StepOut`):

- ``inputs`` in the order of ``Step.inputs``; an input that points left of block 1 is the data
  ``X``, one that points right of block N is ``None``;
- ``Y`` is the targets for the last block and ``None`` elsewhere;
- ``state`` is the block's whole new state (the module's ``State``, a TypedDict of its
  variables, so mypy checks every name a function reads); after the last step of an
  iteration it is the block's state of that iteration;
- ``stats`` has ``objective`` (the block's share of L after the update), ``primal_sq``,
  ``dual_sq`` and ``capped`` (inner solves that hit their cap). Only the last step's
  ``objective``/``primal_sq``/``dual_sq`` count; ``capped`` is summed over all steps.

Nothing here imports dask, zarr or hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import BlockSpec, Options, Penalties

__all__ = [
    "LEFT",
    "RIGHT",
    "SELF",
    "BlockSpec",
    "Input",
    "Options",
    "Penalties",
    "Splitting",
    "Step",
    "gauss_seidel",
    "select",
]

LEFT, SELF, RIGHT = -1, 0, 1


@dataclass(frozen=True)
class Input:
    """One argument of a step's task: the output of step ``step`` of block ``i + block`` at
    iteration ``k - lag``; ``key`` picks one entry of that output's state (None: the whole
    state), ``keys`` the entries the task reads (a smaller state; on a cluster only those
    travel between workers). At iteration ``k - lag = 0`` the value comes from the initial
    state."""

    block: int
    step: str
    lag: int
    key: str | None = None
    keys: tuple[str, ...] | None = None


def select(state: dict, keys: tuple[str, ...]) -> dict:
    """The entries ``keys`` of a block state (those it has)."""
    return {k: state[k] for k in keys if k in state}


@dataclass(frozen=True)
class Step:
    """One sub-step of an iteration: task ``fn`` for every block, in ``order``."""

    name: str
    fn: Callable
    inputs: tuple[Input, ...]
    order: str = "ascending"  # or "descending"


@dataclass(frozen=True)
class Splitting:
    """One ADMM formulation: its initial state, its steps and its objective.

    ``init_state(arch, weights, X, Y, options) -> list[state]`` builds the per-block states of
    iteration 0 (every step's "output" at iteration 0 is that state; ``options``, the run's
    :class:`Options`, may be None);
    ``block_objective(spec, pen, state, left, Y) -> float`` is block i's share of L, where
    ``left`` is ``objective_left`` of block i-1 (``X`` for block 1).
    """

    name: str
    init_state: Callable
    steps: tuple[Step, ...]
    block_objective: Callable
    objective_left: str = "V"


def gauss_seidel(name: str, fn: Callable) -> tuple[Step, ...]:
    """RADMM's one-step sweep: block i needs ``V_{i-1}`` of this iteration, block i+1's state
    of the previous one, and its own previous state."""
    return (Step(name, fn, (Input(SELF, name, 1), Input(LEFT, name, 0, "V"),
                            Input(RIGHT, name, 1))),)
