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
from .graph import (
    Node,
    Ref,
    build_chunked_window,
    build_window,
    default_window,
    to_dask_graph,
)
from .model import Architecture
from .monitor import Monitor
from .result import Result
from .schedules import PenaltySchedule
from .splitting import BlockSpec, Options, Splitting

__all__ = ["ClusterError", "SharedCluster", "connect", "run_dask"]

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
    import dask
    from distributed import LocalCluster

    env = {k: str(ccfg.blas_threads) for k in
           ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    dash = ccfg.dashboard_address or None
    # Set before the worker processes start (glibc and OpenBLAS read them at start-up).
    # distributed sets MALLOC_TRIM_THRESHOLD_=65536 for its workers, which also pins glibc's
    # mmap threshold at 128 KiB: then every n-sized temporary is a fresh mmap whose pages fault
    # in, and the same block update ran 1.4-1.6x slower in a worker than in the driver
    # (measured). Unset, glibc adapts its thresholds as in any Python process, at the price of
    # keeping some freed memory: with an explicit cluster.memory_limit (out-of-core runs) the
    # workers keep distributed's setting.
    # A nanny also writes its pre-spawn variables into this process's environment, so an
    # earlier cluster in this process leaves distributed's value behind: drop that one too.
    trim = "MALLOC_TRIM_THRESHOLD_"
    spawn = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()}
    if ccfg.memory_limit in ("auto", None):
        inherited = os.environ.get(trim)
        default = dask.config.get(f"distributed.nanny.pre-spawn-environ.{trim}", None)
        if inherited is not None and inherited == str(default):
            del os.environ[trim]
        spawn[f"distributed.nanny.pre-spawn-environ.{trim}"] = None
    with dask.config.set(spawn):
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


def _setup(cfg: Config, arch: Architecture, ds: Dataset, options: Options):
    """What every Dask engine starts from: n, the block specs, the window, a fresh run id."""
    n = ds.X_train.shape[1]
    specs = [BlockSpec(arch, i, n, options) for i in range(1, arch.depth + 1)]
    return n, specs, cfg.run.window or default_window(arch.depth), uuid.uuid4().hex[:8]


def run_dask(cfg: Config, splitting: Splitting, arch: Architecture, ds: Dataset,
             weights0: list[np.ndarray], schedule: PenaltySchedule, monitor: Monitor,
             options: Options, run_dir: Path | None = None) -> Result:
    """Run the ADMM iterations on the configured Dask scheduler."""
    from .reference import initial_objective

    n, specs, window, run_id = _setup(cfg, arch, ds, options)
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
                "steady_seconds_per_iteration": self.monitor.steady_seconds_per_iteration(),
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
        from distributed import wait

        status, k, info = self.on_cluster(
            lambda client, workers: self._pipeline(client, workers, states, wait), run_dir)
        return self.result(status, k, info)

    def on_cluster(self, pipeline, run_dir: Path | None):
        """Connect, announce the dashboard, run ``pipeline(client, workers) -> (status, k)``
        under a performance report and a task-stream recorder, and save both into the run
        directory. Returns ``(status, k, info)``."""
        from distributed import KilledWorker, get_task_stream, performance_report
        from distributed.client import FutureCancelledError

        with connect(self.cfg.cluster) as client:
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
                try:
                    status, k = pipeline(client, workers)
                except (FutureCancelledError, KilledWorker) as exc:
                    raise ClusterError(_lost_worker_message(self.cfg, exc)) from exc
            stream = ts.data
        info = {"dashboard": dashboard, "workers": len(workers),
                **_stream_summary(stream, self.run_id, t_start)}
        if run_dir is not None:
            _write_task_stream(run_dir / "task-stream.json", stream, self.run_id)
            if report is not None and report.exists():
                info["performance_report"] = report.name
        return status, k, info

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
        while k_done < self.K:
            # keep `window` iterations in flight
            while submitted < self.K and submitted - k_done < self.window:
                if submitted > k_done and self.schedule.is_barrier(submitted):
                    break  # the next penalties depend on this iteration's outcome
                wg = self.build(submitted, submitted + 1, prev)
                self._submit(client, wg.nodes, futures, place)
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
        # Release everything (speculative iterations past a stop included): the scheduler
        # forgets tasks nobody wants. (A forced cancel trips an assertion in distributed.)
        pending.clear()
        futures.clear()
        return status, k_done

    def _submit(self, client, nodes: list[Node], futures: dict[str, Any],
                place: dict[int, str]) -> None:
        """Submit ``nodes``; their futures go into ``futures`` (the caller drops what later
        iterations no longer need, so the cluster can release old states)."""
        for node in nodes:
            args = tuple(_resolve(a, futures) for a in node.args)
            workers = [place[node.block]] if node.block is not None else None
            fut = client.submit(_call_aligned, node.fn, *args, key=node.key, workers=workers,
                                pure=False, allow_other_workers=False)
            futures[node.key] = fut


