"""The Dask engine: graph wiring, and every scheduler equal to the serial reference."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.config import Config, algorithm_defaults
from daskadmm.data import load_dataset
from daskadmm.graph import chunked as chunk_graph
from daskadmm.graph import critical_path_length
from daskadmm.model import Architecture
from daskadmm.splitting import BlockSpec, Options, Penalties

TOL = 0.0  # one chunk: the reference's arithmetic, so every weight and statistic is the same bits
# RADMM-2's chunk plan adds a few of its statistics' terms in another order (weights bitwise)
RADMM2_STATS_TOL = 1e-15


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _window(N: int, K: int, name: str = "radmm3", evals=(), kind: str = "resnet"):
    """The in-memory engine's graph of K iterations: the chunk plan with one chunk on the
    dataflow backend. Returns (start nodes, window)."""
    arch = Architecture(kind, N, 3, 4, 2)
    n = 10
    specs = [BlockSpec(arch, i, n) for i in range(1, N + 1)]
    slices = [slice(0, n)]
    weights = [np.zeros(arch.weight_shape(i)) for i in range(1, N + 1)]
    start, prev, _ = chunk_graph.start_nodes(name, arch, None, slices, "run", weights, n, None,
                                             Options(), 1.0, flow=True, rho_first=(1.0,))
    prev.update({f"small-b{i}": f"init_small-b{i}-run" for i in range(1, N + 1)})
    pens = {k: Penalties(1.0, 1.0, 1e-3, 1e-3) for k in range(1, K + 2)}
    wg = chunk_graph.build_window(name, specs, pens, 0, K, prev, "run", None, slices, evals,
                                  (arch, "regression", "mse", tuple(slices), (slice(0, 4),)),
                                  flow=True)
    return start, wg


@pytest.mark.parametrize(("N", "K"), [(2, 1), (3, 5), (5, 4), (8, 10), (12, 3)])
def test_task_count_and_longest_chain(N, K):
    _, wg = _window(N, K)
    updates = [n for n in wg.nodes if n.key.startswith("radmm3_chunk-")]
    picks = {n.key for n in wg.nodes if n.key.startswith("pick-")}
    # per block and iteration: its W (for i > 1 also the reduction of block i-1's chunk
    # statistics), its chunk task, its statistics; the reduction of block 1's statistics for
    # the next W_1; and one iteration_stats task per iteration
    assert len(updates) == K * N
    assert len(wg.nodes) - len(picks) == K * (3 * N + 2)
    # of a neighbour's chunk task, only the left one's V travels (picked on its worker); the
    # right neighbour's whole output is read
    assert {p for p in picks if "-of-radmm3_chunk-" in p} == {
        f"pick-b{b}V{k % 2}c0-of-radmm3_chunk-b{b}-c0-k{k}-run"
        for k in range(1, K + 1) for b in range(1, N)}
    # the wavefront, counted on the graph itself: 2K + N - 2 block updates in a chain (block i
    # of iteration k waits for block i-1 of k and block i+1 of k-1), not K N
    assert critical_path_length(wg.nodes, "radmm3_chunk-") == 2 * K + N - 2


def test_each_task_depends_exactly_on_its_neighbours():
    N, K = 5, 4
    _, wg = _window(N, K)
    picked = {n.key: n.args[0].key for n in wg.nodes if n.key.startswith("pick-")}

    def chunk(bb, kk):
        return "init_chunk-c0-run" if kk == 0 else f"radmm3_chunk-b{bb}-c0-k{kk}-run"

    def small(bb, kk):
        return f"init_small-b{bb}-run" if kk == 0 else f"update_weights-b{bb}-k{kk}-run"

    seen = 0
    for node in wg.nodes:
        if not node.key.startswith("radmm3_chunk-"):
            continue
        b, k = node.block, int(node.key.split("-k")[1].split("-")[0])
        expected = {small(b, k), chunk(b, k - 1)}  # its W of k, its own values of k-1
        # left, same iteration (the data for block 1)
        expected.add("data_x-b1-c0-run" if b == 1 else chunk(b - 1, k))
        if b < N:
            expected |= {chunk(b + 1, k - 1), small(b + 1, k - 1)}  # right, previous iteration
        if b == N:
            expected.add(f"data_y-b{N}-c0-run")
        assert {picked.get(d, d) for d in node.deps()} == expected, node.key
        seen += 1
    assert seen == N * K


def test_keys_read_like_the_algorithm_and_are_unique():
    start, wg = _window(4, 3, evals=[3])
    keys = [n.key for n in start + wg.nodes]
    assert len(keys) == len(set(keys))
    assert "radmm3_chunk-b3-c0-k2-run" in keys
    assert "evaluate-k3-run" in keys
    assert all(k.endswith("-run") for k in keys)


def test_graph_holds_no_sample_arrays():
    # big arrays never travel inside the graph: only references, specs, scalars and (the
    # start's) weights
    start, wg = _window(4, 3, evals=[3])

    def arrays(x):
        if isinstance(x, np.ndarray):
            yield x
        elif isinstance(x, list | tuple):
            for y in x:
                yield from arrays(y)

    for node in start + wg.nodes:
        for a in arrays(node.args):
            assert a.shape[-1] != 10, node.key  # nothing with the samples' dimension


def test_graph_cost_does_not_grow_with_iteration():
    arch = Architecture("resnet", 6, 3, 4, 2)
    specs = [BlockSpec(arch, i, 10) for i in range(1, 7)]
    _, wg = _window(6, 1)
    sizes = []
    for k0 in range(1, 5):  # windows of one iteration, each from the last one's roles
        pens = {k0 + 1: Penalties(1.0, 1.0, 1e-3, 1e-3), k0 + 2: Penalties(1.0, 1.0, 1e-3, 1e-3)}
        wg = chunk_graph.build_window("radmm3", specs, pens, k0, k0 + 1, wg.last, "run", None,
                                      [slice(0, 10)], flow=True)
        sizes.append((len(wg.nodes), sum(len(n.deps()) for n in wg.nodes), len(wg.last)))
    assert len(set(sizes)) == 1


def _problem(activation="tanh", classification=False):
    cfg = Config()
    cfg.algorithm = algorithm_defaults("radmm3")  # _run picks the algorithm of each run
    cfg.data.name = "synthetic"
    cfg.data.n_samples = 160
    cfg.data.n_classes = 3 if classification else 0
    cfg.model.width = 6
    cfg.model.depth = 4
    cfg.model.activation = activation
    cfg.run.iterations = 5
    cfg.run.eval_every = 2
    cfg.run.progress = False
    cfg.storage.state = "memory"  # the all-in-memory Dask path (test_storage.py: Zarr state)
    return cfg, load_dataset(cfg.data, seed=0)


def _run(cfg, ds, kind, window=0, algorithm="radmm3", address=None):
    c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kind=kind,
                                                            address=address),
                            run=dataclasses.replace(cfg.run, window=window),
                            algorithm=dataclasses.replace(cfg.algorithm, name=algorithm))
    return api.fit(c, dataset=ds)


def _assert_equal(ref, res, tol=TOL):
    """Same iterations, status and weights (bitwise); the history's columns to ``tol``."""
    assert res.iterations == ref.iterations
    assert res.status == ref.status
    for a, b in zip(ref.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    for ra, rb in zip(ref.history, res.history, strict=True):
        assert ra["iteration"] == rb["iteration"]
        for col in ("objective", "primal_residual", "dual_residual", "test_metric"):
            assert abs(ra[col] - rb[col]) <= tol * max(1.0, abs(ra[col])), col


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3a", "radmm3l", "radmm2"])
@pytest.mark.parametrize("kind", ["synchronous", "threads"])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_local_schedulers_equal_reference(algorithm, kind, window):
    cfg, ds = _problem("relu" if algorithm == "radmm2" else "tanh")
    ref = _run(cfg, ds, "reference", algorithm=algorithm)
    res = _run(cfg, ds, kind, window, algorithm=algorithm)
    _assert_equal(ref, res, TOL if algorithm != "radmm2" else RADMM2_STATS_TOL)
    assert res.info["engine"] == "dask"


def test_classification_cross_entropy_equal_reference():
    cfg, ds = _problem("relu", classification=True)
    _assert_equal(_run(cfg, ds, "reference"), _run(cfg, ds, "threads", 3))


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3a", "radmm3l", "radmm2"])
def test_process_cluster_equal_reference_and_bitwise_repeatable(local_cluster, algorithm):
    cfg, ds = _problem("relu" if algorithm == "radmm2" else "tanh")
    ref = _run(cfg, ds, "reference", algorithm=algorithm)
    addr = local_cluster.scheduler_address
    runs = [_run(cfg, ds, "address", w, algorithm=algorithm, address=addr) for w in (1, 3, 3)]
    for res in runs:
        _assert_equal(ref, res, TOL if algorithm != "radmm2" else RADMM2_STATS_TOL)
    # two runs are bitwise identical
    for a, b in zip(runs[1].weights, runs[2].weights, strict=True):
        assert np.array_equal(a, b)
    assert runs[1].info["tasks_run"] > 0
    assert runs[1].info["workers"] == 2


def test_local_cluster_started_by_runner(tmp_path):
    cfg, ds = _problem()
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    ref = _run(cfg, ds, "reference")
    c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kind="local",
                                                              in_process_mb=0))
    res = api.fit(c, dataset=ds, run_dir=tmp_path)
    _assert_equal(ref, res)
    assert res.info["dashboard"].startswith("http://127.0.0.1:")
    report = (tmp_path / "dask-report.html").read_text()
    # offline-safe: Bokeh's JavaScript is inline, no script is loaded from elsewhere
    assert "Bokeh" in report and "<script" in report
    assert not re.search(r"<script[^>]+src=[\"']https?://", report)
    assert (tmp_path / "task-stream.json").stat().st_size > 0
    assert res.info["compute_seconds"] > 0
    assert 0 < res.info["workers_busy"] <= 1


