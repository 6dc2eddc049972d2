"""Where the driver's tasks run (:class:`_Executor`): Dask's synchronous or threaded
scheduler in this process (:class:`_LocalExecutor`: the submitted tasks run as one graph when
a result is asked for) or futures on a distributed cluster (:class:`_ClusterExecutor`: each
block's tasks on its worker); the checks and messages for a lost worker or scheduler, the
recovery helpers that run on the scheduler and workers, and the task-stream summary.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import ClusterConfig
from ..engine_options import EngineOptions
from ..errors import ClusterError
from ..graph import Node, Ref, to_dask_graph
from .cluster import _first_line, say

if TYPE_CHECKING:
    from .driver import _Ctx

log = logging.getLogger(__name__)


class _Executor:
    """Where the driver's tasks run: ``put`` literal values, ``submit`` nodes, ``future`` of
    a key (to ask for its value later), ``result``, ``keep`` (every other key may go once
    the tasks submitted so far no longer need it), ``check`` (raise if a worker was lost)."""

    ran = False  # the last result() ran a batch of tasks (their results arrive together)

    def put(self, literals: dict[str, Any]) -> None:
        raise NotImplementedError

    def submit(self, nodes: list[Node]) -> None:
        raise NotImplementedError

    def future(self, key_: str) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        raise NotImplementedError

    def keep(self, keys: set[str]) -> None:
        raise NotImplementedError

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


class _LocalExecutor(_Executor):
    """Dask's synchronous or threaded scheduler: submitted tasks wait until a result is
    asked for, then everything submitted runs as one graph, which returns the values asked
    for (futures) and the ones kept."""

    def __init__(self, ccfg: ClusterConfig):
        self.scheduler = "sync" if ccfg.kind == "synchronous" else "threads"
        self.workers = ccfg.threads
        self.values: dict[str, Any] = {}
        self.pending: list[Node] = []
        self.wanted: set[str] = set()
        self.kept: set[str] = set()
        self.tasks_run = 0

    def put(self, literals: dict[str, Any]) -> None:
        self.values.update(literals)

    def submit(self, nodes: list[Node]) -> None:
        self.pending.extend(nodes)

    def future(self, key_: str) -> str:
        self.wanted.add(key_)
        return key_

    def keep(self, keys: set[str]) -> None:
        self.kept = set(keys)

    def result(self, handle: str) -> Any:
        import dask
        import dask.threaded

        self.ran = False
        if handle not in self.values:
            done = {n.key for n in self.pending}
            want = sorted((self.wanted | self.kept) & done)
            dsk = to_dask_graph(self.pending, self.values)
            if self.scheduler == "sync":
                got = dask.get(dsk, want)
            else:
                got = dask.threaded.get(dsk, want, num_workers=self.workers)
            self.values = {k: v for k, v in self.values.items()
                           if k in self.kept or k in self.wanted}
            self.values.update(zip(want, got, strict=True))
            self.tasks_run += len(self.pending)
            self.pending = []
            self.ran = True
        # (the value stays until the next batch has run: a task submitted since may need it)
        self.wanted.discard(handle)
        return self.values[handle]

    def close(self) -> None:
        self.values, self.pending = {}, []


class _ClusterExecutor(_Executor):
    """A distributed cluster: each node a future on its worker (:class:`.driver.Placement`:
    by block, or the chunk tasks by chunk), literals scattered to their block's worker;
    results watched for lost workers."""

    def __init__(self, ctx: _Ctx, client, workers: list[str]):
        self.ctx, self.client = ctx, client
        self.place = ctx._placement(workers)
        self.futures: dict[str, Any] = {}

    def put(self, literals: dict[str, Any]) -> None:
        for name, value in literals.items():
            b = int(name.split("-b")[1].split("-")[0])
            # in a list: scatter would split a dict (a small state) into one future per entry
            self.futures[name] = self.client.scatter([value], workers=[self.place.blocks[b]],
                                                     hash=False)[0]

    def submit(self, nodes: list[Node]) -> None:
        self.ctx._submit(self.client, nodes, self.futures, self.place)

    def future(self, key_: str) -> Any:
        return self.futures[key_]

    def keep(self, keys: set[str]) -> None:
        for old in [x for x in self.futures if x not in keys]:
            del self.futures[old]

    def result(self, handle: Any) -> Any:
        return self.ctx._result(self.client, handle)

    def check(self) -> None:
        self.ctx._check_workers(self.client)

    def close(self) -> None:
        self.futures.clear()


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


class _Optional:
    """Enter a context manager whose failure must not cost the run (a report, a recorder):
    errors on entry or exit become logged warnings. ``value`` is what it yielded (None if it
    failed to start)."""

    def __init__(self, cm, what: str):
        self.cm, self.what, self.value = cm, what, None
        try:
            self.value = cm.__enter__()
            self.active = True
        except Exception as exc:
            self.active = False
            log.warning("the %s could not start: %s: %s", what, type(exc).__name__,
                        _first_line(exc))

    def close(self, quiet: bool = False) -> None:
        """Exit; ``quiet``: the run failed anyway, so only log a failure here."""
        if not self.active:
            return
        self.active = False
        try:
            self.cm.__exit__(None, None, None)
        except Exception as exc:
            if quiet:
                log.debug("the %s failed too: %s", self.what, exc)
                return
            say(f"daskadmm: warning: the {self.what} failed ({type(exc).__name__}: "
                f"{_first_line(exc)}); the results are kept")
            log.warning("the %s failed: %s", self.what, exc)


def _optional(cm, what: str) -> _Optional:
    return _Optional(cm, what)


def _scheduler_lost(client, exc: BaseException) -> bool:
    """Whether ``exc`` means the connection to the scheduler is gone."""
    from distributed.comm.core import CommClosedError

    if isinstance(exc, CommClosedError):
        return True
    if getattr(client, "status", "running") not in ("running", "connecting"):
        return True
    if isinstance(exc, OSError | TimeoutError):  # a disk error is not a lost scheduler
        try:
            client.run_on_scheduler(_worker_ids)
        except Exception:
            return True
    return False


def _lost_scheduler_message(opts: EngineOptions, exc: BaseException) -> str:
    where = opts.cluster.address if opts.cluster.kind == "address" else "the local cluster"
    hint = ""
    if opts.checkpoint_every and opts.storage.url:
        hint = f": continue from the last checkpoint with run.resume=true " \
               f"storage.url={opts.storage.url}"
    return f"lost the Dask scheduler at {where} mid-run ({type(exc).__name__}){hint}"


def _lost_worker_message(opts: EngineOptions, exc: BaseException | str) -> str:
    what = exc if isinstance(exc, str) else type(exc).__name__
    hint = "raise cluster.memory_limit or lower storage.chunk_size"
    if opts.checkpoint_every and opts.storage.url:
        hint += f"; continue from the last checkpoint with run.resume=true " \
                f"storage.url={opts.storage.url}"
    return (f"a Dask worker was lost mid-run (killed for memory or crashed; "
            f"{what}): {hint}")


def _resolve(arg: Any, futures: dict[str, Any]) -> Any:
    if isinstance(arg, Ref):
        return futures[arg.key]
    if isinstance(arg, tuple) and any(isinstance(a, Ref) for a in arg):
        return [_resolve(a, futures) for a in arg]
    return arg


_ITERATION = re.compile(r"-k(\d+)-")


def _stream_summary(stream: list[dict], run_id: str | tuple[str, ...],
                    workers: int = 0) -> dict[str, Any]:
    """Tasks run, seconds spent computing vs transferring (summed over workers), and how
    busy the workers were: ``workers_busy``, the compute seconds over ``workers`` x the span
    from the first task's start to the last one's end (pipeline fill and drain included;
    None without tasks), and ``workers_busy_steady``, the same inside the pipelined window:
    from the end of the first iteration's last task (the wavefront has filled every block)
    to the start of the last iteration's first task (the drain begins); None when a run is
    too short to have one."""
    compute = transfer = 0.0
    tasks = 0
    first, last = float("inf"), float("-inf")
    spans: list[tuple[float, float]] = []
    ends: dict[int, float] = {}  # iteration -> its last task's end
    starts: dict[int, float] = {}  # iteration -> its first task's start
    ids = (run_id,) if isinstance(run_id, str) else tuple(run_id)
    for rec in stream:
        key_ = str(rec.get("key", ""))
        if not key_.endswith(ids):
            continue
        tasks += 1
        m = _ITERATION.search(key_)
        for ss in rec.get("startstops", ()):
            dt = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                compute += dt
                first, last = min(first, ss["start"]), max(last, ss["stop"])
                spans.append((ss["start"], ss["stop"]))
                if m:
                    k = int(m.group(1))
                    ends[k] = max(ends.get(k, ss["stop"]), ss["stop"])
                    starts[k] = min(starts.get(k, ss["start"]), ss["start"])
            elif ss["action"] == "transfer":
                transfer += dt
    busy = compute / (workers * (last - first)) if workers and last > first else None
    steady = None
    if workers and ends:
        a, b = ends[min(ends)], starts[max(starts)]
        if b > a:
            inside = sum(max(0.0, min(t1, b) - max(t0, a)) for t0, t1 in spans)
            steady = inside / (workers * (b - a))
    return {"tasks_run": tasks, "compute_seconds": compute, "transfer_seconds": transfer,
            "workers_busy": busy, "workers_busy_steady": steady}


def _write_task_stream(path: Path, stream: list[dict], run_id: str | tuple[str, ...]) -> None:
    rows = []
    ids = (run_id,) if isinstance(run_id, str) else tuple(run_id)
    for rec in stream:
        k = str(rec.get("key", ""))
        if not k.endswith(ids):
            continue
        for ss in rec.get("startstops", ()):
            rows.append({"key": k, "worker": rec.get("worker"), "action": ss["action"],
                         "start": ss["start"], "stop": ss["stop"]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)


# =============================================================================================
# Zarr-resident state: the store, checkpoints and resume
# =============================================================================================


MAX_RECOVERIES = 10  # lost-worker recoveries in one run before it gives up


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    """A float64 or float32 array as JSON: shape, type and base64 of its bytes (exact)."""
    import base64

    a = np.ascontiguousarray(a, dtype="<f4" if np.asarray(a).dtype == np.float32 else "<f8")
    return {"shape": list(a.shape), "dtype": a.dtype.str,
            "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode_array(d: dict[str, Any]) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(d["b64"]), dtype=d.get("dtype", "<f8")
                         ).reshape(d["shape"]).copy()


class _WorkerLost(Exception):
    """A worker of the running attempt is gone (internal: triggers a recovery)."""


def _tasks_alive(run_id: str, dask_scheduler=None) -> int:
    """On the scheduler: tasks of ``run_id`` that are running or may still run."""
    states = ("processing", "waiting", "queued", "no-worker")
    return sum(1 for key, ts in dask_scheduler.tasks.items()
               if str(key).endswith(run_id) and ts.state in states)


def _tasks_executing(run_id: str, dask_worker=None) -> int:
    """On a worker: tasks of ``run_id`` a thread is still executing (cancelled ones too)."""
    states = ("executing", "cancelled", "resumed", "long-running")
    return sum(1 for key, ts in list(dask_worker.state.tasks.items())
               if str(key).endswith(run_id) and ts.state in states)


def _executing_on_workers(client, run_id: str) -> int:
    total = 0
    for value in client.run(_tasks_executing, run_id, on_error="return").values():
        if isinstance(value, int):
            total += value  # a worker that cannot answer is gone: it writes nothing more
    return total


def _worker_ids(dask_scheduler=None) -> dict[str, str]:
    """On the scheduler: address -> server id of every worker (a restarted worker on the
    same address has a new id)."""
    return {addr: ws.server_id for addr, ws in dask_scheduler.workers.items()}


def _tasks_wanted(run_id: str, client_id: str, dask_scheduler=None) -> list:
    """On the scheduler: keys of ``run_id`` that client ``client_id`` still wants."""
    return [key for key, ts in dask_scheduler.tasks.items() if str(key).endswith(run_id)
            and any(c.client_key == client_id for c in ts.who_wants)]


def _wait_for_workers(client, want: int, timeout: float = 60.0) -> list[str]:
    """The cluster's workers once ``want`` are back (a nanny restarts a killed worker), or
    whatever is there after ``timeout`` (at least one)."""
    deadline = time.time() + timeout
    while True:
        workers = sorted(client.nthreads())
        if len(workers) >= want or (workers and time.time() > deadline):
            return workers
        if time.time() > deadline + timeout:
            raise ClusterError("no Dask worker came back after a worker was lost")
        time.sleep(0.2)

