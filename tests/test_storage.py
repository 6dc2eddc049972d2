"""The Zarr-resident engine: chunking equivalence, checkpoints, kill-and-resume, the model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import zarr
from support import chunked_window, replace_sections
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.config import Config, ConfigError, validate
from daskadmm.data import load_dataset
from daskadmm.model import predict
from daskadmm.storage import StateStore, StoreError, chunk_slices, load_model

REL = 1e-8  # chunked partial sums reorder additions: relative agreement with the reference


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _cfg(n_samples=100, iterations=20, classification=False, activation="tanh"):
    cfg = Config()
    cfg.data.name = "synthetic"
    cfg.data.n_samples = n_samples
    cfg.data.n_classes = 3 if classification else 0
    cfg.model.width = 6
    cfg.model.depth = 4
    cfg.model.activation = activation
    cfg.run.iterations = iterations
    cfg.run.eval_every = 5
    cfg.run.progress = False
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    return cfg


_with = replace_sections


def _mem_url() -> str:
    return f"memory://test-{uuid.uuid4().hex}"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(a))))


def test_chunk_slices_cover_samples_with_uneven_last():
    sl = chunk_slices(100, 15)
    assert [s.start for s in sl] == list(range(0, 100, 15))
    assert sl[-1] == slice(90, 100)
    assert chunk_slices(100, 0) == [slice(0, 100)]
    assert chunk_slices(100, 500) == [slice(0, 100)]


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3l", "radmm3a"])
@pytest.mark.parametrize("classification", [False, True])
def test_results_independent_of_chunking(algorithm, classification):
    cfg = _cfg(classification=classification, activation="relu" if classification else "tanh")
    cfg = _with(cfg, algorithm={"name": algorithm})
    ds = load_dataset(cfg.data, seed=0)
    n = ds.n_train
    ref = api.fit(_with(cfg, cluster={"kind": "reference"}), dataset=ds)
    # 1, 2 and 7 chunks (the last one uneven)
    for chunk_size in (0, (n + 1) // 2, -(-n // 7) + 1):
        n_chunks = len(chunk_slices(n, chunk_size))
        res = api.fit(_with(cfg, cluster={"kind": "synchronous"},
                            storage={"chunk_size": chunk_size, "url": _mem_url()}), dataset=ds)
        assert res.info["engine"] == "dask-zarr" and res.info["chunks"] == n_chunks
        assert res.iterations == ref.iterations == 20
        for a, b in zip(ref.weights, res.weights, strict=True):
            assert _rel(a, b) < REL
        for ra, rb in zip(ref.history, res.history, strict=True):
            assert abs(ra["objective"] - rb["objective"]) <= REL * abs(ra["objective"])
            assert abs(ra["test_metric"] - rb["test_metric"]) <= 1e-8


@pytest.mark.parametrize(("algorithm", "schedule", "rho", "rho_max", "eval_every"), [
    ("radmm3", "adaptive", 2.0, 20.0, 1), ("radmm3l", "adaptive", 2.0, 20.0, 1),
    ("radmm3a", "rises", 0.1, 20.0, 1), ("radmm3a", "rises", 0.1, 20.0, 2),
    ("radmm3", "adaptive", 2.0, 3.0, 1)])  # the last: rho capped while beta still rises
def test_a_deciding_schedule_on_the_zarr_engine_equals_the_reference(algorithm, schedule, rho,
                                                                     rho_max, eval_every):
    """An adaptive or rises schedule decides iteration k+1's rho only after iteration k, so
    block 1's chunk tasks make ``W_1``'s statistics for each rho it can take (kept or raised)
    and the W step takes the one in force: one chunk gives the reference's bits, 3 chunks
    agree to rounding, and the penalties change at the same iterations."""
    cfg = _with(_cfg(iterations=12, activation="relu"), algorithm={
        "name": algorithm, "schedule": schedule, "rho": rho, "adapt_every": 2,
        "adapt_tol": 1e-12, "rise_count": 1, "adapt_factor": 1.5, "rho_max": rho_max,
        "beta_max": 20.0}, run={"eval_every": eval_every})
    ds = load_dataset(cfg.data, seed=0)
    ref = api.fit(_with(cfg, cluster={"kind": "reference"}), dataset=ds)
    changes = ref.info["schedule_changes"]
    assert changes
    for chunk_size in (0, 30):
        res = api.fit(_with(cfg, cluster={"kind": "synchronous"},
                            storage={"chunk_size": chunk_size, "url": _mem_url()}), dataset=ds)
        assert res.info["engine"] == "dask-zarr"
        assert res.info["schedule_changes"] == changes
        for a, b in zip(ref.weights, res.weights, strict=True):
            if chunk_size == 0:
                assert np.array_equal(a, b)
            else:
                assert _rel(a, b) < REL


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3a"])
def test_same_chunking_bitwise_on_every_scheduler(tmp_path, local_cluster, algorithm):
    cfg = _with(_cfg(iterations=8), algorithm={"name": algorithm})
    ds = load_dataset(cfg.data, seed=0)
    chunk = 12  # 7 chunks of the 80 training samples, the last one uneven
    runs = []
    # on the cluster: the chunk tasks placed by chunk (auto: 7 chunks, 2 workers) and by block
    for kind, placement in (("synchronous", "auto"), ("threads", "auto"), ("address", "auto"),
                            ("address", "blocks")):
        url = str(tmp_path / f"{kind}-{placement}.zarr")
        run_dir = tmp_path / f"run-{kind}-{placement}"
        run_dir.mkdir()
        runs.append(api.fit(_with(cfg, cluster={"kind": kind, "placement": placement,
                                                "address": local_cluster.scheduler_address},
                                  storage={"chunk_size": chunk, "url": url}), dataset=ds,
                            run_dir=run_dir))
    assert runs[0].info["chunks"] == 7 and runs[2].info["engine"] == "dask-zarr"
    assert runs[2].info["placement"] == "chunks" and runs[3].info["placement"] == "blocks"
    # where the chunk tasks ran (the task stream): one worker per chunk, or per block
    for placement, group in (("auto", r"-c(\d+)-k"), ("blocks", r"-b(\d+)-c\d+-k")):
        ran: dict[str, set] = {}
        stream = json.loads((tmp_path / f"run-address-{placement}" / "task-stream.json")
                            .read_text())
        for row in stream:
            m = re.search(group, row["key"])
            if m and row["key"].startswith(f"{algorithm}_chunk"):
                ran.setdefault(m.group(1), set()).add(row["worker"])
        assert len(ran) == (7 if placement == "auto" else cfg.model.depth)
        assert all(len(ws) == 1 for ws in ran.values())
        assert len(set.union(*ran.values())) == 2  # both workers at work
    for res in runs[1:]:
        for a, b in zip(runs[0].weights, res.weights, strict=True):
            assert np.array_equal(a, b)
        assert [r["objective"] for r in res.history] == [r["objective"] for r in runs[0].history]


@pytest.mark.parametrize(("N", "K", "chunk"), [(2, 3, 10), (3, 4, 7), (5, 4, 2)])
def test_chunk_statistics_are_held_only_by_their_reductions(N, K, chunk):
    """A chunk task's output carries d x d partial statistics, and a task's output stays in
    worker memory until every task that takes it has run: only the reductions (``W``
    statistics) and the block's statistics may take it (past 4 chunks, the block's statistics
    take groups of 4 chunks' statistics instead, so no chunk output waits for the whole block),
    and these are submitted right after their inputs, so they run before later chunk tasks.
    Tasks that only have to run after it (the next iteration's chunk tasks, checkpoints; the
    futures the driver keeps for the next window) wait for a task with a small output that
    runs after it instead, and still run after every chunk task whose writes they read or
    overwrite. The reductions run on the
    chunks' worker (a tree of fan-in 4 when there are more than 4 chunks), and the root of
    block i's is ``W_{i+1}``'s update itself (on block i's worker: only W travels onwards):
    ``W_{i+1}`` of iteration k sums block i's chunk outputs of k; ``W_1`` of k+1 takes the
    reduction of block 1's of k and X's Gram matrix, reduced right after block 1's chunk
    tasks of k."""
    from daskadmm.chunks import common
    from daskadmm.chunks import radmm3 as chunked

    wg, C = chunked_window(N, K, 30, chunk)
    by_key = {x.key: x for x in wg.nodes}
    big = {x.key for x in wg.nodes if x.fn is chunked.update_chunk}
    assert len(big) == N * C * K
    reductions = {x.key for x in wg.nodes if x.fn is chunked.pick_partials}
    for x in wg.nodes:
        takes = {d for d in x.deps() if d in big}
        if takes:
            assert x.fn in (chunked.pick_partials, chunked.reduce_weights, chunked.block_stats,
                            common.group_stats), (x.key, takes)
            assert (x.fn is chunked.block_stats) == (
                C <= 4 and x.fn not in (chunked.pick_partials, chunked.reduce_weights))
            # on the chunks' worker: only sums (or W) travel
            assert {by_key[d].block for d in takes} == {x.block}, (x.key, takes)
        if x.fn is chunked.reduce_weights:  # W_{i+1} on block i's worker, keyed as block i+1's
            assert x.key.startswith(f"update_weights-b{x.block + 1}-"), x.key
        # a reduction's partial sums stay on its worker; only the root goes to the W update
        for d in set(x.deps()) & reductions:
            if x.fn in (chunked.pick_partials, chunked.reduce_weights):
                assert by_key[d].block == x.block, (x.key, d)
            else:
                assert x.fn is chunked.update_weights, (x.key, d)
        if x.fn in (chunked.pick_partials, chunked.reduce_weights):
            assert 1 <= len([d for d in x.deps() if d in big | reductions]) <= chunked.FAN_IN
    assert not set(wg.last.values()) & big
    assert (C > chunked.FAN_IN) == any("-r1x" in x or "-r0x" in x for x in reductions)
    at = {x.key: j for j, x in enumerate(wg.nodes)}
    for x in wg.nodes:
        if x.fn in (chunked.pick_partials, chunked.reduce_weights, common.group_stats) and any(
                d in at for d in x.deps()):
            last = max(at[d] for d in x.deps() if d in at)
            assert not [y.key for y in wg.nodes[last + 1:at[x.key]] if y.key in big], x.key

    def summed(key: str) -> set[str]:
        """The chunk tasks (and other inputs) whose statistics a W update sums."""
        out = set()
        for d in by_key[key].deps():
            out |= summed(d) if d in reductions else {d}
        return out

    def chunk_key(i: int, c: int, k: int) -> str:
        return f"radmm3_chunk-b{i}-c{c}-k{k}-r"

    for k in range(1, K + 1):
        for i in range(1, N + 1):
            stats = summed(f"update_weights-b{i}-k{k}-r") - {f"update_weights-b{i}-k{k - 1}-r",
                                                            f"init_small-b{i}-r"}
            if i > 1:
                assert stats == {chunk_key(i - 1, c, k) for c in range(C)}
                wk = by_key[f"update_weights-b{i}-k{k}-r"]
                assert wk.fn is chunked.reduce_weights and wk.block == i - 1
                assert {by_key[d].block for d in wk.deps() if d in reductions} <= {i - 1}
            elif k > 1:
                assert stats == {chunk_key(1, c, k - 1) for c in range(C)} | {"gram_x-r"}
        # W_1's statistics for k+1 are reduced as block 1's chunk tasks of k finish: no chunk
        # task is submitted between the last of them and the reduction's root
        order = [x.key for x in wg.nodes]
        last1 = max(order.index(chunk_key(1, c, k)) for c in range(C))
        root = order.index(f"reduce_first-b1-k{k}-r")
        assert root > last1 and not [x for x in order[last1 + 1:root] if x in big]
    # the ordering still holds: every chunk task runs after its own and its right neighbour's
    # chunk of the last iteration and its left neighbour's of this one, every checkpoint after
    # its chunk, and every chunk task of iteration k >= 4 after the checkpoint of 2 (k = 4
    # overwrites the slot being copied)
    after: dict[str, set[str]] = {}
    for x in wg.nodes:  # topological order
        after[x.key] = set()
        for d in x.deps():
            if d in by_key:
                after[x.key] |= {d, *after[d]}

    for k in range(1, K + 1):
        for i in range(1, N + 1):
            for c in range(C):
                mine = after[chunk_key(i, c, k)]
                if i > 1:
                    assert chunk_key(i - 1, c, k) in mine
                if k > 1:
                    assert chunk_key(i, c, k - 1) in mine
                    if i < N:
                        assert chunk_key(i + 1, c, k - 1) in mine
                if k >= 4:
                    assert f"checkpoint-b{i}-c{c}-k2-r" in mine
    for i in range(1, N + 1):
        for c in range(C):
            assert chunk_key(i, c, 2) in after[f"checkpoint-b{i}-c{c}-k2-r"]


def test_store_layout_and_model_readable_with_plain_zarr(tmp_path):
    cfg = _cfg(iterations=6, classification=True, activation="relu")
    ds = load_dataset(cfg.data, seed=0)
    url = str(tmp_path / "state.zarr")
    res = api.fit(_with(cfg, cluster={"kind": "threads"},
                        storage={"chunk_size": 40, "url": url, "keep_state": True}), dataset=ds)
    g = zarr.open_group(url, mode="r")
    attrs = dict(g.attrs)
    assert attrs["schema"] == "daskadmm-state" and attrs["schema_version"] == 2
    assert attrs["status"] == "max_iter" and attrs["owner"] is None
    assert attrs["config"]["model"]["width"] == 6
    U = g["live/b2/U"]
    assert U.shape == (2, 6, ds.n_train) and U.chunks == (1, 6, 40)
    assert g["ckpt/a/b1/W"].chunks == g["ckpt/a/b1/W"].shape == res.weights[0].shape
    assert g["data/X"].chunks == (ds.d_in, 40)
    # the final model: plain arrays, no pickle
    for i, W in enumerate(res.weights, start=1):
        assert np.array_equal(np.asarray(g[f"model/W{i}"][...]), W)
    model = load_model(url)
    raw = (ds.X_test.T * model.x_scale) + model.x_mean
    labels = model.predict(raw)
    expected = np.asarray(ds.classes)[predict(model.arch, res.weights, ds.X_test).argmax(0)]
    assert np.array_equal(labels, expected)


def test_a_finished_run_without_checkpoints_keeps_only_its_model(tmp_path):
    """storage.keep_state=null: the state of a run nobody can resume is dropped (the model
    stays, the store says so, and a resume is refused with the reason); with checkpoints it
    is kept."""
    cfg = _cfg(iterations=3)
    ds = load_dataset(cfg.data, seed=0)
    url = str(tmp_path / "s.zarr")
    res = api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": url}),
                  dataset=ds)
    g = zarr.open_group(url, mode="r")
    assert sorted(p.name for p in (tmp_path / "s.zarr").iterdir()) == [".lock", "model",
                                                                       "zarr.json"]
    assert g.attrs["state_dropped"] is True and res.info["state_kept"] is False
    assert not (tmp_path / "s.zarr" / "checkpoint.json").exists()
    model = load_model(url)
    for a, b in zip(model.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(StoreError, match="holds only the final model"):
        api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": url},
                      run={"resume": True}), dataset=ds)
    url2 = str(tmp_path / "c.zarr")
    api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": url2},
                  run={"checkpoint_every": 2}), dataset=ds)
    assert {"data", "live", "ckpt", "model", "checkpoint.json"} <= {
        p.name for p in (tmp_path / "c.zarr").iterdir()}


def test_regression_model_predicts_in_original_units(tmp_path):
    cfg = _cfg(iterations=4)
    ds = load_dataset(cfg.data, seed=0)
    url = str(tmp_path / "s.zarr")
    res = api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": url}),
                  dataset=ds)
    model = load_model(url)
    out = model.predict(ds.X_test.T * model.x_scale + model.x_mean)
    expected = predict(model.arch, res.weights, ds.X_test).T + ds.y_mean
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_foreign_and_corrupt_stores_are_clear_errors(tmp_path):
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    foreign.attrs["hello"] = 1
    with pytest.raises(StoreError, match="not a daskadmm state store"):
        load_model(str(tmp_path / "foreign.zarr"))
    bad = tmp_path / "corrupt.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot open state store"):
        load_model(str(bad))
    with pytest.raises(StoreError, match="no state store"):
        load_model(str(tmp_path / "missing.zarr"))
    # a real store whose model array is damaged
    cfg = _cfg(iterations=2)
    ds = load_dataset(cfg.data, seed=0)
    url = str(tmp_path / "s.zarr")
    api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": url}), dataset=ds)
    g = zarr.open_group(url, mode="r+")
    g.create_array("model/W2", shape=(3, 3), dtype="f8", overwrite=True)
    with pytest.raises(StoreError, match="model/W2 has shape"):
        load_model(url)


def test_second_writer_refused_and_existing_store_not_overwritten(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = StateStore.create(url, meta={"algorithm": "radmm3"}, owner="first")
    with pytest.raises(StoreError, match="in use by run first"):
        StateStore.open(url, owner="second")
    with pytest.raises(StoreError, match="already exists"):
        StateStore.create(url, meta={}, owner="third")
    store.release("max_iter")
    StateStore.open(url, owner="second").release("max_iter")


def test_checkpoint_config_needs_zarr_engine():
    cfg = _with(_cfg(), run={"checkpoint_every": 2}, cluster={"kind": "reference"})
    with pytest.raises(ConfigError, match="Zarr-resident engine"):
        validate(cfg)
    with pytest.raises(ConfigError, match="needs storage.url"):
        validate(_with(_cfg(), run={"resume": True}, cluster={"kind": "threads"}))


RUN_SCRIPT = """
import json, sys
from daskadmm import api
from daskadmm.config import from_mapping
cfg = from_mapping(json.loads(sys.argv[1]))
res = api.fit(cfg)
print(json.dumps({"status": res.status, "iterations": res.iterations,
                  "resumed_from": res.info.get("resumed_from")}))
"""


def _mapping(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("experiment")
    return d


def _start(cfg: Config):
    return subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(_mapping(cfg))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_at_random_moment_and_resume_is_bitwise_equal(tmp_path):
    cfg = _cfg(n_samples=200, iterations=50)
    cfg = _with(cfg, cluster={"kind": "threads"}, run={"checkpoint_every": 3},
                storage={"chunk_size": 60})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    assert full.status == "max_iter"

    url = str(tmp_path / "killed.zarr")
    proc = _start(_with(cfg, storage={"url": url}))
    rng = np.random.default_rng(int(time.time()))
    target = int(rng.integers(6, 30))  # kill once this many iterations are checkpointed
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            cp = json.loads((tmp_path / "killed.zarr" / "checkpoint.json").read_text())
        except (OSError, ValueError):
            cp = None
        if cp and cp["iteration"] >= target:
            time.sleep(float(rng.uniform(0, 0.05)))  # somewhere inside a later iteration
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = cp["iteration"]
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    attrs = dict(zarr.open_group(url, mode="r").attrs)
    assert attrs["status"] == "running"  # it never got to say goodbye
    manifest = json.loads((tmp_path / "killed.zarr" / "checkpoint.json").read_text())
    assert manifest["iteration"] >= killed_at

    res = api.fit(_with(cfg, storage={"url": url}, run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] >= killed_at
    assert res.iterations == full.iterations
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    # the resumed history continues the saved one
    assert [r["iteration"] for r in res.history] == [r["iteration"] for r in full.history]
    assert [r["objective"] for r in res.history] == [r["objective"] for r in full.history]


def test_resume_from_a_manifest_without_small_states(tmp_path):
    """RADMM-3's small state is its W (stored as an array), so a manifest that records no
    small states (as RADMM-3's were written before its graph had them) resumes to the same
    bits."""
    cfg = _with(_cfg(iterations=8), cluster={"kind": "synchronous"}, run={"checkpoint_every": 4},
                storage={"chunk_size": 30})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    url = tmp_path / "part.zarr"
    api.fit(_with(cfg, storage={"url": str(url)}, run={"iterations": 4}), dataset=ds)
    manifest = json.loads((url / "checkpoint.json").read_text())
    assert manifest["small"] == [{}] * 4
    manifest["small"] = None
    (url / "checkpoint.json").write_text(json.dumps(manifest))
    res = api.fit(_with(cfg, storage={"url": str(url)}, run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] == 4 and res.iterations == 8
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("chunk_size", [0, 30])
def test_resume_at_a_schedule_barrier_is_bitwise_equal(tmp_path, chunk_size):
    """A checkpoint at an adaptive schedule's barrier (iteration 4 of adapt_every 2): the
    resumed run's start makes W_1's statistics for both values the next rho can take, and
    ends where the uninterrupted run does, bit for bit, with the same penalty changes (on one
    chunk also the reference's bits)."""
    cfg = _with(_cfg(iterations=8, activation="relu"), cluster={"kind": "synchronous"},
                algorithm={"name": "radmm3a", "schedule": "adaptive", "adapt_every": 2,
                           "adapt_tol": 1e-12, "adapt_factor": 1.5, "rho_max": 20.0,
                           "beta_max": 20.0},
                run={"checkpoint_every": 4}, storage={"chunk_size": chunk_size})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    assert len(full.info["schedule_changes"]) >= 2
    url = str(tmp_path / "part.zarr")
    api.fit(_with(cfg, storage={"url": url}, run={"iterations": 4}), dataset=ds)
    res = api.fit(_with(cfg, storage={"url": url}, run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] == 4 and res.iterations == 8
    assert res.info["schedule_changes"] == full.info["schedule_changes"]
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
    if chunk_size == 0:
        ref = api.fit(_with(cfg, cluster={"kind": "reference"}, run={"checkpoint_every": 0},
                            storage={"url": None}), dataset=ds)
        for a, b in zip(ref.weights, res.weights, strict=True):
            assert np.array_equal(a, b)


def test_resume_refuses_a_different_problem(tmp_path):
    cfg = _with(_cfg(iterations=4), cluster={"kind": "threads"}, run={"checkpoint_every": 2},
                storage={"url": str(tmp_path / "s.zarr")})
    ds = load_dataset(cfg.data, seed=0)
    api.fit(cfg, dataset=ds)
    other = _with(cfg, model={"width": 7}, run={"resume": True})
    with pytest.raises(StoreError, match=r"model\.width \(6 -> 7\)"):
        api.fit(other, dataset=ds)


def test_predict_command_on_a_reference_run(tmp_path, capsys):
    from daskadmm.predict import main as predict_main

    csv_path = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    y = X @ [1.0, -2.0, 0.5] + 3.0
    rows = ["a,b,c,target"] + [f"{a},{b},{c},{t}" for (a, b, c), t in zip(X, y, strict=True)]
    csv_path.write_text("\n".join(rows) + "\n")
    cfg = _cfg(iterations=3)
    cfg = _with(cfg, data={"name": "csv", "path": str(csv_path), "target": "target",
                           "task": "regression"}, cluster={"kind": "reference"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = api.fit(cfg, run_dir=run_dir)
    assert res.info["store"].endswith("model.zarr")
    out = tmp_path / "pred.csv"
    assert predict_main([str(run_dir / "model.zarr"), str(csv_path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "target" and len(lines) == 61
    model = load_model(str(run_dir / "model.zarr"))
    expected = model.predict(X)[:, 0]
    np.testing.assert_allclose([float(v) for v in lines[1:]], expected, rtol=1e-12)
    # bad inputs: one line, exit 2, nothing written
    assert predict_main([str(tmp_path / "nope.zarr"), str(csv_path)]) == 2
    data = csv_path.read_bytes()
    store = str(run_dir / "model.zarr")
    for target, needle in ((csv_path, "is the input CSV"), (tmp_path, "is a directory"),
                           (run_dir / "model.zarr" / "p.csv", "inside the model store"),
                           (tmp_path / "no" / "p.csv", "No such file")):
        capsys.readouterr()
        assert predict_main([store, str(csv_path), "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert csv_path.read_bytes() == data and not (run_dir / "model.zarr" / "p.csv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    # an existing --out is replaced whole
    out.write_text("old\n")
    assert predict_main([store, str(csv_path), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "target"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert predict_main([str(run_dir / "model.zarr"), str(tmp_path / "bad.csv")]) == 2


def test_a_store_replaced_at_the_same_url_is_not_written_through_stale_handles(tmp_path):
    """Processes cache open array handles; a store overwritten at the same URL with another
    chunking (in the same process: a notebook, a multirun, a reused cluster) must be written
    through fresh ones: each creation has its own id, part of what tasks name the store by."""
    cfg = _cfg(iterations=4)
    ds = load_dataset(cfg.data, seed=0)
    url = str(tmp_path / "s.zarr")
    api.fit(_with(cfg, cluster={"kind": "synchronous"},
                  storage={"url": url, "chunk_size": 40}), dataset=ds)
    again = api.fit(_with(cfg, cluster={"kind": "synchronous"},
                          storage={"url": url, "chunk_size": 25, "overwrite": True}), dataset=ds)
    fresh = api.fit(_with(cfg, cluster={"kind": "synchronous"},
                          storage={"url": str(tmp_path / "t.zarr"), "chunk_size": 25}),
                    dataset=ds)
    for a, b in zip(again.weights, fresh.weights, strict=True):
        assert np.array_equal(a, b)


# -- chunk I/O: the per-chunk tasks' own reads and writes of chunk files ---------------------

def _arrays(root, dtype="f8", compressors=None):
    """A live-style array (slots, rows, n) and a data-style one (rows, n), n = 10 in chunks
    of 4 (the last one partial)."""
    g = zarr.open_group(str(root), mode="w")
    live = g.create_array("live/b1/U", shape=(2, 3, 10), chunks=(1, 3, 4), dtype=dtype,
                          compressors=compressors, fill_value=0.0)
    data = g.create_array("data/X", shape=(3, 10), chunks=(3, 4), dtype=dtype,
                          compressors=compressors, fill_value=0.0)
    return live, data


@pytest.mark.parametrize("dtype", ["f8", "f4"])
def test_chunk_io_reads_and_writes_what_zarr_does(tmp_path, dtype):
    """Whole-chunk reads and writes (the last chunk partial, a chunk never written) go to
    the chunk files directly, with the same values and the same bytes as Zarr's own path."""
    from daskadmm import storage

    rng = np.random.default_rng(0)
    live, data = _arrays(tmp_path / "s.zarr", dtype)
    io_live, io_data = storage.ChunkIO(live), storage.ChunkIO(data)
    assert io_live.root is not None and io_data.root is not None  # the direct path
    for sl in (slice(0, 4), slice(4, 8), slice(8, 10)):
        w = sl.stop - sl.start
        # never written: the fill value, as Zarr reads it
        assert np.array_equal(io_live.read(sl, 1), np.zeros((3, w), dtype))
        v = rng.standard_normal((3, w))
        io_live.write(sl, v, 1)
        io_data.write(sl, v)
        got = io_live.read(sl, 1)
        assert got.dtype == np.dtype(dtype) and got.flags.writeable and got.flags.c_contiguous
        assert np.array_equal(got, v.astype(dtype))
        assert np.array_equal(np.asarray(live[1, :, sl]), v.astype(dtype))  # Zarr reads it
        assert np.array_equal(io_data.read(sl), np.asarray(data[:, sl]))
        # Zarr writes the other slot; the direct read sees it, and the files are the same bytes
        live[0, :, sl] = v
        assert np.array_equal(io_live.read(sl, 0), v.astype(dtype))
        c = sl.start // 4
        d = tmp_path / "s.zarr" / "live" / "b1" / "U" / "c"
        assert (d / "0" / "0" / str(c)).read_bytes() == (d / "1" / "0" / str(c)).read_bytes()
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))  # no temporary file is left


def test_chunk_io_leaves_other_cases_to_zarr(tmp_path):
    """Compressed chunks, stores other than a local directory and selections that are not
    one whole chunk go through Zarr, with the same results."""
    from zarr.codecs import ZstdCodec

    from daskadmm import storage

    live, _ = _arrays(tmp_path / "z.zarr", compressors=[ZstdCodec(level=1)])
    assert storage.ChunkIO(live).root is None
    mem = zarr.open_group("memory://chunk-io-test", mode="w").create_array(
        "x", shape=(3, 10), chunks=(3, 4), dtype="f8", fill_value=0.0)
    assert storage.ChunkIO(mem).root is None
    plain, _ = _arrays(tmp_path / "p.zarr")
    cio = storage.ChunkIO(plain)
    v = np.arange(30.0).reshape(3, 10)
    for arr in (live, mem):
        io = storage.ChunkIO(arr)
        sel = (slice(0, 4), 1) if arr.ndim == 3 else (slice(0, 4), None)
        io.write(sel[0], v[:, :4], sel[1])
        assert np.array_equal(io.read(sel[0], sel[1]), v[:, :4])
    # not one chunk: two chunks, part of a chunk, a stride
    for sl in (slice(0, 8), slice(2, 4), slice(0, 4, 2)):
        assert cio._chunk(sl, 0) is None
        cio.write(sl, v[:, sl], 0)
        assert np.array_equal(cio.read(sl, 0), v[:, sl])
    assert cio._chunk(slice(0, 4), 0) is not None
    try:
        storage.DIRECT_IO = False  # the switch the benchmark uses: everything through Zarr
        assert cio._chunk(slice(0, 4), 0) is None
    finally:
        storage.DIRECT_IO = True


def test_chunk_io_refuses_a_truncated_chunk(tmp_path):
    from daskadmm import storage

    live, _ = _arrays(tmp_path / "t.zarr")
    io = storage.ChunkIO(live)
    io.write(slice(0, 4), np.ones((3, 4)), 0)
    path = tmp_path / "t.zarr" / "live" / "b1" / "U" / "c" / "0" / "0" / "0"
    full = path.read_bytes()
    path.write_bytes(full[:40])
    with pytest.raises(StoreError, match="has 40 bytes, expected 96"):
        io.read(slice(0, 4), 0)
    path.write_bytes(full + b"\0" * 8)  # too long: refused too, as Zarr would
    with pytest.raises(StoreError, match="has 104 bytes, expected 96"):
        io.read(slice(0, 4), 0)


def test_live_chunks_are_overwritten_in_place_and_nothing_else(tmp_path):
    """The live state's existing chunk files are rewritten in place (same inode); a first
    write, a checkpoint or data array, a file of another size and a file with another link
    get a new file and a rename, so nothing outside the chunk is ever written through."""
    from daskadmm import storage

    live, data = _arrays(tmp_path / "s.zarr")
    io_live = storage.ChunkIO(live, in_place=True)
    io_data = storage.ChunkIO(data)
    chunk = tmp_path / "s.zarr" / "live" / "b1" / "U" / "c" / "1" / "0" / "0"
    io_live.write(slice(0, 4), np.ones((3, 4)), 1)  # first write: a new file
    ino = chunk.stat().st_ino
    io_live.write(slice(0, 4), np.full((3, 4), 2.0), 1)
    assert chunk.stat().st_ino == ino and np.array_equal(io_live.read(slice(0, 4), 1),
                                                          np.full((3, 4), 2.0))
    assert np.array_equal(np.asarray(live[1, :, 0:4]), np.full((3, 4), 2.0))
    # the data array (not live) is replaced, never written through
    io_data.write(slice(0, 4), np.ones((3, 4)))
    dchunk = tmp_path / "s.zarr" / "data" / "X" / "c" / "0" / "0"
    dino = dchunk.stat().st_ino
    io_data.write(slice(0, 4), np.zeros((3, 4)) + 3)
    assert dchunk.stat().st_ino != dino
    # a second link to the chunk (a file outside the store) is left alone
    outside = tmp_path / "users-file"
    os.link(chunk, outside)
    before = outside.read_bytes()
    io_live.write(slice(0, 4), np.full((3, 4), 4.0), 1)
    assert outside.read_bytes() == before and chunk.stat().st_ino != outside.stat().st_ino
    assert np.array_equal(io_live.read(slice(0, 4), 1), np.full((3, 4), 4.0))
    # a file of the wrong size is replaced whole
    chunk.write_bytes(b"x" * 8)
    io_live.write(slice(0, 4), np.full((3, 4), 5.0), 1)
    assert chunk.stat().st_size == 96 and np.array_equal(np.asarray(live[1, :, 0:4]),
                                                         np.full((3, 4), 5.0))
    # which arrays the tasks write in place: the live state only
    root = str(tmp_path / "s.zarr")
    storage.clear_handles()
    assert storage.chunk_io(root, "live/b1/U").in_place
    assert not storage.chunk_io(root, "data/X").in_place
    storage.clear_handles()


@pytest.mark.parametrize(("algorithm", "most"), [("radmm3", 3), ("radmm3a", 3), ("pdadmm", 4),
                                                 ("dladmm", 7)])
def test_chunk_reads_per_write_are_what_the_updates_need(tmp_path, monkeypatch, algorithm, most):
    """Counted in the tasks' chunk I/O (synchronous engine, 3 chunks, 4 iterations): every
    chunk of the live state that is written is read again, and at most ``most`` times per
    write. RADMM: a V chunk by its own block's next update, as the left input of block i+1 and
    as the right neighbour of block i-1; pdADMM's and dlADMM's several passes read more. A
    change that adds reads shows here (the figure is what the Zarr-resident state costs beyond
    the in-memory path)."""
    from collections import Counter

    from daskadmm import storage

    reads: Counter = Counter()
    writes: Counter = Counter()
    read0, write0 = storage.ChunkIO.read, storage.ChunkIO.write

    def read(self, sl, slot=None):
        reads[(self.arr.path, slot, sl.start)] += 1
        return read0(self, sl, slot)

    def write(self, sl, value, slot=None):
        writes[(self.arr.path, slot, sl.start)] += 1
        return write0(self, sl, value, slot)

    monkeypatch.setattr(storage.ChunkIO, "read", read)
    monkeypatch.setattr(storage.ChunkIO, "write", write)
    cfg = _with(_cfg(n_samples=100, iterations=4), cluster={"kind": "synchronous"},
                algorithm={"name": algorithm},
                model={"kind": "mlp" if algorithm in ("pdadmm", "dladmm") else "resnet"},
                storage={"state": "zarr", "chunk_size": 40, "url": str(tmp_path / "s.zarr")})
    api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    live = {k: w for k, w in writes.items() if k[0].startswith("live/")}
    assert live and all(reads[k] > 0 for k in live)
    assert max(reads[k] / w for k, w in live.items()) == most


def test_a_store_older_than_a_setting_resumes_only_at_the_old_behaviour():
    """A store written before ``algorithm.relax`` existed resumes when relax is 1 (what its
    iterates were made with) and is refused otherwise."""
    from daskadmm.config import Config, algorithm_defaults
    from daskadmm.storage import changed_determinants, determinants

    cfg = Config()
    cfg.algorithm = algorithm_defaults("radmm3a")
    now = determinants(cfg.to_dict())
    old = {k: v for k, v in now.items() if k != "algorithm.relax"}
    assert changed_determinants(old, now) == ["algorithm.relax (1.0 -> 1.8)"]
    cfg.algorithm.relax = 1.0
    assert changed_determinants(old, determinants(cfg.to_dict())) == []
    # and one from before algorithm.hidden_lam_scale: its hidden blocks had lam itself
    older = {k: v for k, v in old.items() if k != "algorithm.hidden_lam_scale"}
    assert changed_determinants(older, determinants(cfg.to_dict())) == [
        "algorithm.hidden_lam_scale (1.0 -> 0.1)"]
    cfg.algorithm.hidden_lam_scale = 1.0
    assert changed_determinants(older, determinants(cfg.to_dict())) == []
    # one from before the restart guard: without restarts (its only kind then) the guard's
    # default changes nothing; with them it resumes unguarded only
    assert cfg.algorithm.restart_guard is True
    guardless = {k: v for k, v in determinants(cfg.to_dict()).items()
                 if k != "algorithm.restart_guard"}
    assert changed_determinants(guardless, determinants(cfg.to_dict())) == []
    cfg.algorithm.restart_every = 3
    restarted = {k: v for k, v in determinants(cfg.to_dict()).items()
                 if k != "algorithm.restart_guard"}
    assert changed_determinants(restarted, determinants(cfg.to_dict())) == [
        "algorithm.restart_guard (False -> True)"]
    cfg.algorithm.restart_guard = False
    assert changed_determinants(restarted, determinants(cfg.to_dict())) == []


def test_a_store_made_under_other_arithmetic_is_refused(tmp_path):
    """A store made by a daskadmm whose updates computed this problem differently (an older
    arithmetic revision for its loss, or a store from before revisions were recorded, which
    counts as 1) is refused with a line that says so, before anything is written; under the
    same revision it resumes. A regression store without the record resumes: its loss's
    arithmetic is still revision 1."""
    from daskadmm import storage

    def made(name, classification):
        url = str(tmp_path / name)
        cfg = _with(_cfg(n_samples=60, iterations=2, classification=classification),
                    cluster={"kind": "synchronous"}, storage={"url": url},
                    run={"checkpoint_every": 2})
        data = load_dataset(cfg.data, seed=0)
        api.fit(cfg, dataset=data)
        return url, _with(cfg, run={"iterations": 3, "resume": True}), data

    def set_record(url, value):
        st = storage.StateStore.open(url, mode="r+")
        if value is None:
            st.group.attrs.pop("arithmetic")
        else:
            st.set_attrs({"arithmetic": value})
        st.close()
        attrs = zarr.open_group(url, mode="r").attrs
        assert attrs.get("arithmetic") == value and (value is not None or "arithmetic" not in attrs)

    url, resume, data = made("ce.zarr", True)
    assert zarr.open_group(url, mode="r").attrs["arithmetic"] == storage.ARITHMETIC[
        "cross_entropy"] == 2
    attrs_file = tmp_path / "ce.zarr" / "zarr.json"
    for stored in (1, None):  # an older revision; no revision recorded
        set_record(url, stored)
        before = attrs_file.read_bytes()
        with pytest.raises(storage.StoreError,
                           match=r"arithmetic for this problem differs .*revision 1, now 2"):
            api.fit(resume, dataset=data)
        assert attrs_file.read_bytes() == before
    set_record(url, 2)
    assert api.fit(resume, dataset=data).iterations == 3

    url, resume, data = made("mse.zarr", False)
    set_record(url, None)
    assert api.fit(resume, dataset=data).iterations == 3
