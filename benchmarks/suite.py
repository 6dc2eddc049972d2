"""The benchmark suite: ADMM vs backprop quality, roofline, scaling and exploding gradients.

    python benchmarks/suite.py                         # everything (~25 min on 2 cores)
    python benchmarks/suite.py --quick                 # reduced sizes (~4 min)
    python benchmarks/suite.py --only roofline,scaling --out /tmp/bench

Writes ``<out>/suite-<timestamp>.json`` (rewritten after every section, so an interrupted run
keeps what it finished) and, at the end, ``suite-latest.json`` (a copy), ``headline.md`` (the
tables for the README) and ``quality.png`` (test metric against training time). ``--out``
defaults to ``benchmarks/results`` (git-ignored).

Sections (``--only`` picks a subset):

- **quality**: RADMM-3, RADMM-3L, RADMM-2 (residual networks), dlADMM and pdADMM (MLPs, when
  their splittings load) against Adam and SGD (PyTorch, same network, same initial weights,
  same split) on wine_red, wine_white and digits at several depths. Adam's learning rate (and
  batch size) is tuned lightly; the tuned Adam's final test metric is the **target**. Every ADMM
  run gets the wall-clock budget of one full Adam run (``--admm-budget`` times it). Reported per
  run: final and best test metric, time and iterations to the target, and the ratio of the time
  to target to Adam's.
- **roofline**: flops of one RADMM-3 iteration (counted from the update formulas, see
  :func:`radmm3_block_flops`) over the measured time per iteration, as a fraction of the
  machine's float64 matmul rate measured in the same run on one BLAS thread.
- **scaling**: RADMM-3 time per iteration against depth N, width d and samples n, with the
  fitted log-log exponents.
- **gradients**: deep residual networks without down-scaled residual blocks
  (``model.residual_scale=1``, ReLU): RADMM-3 against Adam, with the gradient norms of the first
  and last layer at initialisation.

Timing rules, the same for every method: one process, ``cluster.kind=reference`` (the serial
NumPy solver; PyTorch for Adam/SGD), one BLAS thread and one torch thread. The clock is the run's
own (``Result.history`` ``wall_time``: ADMM from the start of the solver, Adam from after the
optimiser is built) **minus the time spent evaluating metrics** (both evaluate the same NumPy
forward pass on the train and test splits; the suite times those calls and subtracts them), so a
method is not charged for how often it is evaluated. The machines are shared and noisy: compare
the ratios measured within one run, not seconds across runs.

A run that fails is recorded with its error string; a section that fails is recorded with its
error; neither stops the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import Dataset, load_dataset, ols_baseline

SECTIONS = ("quality", "roofline", "scaling", "gradients")
ROOT = Path(__file__).resolve().parent.parent
WINE_FILES = {"wine_red": "winequality-red.csv", "wine_white": "winequality-white.csv"}
ADMM_RESNET = ("radmm3", "radmm3l", "radmm2")
ADMM_MLP = ("dladmm", "pdadmm")
HISTORY_KEYS = ("iteration", "wall_time", "objective", "train_metric", "test_metric")
CURVE_POINTS = 150  # points kept per curve in the JSON
# The relaxed target (as daskadmm-report's default): 0.99 x accuracy, 1.01 x mse.
RELAXED = {True: 0.99, False: 1.01}


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """Every size the suite uses; :data:`PLANS` holds the full, quick and tiny (tests) plans."""

    mode: str
    # quality
    datasets: tuple[str, ...]
    depths: tuple[int, ...]
    width: int
    adam_candidates: tuple[tuple[float, int, int], ...]  # (lr, batch_size (0: full), epochs)
    adam_eval_every: int
    sgd: tuple[float, int]  # (lr, epochs), momentum 0.9, full batch
    admm_iterations: int
    admm_budget: float  # ADMM wall-clock budget = this x the longest Adam candidate's time
    admm_min_budget: float  # seconds
    mlp_depths: tuple[int, ...]  # depths at which dlADMM / pdADMM (MLPs) run
    n_train: int | None = None  # subsample the training split (tiny only)
    n_test: int | None = None
    # roofline
    roofline_widths: tuple[int, ...] = (128, 256, 512)
    roofline_n: int = 4096
    roofline_depth: int = 6
    roofline_iterations: int = 3
    matmul_shape: tuple[int, int, int] = (512, 512, 8192)  # (m, k, n): (m x k) @ (k x n)
    matmul_repeats: int = 5
    # scaling: sweeps around (depth, width, n) = scaling_base
    scaling_base: tuple[int, int, int] = (4, 128, 4096)
    scaling_depths: tuple[int, ...] = (4, 8, 16)
    scaling_widths: tuple[int, ...] = (64, 128, 256, 512)
    scaling_ns: tuple[int, ...] = (1024, 2048, 4096, 8192)
    scaling_iterations: int = 4
    # gradients
    grad_data: str = "digits"
    grad_depths: tuple[int, ...] = (32, 64)
    grad_width: int = 64
    grad_lr: float = 1e-3
    grad_epochs: int = 100
    grad_admm_iterations: int = 100


PLANS: dict[str, Plan] = {
    "full": Plan(
        mode="full",
        datasets=("wine_red", "wine_white", "digits"),
        depths=(4, 8, 16, 32),
        width=64,
        adam_candidates=((1e-3, 0, 300), (3e-3, 0, 300), (1e-3, 64, 40)),
        adam_eval_every=3,
        sgd=(1e-2, 300),
        admm_iterations=150,
        admm_budget=1.0,
        admm_min_budget=2.0,
        mlp_depths=(4, 8),
    ),
    "quick": Plan(
        mode="quick",
        datasets=("wine_red", "wine_white", "digits"),
        depths=(4, 8),
        width=64,
        adam_candidates=((1e-3, 0, 150), (3e-3, 0, 150)),
        adam_eval_every=2,
        sgd=(1e-2, 150),
        admm_iterations=60,
        admm_budget=1.0,
        admm_min_budget=1.0,
        mlp_depths=(4,),
        roofline_widths=(128, 256),
        roofline_iterations=2,
        matmul_repeats=3,
        scaling_base=(4, 128, 2048),
        scaling_depths=(4, 8),
        scaling_widths=(64, 128, 256),
        scaling_ns=(1024, 2048, 4096),
        scaling_iterations=3,
        grad_depths=(32,),
        grad_epochs=40,
        grad_admm_iterations=40,
    ),
    "tiny": Plan(
        mode="tiny",
        datasets=("digits",),
        depths=(3,),
        width=8,
        adam_candidates=((1e-3, 0, 4), (3e-3, 0, 4)),
        adam_eval_every=2,
        sgd=(1e-2, 4),
        admm_iterations=3,
        admm_budget=1.0,
        admm_min_budget=0.5,
        mlp_depths=(3,),
        n_train=100,
        n_test=50,
        roofline_widths=(8, 16),
        roofline_n=64,
        roofline_depth=3,
        roofline_iterations=2,
        matmul_shape=(32, 32, 128),
        matmul_repeats=2,
        scaling_base=(3, 8, 64),
        scaling_depths=(3, 4),
        scaling_widths=(8, 16),
        scaling_ns=(64, 128),
        scaling_iterations=2,
        grad_depths=(5,),
        grad_width=8,
        grad_epochs=3,
        grad_admm_iterations=3,
    ),
}


# ------------------------------------------------------------------------------------ helpers


def _log(section: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {section:9s} {message}", flush=True)


def _error_string(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for name, dist in (("numpy", "numpy"), ("scipy", "scipy"), ("torch", "torch"),
                       ("dask", "dask"), ("distributed", "distributed"),
                       ("sklearn", "scikit-learn"), ("threadpoolctl", "threadpoolctl"),
                       ("matplotlib", "matplotlib"), ("daskadmm", "daskadmm")):
        try:
            out[name] = metadata.version(dist)
        except Exception:  # noqa: BLE001 - an optional library may be missing
            out[name] = "not installed"
    return out


def machine_info() -> dict[str, Any]:
    """CPU count, platform, Python, library versions, BLAS libraries and the load average."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    with contextlib.suppress(Exception):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(Exception):
        info["loadavg"] = list(os.getloadavg())
    with contextlib.suppress(Exception):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                                "threading_layer", "architecture")}
                        for p in threadpool_info() if p.get("user_api") == "blas"]
    return info