def test_small_local_run_goes_in_process_and_says_so(tmp_path):
    """The default cluster.kind=local with a small state runs on the threaded scheduler in this
    process (no LocalCluster), says so, and gives the reference's iterates; the stored model
    records the configuration as given and where it ran."""
    import zarr

    cfg, ds = _problem()
    cfg.storage.state = "zarr"  # the default: replaced by memory in process
    ref = _run(cfg, ds, "reference")
    c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, kind="local"),
                            algorithm=dataclasses.replace(cfg.algorithm, name="radmm3"))
    res = api.fit(c, dataset=ds, run_dir=tmp_path)
    _assert_equal(ref, res)
    attrs = zarr.open_group(str(tmp_path / "model.zarr"), mode="r").attrs
    assert attrs["config"]["cluster"]["kind"] == "local"
    assert attrs["config"]["storage"]["state"] == "zarr"
    assert attrs["engine_note"] == res.info["engine_note"]
    assert res.info["engine"] == "dask" and res.info["cluster"] == "threads"
    assert "dashboard" not in res.info
    note = res.info["engine_note"]
    assert "small problem" in note and "cluster.in_process_mb=0" in note


@pytest.mark.parametrize("change", ["off", "large", "checkpoints", "resume", "url", "client",
                                    "threads", "keep_state", "chunk_size", "compressor",
                                    "memory_limit", "baseline"])
