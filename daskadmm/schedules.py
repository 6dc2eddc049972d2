"""Penalty schedules: the rho, beta in force at each iteration.

- ``constant``: the configured values throughout.
- ``grow``: ``rho_k = min(rho * growth^(k-1), rho_max)`` (likewise beta): fixed in advance, so it
  never holds up the pipelined Dask graph.
- ``adaptive``: every ``adapt_every`` iterations (k = 2a, 3a, ...) compare the primal residual with
  its value ``a`` iterations earlier; if it did not fall below ``adapt_tol`` times that value,
  multiply rho and beta by ``adapt_factor`` (capped) from iteration k+1 on. This is a global
  decision, so the Dask runner must finish iteration k before it submits k+1 at those points
  (``is_barrier``); between them the wavefront runs freely.
- ``rises``: at every evaluation k >= 1 (every ``eval_every`` iterations) compare the true forward
  training loss with that of the previous evaluation (iteration 0's is never observed); after
  ``rise_count`` consecutive rises multiply rho and beta by ``adapt_factor`` (capped) from
  iteration k+1 on. The count is not reset by a change, so every further rise fires again: with
  ``eval_every = 1`` and ``rise_count = 3`` this is the dlADMM authors' rule (their code, at
  iteration i > 2: ``if cost[i] > cost[i-1] > cost[i-2] > cost[i-3]: rho = min(10 rho, 0.1)``).
  Every evaluation is a barrier.

``adaptive`` and ``rises`` also multiply the first trial curvature of dlADMM's backtracking
searches (``backtrack_start``, when set) by ``adapt_factor`` each time they fire, uncapped and even
when rho and beta are at their caps, as the authors' code multiplies its tau and theta with rho.

Raising rho or beta raises L by itself (the penalty terms grow), so compare L at equal parameters
when judging progress under a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .splitting.base import BlockSpec, Penalties, block_lam

__all__ = ["PenaltySchedule", "RestartGuard", "ScheduleOptions"]


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
    rise_count: int
    eval_every: int  # run.eval_every: where the rises schedule sees the training loss
    backtrack_start: float | None  # None: each search starts from half its last curvature


class PenaltySchedule:
    def __init__(self, options: ScheduleOptions):
        self.options = options
        self.kind = options.kind
        self._rho, self._beta = options.rho, options.beta
        self._start: float | None = options.backtrack_start
        self._primal: dict[int, float] = {}
        self._last_loss: float | None = None  # the rises schedule's last training loss
        self._rises = 0  # consecutive rises counted
        self.changes: list[tuple[int, float, float]] = []  # (first iteration, rho, beta)

    def at(self, k: int) -> Penalties:
        """Penalties for iteration ``k`` (1-based)."""
        c = self.options
        if self.kind == "grow":
            g = c.growth ** (k - 1)
            rho, beta = min(c.rho * g, c.rho_max), min(c.beta * g, c.beta_max)
        else:
            rho, beta = self._rho, self._beta
        return Penalties(rho=rho, beta=beta, tau=c.tau, lam=c.lam, nu=c.nu,
                         backtrack_start=self._start)

    def next_rhos(self, k: int) -> tuple[float, ...]:
        """The values iteration k+1's rho can take, as known before iteration k ends: that
        rho where it is known (:meth:`is_barrier` false), else the rho in force and its
        raised value (an adaptive or rises schedule keeps rho or raises it, see
        :meth:`_raised_rho`, as :meth:`_raise` computes it), in that order, once if
        equal. The Zarr engine computes ``W_1``'s statistics for each, so the W step can take
        the one in force with the reference's arithmetic."""
        if not self.is_barrier(k):
            return (self.at(k + 1).rho,)
        raised = self._raised_rho()
        return (self._rho,) if raised == self._rho else (self._rho, raised)

    def _raised_rho(self) -> float:
        """rho after a raise (:meth:`_raise`; :meth:`next_rhos` needs the same float)."""
        return min(self._rho * self.options.adapt_factor, self.options.rho_max)

    def is_barrier(self, k: int) -> bool:
        """Whether iteration k+1's penalties depend on the outcome of iteration k."""
        if self.kind == "adaptive":
            return k % self.options.adapt_every == 0
        return self.kind == "rises" and k % self.options.eval_every == 0

    def observe(self, k: int, primal: float, train_loss: float | None = None) -> None:
        """Report iteration k's primal residual and, at an evaluation, its forward training
        loss (the adaptive schedule uses the one, the rises schedule the other)."""
        if self.kind == "rises":
            if train_loss is not None:
                self._observe_loss(k, train_loss)
            return
        if self.kind != "adaptive":
            return
        c = self.options
        self._primal[k] = primal
        if k % c.adapt_every or (k - c.adapt_every) not in self._primal or k < 2 * c.adapt_every:
            return
        before = self._primal[k - c.adapt_every]
        if primal > c.adapt_tol * before:
            self._raise(k)

    def _observe_loss(self, k: int, loss: float) -> None:
        last = self._last_loss
        # NaN compares false: a non-finite loss ends a run of rises
        self._rises = self._rises + 1 if last is not None and loss > last else 0
        self._last_loss = loss
        if self._rises >= self.options.rise_count:
            self._raise(k)

    def _raised(self) -> tuple[float, float, float | None]:
        """rho, beta (capped) and the backtracking start (uncapped) after a raise."""
        c = self.options
        start = None if self._start is None else self._start * c.adapt_factor
        return self._raised_rho(), min(self._beta * c.adapt_factor, c.beta_max), start

    def can_raise(self) -> bool:
        """Whether :meth:`raise_penalties` would change anything (rho, beta or the
        backtracking start)."""
        return self._raised() != (self._rho, self._beta, self._start)

    def raise_penalties(self, k: int) -> None:
        """Multiply rho and beta by ``adapt_factor`` (capped) from iteration k+1 on, whatever
        the schedule (what :class:`RestartGuard` does when it rejects a restart; under
        ``grow`` the schedule's own values stay in force, so the configuration refuses that
        pair)."""
        self._raise(k)

    def _raise(self, k: int) -> None:
        """Multiply rho, beta (capped) and the backtracking start (uncapped) by the factor,
        from iteration k+1 on; a change is logged as ``(k + 1, rho, beta)``."""
        rho, beta, start = self._raised()
        if (rho, beta, start) != (self._rho, self._beta, self._start):
            self._rho, self._beta, self._start = rho, beta, start
            self.changes.append((k + 1, rho, beta))

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state as JSON-ready values (what a checkpoint manifest stores under
        ``schedule``): the penalties and backtracking start in force, the primal residuals
        observed (keyed by the iteration as a string), the last training loss seen and the
        rises counted so far, and the changes made."""
        return {"rho": self._rho, "beta": self._beta, "backtrack_start": self._start,
                "primal": {str(k): v for k, v in self._primal.items()},
                "last_loss": self._last_loss, "rises": self._rises,
                "changes": [list(x) for x in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict`; an empty one: from the start). A
        state written before the rises schedule existed keeps the configured backtracking
        start and no rises."""
        self.reset()
        if not state:
            return
        self._rho, self._beta = state["rho"], state["beta"]
        self._start = state.get("backtrack_start", self._start)
        self._primal = {int(k): v for k, v in state.get("primal", {}).items()}
        last = state.get("last_loss")
        self._last_loss = None if last is None else float(last)
        self._rises = int(state.get("rises", 0))
        self.changes = [(int(k), float(rho), float(beta))
                        for k, rho, beta in state.get("changes", [])]

    def reset(self) -> None:
        """Back to iteration 0: the configured penalties, nothing observed."""
        self._rho, self._beta = self.options.rho, self.options.beta
        self._start = self.options.backtrack_start
        self._primal, self._last_loss, self._rises, self.changes = {}, None, 0, []