def resolve_data_dir(arg: str | None = None, root: Path = ROOT) -> Path:
    """Where the Wine Quality files are read from.

    ``arg`` if given; else ``<root>/data`` when it holds both files; else ``<root>/../shared/data``
    when that does; else ``<root>/data`` (loading then downloads there, or fails with a message).
    """
    if arg:
        return Path(arg).expanduser().resolve()
    candidates = [root / "data", (root / ".." / "shared" / "data").resolve()]
    for c in candidates:
        if all((c / f).is_file() for f in WINE_FILES.values()):
            return c
    return candidates[0]


def load_suite_dataset(name: str, data_dir: Path, plan: Plan, seed: int = 0) -> Dataset:
    """Load ``name`` with the suite's split (seed ``seed``; subsampled in the tiny plan)."""
    cfg = Config().data
    cfg.name = name
    cfg.cache_dir = str(data_dir)
    cfg.n_train, cfg.n_test = plan.n_train, plan.n_test
    if name in WINE_FILES and (data_dir / WINE_FILES[name]).is_file():
        cfg.path = str(data_dir / WINE_FILES[name])
    return load_dataset(cfg, seed=seed)


def synthetic_problem(n: int, d_in: int = 64, d_out: int = 4, n_test: int = 256,
                      seed: int = 0) -> Dataset:
    """A regression problem of any size for the timing sections (a tanh teacher + noise)."""
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)
    X = rng.standard_normal((d_in, n))
    Xt = rng.standard_normal((d_in, n_test))
    Y = np.tanh(T @ X) + 0.1 * rng.standard_normal((d_out, n))
    return Dataset("synthetic-timing", "regression", X, Y, Xt, np.tanh(T @ Xt))


def make_config(algorithm: str, *, depth: int, width: int, kind: str = "resnet",
                activation: str = "tanh", iterations: int = 60, eval_every: int = 1,
                seed: int = 0, residual_scale: float | None = None, **algorithm_options: Any
                ) -> Config:
    """A config with the project defaults, the serial reference engine and 1 BLAS thread."""
    cfg = Config()
    cfg.algorithm.name = algorithm
    for key, value in algorithm_options.items():
        if not hasattr(cfg.algorithm, key):
            raise KeyError(f"algorithm.{key}")
        setattr(cfg.algorithm, key, value)
    cfg.model.kind, cfg.model.depth, cfg.model.width = kind, depth, width
    cfg.model.activation = activation
    if residual_scale is not None:
        cfg.model.residual_scale = residual_scale
    cfg.run.iterations, cfg.run.eval_every, cfg.run.seed = iterations, eval_every, seed
    cfg.run.progress, cfg.run.plot = False, False
    cfg.cluster.kind, cfg.cluster.blas_threads = "reference", 1
    return cfg


class _BudgetReached(Exception):
    """Raised from the monitor callback to end a run at its wall-clock budget."""


@contextlib.contextmanager
def timed_evaluations() -> Iterator[list[float]]:
    """Time every metric evaluation of the runs inside (list of seconds, in call order).

    ``api.fit`` builds its evaluator with ``api.evaluator``; that name is wrapped for the
    duration, so the suite can subtract evaluation time from the run's clock.
    """
    spent: list[float] = []
    original = api.evaluator

    def timed(arch, ds):
        evaluate = original(arch, ds)

        def run(weights):
            t0 = time.perf_counter()
            try:
                return evaluate(weights)
            finally:
                spent.append(time.perf_counter() - t0)

        return run

    api.evaluator = timed
    try:
        yield spent
    finally:
        api.evaluator = original


def timed_fit(cfg: Config, ds: Dataset, budget: float | None = None) -> dict[str, Any]:
    """Run ``api.fit``; return status, message/error, times and the history.

    Every history record gets ``train_time``: the run's clock at that record minus the time of
    the metric evaluations before it. With ``budget`` (seconds of ``train_time``) the run ends
    at the first evaluation past it with status ``time_budget``. Never raises (status ``error``).
    """
    records: list[dict[str, float]] = []
    out: dict[str, Any] = {"algorithm": cfg.algorithm.name, "budget": budget}
    with timed_evaluations() as spent:

        def callback(rec: dict) -> None:
            before = sum(spent[:-1]) if spent else 0.0
            row = {k: float(rec.get(k, math.nan)) for k in HISTORY_KEYS}
            row["train_time"] = float(rec["wall_time"]) - before
            records.append(row)
            if budget is not None and row["iteration"] > 0 and row["train_time"] >= budget:
                raise _BudgetReached

        t0 = time.perf_counter()
        try:
            res = api.fit(cfg, dataset=ds, callback=callback)
            out["status"], out["message"] = res.status, res.message
            out["info"] = {k: v for k, v in res.info.items() if isinstance(v, int | float | str)
                           or v is None}
        except _BudgetReached:
            out["status"] = "time_budget"
            out["message"] = f"stopped at the wall-clock budget of {budget:.3g} s"
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            out["status"] = "error"
            out["error"] = _error_string(exc)
        out["wall"] = time.perf_counter() - t0
    out["eval_time"] = float(sum(spent))
    out["history"] = records
    out["iterations"] = int(records[-1]["iteration"]) if records else 0
    out["train_time"] = records[-1]["train_time"] if records else math.nan
    return out


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def time_to_target(history: Sequence[dict[str, float]], target: float, higher: bool,
                   key: str = "train_time") -> tuple[float, int | None]:
    """``(time, iteration)`` of the first record whose test metric reaches ``target``
    (``>=`` if ``higher`` else ``<=``), or ``(nan, None)``."""
    if not _finite(target):
        return math.nan, None
    for rec in history:
        v = rec.get("test_metric", math.nan)
        if _finite(v) and (v >= target if higher else v <= target):
            return float(rec[key]), int(rec["iteration"])
    return math.nan, None


def best_metric(history: Sequence[dict[str, float]], higher: bool) -> float:
    values = [r["test_metric"] for r in history if _finite(r.get("test_metric"))]
    if not values:
        return math.nan
    return max(values) if higher else min(values)


