"""Quality across depth and data: each method at its defaults against Adam, over seeds.

    python benchmarks/quality.py                       # the full grid (hours on 2 cores)
    python benchmarks/quality.py --data digits --depths 4,8,16,32 --seeds 0,1,2
    python benchmarks/quality.py --quick               # a minute: the plumbing only
    python benchmarks/quality.py --data digits --depths 16,32 --seeds 0 --methods radmm3 \
        --set algorithm.schedule=grow --set algorithm.growth=1.02 --set algorithm.rho=0.5

Every run uses the serial reference engine (every Dask engine gives the same iterates) and the
project's defaults unless a method says otherwise; the metric is that of the network's true
forward pass on the held-out split (accuracy, or MSE for regression). Methods:

- ``radmm3``: the paper's RADMM-3 at its defaults, twice: with tanh and with relu;
- ``radmm3a`` (the project default): RADMM-3 with multipliers on the activation constraints
  and a backward-pass start, relu, at its own defaults (lam = 0.03);
- ``radmm3a_restarts`` (``algorithm=radmm3a_restarts``): RADMM-3A with guarded restarts every
  3 iterations and rho = 1;
- ``adam``: Adam, mini-batch 64, at learning rates 1e-3, 3e-3, 1e-2 (the best of the three per
  setting is what the table compares against: "tuned Adam").

Writes one JSON record per run (config, final and best test metric, the test metric at each
evaluation with its wall time, seconds, load average) to ``benchmarks/results/quality.json``,
prints two markdown tables (final test metric, mean ± std over seeds; seconds each ADMM method
took to reach tuned Adam's mean final test metric, and Adam's own seconds) and draws
``quality-depth.png`` beside the JSON (digits accuracy against depth, and each other set's
test error, MSE or 1 − accuracy, relative to tuned Adam's, mean ± std over seeds).
``--table-only`` redraws both from an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "quality.json"
DATA = ("digits", "wine_red", "wine_white", "synthetic", "mnist_5k")
ADAM_LRS = (1e-3, 3e-3, 1e-2)
METHODS = ("radmm3", "radmm3a", "radmm3a_restarts", "adam")


def _apply(mapping: dict, overrides: list[str]) -> dict:
    """``section.key=value`` overrides (YAML scalars: 0.5, true, null) into a nested mapping."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        mapping.setdefault(section, {})[name] = yaml.safe_load(value)
    return mapping


def run_one(method: str, data: str, depth: int, seed: int, act: str, iterations: int,
            width: int, lr: float | None = None, overrides: list[str] = ()) -> dict:
    from daskadmm import fit
    from daskadmm.config import ALGORITHM_OVERRIDES, ALGORITHM_VARIANTS, from_mapping

    if method in ALGORITHM_VARIANTS:  # a named preset (its file's algorithm keys)
        algorithm: dict = dict(ALGORITHM_VARIANTS[method]["algorithm"])
    else:
        algorithm = {"name": method, **ALGORITHM_OVERRIDES.get(method, {})}  # its defaults
    if method == "adam":
        algorithm |= {"lr": lr, "batch_size": 64}
    data_cfg: dict = {"name": data}
    if data.startswith("wine"):
        shared = ROOT.parent / "shared" / "data"
        if shared.is_dir():
            data_cfg |= {"cache_dir": str(shared), "download": False}
    cfg = from_mapping(_apply({
        "algorithm": algorithm,
        "model": {"kind": "resnet", "depth": depth, "width": width, "activation": act},
        "data": data_cfg,
        "run": {"iterations": iterations, "seed": seed, "progress": False, "plot": False,
                "eval_every": max(1, iterations // 10), "stall_iterations": 0},
        "cluster": {"kind": "reference"},
    }, [] if method == "adam" else list(overrides)))
    t0 = time.perf_counter()
    res = fit(cfg)
    seconds = time.perf_counter() - t0
    tests = [r["test_metric"] for r in res.history]
    better = max if res.metric == "accuracy" else min
    return {"method": method, "lr": lr, "data": data, "depth": depth, "seed": seed,
            "activation": act, "iterations": iterations, "width": width, "metric": res.metric,
            "overrides": [] if method == "adam" else list(overrides),
            "test": tests[-1], "best_test": better(tests), "status": res.status,
            "curve": [[round(r["wall_time"], 3), r["test_metric"]] for r in res.history],
            "seconds": round(seconds, 2), "load": os.getloadavg()[0]}


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} ({len(values)})"


def _settings(rows: list[dict]) -> list[tuple[str, int]]:
    return sorted({(r["data"], r["depth"]) for r in rows},
                  key=lambda k: (DATA.index(k[0]) if k[0] in DATA else 99, k[1]))


def _methods(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["method"], r["activation"]) for r in rows if r["method"] != "adam"})


