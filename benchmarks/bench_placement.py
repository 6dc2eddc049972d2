"""Chunk tasks placed by block or by chunk (``cluster.placement``) on a 2-worker LocalCluster.

    python benchmarks/bench_placement.py                 # depths 4 and 8, 2 rounds (~3 min)
    python benchmarks/bench_placement.py --depths 4 --rounds 3

The Zarr-resident engine on ``data=synthetic`` (20,000 samples, width 128, relu, RADMM-3A,
chunks of 2,048 samples: 8 chunks of the training set), 12 iterations, each run on a fresh
LocalCluster of 2 worker processes; ``blocks`` and ``chunks`` interleaved in each round (these
machines are shared: separate runs are not comparable), with the load average beside each
figure. Per run: wall time of ``fit``, the engine's steady seconds per iteration (the second
half of the run), ``workers_busy`` (compute seconds over workers x the span of the run's
tasks), ``workers_busy_steady`` (the same inside the pipelined window) and whether the final
weights equal the other placement's bit for bit.

Writes ``benchmarks/results/placement-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from suite_common import report_header, write_results

from daskadmm import api
from daskadmm.config import Config

PLACEMENTS = ("blocks", "chunks")


def config(depth: int, placement: str, iterations: int, n: int, chunk: int,
           window: int = 0) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.n_samples = "synthetic", n
    cfg.model.width, cfg.model.depth = 128, depth
    cfg.run.iterations, cfg.run.plot, cfg.run.progress = iterations, False, False
    cfg.cluster.kind, cfg.cluster.n_workers, cfg.cluster.in_process_mb = "local", 2, 0
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    cfg.cluster.placement = placement
    cfg.storage.chunk_size = chunk
    cfg.run.window = window
    return cfg


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--window", type=int, default=0,
                    help="run.window (0: the automatic one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for depth in args.depths:
        runs: dict[str, list[dict]] = {p: [] for p in PLACEMENTS}
        weights: dict[str, list] = {}
        for rnd in range(args.rounds):
            for placement in PLACEMENTS:
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                res = api.fit(config(depth, placement, args.iterations, args.n, args.chunk,
                                        args.window))
                wall = time.perf_counter() - t0
                weights[placement] = res.weights
                run = {"round": rnd, "wall": wall, "load": load,
                       "load_after": os.getloadavg()[0],
                       "steady_seconds_per_iteration":
                           res.info.get("steady_seconds_per_iteration"),
                       "workers_busy": res.info.get("workers_busy"),
                       "workers_busy_steady": res.info.get("workers_busy_steady"),
                       "placement_used": res.info.get("placement"),
                       "chunks": res.info.get("chunks"),
                       "test_metric": res.final.get("test_metric")}
                runs[placement].append(run)
                print(f"depth {depth} round {rnd} {placement:6s}: wall {wall:.1f} s, steady "
                      f"{run['steady_seconds_per_iteration']:.3f} s/it, busy "
                      f"{run['workers_busy']:.2f}, in the pipelined window "
                      f"{run['workers_busy_steady']:.2f} (load {load:.1f})", flush=True)
        equal = all(np.array_equal(a, b) for a, b in zip(weights["blocks"], weights["chunks"],
                                                         strict=True))
        steady = {p: [r["steady_seconds_per_iteration"] for r in runs[p]] for p in PLACEMENTS}
        row = {"depth": depth, "runs": runs, "weights_equal": equal,
               "steady_ratio_chunks_over_blocks_per_round":
                   [c / b for b, c in zip(steady["blocks"], steady["chunks"], strict=True)]}
        rows.append(row)
    result = {**report_header("placement"), "rows": rows}
    print(f"wrote {write_results(result, args.out, 'placement')}")
    print("| depth | placement | steady s/it | workers busy | in the pipelined window | wall s "
          "| load |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for p in PLACEMENTS:
            rs = row["runs"][p]

            def cells(key, fmt, rs=rs):
                return ", ".join(format(r[key], fmt) for r in rs)

            print(f"| {row['depth']} | {p} | {cells('steady_seconds_per_iteration', '.3f')} | "
                  f"{cells('workers_busy', '.2f')} | {cells('workers_busy_steady', '.2f')} | "
                  f"{cells('wall', '.1f')} | "
                  f"{min(r['load'] for r in rs):.1f}-{max(r['load_after'] for r in rs):.1f} |")
        print(f"(depth {row['depth']}: weights equal bit for bit: {row['weights_equal']})")
    return result


if __name__ == "__main__":
    main()
