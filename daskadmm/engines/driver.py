"""Run ADMM on Dask: windows of iterations as task graphs, pipelined across iterations.

Cluster choices (``cluster.kind``):

- ``synchronous``: Dask's single-threaded scheduler (debugging);
- ``threads``: the threaded scheduler in this process;
- ``local`` (default): a ``LocalCluster`` of worker processes with the dashboard on 127.0.0.1
  (a small problem runs on the threaded scheduler instead: :func:`.cluster.in_process_reason`);
- ``address``: an existing cluster at ``cluster.address`` (nothing is started).

On a distributed cluster (``local``/``address``) the runner submits each iteration's tasks as
futures without waiting for the previous iteration, keeping ``run.window`` iterations in flight,
and reads each iteration's statistics as it completes, so the scheduler runs a wavefront across
blocks and iterations. Block b is pinned to worker ``(b-1) * workers // N`` (contiguous ranges),
so neighbour data crosses workers only at range boundaries; with the state in Zarr chunks and
at least one chunk per worker, the chunk tasks are pinned by chunk instead (:class:`Placement`,
``cluster.placement``). The synchronous and threaded
schedulers have no futures: the same driver loop hands them the tasks of ``run.window``
iterations, which run as one dict graph when the first of their results is asked for
(:class:`.executors._LocalExecutor`; on a cluster, :class:`.executors._ClusterExecutor`).

Both state backends run the same tasks from one graph builder (:mod:`daskadmm.graph.chunked`)
and one driver (:meth:`_Ctx._attempt`): ``storage.state=zarr`` keeps every sample-sized
variable in a chunked Zarr store (checkpoints, resume); ``storage.state=memory`` is the same
plan with one chunk on the dataflow backend, whose tasks get what they read as inputs. With one
chunk the iterates are the serial reference's bits; other chunkings change only the order of
the W statistics' sums. Global decisions (stopping, adaptive penalties) are taken at evaluation
points; iterations submitted speculatively past a stop are cancelled and discarded.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ADMM_ALGORITHMS
from ..data import Dataset, lazy_arrays
from ..engine_options import EngineOptions
from ..errors import ClusterError
from ..graph import Node, default_window
from ..model import Architecture
from ..monitor import Monitor
from ..result import Result
from ..schedules import PenaltySchedule, RestartGuard
from ..splitting import BlockSpec, Options
from ..splitting.base import restarts_after
from ..storage import StoreError, StoreRef

if TYPE_CHECKING:
    from ..algorithms import Algorithm
    from ..storage import StateStore

from .cluster import client_is_local, connect, resolve_client, say
from .executors import (
    MAX_RECOVERIES,
    _call_aligned,
    _ClusterExecutor,
    _decode_array,
    _encode_array,
    _executing_on_workers,
    _Executor,
    _LocalExecutor,
    _lost_scheduler_message,
    _lost_worker_message,
    _optional,
    _resolve,
    _scheduler_lost,
    _stream_summary,
    _tasks_alive,
    _tasks_wanted,
    _wait_for_workers,
    _worker_ids,
    _WorkerLost,
    _write_task_stream,
)

__all__ = ["preflight_store", "run_dask", "run_zarr", "store_url"]

log = logging.getLogger(__name__)

def _pens(schedule: PenaltySchedule, k0: int, k1: int):
    """The penalties of iterations k0+1..k1, and of k1+1 unless they depend on how k1 ends."""
    out = {k: schedule.at(k) for k in range(k0 + 1, k1 + 1)}
    if not schedule.is_barrier(k1):
        out[k1 + 1] = schedule.at(k1 + 1)
    return out


def auto_window(opts: EngineOptions, depth: int) -> int:
    """``run.window`` when 0: :func:`~daskadmm.graph.default_window` (enough iterations in
    flight for the wavefront to fill), except where tasks run one at a time (the synchronous
    scheduler, or one thread): there a window only keeps more iterations' values alive (on
    the state-in-memory backend a dlADMM run held twice the memory and took 1.4x as long at
    window 4 as at 1, measured), so one iteration at a time."""
    if opts.window:
        return opts.window
    c = opts.cluster
    if c.kind == "synchronous" or (c.kind == "threads" and c.threads == 1):
        return 1
    return default_window(depth)


def _setup(opts: EngineOptions, arch: Architecture, ds: Dataset, options: Options):
    """What every Dask engine starts from: n, the block specs, the window, a fresh run id."""
    n = ds.X_train.shape[1]
    specs = [BlockSpec(arch, i, n, options) for i in range(1, arch.depth + 1)]
    return n, specs, auto_window(opts, arch.depth), uuid.uuid4().hex[:8]


def run_dask(opts: EngineOptions, algorithm: Algorithm, arch: Architecture, ds: Dataset,
             weights0: list[np.ndarray], schedule: PenaltySchedule, monitor: Monitor,
             options: Options, run_dir: Path | None = None, client=None) -> Result:
    """Run the ADMM iterations on the configured Dask scheduler with the state in worker
    memory (``client``: an existing distributed client to run on instead of starting a
    cluster): the chunked engine's tasks with one chunk on the dataflow backend (each task
    gets what it reads from the task that wrote it; no store)."""
    n, specs, window, run_id = _setup(opts, arch, ds, options)
    metric = "accuracy" if ds.task == "classification" else "mse"
    ctx = _Ctx(opts, algorithm, arch, ds, specs, schedule, monitor, window, run_id, metric)
    ctx.flow = True
    ctx.url, ctx.task_url, ctx._store = "", None, None
    n_test = ds.X_test.shape[1]
    ctx.slices, ctx.test_slices = [slice(0, n)], ([slice(0, n_test)] if n_test else [])
    ctx.layout = algorithm.plan.layout(arch)
    ctx.manifest, ctx.ck_layout, ctx.resumed_from = None, [], None
    ctx.client = resolve_client(opts.cluster, client)
    if ctx.client is None and opts.cluster.kind in ("synchronous", "threads"):
        return ctx.run_local(weights0)
    return ctx.run_distributed(weights0, run_dir)


@dataclass(frozen=True)
class Placement:
    """Where a run's tasks run on a cluster. By block (``cluster.placement=blocks``): every
    task of block b on ``blocks[b]``, blocks in contiguous ranges of the workers, so
    neighbour data crosses workers only at range boundaries; a block's cost is then one
    worker's, and blocks of unequal cost (the input and output blocks are cheaper than the
    residual ones) leave a worker idle part of each iteration. By chunk (``chunks`` given):
    the per-chunk tasks of every block on ``chunks[c]`` instead, so each worker does its share
    of every block and the load is even; the small per-block tasks (W steps, statistics) stay
    on ``blocks[b]`` (``W_{b+1}``'s step, the root of block b's reduction, too: a node's
    ``block`` says where it runs), and the chunks go through the shared store. The iterates
    do not depend on placement."""

    blocks: dict[int, str]
    chunks: dict[int, str] | None = None

    def of(self, node: Node) -> list[str] | None:
        """The worker ``node`` is pinned to (None: any)."""
        if self.chunks is not None and node.chunk is not None:
            return [self.chunks[node.chunk]]
        return None if node.block is None else [self.blocks[node.block]]


class _Ctx:
    """One run on Dask: the one driver of every algorithm and both state backends (a Zarr store,
    or the dataflow backend: no store, the state in the task outputs). It builds a window of
    iterations with :mod:`daskadmm.graph.chunked`, runs it on the synchronous or threaded scheduler
    (:meth:`run_local`) or submits it iteration by iteration to a distributed cluster
    (:meth:`run_distributed`), feeds the statistics to the monitor, stops, checkpoints and
    recovers from lost workers."""

    # set by run_dask / run_zarr after construction (the store is opened after the run's
    # inputs are checked)
    url: str
    task_url: StoreRef | None  # what the tasks name the store by
    _store: StateStore | None
    slices: list[slice]
    test_slices: list[slice]
    layout: list[dict[str, tuple]]
    ck_layout: list[dict[str, tuple]]
    resumed_from: int | None
    flow = False  # the dataflow backend (run_dask): no store, the state in task outputs

    def __init__(self, opts: EngineOptions, algorithm, arch, ds, specs, schedule, monitor,
                 window, run_id, metric):
        self.opts, self.algorithm, self.arch, self.ds = opts, algorithm, arch, ds
        self.specs, self.schedule, self.monitor = specs, schedule, monitor
        self.window, self.run_id, self.metric = window, run_id, metric
        self.K = opts.iterations
        self.N = arch.depth
        self.n = ds.X_train.shape[1]
        self.tasks_run = 0
        self.recoveries = 0
        # RADMM-3A's restart guard (None: off): its accepted point, restored on resume
        self.guard = RestartGuard() if specs[0].options.restart_guard else None
        self.client = None  # the caller's distributed client, if the run uses one
        self._replayed = False  # the restored history was reported to the callback

    @property
    def store(self) -> StateStore:
        """The run's Zarr store (the dataflow backend has none)."""
        assert self._store is not None, "the dataflow backend has no store"
        return self._store

    def eval_iters(self, k0: int, k1: int) -> list[int]:
        return [k for k in range(k0 + 1, k1 + 1) if self.monitor.is_eval(k)]

    def process(self, k: int, it, ev) -> str | None:
        """Feed iteration k's statistics (and evaluation) to the monitor; return a stop status."""
        pen = self.schedule.at(k)
        self.monitor.step(k, it, pen.rho, pen.beta)
        if ev is None:
            self.schedule.observe(k, it.primal)
            return None
        rec_metrics, weights = ev
        self.weights = weights
        rec = self.monitor.record(k, it, weights, pen.rho, pen.beta, rec_metrics)
        self.schedule.observe(k, it.primal, rec.get("train_loss"))
        return self.monitor.check(rec)

    def result(self, status: str, k: int, info: dict[str, Any]) -> Result:
        info = {"engine": "dask", "cluster": self.opts.cluster.kind, "window": self.window,
                "run_id": self.run_id, "objective_increases": len(self.monitor.increases),
                "steady_seconds_per_iteration": self.monitor.steady_seconds_per_iteration(),
                "inner_solver_caps_hit": self.monitor.capped_total,
                "schedule_changes": self.schedule.changes,
                **({"restart_guard": self.guard.info()} if self.guard is not None else {}),
                **info}
        return Result(status=status, message=self.monitor.message(status, k), iterations=k,
                      weights=self.weights, arch=self.arch, metric=self.metric,
                      history=self.monitor.history, wall_time=self.monitor.elapsed(), info=info)

    def _check_workers(self, client) -> None:
        """Raise :class:`.executors._WorkerLost` if a worker this attempt started with is gone."""
        try:
            now = set(client.run_on_scheduler(_worker_ids).items())
        except Exception as exc:
            raise ConnectionError(f"lost the Dask scheduler ({type(exc).__name__})") from None
        gone = self._workers0 - now
        if gone:
            raise _WorkerLost(f"{len(gone)} of {len(self._workers0)} workers gone")

    def _result(self, client, fut):
        """``fut.result()``, watching for lost workers (distributed would silently recompute
        lost tasks, and a chunk task re-run after its input slot was overwritten is wrong).

        The fetch runs in a helper thread and this one polls the worker set until it ends: the
        task finishing is not the end of the wait, since the gather that follows hangs for good
        if the worker holding the result dies first (distributed reschedules the task onto its
        pinned, dead worker). Not ``result(timeout=...)`` either: an asyncio timeout racing the
        result can surface as ``CancelledError``. When the wait ends by an exception (a lost
        worker, the scheduler gone, Ctrl-C) the future is cancelled, which ends the fetch too:
        a caller's client stays open after the run, and the fetch would wait on it for good."""
        import asyncio
        import threading

        from distributed import KilledWorker
        from distributed.client import FutureCancelledError

        box: dict[str, Any] = {}
        got = threading.Event()

        def fetch() -> None:
            try:
                box["value"] = fut.result()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                got.set()

        threading.Thread(target=fetch, name="daskadmm-fetch", daemon=True).start()
        try:
            while not got.wait(0.5):
                self._check_workers(client)
        except BaseException:
            # the run leaves (a lost worker, the scheduler gone, Ctrl-C): release the fetch
            # (a caller's client stays open, so it would wait for good) and the key
            with contextlib.suppress(Exception):
                client.cancel([fut])
            raise
        if "value" in box:
            return box["value"]
        try:
            raise box["error"]
        except (KilledWorker, FutureCancelledError, asyncio.CancelledError) as exc:
            if _scheduler_lost(client, exc):
                raise ConnectionError(f"lost the Dask scheduler ({type(exc).__name__})") \
                    from None
            raise _WorkerLost(type(exc).__name__) from None
        except Exception:
            # a task error after a worker loss (e.g. a checkpoint task that refused to
            # overwrite a committed slot when it was re-run) is the loss, not a bug
            self._check_workers(client)
            raise

    def _wait_for_workers(self, client, want: int) -> list[str]:
        try:
            return _wait_for_workers(client, want)
        except ClusterError:
            raise
        except Exception as exc:
            raise ClusterError(_lost_scheduler_message(self.opts, exc)) from None

    def _quiesce(self, client, timeout: float = 300.0) -> None:
        """Cancel what this client still wants of the abandoned attempt and wait until none
        of its tasks can still run (and write to the store)."""
        import gc

        from distributed import Future

        gc.collect()  # drop futures still referenced by the abandoned attempt's frames
        rid = self.run_id
        deadline = time.time() + timeout
        while True:
            try:
                wanted = client.run_on_scheduler(_tasks_wanted, rid, client.id)
                if wanted:
                    client.cancel([Future(key, client) for key in wanted])
                busy = client.run_on_scheduler(_tasks_alive, rid)
                # a cancelled task that a worker thread is executing runs to its end (threads
                # cannot be stopped) and may still write: wait for those too
                busy += _executing_on_workers(client, rid)
            except ClusterError:
                raise
            except Exception as exc:  # the scheduler went too (or first)
                raise ClusterError(_lost_scheduler_message(self.opts, exc)) from None
            if not busy:
                return
            if time.time() > deadline:
                raise ClusterError(f"{busy} tasks of the abandoned attempt were still running "
                                   f"after {timeout:.0f} s: giving up")
            time.sleep(0.2)

    def on_cluster(self, pipeline, run_dir: Path | None):
        """Connect, announce the dashboard, run ``pipeline(client, workers) -> (status, k)``
        under a performance report and a task-stream recorder, and save both into the run
        directory. Returns ``(status, k, info)``. The report and the task stream are optional
        artefacts: a failure of either is a logged warning, never the run's end."""
        from distributed import KilledWorker, get_task_stream, performance_report
        from distributed.client import FutureCancelledError

        with connect(self.opts.cluster, self.client) as client:
            dashboard = client.dashboard_link
            say(f"Dask dashboard: {dashboard}")
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            report = (run_dir / "dask-report.html") if run_dir is not None else None
            # inline: the report embeds Bokeh's JavaScript, so it renders with no network
            perf = _optional(performance_report(filename=str(report), mode="inline"),
                             "performance report") if report else None
            ts_cm = _optional(get_task_stream(client), "task stream")
            failed = True
            try:
                status, k = pipeline(client, workers)
                failed = False
            except ClusterError:
                raise
            except (FutureCancelledError, KilledWorker) as exc:
                if _scheduler_lost(client, exc):
                    raise ClusterError(_lost_scheduler_message(self.opts, exc)) from None
                raise ClusterError(_lost_worker_message(self.opts, exc)) from None
            except Exception as exc:
                if _scheduler_lost(client, exc):
                    raise ClusterError(_lost_scheduler_message(self.opts, exc)) from None
                raise
            finally:
                if perf is not None:
                    perf.close(quiet=failed)
                ts_cm.close(quiet=failed)
            stream = ts_cm.value.data if ts_cm.value is not None else []
        info = {"dashboard": dashboard, "workers": len(workers),
                "placement": "chunks" if self.by_chunk(len(workers)) else "blocks",
                **_stream_summary(stream, self.run_ids(), len(workers))}
        if run_dir is not None:
            try:
                from ..outputs import STREAM_FILE

                _write_task_stream(run_dir / STREAM_FILE, stream, self.run_ids())
            except OSError as exc:
                log.warning("could not write the task stream: %s", exc)
            if report is not None and report.exists():
                info["performance_report"] = report.name
        return status, k, info

    def run_ids(self) -> tuple[str, ...]:
        """Every run id this run's task keys end with (a recovery starts a new one)."""
        return (self.run_id, *getattr(self, "old_run_ids", ()))

    def _placement(self, workers: list[str]) -> Placement:
        """Where each task runs (see :class:`Placement`): block b on worker
        ``(b-1) * W // N``; with placement by chunks, chunk c of every block on worker
        ``c * W // C``."""
        W = len(workers)
        blocks = {b: workers[(b - 1) * W // self.N] for b in range(1, self.N + 1)}
        if not self.by_chunk(W):
            return Placement(blocks)
        C = len(self.slices)
        return Placement(blocks, {c: workers[c * W // C] for c in range(C)})

    def by_chunk(self, workers: int) -> bool:
        """Whether the chunk tasks are placed by chunk (``cluster.placement``; ``auto``: when
        every worker gets a chunk of each block, on the Zarr-resident state)."""
        how = self.opts.cluster.placement
        if how == "auto":
            return not self.flow and workers >= 2 and len(self.slices) >= workers
        return how == "chunks"

    def _submit(self, client, nodes: list[Node], futures: dict[str, Any],
                place: Placement) -> None:
        """Submit ``nodes``; their futures go into ``futures`` (the caller drops what later
        iterations no longer need, so the cluster can release old states)."""
        for node in nodes:
            args = tuple(_resolve(a, futures) for a in node.args)
            fut = client.submit(_call_aligned, node.fn, *args, key=node.key,
                                workers=place.of(node), pure=False,
                                allow_other_workers=False, priority=node.priority)
            futures[node.key] = fut

    # -- start: fresh (forward pass per chunk) or resumed (copy the checkpoint back) -------
    def start_nodes(self, weights0: list[np.ndarray]) -> tuple[list[Node], dict[str, Any],
                                                                dict[str, str], int]:
        """Nodes and literal values that bring the store to iteration k0; returns
        (nodes, literals, prev roles, k0)."""
        rid = self.run_id
        restore = None
        cp = self.manifest
        if cp is not None:
            k0, states = self.store.read_checkpoint_states(
                [{"W": v["W"]} for v in self.layout])
            # (a RADMM-3 manifest written before its small state was {"W": W} has none)
            scalars = cp.get("small") or [{} for _ in states]
            small = [{**sc, "W": st["W"]} for sc, st in zip(scalars, states, strict=True)]
            self._restore_monitor()
            self._restore_last_good(k0, [st["W"] for st in states])
            self._restore_guard()
            restore = (k0, cp["slot"])
        else:
            k0, small = 0, self.algorithm.plan.init_small(self.arch, weights0)
        restart = None
        if restore is not None and restarts_after(self.specs[0].options, k0, self.guard) \
                and k0 < self.K:
            # iteration k0+1 starts again from W^{k0}: the start on the checkpoint's weights
            # takes the place of copying its state back (which nothing would order the
            # restart's writes of the same slot after)
            restore, restart = None, k0
        self.restarted = -1 if restart is None else k0
        nodes, prev, self.init_keys = self._start_graph([s["W"] for s in small], k0, restore,
                                                        restart)
        literals: dict[str, Any] = dict(self.data_literals())
        literals.update(self._small_literals(small, rid, prev))
        self.k0 = k0
        # the first window after the start (or the resume) arrives bunched: see Monitor.ramp
        self.monitor.k_start, self.monitor.ramp = k0, k0 + self.window
        self.weights = [s["W"] for s in small]
        return nodes, literals, prev, k0

    def _start_graph(self, weights: list[np.ndarray], k0: int, restore: tuple[int, str] | None,
                     restart: int | None, tag: str = ""
                     ) -> tuple[list[Node], dict[str, str], list[str]]:
        """:func:`~daskadmm.graph.chunked.start_nodes` of this run: fresh on ``weights``,
        restored (``restore``) or the restart after iteration ``restart``; W_1's first
        statistics with iteration k0+1's rho, or each value it can take while a schedule has
        not decided it (as every window computes them for its next iteration: a resumed run
        has the same bits)."""
        from ..graph import chunked as chunk_graph

        return chunk_graph.start_nodes(
            self.algorithm.name, self.arch, self.task_url, self.slices, self.run_id, weights,
            self.n, restore, self.specs[0].options, self.schedule.at(1).rho, self.flow,
            self.schedule.next_rhos(k0), restart=restart, tag=tag)

    def restart(self, ex: _Executor, k: int, prev: dict[str, str], data: set[str]
                ) -> dict[str, str]:
        """Start again from ``W^k`` after iteration k (done, its checkpoint committed:
        nothing reads its slot any more): the algorithm's start on every chunk, into slot
        ``k % 2`` (:func:`~daskadmm.splitting.base.restarts_after`). Returns the roles
        iteration k+1 starts from (the blocks' small states stay iteration k's, unless the
        restart guard rejects the restart: :meth:`guard_restart`)."""
        small = {f"small-b{i}": prev[f"small-b{i}"] for i in range(1, self.N + 1)}
        weights = [ex.result(ex.future(small[f"small-b{i}"]))["W"]
                   for i in range(1, self.N + 1)]
        nodes, roles, outs = self._start_graph(weights, k, None, k)
        ex.submit(nodes)
        roles.update(small)
        ex.keep(set(roles.values()) | data | (set(outs) if self.guard is not None else set()))
        if self.guard is not None:
            roles = self.guard_restart(ex, k, weights, roles, outs)
            ex.keep(set(roles.values()) | data)
        return roles

    def guard_restart(self, ex: _Executor, k: int, weights: list[np.ndarray],
                      roles: dict[str, str], outs: list[str]) -> dict[str, str]:
        """The restart guard's decision on the restart after iteration k, submitted on
        ``weights`` (``W^k``) with ``roles`` and its start's results ``outs``: the roles
        unchanged when it is accepted (or there is no guard), else those of a second start on
        the accepted weights, with their small states, once the first start is done with
        slot ``k % 2`` (rho and beta are raised for iteration k+1 on, as in the reference).
        The caller keeps ``roles`` and ``outs`` (:meth:`_Executor.keep`) before, and what this
        returns after."""
        if self.guard is None:
            return roles
        futures = [ex.future(o) for o in outs]  # (all asked for before the first result)
        objective = self._start_objective([ex.result(f) for f in futures], weights)
        back = self.guard.decide(k, objective, weights, self.schedule)
        if self.guard.note is not None:
            say(self.guard.note)
        if back is None:
            return roles
        # every task of the first start has read the slot before the second one writes it
        for f in [ex.future(roles[role]) for role in ("gram", "first") if role in roles]:
            ex.result(f)
        nodes, new, _ = self._start_graph(back, k, None, k, tag="g")
        ex.put(self._small_literals(self.algorithm.plan.init_small(self.arch, back),
                                    f"g{k}-{self.run_id}", new))
        ex.submit(nodes)
        return new

    @staticmethod
    def _small_literals(small: list[dict], tag: str, roles: dict[str, str]) -> dict[str, Any]:
        """The blocks' small states as literals keyed ``init_small-b<i>-<tag>`` (``tag`` ends
        with the run id), each named in ``roles`` as ``small-b<i>``."""
        literals = {}
        for i, sm in enumerate(small, start=1):
            literals[f"init_small-b{i}-{tag}"] = sm
            roles[f"small-b{i}"] = f"init_small-b{i}-{tag}"
        return literals

    def _start_objective(self, init_outs: list[dict], weights: list[np.ndarray]) -> float:
        """L of a start: its chunks' loss shares (in chunk order) plus every block's weight
        decay (:meth:`RestartGuard.start_objective`, as the reference computes it)."""
        return RestartGuard.start_objective([o["objective"] for o in init_outs], self.specs,
                                            weights, self.schedule.at(1).lam)

    def data_literals(self) -> dict[str, np.ndarray]:
        """The dataflow backend's data chunks, by key (none with a store)."""
        if not self.flow:
            return {}
        from ..graph.chunked import data_key

        out = {}
        ds = self.ds
        for names, arrays, slices in ((("X", "Y"), (ds.X_train, ds.Y_train), self.slices),
                                      (("X_test", "Y_test"), (ds.X_test, ds.Y_test),
                                       self.test_slices)):
            for c, sl in enumerate(slices):
                for name, a in zip(names, arrays, strict=True):
                    out[data_key(name, c, self.N, self.run_id)] = np.ascontiguousarray(a[:, sl])
        return out

    def _restore_monitor(self) -> None:
        """Monitor and penalty schedule as they were at the manifest's checkpoint."""
        cp = self.manifest
        assert cp is not None  # only called when resuming from a committed checkpoint
        mon = self.monitor
        mon.load_state_dict(cp)  # the manifest holds the monitor's state_dict keys
        if mon.callback is not None and not self._replayed:
            for r in mon.history:  # the rows a resumed run's outputs start with
                mon.callback(r)
        self._replayed = True
        self.schedule.load_state_dict(cp.get("schedule") or {})

    def _restore_last_good(self, k0: int, weights: list[np.ndarray]) -> None:
        """The monitor's last good evaluation, as recorded in the manifest: its weights are
        the checkpoint's when it is the checkpoint iteration, else stored in the manifest."""
        assert self.manifest is not None  # only called when resuming from a checkpoint
        good = self.manifest.get("last_good", "absent")
        if good == "absent":  # a manifest without the record: the checkpoint, if finite
            if all(np.all(np.isfinite(W)) for W in weights):
                self.monitor.last_good = (k0, [np.array(W, copy=True) for W in weights])
            return
        if good is None:
            self.monitor.last_good = None
        elif good["weights"] is None:
            self.monitor.last_good = (int(good["iteration"]),
                                      [np.array(W, copy=True) for W in weights])
        else:
            self.monitor.last_good = (int(good["iteration"]),
                                      [_decode_array(w) for w in good["weights"]])

    def _restore_guard(self) -> None:
        """The restart guard as recorded in the manifest, its accepted weights from the
        checkpoint slot (``Wacc``, verified against the manifest's checksums)."""
        if self.guard is None:
            return
        assert self.manifest is not None  # only called when resuming from a checkpoint
        state = self.manifest.get("restart_guard")
        if not state:  # (determinants keep a store made without the guard from resuming)
            raise StoreError(f"state store {self._store.url if self._store else ''}: its "
                             "checkpoint has no restart guard state to resume with")
        slot = self.manifest["slot"]
        self.guard.load_state_dict(state, [self.store.read(f"ckpt/{slot}/b{i}/Wacc")
                                           for i in range(1, self.N + 1)])

    def _manifest(self, k: int, slot: str, small: list[dict] | None,
                  checksums: dict[str, list[int]]) -> dict[str, Any]:
        mon = self.monitor
        good = None
        if mon.last_good is not None:
            kg, wg = mon.last_good
            good = {"iteration": kg,
                    "weights": None if kg == k else [_encode_array(W) for W in wg]}
        # the monitor's state_dict keys (history, increases, capped_total, last_objective,
        # last_params) at the top level, as manifests have always held them
        guard = None if self.guard is None else self.guard.state_dict()  # (weights: Wacc)
        return {"iteration": k, "slot": slot, **mon.state_dict(),
                "schedule": self.schedule.state_dict(), "small": small,
                "last_good": good, "restart_guard": guard,
                "determinants": self.store.attrs.get("determinants"),
                "checksums": checksums}

    def _chunk_checksums(self, keys: list[str], values: list[dict[str, int]],
                         weights: list[np.ndarray]) -> dict[str, list[int]]:
        """Per ``b<i>/<name>``: the checkpoint tasks' chunk checksums in chunk order, and the
        W written by the driver."""
        from ..storage import checksum

        out: dict[str, list[int]] = {}
        by_chunk: dict[tuple[int, int], dict[str, int]] = {}
        for key, val in zip(keys, values, strict=True):
            i = int(key.split("-b", 1)[1].split("-", 1)[0])
            c = int(key.split("-c", 1)[1].split("-", 1)[0])
            by_chunk[(i, c)] = val
        for i in range(1, self.N + 1):
            for c in range(len(self.slices)):
                for name, crc in by_chunk[(i, c)].items():
                    out.setdefault(f"b{i}/{name}", []).append(crc)
            out[f"b{i}/W"] = [checksum(weights[i - 1])]
        return out

    def ckpt_plan(self, k0: int, k1: int) -> dict[int, str]:
        """The checkpoint of iterations k0+1..k1 (at most one: the drivers never build past
        an uncommitted checkpoint) and its slot: the one the committed manifest does not
        name."""
        plan: dict[int, str] = {}
        for k in range(k0 + 1, k1 + 1):
            if self._is_ckpt(k):
                assert not plan, "two checkpoints in one window"
                plan[k] = self.store.next_checkpoint_slot()
        return plan

    def build(self, k0: int, k1: int, prev: dict[str, str]):
        from ..graph import chunked as chunk_graph

        return chunk_graph.build_window(
            self.algorithm.name, self.specs, _pens(self.schedule, k0, k1), k0, k1, prev,
            self.run_id, self.task_url, self.slices, self.eval_iters(k0, k1),
            (self.arch, self.ds.task, self.metric, tuple(self.slices), tuple(self.test_slices)),
            self.ckpt_plan(k0, k1), self.flow, self.schedule.next_rhos(k1))

    def commit(self, k: int, slot: str, smalls: list[dict], keys: list[str],
               values: list[dict[str, int]]) -> None:
        """Commit checkpoint k: each block's W into the slot, then the manifest with the rest
        of the small states (the atomic commit)."""
        scalars = []
        for i, sm in enumerate(smalls, start=1):
            self.store.write(f"ckpt/{slot}/b{i}/W", sm["W"])
            scalars.append({x: float(v) for x, v in sm.items()
                            if x not in ("W", "step", "capped", "k", "lam")})
        sums = self._chunk_checksums(keys, values, [sm["W"] for sm in smalls])
        if self.guard is not None:  # its accepted weights, beside W
            from ..storage import checksum

            assert self.guard.weights is not None  # begun at the start
            for i, W in enumerate(self.guard.weights, start=1):
                self.store.write(f"ckpt/{slot}/b{i}/Wacc", W)
                sums[f"b{i}/Wacc"] = [checksum(W)]
        self.store.commit_checkpoint(self._manifest(k, slot, scalars, sums))

    def initial_record(self, init_outs: list[dict]) -> None:
        if self.manifest is not None:
            return
        pen = self.schedule.at(1)
        obj = self._start_objective(init_outs, self.weights)
        if self.guard is not None:
            self.guard.begin(obj, self.weights)
        mon = self.monitor
        # after a recovery from iteration 0 the row was reported already
        callback, mon.callback = mon.callback, (None if self.recoveries else mon.callback)
        values = None
        if lazy_arrays(self.ds):
            # out-of-core data: the metrics of iteration 0 from the store, a chunk at a time
            # (not a forward pass over the lazy arrays from this process)
            from ..chunks.common import evaluate_chunks

            values, _ = evaluate_chunks(self.task_url, self.arch, self.ds.task, self.metric,
                                        tuple(self.slices), tuple(self.test_slices),
                                        *self.weights)
        try:
            mon.start(obj, self.weights, pen.rho, pen.beta, values)
        finally:
            mon.callback = callback

    # -- synchronous / threaded ------------------------------------------------------------
    def run_local(self, weights0) -> Result:
        """The run on Dask's synchronous or threaded scheduler in this process
        (:class:`.executors._LocalExecutor`): the same driver as on a cluster."""
        ex = _LocalExecutor(self.opts.cluster)
        status, k = self._attempt(ex, weights0)
        return self.result(status, k, {"tasks_run": ex.tasks_run, "scheduler": ex.scheduler,
                                       **self.engine_info()})

    def engine_info(self) -> dict[str, Any]:
        if self.flow:
            return {"engine": "dask"}
        return {"engine": "dask-zarr", "chunks": len(self.slices),
                "resumed_from": self.resumed_from}

    @staticmethod
    def _committable(stop: str | None, it, weights) -> bool:
        """A failed or non-finite iteration is never checkpointed: the last committed
        checkpoint stays the last good one."""
        from ..monitor import FAILED

        small = [w["W"] if isinstance(w, dict) else w for w in weights]
        return stop not in FAILED and math.isfinite(it.objective) and \
            all(np.all(np.isfinite(W)) for W in small)

    def _is_ckpt(self, k: int) -> bool:
        every = self.opts.checkpoint_every
        return bool(every) and k % every == 0

    @staticmethod
    def ckpt_slot_of(wg, k: int) -> str:
        node = next(n for n in wg.nodes if n.key == wg.checkpoints[k][0])
        return node.args[4]

    # -- distributed -----------------------------------------------------------------------
    def run_distributed(self, weights0, run_dir: Path | None) -> Result:
        status, k, info = self.on_cluster(
            lambda client, workers: self._recovering(client, workers, weights0), run_dir)
        info.update({**self.engine_info(), "recoveries": self.recoveries})
        return self.result(status, k, info)

    def _recovering(self, client, workers, weights0):
        """Run the pipeline; when a worker is lost, abandon the attempt, wait for its tasks
        to stop, and start again from the last committed checkpoint (iteration 0 when there
        is none). The iterates do not depend on placement, so the run ends bit-for-bit as an
        uninterrupted one would."""
        self.recoveries = 0
        self.old_run_ids: list[str] = []
        while True:
            self._workers0 = set(client.run_on_scheduler(_worker_ids).items())
            lost = ""
            try:
                return self._attempt(_ClusterExecutor(self, client, workers), weights0)
            except _WorkerLost as exc:
                lost = str(exc)  # not the exception: its frames hold the attempt's futures
            self.recoveries += 1
            if self.recoveries > MAX_RECOVERIES:
                raise ClusterError(f"Dask workers were lost {self.recoveries} times in this "
                                   f"run ({lost}): giving up; "
                                   + _lost_worker_message(self.opts, lost).split(": ", 1)[1])
            self._quiesce(client)
            workers = self._wait_for_workers(client, len(self._workers0))
            self._rewind()
            k0 = self.manifest["iteration"] if self.manifest is not None else 0
            say(f"daskadmm: warning: a Dask worker was lost ({lost}); recomputing from "
                f"{'checkpoint ' + str(k0) if k0 else 'iteration 0'} on {len(workers)} "
                "worker(s)")

    def _attempt(self, ex: _Executor, weights0) -> tuple[str, int]:
        """The driver: start (fresh or from the checkpoint), then keep ``window`` iterations
        submitted ahead of the last one processed, take each iteration's statistics and
        evaluation in order, stop, and commit checkpoints. ``ex`` runs the tasks (on a
        cluster, or in this process a window at a time). Returns (status, last iteration)."""
        nodes, literals, prev, k0 = self.start_nodes(weights0)
        data = set(self.data_literals()) if self.flow else set()
        pending: deque = deque()
        held: dict[int, tuple[list[str], list[Any], list[Any], str]] = {}
        try:
            ex.put(literals)
            ex.submit(nodes)
            init = [ex.future(x) for x in self.init_keys]
            # (the start's results stay for the restart guard of a run resumed at a restart)
            ex.keep(set(prev.values()) | data | set(self.init_keys))
            self.initial_record([ex.result(f) for f in init])
            if self.restarted == k0:  # resumed at a restart: the guard decides
                prev = self.guard_restart(ex, k0, self.weights, prev, self.init_keys)
                ex.keep(set(prev.values()) | data)
            submitted, k_done, status = k0, k0, "max_iter"
            restarted = self.restarted  # k0 when the start was the restart after it
            while k_done < self.K:
                while submitted < self.K and submitted - k_done < self.window:
                    if submitted > k_done and self.schedule.is_barrier(submitted):
                        break
                    if held and self._is_ckpt(submitted + 1):
                        break  # one checkpoint in flight: the committed slot stays intact
                    if restarts_after(self.specs[0].options, submitted, self.guard) and \
                            restarted != submitted:
                        if submitted > k_done:
                            break  # the restart starts from iteration `submitted`, done
                        prev = self.restart(ex, submitted, prev, data)
                        restarted = submitted
                    wg = self.build(submitted, submitted + 1, prev)
                    ex.submit(wg.nodes)
                    submitted += 1
                    kk = submitted
                    if kk in wg.checkpoints:
                        held[kk] = (list(wg.checkpoints[kk]),
                                    [ex.future(x) for x in wg.checkpoints[kk]],
                                    [ex.future(x) for x in wg.weights[kk]],
                                    self.ckpt_slot_of(wg, kk))
                    pending.append((kk, ex.future(wg.stats[kk]),
                                    ex.future(wg.evals[kk]) if kk in wg.evals else None))
                    ex.keep(set(wg.last.values()) | data)
                    prev = wg.last
                kk, fstats, fev = pending.popleft()
                it = ex.result(fstats)
                if ex.ran:  # a window's results arrive together
                    self.monitor.arrived(submitted)
                ev = ex.result(fev) if fev is not None else None
                stop = self.process(kk, it, ev)
                if kk in held:
                    keys, cks, wfs, slot = held.pop(kk)
                    values = [ex.result(f) for f in cks]
                    weights = [ex.result(f) for f in wfs]
                    ex.check()  # nothing was recomputed behind our back
                    if self._committable(stop, it, weights):
                        self.commit(kk, slot, weights, keys, values)
                k_done = kk
                if stop is not None:
                    status = stop
                    break
            ex.check()
            return status, k_done
        finally:
            pending.clear()
            held.clear()
            ex.close()

    def _rewind(self) -> None:
        """Back to the last committed checkpoint (verified), or to iteration 0."""
        self.old_run_ids.append(self.run_id)
        self.run_id = uuid.uuid4().hex[:8]
        self.manifest = self._store.checkpoint() if self._store is not None else None
        mon, sch = self.monitor, self.schedule
        if self.manifest is not None:
            self.store.verify_checkpoint(self.ck_layout)  # start_nodes restores from it
        else:
            mon.history, mon.increases, mon.capped_total = [], [], 0
            mon.last_good = None
            sch.reset()


def store_url(opts: EngineOptions, run_dir: Path | None) -> str:
    if opts.storage.url:
        return opts.storage.url
    if run_dir is None:
        return f"memory://daskadmm-{uuid.uuid4().hex}"
    return str(run_dir / "state.zarr")


def _store_meta(opts: EngineOptions, arch: Architecture, digest: str, n: int, slices
                ) -> dict[str, Any]:
    from dataclasses import asdict

    from ..storage import _jsonable, arithmetic_revision

    return {"config": _jsonable(opts.config), "determinants": opts.determinants,
            "arithmetic": arithmetic_revision(arch.loss),
            "data_sha256": digest, "algorithm": opts.algorithm,
            "arch": asdict(arch), "n": n, "chunk_size": opts.storage.chunk_size,
            "n_chunks": len(slices)}


def _data_arrays(ds: Dataset) -> dict[str, np.ndarray]:
    return {"X": ds.X_train, "Y": ds.Y_train, "X_test": ds.X_test, "Y_test": ds.Y_test}


def _open_for_resume(opts: EngineOptions, url: str, run_id: str, meta: dict[str, Any],
                     layout: list[dict[str, tuple]]):
    """Open the store to resume and verify it before any cluster starts: the same problem
    (every setting that determines the iterates, the same data), an intact checkpoint (every
    chunk against the manifest's checksums) and intact stored data. Returns
    ``(store, manifest or None)``; a store with no complete checkpoint resumes from 0."""
    from ..storage import StateStore, StoreError, changed_determinants

    # everything is checked on a read-only view first: a refused resume changes nothing
    probe = StateStore.open(url, mode="check")
    probe.check_lock(opts.storage.break_lock)
    attrs = probe.attrs
    if attrs.get("state_dropped"):
        raise StoreError(f"cannot resume {url}: it holds only the final model of a finished run "
                         "(its state was not kept: run with run.checkpoint_every or "
                         "storage.keep_state=true to keep it)")
    changed = changed_determinants(attrs.get("determinants") or {}, meta["determinants"])
    if changed:
        raise StoreError(f"cannot resume {url}: settings that determine the iterates differ "
                         f"from the stored run's: {'; '.join(changed)}")
    for keyname in ("algorithm", "arch", "n", "n_chunks"):
        if attrs.get(keyname) != meta[keyname]:
            raise StoreError(f"cannot resume {url}: its {keyname} ({attrs.get(keyname)}) "
                             f"differs from this run's ({meta[keyname]})")
    made_with = attrs.get("arithmetic", 1)  # (stores from before the record: revision 1)
    if made_with != meta["arithmetic"]:
        raise StoreError(f"cannot resume {url}: it was made by a daskadmm whose arithmetic for "
                         f"this problem differs from this one's (revision {made_with}, now "
                         f"{meta['arithmetic']}), so the resumed run would match neither; resume "
                         "it with the daskadmm that made it, or start a new run")
    if attrs.get("data_sha256") != meta["data_sha256"]:
        raise StoreError(f"cannot resume {url}: the data set differs from the one the store "
                         "was made with (its digest does not match)")
    cp = probe.checkpoint()
    if cp is not None:
        probe.verify_checkpoint(layout)
    if attrs.get("ready"):
        probe.verify_data()
    store = StateStore.open(url, owner=run_id, break_lock=opts.storage.break_lock)
    if store.broken_lock is not None:
        bl = store.broken_lock
        say(f"daskadmm: warning: broke the lock of run {bl.get('run_id')} (pid "
            f"{bl.get('pid')} on {bl.get('host')}) on {url}")
    return store, cp


def preflight_store(opts: EngineOptions) -> None:
    """The checks of the state store that need no data and write nothing (the CLI runs them
    before Hydra creates a run directory): a fresh run's ``storage.url`` must be new, empty
    or (``storage.overwrite``) a daskadmm store; a resumed one must be a usable store."""
    from ..storage import StateStore

    url = opts.storage.url
    if not url or opts.cluster.kind == "reference" or opts.storage.state != "zarr" or \
            opts.algorithm not in ADMM_ALGORITHMS:
        return
    if opts.resume:
        StateStore.open(url, mode="check").check_lock(opts.storage.break_lock)
    else:
        StateStore.check_new(url, overwrite=opts.storage.overwrite)


def run_zarr(opts: EngineOptions, algorithm: Algorithm, arch: Architecture, ds: Dataset,
             weights0: list[np.ndarray], schedule: PenaltySchedule, monitor: Monitor,
             options: Options, run_dir: Path | None = None, client=None) -> Result:
    """Run an ADMM algorithm with every sample-sized variable in a chunked Zarr store (see
    :mod:`daskadmm.chunks`, wired by :mod:`daskadmm.graph.chunked`); ``client`` as for
    :func:`run_dask`."""
    from ..storage import (
        StateStore,
        StoreError,
        array_fingerprints,
        chunk_slices,
        combine_digest,
        dataset_meta,
    )

    chunk_size = opts.storage.chunk_size
    if not isinstance(chunk_size, int):  # daskadmm.api.fit resolves auto before it calls this
        raise ValueError(f"run_zarr needs a resolved storage.chunk_size, got {chunk_size!r}")
    n, specs, window, run_id = _setup(opts, arch, ds, options)
    url = store_url(opts, run_dir)
    slices = chunk_slices(n, chunk_size)
    test_slices = chunk_slices(ds.X_test.shape[1], chunk_size)
    lay = algorithm.plan.layout(arch)
    if options.restart_guard:  # the restart guard's accepted weights, checkpointed beside W
        lay = [{**block, "Wacc": block["W"]} for block in lay]
    # what a checkpoint holds: W and the state (not pdADMM's scratch), and Wacc
    ck_lay = [{v: shape for v, shape in block.items()
               if v in ("W", "Wacc") or v in algorithm.plan.state_vars(arch, i)}
              for i, block in enumerate(lay, start=1)]
    scratch = None
    client = resolve_client(opts.cluster, client)
    data = _data_arrays(ds)
    lazy = bool(lazy_arrays(ds))
    # each data chunk's SHA-256 (the data set's digest) and CRC-32 (the resume check) from one
    # pass; out-of-core input by Dask tasks, chunk by chunk (and later written the same way)
    if lazy:
        from ..lazy import fingerprints

        fps = fingerprints(data, chunk_size, client)
    else:
        fps = {k: (a.shape, *array_fingerprints(a, chunk_size))
               for k, a in data.items()}
    digest = combine_digest({k: (shape, shas) for k, (shape, shas, _) in fps.items()})
    data_sums = {k: crcs for k, (_, _, crcs) in fps.items()}
    meta = _store_meta(opts, arch, digest, n, slices)
    if opts.cluster.kind == "local" and not opts.storage.url and run_dir is None and \
            (client is None or client_is_local(client)):
        # the Python API with no run directory: the worker processes of this machine share a
        # scratch directory, removed at the end (the result carries the weights)
        import tempfile

        scratch = tempfile.mkdtemp(prefix="daskadmm-")
        url = str(Path(scratch) / "state.zarr")
    if (client is not None or opts.cluster.kind in ("local", "address")) and \
            url.startswith("memory://"):
        where = "storage.url" if opts.storage.url else "run_dir or storage.url"
        raise StoreError(f"the state store {url} would live in this process only: pass "
                         f"{where} (a path every Dask worker can reach)")
    try:
        created = False
        if opts.resume:
            store, cp = _open_for_resume(opts, url, run_id, meta, ck_lay)
        else:
            store = StateStore.create(url, meta=meta, owner=run_id,
                                      overwrite=opts.storage.overwrite)
            cp, created = None, True
        if not store.attrs.get("ready"):
            # a new store, or one whose run was killed while it was being made
            if lazy:
                from ..lazy import write_data

                write_data(store, data, chunk_size, opts.storage.compressor,
                           data_sums, client)
            else:
                store.write_data(data, chunk_size, opts.storage.compressor,
                                 sums=data_sums)
            store.create_state(lay, n, chunk_size, opts.storage.compressor,
                               algorithm.plan.slots,
                               dtype=opts.dtype)
            store.set_attrs({"ready": True})
    except BaseException:
        if "store" in locals():
            store.close()
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        raise
    metric = "accuracy" if ds.task == "classification" else "mse"
    ctx = _Ctx(opts, algorithm, arch, ds, specs, schedule, monitor, window, run_id, metric)
    ctx.url, ctx._store, ctx.slices, ctx.test_slices, ctx.layout = url, store, slices, \
        test_slices, lay
    ctx.task_url = store.ref
    ctx.manifest = cp
    ctx.ck_layout = ck_lay
    ctx.resumed_from = ((cp["iteration"] if cp else 0) if opts.resume else None)
    ctx.recoveries = 0
    ctx.client = client
    status = "failed"
    ok = False
    try:
        if client is None and opts.cluster.kind in ("synchronous", "threads"):
            result = ctx.run_local(weights0)
        else:
            result = ctx.run_distributed(weights0, run_dir)
        status = result.status
        monitor.keep_good(result)
        store.save_model(arch, result.weights, task=ds.task, metric=metric, **dataset_meta(ds))
        keep = opts.storage.keep_state
        if keep is None:
            keep = bool(opts.checkpoint_every or opts.resume)
        if not keep and scratch is None and result.status in ("max_iter", "converged"):
            store.drop_state()  # a finished run nobody will resume: keep only the model
            result.info["state_kept"] = False
        result.info["store"] = None if scratch else url
        ok = True
        return result
    finally:
        with contextlib.suppress(Exception):
            store.release(status)
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)  # made by this run, for this run
        if not ok and created and not opts.storage.url and not store.holds_results():
            # a run that failed before its first checkpoint leaves no half-made store in its
            # own run directory (it made it; nothing in it can be resumed beyond iteration 0)
            import shutil

            shutil.rmtree(url, ignore_errors=True)