def _aligned(x: Any) -> Any:
    """``x`` with every array in it (through dicts, lists, tuples) memory-aligned."""
    if isinstance(x, np.ndarray):
        return x if x.flags.aligned else x.copy()
    if isinstance(x, dict):
        return {k: _aligned(v) for k, v in x.items()}
    if type(x) in (list, tuple):
        return type(x)(_aligned(v) for v in x)
    return x


def _call_aligned(fn, *args):
    """Run a task on aligned inputs. A worker deserialises arrays in place in its network
    frames, at any byte offset; numpy does not hand unaligned arrays to BLAS but multiplies them
    with its own loop, which rounds differently. Copying those (rare, cheap next to the task)
    keeps every scheduler bit-for-bit equal to the serial reference."""
    return fn(*[_aligned(a) for a in args])


class ClusterError(RuntimeError):
    """The Dask cluster lost work mid-run (a worker died). One line, names what to do."""


def _lost_worker_message(cfg: Config, exc: BaseException) -> str:
    hint = "raise cluster.memory_limit or lower storage.chunk_size"
    if cfg.run.checkpoint_every and cfg.storage.url:
        hint += f"; continue from the last checkpoint with run.resume=true " \
                f"storage.url={cfg.storage.url}"
    return (f"a Dask worker was lost mid-run (killed for memory or crashed; "
            f"{type(exc).__name__}): {hint}")


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


# =============================================================================================
# Zarr-resident state: one task per (block, chunk); checkpoints and resume
# =============================================================================================



def store_url(cfg: Config, run_dir: Path | None) -> str:
    if cfg.storage.url:
        return cfg.storage.url
    if run_dir is None:
        return f"memory://daskadmm-{uuid.uuid4().hex}"
    return str(run_dir / "state.zarr")


def _store_meta(cfg: Config, arch: Architecture, n: int, slices) -> dict[str, Any]:
    from dataclasses import asdict

    from .storage import _jsonable

    return {"config": _jsonable(cfg.to_dict()), "algorithm": cfg.algorithm.name,
            "arch": asdict(arch), "n": n, "chunk_size": cfg.storage.chunk_size,
            "n_chunks": len(slices)}