def test_in_process_only_where_nothing_asks_for_the_cluster(change):
    from daskadmm.config import state_bytes
    from daskadmm.engines.cluster import in_process_reason

    cfg, ds = _problem()
    cfg.cluster.kind = "local"
    state = state_bytes(cfg, ds.n_train)
    assert in_process_reason(api.engine_options(cfg), state) is not None
    client = None
    if change == "off":
        cfg.cluster.in_process_mb = 0
    elif change == "large":
        cfg.cluster.in_process_mb = 0.99 * state / 2**20
    elif change == "checkpoints":
        cfg.run.checkpoint_every = 5
    elif change == "resume":
        cfg.run.resume = True
    elif change == "url":
        cfg.storage.url = "memory://mine"
    elif change == "client":
        client = object()  # a client given to fit: the run uses it
    elif change == "keep_state":
        cfg.storage.keep_state = True  # asks for the Zarr store
    elif change == "chunk_size":
        cfg.storage.chunk_size = 40
    elif change == "compressor":
        cfg.storage.compressor = "zstd"
    elif change == "memory_limit":
        cfg.cluster.memory_limit = "1GB"
    elif change == "baseline":
        cfg.algorithm = algorithm_defaults("adam")  # backprop: no Dask engine at all
    else:
        cfg.cluster.kind = "threads"  # only cluster.kind=local is ever replaced
    assert in_process_reason(api.engine_options(cfg), state, client) is None


def test_address_unreachable_is_a_clear_error():
    cfg, ds = _problem()
    cfg.cluster.connect_timeout = 1.0
    with pytest.raises(ConnectionError, match="cannot reach the Dask scheduler"):
        _run(cfg, ds, "address", address="tcp://127.0.0.1:9")


def test_stop_inside_window_matches_reference():
    cfg, ds = _problem()
    cfg.run.iterations = 40
    cfg.run.eval_every = 3
    cfg.run.tol_primal = 1.0  # met at the first evaluation: speculative iterations discarded
    ref = _run(cfg, ds, "reference")
    assert ref.status == "converged" and ref.iterations == 3
    _assert_equal(ref, _run(cfg, ds, "threads", 8))


