"""The penalty trade-off: rho, beta against the gap between the relaxed objective L and the
true forward objective (loss + regulariser), and the test metric.

    python benchmarks/penalty_tradeoff.py [--data wine_red] [--iterations 60]

Small rho, beta let the auxiliary variables fit the targets while the true forward pass stays
poor (large gap); large ones keep the network honest but slow progress. Writes
``benchmarks/results/penalty-<data>-<timestamp>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from daskadmm import api
from daskadmm.config import Config, DataConfig
from daskadmm.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def data_config(name: str) -> DataConfig:
    dc = DataConfig(name=name)
    if name.startswith("wine"):
        fname = f"winequality-{name.split('_')[1]}.csv"
        for d in (ROOT / "data", ROOT.parent / "shared" / "data"):
            if (d / fname).exists():
                dc.path = str(d / fname)
                break
    return dc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="wine_red")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rho", default="0.5,1,2,5,10")
    ap.add_argument("--beta", default="0.25,1,4")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    ds = load_dataset(data_config(args.data), seed=0)
    rows = []
    for rho in map(float, args.rho.split(",")):
        for beta in map(float, args.beta.split(",")):
            cfg = Config()
            cfg.data = data_config(args.data)
            cfg.cluster.kind = "reference"
            cfg.model.width = args.width
            cfg.algorithm.rho, cfg.algorithm.beta = rho, beta
            cfg.run.iterations = args.iterations
            t = time.perf_counter()
            res = api.fit(cfg, dataset=ds)
            last = res.history[-1]
            reg = 0.5 * cfg.algorithm.lam * sum(float(np.sum(W * W)) for W in res.weights)
            true_obj = last["train_loss"] + reg
            rows.append({"rho": rho, "beta": beta, "relaxed_objective": last["objective"],
                         "true_objective": true_obj,
                         "gap": true_obj - last["objective"],
                         "primal_residual": last["primal_residual"],
                         "train_metric": last["train_metric"],
                         "test_metric": last["test_metric"],
                         "objective_increases": res.info["objective_increases"],
                         "seconds": time.perf_counter() - t})
            r = rows[-1]
            print(f"| {rho:g} | {beta:g} | {r['relaxed_objective']:.4f} | "
                  f"{r['true_objective']:.4f} | {r['gap']:+.4f} | {r['train_metric']:.4f} | "
                  f"{r['test_metric']:.4f} | {r['objective_increases']} |", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"penalty-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"data": args.data, "width": args.width,
                                "iterations": args.iterations, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
