"""What RADMM-3A's restarts (``algorithm.restart_every``) cost on a 2-worker LocalCluster.

    python benchmarks/bench_restart.py                       # depths 4 and 8, R = 3, 2 rounds
    python benchmarks/bench_restart.py --depths 4 --restart-every 3 --rounds 3
    python benchmarks/bench_restart.py --compare-guard   # restarts with and without the guard

The problem of ``bench_placement.py`` (``data=synthetic``, 20,000 samples, width 128, relu,
RADMM-3A, Zarr state in chunks of 8,000 samples placed by chunk, a fresh LocalCluster of 2
worker processes per run), 24 iterations, without restarts and with ``restart_every=R``
alternately in each round (these machines are shared: separate runs are not comparable), the
load average beside each figure. Per run: wall time of ``fit`` (cluster start included), the
engine's steady seconds per iteration (the second half of the run, restarts included),
``workers_busy_steady`` and the final test metric. A restart waits for its iteration to be
done and runs the start's forward and backward pass on every chunk before the next iteration
can begin, so the pipelined window drains and fills again each time. With the restart guard
on (the default) the driver also waits for the start's objective before it submits the next
iteration; ``--compare-guard`` adds restarts with ``algorithm.restart_guard=false`` to each
round, to measure that wait.

Writes ``benchmarks/results/restart-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench_placement import config
from suite_common import report_header, write_results

from daskadmm import api


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--restart-every", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--compare-guard", action="store_true",
                    help="also run the restarts without the guard, in each round")
    args = ap.parse_args(argv)
    if args.restart_every < 1:
        raise SystemExit("--restart-every must be >= 1")
    variants = [(0, True), (args.restart_every, True)]  # (restart_every, restart_guard)
    if args.compare_guard:
        variants.append((args.restart_every, False))
    rows = []
    for depth in args.depths:
        for rnd in range(args.rounds):
            for every, guard in variants:
                cfg = config(depth, "chunks", args.iterations, 20000, 8000)
                cfg.algorithm.restart_every = every
                cfg.algorithm.restart_guard = guard
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                res = api.fit(cfg)
                wall = time.perf_counter() - t0
                row = {"depth": depth, "round": rnd, "restart_every": every,
                       "restart_guard": guard and every > 0, "wall": wall,
                       "steady_seconds_per_iteration":
                           res.info.get("steady_seconds_per_iteration"),
                       "workers_busy_steady": res.info.get("workers_busy_steady"),
                       "test_metric": res.final.get("test_metric"), "load": load,
                       "load_after": os.getloadavg()[0]}
                rows.append(row)
                print(f"depth {depth} round {rnd} restart_every {every}"
                      f"{'' if guard or not every else ' (no guard)'}: wall {wall:.1f} s, "
                      f"steady {row['steady_seconds_per_iteration']:.3f} s/it, busy "
                      f"{row['workers_busy_steady']:.2f}, test {row['test_metric']:.4f} "
                      f"(load {load:.1f})", flush=True)
    result = {**report_header("restart"), "rows": rows}
    print(f"wrote {write_results(result, args.out, 'restart')}")
    print("| depth | restart_every | guard | steady s/it | busy in the window | wall s | test "
          "| load |")
    print("|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for every, guard in variants:
            rs = [r for r in rows if r["depth"] == depth and r["restart_every"] == every
                  and r["restart_guard"] == (guard and every > 0)]
            cell = lambda key, fmt, rs=rs: ", ".join(format(r[key], fmt) for r in rs)  # noqa: E731
            print(f"| {depth} | {every} | {'yes' if guard and every else 'no'} | "
                  f"{cell('steady_seconds_per_iteration', '.3f')} | "
                  f"{cell('workers_busy_steady', '.2f')} | {cell('wall', '.1f')} | "
                  f"{cell('test_metric', '.4f')} | "
                  f"{min(r['load'] for r in rs):.1f}-{max(r['load_after'] for r in rs):.1f} |")
    return result


if __name__ == "__main__":
    main()