def run_zarr(cfg: Config, splitting: Splitting, arch: Architecture, ds: Dataset,
             weights0: list[np.ndarray], schedule: PenaltySchedule, monitor: Monitor,
             options: Options, run_dir: Path | None = None) -> Result:
    """Run RADMM-3/3L, pdADMM or dlADMM with every sample-sized variable in a chunked Zarr
    store (see :mod:`.chunked` and :mod:`.chunked_mlp`)."""
    from . import chunked, chunked_mlp
    from .storage import StateStore, StoreError, chunk_slices

    n, specs, window, run_id = _setup(cfg, arch, ds, options)
    url = store_url(cfg, run_dir)
    slices = chunk_slices(n, cfg.storage.chunk_size)
    test_slices = chunk_slices(ds.X_test.shape[1], cfg.storage.chunk_size)
    mlp = splitting.name in chunked_mlp.ALGORITHMS
    lay = chunked_mlp.layout(splitting.name, arch) if mlp else chunked.layout(arch)
    meta = _store_meta(cfg, arch, n, slices)
    if cfg.run.resume:
        store = StateStore.open(url, owner=run_id)
        attrs = store.attrs
        for keyname in ("algorithm", "arch", "n", "n_chunks"):
            if attrs.get(keyname) != meta[keyname]:
                store.release(attrs.get("status", "stopped"))
                raise StoreError(f"cannot resume {url}: its {keyname} "
                                 f"({attrs.get(keyname)}) differs from this run's "
                                 f"({meta[keyname]})")
    else:
        store = StateStore.create(url, meta=meta, owner=run_id)
        store.write_data({"X": ds.X_train, "Y": ds.Y_train, "X_test": ds.X_test,
                          "Y_test": ds.Y_test}, cfg.storage.chunk_size, cfg.storage.compressor)
        store.create_state(lay, n, cfg.storage.chunk_size, cfg.storage.compressor,
                           chunked_mlp.slots(splitting.name) if mlp else 2)
    metric = "accuracy" if ds.task == "classification" else "mse"
    ctx = (_MlpZarrCtx if mlp else _ZarrCtx)(cfg, splitting, arch, ds, specs, schedule, monitor,
                                             window, run_id, metric)
    ctx.url, ctx.store, ctx.slices, ctx.test_slices, ctx.layout = url, store, slices, \
        test_slices, lay
    ctx.linearized = splitting.name == "radmm3l"
    status = "failed"
    ok = False
    try:
        if cfg.cluster.kind in ("synchronous", "threads"):
            result = ctx.run_local(weights0)
        else:
            result = ctx.run_distributed_zarr(weights0, run_dir)
        status = result.status
        from .storage import dataset_meta

        store.save_model(arch, result.weights, task=ds.task, metric=metric, **dataset_meta(ds))
        result.info["store"] = url
        ok = True
        return result
    finally:
        store.release(status)
        if not ok and not cfg.run.resume and not cfg.storage.url and \
                not (store.checkpoint() or {}).get("iteration"):
            # a run that failed before its first checkpoint leaves no half-written default store
            import shutil

            shutil.rmtree(url, ignore_errors=True)


