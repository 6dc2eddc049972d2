"""What a run leaves in its run directory: ``metrics.csv``, ``summary.json``, ``weights.npz``,
``convergence.png`` and, for a run on a Dask cluster, ``wavefront.png`` (drawn from the
``task-stream.json`` the engine wrote).

No Hydra here, and no :class:`~daskadmm.config.Config`: the CLI calls :func:`write_run_outputs`
with the run's configuration as a plain dict (``Config.to_dict()``, what ``summary.json`` keeps),
its ``run.plot`` flag and the :class:`~daskadmm.result.Result`.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .model import Architecture
from .result import HISTORY_COLUMNS, Result

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "SUMMARY_FILE",
    "WEIGHTS_FILE",
    "MetricsWriter",
    "library_versions",
    "load_weights",
    "plot_convergence",
    "plot_wavefront",
    "outputs_in_the_way",
    "previous_outputs",
    "save_weights",
    "store_inside",
    "to_json_safe",
    "write_metrics_csv",
    "write_run_outputs",
    "write_summary",
]

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "weights.npz"
PLOT_FILE = "convergence.png"
WAVEFRONT_FILE = "wavefront.png"
STREAM_FILE = "task-stream.json"
# Everything a run may write into its run directory (besides Hydra's .hydra/ and job log).
RUN_STORES = ("model.zarr", "state.zarr")  # (directories: daskadmm stores)
RUN_OUTPUTS = (METRICS_FILE, SUMMARY_FILE, WEIGHTS_FILE, PLOT_FILE, WAVEFRONT_FILE, STREAM_FILE,
               *RUN_STORES, "dask-report.html")


def previous_outputs(run_dir: Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` already in ``run_dir`` (an earlier run's outputs)."""
    return [name for name in RUN_OUTPUTS
            if (run_dir / name).exists() or (run_dir / name).is_symlink()]


def store_inside(url: str | None, run_dir: Path) -> Path | None:
    """The real path of the local store ``url`` if it lies inside ``run_dir``, else None."""
    from .storage import local_path

    path = local_path(str(url)) if url else None
    if path is None:
        return None
    real = Path(os.path.realpath(path))
    return real if real.is_relative_to(os.path.realpath(run_dir)) else None


def outputs_in_the_way(run_dir: Path, *, resume: bool, url: str | None,
                       overwrite: bool) -> list[str]:
    """The earlier run's outputs in ``run_dir`` that a new run may not replace: none with
    ``overwrite``, or for a resumed run whose store (``url``) lies inside ``run_dir`` (its
    outputs start with the stored history); else :func:`previous_outputs`."""
    if overwrite or (resume and store_inside(url, run_dir) is not None):
        return []
    return previous_outputs(run_dir)

# Distributions whose versions go into summary.json (missing ones are recorded as null).
_DISTRIBUTIONS = (
    "numpy",
    "scipy",
    "dask",
    "distributed",
    "zarr",
    "hydra-core",
    "omegaconf",
    "scikit-learn",
    "matplotlib",
    "daskadmm",
    "torch",
)

# Final-record keys reported in summary.json.
_FINAL_KEYS = tuple(c for c in HISTORY_COLUMNS
                    if c not in ("iteration", "wall_time", "rho", "beta"))


# ------------------------------------------------------------------------------------ metrics.csv


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value)  # full precision; nan / inf as "nan" / "inf"
    return value


def _csv_row(record: Mapping[str, Any]) -> dict[str, Any]:
    return {c: _csv_value(record.get(c)) for c in HISTORY_COLUMNS}