@pytest.mark.parametrize("algorithm", ["dladmm", "pdadmm"])
@pytest.mark.parametrize("kind", ["synchronous", "threads"])
def test_mlp_algorithms_on_dask_equal_reference(algorithm, kind):
    cfg, ds = _problem("relu", classification=True)
    cfg.model.kind = "mlp"
    cfg.model.depth = 5
    ref = _run(cfg, ds, "reference", algorithm=algorithm)
    for window in (1, 3):
        res = _run(cfg, ds, kind, window, algorithm=algorithm)
        for a, b in zip(ref.weights, res.weights, strict=True):
            assert np.array_equal(a, b)
        assert [r["objective"] for r in res.history] == [r["objective"] for r in ref.history]


@pytest.mark.parametrize("algorithm", ["dladmm", "pdadmm"])
def test_mlp_algorithms_on_process_cluster_bitwise(local_cluster, algorithm):
    cfg, ds = _problem("relu", classification=True)
    cfg.model.kind = "mlp"
    cfg.model.depth = 6
    ref = _run(cfg, ds, "reference", algorithm=algorithm)
    res = _run(cfg, ds, "address", 3, algorithm=algorithm,
               address=local_cluster.scheduler_address)
    for a, b in zip(ref.weights, res.weights, strict=True):
        assert np.array_equal(a, b)


def test_tasks_get_aligned_arrays():
    # a worker deserialises arrays at any byte offset in its network frames; numpy multiplies
    # unaligned arrays without BLAS (other rounding), so tasks run on aligned copies
    from daskadmm.engines.executors import _aligned, _call_aligned

    X = np.random.default_rng(0).standard_normal((10, 128))
    buf = np.empty(X.nbytes + 16, dtype=np.uint8)
    off = 4 if buf.ctypes.data % 8 == 0 else 8 - buf.ctypes.data % 8 + 4
    Xu = buf[off:off + X.nbytes].view(np.float64).reshape(X.shape)
    Xu[...] = X
    assert not Xu.flags.aligned
    state = _aligned({"W": Xu, "pair": (Xu, [Xu]), "k": 3})
    assert state["W"].flags.aligned and state["pair"][0].flags.aligned
    assert state["pair"][1][0].flags.aligned and state["k"] == 3
    with threadpool_limits(1):
        assert np.array_equal(_call_aligned(lambda A: A @ A.T, Xu), X @ X.T)


def test_local_cluster_workers_start_with_heap_reuse_and_pinned_blas(monkeypatch):
    # distributed's MALLOC_TRIM_THRESHOLD_=65536 made every n-sized temporary a fresh mmap
    # (block updates 1.4-1.6x slower in a worker than in the driver); also when an earlier
    # cluster left it in this process's environment. With cluster.reuse_memory the workers
    # keep freed memory for reuse (daskadmm.heap), from their start.
    from distributed import Client

    from daskadmm.config import ClusterConfig
    from daskadmm.engines.cluster import _start_local_cluster
    from daskadmm.heap import worker_environ

    keys = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX",
            "OPENBLAS_NUM_THREADS")

    def worker_env(**kw):
        with _start_local_cluster(ClusterConfig(n_workers=1, blas_threads=1,
                                                dashboard_address="127.0.0.1:0", **kw)) as cl, \
                Client(cl) as client:
            return list(client.run(lambda: {k: os.environ.get(k) for k in keys}).values())[0]

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert worker_env() == {**worker_environ(), "OPENBLAS_NUM_THREADS": "1"}
    # reuse off: glibc's adaptive defaults (and not what the cluster before left behind)
    assert worker_env(reuse_memory=False) == {
        "MALLOC_TRIM_THRESHOLD_": None, "MALLOC_MMAP_THRESHOLD_": None,
        "MALLOC_ARENA_MAX": None, "OPENBLAS_NUM_THREADS": "1"}
    # an explicit memory limit (out-of-core runs): memory before speed, distributed's setting
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert worker_env(memory_limit="1GB") == {
        "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": None,
        "MALLOC_ARENA_MAX": None, "OPENBLAS_NUM_THREADS": "1"}


