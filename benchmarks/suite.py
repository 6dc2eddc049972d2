"""The benchmark suite: ADMM vs backprop quality, roofline, scaling and exploding gradients.

    python benchmarks/suite.py                         # everything (~25 min on 2 cores)
    python benchmarks/suite.py --quick                 # reduced sizes (~4 min)
    python benchmarks/suite.py --only roofline,scaling --out /tmp/bench

Writes ``<out>/suite-<timestamp>.json`` (rewritten after every section, so an interrupted run
keeps what it finished) and, at the end, ``suite-latest.json`` (a copy), ``headline.md`` (the
tables for the README) and ``quality.png`` (test metric against training time). ``--out``
defaults to ``benchmarks/results`` (git-ignored).

Sections (``--only`` picks a subset):

- **quality**: RADMM-3, RADMM-3L, RADMM-2 (residual networks), dlADMM and pdADMM (MLPs, when
  their splittings load) against Adam and SGD (PyTorch, same network, same initial weights,
  same split) on wine_red, wine_white and digits at several depths. Adam's learning rate (and
  batch size) is tuned lightly; the tuned Adam's final test metric is the **target**. Every ADMM
  run gets the wall-clock budget of one full Adam run (``--admm-budget`` times it). Reported per
  run: final and best test metric, time and iterations to the target, and the ratio of the time
  to target to Adam's.
- **roofline**: flops of one RADMM-3 iteration (counted from the update formulas, see
  ``suite_flops.radmm3_block_flops``) over the measured time per iteration, as a fraction of the
  machine's float64 matmul rate measured in the same run on one BLAS thread.
- **scaling**: RADMM-3 time per iteration against depth N, width d and samples n, with the
  fitted log-log exponents.
- **gradients**: deep residual networks without down-scaled residual blocks
  (``model.residual_scale=1``, ReLU): RADMM-3 against Adam, with the gradient norms of the first
  and last layer at initialisation.

Timing rules, the same for every method: one process, ``cluster.kind=reference`` (the serial
NumPy solver; PyTorch for Adam/SGD), one BLAS thread and one torch thread. The clock is the run's
own (``Result.history`` ``wall_time``: ADMM from the start of the solver, Adam from after the
optimiser is built) **minus the time spent evaluating metrics** (both evaluate the same NumPy
forward pass on the train and test splits; the suite times those calls and subtracts them), so a
method is not charged for how often it is evaluated. The machines are shared and noisy: compare
the ratios measured within one run, not seconds across runs.

A run that fails is recorded with its error string; a section that fails is recorded with its
error; neither stops the suite.

The code: this file holds the plan (every size the suite uses), the driver and the command line;
``suite_common.py`` the shared helpers (data, configs, timed fits, targets and ratios),
``suite_flops.py`` the flop counts, the matmul rate and per-iteration timing and profiling,
``suite_sections.py`` the four sections, and ``suite_report.py`` the headline tables and the plot.
They import each other as plain modules: ``benchmarks/`` is on ``sys.path`` when a script in it
runs (and ``tests/support.load_benchmark`` puts it there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suite_common import _clean, _error_string, _log, machine_info, resolve_data_dir
from suite_report import headline_markdown, plot_quality, render
from suite_sections import section_gradients, section_quality, section_roofline, section_scaling

SECTIONS = ("quality", "roofline", "scaling", "gradients")


# ------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """Every size the suite uses; :data:`PLANS` holds the full, quick and tiny (tests) plans."""

    mode: str
    # quality
    datasets: tuple[str, ...]
    depths: tuple[int, ...]
    width: int
    adam_candidates: tuple[tuple[float, int, int], ...]  # (lr, batch_size (0: full), epochs)
    adam_eval_every: int
    sgd: tuple[float, int]  # (lr, epochs), momentum 0.9, full batch
    admm_iterations: int
    admm_budget: float  # ADMM wall-clock budget = this x the longest Adam candidate's time
    admm_min_budget: float  # seconds
    mlp_depths: tuple[int, ...]  # depths at which dlADMM / pdADMM (MLPs) run
    n_train: int | None = None  # subsample the training split (tiny only)
    n_test: int | None = None
    # roofline
    roofline_widths: tuple[int, ...] = (128, 256, 512)
    roofline_n: int = 4096
    roofline_depth: int = 6
    roofline_iterations: int = 3
    matmul_shape: tuple[int, int, int] = (512, 512, 8192)  # (m, k, n): (m x k) @ (k x n)
    matmul_repeats: int = 5
    # scaling: sweeps around (depth, width, n) = scaling_base
    scaling_base: tuple[int, int, int] = (4, 128, 4096)
    scaling_depths: tuple[int, ...] = (4, 8, 16)
    scaling_widths: tuple[int, ...] = (64, 128, 256, 512)
    scaling_ns: tuple[int, ...] = (1024, 2048, 4096, 8192)
    scaling_iterations: int = 4
    # gradients
    grad_data: str = "digits"
    grad_depths: tuple[int, ...] = (32, 64)
    grad_width: int = 64
    grad_lr: float = 1e-3
    grad_epochs: int = 100
    grad_admm_iterations: int = 100


PLANS: dict[str, Plan] = {
    "full": Plan(
        mode="full",
        datasets=("wine_red", "wine_white", "digits"),
        depths=(4, 8, 16, 32),
        width=64,
        adam_candidates=((1e-3, 0, 300), (3e-3, 0, 300), (1e-3, 64, 40)),
        adam_eval_every=3,
        sgd=(1e-2, 300),
        admm_iterations=150,
        admm_budget=1.0,
        admm_min_budget=2.0,
        mlp_depths=(4, 8),
    ),
    "quick": Plan(
        mode="quick",
        datasets=("wine_red", "wine_white", "digits"),
        depths=(4, 8),
        width=64,
        adam_candidates=((1e-3, 0, 150), (3e-3, 0, 150)),
        adam_eval_every=2,
        sgd=(1e-2, 150),
        admm_iterations=60,
        admm_budget=1.0,
        admm_min_budget=1.0,
        mlp_depths=(4,),
        roofline_widths=(128, 256),
        roofline_iterations=2,
        matmul_repeats=3,
        scaling_base=(4, 128, 2048),
        scaling_depths=(4, 8),
        scaling_widths=(64, 128, 256),
        scaling_ns=(1024, 2048, 4096),
        scaling_iterations=3,
        grad_depths=(32,),
        grad_epochs=40,
        grad_admm_iterations=40,
    ),
    "tiny": Plan(
        mode="tiny",
        datasets=("digits",),
        depths=(3,),
        width=8,
        adam_candidates=((1e-3, 0, 4), (3e-3, 0, 4)),
        adam_eval_every=2,
        sgd=(1e-2, 4),
        admm_iterations=3,
        admm_budget=1.0,
        admm_min_budget=0.5,
        mlp_depths=(3,),
        n_train=100,
        n_test=50,
        roofline_widths=(8, 16),
        roofline_n=64,
        roofline_depth=3,
        roofline_iterations=2,
        matmul_shape=(32, 32, 128),
        matmul_repeats=2,
        scaling_base=(3, 8, 64),
        scaling_depths=(3, 4),
        scaling_widths=(8, 16),
        scaling_ns=(64, 128),
        scaling_iterations=2,
        grad_depths=(5,),
        grad_width=8,
        grad_epochs=3,
        grad_admm_iterations=3,
    ),
}


# ------------------------------------------------------------------------------------ driver


def run_suite(plan: Plan, sections: Sequence[str], out: Path, data_dir: Path,
              argv: Sequence[str] = ()) -> tuple[dict[str, Any], Path]:
    """Run the sections; write the JSON after each, and the headline and plot at the end."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"suite-{stamp}.json"
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "daskadmm_suite",
        "mode": plan.mode,
        "timestamp": stamp,
        "argv": list(argv),
        "plan": dataclasses.asdict(plan),
        "machine": machine_info(),
        "notes": {
            "engine": "every method runs in this one process: ADMM with cluster.kind=reference "
                      "(serial NumPy), Adam/SGD with PyTorch on the CPU; 1 BLAS thread and 1 "
                      "torch thread, for timing fairness",
            "timing": "train_time = the run's own clock minus the metric evaluations "
                      "(timed by wrapping daskadmm.api.evaluator)",
            "shared_machine": "the machines are shared and noisy: compare ratios measured in "
                              "the same run, not seconds across runs",
        },
        "sections": {},
        "section_seconds": {},
        "errors": [],
    }

    def save() -> None:
        path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False))

    runners: dict[str, Callable[[Callable[[str], None]], dict]] = {
        "quality": lambda log: section_quality(plan, data_dir, log),
        "roofline": lambda log: section_roofline(plan, log),
        "scaling": lambda log: section_scaling(plan, log),
        "gradients": lambda log: section_gradients(plan, data_dir, log),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        t0 = time.perf_counter()
        _log(name, f"start ({plan.mode})")
        try:
            results["sections"][name] = runners[name](lambda msg, n=name: _log(n, msg))
        except Exception as exc:  # noqa: BLE001 - recorded, the suite goes on
            err = _error_string(exc)
            results["sections"][name] = {"error": err, "traceback": traceback.format_exc()}
            results["errors"].append(f"{name}: {err}")
            _log(name, f"FAILED: {err}")
        results["section_seconds"][name] = time.perf_counter() - t0
        _log(name, f"done in {results['section_seconds'][name]:.0f} s")
        save()
    results["total_seconds"] = time.perf_counter() - t_start
    with contextlib.suppress(Exception):
        results["machine"]["loadavg_end"] = list(os.getloadavg())
    save()
    shutil.copyfile(path, out / "suite-latest.json")
    try:
        (out / "headline.md").write_text(headline_markdown(_clean(results)))
    except Exception as exc:  # noqa: BLE001
        results["errors"].append(f"headline: {_error_string(exc)}")
    if "quality" in results["sections"]:
        try:
            plot_quality(_clean(results["sections"]["quality"]), out / "quality.png")
        except Exception as exc:  # noqa: BLE001
            results["errors"].append(f"plot: {_error_string(exc)}")
    save()
    shutil.copyfile(path, out / "suite-latest.json")
    return results, path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (~4 min)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--data-dir", default=None,
                    help="folder with winequality-{red,white}.csv (default: data/, else "
                         "../shared/data, relative to the repository root)")
    ap.add_argument("--datasets", default=None, help="quality: comma-separated data sets")
    ap.add_argument("--depths", default=None, help="quality: comma-separated depths")
    ap.add_argument("--admm-budget", type=float, default=None,
                    help="quality: ADMM wall-clock budget as a multiple of one Adam run")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="run nothing: rewrite headline.md and quality.png in --out from a "
                         "suite JSON written earlier")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)} (known: {', '.join(SECTIONS)})")
    return args


def plan_from_args(args: argparse.Namespace) -> Plan:
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    changes: dict[str, Any] = {}
    if args.datasets:
        changes["datasets"] = tuple(s.strip() for s in args.datasets.split(",") if s.strip())
    if args.depths:
        changes["depths"] = tuple(int(s) for s in args.depths.split(",") if s.strip())
    if args.admm_budget is not None:
        changes["admm_budget"] = float(args.admm_budget)
    return dataclasses.replace(plan, **changes) if changes else plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        for p in render(Path(args.render), Path(args.out)):
            _log("suite", f"wrote {p}")
        return 0
    plan = plan_from_args(args)
    data_dir = resolve_data_dir(args.data_dir)
    _log("suite", f"mode {plan.mode}, sections {','.join(args.sections)}, data {data_dir}")
    results, path = run_suite(plan, args.sections, Path(args.out), data_dir,
                              argv=sys.argv[1:] if argv is None else argv)
    _log("suite", f"wrote {path} (+ suite-latest.json, headline.md"
         f"{', quality.png' if 'quality' in args.sections else ''}) in "
         f"{results['total_seconds']:.0f} s")
    if results["errors"]:
        _log("suite", f"errors: {'; '.join(results['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