class RestartGuard:
    """The guard on RADMM-3A's restarts (``algorithm.restart_guard``, with
    ``algorithm.restart_every = R``): a restart only starts from weights that lowered the
    objective.

    A restart after iteration k (a multiple of R) is the algorithm's start on ``W^k``: its
    auxiliaries come from the forward pass and its multipliers from one backward pass, so every
    constraint holds and its ``L`` is the training loss plus the weight decay, ``F(W^k)``, the
    network's own regularised objective. The guard compares that with ``F`` of the weights the
    last restart was accepted on (iteration 0's start at first):

    - not higher: the restart is accepted and goes ahead on ``W^k``;
    - higher, or not finite: it is rejected. The run starts again from the accepted weights
      instead, with rho and beta multiplied by ``adapt_factor`` (capped by ``rho_max`` and
      ``beta_max``) from iteration k+1 on (:meth:`PenaltySchedule.raise_penalties`). If
      they are at their caps already, it starts from the accepted weights once more and
      restarts stop (:attr:`stopped`): the plain iteration goes on.

    So ``F`` at the restarts never rises: the R iterations between two restarts act as one
    step of a descent method on the weights, and a step that went up is taken again, shorter
    (a larger rho keeps the W steps closer to their start). Without it, restarts every few
    iterations can go unstable late in a run (their ``F`` rises and falls with a growing
    amplitude), and a small rho can make them diverge in the first iterations.

    Every engine computes ``F`` with :meth:`start_objective` from its start's loss shares, so the
    same chunking takes the same decisions on the same bits. The raise comes on top of what
    the schedule does: an ``adaptive`` or ``rises`` schedule that raises at the same iteration
    multiplies rho by ``adapt_factor`` twice. The last R iterations of a run are not judged:
    the run returns ``W^K``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Nothing accepted yet (:meth:`begin` sets iteration 0's start)."""
        self.iteration = 0
        self.objective = math.nan
        self.weights: list[np.ndarray] | None = None
        self.rejected: list[tuple[int, float, int]] = []  # (k, F(W^k), restarted from)
        self.stopped: int | None = None  # the restart after which restarts stopped
        self.note: str | None = None  # what the last decide() has to say

    def begin(self, objective0: float, weights0: list[np.ndarray]) -> None:
        """Iteration 0's start, ``F(W^0) = objective0``, is the first accepted point (nothing
        rejected yet)."""
        self.reset()
        self.iteration, self.objective = 0, float(objective0)
        self.weights = [np.array(W, copy=True) for W in weights0]

    @staticmethod
    def start_objective(loss_shares: list[float], specs: list[BlockSpec],
                        weights: list[np.ndarray], lam: float) -> float:
        """``F(W)`` of a start on ``weights``: the loss shares of its chunks (``loss/n`` over
        each chunk's samples, in chunk order) plus every block's weight decay. Every engine
        computes it with this function, so the same chunking gives the same bits (a start's
        constraint terms are zero, so they are left out)."""
        total = sum(loss_shares)
        total += sum(0.5 * block_lam(spec, lam) * float(np.sum(W * W))
                     for spec, W in zip(specs, weights, strict=True))
        return total

    def decide(self, k: int, objective: float, weights: list[np.ndarray],
               schedule: PenaltySchedule) -> list[np.ndarray] | None:
        """The restart after iteration k, whose start on ``weights`` (``W^k``) has ``F =
        objective``: None when it is accepted (it goes ahead on ``W^k``), else the accepted
        weights to start from instead (rho and beta raised from iteration k+1 on). When rho
        and beta cannot be raised any more (at ``rho_max`` and ``beta_max``; a rejection
        would run the same iterations again) the run starts from the accepted weights once
        more and restarts stop there (:attr:`stopped`, :meth:`allows`): the plain iteration
        goes on, which does not need them to be stable. :attr:`note` is the line to print,
        or None."""
        assert self.weights is not None, "begin() comes first"
        self.note = None
        if objective <= self.objective:  # (NaN compares false: rejected)
            self.iteration, self.objective = k, float(objective)
            self.weights = [np.array(W, copy=True) for W in weights]
            return None
        self.rejected.append((k, float(objective), self.iteration))
        head = (f"daskadmm: restart after iteration {k} rejected: its objective "
                f"{objective:.6g} is above {self.objective:.6g} (iteration {self.iteration}); "
                f"starting again from iteration {self.iteration}'s weights")
        if not schedule.can_raise():
            self.stopped = k
            self.note = (f"{head}, without further restarts: rho and beta are at their caps "
                         "(algorithm.rho_max, algorithm.beta_max)")
            return self.weights
        schedule.raise_penalties(k)
        pen = schedule.at(k + 1)
        self.note = f"{head} with rho {pen.rho:g}, beta {pen.beta:g}"
        return self.weights

    def allows(self, k: int) -> bool:
        """Whether the restart after iteration k takes place (none after :attr:`stopped`)."""
        return self.stopped is None or k <= self.stopped

    def info(self) -> dict[str, Any]:
        """What the result reports (``info["restart_guard"]``): the last accepted restart,
        every rejection as ``[k, objective, restarted from]`` and the restart after which
        restarts stopped, at the caps (``stopped``; None: they did not)."""
        return {"accepted": self.iteration, "objective": self.objective,
                "rejected": [list(x) for x in self.rejected],
                "stopped": self.stopped}

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (:meth:`info`); the caller stores the accepted weights beside it.
        (A checkpoint at a restart iteration k is committed before the guard decides on that
        restart, so the accepted weights are an earlier iteration's.)"""
        return self.info()

    def load_state_dict(self, state: dict[str, Any], weights: list[np.ndarray]) -> None:
        """Continue from :meth:`state_dict` and the accepted weights."""
        def num(v: Any) -> float:  # (a manifest stores a non-finite number as null)
            return math.nan if v is None else float(v)

        self.iteration, self.objective = int(state["accepted"]), num(state["objective"])
        self.weights = [np.array(W, copy=True) for W in weights]
        self.rejected = [(int(k), num(f), int(j)) for k, f, j in state.get("rejected", [])]
        stopped = state.get("stopped")
        self.stopped = None if stopped is None else int(stopped)