@pytest.mark.parametrize("state", ["memory", "zarr"])
def test_lost_workers_are_recomputed_to_the_same_bits(tmp_path, state):
    # every worker dies mid-run (here: SIGKILL, as the nanny's memory monitor would). The run
    # starts again from its last checkpoint (Zarr state) or from iteration 0 (state in worker
    # memory: the scattered inputs died with the workers) once the nanny has restarted them,
    # and ends as an uninterrupted run would.
    import signal

    from distributed import LocalCluster

    cfg, ds = _problem()
    cfg.run.iterations, cfg.run.eval_every = 12, 1
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        c = dataclasses.replace(cfg, cluster=dataclasses.replace(
            cfg.cluster, kind="address", address=cluster.scheduler_address),
            storage=dataclasses.replace(cfg.storage, state=state,
                                        url=str(tmp_path / "s.zarr")))
        killed = []

        def kill_workers(record):
            if record["iteration"] >= 2 and not killed:
                killed.extend(n.process.pid for n in cluster.workers.values())
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)

        res = api.fit(c, dataset=ds, callback=kill_workers)
        assert res.info["recoveries"] >= 1
        ref = api.fit(dataclasses.replace(c, storage=dataclasses.replace(
            c.storage, url=str(tmp_path / "ref.zarr"))), dataset=ds)
    for a, b in zip(ref.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in ref.history]
    assert killed


def test_the_size_probe_warning_is_dropped_and_nothing_else():
    import logging

    from daskadmm.engines.cluster import _quiet_sizeof_probe

    _quiet_sizeof_probe()
    _quiet_sizeof_probe()  # idempotent
    logger = logging.getLogger("distributed.sizeof")
    probe = logging.LogRecord("distributed.sizeof", logging.WARNING, __file__, 1,
                              "Sizeof calculation for object of type 'dict' failed. "
                              "Defaulting to -1 B", None, None)
    other = logging.LogRecord("distributed.sizeof", logging.WARNING, __file__, 1,
                              "Sizeof calculation for object of type 'X' failed. "
                              "Defaulting to 0.95 MiB", None, None)
    assert len(logger.filters) == 1
    assert not logger.filter(probe) and logger.filter(other)


def test_steady_time_per_iteration_counts_whole_windows(monkeypatch):
    """Engines that deliver a window of iterations at once: the steady time per iteration is
    measured between window ends, not over the processing of records that arrived together."""
    from daskadmm.monitor import Monitor

    clock = iter([0.0, 4.0, 8.0, 12.0])  # three windows of 4 iterations, 4 s each
    mon = Monitor(iterations=12, eval_every=1, evaluate=lambda w: {})
    monkeypatch.setattr(mon, "elapsed", lambda: next(clock))
    for k1 in (4, 8, 12):
        mon.arrived(k1)
    assert mon.steady_seconds_per_iteration() == pytest.approx(1.0)
    one = Monitor(iterations=4, eval_every=1, evaluate=lambda w: {})
    monkeypatch.setattr(one, "elapsed", lambda: 1.0)
    one.arrived(4)
    assert np.isnan(one.steady_seconds_per_iteration())  # a single window: not measurable


