"""The benchmark suite's shared helpers: run records, data loading, configs, timed fits,
targets and ratios, and number formatting.

Used by the sections (``suite_sections.py``), the timing measurements (``suite_flops.py``), the
report (``suite_report.py``) and the driver (``suite.py``, whose docstring states the timing
rules that :func:`timed_fit` implements).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_info

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import Dataset, load_dataset

if TYPE_CHECKING:
    from suite import Plan

ROOT = Path(__file__).resolve().parent.parent
WINE_FILES = {"wine_red": "winequality-red.csv", "wine_white": "winequality-white.csv"}
ADMM_RESNET = ("radmm3", "radmm3l", "radmm2")
ADMM_MLP = ("dladmm", "pdadmm")
HISTORY_KEYS = ("iteration", "wall_time", "objective", "train_metric", "test_metric")
CURVE_POINTS = 150  # points kept per curve in the JSON
# The relaxed target (as daskadmm-report's default): 0.99 x accuracy, 1.01 x mse.
RELAXED = {True: 0.99, False: 1.01}


def _log(section: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {section:9s} {message}", flush=True)


def _error_string(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def report_header(name: str) -> dict[str, Any]:
    """The fields every benchmark's JSON report starts with: its name, the command line, the
    time, the platform and the CPU count."""
    return {"benchmark": name, "command": " ".join(["python", *sys.argv]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


def write_results(report: Any, out: Path | None, stem: str) -> Path:
    """Write a benchmark's JSON report to ``out``, or to
    ``benchmarks/results/<stem>-<timestamp>.json``; return the path written."""
    path = out or ROOT / "benchmarks" / "results" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


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
        from daskadmm.algorithms import get_algorithm

        get_algorithm(name)
        return True, ""
    except Exception as exc:  # noqa: BLE001
        return False, _error_string(exc)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return format(x, spec) if _finite(x) else "-"