class MetricsWriter:
    """Streams ``metrics.csv``: the header on open, one flushed row per :meth:`write`.

    Columns are exactly ``HISTORY_COLUMNS``; keys a record lacks are left empty, extra keys are
    ignored. Use as a context manager or call :meth:`close`. ``lazy``: open (and truncate) the
    file only with the first row, so a run that fails before its first evaluation leaves a
    file already there as it was.
    """

    def __init__(self, path: str | os.PathLike[str], *, lazy: bool = False) -> None:
        self.path = Path(path)
        self._file: Any = None
        self._writer: Any = None
        self._closed = False
        self.rows = 0
        if not lazy:
            self._open()

    def _open(self) -> None:
        self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=list(HISTORY_COLUMNS))
        self._writer.writeheader()
        self._file.flush()

    def write(self, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the metrics writer is closed")
        if self._file is None:
            self._open()
        self._writer.writerow(_csv_row(record))
        self._file.flush()
        self.rows += 1

    def close(self) -> None:
        self._closed = True
        if self._file is not None and not self._file.closed:
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_metrics_csv(path: str | os.PathLike[str], history: Iterable[Mapping[str, Any]]) -> Path:
    """Write a whole history to ``path`` (columns exactly ``HISTORY_COLUMNS``)."""
    with MetricsWriter(path) as writer:
        for record in history:
            writer.write(record)
    return Path(path)


# ----------------------------------------------------------------------------------- summary.json


def to_json_safe(obj: Any) -> Any:
    """Recursively convert to strict-JSON types: NaN/inf become ``None``, numpy scalars and arrays
    become Python numbers and lists, paths and other objects become strings."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_json_safe(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries a run depends on (``None`` where not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _host() -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def write_summary(
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    result: Result,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``summary.json``: ``config`` (the run's configuration as a plain dict), outcome,
    final metrics, versions, host, ``result.info``.

    The file is strict JSON (non-finite numbers are written as ``null``).
    """
    final = result.final
    summary: dict[str, Any] = {
        "status": result.status,
        "message": result.message,
        "iterations": result.iterations,
        "metric": result.metric,
        "wall_time": result.wall_time,
        "train_metric": final.get("train_metric"),
        "test_metric": final.get("test_metric"),
        "train_loss": final.get("train_loss"),
        "test_loss": final.get("test_loss"),
        "final": {k: final.get(k) for k in _FINAL_KEYS},
        "evaluations": len(result.history),
        "architecture": dataclasses.asdict(result.arch),
        "config": dict(config),
        "versions": library_versions(),
        "host": _host(),
        "info": result.info,
    }
    if extra:
        summary.update(extra)
    text = json.dumps(to_json_safe(summary), indent=2, allow_nan=False, sort_keys=False)
    path = Path(path)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ weights.npz

_ARCH_PREFIX = "arch_"


def save_weights(path: str | os.PathLike[str], result: Result) -> Path:
    """Save ``W1..WN`` and the architecture (``arch_kind``, ``arch_depth``, ... one entry per
    :class:`~daskadmm.model.Architecture` field) to an ``.npz`` that loads without pickle."""
    arrays: dict[str, np.ndarray] = {}
    for i, w in enumerate(result.weights, start=1):
        arrays[f"W{i}"] = np.asarray(w)
    for f in dataclasses.fields(Architecture):
        arrays[_ARCH_PREFIX + f.name] = np.asarray(getattr(result.arch, f.name))
    arrays["metric"] = np.asarray(result.metric)
    path = Path(path)
    with open(path, "wb") as fh:  # a file object: np.savez would append .npz to other suffixes
        # numpy's stub lets ** fill allow_pickle (a bool); no key here is allow_pickle
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


def _arch_value(kind: str, value: np.ndarray) -> Any:
    v = value.item()
    if "bool" in kind:
        return bool(v)
    if "int" in kind:
        return int(v)
    if "float" in kind:
        return float(v)
    return str(v)


def load_weights(path: str | os.PathLike[str]) -> tuple[Architecture, list[np.ndarray]]:
    """Inverse of :func:`save_weights`: the architecture and the weights ``[W1, ..., WN]``."""
    with np.load(path, allow_pickle=False) as data:
        kwargs = {}
        for f in dataclasses.fields(Architecture):
            key = _ARCH_PREFIX + f.name
            if key in data.files:
                kwargs[f.name] = _arch_value(str(f.type), data[key])
        arch = Architecture(**kwargs)
        weights = [np.array(data[f"W{i}"]) for i in range(1, arch.depth + 1)]
    return arch, weights


# -------------------------------------------------------------------------------- convergence.png


def _column(history: list[Mapping[str, Any]], key: str) -> np.ndarray:
    out = np.full(len(history), np.nan)
    for j, record in enumerate(history):
        v = record.get(key)
        try:
            out[j] = float(v) if v is not None else np.nan
        except (TypeError, ValueError):
            pass
    return out


def _plot_series(ax: Any, x: np.ndarray, series: list[tuple[str, np.ndarray]], log: bool) -> None:
    drawn = False
    use_log = log and any(np.any(np.isfinite(y) & (y > 0)) for _, y in series)
    for label, y in series:
        if use_log:
            y = np.where(y > 0, y, np.nan)
        if not np.any(np.isfinite(y) & np.isfinite(x)):
            continue
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        drawn = True
    if use_log and drawn:
        ax.set_yscale("log")
    if drawn and len(series) > 1:
        ax.legend(fontsize="small")
    if not drawn:
        ax.text(0.5, 0.5, "no finite data", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)


def plot_convergence(
    path: str | os.PathLike[str], history: Sequence[Mapping[str, Any]], metric: str = "metric"
) -> Path:
    """Write a 2x3 convergence figure: objective, residuals (log scale where positive), train/test
    metric; top row against iteration, bottom row against wall time. NaNs leave gaps."""
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot, no global backend

    history = list(history)
    x_rows = [("iteration", _column(history, "iteration")), ("wall time [s]",
                                                            _column(history, "wall_time"))]
    panels = [
        ("objective", [("objective", _column(history, "objective"))], False),
        ("residual", [("primal", _column(history, "primal_residual")),
                      ("dual", _column(history, "dual_residual"))], True),
        (metric, [("train", _column(history, "train_metric")),
                  ("test", _column(history, "test_metric"))], False),
    ]
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3, squeeze=False)
    for r, (xlabel, x) in enumerate(x_rows):
        for c, (title, series, log) in enumerate(panels):
            ax = axes[r][c]
            _plot_series(ax, x, series, log)
            ax.set_xlabel(xlabel)
            ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    return path


