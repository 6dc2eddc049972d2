"""``daskadmm-report``: compare finished runs (ADMM variants and the backprop baselines).

    daskadmm-report outputs/multirun/2026-11-23/14-00-00
    daskadmm-report outputs/2026-11-23/10-00-00 outputs/2026-11-23/11-30-00 --out cmp/
    daskadmm-report outputs/multirun/2026-11-23/14-00-00 --target 0.95

Every ``DIR`` is a run directory (it holds ``summary.json`` and/or ``metrics.csv``, as written by
:mod:`daskadmm.outputs`) or a directory searched recursively for run directories (a Hydra
multirun directory ``outputs/multirun/DATE/TIME`` with one numbered subdirectory per job; hidden
directories such as ``.hydra`` are skipped). Written into ``--out`` (default: the first ``DIR``):

- ``report.csv`` and ``report.md``: one row per run with the algorithm, data set, depth, width,
  final train/test metric, the wall time and iterations at which the test metric first reached
  the target, total wall time and iterations, status and run directory;
- ``curves_time.png`` and ``curves_iteration.png``: the test metric against wall time and against
  iteration, one line per run (``"algorithm d=depth w=width"``), one panel per data set.

**Target.** ``--target VALUE`` sets the target test metric for every data set. Without it the
target is chosen per data set from the runs' final test metrics: for ``accuracy`` (higher is
better) ``0.99 x`` the best final test accuracy, for ``mse`` (lower is better) ``1.01 x`` the best
final test MSE. A run reaches the target at the first evaluation (in ``metrics.csv`` order) whose
test metric is ``>= target`` (accuracy) or ``<= target`` (mse); the report gives that record's
``wall_time`` and ``iteration``, and leaves both empty ("not reached") otherwise. Runs whose
metric is unknown get no target.

Reading is tolerant of what a run left behind: missing files or keys (a run that is still going
or crashed has ``metrics.csv`` but no ``summary.json``) become blanks/NaN; final metrics missing
from ``summary.json`` are taken from the last row of ``metrics.csv``. A file that cannot be read or
parsed, a missing ``DIR`` or no run directory at all is an error: one line on stderr
(``daskadmm-report: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ReportError, one_line

__all__ = [
    "REPORT_COLUMNS",
    "ReportError",
    "Run",
    "build_report",
    "find_run_dirs",
    "load_run",
    "main",
    "targets",
    "time_to_target",
]

PROG = "daskadmm-report"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
REPORT_CSV = "report.csv"
REPORT_MD = "report.md"
CURVES_TIME = "curves_time.png"
CURVES_ITERATION = "curves_iteration.png"

HIGHER_IS_BETTER = {"accuracy": True, "mse": False}
ACCURACY_TARGET_FACTOR = 0.99  # target = 0.99 x best final test accuracy
MSE_TARGET_FACTOR = 1.01  # target = 1.01 x best final test MSE

# Columns of report.csv, in order.
REPORT_COLUMNS = (
    "algorithm",
    "data",
    "depth",
    "width",
    "metric",
    "final_train_metric",
    "final_test_metric",
    "target",
    "time_to_target",
    "iterations_to_target",
    "wall_time",
    "iterations",
    "status",
    "run_dir",
)

# Headers of the markdown table, one per REPORT_COLUMNS entry.
_MD_HEADERS = (
    "algorithm",
    "data",
    "depth",
    "width",
    "metric",
    "final train",
    "final test",
    "target",
    "time to target [s]",
    "iterations to target",
    "wall time [s]",
    "iterations",
    "status",
    "run dir",
)

_CURVE_COLUMNS = ("iteration", "wall_time", "test_metric", "train_metric")


# ---------------------------------------------------------------------------------- reading


@dataclass
class Run:
    """What the report needs from one run directory."""

    path: Path
    algorithm: str = ""
    data: str = ""
    depth: int | None = None
    width: int | None = None
    kind: str = ""
    metric: str = ""
    status: str = ""
    final_train_metric: float = math.nan
    final_test_metric: float = math.nan
    wall_time: float = math.nan
    iterations: int | None = None
    curves: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        depth = "?" if self.depth is None else self.depth
        width = "?" if self.width is None else self.width
        return f"{self.algorithm or '?'} d={depth} w={width}"

    @property
    def higher_is_better(self) -> bool | None:
        return HIGHER_IS_BETTER.get(self.metric)


def _float(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any) -> int | None:
    f = _float(value)
    return int(f) if math.isfinite(f) and f == int(f) else None


def _str(value: Any) -> str:
    return "" if value is None or isinstance(value, dict | list) else str(value)


def _lookup(mapping: Any, dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"`` (or a flat ``mapping["a.b"]``); None if absent."""
    if not isinstance(mapping, Mapping):
        return None
    if dotted in mapping:
        return mapping[dotted]
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read the file ({one_line(exc)})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column "
                          f"{exc.colno})") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: malformed summary: expected a JSON object, got "
                          f"{type(data).__name__}")
    return data


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise ReportError(f"{path}: the file is empty (no header row)") from None
            header = [h.strip() for h in header]
            known = [c for c in _CURVE_COLUMNS if c in header]
            if not known:
                raise ReportError(f"{path}: malformed metrics file: none of the columns "
                                  f"{', '.join(_CURVE_COLUMNS)} in the header")
            index = {c: header.index(c) for c in known}
            values: dict[str, list[float]] = {c: [] for c in _CURVE_COLUMNS}
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ReportError(f"{path}: line {reader.line_num} has {len(row)} fields, "
                                      f"expected {len(header)}")
                for c in _CURVE_COLUMNS:
                    if c not in index:
                        values[c].append(math.nan)
                        continue
                    cell = row[index[c]].strip()
                    if not cell:
                        values[c].append(math.nan)
                        continue
                    try:
                        values[c].append(float(cell))
                    except ValueError:
                        raise ReportError(f"{path}: line {reader.line_num}: column {c!r} is not "
                                          f"a number: {cell!r}") from None
    except ReportError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"{path}: cannot read the file ({one_line(exc)})") from exc
    return {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}


