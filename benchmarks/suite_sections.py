"""The four sections of the benchmark suite: quality, roofline, scaling and gradients (what each
measures, and the timing rules: ``suite.py``'s docstring). Each takes the plan and a ``log``
callable and returns its record for the suite's JSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from suite_common import (
    ADMM_MLP,
    ADMM_RESNET,
    _curve,
    _error_string,
    _finite,
    _fmt,
    _splitting_available,
    best_metric,
    fit_exponent,
    higher_is_better,
    load_suite_dataset,
    make_config,
    relaxed_target,
    summarize_run,
    time_to_target,
    timed_fit,
)
from suite_flops import (
    RADMM3_FLOP_FORMULAS,
    _timing_run,
    measure_matmul_rate,
    profile_iteration,
    radmm3_iteration_flops,
)

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import Dataset, ols_baseline

if TYPE_CHECKING:
    from suite import Plan


def section_quality(plan: Plan, data_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """ADMM variants vs tuned Adam and SGD; see ``suite.py``'s docstring."""
    mlp_ok = {name: _splitting_available(name) for name in ADMM_MLP}
    out: dict[str, Any] = {
        "width": plan.width,
        "depths": list(plan.depths),
        "datasets": list(plan.datasets),
        "data_dir": str(data_dir),
        "engine": "cluster.kind=reference (serial NumPy, one process, 1 BLAS thread); "
                  "Adam/SGD: PyTorch float64 CPU, 1 thread",
        "admm_defaults": dataclasses.asdict(Config().algorithm) | {
            "activation": Config().model.activation,
            "residual_scale": Config().model.residual_scale},
        "adam_candidates": [{"lr": lr, "batch_size": b, "epochs": e}
                            for lr, b, e in plan.adam_candidates],
        "sgd": {"lr": plan.sgd[0], "momentum": 0.9, "epochs": plan.sgd[1], "batch_size": 0},
        "admm_iterations": plan.admm_iterations,
        "admm_budget": (f"{plan.admm_budget} x the longest Adam candidate's train time "
                        f"(at least {plan.admm_min_budget} s)"),
        "target": "the tuned Adam's final test metric (same data set and depth); accuracy: "
                  "reach >=, mse: reach <=; time = train_time (run clock minus metric "
                  "evaluations)",
        "ratio": "ADMM time-to-target / Adam time-to-target (Adam's first record at its own "
                 "final metric); not reached: ratio_lower_bound = ADMM train time / Adam's",
        "relaxed_ratio": "the same for the relaxed target (0.99 x accuracy, 1.01 x mse)",
        "mlp": {name: ("available" if ok else f"unavailable: {err}")
                for name, (ok, err) in mlp_ok.items()},
        "mlp_note": "dlADMM/pdADMM train MLPs (model.kind=mlp); their target and ratio are "
                    "against Adam trained on the same MLP with the tuned Adam settings",
        "split": "run.seed = 0 for every run (same split, same initial weights per network)",
        "configs": [],
    }
    for name in plan.datasets:
        try:
            ds = load_suite_dataset(name, data_dir, plan)
        except Exception as exc:  # noqa: BLE001
            log(f"{name}: cannot load: {_error_string(exc)}")
            out["configs"].append({"data": name, "error": _error_string(exc)})
            continue
        metric = api.metric_name(ds)
        higher = higher_is_better(metric)
        try:
            ols = ols_baseline(ds)
        except Exception as exc:  # noqa: BLE001
            ols = {"error": _error_string(exc)}
        for depth in plan.depths:
            entry = _quality_config(plan, ds, name, depth, metric, higher, mlp_ok, log)
            entry["ols"] = ols
            out["configs"].append(entry)
    return out


