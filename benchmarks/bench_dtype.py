"""float32 against float64: one RADMM-3 iteration and the matmul rate in each type.

    python benchmarks/bench_dtype.py                      # widths 512, 1024; tanh, relu
    python benchmarks/bench_dtype.py --widths 512 --activations tanh --repeats 5

One process, one BLAS thread, the two types interleaved and repeated (these machines are
shared: separate runs are not comparable), the load average beside each figure. The problem is
``bench_kernels.problem`` (resnet of depth 6, 64 inputs, 10 classes, cross-entropy, ``n``
samples, after 3 warm-up iterations in float64); the float32 run starts from the same state
rounded to float32. For each type: the best seconds of one iteration (the serial reference's
sweep), its fraction of that type's matmul rate (``512 x 512 @ 512 x 8192``, measured before
every timed iteration; flops counted from the update formulas as in ``bench_kernels``), and
the bytes of the n-sized state. ``speedup`` = float64 seconds / float32 seconds, from the
interleaved pairs.

Writes ``benchmarks/results/dtype-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time

import bench_kernels as kernels
import numpy as np
from suite_common import write_results
from suite_flops import radmm3_iteration_flops
from threadpoolctl import threadpool_limits

from daskadmm import heap
from daskadmm.algorithms import get_algorithm
from daskadmm.engines import reference


def _cast(outs, dtype):
    if isinstance(outs, np.ndarray):
        return outs.astype(dtype) if outs.dtype.kind == "f" else outs
    if isinstance(outs, dict):
        return {k: _cast(v, dtype) for k, v in outs.items()}
    if isinstance(outs, list | tuple):
        return type(outs)(_cast(v, dtype) for v in outs)
    return outs


def bench_case(activation: str, width: int, n: int, depth: int, repeats: int, log) -> dict:
    arch, X, Y, specs, pen, outs = kernels.problem(activation, width, n, depth)
    flops = radmm3_iteration_flops(depth, arch.d_in, width, arch.d_out, n)["total"]
    sp = get_algorithm("radmm3").splitting
    cases = {"float64": (X, Y, outs),
             "float32": (X.astype(np.float32), Y.astype(np.float32), _cast(outs, np.float32))}
    times: dict[str, list[float]] = {k: [] for k in cases}
    rates: dict[str, list[float]] = {k: [] for k in cases}
    loads = []
    for rep in range(repeats):
        for name, (Xc, Yc, oc) in cases.items():
            rates[name].append(kernels.matmul_rate(dtype=np.dtype(name)))
            loads.append(kernels._load())
            t0 = time.perf_counter()
            res, _ = reference.sweep(sp, specs, pen, oc, Xc, Yc)
            times[name].append(time.perf_counter() - t0)
            kinds = {v.dtype for st in reference.block_states(sp, res) for v in st.values()
                     if isinstance(v, np.ndarray)}
            assert kinds == {np.dtype(name)}, kinds
            log(f"  {activation} d={width} rep {rep}: {name} {times[name][-1]:.3f} s "
                f"(matmul {rates[name][-1] / 1e9:.1f} Gflop/s, load {loads[-1][0]})")
    state_elems = sum(arch.out_dim(i) * n * (3 if i < depth else 2) for i in range(1, depth + 1))
    row = {"activation": activation, "width": width, "n": n, "depth": depth, "flops": flops,
           "loadavg": loads}
    for name in cases:
        best, rate = min(times[name]), max(rates[name])
        row[name] = {"seconds": times[name], "best": best, "matmul_rate_best": rate,
                     "fraction": flops / (best * rate),
                     "state_bytes": state_elems * np.dtype(name).itemsize}
    row["speedup_pairs_median"] = float(np.median(np.array(times["float64"]) /
                                                  np.array(times["float32"])))
    row["matmul_speedup"] = max(rates["float32"]) / max(rates["float64"])
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kernels.add_case_arguments(ap)
    args = ap.parse_args(argv)
    rows = []
    heap.reuse_freed_memory()  # as daskadmm.fit does
    with threadpool_limits(limits=1, user_api="blas"):
        for width in args.widths:
            for act in args.activations:
                row = bench_case(act, width, args.n, args.depth, args.repeats, print)
                rows.append(row)
                print(f"{act} width {width}: float64 {row['float64']['best']:.3f} s "
                      f"({row['float64']['fraction']:.0%} of matmul), float32 "
                      f"{row['float32']['best']:.3f} s ({row['float32']['fraction']:.0%}); "
                      f"speed-up {row['speedup_pairs_median']:.2f}x (matmul "
                      f"{row['matmul_speedup']:.2f}x)")
    report = {"rows": rows, "argv": sys.argv[1:] if argv is None else list(argv)}
    print(f"wrote {write_results(report, args.out, 'dtype')}")
    return report


if __name__ == "__main__":
    main()
