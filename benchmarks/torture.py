"""Fault injection: a resumed run, or a run that lost a Dask worker, ends exactly where an
uninterrupted run does.

    python benchmarks/torture.py                    # 100 kill trials, 20 lost-worker trials
    python benchmarks/torture.py --quick            # 4 kill trials, 2 lost-worker trials
    python benchmarks/torture.py --kills 10 --lost-workers 0 --algorithms pdadmm
    python benchmarks/torture.py --width 64 --depth 6 --iterations 30 --chunk-size 300
    python benchmarks/torture.py --algorithms radmm3a --set algorithm.restart_every=3

Everything runs through the ``daskadmm`` console script of this interpreter's environment, in
subprocesses, as a user would (``cluster=local``, Zarr-resident state, checkpoints every
``--checkpoint-every`` iterations):

1. One uninterrupted reference run per algorithm (the RADMM variants on the residual network,
   pdadmm and dladmm on an MLP with relu and their digits experiments' lambda); its wall time
   and start-up time (until the first metrics row) set the window of the random kills.
2. Kill trials (``--kills``, algorithms alternating): a fresh run, in its own process group, is
   SIGKILLed as a whole (driver and workers) at a random moment. Half of the trials aim at the
   ``--after-checkpoint`` seconds after a checkpoint commit: the script polls the manifest
   ``<store>/checkpoint.json`` every 20 ms and kills at a uniform random delay after its j-th
   change (random j); the other half kill at a uniform random time between the end of start-up
   and the reference's end. Then ``run.resume=true`` on the same store, in a new run dir; with
   probability ``--resume-kill-prob`` the resume is killed too and resumed again, at most
   ``--max-resumes`` resumes. A run that finished before its kill is a "missed" kill and is
   compared all the same.
3. Lost-worker trials (``--lost-workers``): SIGKILL one Dask worker process (not the driver,
   where a LocalCluster's nannies live) mid-run, shortly after a random row of the streamed
   ``metrics.csv``; the run must finish with exit 0 on its own. A worker is a descendant of the
   driver started by multiprocessing's spawn (``spawn_main`` in its command line, not the
   resource tracker) with no spawned child of its own (:func:`worker_pids`).

Every trial's final run is compared with the reference: the final weights (``load_model(url)``)
bitwise, and ``metrics.csv`` row by row, every column but the wall-clock ones exactly. Outcomes:
"equal"; "different" (exit 0, but weights or history differ: the worst outcome); "failed" (a
run exited non-zero on its own, a resume refused the store, or a timeout).

Writes ``benchmarks/results/torture-<timestamp>.json`` (config, machine, references, per-trial
records, counts, wall time and load average). Temporary stores and run dirs live in one
``daskadmm-torture-*`` temp dir, removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHMS = ("radmm3a", "radmm3", "radmm2", "pdadmm", "dladmm")
OUTCOMES = ("equal", "different", "failed")
MANIFEST = "checkpoint.json"
METRICS = "metrics.csv"
POLL_S = 0.02
# Per-algorithm overrides on top of the common ones: pdadmm and dladmm train an MLP with their
# digits experiments' settings (relu, lambda 1e-3; rho 0.1 is conf/algorithm's default).
ALGORITHM_OVERRIDES = {
    "radmm3a": (),  # the project default
    "radmm3": (),
    "radmm2": (),
    "pdadmm": ("model.kind=mlp", "model.activation=relu", "algorithm.lam=0.001"),
    "dladmm": ("model.kind=mlp", "model.activation=relu", "algorithm.lam=0.001"),
}
# A resume that finds nothing to resume from (the new engine resumes a store without a complete
# checkpoint from iteration 0, so this must not happen).
_REFUSED = re.compile(r"nothing to resume|no (complete )?checkpoint", re.IGNORECASE)
# Process groups of the runs in flight, killed on the way out whatever happens.
_LIVE: set[int] = set()


# ------------------------------------------------------------------------------ pure helpers


@dataclass(frozen=True)
class RunConfig:
    """The problem every run of the benchmark trains (the CLI overrides it turns into)."""

    width: int = 32
    depth: int = 4
    iterations: int = 20
    checkpoint_every: int = 2
    chunk_size: int = 400
    workers: int = 2
    data: str = "digits"
    extra: tuple[str, ...] = ()  # more overrides, on every run (--set)


def daskadmm_executable() -> str:
    """The ``daskadmm`` console script next to this interpreter (the same venv), else on PATH."""
    here = Path(sys.executable).parent / "daskadmm"
    if here.exists():
        return str(here)
    found = shutil.which("daskadmm")
    if found is None:
        raise SystemExit("torture: no 'daskadmm' console script next to "
                         f"{sys.executable} or on PATH (pip install -e .)")
    return found


def build_command(exe: str, algorithm: str, cfg: RunConfig, store: str | os.PathLike[str],
                  run_dir: str | os.PathLike[str], resume: bool = False) -> list[str]:
    """The ``daskadmm`` command line of one run (``resume``: the same plus run.resume=true)."""
    if algorithm not in ALGORITHM_OVERRIDES:
        raise ValueError(f"unknown algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    cmd = [
        exe,
        f"algorithm={algorithm}",
        f"data={cfg.data}",
        f"model.width={cfg.width}",
        f"model.depth={cfg.depth}",
        *ALGORITHM_OVERRIDES[algorithm],
        *cfg.extra,
        f"run.iterations={cfg.iterations}",
        f"run.checkpoint_every={cfg.checkpoint_every}",
        "run.progress=false",
        "run.plot=false",
        "cluster=local",
        f"cluster.n_workers={cfg.workers}",
        "storage.state=zarr",
        f"storage.chunk_size={cfg.chunk_size}",
        f"storage.url={store}",
        f"hydra.run.dir={run_dir}",
    ]
    if resume:
        cmd.append("run.resume=true")
    return cmd


def n_checkpoints(cfg: RunConfig) -> int:
    """Checkpoint commits an uninterrupted run makes (at least 1, so a j can be drawn)."""
    if cfg.checkpoint_every <= 0:
        return 1
    return max(1, cfg.iterations // cfg.checkpoint_every)


def pick_kill_plan(rng: np.random.Generator, mode: str, *, startup: float, expected_end: float,
                   checkpoints: int = 1, after_checkpoint: float = 3.0, rows: int = 0
                   ) -> dict[str, Any]:
    """When to strike. ``mode``:

    - ``"time"``: at ``at`` seconds after the start, uniform in [startup, expected_end];
    - ``"checkpoint"``: ``delay`` seconds, uniform in [0, after_checkpoint], after the j-th
      change of the checkpoint manifest, j uniform in 1..checkpoints-2 (so that at least two
      more commits follow, and the kill lands before the run's end rather than after it);
    - ``"worker"``: one worker, ``delay`` seconds (uniform in [0, 0.5]) after the run has
      written row ``after_row`` of its metrics (the history streams as the run goes, so this is
      mid-run whatever the machine's load), uniform in 15%..50% of the ``rows`` an
      uninterrupted run writes (iterations run ahead of their metrics rows).
    """
    lo = max(0.0, float(startup))
    hi = max(lo, float(expected_end))
    if mode == "time":
        return {"mode": "time", "at": float(rng.uniform(lo, hi))}
    if mode == "checkpoint":
        return {"mode": "checkpoint", "j": int(rng.integers(1, max(1, checkpoints - 2) + 1)),
                "delay": float(rng.uniform(0.0, after_checkpoint))}
    if mode == "worker":
        first = max(1, math.ceil(0.15 * rows))
        last = max(first, math.floor(0.5 * rows))
        return {"mode": "worker", "after_row": int(rng.integers(first, last + 1)),
                "delay": float(rng.uniform(0.0, 0.5))}
    raise ValueError(f"unknown kill mode {mode!r}")


def trial_schedule(n: int, algorithms: Sequence[str]) -> list[tuple[str, str]]:
    """(algorithm, kill mode) of the kill trials: algorithms alternate, and each algorithm
    alternates between checkpoint-aimed and time-aimed kills (half of each overall)."""
    k = len(algorithms)
    return [(algorithms[i % k], ("checkpoint", "time")[(i // k) % 2]) for i in range(n)]


def is_spawned_python(cmdline: Sequence[str]) -> bool:
    """A process started by multiprocessing's spawn (``spawn_main``/``--multiprocessing-fork``),
    which is how distributed's nannies start workers; not the resource tracker."""
    text = " ".join(cmdline)
    if "resource_tracker" in text:
        return False
    return "spawn_main" in text or "--multiprocessing-fork" in text


def worker_pids(tree: Iterable[tuple[int, int, Sequence[str]]]) -> list[int]:
    """The Dask worker processes among a run's descendants, given as (pid, ppid, cmdline).

    With ``cluster=local`` the nannies live in the driver and each spawns its worker, so the
    workers are the spawned processes (see :func:`is_spawned_python`); where nannies are
    processes of their own (spawned too), the worker is the spawned process with no spawned
    child, so this keeps the leaves of the spawn tree."""
    procs = [(pid, ppid) for pid, ppid, cmd in tree if is_spawned_python(cmd)]
    parents = {ppid for _, ppid in procs}
    return sorted(pid for pid, _ in procs if pid not in parents)


def time_columns(columns: Iterable[str]) -> set[str]:
    """The wall-clock columns of a history (not reproducible between runs)."""
    return {c for c in columns if c == "time" or "time" in c.split("_") or "seconds" in c}


def _same_value(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return x == y or (math.isnan(x) and math.isnan(y))


def compare_histories(ref: tuple[Sequence[str], Sequence[Mapping[str, str]]],
                      got: tuple[Sequence[str], Sequence[Mapping[str, str]]]
                      ) -> tuple[bool, str]:
    """Compare two metrics histories ``(columns, rows)`` row by row, every column but the
    wall-clock ones exactly (as strings, or as floats where the strings differ). Returns
    (equal, what differs first)."""
    ref_cols, ref_rows = ref
    cols, rows = got
    if list(ref_cols) != list(cols):
        return False, f"columns differ: {list(cols)} vs reference {list(ref_cols)}"
    skip = time_columns(cols)
    for i, (r, g) in enumerate(zip(ref_rows, rows, strict=False)):
        for c in cols:
            if c in skip:
                continue
            if not _same_value(str(r.get(c, "")), str(g.get(c, ""))):
                return False, (f"row {i} (iteration {g.get('iteration')}): {c} = {g.get(c)!r}, "
                               f"reference {r.get(c)!r}")
    if len(ref_rows) != len(rows):
        return False, f"{len(rows)} rows, reference {len(ref_rows)}"
    return True, ""


def read_history(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def max_weight_difference(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Largest absolute elementwise difference (inf when the shapes or counts differ)."""
    if len(ref) != len(got):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return math.inf
        if a.size:
            d = np.abs(a - b)
            worst = max(worst, float(np.nanmax(d)) if np.isfinite(d).any() else math.inf)
            if np.isnan(a).sum() != np.isnan(b).sum():
                worst = math.inf
    return worst


def weights_equal(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> bool:
    return len(ref) == len(got) and all(
        np.asarray(a).shape == np.asarray(b).shape and np.array_equal(a, b)
        for a, b in zip(ref, got, strict=True))


def classify(final_rc: int | None, timed_out: bool, weights_same: bool | None,
             history_same: bool | None) -> str:
    """"failed" unless the final run exited 0 in time; then "equal" when both the weights and
    the history match the reference, else "different" (missing ones count as not equal)."""
    if timed_out or final_rc != 0:
        return "failed"
    return "equal" if weights_same and history_same else "different"


def resume_refused(rc: int | None, output: str) -> bool:
    """A resume that exited 2 saying there is no checkpoint to resume from."""
    return rc == 2 and bool(_REFUSED.search(output))


def count_outcomes(records: Iterable[Mapping[str, Any]], kind: str) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for r in records:
        if r["kind"] == kind:
            counts[r["outcome"]] += 1
    return counts


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


# ---------------------------------------------------------------------------- processes


@dataclass
class ProcResult:
    """One ``daskadmm`` process: how it ended and what was done to it."""

    rc: int | None
    wall: float
    killed: bool = False          # SIGKILLed by this script (the group, or one worker)
    kill_at: float | None = None  # seconds after the start
    timed_out: bool = False
    first_row_at: float | None = None
    rows_seen: int = 0
    manifest_changes: int = 0
    worker: dict[str, Any] | None = None
    log: str = ""
    notes: list[str] = field(default_factory=list)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _manifest_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns  # a rename gives a new inode even within one mtime tick


def _rows(path: Path) -> int:
    """Complete data rows of a streamed metrics.csv so far (0 when absent)."""
    try:
        with open(path, encoding="utf-8") as f:
            return max(0, sum(1 for line in f if line.endswith("\n")) - 1)
    except OSError:
        return 0


def _process_tree(pid: int) -> list[tuple[int, int, list[str]]]:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    tree = []
    for c in children:
        try:
            tree.append((c.pid, c.ppid(), c.cmdline()))
        except psutil.Error:
            continue
    return tree


def run_process(cmd: Sequence[str], *, log: Path, cwd: Path, timeout: float,
                plan: Mapping[str, Any] | None = None, store: Path | None = None,
                metrics: Path | None = None, rng: np.random.Generator | None = None
                ) -> ProcResult:
    """Run ``cmd`` in a new process group, polling every 20 ms; strike according to ``plan``
    (see :func:`pick_kill_plan`): SIGKILL the whole group, or one worker for ``"worker"``."""
    rng = rng or np.random.default_rng()
    manifest = store / MANIFEST if store is not None else None
    with open(log, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)
    _LIVE.add(proc.pid)
    res = ProcResult(rc=None, wall=0.0)
    stamp = _manifest_stamp(manifest) if manifest is not None else None
    strike_at = plan.get("at") if plan else None
    worker_plan = bool(plan) and plan["mode"] == "worker"
    struck = False
    try:
        while proc.poll() is None:
            now = time.monotonic() - t0
            if now > timeout:
                res.timed_out = True
                _kill_group(proc.pid)
                break
            if metrics is not None and (res.first_row_at is None or worker_plan):
                res.rows_seen = _rows(metrics)
                if res.rows_seen and res.first_row_at is None:
                    res.first_row_at = now
            if worker_plan and strike_at is None and res.rows_seen > plan["after_row"]:
                strike_at = now + plan["delay"]
            if manifest is not None:  # count every checkpoint commit seen, kill or not
                new = _manifest_stamp(manifest)
                if new is not None and new != stamp:
                    stamp = new
                    res.manifest_changes += 1
                    if plan and plan["mode"] == "checkpoint" and strike_at is None \
                            and res.manifest_changes == plan["j"]:
                        strike_at = now + plan["delay"]
            if plan and not struck and strike_at is not None and now >= strike_at:
                if plan["mode"] == "worker":
                    pids = worker_pids(_process_tree(proc.pid))
                    if pids:  # not up yet: try again at the next poll
                        pid = int(rng.choice(pids))
                        info = {"pid": pid, "candidates": pids, "at": now}
                        try:
                            os.kill(pid, signal.SIGKILL)
                            res.worker = info
                            res.killed = struck = True
                            res.kill_at = now
                        except ProcessLookupError:
                            res.notes.append(f"worker {pid} gone before the kill")
                else:
                    _kill_group(proc.pid)
                    res.killed = struck = True
                    res.kill_at = now
            time.sleep(POLL_S)
        res.rc = proc.wait()
    finally:
        if proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        _kill_group(proc.pid)  # whatever the driver left behind in its group
        _LIVE.discard(proc.pid)
    res.wall = time.monotonic() - t0
    if plan and plan["mode"] != "worker" and res.killed and res.rc != -signal.SIGKILL:
        res.killed = False  # it ended on its own between the last poll and the kill
        res.notes.append(f"exited {res.rc} before the kill landed")
    if plan and plan["mode"] == "checkpoint" and manifest is not None and not struck:
        res.notes.append(f"manifest changed {res.manifest_changes} times, aimed at "
                         f"change {plan['j']}")
    res.log = log.read_text(errors="replace")[-4000:]
    return res


# ------------------------------------------------------------------------------ comparison


@dataclass
class Reference:
    algorithm: str
    weights: list[np.ndarray]
    history: tuple[list[str], list[dict[str, str]]]
    wall: float
    startup: float
    rc: int


def load_weights(store: Path) -> list[np.ndarray]:
    from daskadmm.storage import load_model

    return [np.asarray(w) for w in load_model(str(store)).weights]


def compare_with(ref: Reference, store: Path, run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"weights_equal": None, "history_equal": None,
                           "max_weight_diff": None, "history_diff": None}
    try:
        w = load_weights(store)
        out["weights_equal"] = weights_equal(ref.weights, w)
        out["max_weight_diff"] = max_weight_difference(ref.weights, w)
    except Exception as exc:  # a store without a model is a difference, reported as such
        out["weights_equal"] = False
        out["weights_error"] = f"{type(exc).__name__}: {exc}"
    try:
        same, what = compare_histories(ref.history, read_history(run_dir / METRICS))
        out["history_equal"], out["history_diff"] = same, what or None
    except OSError as exc:
        out["history_equal"] = False
        out["history_diff"] = f"{type(exc).__name__}: {exc}"
    return out


# ----------------------------------------------------------------------------------- trials


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.exe = daskadmm_executable()
        self.cfg = RunConfig(width=args.width, depth=args.depth, iterations=args.iterations,
                             checkpoint_every=args.checkpoint_every,
                             chunk_size=args.chunk_size, workers=args.workers,
                             extra=tuple(args.set))
        self.rng = np.random.default_rng(args.seed)
        self.refs: dict[str, Reference] = {}

    def _dirs(self, name: str) -> tuple[Path, Path]:
        base = self.work / name
        base.mkdir(parents=True, exist_ok=True)
        return base, base / "state.zarr"

    def reference(self, algorithm: str) -> Reference:
        base, store = self._dirs(f"ref-{algorithm}")
        run_dir = base / "run"
        cmd = build_command(self.exe, algorithm, self.cfg, store, run_dir)
        res = run_process(cmd, log=base / "run.log", cwd=self.work, timeout=self.args.timeout,
                          metrics=run_dir / METRICS)
        if res.rc != 0:
            print(res.log, file=sys.stderr)
            raise SystemExit(f"torture: the {algorithm} reference run failed "
                             f"(exit {res.rc}{', timed out' if res.timed_out else ''}): "
                             + " ".join(cmd))
        startup = res.first_row_at if res.first_row_at is not None else 0.2 * res.wall
        ref = Reference(algorithm, load_weights(store), read_history(run_dir / METRICS),
                        res.wall, startup, res.rc)
        print(f"reference {algorithm}: {res.wall:.1f} s (start-up {startup:.1f} s), "
              f"{len(ref.history[1])} metrics rows, load {_load():.2f}", flush=True)
        return ref

    def _finish(self, rec: dict[str, Any], ref: Reference, store: Path, run_dir: Path,
                final: ProcResult) -> dict[str, Any]:
        if final.timed_out or final.rc != 0:
            rec["outcome"] = "failed"
        else:
            rec.update(compare_with(ref, store, run_dir))
            rec["outcome"] = classify(final.rc, final.timed_out, rec["weights_equal"],
                                      rec["history_equal"])
        rec["loadavg"] = list(os.getloadavg())
        return rec

    def kill_trial(self, index: int, algorithm: str, mode: str) -> dict[str, Any]:
        a = self.args
        ref = self.refs[algorithm]
        base, store = self._dirs(f"kill-{index:03d}-{algorithm}")
        t0 = time.monotonic()
        plan = pick_kill_plan(self.rng, mode, startup=ref.startup, expected_end=ref.wall,
                              checkpoints=n_checkpoints(self.cfg),
                              after_checkpoint=a.after_checkpoint)
        rec: dict[str, Any] = {"kind": "kill", "trial": index, "algorithm": algorithm,
                               "kill_mode": mode, "plan": plan, "runs": [], "resumes": 0,
                               "missed": False, "reason": None}
        run_dir = base / "run0"
        res = run_process(build_command(self.exe, algorithm, self.cfg, store, run_dir),
                          log=base / "run0.log", cwd=self.work, timeout=a.timeout, plan=plan,
                          store=store, rng=self.rng)
        rec["runs"].append(_run_record(res, resume=False, plan=plan))
        rec["kill_time"] = res.kill_at
        final = res
        if res.timed_out:
            rec["reason"] = "timeout"
        elif res.rc == 0:
            rec["missed"] = True  # finished before the kill: compare all the same
        elif not res.killed:
            rec["reason"] = f"the run exited {res.rc} on its own: {_last_line(res.log)}"
        else:
            while True:
                rec["resumes"] += 1
                n = rec["resumes"]
                kill_again = n < a.max_resumes and self.rng.random() < a.resume_kill_prob
                rplan = (pick_kill_plan(self.rng, "time", startup=ref.startup,
                                        expected_end=ref.wall) if kill_again else None)
                run_dir = base / f"run{n}"
                res = run_process(
                    build_command(self.exe, algorithm, self.cfg, store, run_dir, resume=True),
                    log=base / f"run{n}.log", cwd=self.work, timeout=a.timeout, plan=rplan,
                    store=store, rng=self.rng)
                rec["runs"].append(_run_record(res, resume=True, plan=rplan))
                final = res
                if res.timed_out:
                    rec["reason"] = "resume timed out"
                    break
                if res.killed:
                    continue
                if res.rc != 0:
                    refused = resume_refused(res.rc, res.log)
                    rec["reason"] = ("resume refused: nothing to resume" if refused else
                                     f"resume exited {res.rc}") + f": {_last_line(res.log)}"
                    break
                break
        rec["exit_codes"] = [r["rc"] for r in rec["runs"]]
        rec = self._finish(rec, ref, store, run_dir, final)
        rec["wall"] = time.monotonic() - t0
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
        return rec

    def worker_trial(self, index: int, algorithm: str) -> dict[str, Any]:
        a = self.args
        ref = self.refs[algorithm]
        base, store = self._dirs(f"worker-{index:03d}-{algorithm}")
        t0 = time.monotonic()
        plan = pick_kill_plan(self.rng, "worker", startup=ref.startup, expected_end=ref.wall,
                              rows=len(ref.history[1]))
        rec: dict[str, Any] = {"kind": "lost_worker", "trial": index, "algorithm": algorithm,
                               "kill_mode": "worker", "plan": plan, "runs": [], "resumes": 0,
                               "missed": False, "reason": None}
        run_dir = base / "run0"
        res = run_process(build_command(self.exe, algorithm, self.cfg, store, run_dir),
                          log=base / "run0.log", cwd=self.work, timeout=a.timeout, plan=plan,
                          store=store, metrics=run_dir / METRICS, rng=self.rng)
        rec["runs"].append(_run_record(res, resume=False, plan=plan))
        rec["kill_time"] = res.kill_at
        rec["worker"] = res.worker
        rec["missed"] = not res.killed
        if res.timed_out:
            rec["reason"] = "timeout"
        elif res.rc != 0:
            rec["reason"] = f"the run exited {res.rc}: {_last_line(res.log)}"
        rec["exit_codes"] = [res.rc]
        rec = self._finish(rec, ref, store, run_dir, res)
        rec["wall"] = time.monotonic() - t0
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
        return rec


def _run_record(res: ProcResult, resume: bool, plan: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    return {"resume": resume, "rc": res.rc, "wall": res.wall, "killed": res.killed,
            "kill_at": res.kill_at, "timed_out": res.timed_out, "plan": plan,
            "manifest_changes": res.manifest_changes, "rows_seen": res.rows_seen,
            "worker": res.worker,
            "notes": res.notes, "last_line": _last_line(res.log),
            # the whole tail of a run that did not end as planned (exit 0 or killed)
            "log_tail": res.log if (res.rc not in (0, None) and not res.killed) else None}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else ""


def _load() -> float:
    return os.getloadavg()[0]


def _describe(rec: Mapping[str, Any]) -> str:
    plan = rec["plan"]
    if plan["mode"] == "checkpoint":
        seen = rec["runs"][0]["manifest_changes"]
        aim = f"checkpoint j={plan['j']} +{plan['delay']:.2f}s (seen {seen})"
    elif plan["mode"] == "worker":
        aim = f"worker after row {plan['after_row']} +{plan['delay']:.2f}s"
    else:
        aim = f"{plan['mode']} @{plan['at']:.2f}s"
    hit = "missed" if rec["missed"] else (
        f"killed @{rec['kill_time']:.2f}s" if rec.get("kill_time") is not None else "no kill")
    line = (f"{rec['algorithm']:7s} {aim:38s} {hit:16s} exit {rec['exit_codes']} "
            f"resumes {rec['resumes']} -> {rec['outcome']}")
    if rec["outcome"] == "different":
        line += (f" (max |dW| {rec.get('max_weight_diff')}, weights equal "
                 f"{rec.get('weights_equal')}, history: {rec.get('history_diff') or 'equal'}"
                 f"{'; ' + rec['weights_error'] if rec.get('weights_error') else ''})")
    elif rec["outcome"] == "failed":
        line += f" ({rec.get('reason')})"
    return line + f" [{rec['wall']:.1f} s, load {rec['loadavg'][0]:.2f}]"


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Fault injection: SIGKILL runs (and resume them) or one Dask worker at "
                    "random moments; the final weights and metrics must equal an uninterrupted "
                    "run's bit for bit.")
    ap.add_argument("--kills", type=int, default=None,
                    help="kill trials (default 100; 4 with --quick)")
    ap.add_argument("--lost-workers", type=int, default=None,
                    help="lost-worker trials (default 20; 2 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="4 kill trials and 2 lost-worker trials (explicit counts still win)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS),
                    help="comma-separated, alternating over the trials (default %(default)s)")
    ap.add_argument("--width", type=int, default=32, help="model.width (default %(default)s)")
    ap.add_argument("--depth", type=int, default=4, help="model.depth (default %(default)s)")
    ap.add_argument("--iterations", type=int, default=20,
                    help="run.iterations (default %(default)s)")
    ap.add_argument("--checkpoint-every", type=int, default=2,
                    help="run.checkpoint_every (default %(default)s)")
    ap.add_argument("--chunk-size", type=int, default=400,
                    help="storage.chunk_size (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="cluster.n_workers (default %(default)s)")
    ap.add_argument("--after-checkpoint", type=float, default=3.0,
                    help="checkpoint-aimed kills land uniformly within this many seconds "
                         "after the commit (default %(default)s)")
    ap.add_argument("--resume-kill-prob", type=float, default=0.3,
                    help="probability that a resume is killed too (default %(default)s)")
    ap.add_argument("--max-resumes", type=int, default=4,
                    help="resumes per trial at most; the last is never killed "
                         "(default %(default)s)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds any one daskadmm process may run (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the kill moments (default %(default)s)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"),
                    help="where the JSON goes (default benchmarks/results)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more override on every run, e.g. algorithm.restart_every=3 "
                         "(repeatable)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir of stores, run dirs and logs")
    args = ap.parse_args(argv)
    if args.kills is None:
        args.kills = 4 if args.quick else 100
    if args.lost_workers is None:
        args.lost_workers = 2 if args.quick else 20
    args.algorithms = tuple(a for a in args.algorithms.split(",") if a)
    bad = set(args.algorithms) - set(ALGORITHMS)
    if bad or not args.algorithms:
        ap.error(f"--algorithms: choose from {', '.join(ALGORITHMS)}")
    if args.kills < 0 or args.lost_workers < 0 or args.max_resumes < 1:
        ap.error("--kills and --lost-workers must be >= 0, --max-resumes >= 1")
    if args.checkpoint_every < 1:
        ap.error("--checkpoint-every must be >= 1 (resume needs checkpoints)")
    return args


def _on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    work = Path(tempfile.mkdtemp(prefix="daskadmm-torture-"))
    bench = Bench(args, work)
    t0 = time.monotonic()
    load0 = list(os.getloadavg())
    records: list[dict[str, Any]] = []
    print(f"torture: {args.kills} kill trials, {args.lost_workers} lost-worker trials, "
          f"{', '.join(args.algorithms)}; {asdict(bench.cfg)}; work dir {work}", flush=True)
    try:
        for alg in args.algorithms:
            bench.refs[alg] = bench.reference(alg)
        for i, (alg, mode) in enumerate(trial_schedule(args.kills, args.algorithms)):
            rec = bench.kill_trial(i, alg, mode)
            records.append(rec)
            print(f"kill {i + 1}/{args.kills}: {_describe(rec)}", flush=True)
        for i in range(args.lost_workers):
            alg = args.algorithms[i % len(args.algorithms)]
            rec = bench.worker_trial(i, alg)
            records.append(rec)
            print(f"lost worker {i + 1}/{args.lost_workers}: {_describe(rec)}", flush=True)
    except KeyboardInterrupt:
        print("torture: interrupted; writing what was measured", file=sys.stderr)
    finally:
        for pgid in list(_LIVE):
            _kill_group(pgid)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0
    load = list(os.getloadavg())
    counts = {"kill": count_outcomes(records, "kill"),
              "lost_worker": count_outcomes(records, "lost_worker")}
    missed = {k: sum(1 for r in records if r["kind"] == k and r["missed"])
              for k in ("kill", "lost_worker")}
    result = {
        "benchmark": "torture",
        "config": {**asdict(bench.cfg), "algorithms": list(args.algorithms),
                   "kills": args.kills, "lost_workers": args.lost_workers,
                   "after_checkpoint": args.after_checkpoint,
                   "resume_kill_prob": args.resume_kill_prob,
                   "max_resumes": args.max_resumes, "timeout": args.timeout,
                   "seed": args.seed, "quick": args.quick,
                   "commands": {a: build_command(bench.exe, a, bench.cfg, "STORE", "RUN_DIR")
                                for a in args.algorithms}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "references": {a: {"wall": r.wall, "startup": r.startup,
                           "rows": len(r.history[1])} for a, r in bench.refs.items()},
        "counts": counts,
        "missed": missed,
        "wall": wall,
        "loadavg_start": load0,
        "loadavg": load,
        "trials": records,
    }
    for kind, label in (("kill", "kills"), ("lost_worker", "lost workers")):
        c = counts[kind]
        print(f"{label}: equal {c['equal']}, different {c['different']}, failed {c['failed']}"
              f" (missed {missed[kind]})")
    aimed = [r for r in records if r["kind"] == "kill" and r["kill_mode"] == "checkpoint"]
    blind = sum(1 for r in aimed if r["runs"][0]["manifest_changes"] == 0)
    result["checkpoint_aimed_without_manifest"] = blind
    if blind:
        print(f"note: {blind} of {len(aimed)} checkpoint-aimed trials never saw "
              f"<store>/{MANIFEST} change (their kills missed)")
    print(f"wall {wall:.0f} s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"torture-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(_json_safe(result), indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
