"""Zarr-resident state: worker memory against chunks, out-of-core, time against in-memory Dask.

    python benchmarks/bench_zarr.py                 # all three, default sizes (~5 min, 2 cores)
    python benchmarks/bench_zarr.py --only memory   # any of: memory, outofcore, time, io
    python benchmarks/bench_zarr.py --algorithm pdadmm   # radmm3 (default), radmm3l, radmm3a,
                                                         # radmm2, pdadmm, dladmm
    python benchmarks/bench_zarr.py --quick --algorithm dladmm   # smoke run, small sizes (< 1 min)
    python benchmarks/bench_zarr.py --only outofcore --width 1000 --depth 4 --n 60000 \
        --d-in 784 --d-out 10 --iterations 2 --outofcore-chunks 6       # the papers' MNIST shape

Writes ``benchmarks/results/zarr-<timestamp>.json`` for radmm3 (the name it always had) and
``zarr-<algorithm>-<timestamp>.json`` for the others. The algorithm takes its penalties from
``conf/algorithm/<algorithm>.yaml`` (the defaults the CLI composes); radmm3/3l/3a and radmm2
train the residual network (``model.kind=resnet``), pdadmm/dladmm an MLP (``model.kind=mlp``),
all with relu. Every measurement comes from the workers themselves (peak RSS of each worker process,
sampled every 5 ms in the worker; spilled keys and restarts from the workers and the
scheduler); each configuration gets a fresh LocalCluster so the peaks are its own.

"State" is one copy of every sample-sized variable of the engine's store layout (radmm3: U, Lam
and V per block, radmm3a also Gam; pdADMM: z, q, p, u and the scratch ql per layer; dlADMM: z,
a, or z, u for the output layer; radmm2: V per hidden block, U and Lam of the output block);
the store keeps 2 live slots of each (dlADMM 3), recorded as
``live_state_mb``.

1. memory: peak RSS per worker against the number of chunks for a fixed problem; the state part
   (peak minus an idle worker's RSS) should fall roughly as 1/chunks down to the d x d floor.
2. outofcore: total state >= 3x one worker's ``memory_limit`` (limit = state / 3.2, at least
   ``--min-limit-mb``) completes with no spilled keys and no worker restarted. With ``--quick``
   the floor wins (state is a few MB), so that run only checks that the path works.
3. time: time per iteration of the Zarr-resident engine (1 chunk, 8 chunks, and
   ``storage.chunk_size=auto``) against the all-in-memory Dask path on the same problem and
   cluster (target: within 1.1x).
5. speed (only when asked: ``--only speed --chunks 1,2,4,8,16 --rounds 2``): time per iteration
   of the Zarr-resident engine against the number of chunks, the counts interleaved (in
   alternating order) and repeated ``--rounds`` times, each on a fresh cluster; with
   ``--chunks`` including 0, also ``storage.chunk_size=auto`` (what it chose is recorded).
4. io (only when asked: ``--only io --rounds 3 --io-chunks 8``): the same ratio with the chunk
   files read and written directly (the default) and through Zarr's own path
   (``daskadmm.storage.DIRECT_IO = False`` in the workers), the three runs interleaved and
   repeated.
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
from daskadmm.config import Config, from_mapping
from daskadmm.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("radmm3", "radmm3l", "radmm3a", "radmm2", "pdadmm", "dladmm")
MLP_ALGORITHMS = ("pdadmm", "dladmm")  # MLP trainers (daskadmm.chunks.mlp)
# --quick: a smoke run of all three measurements in well under a minute on 2 cores
QUICK = {"width": 32, "depth": 3, "n": 4096, "iterations": 2, "chunks": "1,4",
         "outofcore_chunks": 4, "min_limit_mb": 256}


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


def make_config(algorithm: str, width: int, depth: int, iterations: int) -> Config:
    """The benchmark's config: ``conf/algorithm/<algorithm>.yaml`` (for radmm3 these are the
    schema defaults), ``model.kind`` resnet or mlp by algorithm, relu."""
    import yaml

    alg = yaml.safe_load((ROOT / "conf" / "algorithm" / f"{algorithm}.yaml").read_text())
    alg["name"] = algorithm
    kind = "mlp" if algorithm in MLP_ALGORITHMS else "resnet"
    return from_mapping({
        "algorithm": alg,
        "model": {"kind": kind, "width": width, "depth": depth, "activation": "relu"},
        "run": {"iterations": iterations, "eval_every": iterations, "progress": False},
    })


def state_layout(cfg: Config, ds: Dataset) -> tuple[list[dict[str, tuple]], int]:
    """The engine's own store layout (the sample-sized variables of every block / layer, as
    :meth:`StateStore.create_state` allocates them) and its number of live slots."""
    from daskadmm.algorithms import get_algorithm

    plan = get_algorithm(cfg.algorithm.name).plan
    return plan.layout(api.build_architecture(cfg, ds)), plan.slots


def state_bytes(cfg: Config, ds: Dataset) -> dict:
    """Bytes (float64) of one copy of every sample-sized state variable of the store: radmm3
    U, Lam (and V) per block; pdADMM z, q, p, u and the scratch ql per layer; dlADMM z, a
    (z, u for the output layer). ``live`` counts the slots the store keeps of each (2; dlADMM
    3), ``data`` the training X and Y the store also holds."""
    lay, slots = state_layout(cfg, ds)
    n = ds.X_train.shape[1]
    rows = {f"b{b}/{v}": shape[0] for b, vs in enumerate(lay, start=1)
            for v, shape in vs.items() if shape and shape[-1] == "n"}
    one = 8 * n * sum(rows.values())
    return {"state": one, "live": slots * one, "slots": slots, "variables": rows,
            "data": 8 * n * (ds.X_train.shape[0] + ds.Y_train.shape[0])}


def _set_direct_io(on: bool) -> None:
    """In a worker: read and write whole chunk files directly (the default) or through Zarr."""
    from daskadmm import storage

    storage.DIRECT_IO = on


def run_once(cfg: Config, ds: Dataset, chunk_size: int | str, state: str, memory_limit: str,
             workdir: Path, direct_io: bool = True) -> dict:
    from distributed import Client, LocalCluster

    url = workdir / f"state-{chunk_size}-{state}.zarr"
    shutil.rmtree(url, ignore_errors=True)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=memory_limit) as cluster, \
            Client(cluster) as client:
        client.run(_set_direct_io, direct_io)
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
        "chunking": res.info.get("chunking"),
        "direct_io": direct_io,
        "engine": res.info.get("engine"), "status": res.status, "wall": wall,
        "per_iteration": (h[-1]["wall_time"] - h[0]["wall_time"]) / max(1, res.iterations),
        "idle_rss_mb": sorted(idle.values()), "peak_rss_mb": sorted(peak.values()),
        "peak_state_mb": sorted(peak[w] - idle[w] for w in peak),
        "spilled_keys": sum(spilled.values()), "workers_restarted": len(before - after),
        "transfer_seconds": res.info.get("transfer_seconds"),
        "compute_seconds": res.info.get("compute_seconds"),
    }


def io_section(cfg: Config, ds: Dataset, args: argparse.Namespace, work: Path) -> dict:
    """Time per iteration of the Zarr-resident engine, with the chunk files read and written
    directly (the default) and through Zarr, against the in-memory Dask path: the three
    interleaved, ``--rounds`` times, each on a fresh cluster; ratios per round and medians."""
    import statistics

    cs = -(-args.n // args.io_chunks) if args.io_chunks > 1 else 0
    runs: dict[str, list[dict]] = {"memory": [], "direct": [], "zarr": []}
    for r in range(args.rounds):
        order = ["memory", "direct", "zarr"]
        for v in order if r % 2 == 0 else order[::-1]:
            run = run_once(cfg, ds, 0 if v == "memory" else cs, "memory" if v == "memory"
                           else "zarr", "auto", work, direct_io=v != "zarr")
            run["loadavg"] = list(os.getloadavg())
            runs[v].append(run)
            print(f"io round {r}: {v:6s} {run['per_iteration']:.3f} s/iteration "
                  f"(load {run['loadavg'][0]:.1f})", flush=True)
    ratio = {v: [z["per_iteration"] / m["per_iteration"]
                 for z, m in zip(runs[v], runs["memory"], strict=True)]
             for v in ("direct", "zarr")}
    out = {"chunks": args.io_chunks, "runs": runs,
           "over_memory": {v: {"per_round": x, "median": statistics.median(x)}
                           for v, x in ratio.items()},
           "direct_over_zarr": statistics.median(
               d["per_iteration"] / z["per_iteration"]
               for d, z in zip(runs["direct"], runs["zarr"], strict=True)),
           "target": "<= 1.1"}
    print(f"io: Zarr-resident / in-memory {out['over_memory']['direct']['median']:.2f}x with "
          f"direct chunk files, {out['over_memory']['zarr']['median']:.2f}x through Zarr "
          f"(medians of {args.rounds} rounds, {args.io_chunks} chunks)", flush=True)
    return out


def speed_section(cfg: Config, ds: Dataset, args: argparse.Namespace, work: Path) -> dict:
    """Time per iteration against the chunk count (0: ``storage.chunk_size=auto``), the counts
    interleaved in alternating order, ``--rounds`` times, each run on a fresh cluster."""
    import statistics

    runs: dict[int, list[dict]] = {c: [] for c in args.chunks}
    for r in range(args.rounds):
        for chunks in args.chunks if r % 2 == 0 else args.chunks[::-1]:
            cs = "auto" if chunks == 0 else (0 if chunks == 1 else -(-args.n // chunks))
            run = run_once(cfg, ds, cs, "zarr", "auto", work)
            run["loadavg"] = list(os.getloadavg())
            runs[chunks].append(run)
            print(f"speed round {r}: {'auto' if chunks == 0 else chunks:>4} chunks "
                  f"({run['chunks']} run) {run['per_iteration']:.3f} s/iteration, peak state "
                  f"per worker {max(run['peak_state_mb']):.0f} MB (load "
                  f"{run['loadavg'][0]:.1f})", flush=True)
    best = min(args.chunks, key=lambda c: statistics.median(x["per_iteration"]
                                                            for x in runs[c]))
    return {"runs": {str(c): v for c, v in runs.items()},
            "median_per_iteration": {str(c): statistics.median(x["per_iteration"] for x in v)
                                     for c, v in runs.items()},
            "fastest": best}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3,
                    help="io, speed: rounds of the interleaved runs")
    ap.add_argument("--io-chunks", type=int, default=8, help="io: chunks of the Zarr runs")
    ap.add_argument("--only", default="memory,outofcore,time",
                    help="comma-separated: memory, outofcore, time (default); io, speed")
    ap.add_argument("--algorithm", default="radmm3", choices=ALGORITHMS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                    + " (explicit flags still win)")
    ap.add_argument("--width", type=int, default=None, help="default 128")
    ap.add_argument("--depth", type=int, default=None, help="default 6")
    ap.add_argument("--n", type=int, default=None, help="training samples, default 65536")
    ap.add_argument("--iterations", type=int, default=None, help="default 3")
    ap.add_argument("--d-in", type=int, default=32,
                    help="inputs (784 with --width 1000 --n 60000: the dlADMM/pdADMM papers' "
                    "MNIST shape)")
    ap.add_argument("--d-out", type=int, default=4, help="outputs (classes)")
    ap.add_argument("--chunks", default=None,
                    help="chunk counts of the memory and speed sweeps, default 1,2,4,8,16 "
                    "(speed: 0 is storage.chunk_size=auto)")
    ap.add_argument("--outofcore-chunks", type=int, default=None,
                    help="chunks of the out-of-core run, default 32 (0: "
                    "storage.chunk_size=auto)")
    ap.add_argument("--min-limit-mb", type=int, default=None,
                    help="floor of the out-of-core memory_limit, default 64")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    defaults = {"width": 128, "depth": 6, "n": 65536, "iterations": 3, "chunks": "1,2,4,8,16",
                "outofcore_chunks": 32, "min_limit_mb": 64}
    for k, v in (QUICK if args.quick else defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.chunks = _ints(args.chunks)
    bad = set(args.only.split(",")) - {"memory", "outofcore", "time", "io", "speed"}
    if bad:
        ap.error(f"--only: unknown measurement(s) {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    only = set(args.only.split(","))
    ds = make_problem(args.n, d_in=args.d_in, d_out=args.d_out)
    cfg = make_config(args.algorithm, args.width, args.depth, args.iterations)
    sizes = state_bytes(cfg, ds)
    total = sizes["state"]
    work = Path(tempfile.mkdtemp(prefix="daskadmm-bench-"))
    result: dict = {
        "benchmark": "zarr_state",
        "algorithm": args.algorithm,
        "problem": {"algorithm": args.algorithm, "model_kind": cfg.model.kind,
                    "activation": cfg.model.activation, "rho": cfg.algorithm.rho,
                    "width": args.width, "depth": args.depth, "n": args.n,
                    "d_in": args.d_in, "d_out": args.d_out,
                    "iterations": args.iterations, "state_mb": total / 2**20,
                    "state_slots": sizes["slots"], "live_state_mb": sizes["live"] / 2**20,
                    "data_mb": sizes["data"] / 2**20,
                    "state_rows": sizes["variables"], "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"{args.algorithm} ({cfg.model.kind}, width {args.width}, depth {args.depth}, "
          f"n {args.n}): state {total / 2**20:.1f} MB per copy, {sizes['slots']} live slots "
          f"= {sizes['live'] / 2**20:.1f} MB", flush=True)
    try:
        if "memory" in only:
            rows = []
            for chunks in args.chunks:
                cs = 0 if chunks == 1 else -(-args.n // chunks)
                r = run_once(cfg, ds, cs, "zarr", "auto", work)
                rows.append(r)
                print(f"memory: {r['chunks']:3d} chunks, peak state per worker "
                      f"{max(r['peak_state_mb']):8.1f} MB", flush=True)
            result["memory"] = rows
        if "outofcore" in only:
            limit_mb = max(args.min_limit_mb, int(total / 2**20 / 3.2))
            cs = "auto" if args.outofcore_chunks == 0 else -(-args.n // args.outofcore_chunks)
            r = run_once(cfg, ds, cs, "zarr", f"{limit_mb}MiB", work)
            r["memory_limit_mb"] = limit_mb
            r["state_over_limit"] = total / 2**20 / limit_mb
            r["live_state_over_limit"] = sizes["live"] / 2**20 / limit_mb
            result["outofcore"] = r
            print(f"out-of-core: state {total / 2**20:.0f} MB = {r['state_over_limit']:.1f}x "
                  f"limit {limit_mb} MB, {r['chunks']} chunks: status {r['status']}, "
                  f"spilled {r['spilled_keys']}, "
                  f"restarted {r['workers_restarted']}", flush=True)
        if "time" in only:
            mem = run_once(cfg, ds, 0, "memory", "auto", work)
            zar = run_once(cfg, ds, 0, "zarr", "auto", work)
            zar8 = run_once(cfg, ds, -(-args.n // 8), "zarr", "auto", work)
            zara = run_once(cfg, ds, "auto", "zarr", "auto", work)
            result["time"] = {"memory": mem, "zarr_1chunk": zar, "zarr_8chunks": zar8,
                              "zarr_auto": zara,
                              "zarr_over_memory": zar["per_iteration"] / mem["per_iteration"],
                              "zarr8_over_memory": zar8["per_iteration"] / mem["per_iteration"],
                              "zarr_auto_over_memory": zara["per_iteration"]
                              / mem["per_iteration"],
                              "target": "<= 1.1"}
            print(f"time: memory {mem['per_iteration']:.2f} s/it, zarr {zar['per_iteration']:.2f}"
                  f" s/it (1 chunk), {zar8['per_iteration']:.2f} s/it (8 chunks), "
                  f"{zara['per_iteration']:.2f} s/it (auto: {zara['chunks']} chunks)",
                  flush=True)
        if "io" in only:
            result["io"] = io_section(cfg, ds, args, work)
        if "speed" in only:
            result["speed"] = speed_section(cfg, ds, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.algorithm == "radmm3" else f"{args.algorithm}-"
    path = out / f"zarr-{tag}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
