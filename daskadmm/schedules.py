"""Penalty schedules: the rho, beta in force at each iteration.

- ``constant``: the configured values throughout.
- ``grow``: ``rho_k = min(rho * growth^(k-1), rho_max)`` (likewise beta): fixed in advance, so it
  never holds up the pipelined Dask graph.
- ``adaptive``: every ``adapt_every`` iterations (k = 2a, 3a, ...) compare the primal residual with
  its value ``a`` iterations earlier; if it did not fall below ``adapt_tol`` times that value,
  multiply rho and beta by ``adapt_factor`` (capped) from iteration k+1 on. This is a global
  decision, so the Dask runner must finish iteration k before it submits k+1 at those points
  (``is_barrier``); between them the wavefront runs freely.

Raising rho or beta raises L by itself (the penalty terms grow), so compare L at equal parameters
when judging progress under a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .splitting.base import Penalties

__all__ = ["PenaltySchedule", "ScheduleOptions"]


@dataclass(frozen=True)
class ScheduleOptions:
    """What a :class:`PenaltySchedule` needs (built from the ``algorithm`` section by
    :func:`daskadmm.api.schedule_options`; the defaults live in the config schema alone)."""

    kind: str  # constant | grow | adaptive
    rho: float
    beta: float
    tau: float
    lam: float
    nu: float | None  # None: nu = rho
    growth: float
    rho_max: float
    beta_max: float
    adapt_every: int
    adapt_factor: float
    adapt_tol: float


class PenaltySchedule:
    def __init__(self, options: ScheduleOptions):
        self.options = options
        self.kind = options.kind
        self._rho = options.rho
        self._beta = options.beta
        self._primal: dict[int, float] = {}
        self.changes: list[tuple[int, float, float]] = []  # (first iteration, rho, beta)

    def at(self, k: int) -> Penalties:
        """Penalties for iteration ``k`` (1-based)."""
        c = self.options
        if self.kind == "grow":
            g = c.growth ** (k - 1)
            rho, beta = min(c.rho * g, c.rho_max), min(c.beta * g, c.beta_max)
        else:
            rho, beta = self._rho, self._beta
        return Penalties(rho=rho, beta=beta, tau=c.tau, lam=c.lam, nu=c.nu)

    def is_barrier(self, k: int) -> bool:
        """Whether iteration k+1's penalties depend on the outcome of iteration k."""
        return self.kind == "adaptive" and k % self.options.adapt_every == 0

    def observe(self, k: int, primal: float) -> None:
        """Report iteration k's primal residual (only used by the adaptive schedule)."""
        if self.kind != "adaptive":
            return
        c = self.options
        self._primal[k] = primal
        if k % c.adapt_every or (k - c.adapt_every) not in self._primal or k < 2 * c.adapt_every:
            return
        before = self._primal[k - c.adapt_every]
        if primal > c.adapt_tol * before:
            rho = min(self._rho * c.adapt_factor, c.rho_max)
            beta = min(self._beta * c.adapt_factor, c.beta_max)
            if (rho, beta) != (self._rho, self._beta):
                self._rho, self._beta = rho, beta
                self.changes.append((k + 1, rho, beta))

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state as JSON-ready values (what a checkpoint manifest stores under
        ``schedule``): the adaptive penalties in force, the primal residuals observed (keyed
        by the iteration as a string) and the changes made."""
        return {"rho": self._rho, "beta": self._beta,
                "primal": {str(k): v for k, v in self._primal.items()},
                "changes": [list(x) for x in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict`; an empty one: from the start)."""
        if not state:
            self.reset()
            return
        self._rho, self._beta = state["rho"], state["beta"]
        self._primal = {int(k): v for k, v in state.get("primal", {}).items()}
        self.changes = [(int(k), float(rho), float(beta))
                        for k, rho, beta in state.get("changes", [])]

    def reset(self) -> None:
        """Back to iteration 0: the configured penalties, nothing observed."""
        self._rho, self._beta = self.options.rho, self.options.beta
        self._primal, self.changes = {}, []