def fit_exponent(x: Sequence[float], t: Sequence[float]) -> float:
    """Least-squares slope of ``log t`` against ``log x`` (``t ~ c x^slope``)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, t, strict=True)
           if _finite(a) and _finite(b) and a > 0 and b > 0]
    if len(pts) < 2:
        return math.nan
    lx, lt = np.array(pts).T
    lx = lx - lx.mean()
    denom = float(np.sum(lx * lx))
    return float(np.sum(lx * (lt - lt.mean())) / denom) if denom > 0 else math.nan


def _curve(history: Sequence[dict[str, float]], points: int = CURVE_POINTS) -> dict[str, list]:
    """The history thinned to at most ``points`` records (first and last kept)."""
    if len(history) > points:
        idx = np.unique(np.linspace(0, len(history) - 1, points).round().astype(int))
        history = [history[i] for i in idx]
    return {"iteration": [int(r["iteration"]) for r in history],
            "train_time": [r["train_time"] for r in history],
            "test_metric": [r["test_metric"] for r in history]}


def relaxed_target(target: float, higher: bool) -> float:
    return RELAXED[higher] * target


def summarize_run(run: dict[str, Any], target: float, higher: bool, reference_time: float,
                  reference_relaxed_time: float = math.nan) -> dict[str, Any]:
    """Final/best test metric, time/iterations to target and the ratio to the reference time.

    ``ratio`` is ``time_to_target / reference_time``; a run that does not reach the target gets
    ``ratio_lower_bound = train_time / reference_time`` instead (it would need at least that).
    ``relaxed_ratio`` is the same for :func:`relaxed_target` and ``reference_relaxed_time``.
    """
    h = run.get("history", [])
    final = h[-1]["test_metric"] if h else math.nan
    ttt, itt = time_to_target(h, target, higher)
    ok = _finite(reference_time) and reference_time > 0
    out = {
        "algorithm": run.get("algorithm"),
        "status": run.get("status"),
        "final_test_metric": final,
        "best_test_metric": best_metric(h, higher),
        "final_train_metric": h[-1]["train_metric"] if h else math.nan,
        "target": target,
        "time_to_target": ttt,
        "iterations_to_target": itt,
        "reached_target": itt is not None,
        "ratio": ttt / reference_time if ok and _finite(ttt) else math.nan,
        "ratio_lower_bound": (run.get("train_time", math.nan) / reference_time
                              if ok and itt is None else math.nan),
        "iterations": run.get("iterations"),
        "train_time": run.get("train_time"),
        "time_per_iteration": (run.get("train_time", math.nan) / run["iterations"]
                               if run.get("iterations") else math.nan),
        "wall": run.get("wall"),
        "budget": run.get("budget"),
    }
    rt = relaxed_target(target, higher) if _finite(target) else math.nan
    rttt, ritt = time_to_target(h, rt, higher)
    rok = _finite(reference_relaxed_time) and reference_relaxed_time > 0
    out.update({
        "relaxed_target": rt,
        "relaxed_time_to_target": rttt,
        "relaxed_iterations_to_target": ritt,
        "relaxed_ratio": rttt / reference_relaxed_time if rok and _finite(rttt) else math.nan,
        "relaxed_ratio_lower_bound": (run.get("train_time", math.nan) / reference_relaxed_time
                                      if rok and ritt is None else math.nan),
    })
    for key in ("error", "message"):
        if key in run:
            out[key] = run[key]
    return out


def _splitting_available(name: str) -> tuple[bool, str]:
    try:
        from daskadmm.splitting import get_splitting

        get_splitting(name)
        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, _error_string(exc)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return format(x, spec) if _finite(x) else "-"


# ------------------------------------------------------------------------------------ flops


def potrf_flops(m: int) -> float:
    """Cholesky factorisation of an m x m SPD matrix (LAPACK potrf)."""
    return m ** 3 / 3 + m ** 2 / 2 + m / 6


def potrs_flops(m: int, rhs: int) -> float:
    """Two triangular solves with ``rhs`` right-hand sides (LAPACK potrs)."""
    return 2.0 * m * m * rhs


def gemm_flops(m: int, k: int, n: int) -> float:
    """``(m x k) @ (k x n)``."""
    return 2.0 * m * k * n


def syrk_flops(m: int, k: int) -> float:
    """``C = A A^T`` (or ``A^T A``) with C m x m and inner dimension k, one triangle computed
    (what NumPy does for ``X @ X.T`` when both operands are the same buffer)."""
    return float(m * (m + 1) * k)


RADMM3_FLOP_FORMULAS = {
    "conventions": (
        "gemm (m x k)@(k x n): 2mkn; syrk C = A A^T (C m x m, inner k): m(m+1)k (NumPy computes "
        "X @ X.T and A.T @ A of one buffer with BLAS syrk, one triangle); Cholesky potrf(m): "
        "m^3/3 + m^2/2 + m/6; potrs(m, r): 2 m^2 r. Elementwise work (prox, duals, residuals; "
        "O(d n) per block, memory-bound) is not counted. gemm_equivalent counts the two Gram "
        "products as full gemms (2m^2 k)."),
    "per_block": {
        "symbols": ("block i: p = rows of V_{i-1} (d_in for i = 1, else d), p~ = p + bias, "
                    "q = rows of U_i (d, or d_out for i = N), q' = rows of U_{i+1} (i < N), "
                    "n = training samples"),
        "gram": "G = V~ V~^T: syrk(p~, n)",
        "w_rhs": "B = (rho U + Lam) V~^T: gemm(q, n, p~)",
        "w_factor": "chol(rho G + (n lam + tau) I): potrf(p~)",
        "w_solve": "W (.) = B + tau W^k, q right-hand sides: potrs(p~, q)",
        "forward": "Z = W V~: gemm(q, p~, n)",
        "v_rhs": "A_{i+1}^T (rho (U_{i+1} - b 1^T) + Lam_{i+1}): gemm(q, q', n)   (i < N)",
        "v_gram": "A_{i+1}^T A_{i+1}: syrk(q, q')   (i < N)",
        "v_factor": "chol((beta(1+s') + tau) I + rho A^T A): potrf(q)   (i < N)",
        "v_solve": "V = M^{-1} rhs, n right-hand sides: potrs(q, n)   (i < N)",
        "hidden_block_leading_order": "9 d^2 n + O(d^3) (gemm_equivalent: 10 d^2 n); the "
                                      "objective reuses U - Z of the forward product",
    },
    "per_iteration": "sum of the per-block counts over blocks i = 1..N",
}


def radmm3_block_flops(p: int, q: int, q_next: int | None, n: int, *, bias: bool = True,
                       syrk: bool = True) -> dict[str, float]:
    """Flops of one RADMM-3 block update (``radmm3.block_update``, exact W and V steps).

    ``p`` rows of ``V_{i-1}``, ``q`` rows of ``U_i``, ``q_next`` rows of ``U_{i+1}`` (None for
    the output block, which has no V step), ``n`` samples. ``syrk=False`` counts the two Gram
    products as full matrix products (the "gemm-equivalent" count). See
    :data:`RADMM3_FLOP_FORMULAS`.
    """
    pt = p + int(bias)
    terms = {
        "gram": syrk_flops(pt, n) if syrk else gemm_flops(pt, n, pt),
        "w_rhs": gemm_flops(q, n, pt),
        "w_factor": potrf_flops(pt),
        "w_solve": potrs_flops(pt, q),
        "forward": gemm_flops(q, pt, n),
    }
    if q_next is not None:
        terms["v_rhs"] = gemm_flops(q, q_next, n)
        terms["v_gram"] = syrk_flops(q, q_next) if syrk else gemm_flops(q, q_next, q)
        terms["v_factor"] = potrf_flops(q)
        terms["v_solve"] = potrs_flops(q, n)
    return terms


def radmm3_iteration_flops(depth: int, d_in: int, width: int, d_out: int, n: int, *,
                           bias: bool = True, syrk: bool = True) -> dict[str, float]:
    """Flops of one RADMM-3 iteration, per term summed over the blocks, plus ``total``."""
    def rows_in(i: int) -> int:
        return d_in if i == 1 else width

    def rows_out(i: int) -> int:
        return d_out if i == depth else width

    totals: dict[str, float] = {}
    for i in range(1, depth + 1):
        q_next = rows_out(i + 1) if i < depth else None
        for k, v in radmm3_block_flops(rows_in(i), rows_out(i), q_next, n, bias=bias,
                                       syrk=syrk).items():
            totals[k] = totals.get(k, 0.0) + v
    totals["total"] = float(sum(totals.values()))
    return totals


def measure_matmul_rate(shape: tuple[int, int, int] = (512, 512, 8192), repeats: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """Float64 ``A @ B`` rate on one BLAS thread: best of ``repeats`` (and the median)."""
    m, k, n = shape
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, k))
    B = rng.standard_normal((k, n))
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        A @ B  # warm-up
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            A @ B
            times.append(time.perf_counter() - t0)
    flops = gemm_flops(m, k, n)
    return {"shape": [m, k, n], "flops": flops, "best_time": min(times),
            "median_time": float(np.median(times)), "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / float(np.median(times)) / 1e9, "repeats": len(times)}


def iteration_times(run: dict[str, Any]) -> list[float]:
    """Time of every iteration from a run evaluated every iteration (``train_time`` diffs)."""
    h = run.get("history", [])
    out = []
    for a, b in zip(h, h[1:], strict=False):
        steps = b["iteration"] - a["iteration"]
        if steps > 0:
            out.append((b["train_time"] - a["train_time"]) / steps)
    return out


def _timing_run(depth: int, width: int, n: int, iterations: int,
                cache: dict | None = None) -> dict[str, Any]:
    """Time RADMM-3 (ReLU, exact prox) on a synthetic problem; per-iteration statistics."""
    key = (depth, width, n, iterations)
    if cache is not None and key in cache:
        return cache[key]
    ds = synthetic_problem(n)
    cfg = make_config("radmm3", depth=depth, width=width, activation="relu",
                      iterations=iterations, eval_every=1)
    run = timed_fit(cfg, ds)
    times = iteration_times(run)
    out = {"depth": depth, "width": width, "n": n, "d_in": ds.d_in, "d_out": ds.d_out,
           "iterations": run["iterations"], "status": run["status"],
           "iteration_times": times,
           "time_min": min(times) if times else math.nan,
           "time_median": float(np.median(times)) if times else math.nan}
    if "error" in run:
        out["error"] = run["error"]
    if cache is not None:
        cache[key] = out
    return out


def profile_iteration(depth: int, width: int, n: int, top: int = 12) -> dict[str, Any]:
    """Where one RADMM-3 iteration (ReLU) spends its time: cProfile's own time per function
    (one warm-up iteration, then one profiled), the ``top`` functions with their share."""
    import cProfile
    import pstats

    ds = synthetic_problem(n)
    cfg = make_config("radmm3", depth=depth, width=width, activation="relu", iterations=2,
                      eval_every=2)
    from daskadmm.model import init_weights
    from daskadmm.reference import initial_outputs, sweep
    from daskadmm.splitting import BlockSpec, get_splitting

    arch = api.build_architecture(cfg, ds)
    splitting = get_splitting("radmm3")
    states = splitting.init_state(arch, init_weights(arch, np.random.default_rng(0)),
                                  ds.X_train, ds.Y_train)
    specs = [BlockSpec(arch, i, n) for i in range(1, depth + 1)]
    from daskadmm.schedules import PenaltySchedule

    pen = PenaltySchedule(api.schedule_options(cfg.algorithm)).at(1)
    prof = cProfile.Profile()
    with threadpool_limits(limits=1, user_api="blas"):
        outputs, _ = sweep(splitting, specs, pen, initial_outputs(splitting, states),
                           ds.X_train, ds.Y_train)
        prof.enable()
        sweep(splitting, specs, pen, outputs, ds.X_train, ds.Y_train)
        prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values()) or math.nan
    rows = sorted(((v[2], f"{Path(f).name}:{line}({name})") for (f, line, name), v
                   in stats.items()), reverse=True)[:top]
    return {"depth": depth, "width": width, "n": n, "profiled_seconds": total,
            "top_own_time": [{"function": name, "seconds": t, "share": t / total}
                             for t, name in rows]}


# ------------------------------------------------------------------------------------ sections


def section_quality(plan: Plan, data_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """ADMM variants vs tuned Adam and SGD; see the module docstring."""
    mlp_ok = {name: _splitting_available(name) for name in ADMM_MLP}
    out: dict[str, Any] = {
        "width": plan.width,
        "depths": list(plan.depths),
        "datasets": list(plan.datasets),
        "data_dir": str(data_dir),
        "engine": "cluster.kind=reference (serial NumPy, one process, 1 BLAS thread); "
                  "Adam/SGD: PyTorch float64 CPU, 1 thread",
        "admm_defaults": dataclasses.asdict(Config().algorithm) | {
            "activation": Config().model.activation,
            "residual_scale": Config().model.residual_scale},
        "adam_candidates": [{"lr": lr, "batch_size": b, "epochs": e}
                            for lr, b, e in plan.adam_candidates],
        "sgd": {"lr": plan.sgd[0], "momentum": 0.9, "epochs": plan.sgd[1], "batch_size": 0},
        "admm_iterations": plan.admm_iterations,
        "admm_budget": (f"{plan.admm_budget} x the longest Adam candidate's train time "
                        f"(at least {plan.admm_min_budget} s)"),
        "target": "the tuned Adam's final test metric (same data set and depth); accuracy: "
                  "reach >=, mse: reach <=; time = train_time (run clock minus metric "
                  "evaluations)",
        "ratio": "ADMM time-to-target / Adam time-to-target (Adam's first record at its own "
                 "final metric); not reached: ratio_lower_bound = ADMM train time / Adam's",
        "relaxed_ratio": "the same for the relaxed target (0.99 x accuracy, 1.01 x mse)",
        "mlp": {name: ("available" if ok else f"unavailable: {err}")
                for name, (ok, err) in mlp_ok.items()},
        "mlp_note": "dlADMM/pdADMM train MLPs (model.kind=mlp); their target and ratio are "
                    "against Adam trained on the same MLP with the tuned Adam settings",
        "split": "run.seed = 0 for every run (same split, same initial weights per network)",
        "configs": [],
    }
    for name in plan.datasets:
        try:
            ds = load_suite_dataset(name, data_dir, plan)
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: cannot load: {_error_string(exc)}")
            out["configs"].append({"data": name, "error": _error_string(exc)})
            continue
        metric = api.metric_name(ds)
        higher = higher_is_better(metric)
        try:
            ols = ols_baseline(ds)
        except Exception as exc:  # noqa: BLE001
            ols = {"error": _error_string(exc)}
        for depth in plan.depths:
            entry = _quality_config(plan, ds, name, depth, metric, higher, mlp_ok, log)
            entry["ols"] = ols
            out["configs"].append(entry)
    return out


def _quality_config(plan: Plan, ds: Dataset, name: str, depth: int, metric: str, higher: bool,
                    mlp_ok: dict[str, tuple[bool, str]], log: Callable[[str], None]
                    ) -> dict[str, Any]:
    entry: dict[str, Any] = {"data": name, "depth": depth, "width": plan.width, "metric": metric,
                             "n_train": ds.n_train, "n_test": ds.n_test, "d_in": ds.d_in,
                             "d_out": ds.d_out, "runs": {}, "curves": {}}
    where = f"{name} N={depth}"

    def record(label: str, run: dict[str, Any], target: float, ref: dict) -> dict:
        ref_h = ref.get("history", [])
        ref_time = time_to_target(ref_h, target, higher)[0]
        ref_relaxed = time_to_target(ref_h, relaxed_target(target, higher), higher)[0]
        s = summarize_run(run, target, higher, ref_time, ref_relaxed)
        entry["runs"][label] = s
        entry["curves"][label] = _curve(run.get("history", []))
        reach = (f"ratio {_fmt(s['ratio'], '.2f')}" if s["reached_target"]
                 else f"not reached (ratio > {_fmt(s['ratio_lower_bound'], '.2f')})")
        reach += (f", relaxed {_fmt(s['relaxed_ratio'], '.2f')}"
                  if s["relaxed_iterations_to_target"] is not None
                  else f", relaxed > {_fmt(s['relaxed_ratio_lower_bound'], '.2f')}")
        log(f"{where} {label:14s} {s['status']:11s} final {_fmt(s['final_test_metric'], '.4f')} "
            f"best {_fmt(s['best_test_metric'], '.4f')} {reach}; {s['iterations']} it "
            f"{_fmt(s['train_time'], '.1f')} s" + (f" [{s['error']}]" if "error" in s else ""))
        return s

    # 1. Adam, lightly tuned: the best final test metric wins.
    adam_runs = []
    for lr, batch, epochs in plan.adam_candidates:
        cfg = make_config("adam", depth=depth, width=plan.width, iterations=epochs,
                          eval_every=plan.adam_eval_every if batch == 0 else 1, lr=lr,
                          batch_size=batch)
        run = timed_fit(cfg, ds)
        run["settings"] = {"lr": lr, "batch_size": batch, "epochs": epochs}
        adam_runs.append(run)
        final = run["history"][-1]["test_metric"] if run["history"] else math.nan
        log(f"{where} adam lr={lr:g} batch={batch or 'full'} epochs={epochs}: {run['status']} "
            f"final {_fmt(final, '.4f')} ({_fmt(run['train_time'], '.1f')} s)"
            + (f" [{run['error']}]" if "error" in run else ""))

    def final_of(run: dict) -> float:
        h = run["history"]
        return h[-1]["test_metric"] if h and run["status"] != "error" else math.nan

    finite = [r for r in adam_runs if _finite(final_of(r))]
    entry["adam_candidates"] = [{**r["settings"], "status": r["status"],
                                 "final_test_metric": final_of(r), "train_time": r["train_time"],
                                 **({"error": r["error"]} if "error" in r else {})}
                                for r in adam_runs]
    if not finite:
        entry["error"] = "no Adam candidate finished with a finite test metric"
        log(f"{where}: {entry['error']}")
        return entry
    best = (max if higher else min)(finite, key=final_of)
    target = final_of(best)
    adam_ttt, _ = time_to_target(best["history"], target, higher)
    entry["adam"] = best["settings"]
    entry["target"] = target
    entry["adam_time_to_target"] = adam_ttt
    budget = max(plan.admm_min_budget,
                 plan.admm_budget * max(r["train_time"] for r in adam_runs
                                        if _finite(r["train_time"])))
    entry["admm_budget_seconds"] = budget
    for r in adam_runs:
        s = r["settings"]
        label = f"adam lr={s['lr']:g} b={s['batch_size'] or 'full'}"
        entry["curves"][label] = _curve(r["history"])
    entry["relaxed_target"] = relaxed_target(target, higher)
    record("adam", best, target, best)

    # 2. SGD (one setting, full batch, momentum 0.9).
    lr, epochs = plan.sgd
    cfg = make_config("sgd", depth=depth, width=plan.width, iterations=epochs,
                      eval_every=plan.adam_eval_every, lr=lr, momentum=0.9)
    record("sgd", timed_fit(cfg, ds), target, best)

    # 3. ADMM on the residual network, project defaults, the same wall-clock budget.
    for alg in ADMM_RESNET:
        cfg = make_config(alg, depth=depth, width=plan.width, iterations=plan.admm_iterations)
        record(alg, timed_fit(cfg, ds, budget=budget), target, best)

    # 4. dlADMM / pdADMM on the MLP, against Adam on the same MLP.
    if depth in plan.mlp_depths and any(ok for ok, _ in mlp_ok.values()):
        s = best["settings"]
        cfg = make_config("adam", depth=depth, width=plan.width, kind="mlp",
                          iterations=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                          eval_every=plan.adam_eval_every if s["batch_size"] == 0 else 1)
        adam_mlp = timed_fit(cfg, ds)
        mlp_target = final_of(adam_mlp)
        entry["mlp_target"] = mlp_target
        record("adam (mlp)", adam_mlp, mlp_target, adam_mlp)
        mlp_budget = max(plan.admm_min_budget, plan.admm_budget * adam_mlp["train_time"]) \
            if _finite(adam_mlp["train_time"]) else budget
        for alg in ADMM_MLP:
            if not mlp_ok[alg][0]:
                continue
            cfg = make_config(alg, depth=depth, width=plan.width, kind="mlp",
                              iterations=plan.admm_iterations)
            record(f"{alg} (mlp)", timed_fit(cfg, ds, budget=mlp_budget), mlp_target,
                   adam_mlp)
    return entry


def section_roofline(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """RADMM-3 flop rate as a fraction of the single-thread matmul rate, same run."""
    before = measure_matmul_rate(plan.matmul_shape, plan.matmul_repeats)
    log(f"matmul {plan.matmul_shape}: {before['gflops']:.1f} Gflop/s (best of "
        f"{before['repeats']}, 1 BLAS thread)")
    rows = []
    for width in plan.roofline_widths:
        t = _timing_run(plan.roofline_depth, width, plan.roofline_n, plan.roofline_iterations)
        flops = radmm3_iteration_flops(plan.roofline_depth, t["d_in"], width, t["d_out"],
                                       plan.roofline_n)
        gemm_eq = radmm3_iteration_flops(plan.roofline_depth, t["d_in"], width, t["d_out"],
                                         plan.roofline_n, syrk=False)["total"]
        row = dict(t, flops=flops["total"], flops_gemm_equivalent=gemm_eq,
                   flops_by_term={k: v for k, v in flops.items() if k != "total"})
        row["gflops"] = flops["total"] / t["time_min"] / 1e9 if t["time_min"] > 0 else math.nan
        row["gflops_median"] = (flops["total"] / t["time_median"] / 1e9
                                if t["time_median"] > 0 else math.nan)
        rows.append(row)
        log(f"width {width} n {plan.roofline_n} N {plan.roofline_depth}: "
            f"{_fmt(t['time_min'], '.3f')} s/iteration (min), {flops['total'] / 1e9:.2f} Gflop "
            f"-> {_fmt(row['gflops'], '.1f')} Gflop/s" + (f" [{t['error']}]" if "error" in t
                                                          else ""))
    after = measure_matmul_rate(plan.matmul_shape, plan.matmul_repeats)
    peak = max(before["gflops"], after["gflops"])
    log(f"matmul again: {after['gflops']:.1f} Gflop/s; reference rate {peak:.1f} Gflop/s")
    for row in rows:
        row["fraction_of_matmul"] = row["gflops"] / peak
        row["fraction_of_matmul_median"] = row["gflops_median"] / peak
        log(f"width {row['width']}: {_fmt(100 * row['fraction_of_matmul'], '.0f')}% of the "
            f"matmul rate (median iteration: "
            f"{_fmt(100 * row['fraction_of_matmul_median'], '.0f')}%)")
    widest = max(rows, key=lambda r: r["width"]) if rows else None
    try:
        profile = profile_iteration(plan.roofline_depth, max(plan.roofline_widths),
                                    plan.roofline_n)
        log("profile of one iteration at width " f"{max(plan.roofline_widths)} (own time): "
            + ", ".join(f"{r['function']} {100 * r['share']:.0f}%"
                        for r in profile["top_own_time"][:5]))
    except Exception as exc:  # noqa: BLE001
        profile = {"error": _error_string(exc)}
    return {
        "algorithm": "radmm3 (exact W and V solves), relu (closed-form prox), mse loss, bias",
        "problem": {"depth": plan.roofline_depth, "n": plan.roofline_n, "d_in": 64, "d_out": 4,
                    "data": "synthetic regression (tanh teacher)"},
        "timing": "per-iteration train_time (metric evaluations subtracted); 'time_min' is the "
                  "fastest iteration, as the matmul rate is the best of its repeats",
        "blas_threads": 1,
        "matmul_before": before,
        "matmul_after": after,
        "matmul_gflops": peak,
        "flop_formulas": RADMM3_FLOP_FORMULAS,
        "rows": rows,
        "profile": profile,
        "target": "RADMM-3 >= 50% of the matmul rate at width 512",
        "target_width": widest["width"] if widest else None,
        "target_met": (bool(widest["fraction_of_matmul"] >= 0.5)
                       if widest and widest["width"] >= 512 and _finite(
                           widest["fraction_of_matmul"]) else None),
    }


def section_scaling(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Time per iteration against N, d, n around ``plan.scaling_base``; fitted exponents."""
    N0, d0, n0 = plan.scaling_base
    cache: dict = {}
    sweeps: dict[str, Any] = {}
    for axis, values, expected in (("depth", plan.scaling_depths, 1.0),
                                   ("width", plan.scaling_widths, 2.0),
                                   ("n", plan.scaling_ns, 1.0)):
        rows = []
        for v in values:
            N, d, n = (v if axis == "depth" else N0, v if axis == "width" else d0,
                       v if axis == "n" else n0)
            t = _timing_run(N, d, n, plan.scaling_iterations, cache)
            rows.append(t)
            log(f"{axis}={v} (N={N} d={d} n={n}): {_fmt(t['time_median'], '.4f')} s/iteration"
                + (f" [{t['error']}]" if "error" in t else ""))
        xs = [float(v) for v in values]
        med = [r["time_median"] for r in rows]
        sweeps[axis] = {
            "values": list(values),
            "rows": rows,
            "exponent": fit_exponent(xs, med),
            "exponent_min_times": fit_exponent(xs, [r["time_min"] for r in rows]),
            "exponent_last_two": fit_exponent(xs[-2:], med[-2:]),
            "expected": expected,
        }
        if axis == "depth" and len(rows) >= 2 and all(_finite(m) for m in med):
            slope, intercept = np.polyfit(xs, med, 1)
            sweeps[axis]["linear_fit"] = {"seconds_per_layer": float(slope),
                                          "intercept": float(intercept),
                                          "model": "time = intercept + seconds_per_layer * N"}
        log(f"{axis}: fitted exponent {_fmt(sweeps[axis]['exponent'], '.2f')} "
            f"(last two points {_fmt(sweeps[axis]['exponent_last_two'], '.2f')}; "
            f"expected ~{expected:g})")
    return {
        "algorithm": "radmm3, relu, synthetic regression (d_in 64, d_out 4), bias",
        "base": {"depth": N0, "width": d0, "n": n0},
        "iterations": plan.scaling_iterations,
        "timing": "median per-iteration train_time; exponent = least-squares slope of "
                  "log(time) against log(size)",
        "note": "depth N counts weight layers: N-2 residual blocks plus the input and output "
                "layers, so time ~ a + b N and the slope is a little below 1; the d sweep has "
                "O(d n) elementwise and O(d^3) solve terms next to the O(d^2 n) products",
        "sweeps": sweeps,
    }