class _ZarrCtx(_Ctx):
    url: str
    linearized: bool

    # -- start: fresh (forward pass per chunk) or resumed (copy the checkpoint back) -------
    def start_nodes(self, weights0: list[np.ndarray]) -> tuple[list[Node], dict[str, Any],
                                                                dict[str, str], int]:
        """Nodes and literal values that bring the store to iteration k0; returns
        (nodes, literals, prev roles, k0)."""
        from . import chunked

        rid, N = self.run_id, self.N
        nodes: list[Node] = []
        literals: dict[str, Any] = {}
        if self.cfg.run.resume:
            k0, states = self.store.read_checkpoint_states(
                [{"W": v["W"]} for v in self.layout])
            weights = [s["W"] for s in states]
            cp = self.store.checkpoint()
            self._restore_monitor()
            slot = k0 % 2
            for c, sl in enumerate(self.slices):
                for i in range(1, N + 1):
                    names = tuple(v for v in ("U", "Lam", "V") if v in self.layout[i - 1])
                    nodes.append(Node(f"restore_chunk-b{i}-c{c}-{rid}", chunked.restore_chunk,
                                      (chunked.ChunkTask(self.url, sl, c), i, names, slot,
                                       cp["slot"]), block=i))
            start = {(i, c): f"restore_chunk-b{i}-c{c}-{rid}" for i in range(1, N + 1)
                     for c in range(len(self.slices))}
        else:
            k0, weights = 0, weights0
            for c, sl in enumerate(self.slices):
                nodes.append(Node(f"init_chunk-c{c}-{rid}", chunked.init_chunk,
                                  (chunked.ChunkTask(self.url, sl, c), self.arch, weights0,
                                   self.n)))
            start = {(i, c): f"init_chunk-c{c}-{rid}" for i in range(1, N + 1)
                     for c in range(len(self.slices))}
        prev: dict[str, str] = {}
        for i in range(1, N + 1):
            literals[f"init_weights-b{i}-{rid}"] = weights[i - 1]
            prev[f"W-b{i}"] = f"init_weights-b{i}-{rid}"
            for c in range(len(self.slices)):
                prev[f"chunk-b{i}-c{c}"] = start[(i, c)]
        for c, sl in enumerate(self.slices):
            deps = [Ref(start[(i, c)]) for i in (1,)]
            kk = f"init_partials-c{c}-{rid}"
            nodes.append(Node(kk, _after, (chunked.init_partials,
                                           (chunked.ChunkTask(self.url, sl, c), self.arch.bias,
                                            k0 % 2), *deps), block=1))
            prev[f"first-c{c}"] = kk
        nodes.append(Node(f"gram_x-{rid}", chunked.gram_of,
                          tuple(Ref(prev[f"first-c{c}"]) for c in range(len(self.slices))),
                          block=1))
        prev["gram_x"] = f"gram_x-{rid}"
        prev["first_kind"] = "init"
        self.k0 = k0
        self.weights = weights
        return nodes, literals, prev, k0

    def _restore_monitor(self) -> None:
        attrs = self.store.attrs
        hist = attrs.get("history") or []
        mon = self.monitor
        mon.history = [dict(r) for r in hist]
        for r in mon.history:
            for kk, v in r.items():
                if v is None:
                    r[kk] = float("nan")
        if mon.history:
            mon.objective0 = mon.history[0]["objective"]
            mon._last_objective = mon.history[-1]["objective"]
            mon._last_params = (mon.history[-1]["rho"], mon.history[-1]["beta"])
        if mon.callback is not None:
            for r in mon.history:
                mon.callback(r)
        sched = attrs.get("schedule") or {}
        s = self.schedule
        if sched:
            s._rho, s._beta = sched["rho"], sched["beta"]
            s._primal = {int(k): v for k, v in sched.get("primal", {}).items()}
            s.changes = [tuple(x) for x in sched.get("changes", [])]

    def _schedule_state(self) -> dict[str, Any]:
        s = self.schedule
        return {"rho": s._rho, "beta": s._beta,
                "primal": {str(k): v for k, v in s._primal.items()},
                "changes": [list(x) for x in s.changes]}

    def ckpt_plan(self, k0: int, k1: int) -> dict[int, str]:
        every = self.cfg.run.checkpoint_every
        plan = {}
        for k in range(k0 + 1, k1 + 1):
            if every and k % every == 0:
                plan[k] = self._next_slot
                self._next_slot = "b" if self._next_slot == "a" else "a"
        return plan

    def build_z(self, k0: int, k1: int, prev: dict[str, str]):
        return build_chunked_window(
            self.specs, _pens(self.schedule, k0, k1), k0, k1, prev, self.run_id, self.url,
            self.slices, self.linearized, self.eval_iters(k0, k1),
            (self.arch, self.ds.task, self.metric, tuple(self.slices),
             tuple(self.test_slices)), self.ckpt_plan(k0, k1))

    def commit(self, k: int, slot: str, weights: list[np.ndarray]) -> None:
        for i, W in enumerate(weights, start=1):
            self.store.write(f"ckpt/{slot}/b{i}/W", W)
        self.store.commit_checkpoint(k, slot, self.monitor.history, self._schedule_state())

    def initial_record(self, init_outs: list[dict]) -> None:
        if self.cfg.run.resume:
            return
        obj = sum(o["objective"] for o in init_outs)
        lam = self.schedule.at(1).lam
        obj += sum(0.5 * lam * float(np.sum(W * W)) for W in self.weights)
        pen = self.schedule.at(1)
        self.monitor.start(obj, self.weights, pen.rho, pen.beta)

    # -- synchronous / threaded ------------------------------------------------------------
    def run_local(self, weights0) -> Result:
        import dask
        import dask.threaded

        scheduler = "sync" if self.cfg.cluster.kind == "synchronous" else "threads"
        workers = self.cfg.cluster.n_workers * self.cfg.cluster.threads_per_worker

        def get(dsk, keys):
            if scheduler == "sync":
                return dask.get(dsk, keys)
            return dask.threaded.get(dsk, keys, num_workers=workers)

        self._next_slot = self.store.next_checkpoint_slot()
        nodes, literals, prev, k = self.start_nodes(weights0)
        init_keys = [n.key for n in nodes if n.key.startswith("init_chunk")]
        carry = [v for r, v in prev.items() if r != "first_kind"]
        vals = get(to_dask_graph(nodes, literals), [*init_keys, *carry])
        got = dict(zip([*init_keys, *carry], vals, strict=True))
        self.initial_record([got[x] for x in init_keys])
        literals = {x: got[x] for x in carry}
        self.tasks_run += len(nodes)
        status = "max_iter"
        while k < self.K:
            k1 = _window_end(k, self.window, self.K, self.schedule)
            wg = self.build_z(k, k1, prev)
            carry = sorted({v for r, v in wg.last.items() if r != "first_kind"})
            want = [*carry, *wg.stats.values(), *wg.evals.values(),
                    *{w for kk in wg.checkpoints for w in wg.weights[kk]}]
            vals = get(to_dask_graph(wg.nodes, literals), want)
            got = dict(zip(want, vals, strict=True))
            self.tasks_run += len(wg.nodes)
            stop = None
            for kk in range(k + 1, k1 + 1):
                ev = got[wg.evals[kk]] if kk in wg.evals else None
                stop = self.process(kk, got[wg.stats[kk]], ev)
                if kk in wg.checkpoints:
                    slot = self.ckpt_slot_of(wg, kk)
                    self.commit(kk, slot, [got[w] for w in wg.weights[kk]])
                if stop is not None:
                    k = kk
                    break
            if stop is not None:
                status = stop
                break
            k = k1
            literals = {x: got[x] for x in carry}
            prev = wg.last
        return self.result(status, k, {"tasks_run": self.tasks_run, "scheduler": scheduler,
                                       "engine": "dask-zarr", "chunks": len(self.slices),
                                       "resumed_from": self.k0 if self.cfg.run.resume else None})

    @staticmethod
    def ckpt_slot_of(wg, k: int) -> str:
        node = next(n for n in wg.nodes if n.key == wg.checkpoints[k][0])
        return node.args[4]

    # -- distributed -----------------------------------------------------------------------
    def run_distributed_zarr(self, weights0, run_dir: Path | None) -> Result:
        if self.url.startswith("memory://"):
            from .storage import StoreError

            raise StoreError(f"storage.url={self.url} lives in one process: use a path or a "
                             "shared fsspec URL with a distributed cluster")
        status, k, info = self.on_cluster(
            lambda client, workers: self._pipeline_z(client, workers, weights0), run_dir)
        info.update({"engine": "dask-zarr", "chunks": len(self.slices),
                     "resumed_from": self.k0 if self.cfg.run.resume else None})
        return self.result(status, k, info)

    def _pipeline_z(self, client, workers, weights0):
        place = self._placement(workers)
        self._next_slot = self.store.next_checkpoint_slot()
        nodes, literals, prev, k0 = self.start_nodes(weights0)
        futures: dict[str, Any] = {}
        for name, value in literals.items():
            b = int(name.split("-b")[1].split("-")[0])
            # in a list: scatter would split a dict (a small state) into one future per entry
            futures[name] = client.scatter([value], workers=[place[b]], hash=False)[0]
        self._submit(client, nodes, futures, place)
        init = [futures[n.key] for n in nodes if n.key.startswith("init_chunk")]
        self.initial_record(client.gather(init))
        pending: deque = deque()
        held: dict[int, tuple[list[Any], list[Any], str]] = {}
        submitted, k_done, status = k0, k0, "max_iter"
        while k_done < self.K:
            while submitted < self.K and submitted - k_done < self.window:
                if submitted > k_done and self.schedule.is_barrier(submitted):
                    break
                wg = self.build_z(submitted, submitted + 1, prev)
                self._submit(client, wg.nodes, futures, place)
                submitted += 1
                kk = submitted
                if kk in wg.checkpoints:
                    held[kk] = ([futures[x] for x in wg.checkpoints[kk]],
                                [futures[x] for x in wg.weights[kk]],
                                self.ckpt_slot_of(wg, kk))
                pending.append((kk, futures[wg.stats[kk]],
                                futures[wg.evals[kk]] if kk in wg.evals else None))
                keep = {v for r, v in wg.last.items() if r != "first_kind"}
                for old in [x for x in futures if x not in keep]:
                    del futures[old]
                prev = wg.last
            kk, fstats, fev = pending.popleft()
            it = fstats.result()
            ev = fev.result() if fev is not None else None
            stop = self.process(kk, it, ev)
            if kk in held:
                cks, wfs, slot = held.pop(kk)
                client.gather(cks)
                self.commit(kk, slot, client.gather(wfs))
            k_done = kk
            if stop is not None:
                status = stop
                break
        pending.clear()
        futures.clear()
        held.clear()
        return status, k_done


