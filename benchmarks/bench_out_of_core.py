"""Out-of-core input: an estimator fit on a Dask array larger than the client should hold.

    python benchmarks/bench_out_of_core.py                       # 500,000 x 200 float64 (800 MB)
    python benchmarks/bench_out_of_core.py --rows 100000 --cols 50 --iterations 2

``X`` is generated lazily on the workers (``dask.array.random``, chunks of ``--chunk`` rows),
labels from a fixed linear rule of ``X`` (only the labels, one byte per row, reach the client),
then ``ADMMClassifier(...).fit(X, y)`` on a LocalCluster of 2 worker processes with a
``--memory-limit`` per worker: the standardisation, the store's data and the iterations all
run on the workers. Reports the data size, this (client) process's peak resident memory
before and after the fit (``ru_maxrss``), the fit's wall time, the store's chunk size and the
final training accuracy, with the load average. Writes
``benchmarks/results/out-of-core-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from suite_common import write_results


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--cols", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--memory-limit", default="1.5GB")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import dask.array as da
    from distributed import Client, LocalCluster

    from daskadmm import ADMMClassifier

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           memory_limit=args.memory_limit, dashboard_address=":0")
    client = Client(cluster)
    try:
        X = da.random.default_rng(0).standard_normal((args.rows, args.cols),
                                                     chunks=(args.chunk, args.cols))
        rule = np.random.default_rng(1).standard_normal(args.cols)
        y = (X @ rule > 0).astype(np.int8).compute()  # labels only: one byte per row
        before = _peak_mb()
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        clf = ADMMClassifier(depth=args.depth, width=args.width, iterations=args.iterations,
                             eval_every=args.iterations, client=client).fit(X, y)
        seconds = time.perf_counter() - t0
        report = {
            "rows": args.rows, "cols": args.cols, "chunk_rows": args.chunk,
            "data_mb": args.rows * args.cols * 8 / 1e6,
            "client_peak_rss_mb_before_fit": before, "client_peak_rss_mb_after_fit": _peak_mb(),
            "fit_seconds": seconds, "engine": clf.result_.info.get("engine"),
            "train_accuracy": clf.history_[-1].get("train_metric"),
            "memory_limit_per_worker": args.memory_limit,
            "loadavg": [list(load0), list(os.getloadavg())],
            "argv": sys.argv[1:] if argv is None else list(argv),
        }
    finally:
        client.close()
        cluster.close()
    print(f"X {report['data_mb']:.0f} MB ({args.rows} x {args.cols}, chunks of {args.chunk} "
          f"rows): fit {seconds:.1f} s on {report['engine']}, client peak RSS "
          f"{report['client_peak_rss_mb_before_fit']:.0f} MB before / "
          f"{report['client_peak_rss_mb_after_fit']:.0f} MB after the fit, train accuracy "
          f"{report['train_accuracy']:.3f}, load {report['loadavg']}")
    print(f"wrote {write_results(report, args.out, 'out-of-core')}")
    return report


if __name__ == "__main__":
    main()
