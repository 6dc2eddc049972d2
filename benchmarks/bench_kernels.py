"""Kernel speed: one RADMM-3 iteration against the machine's matmul rate, old vs new kernels.

    python benchmarks/bench_kernels.py          # widths 512, 1024; tanh, relu (~15 min, 2 cores)
    python benchmarks/bench_kernels.py --widths 512 --activations tanh --repeats 5

Everything is measured in one process, on one BLAS thread, interleaved and repeated (these
machines are shared: separate runs are not comparable), with the load average beside each
figure:

- the float64 matmul rate (``512 x 512 @ 512 x 8192``), measured again before every timed
  iteration (the fraction uses the best rate of the run);
- one RADMM-3 iteration (the serial reference's sweep; default penalties rho 2, beta 1,
  tau 1e-3, lam 0.01; a resnet of depth 6 with 64 inputs and 10 classes, cross-entropy, ``n``
  samples) from the same state (after 3 warm-up iterations):

  - ``new``: the library's block update;
  - ``new_fresh_heap``: the same without ``daskadmm.heap``'s reuse of freed memory (glibc's
    default for arrays over 32 MiB: a fresh, page-faulting mapping each time); every other
    variant runs with the reuse, as ``daskadmm.fit`` sets it;
  - ``old``: the block update as it was before issue 13, copied below (the plain activation
    prox: three sigma evaluations per Newton step, per-iteration gathers of the active
    elements, n-sized temporaries; LAPACK ``potrs`` for the V step, which returns a
    Fortran-ordered V; ``W V~`` recomputed for the objective);
  - ``old_prox``: the library's block update with only the old prox swapped in;

- the activation prox alone, old vs new, on block 3's inputs of that iteration.

Flops of an iteration are counted from the update formulas (``suite_flops.radmm3_iteration_flops``:
the products, factorisations and solves the new block update executes); the old one also
recomputed ``W V~`` for its objective (``flops_executed`` adds that). ``fraction`` =
flops / (seconds x matmul rate), with the needed flops for both (``fraction_executed`` counts
the old one's extra product as work). Elementwise work is not counted.

Writes ``benchmarks/results/kernels-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import scipy.linalg as sla
from suite_common import report_header, write_results
from suite_flops import gemm_flops, radmm3_iteration_flops
from threadpoolctl import threadpool_limits

from daskadmm import heap
from daskadmm.algorithms import get_algorithm
from daskadmm.engines import reference
from daskadmm.model import Architecture, init_weights, loss_value
from daskadmm.splitting import BlockSpec, Options, Penalties, radmm3
from daskadmm.splitting.base import prox_activation, prox_output

Array = np.ndarray


# ------------------------------------------------------------------ the old kernels (before #13)


def old_phi(act, u, c, m, beta, kappa):
    r = c - act.f(u)
    d = u - m
    return 0.5 * beta * r * r + 0.5 * kappa * d * d


def old_prox_activation(c, m, beta, kappa, u0, act, max_iter=100):
    """``prox_activation`` before issue 13 (the same iterates, slowly)."""
    if act.piecewise_linear:
        a = act.slope
        up = np.maximum(0.0, (beta * c + kappa * m) / (beta + kappa))
        um = np.minimum(0.0, (a * beta * c + kappa * m) / (a * a * beta + kappa))
        pp = old_phi(act, up, c, m, beta, kappa)
        pm = old_phi(act, um, c, m, beta, kappa)
        return np.where(pp <= pm, up, um), 0
    shape = c.shape
    c, m = c.ravel(), m.ravel()
    u = np.array(u0, dtype=np.float64).ravel().copy()
    lphi = kappa + beta * (act.sup_df2 + act.sup_d2f * (np.abs(c) + act.sup_abs))
    active = np.arange(u.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        uu, cc, mm = u[active], c[active], m[active]
        s, ds, d2 = act.f(uu), act.df(uu), act.d2f(uu)
        r = cc - s
        g = -beta * r * ds + kappa * (uu - mm)
        h = beta * (ds * ds - r * d2) + kappa
        phi = 0.5 * beta * r * r + 0.5 * kappa * (uu - mm) ** 2
        done = np.abs(g) <= 1e-14 * (beta * (np.abs(cc) + 1.0) + kappa * (np.abs(uu) + np.abs(mm)))
        newton = h >= 1e-6 * kappa
        step = np.where(newton, g / np.where(newton, h, 1.0), g / lphi[active])
        outright = newton & (g * g / np.where(newton, h, 1.0) <= 1e-8 * np.abs(phi)) & ~done
        unew = uu.copy()
        unew[outright] = uu[outright] - step[outright]
        search = np.flatnonzero(~done & ~outright)
        t = 1.0
        stalled = np.zeros(uu.size, dtype=bool)
        for _halving in range(60):
            if search.size == 0:
                break
            cand = uu[search] - t * step[search]
            pc = old_phi(act, cand, cc[search], mm[search], beta, kappa)
            ok = pc <= phi[search] + 1e-15 * np.abs(phi[search])
            unew[search[ok]] = cand[ok]
            search = search[~ok]
            t *= 0.5
        stalled[search] = True
        u[active] = unew
        active = active[~(done | stalled)]
    return u.reshape(shape), int(active.size)


def old_spd_solve(M, R):
    if not np.all(np.isfinite(M)):
        return np.full(R.shape, np.nan)
    c = sla.cho_factor(M, lower=True, check_finite=False)
    return sla.cho_solve(c, R, check_finite=False)


def old_block_update(spec, pen, own, Vleft, right, Y):
    """``radmm3.block_update`` (exact steps) before issue 13."""
    act = spec.act
    Vt = spec.aug(Vleft)
    G, B = Vt @ Vt.T, (pen.rho * own["U"] + own["Lam"]) @ Vt.T
    M = pen.rho * G
    M[np.diag_indices_from(M)] += spec.n * pen.lam + pen.tau
    W = old_spd_solve(M, (B + pen.tau * own["W"]).T).T
    Z = W @ Vt
    kappa = pen.rho + pen.tau
    m = (pen.rho * Z - own["Lam"] + pen.tau * own["U"]) / kappa
    if spec.is_output:
        U, capped = prox_output(spec.arch.loss, Y, m, kappa, own["U"],
                                spec.options.newton_max_iter)
    else:
        c = own["V"] - Vleft if spec.s else own["V"]
        U, capped = old_prox_activation(c, m, pen.beta, kappa, own["U"], act,
                                        spec.options.newton_max_iter)
    Lam = own["Lam"] + pen.rho * (U - Z)
    new = {"W": W, "U": U, "Lam": Lam}
    dual_sq = 0.0
    if not spec.is_output:
        A, b = spec.split_bias(right["W"])
        Ur = right["U"] if b is None else right["U"] - b
        rhs = pen.beta * act.f(U)
        if spec.s:
            rhs += pen.beta * Vleft
        if spec.s_next:
            rhs += pen.beta * (right["V"] - act.f(right["U"]))
        rhs += A.T @ (pen.rho * Ur + right["Lam"])
        M = pen.rho * (A.T @ A)
        M[np.diag_indices_from(M)] += pen.beta * (1 + spec.s_next) + pen.tau
        rhs += pen.tau * own["V"]
        V = old_spd_solve(M, rhs)
        new["V"] = V
        dual_sq = float(np.sum((V - own["V"]) ** 2))
    r = U - Z
    # the objective recomputed W V~
    ro = U - W @ spec.aug(Vleft)
    obj = 0.5 * pen.lam * float(np.sum(W * W))
    obj += (float(np.sum(Lam * ro)) + 0.5 * pen.rho * float(np.sum(ro * ro))) / spec.n
    if spec.is_output:
        obj += loss_value(spec.arch.loss, U, Y)
    else:
        p = new["V"] - act.f(U)
        if spec.s:
            p -= Vleft
        obj += 0.5 * pen.beta * float(np.sum(p * p)) / spec.n
    return new, {"objective": obj, "primal_sq": float(np.sum(r * r)), "dual_sq": dual_sq,
                 "capped": float(capped)}


def _with_block_update(fn):
    """The radmm3 splitting with ``fn`` as its block update."""
    sp = get_algorithm("radmm3").splitting
    step = sp.steps[0]
    return dataclasses.replace(
        sp, name=f"radmm3[{fn.__name__}]",
        steps=(dataclasses.replace(step, fn=lambda spec, pen, own, left, right, Y=None:
                                   fn(spec, pen, own, left, right, Y)),))


def _old_prox_compat(c, m, beta, kappa, u0, act, max_iter=100, *, sigma_out=None, out=None):
    """The old prox with the new one's outputs (``out``, ``sigma_out``) filled, as the library's
    block update expects."""
    u, capped = old_prox_activation(c, m, beta, kappa, u0, act, max_iter)
    if out is not None:
        out[...] = u
        u = out
    if sigma_out is not None:
        sigma_out[...] = act.f(u)
    return u, capped


def _old_prox_block_update(spec, pen, own, Vleft, right, Y):
    saved = radmm3.prox_activation
    radmm3.prox_activation = _old_prox_compat
    try:
        return radmm3.block_update(spec, pen, own, Vleft, right, Y)
    finally:
        radmm3.prox_activation = saved


# ------------------------------------------------------------------ measurement


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def matmul_rate(shape=(512, 512, 8192), repeats=2, seed=0, dtype=np.float64) -> float:
    m, k, n = shape
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m, k)).astype(dtype, copy=False)
    B = rng.standard_normal((k, n)).astype(dtype, copy=False)
    out = np.empty((m, n), dtype=dtype)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(A, B, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def problem(activation: str, width: int, n: int, depth: int, d_in: int = 64,
            d_out: int = 10, warmup: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    arch = Architecture("resnet", depth, d_in, width, d_out, activation, loss="cross_entropy")
    X = rng.standard_normal((d_in, n))
    Y = np.eye(d_out)[(rng.standard_normal((d_out, d_in)) @ X).argmax(axis=0)].T.copy()
    sp = get_algorithm("radmm3").splitting
    pen = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=0.01)
    specs = [BlockSpec(arch, i, n, Options()) for i in range(1, depth + 1)]
    outs = reference.initial_outputs(sp, sp.init_state(arch, init_weights(arch, rng), X, Y))
    for _ in range(warmup):
        outs, _ = reference.sweep(sp, specs, pen, outs, X, Y)
    return arch, X, Y, specs, pen, outs


def _heap_mode(reuse: bool) -> None:
    """``reuse``: freed memory kept for reuse (``daskadmm.heap``, what ``fit`` sets); else
    glibc's default for arrays over 32 MiB (its adaptive mmap threshold's ceiling, and the
    trim threshold it pairs with it), which map fresh memory every time."""
    libc = heap._libc()
    if libc is None:
        return
    if reuse:
        heap.reuse_freed_memory()
    else:
        libc.mallopt(heap._M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(heap._M_TRIM_THRESHOLD, 64 << 20)
        heap.give_back()


def _max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for sa, sb in zip(reference.block_states(get_algorithm("radmm3").splitting, a),
                      reference.block_states(get_algorithm("radmm3").splitting, b), strict=True):
        for key in sa:
            x, y = sa[key], sb[key]
            worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300)))
    return worst


def bench_case(activation: str, width: int, n: int, depth: int, repeats: int, log) -> dict:
    arch, X, Y, specs, pen, outs = problem(activation, width, n, depth)
    flops = radmm3_iteration_flops(depth, arch.d_in, width, arch.d_out, n)["total"]
    extra = sum(gemm_flops(arch.out_dim(i), arch.in_dim(i) + 1, n)
                for i in range(1, depth + 1))  # the old objective's W V~
    variants = {"new": get_algorithm("radmm3").splitting,
                "new_fresh_heap": get_algorithm("radmm3").splitting,
                "old": _with_block_update(old_block_update),
                "old_prox": _with_block_update(_old_prox_block_update)}
    times: dict[str, list] = {k: [] for k in variants}
    rates, loads, results = [], [], {}
    for rep in range(repeats):
        for name, sp in variants.items():
            rates.append(matmul_rate())
            loads.append(_load())
            _heap_mode(reuse=name != "new_fresh_heap")
            t0 = time.perf_counter()
            results[name], _ = reference.sweep(sp, specs, pen, outs, X, Y)
            times[name].append(time.perf_counter() - t0)
            _heap_mode(reuse=True)
            log(f"  {activation} d={width} rep {rep}: {name} {times[name][-1]:.3f} s "
                f"(matmul {rates[-1] / 1e9:.1f} Gflop/s, load {loads[-1][0]})")
    rate = max(rates)
    row = {"activation": activation, "width": width, "n": n, "depth": depth,
           "flops": flops, "flops_executed_old": flops + extra,
           "matmul_rate_best": rate, "matmul_rate_median": float(np.median(rates)),
           "loadavg": loads, "max_rel_diff_old_vs_new": _max_rel_diff(results["old"],
                                                                      results["new"])}
    for name, ts in times.items():
        best, med = min(ts), float(np.median(ts))
        row[name] = {"seconds": ts, "best": best, "median": med,
                     "fraction": flops / (best * rate),
                     "fraction_median": flops / (med * float(np.median(rates)))}
        if name == "old":
            row[name]["fraction_executed"] = (flops + extra) / (best * rate)
    row["speedup_best"] = row["old"]["best"] / row["new"]["best"]
    row["heap_reuse_speedup_pairs_median"] = float(np.median(
        np.array(times["new_fresh_heap"]) / np.array(times["new"])))
    # ratios of the interleaved pairs (each pair ran back to back)
    row["speedup_pairs_median"] = float(np.median(np.array(times["old"]) /
                                                  np.array(times["new"])))
    row["prox"] = bench_prox(X, Y, specs, pen, outs, repeats)
    return row


def bench_prox(X, Y, specs, pen, outs, repeats: int) -> dict:
    """The activation prox alone on block 3's inputs of the timed iteration, old vs new."""
    captured = []
    saved = radmm3.prox_activation

    def grab(c, m, beta, kappa, u0, act, max_iter=100, **kwargs):
        captured.append((c, m, beta, kappa, u0, act, max_iter))
        return saved(c, m, beta, kappa, u0, act, max_iter, **kwargs)

    radmm3.prox_activation = grab
    try:
        reference.sweep(get_algorithm("radmm3").splitting, specs, pen, outs, X, Y)
    finally:
        radmm3.prox_activation = saved
    c, m, beta, kappa, u0, act, max_iter = captured[min(2, len(captured) - 1)]
    told, tnew, loads = [], [], []
    for _ in range(repeats):
        loads.append(_load())
        t0 = time.perf_counter()
        a, _ = old_prox_activation(c, m, beta, kappa, u0, act, max_iter)
        told.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b, _ = prox_activation(c, m, beta, kappa, u0, act, max_iter)
        tnew.append(time.perf_counter() - t0)
    return {"elements": int(c.size), "old": told, "new": tnew,
            "ns_per_element_old": min(told) / c.size * 1e9,
            "ns_per_element_new": min(tnew) / c.size * 1e9,
            "speedup_best": min(told) / min(tnew),
            "max_rel_diff": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
            "loadavg": loads}