def test_steady_time_per_iteration_starts_after_the_first_window(monkeypatch):
    """A pipelined engine's first window runs as one wavefront, so its last results arrive
    bunched after the whole window's work: the steady time per iteration is measured from the
    end of that window (``Monitor.ramp``) over the second half of this run's iterations (a
    resumed run's too), and a run of one window has none."""
    from daskadmm.monitor import Monitor

    def mon(times, ramp, k_start=0):
        m = Monitor(iterations=99, eval_every=1, evaluate=lambda w: {}, ramp=ramp,
                    k_start=k_start)
        m.step_times = [(k_start + j, t) for j, t in enumerate(times, start=1)]
        return m

    # window 4: iterations 1-4 all done at t = 4 (one wavefront), then one every second
    times = [1.0, 3.9, 3.95, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert mon(times, 4).steady_seconds_per_iteration() == pytest.approx(1.0)
    assert mon(times, 0).steady_seconds_per_iteration() == pytest.approx(1.0)
    # 6 iterations: the second half holds bunched results; past the ramp it does not
    assert mon(times[:6], 0).steady_seconds_per_iteration() == pytest.approx((6 - 3.95) / 3)
    assert mon(times[:6], 4).steady_seconds_per_iteration() == pytest.approx(1.0)
    # a run resumed at iteration 40: the same, counted from there
    assert mon(times[:6], 44, k_start=40).steady_seconds_per_iteration() == pytest.approx(1.0)
    assert np.isnan(mon([1.0] * 8, 8).steady_seconds_per_iteration())  # one window
    # window ends (the local schedulers): none counted before the ramp's end
    clock = iter([4.0, 5.0, 6.0, 7.0])
    win = Monitor(iterations=8, eval_every=1, evaluate=lambda w: {}, ramp=4)
    monkeypatch.setattr(win, "elapsed", lambda: next(clock))
    for k1 in (2, 4, 6, 8):
        win.arrived(k1)
    assert win.steady_seconds_per_iteration() == pytest.approx((7.0 - 5.0) / (8 - 4))
    # a first window cut short by a barrier: no window ends on the ramp; the first one past it
    clock = iter([3.0, 11.0, 16.0])
    cut = Monitor(iterations=16, eval_every=1, evaluate=lambda w: {}, ramp=8)
    monkeypatch.setattr(cut, "elapsed", lambda: next(clock))
    for k1 in (3, 11, 16):
        cut.arrived(k1)
    assert cut.steady_seconds_per_iteration() == pytest.approx(1.0)


@pytest.mark.parametrize("state", ["memory", "zarr"])
def test_local_schedulers_record_window_arrivals(state):
    cfg, ds = _problem()
    cfg.storage.state = state
    cfg.run.window = 2
    res = _run(cfg, ds, "synchronous", 2)
    steady = res.info["steady_seconds_per_iteration"]
    assert steady > 0 and np.isfinite(steady)


def test_stream_summary_counts_the_run_s_tasks_and_how_busy_the_workers_were():
    from daskadmm.engines.executors import _stream_summary

    def rec(key, *spans):
        return {"key": key, "startstops": [{"action": a, "start": s, "stop": e}
                                           for a, s, e in spans]}

    stream = [rec("a-r1", ("compute", 10.0, 12.0)),
              rec("b-r1", ("transfer", 12.0, 13.0), ("compute", 13.0, 14.0)),
              rec("c-other", ("compute", 0.0, 100.0))]  # another run's task
    s = _stream_summary(stream, "r1", workers=2)
    assert (s["tasks_run"], s["compute_seconds"], s["transfer_seconds"]) == (2, 3.0, 1.0)
    assert s["workers_busy"] == 3.0 / (2 * 4.0)  # 3 compute seconds in 2 workers x 4 s
    assert s["workers_busy_steady"] is None  # no iterations: no pipelined window
    assert _stream_summary([], "r1", workers=2)["workers_busy"] is None
    # inside the pipelined window: from the end of iteration 1's last task (at 4) to the
    # start of iteration 3's first task (at 10); the start task and the drain count only there
    stream = [rec("init_chunk-c0-r1", ("compute", 0.0, 1.0)),
              rec("x-b1-k1-r1", ("compute", 1.0, 3.0)), rec("x-b2-k1-r1", ("compute", 3.0, 4.0)),
              rec("x-b1-k2-r1", ("compute", 3.0, 6.0)), rec("x-b2-k2-r1", ("compute", 6.0, 9.0)),
              rec("x-b1-k3-r1", ("compute", 10.0, 11.0)),
              rec("x-b2-k3-r1", ("compute", 11.0, 12.0))]
    s = _stream_summary(stream, "r1", workers=2)
    assert s["workers_busy"] == 12.0 / (2 * 12.0)
    # 4..6 of the first k2 task, 6..9 of the second: 5 compute seconds in 2 workers x 6 s
    assert s["workers_busy_steady"] == 5.0 / (2 * 6.0)


def test_placement_by_block_or_by_chunk():
    """Blocks in contiguous ranges; by chunk, chunk c of every block on worker c * W // C and
    the small per-block tasks still on their block's worker; ``auto`` places by chunk only
    with the Zarr-resident state and at least one chunk per worker."""
    from types import SimpleNamespace

    from daskadmm.config import ClusterConfig
    from daskadmm.engines.driver import _Ctx
    from daskadmm.graph.nodes import Node

    workers = ["w0", "w1", "w2"]

    def ctx(placement, chunks, flow=False):
        c = SimpleNamespace(N=4, slices=[slice(i, i + 1) for i in range(chunks)], flow=flow,
                            opts=SimpleNamespace(cluster=ClusterConfig(placement=placement)))
        c.by_chunk = lambda W: _Ctx.by_chunk(c, W)
        return c

    place = _Ctx._placement(ctx("auto", 6), workers)
    assert place.blocks == {1: "w0", 2: "w0", 3: "w1", 4: "w2"}
    assert place.chunks == {0: "w0", 1: "w0", 2: "w1", 3: "w1", 4: "w2", 5: "w2"}
    assert place.of(Node("chunk", print, (), block=4, chunk=1)) == ["w0"]
    assert place.of(Node("small", print, (), block=4)) == ["w2"]
    assert place.of(Node("init", print, (), chunk=5)) == ["w2"]
    assert place.of(Node("sum", print, ())) is None
    assert _Ctx._placement(ctx("auto", 2), workers).chunks is None  # fewer chunks than workers
    assert _Ctx._placement(ctx("auto", 6, flow=True), workers).chunks is None  # in memory
    assert _Ctx._placement(ctx("blocks", 6), workers).chunks is None
    assert _Ctx._placement(ctx("chunks", 2), workers).chunks == {0: "w0", 1: "w1"}
    by_block = _Ctx._placement(ctx("blocks", 6), workers)
    assert by_block.of(Node("chunk", print, (), block=4, chunk=1)) == ["w2"]
    assert by_block.of(Node("init", print, (), chunk=5)) is None


def test_automatic_window_is_one_where_tasks_run_one_at_a_time():
    """A window only overlaps iterations where tasks can run at once; elsewhere it keeps more
    iterations' values alive (the synchronous scheduler, one thread)."""
    from types import SimpleNamespace

    from daskadmm.config import ClusterConfig
    from daskadmm.engines.driver import auto_window
    from daskadmm.graph import default_window

    def window(kind, workers=2, threads=1, asked=0):
        opts = SimpleNamespace(window=asked, cluster=ClusterConfig(
            kind=kind, n_workers=workers, threads_per_worker=threads))
        return auto_window(opts, 8)

    assert window("synchronous") == window("threads", 1, 1) == 1
    assert window("threads") == window("threads", 1, 2) == window("local") == default_window(8)
    assert window("synchronous", asked=3) == window("local", asked=3) == 3


def test_a_result_whose_worker_dies_after_the_task_ends_is_a_lost_worker():
    """The task has finished but the gather of its result never returns (the worker holding it
    died, and distributed reschedules the task onto that pinned, dead worker): the wait keeps
    watching the workers and reports the loss instead of hanging."""
    import threading

    from daskadmm.engines.driver import _Ctx
    from daskadmm.engines.executors import _WorkerLost

    release = threading.Event()

    class StuckFuture:
        def result(self):
            release.wait(30)
            raise AssertionError("the wait should have given up first")

    class Client:
        calls = 0
        cancelled: list = []

        def run_on_scheduler(self, fn, *args):
            Client.calls += 1
            return {"w0": "a"} if Client.calls > 2 else {"w0": "a", "w1": "b"}

        def cancel(self, futures):
            Client.cancelled.extend(futures)
            release.set()  # a cancelled future's fetch ends

    ctx = object.__new__(_Ctx)
    ctx._workers0 = {("w0", "a"), ("w1", "b")}
    stuck = StuckFuture()
    t0 = time.perf_counter()
    try:
        with pytest.raises(_WorkerLost, match="1 of 2 workers gone"):
            ctx._result(Client(), stuck)
    finally:
        release.set()
    assert time.perf_counter() - t0 < 10
    assert Client.cancelled == [stuck]  # the abandoned fetch is released


def test_a_result_is_returned_and_a_task_error_raised_as_it_is():
    from daskadmm.engines.driver import _Ctx

    class Done:
        def __init__(self, value=None, error=None):
            self.value, self.error = value, error

        def result(self):
            if self.error is not None:
                raise self.error
            return self.value

    class Client:
        def run_on_scheduler(self, fn, *args):
            return {"w0": "a"}

    ctx = object.__new__(_Ctx)
    ctx._workers0 = {("w0", "a")}
    assert ctx._result(Client(), Done(value=41)) == 41
    with pytest.raises(ValueError, match="bad chunk"):
        ctx._result(Client(), Done(error=ValueError("bad chunk")))


@pytest.mark.parametrize(("n_train", "n_test"), [(1, 1), (2, 1), (3, 5), (4, 2), (7, 3)])
def test_eval_split_visits_every_chunk_once_in_order(n_train, n_test):
    parts = chunk_graph.eval_split(n_train, n_test)
    assert [p[0] for p in parts] == [[c] for c in range(n_train)]
    assert [j for p in parts for j in p[1]] == list(range(n_test))
    sizes = [len(p[1]) for p in parts]
    assert max(sizes) - min(sizes) <= 1 + (n_test < n_train)  # spread, not all on one part


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize(("n_train", "n_test"), [(1, 1), (2, 1), (3, 5)])
def test_an_evaluation_in_parts_gives_the_one_pass_figures_bit_for_bit(loss, n_train, n_test):
    from daskadmm.chunks.common import (
        FlowCall,
        evaluate_chunks,
        evaluate_combine,
        evaluate_part,
        run_flow,
    )

    rng = np.random.default_rng(3)
    arch = Architecture("resnet", 3, 5, 7, 3, loss=loss)
    Ws = [rng.standard_normal(arch.weight_shape(i)) for i in range(1, 4)]
    smalls = [{"W": W} for W in Ws]
    task = "classification" if loss == "cross_entropy" else "regression"

    def chunks(n_chunks, size):
        sl = [slice(c * size, (c + 1) * size - (c % 2)) for c in range(n_chunks)]
        X = [rng.standard_normal((5, s.stop - s.start)) for s in sl]
        Y = [np.eye(3)[:, rng.integers(0, 3, x.shape[1])] if task == "classification"
             else rng.standard_normal((3, x.shape[1])) for x in X]
        return sl, X, Y

    train, Xtr, Ytr = chunks(n_train, 40)
    test, Xte, Yte = chunks(n_test, 17)
    data = {}
    for c in range(n_train):
        data[f"data/X/c{c}"], data[f"data/Y/c{c}"] = Xtr[c], Ytr[c]
    for j in range(n_test):
        data[f"data/X_test/c{j}"], data[f"data/Y_test/c{j}"] = Xte[j], Yte[j]

    def flow(fn, args, locs):
        return run_flow(FlowCall(fn, len(args), tuple(locs), False), *args,
                        *[data[loc] for loc in locs])

    whole, W_out = flow(evaluate_chunks, (None, arch, task, "m", tuple(train), tuple(test),
                                          *Ws), list(data))
    parts = []
    for cs, js in chunk_graph.eval_split(n_train, n_test):
        locs = [f"data/{v}/c{c}" for c in cs for v in ("X", "Y")]
        locs += [f"data/{v}/c{j}" for j in js for v in ("X_test", "Y_test")]
        parts.append(flow(evaluate_part, (None, arch, task, tuple((c, train[c]) for c in cs),
                                          tuple((j, test[j]) for j in js), *smalls), locs))
    split, W_split = evaluate_combine(len(parts), *parts, *smalls)
    assert split == whole  # the same floats, bit for bit
    assert set(whole) == {"train_loss", "train_metric", "test_loss", "test_metric"}
    assert all(a is b for a, b in zip(W_out + W_split, Ws + Ws, strict=True))
    # and the figures are those of the network on all the data at once (up to rounding)
    from daskadmm.model import forward, loss_sum
    out = forward(arch, Ws, np.hstack(Xte))[0][-1]
    assert whole["test_loss"] == pytest.approx(loss_sum(loss, out, np.hstack(Yte))
                                               / out.shape[1], rel=1e-12)


def test_an_evaluation_runs_in_parts_placed_with_the_chunks_behind_the_wavefront():
    arch = Architecture("resnet", 3, 3, 4, 2)
    n = 12
    specs = [BlockSpec(arch, i, n) for i in range(1, 4)]
    slices = [slice(0, 4), slice(4, 8), slice(8, 12)]
    weights = [np.zeros(arch.weight_shape(i)) for i in range(1, 4)]
    _, prev, _ = chunk_graph.start_nodes("radmm3", arch, None, slices, "run", weights, n,
                                         None, Options(), 1.0, flow=True, rho_first=(1.0,))
    prev.update({f"small-b{i}": f"init_small-b{i}-run" for i in range(1, 4)})
    pens = {k: Penalties(1.0, 1.0, 1e-3, 1e-3) for k in range(1, 4)}
    wg = chunk_graph.build_window("radmm3", specs, pens, 0, 2, prev, "run", None, slices, [2],
                                  (arch, "regression", "mse", tuple(slices), (slice(0, 5),)),
                                  flow=True)
    ev = {n.key: n for n in wg.nodes if n.key.startswith("evaluate")}
    assert set(ev) == {"evaluate-k2-run"} | {f"evaluate_part-c{c}-k2-run" for c in range(3)}
    assert all(n.priority == -1 for n in ev.values())
    assert [ev[f"evaluate_part-c{c}-k2-run"].chunk for c in range(3)] == [0, 1, 2]
    assert all(n.priority == 0 for n in wg.nodes if not n.key.startswith("evaluate"))
    assert set(ev["evaluate-k2-run"].deps()) == (
        {f"evaluate_part-c{c}-k2-run" for c in range(3)} | set(wg.weights[2]))
    assert wg.evals == {2: "evaluate-k2-run"}