def tuned_adam(sel: list[dict]) -> list[dict]:
    """The Adam runs of the learning rate with the best mean final test metric (none: [])."""
    by_lr: dict = {}
    for r in sel:
        if r["method"] == "adam":
            by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        return []
    acc = sel[0]["metric"] == "accuracy"
    return (max if acc else min)(by_lr.values(),
                                 key=lambda runs: statistics.mean(r["test"] for r in runs))


def reached(row: dict, target: float) -> float | None:
    """Wall seconds at the first evaluation whose test metric is at least as good as
    ``target`` (accuracy: >=, a loss: <=); None if no evaluation is."""
    acc = row["metric"] == "accuracy"
    for t, m in row.get("curve", []):
        if (m >= target) if acc else (m <= target):
            return float(t)
    return None


def summarise(rows: list[dict]) -> str:
    """Markdown: one row per (data, depth), mean ± std of the final test metric per method;
    Adam is the best of its learning rates by mean. Then the time table: per ADMM method, the
    median over seeds of the seconds to reach tuned Adam's mean final test metric (with how
    many seeds reached it), against tuned Adam's mean seconds for its whole run."""
    methods = _methods(rows)
    head = ["data", "N", *[f"{m} ({a})" for m, a in methods], "Adam (best lr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    times = ["", "Seconds to reach tuned Adam's mean final test metric (median over the seeds "
             "that reached it; reached / runs):", "",
             "| " + " | ".join(["data", "N", *[f"{m} ({a})" for m, a in methods],
                                "Adam (best lr), whole run"]) + " |",
             "|" + "---|" * len(head)]
    for data, depth in _settings(rows):
        sel = [r for r in rows if r["data"] == data and r["depth"] == depth]
        adam = tuned_adam(sel)
        cells = [_cell([r["test"] for r in sel if (r["method"], r["activation"]) == m])
                 for m in methods]
        lines.append(f"| {data} | {depth} | " + " | ".join(cells)
                     + f" | {_cell([r['test'] for r in adam])} |")
        if not adam:
            continue
        target = statistics.mean(r["test"] for r in adam)
        tcells = []
        for m in methods:
            runs = [r for r in sel if (r["method"], r["activation"]) == m]
            hit = [t for t in (reached(r, target) for r in runs) if t is not None]
            tcells.append(f"{statistics.median(hit):.1f} ({len(hit)}/{len(runs)})" if hit
                          else f"never (0/{len(runs)})")
        times.append(f"| {data} | {depth} | " + " | ".join(tcells)
                     + f" | {statistics.mean(r['seconds'] for r in adam):.1f} |")
    return "\n".join(lines + (times if len(times) > 5 else []))


