"""The outcome of a training run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .model import Architecture

__all__ = ["STATUSES", "Result"]

STATUSES = ("converged", "max_iter", "diverged", "nonfinite", "interrupted", "stalled")

# Columns of metrics.csv, in order. Every trainer (ADMM or backprop) fills the same record.
HISTORY_COLUMNS = (
    "iteration",
    "wall_time",
    "objective",
    "primal_residual",
    "dual_residual",
    "train_loss",
    "test_loss",
    "train_metric",
    "test_metric",
    "rho",
    "beta",
)


@dataclass
class Result:
    """What :func:`daskadmm.fit` returns.

    ``status`` is one of ``converged`` (residual tolerances met), ``max_iter``, ``diverged``
    (objective blew up), ``nonfinite`` (NaN/inf in the state), ``interrupted`` (stopped on
    request, e.g. Ctrl-C) or ``stalled`` (the network's forward loss did not fall, or its
    accuracy stayed at chance, for ``run.stall_iterations``; the message says what to try).
    ``history`` holds one record per evaluation with the keys of ``HISTORY_COLUMNS``;
    ``metric`` names the train/test metric (``accuracy`` or ``mse``). ``weights`` are the final
    ``W_1..W_N`` (bias in the last column).
    """

    status: str
    message: str
    iterations: int
    weights: list[np.ndarray]
    arch: Architecture
    metric: str
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}
