"""Zarr-resident state: worker memory against chunks, out-of-core, time against in-memory Dask.

    python benchmarks/bench_zarr.py                 # all three, default sizes (~5 min, 2 cores)
    python benchmarks/bench_zarr.py --only memory   # one of: memory, outofcore, time

Writes ``benchmarks/results/zarr-<timestamp>.json``. Every measurement comes from the workers
themselves (peak RSS of each worker process, sampled every 5 ms in the worker; spilled keys and
restarts from
the workers and the scheduler); each configuration gets a fresh LocalCluster so the peaks are
its own.

1. memory: peak RSS per worker against the number of chunks for a fixed problem; the state part
   (peak minus an idle worker's RSS) should fall roughly as 1/chunks down to the d x d floor.
2. outofcore: total state >= 3x one worker's ``memory_limit`` completes with no spilled keys
   and no worker restarted.
3. time: time per iteration of the Zarr-resident engine against the all-in-memory Dask path on
   the same problem and cluster (target: within 1.3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import Dataset


def make_problem(n: int, d_in: int = 32, d_out: int = 4, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d_in, n))
    T = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    Y = np.tanh(T @ X)
    return Dataset("bench", "regression", X, Y, X[:, :512].copy(), Y[:, :512].copy())


def _start_sampler(interval: float = 0.005) -> bool:
    """Sample this worker's RSS every ``interval`` s in a thread. (``getrusage``'s ru_maxrss is
    useless here: worker processes are fork+exec'ed from the driver and Linux keeps ru_maxrss
    across exec, so it starts at the driver's size.)"""
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": False}

    def loop():
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()
    # functions of __main__ reach the workers by value, so keep the state in a real module
    sys._daskadmm_rss_sampler = state
    return True


def _stop_sampler() -> float:
    state = sys._daskadmm_rss_sampler
    state["stop"] = True
    return state["peak"] / 2**20


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _spilled(dask_worker) -> int:
    data = dask_worker.data
    slow = getattr(data, "slow", None)
    return len(slow) if slow is not None else 0


def state_bytes(width: int, depth: int, n: int, d_out: int) -> int:
    """U, Lam (and V) of every block, float64."""
    per = [3 * width * n] * (depth - 1) + [2 * d_out * n]
    return 8 * sum(per)


def run_once(ds: Dataset, width: int, depth: int, iterations: int, chunk_size: int,
             state: str, memory_limit: str, workdir: Path) -> dict:
    from distributed import Client, LocalCluster

    cfg = Config()
    cfg.model.width, cfg.model.depth, cfg.model.activation = width, depth, "relu"
    cfg.run.iterations, cfg.run.eval_every, cfg.run.progress = iterations, iterations, False
    url = workdir / f"state-{chunk_size}-{state}.zarr"
    shutil.rmtree(url, ignore_errors=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=memory_limit) as cluster, \
            Client(cluster) as client:
        idle = client.run(_rss_mb)
        client.run(_start_sampler)
        before = set(client.scheduler_info(n_workers=-1)["workers"])
        c = dataclasses.replace(
            cfg, cluster=dataclasses.replace(cfg.cluster, kind="address",
                                             address=cluster.scheduler_address),
            storage=dataclasses.replace(cfg.storage, state=state, chunk_size=chunk_size,
                                        url=str(url)))
        t = time.perf_counter()
        res = api.fit(c, dataset=ds)
        wall = time.perf_counter() - t
        peak = client.run(_stop_sampler)
        spilled = client.run(_spilled)
        after = set(client.scheduler_info(n_workers=-1)["workers"])
    shutil.rmtree(url, ignore_errors=True)
    h = res.history
    return {
        "chunk_size": chunk_size, "chunks": res.info.get("chunks", 1), "state": state,
        "engine": res.info.get("engine"), "status": res.status, "wall": wall,
        "per_iteration": (h[-1]["wall_time"] - h[0]["wall_time"]) / max(1, res.iterations),
        "idle_rss_mb": sorted(idle.values()), "peak_rss_mb": sorted(peak.values()),
        "peak_state_mb": sorted(peak[w] - idle[w] for w in peak),
        "spilled_keys": sum(spilled.values()), "workers_restarted": len(before - after),
        "transfer_seconds": res.info.get("transfer_seconds"),
        "compute_seconds": res.info.get("compute_seconds"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="memory,outofcore,time")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    ds = make_problem(args.n)
    total = state_bytes(args.width, args.depth, args.n, ds.d_out)
    work = Path(tempfile.mkdtemp(prefix="daskadmm-bench-"))
    result: dict = {
        "benchmark": "zarr_state",
        "problem": {"width": args.width, "depth": args.depth, "n": args.n,
                    "iterations": args.iterations, "state_mb": total / 2**20},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    try:
        if "memory" in only:
            rows = []
            for chunks in (1, 2, 4, 8, 16):
                cs = 0 if chunks == 1 else -(-args.n // chunks)
                r = run_once(ds, args.width, args.depth, args.iterations, cs, "zarr", "auto",
                             work)
                rows.append(r)
                print(f"memory: {r['chunks']:3d} chunks, peak state per worker "
                      f"{max(r['peak_state_mb']):8.1f} MB", flush=True)
            result["memory"] = rows
        if "outofcore" in only:
            limit_mb = max(64, int(total / 2**20 / 3.2))
            cs = -(-args.n // 32)
            r = run_once(ds, args.width, args.depth, args.iterations, cs, "zarr",
                         f"{limit_mb}MiB", work)
            r["memory_limit_mb"] = limit_mb
            r["state_over_limit"] = total / 2**20 / limit_mb
            result["outofcore"] = r
            print(f"out-of-core: state {total / 2**20:.0f} MB = {r['state_over_limit']:.1f}x "
                  f"limit {limit_mb} MB: status {r['status']}, spilled {r['spilled_keys']}, "
                  f"restarted {r['workers_restarted']}", flush=True)
        if "time" in only:
            mem = run_once(ds, args.width, args.depth, args.iterations, 0, "memory", "auto",
                           work)
            zar = run_once(ds, args.width, args.depth, args.iterations, 0, "zarr", "auto",
                           work)
            zar8 = run_once(ds, args.width, args.depth, args.iterations, -(-args.n // 8),
                            "zarr", "auto", work)
            result["time"] = {"memory": mem, "zarr_1chunk": zar, "zarr_8chunks": zar8,
                              "zarr_over_memory": zar["per_iteration"] / mem["per_iteration"],
                              "zarr8_over_memory": zar8["per_iteration"] / mem["per_iteration"],
                              "target": "<= 1.3"}
            print(f"time: memory {mem['per_iteration']:.2f} s/it, zarr {zar['per_iteration']:.2f}"
                  f" s/it (1 chunk), {zar8['per_iteration']:.2f} s/it (8 chunks)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"zarr-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
