"""Bookkeeping shared by every execution path: per-iteration residuals, evaluation records,
stopping rules, and the L-increase log.

Stopping rules, checked at evaluation points (every ``eval_every`` iterations and at the last):

- ``nonfinite``: the objective or a metric is NaN/inf;
- ``diverged``: the objective exceeds ``diverge_factor * max(1, |L_0|)``;
- ``converged``: at least one tolerance is positive and every positive tolerance holds
  (``primal <= tol_primal``, ``dual <= tol_dual``);
- ``interrupted``: :func:`request_stop` was called (the CLI's Ctrl-C);
- ``stalled``: after ``stall_iterations`` iterations the network is not learning: its true
  forward training loss never fell below ``(1 - STALL_DROP)`` times its initial value, or (for
  classification, ``chance`` given) its training accuracy stayed within ``STALL_MARGIN`` of
  chance (the majority class's share) at every evaluation of the last ``stall_iterations``;
- otherwise the run ends with ``max_iter``.

Residuals: ``primal = sqrt(sum_i ||U_i - W_i V~_{i-1}||^2 / n)`` (RMS per sample) and
``dual = rho sqrt(sum_i ||V_i^{k+1} - V_i^k||^2 / n)``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FAILED", "IterationStats", "Monitor", "clear_stop", "request_stop"]

FAILED = ("diverged", "nonfinite")  # statuses of a failed run (the CLI exits non-zero)
STALL_DROP = 1e-3  # a forward loss that fell by less than this fraction has not fallen
STALL_MARGIN = 0.01  # an accuracy within this of chance is at chance
# what to try when a run stalls (the message and the CLI say it)
STALL_HINT = ("try model.activation=tanh, a smaller algorithm.rho (e.g. 0.5) with a larger "
              "algorithm.beta (e.g. 5), or a smaller model.depth")

# Set by request_stop() (the CLI's Ctrl-C handler): every engine stops at its next evaluation
# with status "interrupted", keeping what it has (results, the last checkpoint).
_STOP = threading.Event()


def request_stop() -> None:
    """Ask the running fit to stop at its next evaluation (status ``interrupted``)."""
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


@dataclass
class IterationStats:
    """Sums over blocks (in block order, so every execution path adds them identically)."""

    objective: float
    primal: float
    dual: float
    capped: int

    @classmethod
    def from_blocks(cls, stats: list[dict[str, float]], n: int, rho: float) -> IterationStats:
        obj = 0.0
        psq = 0.0
        dsq = 0.0
        capped = 0.0
        for s in stats:
            obj += s["objective"]
            psq += s["primal_sq"]
            dsq += s["dual_sq"]
            capped += s.get("capped", 0.0)
        return cls(obj, math.sqrt(psq / n), rho * math.sqrt(dsq / n), int(capped))


@dataclass
class Monitor:
    iterations: int
    eval_every: int
    evaluate: Callable[[list[np.ndarray]], dict[str, float]]
    tol_primal: float = 0.0
    tol_dual: float = 0.0
    diverge_factor: float = 1e8
    callback: Callable[[dict], None] | None = None
    stall_iterations: int = 0  # 0: never report a stall
    chance: float | None = None  # classification: the majority class's share of the training set
    t0: float = field(default_factory=time.perf_counter)
    history: list[dict[str, float]] = field(default_factory=list)
    increases: list[tuple[int, float]] = field(default_factory=list)
    capped_total: int = 0
    # (k, seconds): when each iteration was processed
    step_times: list[tuple[int, float]] = field(default_factory=list)
    # (k, seconds): when the results of iterations up to k arrived, for engines that deliver a
    # whole window at once (dask's synchronous and threaded schedulers)
    arrivals: list[tuple[int, float]] = field(default_factory=list)
    # The iteration this run started from (a resumed run: its checkpoint's), and the last one
    # whose results can arrive bunched: a pipelined engine submits its first window at once and
    # the workers run it as one wavefront, so that window's last results come in quick
    # succession after the whole window's work (the Dask engines set k_start + their window);
    # the steady time per iteration is measured after it.
    k_start: int = 0
    ramp: int = 0
    objective0: float = math.nan
    _last_objective: float = math.nan
    _last_params: tuple[float, float] | None = None
    # the weights of the last evaluation that did not fail (what a failed run keeps)
    last_good: tuple[int, list[np.ndarray]] | None = None
    _pending: tuple[int, list[np.ndarray]] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def is_eval(self, k: int) -> bool:
        return k % self.eval_every == 0 or k == self.iterations

    def start(self, objective0: float, weights: list[np.ndarray], rho: float, beta: float,
              values: dict[str, float] | None = None) -> None:
        """Record iteration 0 (``values``: its metrics if computed elsewhere, as in
        :meth:`record`)."""
        self.objective0 = objective0
        self._last_objective = objective0
        self._last_params = (rho, beta)
        self.record(0, IterationStats(objective0, 0.0, 0.0, 0), weights, rho, beta, values)
        if all(np.all(np.isfinite(W)) for W in weights):
            self.last_good = self._pending

    def step(self, k: int, it: IterationStats, rho: float, beta: float) -> None:
        """Log iteration k's objective; an increase at unchanged penalties is recorded."""
        self.step_times.append((k, self.elapsed()))
        self.capped_total += it.capped
        last = self._last_objective
        if (self._last_params == (rho, beta) and math.isfinite(it.objective)
                and it.objective > last + 1e-10 * max(1.0, abs(last))):
            self.increases.append((k, it.objective - self._last_objective))
        self._last_objective = it.objective
        self._last_params = (rho, beta)

    def record(self, k: int, it: IterationStats, weights: list[np.ndarray], rho: float,
               beta: float, values: dict[str, float] | None = None) -> dict[str, float]:
        """Append (and report) the record of iteration k; ``values`` are precomputed metrics
        (the Dask runner evaluates in a task), else ``evaluate(weights)`` computes them."""
        rec = {
            "iteration": k,
            "wall_time": self.elapsed(),
            "objective": it.objective,
            "primal_residual": it.primal,
            "dual_residual": it.dual,
            "rho": rho,
            "beta": beta,
        }
        rec.update(values if values is not None else self.evaluate(weights))
        self._pending = (k, [np.array(W, copy=True) for W in weights])
        self.history.append(rec)
        if self.callback is not None:
            self.callback(rec)
        return rec

    def check(self, rec: dict[str, float]) -> str | None:
        """Status to stop with after this record, or None to go on."""
        stop = self._check(rec)
        if stop not in FAILED and self._pending is not None and \
                self._pending[0] == rec["iteration"] and \
                all(np.all(np.isfinite(W)) for W in self._pending[1]):
            self.last_good = self._pending
        return stop

    def state_dict(self) -> dict[str, Any]:
        """The monitor's progress, as a checkpoint manifest stores it (plain lists and
        numbers; NaN stays NaN, the store's JSON writer turns it into null): the records so
        far (``history``), the L increases at unchanged penalties (``increases``), the capped
        inner solves (``capped_total``) and the last objective with the penalties it was
        computed at (``last_objective``, ``last_params``). ``last_good`` holds weights and is
        the caller's to store."""
        return {"history": [dict(r) for r in self.history],
                "increases": [list(x) for x in self.increases],
                "capped_total": self.capped_total,
                "last_objective": self._last_objective,
                "last_params": list(self._last_params) if self._last_params else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: a :meth:`state_dict`, or a manifest that holds its keys
        (read back from JSON: null record values become NaN; a manifest without
        ``last_params`` takes the last objective and penalties from its last record).
        ``objective0`` is that of the first record."""
        self.history = [{k: math.nan if v is None else v for k, v in r.items()}
                        for r in state.get("history") or []]
        if self.history:
            self.objective0 = self.history[0]["objective"]
            self._last_objective = self.history[-1]["objective"]
            self._last_params = (self.history[-1]["rho"], self.history[-1]["beta"])
        if "last_params" in state:  # the objective of the checkpoint iteration itself
            last = state.get("last_objective")
            self._last_objective = math.nan if last is None else float(last)
            params = state["last_params"]
            self._last_params = (params[0], params[1]) if params else None
        self.increases = [(k, d) for k, d in state.get("increases", [])]
        self.capped_total = int(state.get("capped_total", 0))

    def final_weights(self, status: str, weights: list[np.ndarray]
                      ) -> tuple[list[np.ndarray], int | None]:
        """The weights a run keeps: its final ones, or for a failed run (``diverged``,
        ``nonfinite``) those of its last evaluation that did not fail, with that
        iteration (None: the final weights are kept)."""
        if status in FAILED and self.last_good is not None:
            return self.last_good[1], self.last_good[0]
        return weights, None

    def keep_good(self, result) -> None:
        """Give a failed ``result`` the weights of its last good evaluation (see
        :meth:`final_weights`); ``info["model_iteration"]`` says which iteration they are."""
        weights, k = self.final_weights(result.status, result.weights)
        if k is not None:
            result.weights = weights
            result.info["model_iteration"] = k

    def _check(self, rec: dict[str, float]) -> str | None:
        values = [rec["objective"], rec.get("train_loss", 0.0), rec.get("test_loss", 0.0)]
        if not all(math.isfinite(v) for v in values):
            return "nonfinite"
        if rec["objective"] > self.diverge_factor * max(1.0, abs(self.objective0)):
            return "diverged"
        if _STOP.is_set() and rec["iteration"] > 0:
            return "interrupted"
        tols = [(self.tol_primal, rec["primal_residual"]), (self.tol_dual, rec["dual_residual"])]
        active = [(t, v) for t, v in tols if t > 0]
        if rec["iteration"] > 0 and active and all(v <= t for t, v in active):
            return "converged"
        if self.stall_reason(int(rec["iteration"])) is not None:
            return "stalled"
        return None

    def stall_reason(self, k: int) -> str | None:
        """Why the run counts as stalled at iteration ``k`` (None: it does not). Derived from
        the history alone, so a resumed run judges exactly as an uninterrupted one."""
        S = self.stall_iterations
        if S <= 0 or k < S or not self.history:
            return None
        loss0 = self.history[0].get("train_loss", math.nan)
        bar = (1.0 - STALL_DROP) * loss0
        # stops at the first record whose loss fell (or is not finite): early in a run that
        # learns, so a check per evaluation stays cheap
        fell = any(not math.isfinite(v) or v <= bar
                   for v in (r.get("train_loss", math.nan) for r in self.history[1:]))
        if math.isfinite(loss0) and len(self.history) > 1 and not fell:
            return (f"the network's forward training loss has not fallen below its initial "
                    f"value ({loss0:.4g}) in {k} iterations")
        if self.chance is not None:
            recent = []  # the last S iterations' records, newest first
            for r in reversed(self.history):
                if r["iteration"] < k - S:
                    break
                recent.append(r.get("train_metric", math.nan))
            if len(recent) >= 2 and all(v <= self.chance + STALL_MARGIN for v in recent):
                return (f"the training accuracy has stayed at chance ({self.chance:.3g}, the "
                        f"majority class's share) for {S} iterations")
        return None

    def arrived(self, k: int) -> None:
        """The results of every iteration up to ``k`` are in hand (see ``arrivals``)."""
        self.arrivals.append((k, self.elapsed()))

    def steady_seconds_per_iteration(self) -> float | None:
        """Time per iteration over the second half of this run's iterations and after
        ``ramp``: excludes start-up and the pipelined wavefront's fill, whose results arrive
        bunched. Measured from the last result in hand at the half-way point (or, if none is
        past the ramp by then, the first one after it) to the last one; where results arrive a
        window at a time (``arrivals``), between window ends. NaN with fewer than two
        iterations to measure over (a run of one window has none)."""
        points = self.arrivals or self.step_times
        if not points:
            return float("nan")
        k_last, t_last = points[-1]
        mid = max((self.k_start + k_last) / 2, self.ramp)
        start = [(k, t) for k, t in points if self.ramp <= k <= mid] or \
            [(k, t) for k, t in points if k >= self.ramp][:1]
        if not start or k_last - start[-1][0] < 2:
            return float("nan")
        k0, t0 = start[-1]
        return (t_last - t0) / (k_last - k0)

    def message(self, status: str, k: int) -> str:
        if status == "converged":
            return (f"residuals below tolerance after {k} iterations "
                    f"(primal <= {self.tol_primal:g}, dual <= {self.tol_dual:g})")
        if status == "interrupted":
            return f"interrupted after {k} iterations"
        if status == "stalled":
            reason = self.stall_reason(k) or "the network stopped learning"
            return f"stalled at iteration {k}: {reason}; {STALL_HINT}"
        if status == "nonfinite":
            return f"NaN or inf at iteration {k}: lower rho/beta or raise tau"
        if status == "diverged":
            return (f"objective exceeded {self.diverge_factor:g} x its initial value at "
                    f"iteration {k}")
        return f"reached run.iterations = {k}"
