"""Run ADMM on Dask: windows of iterations as task graphs, pipelined across iterations.

Cluster choices (``cluster.kind``):

- ``synchronous``: Dask's single-threaded scheduler (debugging);
- ``threads``: the threaded scheduler in this process;
- ``local`` (default): a ``LocalCluster`` of worker processes with the dashboard on 127.0.0.1;
- ``address``: an existing cluster at ``cluster.address`` (nothing is started).

On a distributed cluster (``local``/``address``) the runner submits each iteration's tasks as
futures without waiting for the previous iteration, keeping ``run.window`` iterations in flight,
and reads each iteration's statistics as it completes, so the scheduler runs a wavefront across
blocks and iterations. Block b is pinned to worker ``(b-1) * workers // N`` (contiguous ranges),
so neighbour data crosses workers only at range boundaries. The synchronous and threaded
schedulers have no futures: each window is one dict graph per ``get`` call.

Either way the iterates are exactly the serial reference's: the tasks run the same functions on
the same inputs. Global decisions (stopping, adaptive penalties) are taken at evaluation points;
iterations submitted speculatively past a stop are cancelled and discarded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .config import ClusterConfig, Config
from .data import Dataset
from .graph import Node, Ref, build_window, default_window, to_dask_graph
from .model import Architecture
from .monitor import Monitor
from .result import Result
from .schedules import PenaltySchedule
from .splitting import BlockSpec, Options, Splitting

__all__ = ["SharedCluster", "connect", "run_dask"]

log = logging.getLogger(__name__)

# A cluster shared by every job of a Hydra multirun (set by the CLI's callback).
_SHARED: dict[str, Any] = {}


class SharedCluster:
    """Start one LocalCluster and let every ``run_dask`` with ``cluster.kind=local`` in this
    process use it (Hydra multirun jobs run one after another in one process)."""

    def __init__(self, ccfg: ClusterConfig):
        self.ccfg = ccfg
        self.cluster = None

    def __enter__(self) -> SharedCluster:
        self.cluster = _start_local_cluster(self.ccfg)
        _SHARED["address"] = self.cluster.scheduler_address
        _SHARED["dashboard"] = self.cluster.dashboard_link
        return self

    def __exit__(self, *exc) -> None:
        _SHARED.clear()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def _set_blas_threads(n: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def _start_local_cluster(ccfg: ClusterConfig):
    from distributed import LocalCluster

    env = {k: str(ccfg.blas_threads) for k in
           ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    dash = ccfg.dashboard_address or None
    return LocalCluster(
        n_workers=ccfg.n_workers,
        threads_per_worker=ccfg.threads_per_worker,
        processes=True,
        memory_limit=ccfg.memory_limit,
        dashboard_address=dash,
        host="127.0.0.1",
        env=env,
        silence_logs=logging.WARNING,
    )


@contextlib.contextmanager
def connect(ccfg: ClusterConfig):
    """Yield a distributed ``Client`` for ``cluster.kind`` local or address."""
    from distributed import Client

    cluster = None
    if ccfg.kind == "address":
        try:
            client = Client(ccfg.address, timeout=f"{ccfg.connect_timeout}s")
        except OSError as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {ccfg.address}: "
                                  f"{exc}") from None
    elif _SHARED.get("address"):
        client = Client(_SHARED["address"])
    else:
        cluster = _start_local_cluster(ccfg)
        client = Client(cluster)
    try:
        client.run(_set_blas_threads, ccfg.blas_threads)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _pens(schedule: PenaltySchedule, k0: int, k1: int):
    return {k: schedule.at(k) for k in range(k0 + 1, k1 + 1)}


def _window_end(k: int, window: int, K: int, schedule: PenaltySchedule) -> int:
    """Last iteration of the window that starts after k: at most ``window`` iterations, and
    never past an adaptive-schedule barrier (its outcome sets the next penalties)."""
    end = min(k + window, K)
    for j in range(k + 1, end):
        if schedule.is_barrier(j):
            return j
    return end


def run_dask(cfg: Config, splitting: Splitting, arch: Architecture, ds: Dataset,
             weights0: list[np.ndarray], schedule: PenaltySchedule, monitor: Monitor,
             options: Options, run_dir: Path | None = None) -> Result:
    """Run the ADMM iterations on the configured Dask scheduler."""
    from .reference import initial_objective

    n = ds.X_train.shape[1]
    N = arch.depth
    specs = [BlockSpec(arch, i, n, options) for i in range(1, N + 1)]
    window = cfg.run.window or default_window(N)
    run_id = uuid.uuid4().hex[:8]
    states = splitting.init_state(arch, weights0, ds.X_train, ds.Y_train)
    pen1 = schedule.at(1)
    monitor.start(initial_objective(splitting, specs, pen1, states, ds.X_train, ds.Y_train),
                  [s["W"] for s in states], pen1.rho, pen1.beta)
    metric = "accuracy" if ds.task == "classification" else "mse"
    ctx = _Ctx(cfg, splitting, arch, ds, specs, schedule, monitor, window, run_id, metric)
    if cfg.cluster.kind in ("synchronous", "threads"):
        result = ctx.run_local_scheduler(states)
    else:
        result = ctx.run_distributed(states, run_dir)
    return result


class _Ctx:
    def __init__(self, cfg, splitting, arch, ds, specs, schedule, monitor, window, run_id,
                 metric):
        self.cfg, self.splitting, self.arch, self.ds = cfg, splitting, arch, ds
        self.specs, self.schedule, self.monitor = specs, schedule, monitor
        self.window, self.run_id, self.metric = window, run_id, metric
        self.K = cfg.run.iterations
        self.N = arch.depth
        self.n = ds.X_train.shape[1]
        self.tasks_run = 0

    # -- helpers ---------------------------------------------------------------------------
    def data_keys(self) -> dict[str, str]:
        return {name: f"data_{name.lower()}-{self.run_id}" for name in
                ("X", "Y", "X_train", "Y_train", "X_test", "Y_test")}

    def init_keys(self) -> dict[str, list[str]]:
        keys = [f"init_state-b{b}-{self.run_id}" for b in range(1, self.N + 1)]
        return {s.name: keys for s in self.splitting.steps}

    def eval_iters(self, k0: int, k1: int) -> list[int]:
        return [k for k in range(k0 + 1, k1 + 1) if self.monitor.is_eval(k)]

    def build(self, k0: int, k1: int, prev: dict[str, list[str]]):
        return build_window(self.splitting, self.specs, _pens(self.schedule, k0, k1), k0, k1,
                            prev, self.run_id, self.data_keys(), self.eval_iters(k0, k1),
                            (self.arch, self.ds.task, self.metric))

    def process(self, k: int, it, ev) -> str | None:
        """Feed iteration k's statistics (and evaluation) to the monitor; return a stop status."""
        pen = self.schedule.at(k)
        self.monitor.step(k, it, pen.rho, pen.beta)
        self.schedule.observe(k, it.primal)
        if ev is None:
            return None
        rec_metrics, weights = ev
        self.weights = weights
        rec = self.monitor.record(k, it, weights, pen.rho, pen.beta, rec_metrics)
        return self.monitor.check(rec)

    def result(self, status: str, k: int, info: dict[str, Any]) -> Result:
        info = {"engine": "dask", "cluster": self.cfg.cluster.kind, "window": self.window,
                "run_id": self.run_id, "objective_increases": len(self.monitor.increases),
                "inner_solver_caps_hit": self.monitor.capped_total,
                "schedule_changes": self.schedule.changes, **info}
        return Result(status=status, message=self.monitor.message(status, k), iterations=k,
                      weights=self.weights, arch=self.arch, metric=self.metric,
                      history=self.monitor.history, wall_time=self.monitor.elapsed(), info=info)

    def literals(self, states) -> dict[str, Any]:
        dk = self.data_keys()
        ds = self.ds
        lit = {dk["X"]: ds.X_train, dk["Y"]: ds.Y_train, dk["X_train"]: ds.X_train,
               dk["Y_train"]: ds.Y_train, dk["X_test"]: ds.X_test, dk["Y_test"]: ds.Y_test}
        for kk, st in zip(self.init_keys()[self.splitting.steps[0].name], states, strict=True):
            lit[kk] = (st, {})
        return lit

    # -- synchronous / threaded ------------------------------------------------------------
    def run_local_scheduler(self, states) -> Result:
        import dask
        import dask.threaded

        scheduler = "sync" if self.cfg.cluster.kind == "synchronous" else "threads"
        workers = self.cfg.cluster.n_workers * self.cfg.cluster.threads_per_worker
        literals = self.literals(states)
        prev = self.init_keys()
        self.weights = [s["W"] for s in states]
        k, status = 0, "max_iter"
        while k < self.K:
            k1 = _window_end(k, self.window, self.K, self.schedule)
            wg = self.build(k, k1, prev)
            dsk = to_dask_graph(wg.nodes, literals)
            last_keys = sorted({kk for keys in wg.last.values() for kk in keys})
            want = [*last_keys, *wg.stats.values(), *wg.evals.values()]
            if scheduler == "sync":
                values = dask.get(dsk, want)
            else:
                values = dask.threaded.get(dsk, want, num_workers=workers)
            got = dict(zip(want, values, strict=True))
            self.tasks_run += len(wg.nodes)
            stop = None
            for kk in range(k + 1, k1 + 1):
                ev = got[wg.evals[kk]] if kk in wg.evals else None
                stop = self.process(kk, got[wg.stats[kk]], ev)
                if stop is not None:
                    k = kk
                    break
            if stop is not None:
                status = stop
                break
            k = k1
            literals = {name: literals[name] for name in self.data_keys().values()}
            for kk in last_keys:
                literals[kk] = got[kk]
            prev = wg.last
        return self.result(status, k, {"tasks_run": self.tasks_run, "scheduler": scheduler})

    # -- distributed -----------------------------------------------------------------------
    def run_distributed(self, states, run_dir: Path | None) -> Result:
        from distributed import get_task_stream, performance_report, wait

        ccfg = self.cfg.cluster
        with connect(ccfg) as client:
            dashboard = client.dashboard_link
            print(f"Dask dashboard: {dashboard}", file=sys.stderr, flush=True)
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            if not workers:
                raise RuntimeError("the Dask cluster has no workers")
            report = (run_dir / "dask-report.html") if run_dir is not None else None
            perf = performance_report(filename=str(report)) if report else \
                contextlib.nullcontext()
            t_start = time.time()
            with perf, get_task_stream(client) as ts:
                status, k = self._pipeline(client, workers, states, wait)
            stream = ts.data
        info = {"dashboard": dashboard, "workers": len(workers),
                **_stream_summary(stream, self.run_id, t_start)}
        if run_dir is not None:
            _write_task_stream(run_dir / "task-stream.json", stream, self.run_id)
            if report is not None and report.exists():
                info["performance_report"] = report.name
        return self.result(status, k, info)

    def _placement(self, workers: list[str]) -> dict[int, str]:
        W = len(workers)
        return {b: workers[(b - 1) * W // self.N] for b in range(1, self.N + 1)}

    def _pipeline(self, client, workers, states, wait):
        place = self._placement(workers)
        dk = self.data_keys()
        ds = self.ds
        futures: dict[str, Any] = {}
        # Big arrays travel once: scattered to where they are used, never embedded in tasks.
        futures[dk["X"]] = futures[dk["X_train"]] = client.scatter(
            ds.X_train, workers=[place[1]], hash=False)
        futures[dk["Y"]] = futures[dk["Y_train"]] = client.scatter(
            ds.Y_train, workers=[place[self.N]], hash=False)
        futures[dk["X_test"]] = client.scatter(ds.X_test, workers=[place[1]], hash=False)
        futures[dk["Y_test"]] = client.scatter(ds.Y_test, workers=[place[self.N]], hash=False)
        for b, kk in enumerate(self.init_keys()[self.splitting.steps[0].name], start=1):
            futures[kk] = client.scatter((states[b - 1], {}), workers=[place[b]], hash=False)
        self.weights = [s["W"] for s in states]
        prev = self.init_keys()
        pending: deque[tuple[int, Any, Any]] = deque()
        submitted, k_done, status = 0, 0, "max_iter"
        all_futures: list[Any] = []
        while k_done < self.K:
            # keep `window` iterations in flight
            while submitted < self.K and submitted - k_done < self.window:
                if submitted > k_done and self.schedule.is_barrier(submitted):
                    break  # the next penalties depend on this iteration's outcome
                wg = self.build(submitted, submitted + 1, prev)
                new = self._submit(client, wg.nodes, futures, place)
                all_futures.extend(new)
                submitted += 1
                kk = submitted
                pending.append((kk, futures[wg.stats[kk]],
                                futures[wg.evals[kk]] if kk in wg.evals else None))
                # drop references the next iteration does not need
                keep = {x for keys in wg.last.values() for x in keys} | set(dk.values())
                for old in [x for x in futures if x not in keep and not x.startswith(
                        ("iteration_stats", "evaluate"))]:
                    del futures[old]
                prev = wg.last
            kk, fstats, fev = pending.popleft()
            it = fstats.result()
            ev = fev.result() if fev is not None else None
            futures.pop(fstats.key, None)
            if fev is not None:
                futures.pop(fev.key, None)
            stop = self.process(kk, it, ev)
            k_done = kk
            if stop is not None:
                status = stop
                break
        # cancel speculative iterations past a stop; release everything
        leftover = [f for _, fs, fe in pending for f in (fs, fe) if f is not None]
        client.cancel(leftover + list(futures.values()), force=True)
        return status, k_done

    def _submit(self, client, nodes: list[Node], futures: dict[str, Any],
                place: dict[int, str]) -> list[Any]:
        out = []
        for node in nodes:
            args = tuple(_resolve(a, futures) for a in node.args)
            workers = [place[node.block]] if node.block is not None else None
            fut = client.submit(node.fn, *args, key=node.key, workers=workers, pure=False,
                                allow_other_workers=False)
            futures[node.key] = fut
            out.append(fut)
        return out


def _resolve(arg: Any, futures: dict[str, Any]) -> Any:
    if isinstance(arg, Ref):
        return futures[arg.key]
    if isinstance(arg, tuple) and any(isinstance(a, Ref) for a in arg):
        return [_resolve(a, futures) for a in arg]
    return arg


def _stream_summary(stream: list[dict], run_id: str, t_start: float) -> dict[str, Any]:
    """Tasks run, and seconds spent computing vs transferring (summed over workers)."""
    compute = transfer = 0.0
    tasks = 0
    for rec in stream:
        if not str(rec.get("key", "")).endswith(run_id):
            continue
        tasks += 1
        for ss in rec.get("startstops", ()):
            dt = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                compute += dt
            elif ss["action"] == "transfer":
                transfer += dt
    return {"tasks_run": tasks, "compute_seconds": compute, "transfer_seconds": transfer}


def _write_task_stream(path: Path, stream: list[dict], run_id: str) -> None:
    rows = []
    for rec in stream:
        k = str(rec.get("key", ""))
        if not k.endswith(run_id):
            continue
        for ss in rec.get("startstops", ()):
            rows.append({"key": k, "worker": rec.get("worker"), "action": ss["action"],
                         "start": ss["start"], "stop": ss["stop"]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)