def init_gradient_norms(ds: Dataset, depth: int, width: int, activation: str,
                        residual_scale: float, seed: int = 0) -> dict[str, Any]:
    """Loss and per-layer gradient norms at the initial weights ``fit`` would use (torch
    autograd through :mod:`daskadmm.baseline`), plus the RMS of the first and last block
    outputs of the forward pass."""
    from daskadmm import baseline
    from daskadmm.model import forward, init_weights

    torch = baseline.require_torch()
    cfg = make_config("adam", depth=depth, width=width, activation=activation,
                      residual_scale=residual_scale, seed=seed)
    arch = api.build_architecture(cfg, ds)
    weights0 = init_weights(arch, np.random.default_rng(seed), residual_scale)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = [torch.tensor(W, dtype=torch.float64, requires_grad=True) for W in weights0]
        X = torch.as_tensor(ds.X_train, dtype=torch.float64)
        Y = torch.as_tensor(ds.Y_train, dtype=torch.float64)
        value = baseline.torch_objective(arch, params, X, Y, 0.0)
        value.backward()
        norms = [float(p.grad.norm()) for p in params]
    finally:
        torch.set_num_threads(previous)
    with np.errstate(all="ignore"):
        _, V = forward(arch, weights0, ds.X_train)
    rms = [float(np.sqrt(np.mean(v * v))) for v in V[1:]]
    first, last = norms[0], norms[-1]
    return {"residual_scale": residual_scale, "loss": float(value.detach()),
            "grad_norm_first": first, "grad_norm_last": last,
            "grad_ratio_first_over_last": first / last if last > 0 else math.nan,
            "grad_norms": norms, "activation_rms_first": rms[0], "activation_rms_last": rms[-1],
            "activation_growth": rms[-1] / rms[0] if rms[0] > 0 else math.nan}