def add_case_arguments(ap: argparse.ArgumentParser) -> None:
    """The problem grid and output options (shared with ``bench_dtype.py``)."""
    ap.add_argument("--widths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--activations", nargs="+", default=["tanh", "relu"])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(ap)
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    rows = []
    heap.reuse_freed_memory()  # as daskadmm.fit does
    with threadpool_limits(limits=1, user_api="blas"):
        for width in args.widths:
            for act in args.activations:
                log(f"{act}, width {width}, n {args.n}, depth {args.depth}")
                rows.append(bench_case(act, width, args.n, args.depth, args.repeats, log))
                r = rows[-1]
                log(f"  -> new {r['new']['best']:.3f} s = {r['new']['fraction']:.0%} of matmul; "
                    f"without heap reuse {r['new_fresh_heap']['best']:.3f} s = "
                    f"{r['new_fresh_heap']['fraction']:.0%}; "
                    f"old {r['old']['best']:.3f} s = {r['old']['fraction']:.0%} "
                    f"({r['speedup_best']:.2f}x); prox alone {r['prox']['speedup_best']:.2f}x "
                    f"({r['prox']['ns_per_element_new']:.0f} ns/element)")
    result = {**report_header("kernels"), "numpy": np.__version__, "blas_threads": 1,
              "target_fraction": 0.5, "rows": rows}
    log(f"wrote {write_results(result, args.out, 'kernels')}")
    log("| activation | width | new s/it | fraction | without heap reuse | fraction | "
        "old s/it | fraction | speed-up | load |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fresh = r["new_fresh_heap"]
        log(f"| {r['activation']} | {r['width']} | {r['new']['best']:.3f} | "
            f"{r['new']['fraction']:.0%} | {fresh['best']:.3f} | {fresh['fraction']:.0%} | "
            f"{r['old']['best']:.3f} | {r['old']['fraction']:.0%} | "
            f"{r['speedup_best']:.2f}x | {r['loadavg'][0][0]}-{max(x[0] for x in r['loadavg'])} |")
    return result


if __name__ == "__main__":
    main()
