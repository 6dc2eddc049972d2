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
- ``adam``: Adam, mini-batch 64, at learning rates 1e-3, 3e-3, 1e-2 (the best of the three per
  setting is what the table compares against: "tuned Adam").

Writes one JSON record per run (config, final and best test metric, seconds, load average) to
``benchmarks/results/quality.json`` and prints a markdown table of mean ± std over seeds.
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
    from daskadmm.config import ALGORITHM_OVERRIDES, from_mapping

    algorithm: dict = {"name": method, **ALGORITHM_OVERRIDES.get(method, {})}  # its defaults
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
            "seconds": round(seconds, 2), "load": os.getloadavg()[0]}


def summarise(rows: list[dict]) -> str:
    """Markdown: one row per (data, depth), mean ± std of the final test metric per method;
    Adam is the best of its learning rates by mean."""
    keys = sorted({(r["data"], r["depth"]) for r in rows}, key=lambda k: (DATA.index(k[0])
                                                                          if k[0] in DATA else 99,
                                                                          k[1]))
    methods = sorted({(r["method"], r["activation"]) for r in rows if r["method"] != "adam"})
    head = ["data", "N", *[f"{m} ({a})" for m, a in methods], "Adam (best lr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(values: list[float]) -> str:
        if not values:
            return "–"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"

    for data, depth in keys:
        sel = [r for r in rows if r["data"] == data and r["depth"] == depth]
        cells = [cell([r["test"] for r in sel if (r["method"], r["activation"]) == m])
                 for m in methods]
        adam = {}
        for r in sel:
            if r["method"] == "adam":
                adam.setdefault(r["lr"], []).append(r["test"])
        best = None
        if adam:
            acc = sel[0]["metric"] == "accuracy"
            best = (max if acc else min)(adam.values(), key=statistics.mean)
        lines.append(f"| {data} | {depth} | " + " | ".join(cells) + f" | {cell(best or [])} |")
    return "\n".join(lines)


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
    args = ap.parse_args(argv)
    data = args.data.split(",")
    depths = [int(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
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
                if "radmm3a" in methods:
                    plan.append(("radmm3a", "relu", None))
                if "adam" in methods:
                    plan += [("adam", "relu", lr) for lr in ADAM_LRS]
                for method, act, lr in plan:
                    its = epochs if method == "adam" else iterations
                    row = run_one(method, d, depth, seed, act, its, args.width, lr, args.set)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