def section_gradients(plan: Plan, data_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Deep residual networks with residual_scale=1 (no down-scaling), ReLU: RADMM-3 vs Adam."""
    ds = load_suite_dataset(plan.grad_data, data_dir, plan)
    metric = api.metric_name(ds)
    higher = higher_is_better(metric)
    rows = []
    for depth in plan.grad_depths:
        row: dict[str, Any] = {"depth": depth, "width": plan.grad_width, "metric": metric}
        for scale in (1.0, Config().model.residual_scale):
            key = "init_gradients" if scale == 1.0 else f"init_gradients_scale_{scale:g}"
            try:
                row[key] = init_gradient_norms(ds, depth, plan.grad_width, "relu", scale)
            except Exception as exc:  # noqa: BLE001
                row[key] = {"error": _error_string(exc)}
        g = row["init_gradients"]
        if "error" not in g:
            log(f"N={depth} init (residual_scale 1): loss {g['loss']:.3g}, |grad W1| "
                f"{g['grad_norm_first']:.3g}, |grad WN| {g['grad_norm_last']:.3g}, activation "
                f"growth x{g['activation_growth']:.3g}")
        cfg = make_config("adam", depth=depth, width=plan.grad_width, activation="relu",
                          residual_scale=1.0, iterations=plan.grad_epochs, lr=plan.grad_lr)
        adam = timed_fit(cfg, ds)
        budget = max(plan.admm_min_budget, adam["train_time"]) \
            if _finite(adam["train_time"]) else None
        cfg = make_config("radmm3", depth=depth, width=plan.grad_width, activation="relu",
                          residual_scale=1.0, iterations=plan.grad_admm_iterations)
        admm = timed_fit(cfg, ds, budget=budget)
        for label, run in (("adam", adam), ("radmm3", admm)):
            h = run["history"]
            final = h[-1]["test_metric"] if h else math.nan
            s = {"status": run["status"], "final_test_metric": final,
                 "best_test_metric": best_metric(h, higher),
                 "initial_test_metric": h[0]["test_metric"] if h else math.nan,
                 "nonfinite": run["status"] == "nonfinite" or not _finite(final),
                 "diverged": run["status"] == "diverged", "iterations": run["iterations"],
                 "train_time": run["train_time"], "budget": run.get("budget"),
                 "curve": _curve(h)}
            for key in ("error", "message"):
                if key in run:
                    s[key] = run[key]
            row[label] = s
            log(f"N={depth} {label:7s} {s['status']:11s} final {_fmt(final, '.4f')} best "
                f"{_fmt(s['best_test_metric'], '.4f')} ({s['iterations']} it, "
                f"{_fmt(s['train_time'], '.1f')} s)" + (f" [{s['error']}]" if "error" in s
                                                        else ""))
        rows.append(row)
    return {
        "data": plan.grad_data,
        "n_train": ds.n_train,
        "setup": "model.kind=resnet, relu, model.residual_scale=1.0 (residual blocks at full He "
                 "scale: the forward signal grows geometrically with depth), no normalisation; "
                 f"Adam lr={plan.grad_lr:g} full batch, {plan.grad_epochs} epochs; RADMM-3 "
                 "project defaults with the same wall-clock budget as Adam",
        "rows": rows,
    }


# ------------------------------------------------------------------------------------ outputs


def _cell(s: dict | None, ratio: bool = True) -> str:
    if not s:
        return "-"
    if s.get("status") in ("error", "diverged", "nonfinite"):
        return str(s["status"])
    text = _fmt(s.get("final_test_metric"), ".3f")
    if ratio:
        if s.get("reached_target"):
            text += f" / {_fmt(s.get('ratio'), '.2g')}x"
        else:
            text += f" / >{_fmt(s.get('ratio_lower_bound'), '.2g')}x"
        if s.get("relaxed_iterations_to_target") is not None:
            text += f" ({_fmt(s.get('relaxed_ratio'), '.2g')}x)"
        else:
            text += f" (>{_fmt(s.get('relaxed_ratio_lower_bound'), '.2g')}x)"
    return text


def headline_markdown(results: dict[str, Any]) -> str:
    """The markdown tables for the README."""
    m = results.get("machine", {})
    lines = [f"# Benchmark headline ({results.get('mode')}, {results.get('timestamp')})", "",
             f"Machine: {m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpus')} CPUs, "
             f"Python {m.get('python')}, numpy {m.get('versions', {}).get('numpy')}, torch "
             f"{m.get('versions', {}).get('torch')}; one process, one BLAS/torch thread. "
             "Shared machine: compare ratios, not seconds.", ""]
    sec = results.get("sections", {})
    q = sec.get("quality")
    if q and "configs" in q:
        lines += ["## Quality: ADMM vs Adam", "",
                  "Cells: final test metric / time-to-target ratio (time to reach the tuned "
                  "Adam's final test metric over Adam's time to reach it; `>x`: not reached "
                  "within the budget (ADMM: the wall time of one full Adam run), x is a lower "
                  "bound) (in brackets: the same ratio for the relaxed target 0.99 x accuracy, "
                  "1.01 x MSE). MSE: lower is better. Adam MLP: final metric of Adam on the MLP "
                  "that dlADMM/pdADMM train (their target).", ""]
        algs = ["sgd", *ADMM_RESNET]
        mlp = any("dladmm (mlp)" in c.get("runs", {}) or "pdadmm (mlp)" in c.get("runs", {})
                  for c in q["configs"])
        head = ["data", "N", "metric", "Adam final (lr, batch)", "Adam time to target [s]",
                "OLS", *algs]
        if mlp:
            head += ["Adam MLP", "dladmm (mlp)", "pdadmm (mlp)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in q["configs"]:
            if "runs" not in c or "adam" not in c.get("runs", {}):
                lines.append(f"| {c.get('data')} | {c.get('depth', '-')} | error: "
                             f"{c.get('error', '?')} |")
                continue
            runs, a = c["runs"], c.get("adam", {})
            ols = c.get("ols", {})
            ols_v = ols.get("test_mse") if c["metric"] == "mse" else ols.get("test_accuracy")
            row = [c["data"], str(c["depth"]), c["metric"],
                   f"{_fmt(c.get('target'), '.3f')} ({a.get('lr', 0):g}, "
                   f"{a.get('batch_size') or 'full'})",
                   _fmt(c.get("adam_time_to_target"), ".2f"), _fmt(ols_v, ".3f")]
            row += [_cell(runs.get(alg)) for alg in algs]
            if mlp:
                row += [_cell(runs.get("adam (mlp)"), ratio=False),
                        _cell(runs.get("dladmm (mlp)")), _cell(runs.get("pdadmm (mlp)"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    r = sec.get("roofline")
    if r and "rows" in r:
        p = r["problem"]
        lines += ["## Roofline: RADMM-3 flop rate", "",
                  f"ReLU, N={p['depth']}, n={p['n']}, 1 BLAS thread; matmul "
                  f"{'x'.join(map(str, r['matmul_before']['shape']))}: "
                  f"{r['matmul_gflops']:.1f} Gflop/s. Target: >= 50% at width 512.", "",
                  "| width | Gflop/iteration | s/iteration (min) | Gflop/s | fraction of matmul |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['width']} | {row['flops'] / 1e9:.2f} | "
                         f"{_fmt(row['time_min'], '.3f')} | {_fmt(row['gflops'], '.1f')} | "
                         f"{_fmt(100 * row['fraction_of_matmul'], '.0f')}% |")
        lines.append("")
    s = sec.get("scaling")
    if s and "sweeps" in s:
        b = s["base"]
        lines += ["## Scaling: RADMM-3 time per iteration", "",
                  f"Around N={b['depth']}, d={b['width']}, n={b['n']} (ReLU).", "",
                  "| sweep | values | fitted exponent | last two points | expected |",
                  "|---|---|---|---|---|"]
        for axis, sw in s["sweeps"].items():
            lines.append(f"| {axis} | {', '.join(map(str, sw['values']))} | "
                         f"{_fmt(sw['exponent'], '.2f')} | {_fmt(sw['exponent_last_two'], '.2f')}"
                         f" | ~{sw['expected']:g} |")
        lines.append("")
    g = sec.get("gradients")
    if g and "rows" in g:
        lines += ["## Exploding gradients: residual_scale = 1, ReLU, no normalisation", "",
                  f"{g['data']}; {g['setup']}.", "",
                  "At initialisation (loss, gradient norms of the first and last layer, growth of "
                  "the RMS of the block outputs from the first to the last) with "
                  "residual_scale 1, and with the project default in brackets.", "",
                  "| N | loss at init | grad W1 / grad WN at init | activation growth | "
                  "Adam final (status) | RADMM-3 final (status) |", "|---|---|---|---|---|---|"]
        for row in g["rows"]:
            ig = row.get("init_gradients", {})
            ref = next((v for k, v in row.items() if k.startswith("init_gradients_scale")), {})
            ad, rd = row.get("adam", {}), row.get("radmm3", {})

            def outcome(r: dict) -> str:
                text = f"{_fmt(r.get('final_test_metric'), '.3f')} ({r.get('status')})"
                if r.get("error"):
                    text += f": {r['error'][:70]}"
                return text

            lines.append(
                f"| {row['depth']} | {_fmt(ig.get('loss'), '.3g')} "
                f"({_fmt(ref.get('loss'), '.3g')}) | "
                f"{_fmt(ig.get('grad_norm_first'), '.3g')} / "
                f"{_fmt(ig.get('grad_norm_last'), '.3g')} "
                f"({_fmt(ref.get('grad_norm_first'), '.3g')} / "
                f"{_fmt(ref.get('grad_norm_last'), '.3g')}) | "
                f"x{_fmt(ig.get('activation_growth'), '.3g')} "
                f"(x{_fmt(ref.get('activation_growth'), '.3g')}) | "
                f"{outcome(ad)} | {outcome(rd)} |")
        lines.append("")
    errors = results.get("errors", [])
    if errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


_STYLE = {"adam": ("k", "-"), "sgd": ("0.55", "-"), "radmm3": ("C0", "-"),
          "radmm3l": ("C1", "-"), "radmm2": ("C2", "-"), "adam (mlp)": ("k", "--"),
          "dladmm (mlp)": ("C3", "--"), "pdadmm (mlp)": ("C4", "--")}


def plot_quality(quality: dict[str, Any], path: Path) -> Path | None:
    """Test metric against training time, one panel per data set and depth."""
    configs = [c for c in quality.get("configs", []) if c.get("curves")]
    if not configs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(c["data"] for c in configs))
    depths = sorted({c["depth"] for c in configs})
    width = max(8.0, 3.6 * len(depths))
    fig, axes = plt.subplots(len(datasets), len(depths), squeeze=False,
                             figsize=(width, 2.9 * len(datasets) + 0.6))
    for c in configs:
        ax = axes[datasets.index(c["data"])][depths.index(c["depth"])]
        ys = []
        for label, (color, ls) in _STYLE.items():
            cur = c["curves"].get(label)
            if not cur:
                continue
            x = np.array(cur["train_time"], dtype=float)
            y = np.array([np.nan if v is None else v for v in cur["test_metric"]], dtype=float)
            name = label
            if label == "adam" and c.get("adam"):
                name = f"adam (lr {c['adam']['lr']:g})"
            ax.plot(x, y, color=color, ls=ls, lw=1.3, label=name)
            ys.extend(y[np.isfinite(y)].tolist())
        tgt = c.get("target")
        if _finite(tgt):
            ax.axhline(tgt, color="k", ls=":", lw=0.8)
        if c["metric"] == "mse":
            ref = c.get("ols", {}).get("mean_mse")
            top = 1.3 * ref if _finite(ref) else (np.nanpercentile(ys, 90) if ys else 1.0)
            low = 0.9 * min(ys) if ys else 0.0
            if top > low:
                ax.set_ylim(low, top)
        else:
            ax.set_ylim(max(0.0, min(ys) - 0.02) if ys and min(ys) > 0.5 else 0.0, 1.0)
        ax.set_title(f"{c['data']}, N={c['depth']}", fontsize=9)
        ax.set_xlabel("train time [s]", fontsize=8)
        ax.set_ylabel(f"test {c['metric']}", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = {}, {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                key = lab.split(" (lr")[0]
                handles.setdefault(key, h)
                labels.setdefault(key, key)
    fig.legend(list(handles.values()), list(labels.values()), loc="lower center",
               ncol=min(int(width // 1.6), len(handles)), fontsize=8, frameon=False)
    fig.suptitle("test metric vs training time (dotted: target = tuned Adam's final)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09 if len(handles) > int(width // 1.6) else 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ driver


def run_suite(plan: Plan, sections: Sequence[str], out: Path, data_dir: Path,
              argv: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:
    """Run the sections; write the JSON after each, and the headline and plot at the end."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"suite-{stamp}.json"
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "daskadmm_suite",
        "mode": plan.mode,
        "timestamp": stamp,
        "argv": list(argv),
        "plan": dataclasses.asdict(plan),
        "machine": machine_info(),
        "notes": {
            "engine": "every method runs in this one process: ADMM with cluster.kind=reference "
                      "(serial NumPy), Adam/SGD with PyTorch on the CPU; 1 BLAS thread and 1 "
                      "torch thread, for timing fairness",
            "timing": "train_time = the run's own clock minus the metric evaluations "
                      "(timed by wrapping daskadmm.api.evaluator)",
            "shared_machine": "the machines are shared and noisy: compare ratios measured in "
                              "the same run, not seconds across runs",
        },
        "sections": {},
        "section_seconds": {},
        "errors": [],
    }

    def save() -> None:
        path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False))

    runners: dict[str, Callable[[Callable[[str], None]], dict]] = {
        "quality": lambda log: section_quality(plan, data_dir, log),
        "roofline": lambda log: section_roofline(plan, log),
        "scaling": lambda log: section_scaling(plan, log),
        "gradients": lambda log: section_gradients(plan, data_dir, log),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        _log(name, f"start ({plan.mode})")
        try:
            results["sections"][name] = runners[name](lambda msg, n=name: _log(n, msg))
        except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
            err = _error_string(exc)
            results["sections"][name] = {"error": err, "traceback": traceback.format_exc()}
            results["errors"].append(f"{name}: {err}")
            _log(name, f"FAILED: {err}")
        results["section_seconds"][name] = time.perf_counter() - t0
        _log(name, f"done in {results['section_seconds'][name]:.0f} s")
        save()
    results["total_seconds"] = time.perf_counter() - t_start
    with contextlib.suppress(Exception):
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    save()
    shutil.copyfile(path, out / "suite-latest.json")
    try:
        (out / "headline.md").write_text(headline_markdown(_clean(results)))
    except Exception as exc:  # noqa: BLE001
        results["errors"].append(f"headline: {_error_string(exc)}")
    if "quality" in results["sections"]:
        try:
            plot_quality(_clean(results["sections"]["quality"]), out / "quality.png")
        except Exception as exc:  # noqa: BLE001
            results["errors"].append(f"plot: {_error_string(exc)}")
    save()
    shutil.copyfile(path, out / "suite-latest.json")
    return results, path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (~4 min)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--data-dir", default=None,
                    help="folder with winequality-{red,white}.csv (default: data/, else "
                         "../shared/data, relative to the repository root)")
    ap.add_argument("--datasets", default=None, help="quality: comma-separated data sets")
    ap.add_argument("--depths", default=None, help="quality: comma-separated depths")
    ap.add_argument("--admm-budget", type=float, default=None,
                    help="quality: ADMM wall-clock budget as a multiple of one Adam run")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="run nothing: rewrite headline.md and quality.png in --out from a "
                         "suite JSON written earlier")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)} (known: {', '.join(SECTIONS)})")
    return args


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    changes: dict[str, Any] = {}
    if args.datasets:
        changes["datasets"] = tuple(s.strip() for s in args.datasets.split(",") if s.strip())
    if args.depths:
        changes["depths"] = tuple(int(s) for s in args.depths.split(",") if s.strip())
    if args.admm_budget is not None:
        changes["admm_budget"] = float(args.admm_budget)
    return dataclasses.replace(plan, **changes) if changes else plan


def render(path: Path, out: Path) -> list[Path]:
    """Rewrite ``headline.md`` (and ``quality.png``) in ``out`` from a suite JSON."""
    results = json.loads(Path(path).read_text())
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "headline.md"]
    written[0].write_text(headline_markdown(results))
    quality = results.get("sections", {}).get("quality")
    if quality and plot_quality(quality, out / "quality.png") is not None:
        written.append(out / "quality.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        for p in render(Path(args.render), Path(args.out)):
            _log("suite", f"wrote {p}")
        return 0
    plan = plan_from_args(args)
    data_dir = resolve_data_dir(args.data_dir)
    _log("suite", f"mode {plan.mode}, sections {','.join(args.sections)}, data {data_dir}")
    results, path = run_suite(plan, args.sections, Path(args.out), data_dir,
                              argv=sys.argv[1:] if argv is None else argv)
    _log("suite", f"wrote {path} (+ suite-latest.json, headline.md"
         f"{', quality.png' if 'quality' in args.sections else ''}) in "
         f"{results['total_seconds']:.0f} s")
    if results["errors"]:
        _log("suite", f"errors: {'; '.join(results['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
