"""The default run against the serial reference: whole commands, interleaved and repeated.

    python benchmarks/bench_default.py                      # digits, the embedded default, 3 rounds
    python benchmarks/bench_default.py --rounds 5 --set run.iterations=50
    python benchmarks/bench_default.py --variants default,reference --set data=synthetic

Each round runs every variant once, in turn, as a user would (``daskadmm ... hydra.run.dir=``
a fresh temporary directory), so all variants see the same machine load:

- ``default``: the embedded default (``cluster=local``; a small problem runs in process);
- ``reference``: ``cluster=reference``, the serial NumPy engine;
- ``local``: ``cluster.in_process_mb=0``, a LocalCluster of worker processes with the Zarr state
  (the default before small problems ran in process).

Reports, per variant, the median over rounds of the command's wall time (start-up, cluster,
fit, outputs and shutdown), its CPU time (the command and every process it started), the fit's
own ``wall_time``, the engine that ran and the final test metric, and per round the ratio of
each variant's command time and CPU time to the reference's; records the load average before
and after every command. Writes
``benchmarks/results/default-run-<timestamp>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suite_common import write_results

VARIANTS = {
    "default": [],
    "reference": ["cluster=reference"],
    "local": ["cluster.in_process_mb=0"],
}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (and theirs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_command(args: list[str], run_dir: Path, timeout: float) -> dict:
    """One ``daskadmm`` command; its wall time, the summary's fit time, engine and metric."""
    cmd = [sys.executable, "-m", "daskadmm.cli", *args, "run.progress=false",
           f"hydra.run.dir={run_dir}"]
    load0 = os.getloadavg()
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0  # the command and every process it started (workers too)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench_default: {' '.join(args) or '(default)'} failed "
                         f"(exit {proc.returncode}): {tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    info = summary.get("info", {})
    return {"command_seconds": wall, "cpu_seconds": cpu, "fit_seconds": summary.get("wall_time"),
            "engine": info.get("engine"), "cluster": info.get("cluster"),
            "test_metric": summary.get("final", {}).get("test_metric"),
            "iterations": summary.get("iterations"),
            "loadavg": [list(load0), list(os.getloadavg())]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="default,reference,local",
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override given to every variant (repeatable)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per command")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "reference" not in names or args.rounds < 1:
        ap.error(f"--variants must include reference and only {', '.join(VARIANTS)}; "
                 f"--rounds >= 1 (got {args.variants!r}, {args.rounds})")

    runs: dict[str, list[dict]] = {v: [] for v in names}
    ratios: dict[str, list[float]] = {v: [] for v in names if v != "reference"}
    cpu_ratios: dict[str, list[float]] = {v: [] for v in ratios}
    with tempfile.TemporaryDirectory(prefix="bench-default-") as tmp:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
            got = {}
            for v in order:
                got[v] = run_command([*args.set, *VARIANTS[v]], Path(tmp) / f"{v}-{r}",
                                     args.timeout)
                runs[v].append(got[v])
                print(f"round {r}: {v:9s} {got[v]['command_seconds']:6.1f} s command, "
                      f"{got[v]['cpu_seconds']:6.1f} CPU-s, "
                      f"{got[v]['fit_seconds']:6.1f} s fit ({got[v]['cluster']}), test "
                      f"{got[v]['test_metric']:.4f}, load {got[v]['loadavg'][1][0]:.1f}",
                      flush=True)
            for v in ratios:
                ratios[v].append(got[v]["command_seconds"] / got["reference"]["command_seconds"])
                cpu_ratios[v].append(got[v]["cpu_seconds"] / got["reference"]["cpu_seconds"])
    report = {
        "overrides": args.set,
        "rounds": args.rounds,
        "runs": runs,
        "median_command_seconds": {v: statistics.median(x["command_seconds"] for x in runs[v])
                                   for v in names},
        "median_fit_seconds": {v: statistics.median(x["fit_seconds"] for x in runs[v])
                               for v in names},
        "ratio_to_reference": {v: {"per_round": x, "median": statistics.median(x)}
                               for v, x in ratios.items()},
        "cpu_ratio_to_reference": {v: {"per_round": x, "median": statistics.median(x)}
                                   for v, x in cpu_ratios.items()},
        "same_test_metric": len({x["test_metric"] for v in names for x in runs[v]}) == 1,
        "cpus": os.cpu_count(),
    }
    for v, x in ratios.items():
        print(f"{v}: {statistics.median(x):.2f}x the reference's command time, "
              f"{statistics.median(cpu_ratios[v]):.2f}x its CPU (medians of {len(x)} rounds: "
              f"{', '.join(f'{y:.2f}' for y in x)})")
    print(f"wrote {write_results(report, args.out, 'default-run')}")
    return report


if __name__ == "__main__":
    main()