def _quality_config(plan: Plan, ds: Dataset, name: str, depth: int, metric: str, higher: bool,
                    mlp_ok: dict[str, tuple[bool, str]], log: Callable[[str], None]
                    ) -> dict[str, Any]:
    entry: dict[str, Any] = {"data": name, "depth": depth, "width": plan.width, "metric": metric,
                             "n_train": ds.n_train, "n_test": ds.n_test, "d_in": ds.d_in,
                             "d_out": ds.d_out, "runs": {}, "curves": {}}
    where = f"{name} N={depth}"

    def record(label: str, run: dict[str, Any], target: float, ref: dict) -> dict:
        ref_h = ref.get("history", [])
        ref_time = time_to_target(ref_h, target, higher)[0]
        ref_relaxed = time_to_target(ref_h, relaxed_target(target, higher), higher)[0]
        s = summarize_run(run, target, higher, ref_time, ref_relaxed)
        entry["runs"][label] = s
        entry["curves"][label] = _curve(run.get("history", []))
        reach = (f"ratio {_fmt(s['ratio'], '.2f')}" if s["reached_target"]
                 else f"not reached (ratio > {_fmt(s['ratio_lower_bound'], '.2f')})")
        reach += (f", relaxed {_fmt(s['relaxed_ratio'], '.2f')}"
                  if s["relaxed_iterations_to_target"] is not None
                  else f", relaxed > {_fmt(s['relaxed_ratio_lower_bound'], '.2f')}")
        log(f"{where} {label:14s} {s['status']:11s} final {_fmt(s['final_test_metric'], '.4f')} "
            f"best {_fmt(s['best_test_metric'], '.4f')} {reach}; {s['iterations']} it "
            f"{_fmt(s['train_time'], '.1f')} s" + (f" [{s['error']}]" if "error" in s else ""))
        return s

    # 1. Adam, lightly tuned: the best final test metric wins.
    adam_runs = []
    for lr, batch, epochs in plan.adam_candidates:
        cfg = make_config("adam", depth=depth, width=plan.width, iterations=epochs,
                          eval_every=plan.adam_eval_every if batch == 0 else 1, lr=lr,
                          batch_size=batch)
        run = timed_fit(cfg, ds)
        run["settings"] = {"lr": lr, "batch_size": batch, "epochs": epochs}
        adam_runs.append(run)
        final = run["history"][-1]["test_metric"] if run["history"] else math.nan
        log(f"{where} adam lr={lr:g} batch={batch or 'full'} epochs={epochs}: {run['status']} "
            f"final {_fmt(final, '.4f')} ({_fmt(run['train_time'], '.1f')} s)"
            + (f" [{run['error']}]" if "error" in run else ""))

    def final_of(run: dict) -> float:
        h = run["history"]
        return h[-1]["test_metric"] if h and run["status"] != "error" else math.nan

    finite = [r for r in adam_runs if _finite(final_of(r))]
    entry["adam_candidates"] = [{**r["settings"], "status": r["status"],
                                 "final_test_metric": final_of(r), "train_time": r["train_time"],
                                 **({"error": r["error"]} if "error" in r else {})}
                                for r in adam_runs]
    if not finite:
        entry["error"] = "no Adam candidate finished with a finite test metric"
        log(f"{where}: {entry['error']}")
        return entry
    best = (max if higher else min)(finite, key=final_of)
    target = final_of(best)
    adam_ttt, _ = time_to_target(best["history"], target, higher)
    entry["adam"] = best["settings"]
    entry["target"] = target
    entry["adam_time_to_target"] = adam_ttt
    budget = max(plan.admm_min_budget,
                 plan.admm_budget * max(r["train_time"] for r in adam_runs
                                        if _finite(r["train_time"])))
    entry["admm_budget_seconds"] = budget
    for r in adam_runs:
        s = r["settings"]
        label = f"adam lr={s['lr']:g} b={s['batch_size'] or 'full'}"
        entry["curves"][label] = _curve(r["history"])
    entry["relaxed_target"] = relaxed_target(target, higher)
    record("adam", best, target, best)

    # 2. SGD (one setting, full batch, momentum 0.9).
    lr, epochs = plan.sgd
    cfg = make_config("sgd", depth=depth, width=plan.width, iterations=epochs,
                      eval_every=plan.adam_eval_every, lr=lr, momentum=0.9)
    record("sgd", timed_fit(cfg, ds), target, best)

    # 3. ADMM on the residual network, project defaults, the same wall-clock budget.
    for alg in ADMM_RESNET:
        cfg = make_config(alg, depth=depth, width=plan.width, iterations=plan.admm_iterations)
        record(alg, timed_fit(cfg, ds, budget=budget), target, best)

    # 4. dlADMM / pdADMM on the MLP, against Adam on the same MLP.
    if depth in plan.mlp_depths and any(ok for ok, _ in mlp_ok.values()):
        s = best["settings"]
        cfg = make_config("adam", depth=depth, width=plan.width, kind="mlp",
                          iterations=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                          eval_every=plan.adam_eval_every if s["batch_size"] == 0 else 1)
        adam_mlp = timed_fit(cfg, ds)
        mlp_target = final_of(adam_mlp)
        entry["mlp_target"] = mlp_target
        record("adam (mlp)", adam_mlp, mlp_target, adam_mlp)
        mlp_budget = max(plan.admm_min_budget, plan.admm_budget * adam_mlp["train_time"]) \
            if _finite(adam_mlp["train_time"]) else budget
        for alg in ADMM_MLP:
            if not mlp_ok[alg][0]:
                continue
            cfg = make_config(alg, depth=depth, width=plan.width, kind="mlp",
                              iterations=plan.admm_iterations)
            record(f"{alg} (mlp)", timed_fit(cfg, ds, budget=mlp_budget), mlp_target,
                   adam_mlp)
    return entry