class _MlpZarrCtx(_ZarrCtx):
    """pdADMM and dlADMM on the Zarr-resident engine: the same drivers, their own graph."""

    def start_nodes(self, weights0: list[np.ndarray]) -> tuple[list[Node], dict[str, Any],
                                                                dict[str, str], int]:
        from . import chunked_mlp

        name, rid = self.splitting.name, self.run_id
        restore = None
        if self.cfg.run.resume:
            k0, states = self.store.read_checkpoint_states(
                [{"W": v["W"]} for v in self.layout])
            cp = self.store.checkpoint()
            small = [{**sc, "W": st["W"]} for sc, st in zip(cp["small"], states, strict=True)]
            self._restore_monitor()
            restore = (k0, cp["slot"])
        else:
            k0, small = 0, chunked_mlp.init_small(name, self.arch, weights0)
        nodes, prev, _ = chunked_mlp.start_nodes(name, self.arch, self.url, self.slices, rid,
                                                 [s["W"] for s in small], self.n, restore)
        literals: dict[str, Any] = {}
        for i, sm in enumerate(small, start=1):
            literals[f"init_small-b{i}-{rid}"] = sm
            prev[f"small-b{i}"] = f"init_small-b{i}-{rid}"
        self.k0 = k0
        self.weights = [s["W"] for s in small]
        return nodes, literals, prev, k0

    def build_z(self, k0: int, k1: int, prev: dict[str, str]):
        from . import chunked_mlp

        return chunked_mlp.build_window(
            self.splitting.name, self.specs, _pens(self.schedule, k0, k1), k0, k1, prev,
            self.run_id, self.url, self.slices, self.eval_iters(k0, k1),
            (self.arch, self.ds.task, self.metric, tuple(self.slices), tuple(self.test_slices)),
            self.ckpt_plan(k0, k1))

    def commit(self, k: int, slot: str, smalls: list[dict]) -> None:
        scalars = []
        for i, sm in enumerate(smalls, start=1):
            self.store.write(f"ckpt/{slot}/b{i}/W", sm["W"])
            scalars.append({x: float(v) for x, v in sm.items()
                            if x not in ("W", "step", "capped", "k", "lam")})
        self.store.commit_checkpoint(k, slot, self.monitor.history, self._schedule_state(),
                                     small=scalars)


def _after(fn, args: tuple, *order):
    """Run ``fn(*args)`` once the tasks in ``order`` are done (their values are unused)."""
    return fn(*args)