def _last(x: np.ndarray | None) -> float:
    return float(x[-1]) if x is not None and x.size else math.nan


def _last_finite(x: np.ndarray | None) -> float:
    if x is None or x.size == 0:
        return math.nan
    finite = x[np.isfinite(x)]
    return float(finite[-1]) if finite.size else math.nan


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read ``summary.json`` and ``metrics.csv`` of one run directory (either may be missing).

    Raises :class:`ReportError` for a file that exists but cannot be read or parsed."""
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    metrics_path = path / METRICS_FILE
    summary = _read_summary(summary_path) if summary_path.is_file() else {}
    curves = _read_metrics(metrics_path) if metrics_path.is_file() else {}
    cfg = summary.get("config")
    arch = summary.get("architecture")
    raw_final = summary.get("final")
    final: Mapping[str, Any] = raw_final if isinstance(raw_final, Mapping) else {}

    def final_value(key: str) -> float:
        # summary.json writes a NaN as null: present-but-null stays NaN
        if key in final:
            return _float(final[key])
        if key in summary:
            return _float(summary[key])
        return _last(curves.get(key))  # not in summary.json: the latest record

    depth = _int(_lookup(cfg, "model.depth"))
    if depth is None:
        depth = _int(_lookup(arch, "depth"))
    width = _int(_lookup(cfg, "model.width"))
    if width is None:
        width = _int(_lookup(arch, "width"))
    iterations = _int(summary.get("iterations"))
    if iterations is None:
        iterations = _int(_last_finite(curves.get("iteration")))
    wall = _float(summary.get("wall_time"))
    if math.isnan(wall):
        wall = _last_finite(curves.get("wall_time"))
    metric = _str(summary.get("metric"))
    return Run(
        path=path,
        algorithm=_str(_lookup(cfg, "algorithm.name")),
        data=_str(_lookup(cfg, "data.name")),
        depth=depth,
        width=width,
        kind=_str(_lookup(cfg, "model.kind")) or _str(_lookup(arch, "kind")),
        metric=metric if metric in HIGHER_IS_BETTER else "",
        status=_str(summary.get("status")),
        final_train_metric=final_value("train_metric"),
        final_test_metric=final_value("test_metric"),
        wall_time=wall,
        iterations=iterations,
        curves=curves,
    )


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    return (path / SUMMARY_FILE).is_file() or (path / METRICS_FILE).is_file()


def find_run_dirs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories in ``paths``: each path itself if it is one, else the run directories
    below it (recursively, hidden directories skipped, numbered ones in numeric order)."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if not p.is_dir():
            raise ReportError(f"{p}: not a directory (give a run or multirun directory)")
        if _is_run_dir(p):
            found.append(p)
            continue
        below: list[Path] = []
        for root, dirs, _files in os.walk(p):
            root_path = Path(root)
            if root_path != p and _is_run_dir(root_path):
                below.append(root_path)
                dirs[:] = []  # a run directory's subdirectories are not runs
                continue
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(sorted(below, key=_natural_key))
    unique: list[Path] = []
    seen: set[Path] = set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------------- analysis


def targets(runs: Sequence[Run], target: float | None = None) -> dict[str, float]:
    """Target test metric per data set: ``target`` if given, else 0.99 x the best final test
    accuracy or 1.01 x the best final test MSE among ``runs`` on that data set (NaN if none)."""
    out: dict[str, float] = {}
    for data in dict.fromkeys(r.data for r in runs):
        group = [r for r in runs if r.data == data]
        if target is not None:
            out[data] = float(target)
            continue
        metrics = [r.metric for r in group if r.metric]
        metric = max(set(metrics), key=metrics.count) if metrics else ""
        finals = [r.final_test_metric for r in group
                  if r.metric == metric and math.isfinite(r.final_test_metric)]
        if not finals or metric not in HIGHER_IS_BETTER:
            out[data] = math.nan
        elif HIGHER_IS_BETTER[metric]:
            out[data] = max(finals) * ACCURACY_TARGET_FACTOR
        else:
            out[data] = min(finals) * MSE_TARGET_FACTOR
    return out


def time_to_target(run: Run, target: float) -> tuple[float, int | None]:
    """``(wall_time, iteration)`` of the first record whose test metric reaches ``target``
    (``>=`` for accuracy, ``<=`` for mse), or ``(nan, None)``."""
    higher = run.higher_is_better
    y = run.curves.get("test_metric")
    if higher is None or y is None or y.size == 0 or not math.isfinite(target):
        return math.nan, None
    with np.errstate(invalid="ignore"):
        hit = (y >= target) if higher else (y <= target)
    hit &= np.isfinite(y)
    idx = np.flatnonzero(hit)
    if idx.size == 0:
        return math.nan, None
    j = int(idx[0])
    return float(run.curves["wall_time"][j]), _int(run.curves["iteration"][j])


def build_report(runs: Sequence[Run], target: float | None = None) -> list[dict[str, Any]]:
    """One row (keys ``REPORT_COLUMNS``) per run, sorted by data, algorithm, depth, width."""
    goal = targets(runs, target)
    rows = []
    for run in runs:
        t = goal.get(run.data, math.nan) if run.metric else math.nan
        tt, it = time_to_target(run, t)
        rows.append({
            "algorithm": run.algorithm,
            "data": run.data,
            "depth": run.depth,
            "width": run.width,
            "metric": run.metric,
            "final_train_metric": run.final_train_metric,
            "final_test_metric": run.final_test_metric,
            "target": t,
            "time_to_target": tt,
            "iterations_to_target": it,
            "wall_time": run.wall_time,
            "iterations": run.iterations,
            "status": run.status,
            "run_dir": str(run.path),
        })

    def key(row: dict[str, Any]) -> tuple:
        return (row["data"], row["algorithm"], row["depth"] or 0, row["width"] or 0,
                _natural_key(Path(row["run_dir"])))

    return sorted(rows, key=key)


# ---------------------------------------------------------------------------------- writing


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return value


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(REPORT_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_cell(row.get(c)) for c in REPORT_COLUMNS})


def _md_number(value: Any, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return format(value, fmt)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(row: Mapping[str, Any]) -> list[str]:
    reached = row["iterations_to_target"] is not None
    has_target = isinstance(row["target"], float) and math.isfinite(row["target"])
    return [
        _md_escape(row["algorithm"]),
        _md_escape(row["data"]),
        _md_number(row["depth"], "d"),
        _md_number(row["width"], "d"),
        row["metric"],
        _md_number(row["final_train_metric"], ".4g"),
        _md_number(row["final_test_metric"], ".4g"),
        _md_number(row["target"], ".4g"),
        _md_number(row["time_to_target"], ".3g") if reached else
        ("not reached" if has_target else ""),
        _md_number(row["iterations_to_target"], "d") if reached else
        ("not reached" if has_target else ""),
        _md_number(row["wall_time"], ".3g"),
        _md_number(row["iterations"], "d"),
        _md_escape(row["status"]),
        _md_escape(row["run_dir"]),
    ]


def write_markdown(path: Path, rows: Sequence[Mapping[str, Any]], goal: Mapping[str, float],
                   explicit_target: float | None) -> None:
    lines = ["# daskadmm comparison report", ""]
    if explicit_target is not None:
        lines.append(f"Target test metric: {explicit_target:g} (--target), for every data set.")
    else:
        lines.append(f"Target test metric per data set: {ACCURACY_TARGET_FACTOR:g} x the best "
                     f"final test accuracy, or {MSE_TARGET_FACTOR:g} x the best final test MSE, "
                     "among these runs.")
    lines.append("")
    for data, t in goal.items():
        lines.append(f"- {data or '(unknown data set)'}: "
                     f"{'no target' if not math.isfinite(t) else format(t, '.6g')}")
    lines.append("")
    lines.append("Time/iterations to target: the first evaluation whose test metric reached the "
                 "target.")
    lines.append("")
    lines.append("| " + " | ".join(_MD_HEADERS) + " |")
    lines.append("|" + "|".join("---" for _ in _MD_HEADERS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_row(row)) + " |")
    lines.append("")
    lines.append(f"![test metric vs wall time]({CURVES_TIME})")
    lines.append("")
    lines.append(f"![test metric vs iteration]({CURVES_ITERATION})")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def _labels(runs: Sequence[Run]) -> list[str]:
    labels = [r.label for r in runs]
    counts = {lab: labels.count(lab) for lab in labels}
    return [f"{lab} ({r.path.name})" if counts[lab] > 1 else lab
            for lab, r in zip(labels, runs, strict=True)]


def plot_curves(path: Path, runs: Sequence[Run], x_key: str, xlabel: str,
                goal: Mapping[str, float]) -> None:
    """Test metric against ``x_key``: one panel per data set, one line per run."""
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot, no global backend

    datasets = list(dict.fromkeys(r.data for r in runs))
    labels = dict(zip((id(r) for r in runs), _labels(runs), strict=True))
    fig = Figure(figsize=(6.5 * len(datasets), 4.5), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, data in zip(axes, datasets, strict=True):
        group = [r for r in runs if r.data == data]
        metrics = [r.metric for r in group if r.metric]
        metric = max(set(metrics), key=metrics.count) if metrics else "test metric"
        drawn = False
        for run in group:
            x = run.curves.get(x_key)
            y = run.curves.get("test_metric")
            if x is None or y is None:
                continue
            ok = np.isfinite(x) & np.isfinite(y)
            if metric == "mse":
                ok &= y > 0
            if not ok.any():
                continue
            ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, markersize=3,
                    label=labels[id(run)])
            drawn = True
        t = goal.get(data, math.nan)
        if drawn and math.isfinite(t):
            ax.axhline(t, color="grey", linestyle="--", linewidth=1, label=f"target {t:.4g}")
        if drawn:
            if metric == "mse":
                ax.set_yscale("log")
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no finite data", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_title(data or "(unknown data set)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric}" if metric != "test metric" else metric)
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100, format="png")


def write_report(runs: Sequence[Run], out: Path, target: float | None = None) -> dict[str, Path]:
    """Write ``report.csv``, ``report.md`` and the two curve figures into ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"{out}: cannot create the output directory ({one_line(exc)})") from exc
    rows = build_report(runs, target)
    goal = targets(runs, target)
    paths = {
        "csv": out / REPORT_CSV,
        "markdown": out / REPORT_MD,
        "curves_time": out / CURVES_TIME,
        "curves_iteration": out / CURVES_ITERATION,
    }
    ordered = sorted(runs, key=lambda r: (r.data, r.algorithm, r.depth or 0, r.width or 0,
                                          _natural_key(r.path)))
    current = None
    try:
        current = paths["csv"]
        write_csv(current, rows)
        current = paths["markdown"]
        write_markdown(current, rows, goal, target)
        current = paths["curves_time"]
        plot_curves(current, ordered, "wall_time", "wall time [s]", goal)
        current = paths["curves_iteration"]
        plot_curves(current, ordered, "iteration", "iteration", goal)
    except OSError as exc:
        raise ReportError(f"{current}: cannot write the file ({one_line(exc)})") from exc
    return paths


