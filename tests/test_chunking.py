"""storage.chunk_size=auto: the rule, where its inputs come from, and what a run records."""

from __future__ import annotations

import numpy as np
import pytest
from support import replace_sections as _with

from daskadmm import api
from daskadmm.config import Config, ConfigError, from_mapping
from daskadmm.data import load_dataset
from daskadmm.engines.cluster import (
    AUTO_CHUNK_MEMORY,
    AUTO_CHUNK_MIN,
    WORKER_BASELINE,
    auto_chunk_size,
    chunk_size_for,
)

GiB = 2**30


def test_one_chunk_per_worker_thread():
    assert auto_chunk_size(40_000, 10**6, threads=2, memory=8 * GiB) == 20_000
    assert auto_chunk_size(40_000, 10**6, threads=4, memory=8 * GiB) == 10_000
    assert auto_chunk_size(40_001, 10**6, threads=4, memory=None) == 10_001  # the last shorter


def test_no_chunk_below_the_minimum_unless_memory_asks():
    n = 3 * AUTO_CHUNK_MIN - 1
    assert auto_chunk_size(n, 10**6, threads=8, memory=8 * GiB) == -(-n // 2)
    assert auto_chunk_size(AUTO_CHUNK_MIN * 2 - 1, 10**6, threads=8, memory=None) == 0
    assert auto_chunk_size(1437, 10**6, threads=2, memory=8 * GiB) == 0  # one chunk


def test_memory_asks_for_more_chunks():
    limit = WORKER_BASELINE + 100 * 2**20  # 100 MiB usable
    state = 250 * 2**20
    cs = auto_chunk_size(100_000, state, threads=2, memory=limit)
    chunks = -(-100_000 // cs)
    assert chunks == int(np.ceil(AUTO_CHUNK_MEMORY * 2.5))  # 4 x state / usable
    assert state / chunks <= 100 * 2**20 / AUTO_CHUNK_MEMORY
    # a limit below the baseline still shares out a quarter of it
    tiny = auto_chunk_size(100_000, state, threads=2, memory=200 * 2**20)
    assert -(-100_000 // tiny) == int(np.ceil(AUTO_CHUNK_MEMORY * state / (50 * 2**20)))
    # never more chunks than samples
    assert auto_chunk_size(10, 10**12, threads=2, memory=2**20) == 1


class _Client:
    status = "running"

    def __init__(self, workers):
        self.workers = workers

    def scheduler_info(self, n_workers=-1):
        return {"workers": self.workers}


def test_the_cluster_s_threads_and_smallest_memory_limit_come_from_the_client():
    ccfg = Config().cluster
    client = _Client({"a": {"nthreads": 2, "memory_limit": 8 * GiB},
                      "b": {"nthreads": 2, "memory_limit": 4 * GiB},
                      "c": {"nthreads": 4, "memory_limit": 8 * GiB},
                      "d": {"nthreads": 1, "memory_limit": 0}})  # no limit: not the smallest
    cs, note = chunk_size_for(ccfg, 90_000, 10**6, client)
    assert cs == 10_000 and "9 chunks of 10000 samples, one per worker thread" in note
    assert "9 worker threads, 4.0 GiB per worker" in note
    # workers without a memory limit: only the threads count
    cs, note = chunk_size_for(ccfg, 80_000, 10**12, _Client({"a": {"nthreads": 1,
                                                                    "memory_limit": 0}}))
    assert cs == 0 and "no memory limit" in note
    # a worker's threads each hold a chunk task's arrays: its memory is shared among them
    state = 3 * GiB
    one = chunk_size_for(ccfg, 100_000, state, _Client({"a": {"nthreads": 1,
                                                               "memory_limit": 4 * GiB}}))[0]
    four = chunk_size_for(ccfg, 100_000, state, _Client({"a": {"nthreads": 4,
                                                                "memory_limit": 4 * GiB}}))[0]
    usable = 4 * GiB - WORKER_BASELINE
    assert -(-100_000 // one) == int(np.ceil(AUTO_CHUNK_MEMORY * state / usable))  # 4
    assert -(-100_000 // four) == int(np.ceil(AUTO_CHUNK_MEMORY * state / (usable / 4)))  # 13


def test_an_active_client_is_the_cluster_the_rule_sizes(monkeypatch):
    """cluster=local with a notebook's Client() running: the run uses that client, and so
    does the rule (not the configuration's n_workers)."""
    from daskadmm.engines import cluster

    active = _Client({f"w{i}": {"nthreads": 1, "memory_limit": 8 * GiB} for i in range(5)})
    monkeypatch.setattr(cluster, "current_client", lambda: active)
    cs, note = chunk_size_for(Config().cluster, 50_000, 10**6)
    assert cs == 10_000 and "5 worker threads" in note


def test_a_local_cluster_with_memory_limit_auto_shares_the_machine_s_memory(monkeypatch):
    """memory_limit=auto is left to LocalCluster (the machine's memory over the workers), and
    the rule assumes the same per worker."""
    from distributed.system import MEMORY_LIMIT

    from daskadmm.engines import cluster

    seen = {}

    class FakeCluster:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr("distributed.LocalCluster", FakeCluster)
    cluster._start_local_cluster(Config().cluster)
    assert "memory_limit" not in seen
    cluster._start_local_cluster(_with(Config(), cluster={"memory_limit": "2GB"}).cluster)
    assert seen["memory_limit"] == "2GB"
    assert cluster._worker_memory("auto", 4, 1) == pytest.approx(MEMORY_LIMIT / 4, rel=1e-6)
    assert cluster._worker_memory("2GB", 4, 1) == 2e9


def test_a_numpy_integer_chunk_size_is_a_chunk_size(tmp_path):
    """A search grid's np.int64 is accepted, as an int."""
    from daskadmm.config import validate

    validate(_with(Config(), storage={"chunk_size": np.int64(4096)}))
    cfg = _with(_cfg(tmp_path), storage={"chunk_size": np.int64(30)})
    res = api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    assert res.info["chunks"] == 3


def test_the_configured_cluster_when_there_is_no_client():
    c = Config().cluster
    assert chunk_size_for(c, 80_000, 10**6)[0] == 40_000  # 2 workers x 1 thread
    c4 = _with(Config(), cluster={"n_workers": 2, "threads_per_worker": 2}).cluster
    assert chunk_size_for(c4, 80_000, 10**6)[0] == 20_000
    sync = _with(Config(), cluster={"kind": "synchronous"}).cluster
    assert chunk_size_for(sync, 80_000, 10**6)[0] == 0
    small = _with(Config(), cluster={"memory_limit": "300MB"}).cluster
    cs, note = chunk_size_for(small, 80_000, 100 * 2**20)
    assert cs and -(-80_000 // cs) > 2 and "for memory" in note


def test_auto_is_the_default_and_the_config_takes_numbers_or_auto():
    assert Config().storage.chunk_size == "auto"
    assert from_mapping({"storage": {"chunk_size": "4096"}}).storage.chunk_size == 4096
    assert from_mapping({"storage": {"chunk_size": 0}}).storage.chunk_size == 0
    for bad in ("big", -1, 2.5):
        with pytest.raises(ConfigError, match="storage.chunk_size"):
            from_mapping({"storage": {"chunk_size": bad}})


def _cfg(tmp_path):
    cfg = Config()
    cfg.data.name, cfg.data.n_samples = "synthetic", 100
    cfg.model.width, cfg.model.depth = 6, 3
    cfg.run.iterations, cfg.run.eval_every, cfg.run.progress = 6, 3, False
    return _with(cfg, cluster={"kind": "threads"}, storage={"url": str(tmp_path / "s.zarr")})


def test_a_run_records_what_auto_chose_and_the_engine_gets_a_number(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    res = api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    assert res.info["chunks"] == 1
    assert res.info["chunking"].startswith("storage.chunk_size=auto: 1 chunk of 80 samples")
    assert "storage.chunk_size=auto" in capsys.readouterr().err
    from daskadmm.storage import StateStore

    assert StateStore.open(str(tmp_path / "s.zarr"), mode="check").attrs["chunk_size"] == 0


def test_a_resume_with_auto_keeps_the_store_s_chunking(tmp_path):
    """A store made in chunks of 30 resumes with chunk_size=auto (whatever auto would choose
    now) to the bits of the uninterrupted run."""
    cfg = _with(_cfg(tmp_path), run={"checkpoint_every": 2}, storage={"chunk_size": 30})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    api.fit(_with(cfg, run={"iterations": 4}), dataset=ds)
    res = api.fit(_with(cfg, run={"resume": True}, storage={"chunk_size": "auto"}), dataset=ds)
    assert res.info["resumed_from"] == 4 and res.info["chunks"] == 3
    for a, b in zip(full.weights, res.weights, strict=True):
        assert np.array_equal(a, b)