def section_roofline(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """RADMM-3 flop rate as a fraction of the single-thread matmul rate, same run."""
    before = measure_matmul_rate(plan.matmul_shape, plan.matmul_repeats)
    log(f"matmul {plan.matmul_shape}: {before['gflops']:.1f} Gflop/s (best of "
        f"{before['repeats']}, 1 BLAS thread)")
    rows = []
    for width in plan.roofline_widths:
        t = _timing_run(plan.roofline_depth, width, plan.roofline_n, plan.roofline_iterations)
        flops = radmm3_iteration_flops(plan.roofline_depth, t["d_in"], width, t["d_out"],
                                       plan.roofline_n)
        gemm_eq = radmm3_iteration_flops(plan.roofline_depth, t["d_in"], width, t["d_out"],
                                         plan.roofline_n, syrk=False)["total"]
        row = dict(t, flops=flops["total"], flops_gemm_equivalent=gemm_eq,
                   flops_by_term={k: v for k, v in flops.items() if k != "total"})
        row["gflops"] = flops["total"] / t["time_min"] / 1e9 if t["time_min"] > 0 else math.nan
        row["gflops_median"] = (flops["total"] / t["time_median"] / 1e9
                                if t["time_median"] > 0 else math.nan)
        rows.append(row)
        log(f"width {width} n {plan.roofline_n} N {plan.roofline_depth}: "
            f"{_fmt(t['time_min'], '.3f')} s/iteration (min), {flops['total'] / 1e9:.2f} Gflop "
            f"-> {_fmt(row['gflops'], '.1f')} Gflop/s" + (f" [{t['error']}]" if "error" in t
                                                          else ""))
    after = measure_matmul_rate(plan.matmul_shape, plan.matmul_repeats)
    peak = max(before["gflops"], after["gflops"])
    log(f"matmul again: {after['gflops']:.1f} Gflop/s; reference rate {peak:.1f} Gflop/s")
    for row in rows:
        row["fraction_of_matmul"] = row["gflops"] / peak
        row["fraction_of_matmul_median"] = row["gflops_median"] / peak
        log(f"width {row['width']}: {_fmt(100 * row['fraction_of_matmul'], '.0f')}% of the "
            f"matmul rate (median iteration: "
            f"{_fmt(100 * row['fraction_of_matmul_median'], '.0f')}%)")
    widest = max(rows, key=lambda r: r["width"]) if rows else None
    try:
        profile = profile_iteration(plan.roofline_depth, max(plan.roofline_widths),
                                    plan.roofline_n)
        log("profile of one iteration at width " f"{max(plan.roofline_widths)} (own time): "
            + ", ".join(f"{r['function']} {100 * r['share']:.0f}%"
                        for r in profile["top_own_time"][:5]))
    except Exception as exc:  # noqa: BLE001
        profile = {"error": _error_string(exc)}
    return {
        "algorithm": "radmm3 (exact W and V solves), relu (closed-form prox), mse loss, bias",
        "problem": {"depth": plan.roofline_depth, "n": plan.roofline_n, "d_in": 64, "d_out": 4,
                    "data": "synthetic regression (tanh teacher)"},
        "timing": "per-iteration train_time (metric evaluations subtracted); 'time_min' is the "
                  "fastest iteration, as the matmul rate is the best of its repeats",
        "blas_threads": 1,
        "matmul_before": before,
        "matmul_after": after,
        "matmul_gflops": peak,
        "flop_formulas": RADMM3_FLOP_FORMULAS,
        "rows": rows,
        "profile": profile,
        "target": "RADMM-3 >= 50% of the matmul rate at width 512",
        "target_width": widest["width"] if widest else None,
        "target_met": (bool(widest["fraction_of_matmul"] >= 0.5)
                       if widest and widest["width"] >= 512 and _finite(
                           widest["fraction_of_matmul"]) else None),
    }


def section_scaling(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Time per iteration against N, d, n around ``plan.scaling_base``; fitted exponents."""
    N0, d0, n0 = plan.scaling_base
    cache: dict = {}
    sweeps: dict[str, Any] = {}
    for axis, values, expected in (("depth", plan.scaling_depths, 1.0),
                                   ("width", plan.scaling_widths, 2.0),
                                   ("n", plan.scaling_ns, 1.0)):
        rows = []
        for v in values:
            N, d, n = (v if axis == "depth" else N0, v if axis == "width" else d0,
                       v if axis == "n" else n0)
            t = _timing_run(N, d, n, plan.scaling_iterations, cache)
            rows.append(t)
            log(f"{axis}={v} (N={N} d={d} n={n}): {_fmt(t['time_median'], '.4f')} s/iteration"
                + (f" [{t['error']}]" if "error" in t else ""))
        xs = [float(v) for v in values]
        med = [r["time_median"] for r in rows]
        sweeps[axis] = {
            "values": list(values),
            "rows": rows,
            "exponent": fit_exponent(xs, med),
            "exponent_min_times": fit_exponent(xs, [r["time_min"] for r in rows]),
            "exponent_last_two": fit_exponent(xs[-2:], med[-2:]),
            "expected": expected,
        }
        if axis == "depth" and len(rows) >= 2 and all(_finite(m) for m in med):
            slope, intercept = np.polyfit(xs, med, 1)
            sweeps[axis]["linear_fit"] = {"seconds_per_layer": float(slope),
                                          "intercept": float(intercept),
                                          "model": "time = intercept + seconds_per_layer * N"}
        log(f"{axis}: fitted exponent {_fmt(sweeps[axis]['exponent'], '.2f')} "
            f"(last two points {_fmt(sweeps[axis]['exponent_last_two'], '.2f')}; "
            f"expected ~{expected:g})")
    return {
        "algorithm": "radmm3, relu, synthetic regression (d_in 64, d_out 4), bias",
        "base": {"depth": N0, "width": d0, "n": n0},
        "iterations": plan.scaling_iterations,
        "timing": "median per-iteration train_time; exponent = least-squares slope of "
                  "log(time) against log(size)",
        "note": "depth N counts weight layers: N-2 residual blocks plus the input and output "
                "layers, so time ~ a + b N and the slope is a little below 1; the d sweep has "
                "O(d n) elementwise and O(d^3) solve terms next to the O(d^2 n) products",
        "sweeps": sweeps,
    }


def init_gradient_norms(ds: Dataset, depth: int, width: int, activation: str,
                        residual_scale: float, seed: int = 0) -> dict[str, Any]:
    """Loss and per-layer gradient norms at the initial weights ``fit`` would use (torch
    autograd through :mod:`daskadmm.baseline`), plus the RMS of the first and last block
    outputs of the forward pass."""
    from daskadmm import baseline
    from daskadmm.model import forward, init_weights

    torch = baseline.require_torch()
    cfg = make_config("adam", depth=depth, width=width, activation=activation,
                      residual_scale=residual_scale, seed=seed)
    arch = api.build_architecture(cfg, ds)
    weights0 = init_weights(arch, np.random.default_rng(seed), residual_scale)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = [torch.tensor(W, dtype=torch.float64, requires_grad=True) for W in weights0]
        X = torch.as_tensor(ds.X_train, dtype=torch.float64)
        Y = torch.as_tensor(ds.Y_train, dtype=torch.float64)
        value = baseline.torch_objective(arch, params, X, Y, 0.0)
        value.backward()
        norms = [float(p.grad.norm()) for p in params]
    finally:
        torch.set_num_threads(previous)
    with np.errstate(all="ignore"):
        _, V = forward(arch, weights0, ds.X_train)
    rms = [float(np.sqrt(np.mean(v * v))) for v in V[1:]]
    first, last = norms[0], norms[-1]
    return {"residual_scale": residual_scale, "loss": float(value.detach()),
            "grad_norm_first": first, "grad_norm_last": last,
            "grad_ratio_first_over_last": first / last if last > 0 else math.nan,
            "grad_norms": norms, "activation_rms_first": rms[0], "activation_rms_last": rms[-1],
            "activation_growth": rms[-1] / rms[0] if rms[0] > 0 else math.nan}


def section_gradients(plan: Plan, data_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Deep residual networks with residual_scale=1 (no down-scaling), ReLU: RADMM-3 vs Adam."""
    ds = load_suite_dataset(plan.grad_data, data_dir, plan)
    metric = api.metric_name(ds)
    higher = higher_is_better(metric)
    rows = []
    for depth in plan.grad_depths:
        row: dict[str, Any] = {"depth": depth, "width": plan.grad_width, "metric": metric}
        for scale in (1.0, Config().model.residual_scale):
            key = "init_gradients" if scale == 1.0 else f"init_gradients_scale_{scale:g}"
            try:
                row[key] = init_gradient_norms(ds, depth, plan.grad_width, "relu", scale)
            except Exception as exc:  # noqa: BLE001
                row[key] = {"error": _error_string(exc)}
        g = row["init_gradients"]
        if "error" not in g:
            log(f"N={depth} init (residual_scale 1): loss {g['loss']:.3g}, |grad W1| "
                f"{g['grad_norm_first']:.3g}, |grad WN| {g['grad_norm_last']:.3g}, activation "
                f"growth x{g['activation_growth']:.3g}")
        cfg = make_config("adam", depth=depth, width=plan.grad_width, activation="relu",
                          residual_scale=1.0, iterations=plan.grad_epochs, lr=plan.grad_lr)
        adam = timed_fit(cfg, ds)
        budget = max(plan.admm_min_budget, adam["train_time"]) \
            if _finite(adam["train_time"]) else None
        cfg = make_config("radmm3", depth=depth, width=plan.grad_width, activation="relu",
                          residual_scale=1.0, iterations=plan.grad_admm_iterations)
        admm = timed_fit(cfg, ds, budget=budget)
        for label, run in (("adam", adam), ("radmm3", admm)):
            h = run["history"]
            final = h[-1]["test_metric"] if h else math.nan
            s = {"status": run["status"], "final_test_metric": final,
                 "best_test_metric": best_metric(h, higher),
                 "initial_test_metric": h[0]["test_metric"] if h else math.nan,
                 "nonfinite": run["status"] == "nonfinite" or not _finite(final),
                 "diverged": run["status"] == "diverged", "iterations": run["iterations"],
                 "train_time": run["train_time"], "budget": run.get("budget"),
                 "curve": _curve(h)}
            for key in ("error", "message"):
                if key in run:
                    s[key] = run[key]
            row[label] = s
            log(f"N={depth} {label:7s} {s['status']:11s} final {_fmt(final, '.4f')} best "
                f"{_fmt(s['best_test_metric'], '.4f')} ({s['iterations']} it, "
                f"{_fmt(s['train_time'], '.1f')} s)" + (f" [{s['error']}]" if "error" in s
                                                        else ""))
        rows.append(row)
    return {
        "data": plan.grad_data,
        "n_train": ds.n_train,
        "setup": "model.kind=resnet, relu, model.residual_scale=1.0 (residual blocks at full He "
                 "scale: the forward signal grows geometrically with depth), no normalisation; "
                 f"Adam lr={plan.grad_lr:g} full batch, {plan.grad_epochs} epochs; RADMM-3 "
                 "project defaults with the same wall-clock budget as Adam",
        "rows": rows,
    }
