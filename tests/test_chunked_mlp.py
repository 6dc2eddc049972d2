"""pdADMM, dlADMM and RADMM-2 on the Zarr-resident engine, and the graph built from declared
chunk reads and writes (every algorithm's, RADMM-3's too): chunked, checkpointed, on every
scheduler."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_storage import REL, _cfg, _mem_url, _rel, _with
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.chunks.common import ChunkTask
from daskadmm.config import ConfigError, validate
from daskadmm.data import load_dataset
from daskadmm.graph import chunked as chunk_graph
from daskadmm.graph import critical_path_length
from daskadmm.model import Architecture
from daskadmm.splitting import BlockSpec, Options, Penalties
from daskadmm.storage import chunk_slices


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _mlp_cfg(algorithm: str, kind: str = "mlp", classification: bool = False, **run):
    cfg = _cfg(classification=classification, activation="relu" if classification else "tanh",
               iterations=run.pop("iterations", 12))
    return _with(cfg, algorithm={"name": algorithm, "rho": 0.5}, model={"kind": kind},
                 run=run)


CASES = [("pdadmm", "mlp", False), ("pdadmm", "resnet", False), ("pdadmm", "mlp", True),
         ("dladmm", "mlp", False), ("dladmm", "resnet", False), ("dladmm", "mlp", True),
         ("radmm2", "resnet", False), ("radmm2", "mlp", True)]


@pytest.mark.parametrize(("algorithm", "kind", "classification"), CASES)
def test_results_independent_of_chunking(algorithm, kind, classification):
    cfg = _mlp_cfg(algorithm, kind, classification)
    ds = load_dataset(cfg.data, seed=0)
    n = ds.n_train
    ref = api.fit(_with(cfg, cluster={"kind": "reference"}), dataset=ds)
    assert ref.history[-1]["objective"] < ref.history[0]["objective"]
    # 1, 2 and 5 chunks (the last one uneven)
    for chunk_size in (0, (n + 1) // 2, 17):
        n_chunks = len(chunk_slices(n, chunk_size))
        res = api.fit(_with(cfg, cluster={"kind": "synchronous"},
                            storage={"chunk_size": chunk_size, "url": _mem_url()}), dataset=ds)
        assert res.info["engine"] == "dask-zarr" and res.info["chunks"] == n_chunks
        assert res.iterations == ref.iterations == 12
        assert res.info["inner_solver_caps_hit"] == ref.info["inner_solver_caps_hit"]
        for a, b in zip(ref.weights, res.weights, strict=True):
            if n_chunks == 1:
                assert np.array_equal(a, b)  # the same sums in the same order
            assert _rel(a, b) < REL
        for ra, rb in zip(ref.history, res.history, strict=True):
            for col in ("objective", "primal_residual", "dual_residual"):
                assert rb[col] == pytest.approx(ra[col], rel=REL, abs=1e-300)
            assert abs(ra["test_metric"] - rb["test_metric"]) <= 1e-8


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.mark.parametrize("algorithm", ["pdadmm", "dladmm", "radmm2"])
def test_same_chunking_bitwise_on_every_scheduler(tmp_path, local_cluster, algorithm):
    cfg = _mlp_cfg(algorithm, iterations=6)
    ds = load_dataset(cfg.data, seed=0)
    runs = []
    for kind, placement in (("synchronous", "auto"), ("threads", "auto"), ("address", "auto"),
                            ("address", "blocks")):
        url = str(tmp_path / f"{kind}-{placement}.zarr")
        runs.append(api.fit(_with(cfg, cluster={"kind": kind, "placement": placement,
                                                "address": local_cluster.scheduler_address},
                                  storage={"chunk_size": 23, "url": url}), dataset=ds))
    assert runs[0].info["chunks"] == 4
    assert runs[2].info["placement"] == "chunks" and runs[3].info["placement"] == "blocks"
    for res in runs[1:]:
        for a, b in zip(runs[0].weights, res.weights, strict=True):
            assert np.array_equal(a, b)
        assert [r["objective"] for r in res.history] == [r["objective"] for r in runs[0].history]


@pytest.mark.parametrize("algorithm", ["pdadmm", "dladmm", "radmm2"])
def test_resume_from_checkpoint_continues_bitwise(tmp_path, algorithm):
    # pdADMM's checkpoint must carry its pending q/u phase and penalties, dlADMM's its
    # curvatures, RADMM-2's its last accepted etas (the next backtracking starts from them): a
    # run stopped after 6 iterations and resumed to 12 equals a 12-iteration run
    cfg = _with(_mlp_cfg(algorithm, eval_every=3, checkpoint_every=3),
                cluster={"kind": "threads"}, storage={"chunk_size": 30})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    url = str(tmp_path / "part.zarr")
    part = api.fit(_with(cfg, storage={"url": url}, run={"iterations": 6}), dataset=ds)
    assert part.iterations == 6
    res = api.fit(_with(cfg, storage={"url": url}, run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] == 6 and res.iterations == 12
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


def test_checkpoints_validate_on_the_zarr_engine_only():
    for name in ("pdadmm", "dladmm", "radmm3", "radmm3a", "radmm3l", "radmm2"):
        validate(_with(_cfg(), algorithm={"name": name}, run={"checkpoint_every": 2},
                       cluster={"kind": "threads"}))
    for change in ({"storage": {"state": "memory"}}, {"cluster": {"kind": "reference"}}):
        with pytest.raises(ConfigError, match="Zarr-resident engine"):
            validate(_with(_cfg(), algorithm={"name": "radmm2"}, run={"checkpoint_every": 2},
                           **{"cluster": {"kind": "threads"}, **change}))


@pytest.mark.parametrize("step", ["backtracking", "lipschitz"])
def test_radmm2_backtracking_past_the_ladder_gives_the_same_bits(monkeypatch, step):
    # a backtracked step whose ladder of parallel trials accepts none goes on in its decision
    # task, chunk by chunk: whatever the ladder's length, the same trials are accepted, so the
    # same bits (one chunk: the reference's); with backtrack_max=2 some backtracking steps are
    # capped (a Lipschitz eta is accepted at once, mostly: the ladder hardly matters there).
    # With a ladder of one the V trial pass writes the first trial, mostly not the accepted
    # one, so the step pass rewrites it; with three it mostly guesses right and does nothing
    from daskadmm.chunks import radmm2 as chunked_radmm2

    cfg = _with(_mlp_cfg("radmm2", "resnet", iterations=8), algorithm={"step": step},
                cluster={"kind": "synchronous"})
    ds = load_dataset(cfg.data, seed=0)
    later = []  # trials evaluated by the decision tasks, past the ladder
    w_trials, v_trials = chunked_radmm2._w_trials, chunked_radmm2._v_trials

    def w_spy(*args):
        later.append(("W", args[6]))  # the first trial it evaluates
        return w_trials(*args)

    def v_spy(*args):
        later.append(("V", args[7]))
        return v_trials(*args)

    for backtrack_max in (30, 2):
        c = _with(cfg, algorithm={"backtrack_max": backtrack_max})
        ref = api.fit(_with(c, cluster={"kind": "reference"}), dataset=ds)
        runs = {}
        for ladder in (3, 1):
            monkeypatch.setattr(chunked_radmm2, "W_LADDER", ladder)
            monkeypatch.setattr(chunked_radmm2, "V_LADDER", ladder)
            monkeypatch.setattr(chunked_radmm2, "_w_trials", w_spy)
            monkeypatch.setattr(chunked_radmm2, "_v_trials", v_spy)
            for chunk_size in (0, 23):
                later.clear()
                res = api.fit(_with(c, storage={"chunk_size": chunk_size, "url": _mem_url()}),
                              dataset=ds)
                runs[ladder, chunk_size] = res
                if ladder == 1 and step == "backtracking":  # (the Lipschitz eta is accepted
                    # at once, mostly) past a ladder of one: the decision tasks went on
                    assert {w for w, t in later if t >= 1} == {"W", "V"}
        for chunk_size in (0, 23):
            a, b = runs[3, chunk_size], runs[1, chunk_size]
            for x, y in zip(a.weights, b.weights, strict=True):
                assert np.array_equal(x, y)
            assert a.info["inner_solver_caps_hit"] == ref.info["inner_solver_caps_hit"]
        for x, y in zip(ref.weights, runs[1, 0].weights, strict=True):
            assert np.array_equal(x, y)
        if backtrack_max == 2 and step == "backtracking":
            assert ref.info["inner_solver_caps_hit"] > 0


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------

def test_hazards_order_reads_and_writes():
    hz = chunk_graph.Hazards({})
    assert hz.task("w1", (), ["x"]) == []
    assert [r.key for r in hz.task("r1", ["x"], ())] == ["w1"]
    assert [r.key for r in hz.task("r2", ["x"], ["y"])] == ["w1"]
    # a new write waits for the last writer and every reader of the old value
    assert sorted(r.key for r in hz.task("w2", (), ["x"])) == ["r1", "r2", "w1"]
    assert [r.key for r in hz.task("r3", ["x"], ())] == ["w2"]
    # the state survives a window boundary
    again = chunk_graph.Hazards(hz.roles())
    assert sorted(r.key for r in again.task("w3", ["y"], ["x"])) == ["r2", "r3", "w2"]


def test_hazards_aliases_hold_until_the_markers_replace_them():
    # a task that runs after others (a W update after the chunk tasks it sums) stands in for
    # them until the end of the iteration, a marker of a marker for both; then the iteration's
    # markers take over
    hz = chunk_graph.Hazards({})
    hz.task("w1", (), ["x"])
    hz.task("w2", (), ["y"])
    hz.alias({"w1": "m1"})
    hz.alias({"m1": "m2", "w2": "m2"})
    assert [r.key for r in hz.task("r1", ["x", "y"], ())] == ["m2"]
    hz.replace({"w1": "s1", "w2": "s1", "r1": "s2"})
    assert sorted(r.key for r in hz.task("w3", (), ["x"])) == ["s1", "s2"]


def _window(name: str, N: int, K: int, C: int = 3, ckpt_slots: dict[int, str] | None = None,
            flow: bool = False):
    """A window of K iterations from the start; ``flow``: on the dataflow backend (the
    in-memory engine's graph: inputs are the data dependencies), else on a store."""
    kind = "mlp" if name in ("pdadmm", "dladmm") else "resnet"
    arch = Architecture(kind=kind, depth=N, d_in=5, width=4, d_out=2)
    n = 30
    specs = [BlockSpec(arch, i, n, Options()) for i in range(1, N + 1)]
    slices = chunk_slices(n, -(-n // C))
    url = None if flow else "memory://x"
    _, prev, _ = chunk_graph.start_nodes(name, arch, url, slices, "r",
                                         [np.zeros(arch.weight_shape(i))
                                          for i in range(1, N + 1)], n, None, Options(), 1.0,
                                         flow, rho_first=(1.0,))
    prev.update({f"small-b{i}": f"init_small-b{i}-r" for i in range(1, N + 1)})
    pens = {k: Penalties(rho=1.0, beta=1.0, tau=0.0, lam=0.0) for k in range(1, K + 2)}
    return chunk_graph.build_window(name, specs, pens, 0, K, prev, "r", url, slices,
                                    ckpt_slots=ckpt_slots, flow=flow)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("K", [1, 4])
def test_pdadmm_chunked_chain_does_not_grow_with_depth(K, flow):
    # layer-parallel: per iteration a chain of five stages (pass A, p curvature, pass B, W, pass
    # C) whatever the depth; the next iteration needs only the neighbours' last values
    for N in (2, 4, 9):
        assert critical_path_length(_window("pdadmm", N, K, flow=flow).nodes, "pd_") == 5 * K


@pytest.mark.parametrize("flow", [False, True])
def test_radmm2_chunked_chain_is_a_pipelined_wavefront(flow):
    # block i of iteration k waits for block i-1 of k and block i+1 of k-1: K iterations of N
    # blocks take about N + 2K block steps, not N K
    def path(N: int, K: int) -> int:
        return critical_path_length(_window("radmm2", N, K, flow=flow).nodes, "r2_")

    per_block = path(6, 1) - path(5, 1)
    assert per_block == 7  # W: gradient, its sum, trials, decision; V: trials, decision, step
    for N in (4, 8):
        assert path(N, 3) - path(N, 2) == path(N, 4) - path(N, 3) <= 2 * per_block


def test_radmm2_statistics_of_w_n_travel_once():
    # block N-1's chunk tasks return W_N's d x d statistics: they are summed on block N-1's
    # worker, and the output block's chunk tasks wait for W_N, not for those chunk outputs
    wg = _window("radmm2", 4, 2)
    nodes = {n.key: n for n in wg.nodes}
    for n in wg.nodes:
        if n.key.startswith("r2_out-"):
            assert not [d for d in n.deps() if d.startswith("r2_v_last-")], n.key
        if n.key.startswith("r2_sum_w-"):
            assert n.block == 3 and all(d.startswith("r2_v_last-b3-") for d in n.deps())
        if n.key.startswith("r2_out_update_w-"):
            assert [d for d in n.deps() if d in nodes and nodes[d].fn.__name__ != "out_update_w"
                    ] == [d for d in n.deps() if d.startswith("r2_sum_w-")] != []


@pytest.mark.parametrize("flow", [False, True])
def test_dladmm_chunked_chain_is_a_sweep(flow):
    short = critical_path_length(_window("dladmm", 3, 2, flow=flow).nodes, "dl_")
    long = critical_path_length(_window("dladmm", 6, 2, flow=flow).nodes, "dl_")
    assert long > short
    # per iteration and layer l < L: backward a-pass, a-curvature, az-pass, W; forward W,
    # z-pass, a-curvature, a-pass
    assert long - short == 2 * 3 * 8


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("name", ["pdadmm", "radmm3", "radmm2"])
def test_chunk_tasks_carry_no_sample_arrays(name, flow):
    wg = _window(name, 4, 2, flow=flow)
    for node in wg.nodes:
        for a in node.args:
            assert not (isinstance(a, np.ndarray) and a.ndim == 2 and a.shape[1] >= 10), node.key


@pytest.mark.parametrize("name", ["pdadmm", "dladmm", "radmm3", "radmm2"])
def test_carried_dependencies_are_small_completion_markers(name):
    # what the next window depends on must not pin chunk outputs (d x d statistics) in memory
    wg = _window(name, 4, 2)
    chunk_tasks = {n.key for n in wg.nodes if n.args and isinstance(n.args[0], ChunkTask)
                   and not n.key.startswith("checkpoint")}
    assert chunk_tasks
    assert not chunk_tasks & set(wg.last.values())
    assert any(v.startswith("layer_stats-") for v in wg.last.values())


@pytest.mark.parametrize("name", ["pdadmm", "dladmm", "radmm3", "radmm2"])
def test_later_iterations_wait_for_completion_markers_within_a_window(name):
    # a window of several iterations (the synchronous and threaded schedulers run whole
    # windows) is wired as windows of one: no task of a later iteration, and no checkpoint,
    # takes a chunk task's output (d x d statistics) just to run after it
    wg = _window(name, 4, 3, ckpt_slots={2: "a"})
    it = {n.key: int(re.search(r"-k(\d+)-", n.key).group(1)) for n in wg.nodes
          if re.search(r"-k(\d+)-", n.key)}
    chunk_tasks = {n.key for n in wg.nodes if n.args and isinstance(n.args[0], ChunkTask)
                   and not n.key.startswith("checkpoint")}
    checkpoints = [n for n in wg.nodes if n.key.startswith("checkpoint-")]
    assert checkpoints and len(chunk_tasks) >= 3 * 4 * 3  # iterations x layers x chunks
    for n in wg.nodes:
        for d in set(n.deps()) & chunk_tasks:
            assert it[n.key] == it[d] and n not in checkpoints, (n.key, d)
    # and they still run after them: every checkpoint after its layer's and chunk's tasks of
    # iteration 2, the first task of iteration 3 after its own layer's and chunk's of 2
    after: dict[str, set[str]] = {}
    for n in wg.nodes:
        after[n.key] = set()
        for d in n.deps():
            if d in after:
                after[n.key] |= {d, *after[d]}

    def tasks_of(key: str, k: int) -> set[str]:
        where = re.search(r"-b\d+-c\d+-", key).group(0)
        return {d for d in chunk_tasks if it[d] == k and where in d}

    for n in checkpoints:
        assert tasks_of(n.key, 2) and tasks_of(n.key, 2) <= after[n.key]
    first3 = next(n.key for n in wg.nodes if n.key in chunk_tasks and it[n.key] == 3)
    assert tasks_of(first3, 2) and tasks_of(first3, 2) <= after[first3]
