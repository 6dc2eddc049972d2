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

from .config import AlgorithmConfig
from .splitting.base import Penalties

__all__ = ["PenaltySchedule"]


class PenaltySchedule:
    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg
        self.kind = cfg.schedule
        self._rho = cfg.rho
        self._beta = cfg.beta
        self._primal: dict[int, float] = {}
        self.changes: list[tuple[int, float, float]] = []  # (first iteration, rho, beta)

    def at(self, k: int) -> Penalties:
        """Penalties for iteration ``k`` (1-based)."""
        c = self.cfg
        if self.kind == "grow":
            g = c.growth ** (k - 1)
            rho, beta = min(c.rho * g, c.rho_max), min(c.beta * g, c.beta_max)
        else:
            rho, beta = self._rho, self._beta
        return Penalties(rho=rho, beta=beta, tau=c.tau, lam=c.lam,
                         nu=c.nu if c.nu is not None else None)

    def is_barrier(self, k: int) -> bool:
        """Whether iteration k+1's penalties depend on the outcome of iteration k."""
        return self.kind == "adaptive" and k % self.cfg.adapt_every == 0

    def observe(self, k: int, primal: float) -> None:
        """Report iteration k's primal residual (only used by the adaptive schedule)."""
        if self.kind != "adaptive":
            return
        c = self.cfg
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