# ---------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise ReportError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Compare daskadmm runs: a table (report.md, report.csv) "
                "and test-metric curves (curves_time.png, curves_iteration.png).")
    p.add_argument("dirs", nargs="+", metavar="DIR",
                   help="run directories, or directories (e.g. a multirun directory) to search "
                        "for them")
    p.add_argument("--out", metavar="OUTDIR", default=None,
                   help="where to write the report (default: the first DIR)")
    p.add_argument("--target", metavar="METRIC_VALUE", type=float, default=None,
                   help="target test metric for every data set (default per data set: 0.99 x the "
                        "best final test accuracy, or 1.01 x the best final test MSE)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``daskadmm-report``; returns the exit status (0, or 2 on an error)."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if args.target is not None and not math.isfinite(args.target):
            raise ReportError(f"--target must be a finite number, got {args.target!r}")
        run_dirs = find_run_dirs(args.dirs)
        if not run_dirs:
            raise ReportError(f"no run directories (with {SUMMARY_FILE} or {METRICS_FILE}) "
                              f"found in {', '.join(args.dirs)}")
        runs = [load_run(d) for d in run_dirs]
        out = Path(args.out) if args.out is not None else Path(args.dirs[0])
        paths = write_report(runs, out, args.target)
    except ReportError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(runs)} runs -> {paths['markdown']}, {paths['csv']}, "
          f"{paths['curves_time'].name}, {paths['curves_iteration'].name}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
