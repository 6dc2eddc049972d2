"""Flop counts of one RADMM-3 iteration (from its update formulas), the machine's matmul rate,
and the per-iteration timing and profile of RADMM-3 runs: what the suite's roofline and scaling
sections measure with (``bench_kernels.py`` and ``bench_dtype.py`` count flops with them too).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from suite_common import make_config, synthetic_problem, timed_fit
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.algorithms import get_algorithm


def potrf_flops(m: int) -> float:
    """Cholesky factorisation of an m x m SPD matrix (LAPACK potrf)."""
    return m ** 3 / 3 + m ** 2 / 2 + m / 6


def potrs_flops(m: int, rhs: int) -> float:
    """Two triangular solves with ``rhs`` right-hand sides (LAPACK potrs)."""
    return 2.0 * m * m * rhs


def potri_flops(m: int) -> float:
    """Inverse from the Cholesky factor (LAPACK potri: trtri then lauum, m^3/3 each)."""
    return 2.0 * m ** 3 / 3


def gemm_flops(m: int, k: int, n: int) -> float:
    """``(m x k) @ (k x n)``."""
    return 2.0 * m * k * n


def syrk_flops(m: int, k: int) -> float:
    """``C = A A^T`` (or ``A^T A``) with C m x m and inner dimension k, one triangle computed
    (what NumPy does for ``X @ X.T`` when both operands are the same buffer)."""
    return float(m * (m + 1) * k)


RADMM3_FLOP_FORMULAS = {
    "conventions": (
        "gemm (m x k)@(k x n): 2mkn; syrk C = A A^T (C m x m, inner k): m(m+1)k (NumPy computes "
        "X @ X.T and A.T @ A of one buffer with BLAS syrk, one triangle); Cholesky potrf(m): "
        "m^3/3 + m^2/2 + m/6; potrs(m, r): 2 m^2 r; potri(m): 2 m^3/3. Elementwise work "
        "(prox, duals, residuals; O(d n) per block, memory-bound) is not counted. "
        "gemm_equivalent counts the two Gram products as full gemms (2m^2 k)."),
    "per_block": {
        "symbols": ("block i: p = rows of V_{i-1} (d_in for i = 1, else d), p~ = p + bias, "
                    "q = rows of U_i (d, or d_out for i = N), q' = rows of U_{i+1} (i < N), "
                    "n = training samples"),
        "gram": "G = V~ V~^T: syrk(p~, n)",
        "w_rhs": "B = (rho U + Lam) V~^T: gemm(q, n, p~)",
        "w_factor": "chol(rho G + (n lam + tau) I): potrf(p~)",
        "w_solve": "W (.) = B + tau W^k, q right-hand sides: potrs(p~, q)",
        "forward": "Z = W V~: gemm(q, p~, n)",
        "v_rhs": "A_{i+1}^T (rho (U_{i+1} - b 1^T) + Lam_{i+1}): gemm(q, q', n)   (i < N)",
        "v_gram": "A_{i+1}^T A_{i+1}: syrk(q, q')   (i < N)",
        "v_factor": "chol((beta(1+s') + tau) I + rho A^T A): potrf(q)   (i < N)",
        "v_inverse": "M^{-1} from the factor: potri(q)   (i < N; n >= q/2)",
        "v_solve": "V = M^{-1} rhs, n right-hand sides: gemm(q, q, n) (potrs(q, n) below "
                   "q/2 columns; the same count)   (i < N)",
        "hidden_block_leading_order": "9 d^2 n + O(d^3) (gemm_equivalent: 10 d^2 n); the "
                                      "objective reuses U - Z of the forward product",
    },
    "per_iteration": "sum of the per-block counts over blocks i = 1..N",
}


def radmm3_block_flops(p: int, q: int, q_next: int | None, n: int, *, bias: bool = True,
                       syrk: bool = True) -> dict[str, float]:
    """Flops of one RADMM-3 block update (``radmm3.block_update``, exact W and V steps).

    ``p`` rows of ``V_{i-1}``, ``q`` rows of ``U_i``, ``q_next`` rows of ``U_{i+1}`` (None for
    the output block, which has no V step), ``n`` samples. ``syrk=False`` counts the two Gram
    products as full matrix products (the "gemm-equivalent" count). See
    :data:`RADMM3_FLOP_FORMULAS`.
    """
    pt = p + int(bias)
    terms = {
        "gram": syrk_flops(pt, n) if syrk else gemm_flops(pt, n, pt),
        "w_rhs": gemm_flops(q, n, pt),
        "w_factor": potrf_flops(pt),
        "w_solve": potrs_flops(pt, q),
        "forward": gemm_flops(q, pt, n),
    }
    if q_next is not None:
        terms["v_rhs"] = gemm_flops(q, q_next, n)
        terms["v_gram"] = syrk_flops(q, q_next) if syrk else gemm_flops(q, q_next, q)
        terms["v_factor"] = potrf_flops(q)
        if n >= q / 2:  # base.spd_solve: the explicit inverse and one product
            terms["v_inverse"] = potri_flops(q)
            terms["v_solve"] = gemm_flops(q, q, n)
        else:
            terms["v_solve"] = potrs_flops(q, n)
    return terms


def radmm3_iteration_flops(depth: int, d_in: int, width: int, d_out: int, n: int, *,
                           bias: bool = True, syrk: bool = True) -> dict[str, float]:
    """Flops of one RADMM-3 iteration, per term summed over the blocks, plus ``total``."""
    def rows_in(i: int) -> int:
        return d_in if i == 1 else width

    def rows_out(i: int) -> int:
        return d_out if i == depth else width

    totals: dict[str, float] = {}
    for i in range(1, depth + 1):
        q_next = rows_out(i + 1) if i < depth else None
        for k, v in radmm3_block_flops(rows_in(i), rows_out(i), q_next, n, bias=bias,
                                       syrk=syrk).items():
            totals[k] = totals.get(k, 0.0) + v
    totals["total"] = float(sum(totals.values()))
    return totals


def measure_matmul_rate(shape: tuple[int, int, int] = (512, 512, 8192), repeats: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """Float64 ``A @ B`` rate on one BLAS thread: best of ``repeats`` (and the median)."""
    m, k, n = shape
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, k))
    B = rng.standard_normal((k, n))
    times = []
    with threadpool_limits(limits=1, user_api="blas"):
        A @ B  # warm-up
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            A @ B
            times.append(time.perf_counter() - t0)
    flops = gemm_flops(m, k, n)
    return {"shape": [m, k, n], "flops": flops, "best_time": min(times),
            "median_time": float(np.median(times)), "gflops": flops / min(times) / 1e9,
            "gflops_median": flops / float(np.median(times)) / 1e9, "repeats": len(times)}


def iteration_times(run: dict[str, Any]) -> list[float]:
    """Time of every iteration from a run evaluated every iteration (``train_time`` diffs)."""
    h = run.get("history", [])
    out = []
    for a, b in zip(h, h[1:], strict=False):
        steps = b["iteration"] - a["iteration"]
        if steps > 0:
            out.append((b["train_time"] - a["train_time"]) / steps)
    return out


def _timing_run(depth: int, width: int, n: int, iterations: int,
                cache: dict | None = None) -> dict[str, Any]:
    """Time RADMM-3 (ReLU, exact prox) on a synthetic problem; per-iteration statistics."""
    key = (depth, width, n, iterations)
    if cache is not None and key in cache:
        return cache[key]
    ds = synthetic_problem(n)
    cfg = make_config("radmm3", depth=depth, width=width, activation="relu",
                      iterations=iterations, eval_every=1)
    run = timed_fit(cfg, ds)
    times = iteration_times(run)
    out = {"depth": depth, "width": width, "n": n, "d_in": ds.d_in, "d_out": ds.d_out,
           "iterations": run["iterations"], "status": run["status"],
           "iteration_times": times,
           "time_min": min(times) if times else math.nan,
           "time_median": float(np.median(times)) if times else math.nan}
    if "error" in run:
        out["error"] = run["error"]
    if cache is not None:
        cache[key] = out
    return out


def profile_iteration(depth: int, width: int, n: int, top: int = 12) -> dict[str, Any]:
    """Where one RADMM-3 iteration (ReLU) spends its time: cProfile's own time per function
    (one warm-up iteration, then one profiled), the ``top`` functions with their share."""
    import cProfile
    import pstats

    ds = synthetic_problem(n)
    cfg = make_config("radmm3", depth=depth, width=width, activation="relu", iterations=2,
                      eval_every=2)
    from daskadmm.engines.reference import initial_outputs, sweep
    from daskadmm.model import init_weights
    from daskadmm.splitting import BlockSpec

    arch = api.build_architecture(cfg, ds)
    splitting = get_algorithm("radmm3").splitting
    states = splitting.init_state(arch, init_weights(arch, np.random.default_rng(0)),
                                  ds.X_train, ds.Y_train)
    specs = [BlockSpec(arch, i, n) for i in range(1, depth + 1)]
    from daskadmm.schedules import PenaltySchedule

    pen = PenaltySchedule(api.schedule_options(cfg.algorithm)).at(1)
    prof = cProfile.Profile()
    with threadpool_limits(limits=1, user_api="blas"):
        outputs, _ = sweep(splitting, specs, pen, initial_outputs(splitting, states),
                           ds.X_train, ds.Y_train)
        prof.enable()
        sweep(splitting, specs, pen, outputs, ds.X_train, ds.Y_train)
        prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(v[2] for v in stats.values()) or math.nan
    rows = sorted(((v[2], f"{Path(f).name}:{line}({name})") for (f, line, name), v
                   in stats.items()), reverse=True)[:top]
    return {"depth": depth, "width": width, "n": n, "profiled_seconds": total,
            "top_own_time": [{"function": name, "seconds": t, "share": t / total}
                             for t, name in rows]}