def plot(rows: list[dict], path: Path) -> Path | None:
    """``path``: digits test accuracy against depth per method (mean ± std over seeds), and
    each other set's test error (MSE, or 1 - accuracy) relative to tuned Adam's. None (nothing
    drawn) without rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = _settings(rows)
    if not settings:
        return None
    methods = _methods(rows) + [("adam", "best lr")]

    def values(sel: list[dict], m: tuple[str, str]) -> list[float]:
        if m[0] == "adam":
            return [r["test"] for r in tuned_adam(sel)]
        return [r["test"] for r in sel if (r["method"], r["activation"]) == m]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted(d for data, d in settings if data == "digits")
    for m in methods:
        pts = [(d, values([r for r in rows if r["data"] == "digits" and r["depth"] == d], m))
               for d in depths]
        pts = [(d, v) for d, v in pts if v]
        if pts:
            left.errorbar([d for d, _ in pts], [statistics.mean(v) for _, v in pts],
                          yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                          marker="o", capsize=3, label=f"{m[0]} ({m[1]})")
    left.set(xscale="log", xlabel="residual blocks N (digits, width 64)",
             ylabel="test accuracy", title="digits")
    left.set_xticks(depths or [4], [str(d) for d in depths] or ["4"])
    left.set_xticks([], minor=True)  # (the log axis' minor labels would overlap the depths)
    left.legend(fontsize=8)
    others = [(data, d) for data, d in settings if data != "digits"]
    width = 0.8 / max(1, len(methods) - 1)
    for j, m in enumerate(methods[:-1]):
        xs, ys, es = [], [], []
        for x, (data, d) in enumerate(others):
            sel = [r for r in rows if r["data"] == data and r["depth"] == d]
            adam = values(sel, methods[-1])
            v = values(sel, m)
            if v and adam:
                # errors, so that lower is better for every set: MSE, or 1 - accuracy
                err = (lambda x: 1.0 - x) if sel[0]["metric"] == "accuracy" else (lambda x: x)
                base = statistics.mean(err(u) for u in adam)
                if base <= 0.0:  # Adam made no error: no ratio to draw
                    continue
                rel = [err(u) / base for u in v]
                xs.append(x + j * width)
                ys.append(statistics.mean(rel))
                es.append(statistics.stdev(rel) if len(rel) > 1 else 0)
        if xs:
            right.bar(xs, ys, width, yerr=es, capsize=3, label=f"{m[0]} ({m[1]})")
    right.axhline(1.0, color="k", lw=0.8)
    right.set_xticks([x + width * (len(methods) - 2) / 2 for x in range(len(others))],
                     [f"{data}" for data, _ in others])
    right.set(ylabel="test error / tuned Adam's (MSE, or 1 - accuracy)",
              title="other sets (N = 4; lower is better)")
    if others:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=",".join(DATA))
    ap.add_argument("--depths", default="4,8,16,32,64", help="digits depths (others: 4)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="radmm3,radmm3a,adam")
    ap.add_argument("--iterations", type=int, default=100)  # the project default
    ap.add_argument("--adam-epochs", type=int, default=100)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="digits N=4, one seed, 3 iterations")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a config override for the ADMM runs (repeatable)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: print the tables and redraw the figure from --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        if not out.is_file():
            raise SystemExit(f"quality.py: error: no results at {out}")
        rows = json.loads(out.read_text())
        print(summarise(rows))
        _draw(rows, out)
        return 0
    data = args.data.split(",")
    depths = [int(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"quality.py: error: unknown method(s) {', '.join(unknown)} "
                         f"(known: {', '.join(METHODS)})")
    iterations, epochs = args.iterations, args.adam_epochs
    if args.quick:
        data, depths, seeds, iterations, epochs = ["digits"], [4], [0], 3, 2
    rows = []
    for d in data:
        for depth in (depths if d == "digits" else [4]):
            for seed in seeds:
                plan = []
                if "radmm3" in methods:
                    plan += [("radmm3", "tanh", None), ("radmm3", "relu", None)]
                plan += [(m, "relu", None) for m in ("radmm3a", "radmm3a_restarts")
                         if m in methods]
                if "adam" in methods:
                    plan += [("adam", "relu", lr) for lr in ADAM_LRS]
                for method, act, lr in plan:
                    its = epochs if method == "adam" else iterations
                    row = run_one(method, d, depth, seed, act, its, args.width, lr, args.set)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(summarise(rows))
    _draw(rows, out)
    return 0


def _draw(rows: list[dict], out: Path) -> None:
    """The figure beside ``out``: an optional artefact, so a failure is a warning."""
    try:
        drawn = plot(rows, out.with_name(f"{out.stem}-depth.png"))
        if drawn is not None:
            print(f"figure: {drawn}")
    except Exception as exc:  # noqa: BLE001
        print(f"quality.py: warning: no figure ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    raise SystemExit(main())