# ---------------------------------------------------------------------------------- wavefront.png

_BLOCK = re.compile(r"-b(\d+)(?:-|$)")
_CHUNK = re.compile(r"-c(\d+)(?:-|$)")
_ITER = re.compile(r"-k(\d+)(?:-|$)")


def wavefront_boxes(rows: Iterable[Mapping[str, Any]]) -> list[tuple[int, int, int, float, float]]:
    """``(block, chunk, iteration, start, stop)`` of every block update computed in a task
    stream (rows of ``task-stream.json``: key, worker, action, start, stop). Tasks whose key
    names no block and iteration (data, evaluation, reductions of all blocks) are left out."""
    boxes = []
    for row in rows:
        if row.get("action") != "compute":
            continue
        key = str(row.get("key", ""))
        b, k = _BLOCK.search(key), _ITER.search(key)
        if b is None or k is None or key.startswith(("checkpoint", "evaluate")):
            continue
        c = _CHUNK.search(key)
        boxes.append((int(b.group(1)), int(c.group(1)) if c else 0, int(k.group(1)),
                      float(row["start"]), float(row["stop"])))
    return boxes


def plot_wavefront(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the pipeline's picture: one row per block, one box per block update from its start
    to its end (wall time since the first update), coloured by iteration. Where iteration k+1
    of the first blocks starts before iteration k of the last ones ends, the colours overlap in
    time: the wavefront."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    boxes = wavefront_boxes(rows)
    if not boxes:
        raise ValueError("the task stream holds no block update")
    t0 = min(b[3] for b in boxes)
    blocks = sorted({b[0] for b in boxes})
    chunks = max(b[1] for b in boxes) + 1
    k_min, k_max = min(b[2] for b in boxes), max(b[2] for b in boxes)
    norm = Normalize(vmin=k_min, vmax=max(k_max, k_min + 1))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(12, 1.2 + 0.35 * len(blocks)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / chunks
    y = np.array([b[0] - 0.4 + height * b[1] for b in boxes])
    ax.barh(y, [b[4] - b[3] for b in boxes], left=[b[3] - t0 for b in boxes], height=height,
            align="edge", color=[cmap(norm(b[2])) for b in boxes], linewidth=0)
    ax.set_yticks(blocks)
    ax.set_ylim(max(blocks) + 0.6, min(blocks) - 0.6)  # block 1 on top
    ax.set_ylabel("block")
    ax.set_xlabel("wall time since the first block update [s]")
    ax.set_title(f"wavefront: {len(boxes)} block updates, iterations {k_min}..{k_max}"
                 + (f", {chunks} chunks per block" if chunks > 1 else ""))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="iteration")
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    return path


# ----------------------------------------------------------------------------------------- all


def write_run_outputs(
    run_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    result: Result,
    extra: Mapping[str, Any] | None = None,
    *,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``metrics.csv``, ``weights.npz``, ``summary.json`` (with ``config``, the run's
    configuration as a plain dict) and then (if ``plot``, the run's ``run.plot``)
    ``convergence.png`` and, where the run left a task stream, ``wavefront.png`` into
    ``run_dir``; return the paths written by name. A failing plot is a warning on stderr: the
    results are written first."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": write_metrics_csv(run_dir / METRICS_FILE, result.history),
        "weights": save_weights(run_dir / WEIGHTS_FILE, result),
    }
    paths["summary"] = write_summary(run_dir / SUMMARY_FILE, config, result, extra)
    if plot:  # optional: written after the results, and its failure costs nothing
        try:
            paths["plot"] = plot_convergence(run_dir / PLOT_FILE, result.history, result.metric)
        except Exception as exc:
            print(f"daskadmm: warning: the convergence plot failed ({type(exc).__name__}: "
                  f"{exc}); the results are written", file=sys.stderr, flush=True)
        stream = run_dir / STREAM_FILE
        if stream.exists():
            try:
                rows = json.loads(stream.read_text())
                paths["wavefront"] = plot_wavefront(run_dir / WAVEFRONT_FILE, rows)
            except Exception as exc:
                print(f"daskadmm: warning: the wavefront plot failed ({type(exc).__name__}: "
                      f"{exc}); the results are written", file=sys.stderr, flush=True)
    return paths
