"""Time per iteration: serial reference vs Dask with 1 and 2 worker processes, same problem.

    python benchmarks/bench_dask.py                       # width 512, 8 blocks, 8192 samples
    python benchmarks/bench_dask.py --width 128 --n 2048  # a quick look

Writes ``benchmarks/results/dask-<timestamp>.json`` with the per-iteration times and the ratios
measured in the same run (the machines are shared and noisy: compare ratios, not seconds):
``dask1_over_reference`` (target <= 1.15) and ``speedup_2_over_1`` (target >= 1.6), over the
whole run and in the steady state (second half of the iterations and after the first window:
without the start-up and the wavefront's fill, which a short run is dominated by; NaN for a run
of fewer than two iterations past its first window).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import Dataset


def make_problem(width: int, n: int, d_in: int, d_out: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d_in, n))
    T = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    Y = np.tanh(T @ X) + 0.1 * rng.standard_normal((d_out, n))
    Xt = rng.standard_normal((d_in, 256))
    Yt = np.tanh(T @ Xt)
    return Dataset("bench", "regression", X, Y, Xt, Yt)


def timed_run(cfg: Config, ds: Dataset) -> dict:
    t = time.perf_counter()
    res = api.fit(cfg, dataset=ds)
    wall = time.perf_counter() - t
    h = res.history
    # per-iteration time from the run's own clock, excluding start-up (iteration 0 -> last)
    per_it = (h[-1]["wall_time"] - h[0]["wall_time"]) / max(1, h[-1]["iteration"])
    return {"wall": wall, "per_iteration": per_it,
            "steady_per_iteration": res.info.get("steady_seconds_per_iteration"),
            "iterations": res.iterations,
            "objective": h[-1]["objective"], "info": {k: v for k, v in res.info.items()
                                                      if isinstance(v, int | float | str)},
            "weights": res.weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=10, help="weight layers (8 residual blocks)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--algorithm", default="radmm3")
    ap.add_argument("--activation", default="relu", help="relu: closed-form U prox")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--state", default="memory", help="memory (issue 3's path) or zarr")
    ap.add_argument("--windows", default="1,2,4,8",
                    help="also time 2 workers with these run.window values ('' to skip)")
    ap.add_argument("--reuse-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="cluster.reuse_memory: freed memory kept for reuse in this process "
                         "and the workers (daskadmm.heap)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    ds = make_problem(args.width, args.n, d_in=64, d_out=4)
    cfg = Config()
    cfg.algorithm.name = args.algorithm
    cfg.model.activation = args.activation
    cfg.model.width, cfg.model.depth = args.width, args.depth
    cfg.run.iterations = args.iterations
    cfg.run.eval_every = args.iterations  # evaluate at the end only: time the iterations
    cfg.run.window = args.window
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    cfg.cluster.in_process_mb = 0  # the worker processes are what is measured
    cfg.storage.state = args.state
    cfg.cluster.reuse_memory = args.reuse_memory

    runs = {}
    for name, kind, workers in (("reference", "reference", 0), ("dask1", "local", 1),
                                ("dask2", "local", 2)):
        c = dataclasses.replace(cfg, cluster=dataclasses.replace(
            cfg.cluster, kind=kind, n_workers=max(1, workers)))
        runs[name] = timed_run(c, ds)
        print(f"{name:9s} {runs[name]['per_iteration']:.3f} s/iteration, steady "
              f"{runs[name]['steady_per_iteration']:.3f} (wall {runs[name]['wall']:.1f} s)",
              flush=True)
    windows = {}
    for w in [int(x) for x in args.windows.split(",") if x]:
        c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kind="local",
                                                                 n_workers=2),
                                run=dataclasses.replace(cfg.run, window=w))
        r = timed_run(c, ds)
        r.pop("weights")
        windows[w] = r["per_iteration"]
        print(f"window {w}: {windows[w]:.3f} s/iteration (2 workers)", flush=True)
    weights = {k: r.pop("weights") for k, r in runs.items()}  # every one (not JSON)
    equal = all(
        max(float(np.max(np.abs(a - b))) for a, b in zip(weights["reference"], weights[k],
                                                          strict=True)) == 0.0
        for k in ("dask1", "dask2"))
    result = {
        "benchmark": "dask_time_per_iteration",
        "problem": {"algorithm": args.algorithm, "state": args.state, "width": args.width,
                    "depth": args.depth,
                    "residual_blocks": args.depth - 2, "n": args.n,
                    "iterations": args.iterations, "reuse_memory": args.reuse_memory},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "runs": runs,
        "dask1_over_reference": runs["dask1"]["per_iteration"] / runs["reference"]["per_iteration"],
        "speedup_2_over_1": runs["dask1"]["per_iteration"] / runs["dask2"]["per_iteration"],
        "steady_dask1_over_reference": runs["dask1"]["steady_per_iteration"]
        / runs["reference"]["steady_per_iteration"],
        "steady_speedup_2_over_1": runs["dask1"]["steady_per_iteration"]
        / runs["dask2"]["steady_per_iteration"],
        "weights_bitwise_equal_to_reference": equal,
        "window_seconds_per_iteration_2_workers": windows,
        "targets": {"dask1_over_reference": "<= 1.15", "speedup_2_over_1": ">= 1.6"},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dask-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in (
        "dask1_over_reference", "speedup_2_over_1", "steady_dask1_over_reference",
        "steady_speedup_2_over_1", "weights_bitwise_equal_to_reference")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
