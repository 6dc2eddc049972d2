"""Dask clusters for the engine: starting a LocalCluster (workers prepared: BLAS threads,
SIGINT ignored, distributed's size-probe warning filtered), connecting to one by address, the
client a caller already has, one cluster shared by the jobs of a Hydra multirun, and the choice
to run a small problem in this process instead (:func:`in_process_reason`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import Any

from .. import heap
from ..config import ADMM_ALGORITHMS, ClusterConfig
from ..engine_options import EngineOptions

__all__ = ["SharedCluster", "auto_chunk_size", "chunk_size_for", "connect", "current_client",
           "in_process_reason", "resolve_client", "say", "set_up_library_logging"]

log = logging.getLogger(__name__)

# A cluster shared by every job of a Hydra multirun (set by the CLI's callback).
_SHARED: dict[str, Any] = {}


class SharedCluster:
    """Start one LocalCluster and let every ``run_dask`` with ``cluster.kind=local`` in this
    process use it (Hydra multirun jobs run one after another in one process)."""

    def __init__(self, ccfg: ClusterConfig):
        self.ccfg = ccfg
        self.cluster: Any = None  # a distributed.LocalCluster while entered

    def __enter__(self) -> SharedCluster:
        self.cluster = _start_local_cluster(self.ccfg)
        _SHARED["address"] = self.cluster.scheduler_address
        return self

    def __exit__(self, *exc) -> None:
        _SHARED.clear()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def set_up_library_logging() -> None:
    """Import distributed, which sets up its loggers (and their terminal handlers) on import,
    so that a caller can redirect them before a cluster starts."""
    import distributed  # noqa: F401


def say(message: str) -> None:
    """One line for the user on stderr, written around a progress bar (tqdm's write), not
    into it."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def _prepare_worker(blas_threads: int) -> None:
    """Run on every worker at the start: ``blas_threads`` BLAS threads, and distributed's
    size-probe warning filtered (:class:`_SizeofProbeFilter`)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=blas_threads, user_api="blas")
    _quiet_sizeof_probe()


class _SizeofProbeFilter(logging.Filter):
    """Drops distributed's warning that it could not measure a message before sending it
    ("Sizeof calculation ... failed. Defaulting to -1 B"): the comm layer probes each message's
    size to decide whether to serialise it off the event loop, and the deeply nested profile
    trees the performance report collects from the workers exceed dask.sizeof's recursion
    limit. The message is sent all the same (serialised off the loop); nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Defaulting to -1 B" not in record.getMessage()


def _quiet_sizeof_probe() -> None:
    logger = logging.getLogger("distributed.sizeof")
    if not any(isinstance(f, _SizeofProbeFilter) for f in logger.filters):
        logger.addFilter(_SizeofProbeFilter())


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
    # With cluster.reuse_memory (the default) the workers go further and keep freed memory
    # for reuse (daskadmm.heap: sample-sized arrays above glibc's adaptive 32 MiB limit
    # page-faulted in afresh every time).
    # A nanny also writes its pre-spawn variables into this process's environment, so an
    # earlier cluster in this process leaves distributed's value behind: drop that one too.
    trim = "MALLOC_TRIM_THRESHOLD_"
    spawn: dict[str, str | None] = {f"distributed.nanny.pre-spawn-environ.{k}": v
                                    for k, v in env.items()}
    for key, value in heap.worker_environ().items():  # an earlier cluster's, as above
        if os.environ.get(key) == value:
            del os.environ[key]
    if ccfg.memory_limit in ("auto", None):
        inherited = os.environ.get(trim)
        default = dask.config.get(f"distributed.nanny.pre-spawn-environ.{trim}", None)
        if inherited is not None and inherited == str(default):
            del os.environ[trim]
        spawn[f"distributed.nanny.pre-spawn-environ.{trim}"] = None
        if ccfg.reuse_memory:
            spawn.update({f"distributed.nanny.pre-spawn-environ.{k}": v
                          for k, v in heap.worker_environ().items()})
    # memory_limit=auto is left to LocalCluster, which shares the machine's memory out over
    # the workers; passed on as "auto", each worker would take its thread share of the
    # machine's cores instead (1/16 of the memory for 2 one-thread workers on 16 cores)
    limit = {} if ccfg.memory_limit == "auto" else {"memory_limit": ccfg.memory_limit}
    with dask.config.set(spawn):
        return LocalCluster(
            n_workers=ccfg.n_workers,
            threads_per_worker=ccfg.threads_per_worker,
            processes=True,
            **limit,
            dashboard_address=dash,
            host="127.0.0.1",
            env=env,
            silence_logs=logging.WARNING,
        )


def current_client():
    """The active ``distributed.Client`` of this process (``Client.current()``), or None."""
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        client = Client.current(allow_global=True)
    except ValueError:
        return None
    return client if client.status == "running" else None


def resolve_client(ccfg: ClusterConfig, client=None):
    """The client a run uses without starting a cluster: ``client`` if given, else, for
    ``cluster.kind=local``, the active client of this process (a notebook's ``Client()``);
    None: the run starts its own cluster (or connects to ``cluster.address``)."""
    if client is not None:
        if getattr(client, "status", None) != "running":
            raise ConnectionError(f"the Dask client passed to fit is not running (status "
                                  f"{getattr(client, 'status', '?')!r})")
        return client
    if ccfg.kind == "local" and not _SHARED.get("address"):
        return current_client()
    return None


def in_process_reason(opts: EngineOptions, state: int, client=None) -> str | None:
    """Why a ``cluster.kind=local`` run goes in-process instead (None: it starts or joins a
    LocalCluster). A small problem runs faster on Dask's threaded scheduler in this process,
    with its state in memory, than on worker processes: they add start-up (seconds), a copy of
    every block's inputs per task and a Zarr round trip per chunk, which at this size cost more
    than the math. It applies only to the ADMM algorithms (the backprop baselines use no
    cluster), and only where nothing else asks for the cluster or the Zarr store: no
    client given or active, no checkpoints, no resume, no ``storage.url``, no
    ``storage.keep_state``, ``chunk_size`` (other than 0 or auto), ``compressor`` or
    ``cluster.memory_limit`` set, and an
    ADMM state (``state`` bytes) of at most ``cluster.in_process_mb`` MiB."""
    c, s = opts.cluster, opts.storage
    if c.kind != "local" or opts.algorithm not in ADMM_ALGORITHMS or c.in_process_mb <= 0 or \
            state > c.in_process_mb * 2**20:
        return None
    if client is not None or current_client() is not None:
        return None
    if opts.checkpoint_every or opts.resume or s.url or s.keep_state or \
            s.chunk_size not in (0, "auto") or \
            s.compressor != "none" or c.memory_limit != "auto":
        return None
    return (f"small problem (ADMM state {state / 2**20:.1f} MiB <= cluster.in_process_mb="
            f"{c.in_process_mb:g}): running in this process on Dask's threaded scheduler "
            f"({c.threads} threads, state in memory), no LocalCluster "
            f"and no dashboard; cluster.in_process_mb=0 starts the LocalCluster")


AUTO_CHUNK_MIN = 4096
"""``storage.chunk_size=auto`` makes no chunk smaller than this many samples (unless the
memory asks for it): on 2 workers at width 128 (RADMM-3A), 8,192 samples ran 8% faster in 2
chunks of 4,096 than in one, and 4 chunks of 2,048 were no faster than one (task and I/O
overhead per chunk); 16,384 samples ran 1.4x faster in 2 chunks than in one."""

AUTO_CHUNK_MEMORY = 4.0
"""``storage.chunk_size=auto`` keeps the ADMM state estimate (:func:`daskadmm.config.state_bytes`)
divided by the number of chunks below 1/``AUTO_CHUNK_MEMORY`` of a worker's usable memory: the
measured peak per worker was 1.1-1.9x the estimate over the chunks (the store's layout has
more variables than the estimate counts for some algorithms), and distributed starts spilling
at 60% of the limit."""

WORKER_BASELINE = 256 * 2**20
"""What an idle worker process holds (Python, NumPy, distributed), taken off its memory limit
before the state is shared out (at most 3/4 of the limit)."""


def auto_chunk_size(n: int, state: int, threads: int, memory: float | None,
                    per_worker: int = 1) -> int:
    """The chunk size ``storage.chunk_size=auto`` picks (0: one chunk) for ``n`` samples whose
    ADMM state is estimated at ``state`` bytes, on ``threads`` worker threads in all whose
    smallest memory limit is ``memory`` bytes (None: no limit), at most ``per_worker`` threads
    in one worker (each may hold a chunk task's arrays at once).

    One chunk per worker thread, so that every worker gets one when the chunk tasks are placed
    by chunk (fastest measured: on 2 workers with 32,768 samples, width 128, depth 6, 2 chunks
    took 2.4 s per iteration for pdADMM against 2.6-2.7 s for 1 or 4 and 2.9-3.8 s for 8 or 16;
    RADMM-3A 2.2-2.5 s for 2 or 4 against 3.9-4.2 s for 1 and 2.6-2.9 s for 8 or 16); but no
    chunk below :data:`AUTO_CHUNK_MIN` samples, and as many more as a worker's memory needs
    (:data:`AUTO_CHUNK_MEMORY`)."""
    chunks = max(1, min(threads, n // AUTO_CHUNK_MIN))
    if memory is not None and memory > 0:
        usable = max(memory - WORKER_BASELINE, memory / 4) / max(1, per_worker)
        chunks = max(chunks, math.ceil(AUTO_CHUNK_MEMORY * state / usable))
    chunks = min(chunks, n)
    return 0 if chunks <= 1 else -(-n // chunks)


def _worker_memory(value: Any, n_workers: int, threads_per_worker: int) -> float | None:
    """The memory limit in bytes (None: none) of a worker of the LocalCluster
    :func:`_start_local_cluster` starts for ``cluster.memory_limit=value``: ``auto`` shares
    the machine's memory out over the workers, as LocalCluster does."""
    from distributed.worker_memory import parse_memory_limit

    if value == "auto":
        limit = parse_memory_limit("auto", 1, max(1, n_workers), logger=log)
    else:
        limit = parse_memory_limit(value, threads_per_worker, logger=log)
    return float(limit) if limit else None


def _client_shape(client) -> tuple[int, float | None, int]:
    """(worker threads in all, the smallest worker memory limit or None, the most threads
    of one worker) of a client's cluster; waits for a first worker to join."""
    with contextlib.suppress(Exception):
        client.wait_for_workers(1, timeout=60)
    workers = list(client.scheduler_info(n_workers=-1)["workers"].values())
    threads = [int(w.get("nthreads", 1)) for w in workers]
    limits = [float(w["memory_limit"]) for w in workers if w.get("memory_limit")]
    return max(1, sum(threads)), (min(limits) if limits else None), max(threads, default=1)


def chunk_size_for(ccfg: ClusterConfig, n: int, state: int, client=None) -> tuple[int, str]:
    """``storage.chunk_size=auto`` resolved for a run on ``ccfg`` (or ``client``'s cluster):
    ``(chunk size, how it was chosen)``. Worker threads and memory come from the cluster this
    run will use: the given or active client's (a Hydra multirun's shared cluster included),
    the scheduler at ``cluster.address`` (asked once), else the configuration (a LocalCluster's
    ``n_workers x threads_per_worker`` and memory limit; the synchronous scheduler: one thread;
    the threaded one: its threads, the machine's memory)."""
    from distributed.system import MEMORY_LIMIT

    client = resolve_client(ccfg, client)  # the active client too, as the run will use it
    per_worker = ccfg.threads_per_worker
    if client is None and ccfg.kind == "address":
        with _client_at_address(ccfg) as probe:
            threads, memory, per_worker = _client_shape(probe)
    elif client is None and ccfg.kind == "local" and _SHARED.get("address"):
        from distributed import Client

        with Client(_SHARED["address"]) as probe:
            threads, memory, per_worker = _client_shape(probe)
    elif client is not None:
        threads, memory, per_worker = _client_shape(client)
    elif ccfg.kind == "synchronous":
        threads, memory, per_worker = 1, float(MEMORY_LIMIT), 1
    elif ccfg.kind == "threads":  # one process: all its threads share the machine's memory
        threads = ccfg.threads
        memory, per_worker = float(MEMORY_LIMIT), threads
    else:
        threads = ccfg.threads
        memory = _worker_memory(ccfg.memory_limit, ccfg.n_workers, ccfg.threads_per_worker)
    cs = auto_chunk_size(n, state, threads, memory, per_worker)
    chunks = 1 if cs == 0 else -(-n // cs)
    mem = "no memory limit" if memory is None else f"{memory / 2**30:.1f} GiB per worker"
    if chunks > threads:
        why = "more than one per worker thread, for memory"
    elif chunks < threads:
        why = f"fewer than the worker threads: none below {AUTO_CHUNK_MIN:,} samples"
    else:
        why = "one per worker thread"
    return cs, (f"storage.chunk_size=auto: {chunks} chunk{'s' if chunks > 1 else ''} of "
                f"{cs or n} samples, {why} ({threads} worker thread"
                f"{'s' if threads > 1 else ''}, {mem}, ADMM state about "
                f"{state / 2**20:,.0f} MiB)")


def client_is_local(client) -> bool:
    """Whether every worker of ``client`` runs on this machine (so they share its disk)."""
    import socket
    from urllib.parse import urlsplit

    here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    with contextlib.suppress(OSError):
        here.add(socket.gethostbyname(socket.gethostname()))
    with contextlib.suppress(Exception):
        from distributed.utils import get_ip

        here.add(get_ip())
    workers = client.scheduler_info(n_workers=-1)["workers"]
    for address in workers:
        if address.startswith("inproc://"):
            continue
        host = urlsplit(address).hostname
        if host not in here:
            return False
    return True


def _client_at_address(ccfg: ClusterConfig):
    """A new ``Client`` of the scheduler at ``cluster.address``; ConnectionError (one line)
    when it cannot be reached."""
    from distributed import Client

    try:
        return Client(ccfg.address, timeout=f"{ccfg.connect_timeout}s")
    except Exception as exc:  # OSError, TimeoutError, or garbage from a non-Dask server
        raise ConnectionError(f"cannot reach the Dask scheduler at {ccfg.address}: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from None


@contextlib.contextmanager
def connect(ccfg: ClusterConfig, client=None):
    """Yield a distributed ``Client`` for ``cluster.kind`` local or address.

    With ``client`` (the caller's own, see :func:`resolve_client`) no cluster is started and
    the client is left open at the end: it belongs to the caller."""
    from distributed import Client

    _quiet_sizeof_probe()
    owned = client is None  # a caller's client is used as it is and left open
    cluster = None
    if client is None:
        if ccfg.kind == "address":
            client = _client_at_address(ccfg)
        elif _SHARED.get("address"):
            client = Client(_SHARED["address"])
        else:
            cluster = _start_local_cluster(ccfg)
            client = Client(cluster)
    try:
        try:
            client.wait_for_workers(1, timeout=max(60.0, ccfg.connect_timeout))
        except Exception:
            raise ConnectionError(f"the Dask cluster at {client.scheduler.address} has no "
                                  "workers (none joined within 60 s)") from None
        # one BLAS thread per worker (spinning BLAS pools slow small solves ~100x); a caller's
        # workers keep this setting after the run
        client.run(_prepare_worker, ccfg.blas_threads)
        if owned and ccfg.kind != "address":
            # our own worker processes share the terminal's process group: Ctrl-C is for the
            # driver (it stops the run at the next evaluation), not a way to kill workers
            client.register_plugin(_IgnoreSigint(), name="daskadmm-ignore-sigint")
        yield client
    finally:
        if owned:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def _ignore_sigint() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object  # type: ignore[misc,assignment]


class _IgnoreSigint(_WorkerPlugin):
    """Worker plugin: the worker process ignores SIGINT (also after a nanny restart)."""

    def setup(self, worker) -> None:
        _ignore_sigint()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


