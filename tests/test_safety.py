"""Nothing is lost, nothing resumes wrong: store creation, checkpoint manifests, verified
resume, damaged stores, locks, lost workers, failed runs, optional artefacts."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from support import replace_sections
from threadpoolctl import threadpool_limits

from daskadmm import api
from daskadmm.config import Config
from daskadmm.data import load_dataset
from daskadmm.storage import MANIFEST, StateStore, StoreError, load_model


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster


def _cfg(iterations=8, **storage) -> Config:
    cfg = Config()
    cfg.data.name = "synthetic"
    cfg.data.n_samples = 100
    cfg.model.width = 6
    cfg.model.depth = 3
    cfg.run.iterations = iterations
    cfg.run.eval_every = 2
    cfg.run.progress = False
    cfg.run.checkpoint_every = 2
    cfg.cluster.kind = "threads"
    cfg.cluster.dashboard_address = "127.0.0.1:0"
    cfg.storage.chunk_size = 30
    for k, v in storage.items():
        setattr(cfg.storage, k, v)
    return cfg


_with = replace_sections


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True)) and \
        [r["objective"] for r in a.history] == [r["objective"] for r in b.history]


# -- 1. a fresh run never deletes what it did not create -------------------------------------------

def test_fresh_run_refuses_a_directory_that_is_not_a_store(tmp_path):
    user = tmp_path / "mine"
    (user / "outputs" / "old-run").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    (user / "outputs" / "old-run" / "summary.json").write_text("{}")
    before = _tree(user)
    ds = load_dataset(_cfg().data, seed=0)
    for url, overwrite in ((user, False), (user, True), (user / "outputs", False),
                           (user / "notes.txt", False), (user / "notes.txt", True)):
        with pytest.raises(StoreError, match="not empty|is a file|not a daskadmm"):
            api.fit(_cfg(url=str(url), overwrite=overwrite), dataset=ds)
    assert _tree(user) == before


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    url = str(tmp_path / "s.zarr")
    ds = load_dataset(_cfg().data, seed=0)
    first = api.fit(_cfg(url=url), dataset=ds)
    with pytest.raises(StoreError, match="already exists.*storage.overwrite=true"):
        api.fit(_cfg(url=url), dataset=ds)
    # a file daskadmm did not write inside the store: overwrite refuses too
    (tmp_path / "s.zarr" / "mine.txt").write_text("x")
    with pytest.raises(StoreError, match="mine.txt"):
        api.fit(_cfg(url=url, overwrite=True), dataset=ds)
    (tmp_path / "s.zarr" / "mine.txt").unlink()
    (tmp_path / "s.zarr" / "model" / "notes.md").write_text("x")  # deeper down too
    with pytest.raises(StoreError, match="model/notes.md"):
        api.fit(_cfg(url=url, overwrite=True), dataset=ds)
    (tmp_path / "s.zarr" / "model" / "notes.md").unlink()
    # what a commit killed mid-write leaves is the store's own
    (tmp_path / "s.zarr" / "checkpoint.json.1a2b.partial").write_text("{")
    again = api.fit(_cfg(url=url, overwrite=True), dataset=ds)
    assert _same(first, again)
    # an empty directory is a fine place for a new store
    (tmp_path / "empty").mkdir()
    api.fit(_cfg(url=str(tmp_path / "empty")), dataset=ds)


def test_a_file_url_store_is_created_resumed_and_loaded(tmp_path):
    # (Zarr's fsspec route for file:// URLs could not create a store: "no state store")
    ds = load_dataset(_cfg().data, seed=0)
    plain = api.fit(_cfg(url=str(tmp_path / "plain.zarr")), dataset=ds)
    url = f"file://{tmp_path / 'f.zarr'}"
    api.fit(_cfg(iterations=4, url=url), dataset=ds)
    res = api.fit(_with(_cfg(url=url), run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] == 4 and _same(plain, res)
    assert all(np.array_equal(a, b) for a, b in zip(
        load_model(url).weights, plain.weights, strict=True))


def test_cli_refuses_a_non_store_directory_before_writing_anything(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    before = _tree(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", "cluster=synchronous", "run.iterations=2",
         "model.width=8", "storage.url=.", "run.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daskadmm: error:") and "not empty" in lines[0]
    assert _tree(tmp_path) == before and not (tmp_path / "outputs").exists()


def test_cli_refuses_a_sweep_whose_jobs_share_one_store(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", "-m", "cluster=synchronous", "run.iterations=2",
         "model.width=4,8", f"storage.url={tmp_path / 's.zarr'}", "run.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "both use storage.url" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def _cli(cwd: Path, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", *flags, "data=synthetic", "data.n_samples=60",
         "model.width=4", "run.iterations=2", "run.progress=false", "run.plot=false", *args],
        cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("state", ["memory", "zarr"])
def test_cli_refuses_a_run_directory_holding_a_run_before_writing_anything(tmp_path, state):
    # hydra.run.dir given twice: the second run would have replaced the first's metrics.csv
    # (its writer opened first) and, with the state in memory, trained and then failed on the
    # existing model.zarr, its result lost
    run_dir = tmp_path / "run"
    args = (f"hydra.run.dir={run_dir}", f"storage.state={state}", "cluster=threads")
    first = _cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    (run_dir / "notes.txt").write_text("mine")
    before = _tree(run_dir)
    again = _cli(tmp_path, *args, "run.seed=1")
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert "already holds a run's outputs (metrics.csv, summary.json, weights.npz" in lines[0]
    assert "storage.overwrite=true" in lines[0] and "Traceback" not in again.stderr
    assert _tree(run_dir) == before  # Hydra's own .hydra/ included
    # asked for: the run replaces them (the model store too, at the end of the run)
    replaced = _cli(tmp_path, *args, "run.seed=1", "storage.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert json.loads((run_dir / "summary.json").read_text())["config"]["run"]["seed"] == 1


def test_overwrite_leaves_no_earlier_output_beside_the_new_ones(tmp_path):
    # the earlier run drew a plot and kept its model in model.zarr; the new one, asked to
    # overwrite, keeps its store elsewhere and draws nothing: neither may be left behind
    # (load_model(run_dir/model.zarr) would give the earlier run's model); the directory is
    # named through Hydra's own resolver
    args = ("hydra.run.dir=runs/${hydra:runtime.choices.model}",)
    first = _cli(tmp_path, *args, "cluster=reference", "run.plot=true")
    run_dir = tmp_path / "runs" / "resnet"
    assert first.returncode == 0, first.stderr
    assert {"convergence.png", "model.zarr"} <= {p.name for p in run_dir.iterdir()}
    (run_dir / "notes.txt").write_text("mine")
    again = _cli(tmp_path, *args, "cluster=threads", f"storage.url={tmp_path / 'else.zarr'}",
                 "run.seed=5", "storage.overwrite=true")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "daskadmm.log", "metrics.csv", "notes.txt", "summary.json", "weights.npz"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["run"]["seed"] == 5
    # a run directory that is a file is one line too (was Hydra's traceback)
    (tmp_path / "afile").write_text("x")
    proc = _cli(tmp_path, "hydra.run.dir=afile")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"daskadmm: error: run directory {tmp_path / 'afile'} is a file: choose another "
        "hydra.run.dir"]


def test_a_failed_resume_keeps_the_metrics_of_the_run_it_continues(tmp_path):
    args = ("cluster=threads", "hydra.run.dir=run")
    first = _cli(tmp_path, *args, "run.checkpoint_every=1")
    assert first.returncode == 0, first.stderr
    metrics = (tmp_path / "run" / "metrics.csv").read_bytes()
    refused = _cli(tmp_path, *args, "run.resume=true", "storage.url=run/state.zarr",
                   "data.n_samples=80")
    assert refused.returncode == 2 and "data.n_samples (60 -> 80)" in refused.stderr
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == metrics


def test_a_run_directory_in_use_or_not_replaceable_is_refused_before_writing(tmp_path):
    import fcntl

    run_dir = tmp_path / "run"
    first = _cli(tmp_path, f"hydra.run.dir={run_dir}", "cluster=reference")
    assert first.returncode == 0, first.stderr
    before = _tree(run_dir)
    # a running job holds a lock on its run directory: another run may not share it, not
    # even to replace it (that would unlink the files the running job is writing)
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for extra in ((), ("storage.overwrite=true",)):
            proc = _cli(tmp_path, f"hydra.run.dir={run_dir}", "run.seed=3", *extra)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert "is in use by another daskadmm run" in lines[0]
    finally:
        os.close(fd)
    assert _tree(run_dir) == before
    # what overwrite would remove is checked before anything is written: a file daskadmm did
    # not write inside the earlier run's model store
    (run_dir / "model.zarr" / "notes.txt").write_text("mine")
    before = _tree(run_dir)
    proc = _cli(tmp_path, f"hydra.run.dir={run_dir}", "run.seed=3", "storage.overwrite=true")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot replace model.zarr in run directory" in lines[0] and "notes.txt" in lines[0]
    assert _tree(run_dir) == before  # Hydra's .hydra/ included
    # a run directory below a file
    (tmp_path / "afile").write_text("x")
    proc = _cli(tmp_path, f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert proc.returncode == 2 and "is below a file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_resume_may_continue_its_own_run_directory(tmp_path):
    from daskadmm.cli import _check_run_dir
    from daskadmm.errors import UsageError

    (tmp_path / "metrics.csv").write_text("iteration\n")
    (tmp_path / "state.zarr").mkdir()
    cfg = _cfg(url=str(tmp_path / "state.zarr"))
    with pytest.raises(UsageError, match=r"already holds a run's outputs \(metrics.csv, state"):
        _check_run_dir(cfg, tmp_path)
    _check_run_dir(_with(cfg, run={"resume": True}), tmp_path)  # its outputs start with the
    # stored history; a store elsewhere is another run's: refused
    with pytest.raises(UsageError, match="choose another hydra.run.dir"):
        _check_run_dir(_with(cfg, run={"resume": True},
                             storage={"url": str(tmp_path.parent / "other.zarr")}), tmp_path)
    _check_run_dir(_cfg(), tmp_path / "new")  # nothing there yet
    # an output that is a symbolic link: the resumed run would write through it
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "elsewhere.csv").write_text("mine")
    (tmp_path / "metrics.csv").symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(UsageError, match="metrics.csv is a symbolic link"):
        _check_run_dir(_with(cfg, run={"resume": True}), tmp_path)


@pytest.mark.parametrize("subdir", [None, "w${model.width}"])
def test_cli_refuses_a_sweep_directory_holding_its_jobs_before_writing_anything(tmp_path,
                                                                                subdir):
    sweep = ("model.width=4,5", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             *([f"hydra.sweep.subdir={subdir}"] if subdir else []))
    first = _cli(tmp_path, *sweep, flags=("-m",))
    assert first.returncode == 0, first.stderr
    before = _tree(tmp_path / "sweep")
    again = _cli(tmp_path, *sweep, "run.seed=1", flags=("-m",))  # (Hydra's files would differ)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    job = "0" if subdir is None else "w4"
    assert f"{tmp_path / 'sweep' / job} already holds" in lines[0]
    assert "another hydra.sweep.dir" in lines[0]
    assert _tree(tmp_path / "sweep") == before  # multirun.yaml and the jobs' .hydra/ too


def test_in_memory_run_refuses_an_existing_model_store_before_it_trains(tmp_path):
    cfg = _with(_cfg(iterations=3), cluster={"kind": "reference"}, run={"checkpoint_every": 0})
    ds = load_dataset(cfg.data, seed=0)
    api.fit(cfg, run_dir=tmp_path, dataset=ds)
    before = _tree(tmp_path)
    seen = []
    with pytest.raises(StoreError, match=r"already holds a run's outputs \(model.zarr\)"):
        api.fit(cfg, run_dir=tmp_path, dataset=ds, callback=seen.append)
    assert seen == [] and _tree(tmp_path) == before  # refused before the first iteration
    res = api.fit(_with(cfg, storage={"overwrite": True}), run_dir=tmp_path, dataset=ds)
    assert res.info["store"] == str(tmp_path / "model.zarr")
    # from Python as from the CLI: any earlier output, whatever the engine writes itself
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    with pytest.raises(StoreError, match=r"already holds a run's outputs \(summary.json\)"):
        api.fit(_with(cfg, cluster={"kind": "threads"},
                      storage={"url": str(tmp_path / "elsewhere.zarr")}),
                run_dir=other, dataset=ds)
    assert sorted(p.name for p in other.iterdir()) == ["summary.json"]
    assert not (tmp_path / "elsewhere.zarr").exists()
    assert all(np.array_equal(a, b) for a, b in zip(
        load_model(str(tmp_path / "model.zarr")).weights, res.weights, strict=True))


# -- 2, 3. a checkpoint is one atomic manifest; the committed slot is never written ----------------

def test_checkpoint_commit_is_one_atomic_write(tmp_path, monkeypatch):
    url = str(tmp_path / "s.zarr")
    ds = load_dataset(_cfg().data, seed=0)
    writes: list[str] = []
    real = StateStore.commit_checkpoint

    def spy(self, manifest):
        n0 = len(writes)
        store = self.group.store
        orig = store.set

        async def counting_set(key, value):
            writes.append(key)
            return await orig(key, value)

        monkeypatch.setattr(store, "set", counting_set)
        try:
            real(self, manifest)
        finally:
            monkeypatch.setattr(store, "set", orig)
        assert writes[n0:] == [MANIFEST]

    monkeypatch.setattr(StateStore, "commit_checkpoint", spy)
    api.fit(_cfg(url=url), dataset=ds)
    assert writes == [MANIFEST] * 4
    cp = json.loads((tmp_path / "s.zarr" / MANIFEST).read_text())
    assert cp["iteration"] == 8 and len(cp["history"]) == 5
    assert set(cp) >= {"slot", "schedule", "checksums", "determinants"}
    assert "checkpoint" not in dict(zarr.open_group(url, mode="r").attrs)


def test_checkpoint_task_refuses_the_committed_slot(tmp_path):
    from daskadmm.chunks import common as chunked

    url = str(tmp_path / "s.zarr")
    api.fit(_cfg(url=url), dataset=load_dataset(_cfg().data, seed=0))
    slot = json.loads((tmp_path / "s.zarr" / MANIFEST).read_text())["slot"]
    from daskadmm import storage

    storage.clear_handles()
    ct = chunked.ChunkTask(url, slice(0, 30), 0)
    with pytest.raises(RuntimeError, match="committed checkpoint"):
        chunked.checkpoint_chunk(ct, 1, ("U",), 0, slot)
    other = "a" if slot == "b" else "b"
    assert set(chunked.checkpoint_chunk(ct, 1, ("U",), 0, other)) == {"U"}


@pytest.mark.parametrize("algorithm", ["radmm3", "radmm3a", "pdadmm"])
def test_every_checkpoint_resumes_exactly_with_many_iterations_in_flight(tmp_path, algorithm,
                                                                        local_cluster):
    """checkpoint_every=1 with 6 iterations in flight: each committed checkpoint, copied away
    at its commit, resumes to the uninterrupted run's result."""
    cfg = _with(_cfg(iterations=8), algorithm={"name": algorithm},
                model={"kind": "mlp" if algorithm == "pdadmm" else "resnet"},
                run={"checkpoint_every": 1, "window": 6},
                cluster={"kind": "address", "address": local_cluster.scheduler_address})
    ds = load_dataset(cfg.data, seed=0)
    url = tmp_path / "s.zarr"
    snaps: list[Path] = []
    real = StateStore.commit_checkpoint

    def snapshot(self, manifest):
        real(self, manifest)
        if manifest["iteration"] in (3, 6):
            import shutil

            dst = tmp_path / f"snap{manifest['iteration']}"
            shutil.copytree(url, dst)
            # the copy carries this live run's lock: as if that run had been killed there
            zarr.open_group(str(dst), mode="r+").update_attributes(
                {"owner": None, "status": "stopped"})
            snaps.append(dst)

    mp = pytest.MonkeyPatch()
    mp.setattr(StateStore, "commit_checkpoint", snapshot)
    try:
        full = api.fit(_with(cfg, storage={"url": str(url)}), dataset=ds)
    finally:
        mp.undo()
    assert len(snaps) == 2
    for snap in snaps:
        # the snapshot was taken while later iterations ran: it must still be intact
        res = api.fit(_with(cfg, storage={"url": str(snap)}, run={"resume": True}), dataset=ds)
        assert _same(full, res)
        # the monitor continues exactly (checkpoint 3 is not an evaluation point)
        assert res.info["objective_increases"] == full.info["objective_increases"]
        assert [r["wall_time"] > 0 for r in res.history] == [True] * len(full.history)


# -- 4. resume is verified -------------------------------------------------------------------------

def test_resume_refuses_changed_settings_and_data(tmp_path):
    url = str(tmp_path / "s.zarr")
    cfg = _cfg(url=url)
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 4}), dataset=ds)
    files = _tree(tmp_path / "s.zarr")
    resume = {"resume": True}
    for change, key in (({"algorithm": {"rho": 5.0}}, "algorithm.rho"),
                        ({"algorithm": {"lam": 0.5}}, "algorithm.lam"),
                        ({"run": {"seed": 3, **resume}}, "run.seed"),
                        ({"model": {"activation": "tanh"}}, "model.activation")):
        changed = _with(cfg, **change)
        changed = _with(changed, run={**resume})
        with pytest.raises(StoreError, match=key.replace(".", r"\.")):
            api.fit(changed, dataset=load_dataset(changed.data, seed=changed.run.seed))
    other = _with(cfg, data={"noise": 0.2}, run=resume)  # same shape, other data
    with pytest.raises(StoreError, match="data"):
        api.fit(other, dataset=load_dataset(other.data, seed=0))
    # the same data under another data.noise setting is still refused by its settings; the
    # digest alone catches another data set with identical settings
    ds2 = dataclasses.replace(ds, X_train=ds.X_train + 1e-12)
    with pytest.raises(StoreError, match="data set differs"):
        api.fit(_with(cfg, run=resume), dataset=ds2)
    assert _tree(tmp_path / "s.zarr") == files  # refused resumes change nothing
    # settings that do not change the iterates may change
    res = api.fit(_with(cfg, run={**resume, "iterations": 8, "eval_every": 4},
                        cluster={"kind": "synchronous"}), dataset=ds)
    full = api.fit(_cfg(url=str(tmp_path / "full.zarr")), dataset=ds)
    assert all(np.array_equal(a, b) for a, b in zip(res.weights, full.weights, strict=True))


# -- 5. damaged checkpoints are refused ------------------------------------------------------------

def _chunk_files(store: Path, slot: str) -> list[Path]:
    return sorted(p for p in (store / "ckpt" / slot).rglob("*") if p.is_file()
                  and "/c/" in str(p))


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    url = tmp_path / "s.zarr"
    cfg = _cfg(url=str(url))
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 4}), dataset=ds)
    slot = json.loads((url / MANIFEST).read_text())["slot"]
    victim = _chunk_files(url, slot)[3]
    data = victim.read_bytes()
    if damage == "delete":
        victim.unlink()
    elif damage == "flip":
        victim.write_bytes(data[:17] + bytes([data[17] ^ 0x01]) + data[18:])
    else:
        victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError) as err:
        api.fit(_with(cfg, run={"resume": True}), dataset=ds)
    msg = str(err.value)
    assert "\n" not in msg and ("missing" in msg or "damaged" in msg or "cannot be read" in msg)


def test_damaged_stored_data_is_refused(tmp_path):
    url = tmp_path / "s.zarr"
    cfg = _cfg(url=str(url))
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 2}), dataset=ds)
    victim = sorted(p for p in (url / "data" / "X" / "c").rglob("*") if p.is_file())[0]
    data = victim.read_bytes()
    j = len(data) // 3
    victim.write_bytes(data[:j] + bytes([data[j] ^ 0x10]) + data[j + 1:])
    with pytest.raises(StoreError, match="data chunk data/X/c/0/0 is damaged"):
        api.fit(_with(cfg, run={"resume": True}), dataset=ds)


# -- 6. a store with no checkpoint resumes from iteration 0 ----------------------------------------

@pytest.mark.parametrize("ready", [False, True])
def test_store_without_checkpoint_resumes_from_zero(tmp_path, ready):
    cfg = _cfg()
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    url = str(tmp_path / "s.zarr")
    # what a run killed before its first checkpoint leaves: created (maybe not even "ready")
    from daskadmm.algorithms import get_algorithm
    from daskadmm.engines.driver import _data_arrays, _store_meta
    from daskadmm.storage import chunk_slices, data_digest

    arch = api.build_architecture(cfg, ds)
    digest = data_digest(_data_arrays(ds), cfg.storage.chunk_size)
    meta = _store_meta(api.engine_options(_with(cfg, storage={"url": url})), arch, digest,
                       ds.n_train, chunk_slices(ds.n_train, 30))
    store = StateStore.create(url, meta=meta, owner="killed")
    if ready:
        store.write_data(_data_arrays(ds), 30)
        store.create_state(get_algorithm(cfg.algorithm.name).plan.layout(arch), ds.n_train,
                           30)
        store.set_attrs({"ready": True})
    store.set_attrs({"owner": {"run_id": "killed", "pid": 2**22 + 12345,
                               "host": socket.gethostname(), "since": 0}})
    store.close()  # as the kernel does for a killed run: its lock is gone
    res = api.fit(_with(cfg, storage={"url": url}, run={"resume": True}), dataset=ds)
    assert res.info["resumed_from"] == 0
    assert _same(full, res)


def test_an_all_zero_checkpoint_chunk_resumes(tmp_path):
    """Zarr stores no chunk that equals the fill value: pdADMM's u is still zero after one
    iteration, so its checkpoint chunks are absent, and that is no damage."""
    cfg = _with(_cfg(iterations=1), algorithm={"name": "pdadmm"}, model={"kind": "mlp"},
                run={"checkpoint_every": 1, "eval_every": 1}, cluster={"kind": "synchronous"})
    ds = load_dataset(cfg.data, seed=0)
    url = tmp_path / "s.zarr"
    api.fit(_with(cfg, storage={"url": str(url)}), dataset=ds)
    res = api.fit(_with(cfg, storage={"url": str(url)}, run={"resume": True, "iterations": 3}),
                  dataset=ds)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")},
                         run={"iterations": 3}), dataset=ds)
    assert _same(full, res)


# -- 9, 10. symlinks and locks ---------------------------------------------------------------------

def test_symlink_inside_a_store_is_refused(tmp_path):
    url = tmp_path / "s.zarr"
    cfg = _cfg(url=str(url))
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 2}), dataset=ds)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"victim")
    target = sorted((url / "model").rglob("zarr.json"))[-1]
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        api.fit(_with(cfg, run={"resume": True}), dataset=ds)
    with pytest.raises(StoreError, match="symbolic link"):
        api.fit(_with(cfg, storage={"overwrite": True}), dataset=ds)
    assert outside.read_bytes() == b"victim"


def test_locks_other_host_reused_pid_and_break_lock(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    cfg = _cfg(url=url)
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 2}), dataset=ds)
    g = zarr.open_group(url, mode="r+")

    def lock(owner):
        g.update_attributes({"status": "running", "owner": owner})

    resume = _with(cfg, run={"resume": True, "iterations": 4})
    lock({"run_id": "far", "pid": 1, "host": "elsewhere.example", "since": 0})
    with pytest.raises(StoreError, match="locked by run far .*storage.break_lock=true"):
        api.fit(resume, dataset=ds)
    api.fit(_with(resume, storage={"break_lock": True}), dataset=ds)
    assert "broke the lock of run far" in capsys.readouterr().err
    # this very process, but recorded with another start time: the pid was reused
    lock({"run_id": "old", "pid": os.getpid(), "host": socket.gethostname(),
          "pid_start": 12.0, "since": 0})
    api.fit(_with(resume, run={"iterations": 6}), dataset=ds)
    # a live holder (it holds the store's lock file) is never broken, nor is its store
    # replaced
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "s.zarr" / ".lock")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        lock({"run_id": "live", "pid": proc.pid, "host": socket.gethostname(), "since": 0})
        with pytest.raises(StoreError, match="in use by run live"):
            api.fit(_with(resume, storage={"break_lock": True}, run={"iterations": 8}),
                    dataset=ds)
        with pytest.raises(StoreError, match="in use by run live"):
            api.fit(_with(cfg, storage={"overwrite": True}), dataset=ds)
    finally:
        proc.kill()
        proc.wait()
    # once it is gone, its lock is gone with it
    api.fit(_with(resume, run={"iterations": 8}), dataset=ds)


def test_read_only_store_on_resume_is_one_line(tmp_path, monkeypatch):
    url = tmp_path / "s.zarr"
    cfg = _cfg(url=str(url))
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 2}), dataset=ds)
    # permission bits do not stop root (CI runs as root): ask os.access what a user would get
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(
        str(url)) and mode & os.W_OK else real(p, mode, **kw))
    with pytest.raises(StoreError, match="read-only"):
        api.fit(_with(cfg, run={"resume": True}), dataset=ds)


# -- 7. a lost worker costs time, not the run ------------------------------------------------------

def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


@pytest.mark.parametrize("algorithm", ["radmm3", "pdadmm"])
def test_lost_worker_is_recomputed_bitwise(tmp_path, algorithm):
    from distributed import Client, LocalCluster

    cfg = _with(_cfg(iterations=30), algorithm={"name": algorithm},
                model={"kind": "mlp" if algorithm == "pdadmm" else "resnet"},
                run={"checkpoint_every": 4})
    ds = load_dataset(cfg.data, seed=0)
    full = api.fit(_with(cfg, storage={"url": str(tmp_path / "full.zarr")}), dataset=ds)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        pids = list(_worker_pids(client).values())
        url = tmp_path / "s.zarr"
        killed = []

        def killer():
            deadline = time.time() + 60
            while time.time() < deadline and not (url / MANIFEST).exists():
                time.sleep(0.01)
            time.sleep(0.05)
            os.kill(pids[1], signal.SIGKILL)
            killed.append(True)

        t = threading.Thread(target=killer)
        t.start()
        res = api.fit(_with(cfg, storage={"url": str(url)},
                            cluster={"kind": "address", "address": cluster.scheduler_address}),
                      dataset=ds)
        t.join()
    assert killed and res.info["recoveries"] >= 1
    assert res.status == full.status
    assert _same(full, res)


# -- 11. failed runs fail --------------------------------------------------------------------------

def test_diverged_run_exits_3_and_keeps_the_last_good_model(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", "data=synthetic", "data.n_samples=60",
         "model.width=6", "model.depth=3", "cluster=threads", "run.iterations=6",
         "run.eval_every=1", "run.diverge_factor=1e-9", "run.progress=false",
         "run.plot=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr
    assert "the run failed (diverged)" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    model = load_model(str(run_dir / "state.zarr"))
    assert all(np.all(np.isfinite(W)) for W in model.weights)


def test_failed_iteration_is_never_checkpointed(tmp_path):
    url = tmp_path / "s.zarr"
    cfg = _with(_cfg(url=str(url)), run={"eval_every": 4, "diverge_factor": 1e-9})
    res = api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    assert res.status == "diverged" and res.iterations == 4
    assert json.loads((url / MANIFEST).read_text())["iteration"] == 2
    assert res.info["model_iteration"] == 0  # the initial weights: the last good evaluation
    assert all(np.array_equal(a, b) for a, b in zip(
        load_model(str(url)).weights, res.weights, strict=True))


def test_predict_refuses_non_finite_weights(tmp_path):
    from daskadmm.predict import main as predict_main

    url = tmp_path / "s.zarr"
    cfg = _cfg(url=str(url))
    ds = load_dataset(cfg.data, seed=0)
    api.fit(_with(cfg, run={"iterations": 2}), dataset=ds)
    g = zarr.open_group(str(url), mode="r+")
    W = np.asarray(g["model/W1"][...])
    W[0, 0] = np.nan
    g["model/W1"][...] = W
    with pytest.raises(StoreError, match="NaN or inf"):
        load_model(str(url))
    csv = tmp_path / "x.csv"
    csv.write_text(",".join(f"x{j}" for j in range(10)) + "\n" + ",".join("0" * 10) + "\n")
    assert predict_main([str(url), str(csv)]) == 2


# -- 12. an optional artefact never costs the results ----------------------------------------------

def test_failing_performance_report_keeps_the_results(tmp_path, monkeypatch, local_cluster,
                                                      capsys):
    import distributed

    class Broken:
        def __init__(self, filename, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("bokeh exploded")

    monkeypatch.setattr(distributed, "performance_report", Broken)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _with(_cfg(), storage={"url": None},
                run={"checkpoint_every": 0},
                cluster={"kind": "address", "address": local_cluster.scheduler_address})
    res = api.fit(cfg, run_dir=run_dir, dataset=load_dataset(cfg.data, seed=0))
    assert res.status == "max_iter"
    assert "performance report failed" in capsys.readouterr().err
    assert load_model(str(run_dir / "state.zarr")).weights[0].shape == res.weights[0].shape


# -- 8. cluster failures are one line -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("daskadmm: error:")]


def test_address_of_something_that_is_not_a_dask_scheduler(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():  # answers every connection with garbage, as an unrelated server would
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"\xff" * 64 + b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    time.sleep(0.3)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "daskadmm.cli", "cluster=address",
             f"cluster.address=tcp://127.0.0.1:{port}", "cluster.connect_timeout=3",
             "run.iterations=2", "model.width=8", "run.progress=false",
             f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        t.join()
        srv.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Dask scheduler" in lines[0], proc.stderr


def test_scheduler_killed_mid_run_is_one_line_and_resumable(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "error"}
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                              "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                               "--nthreads", "1", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = tmp_path / "s.zarr"
    args = ["data=synthetic", "data.n_samples=200", "model.width=8", "model.depth=3",
            "run.iterations=400", "run.checkpoint_every=2", "run.progress=false",
            "run.plot=false", "storage.chunk_size=50", f"storage.url={url}"]
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "daskadmm.cli", "cluster=address",
             f"cluster.address={address}", f"hydra.run.dir={tmp_path / 'run'}", *args],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (url / MANIFEST).exists() and run.poll() is None:
            time.sleep(0.05)
        sched.kill()
        out, err = run.communicate(timeout=120)
    finally:
        for p in (sched, worker):
            p.kill()
            p.wait()
    assert run.returncode == 2, err
    errors = _error_lines(err)
    assert len(errors) == 1 and "lost the Dask scheduler" in errors[0], err
    assert "Traceback" not in err and "run.resume=true" in errors[0]
    # the store is intact and resumes (here on threads)
    k = json.loads((url / MANIFEST).read_text())["iteration"]
    args = [a for a in args if not a.startswith("run.iterations")]
    proc = subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", "cluster=threads", "run.resume=true",
         f"run.iterations={k + 4}", f"hydra.run.dir={tmp_path / 'run2'}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["iterations"] == k + 4


def test_ctrl_c_stops_at_the_next_evaluation_keeps_everything_and_resumes(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the worker processes ignore
    it, the run stops at its next evaluation, writes its outputs and exits 130."""
    url = tmp_path / "s.zarr"
    run_dir = tmp_path / "run"
    args = ["data=synthetic", "data.n_samples=200", "model.width=8", "model.depth=3",
            "run.checkpoint_every=3", "run.progress=false", "run.plot=false",
            f"storage.url={url}", "cluster.dashboard_address=127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskadmm.cli", "run.iterations=2000", f"hydra.run.dir={run_dir}",
         *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len((run_dir / "metrics.csv").read_text().splitlines()) > 6 and \
                    (url / MANIFEST).exists():
                break
        except OSError:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in _last_line(err) and "run.resume=true" in _last_line(err)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] < 2000
    assert (run_dir / "weights.npz").exists()
    k = json.loads((url / MANIFEST).read_text())["iteration"]
    done = subprocess.run(
        [sys.executable, "-m", "daskadmm.cli", "cluster=threads", "run.resume=true",
         f"run.iterations={k + 3}", f"hydra.run.dir={tmp_path / 'run2'}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("kind", ["reference", "threads"])
def test_a_requested_stop_ends_every_engine_at_its_next_evaluation(kind):
    from daskadmm.monitor import clear_stop, request_stop

    cfg = _with(_cfg(iterations=20), cluster={"kind": kind},
                run={"checkpoint_every": 0, "eval_every": 3})
    request_stop()
    try:
        res = api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    finally:
        clear_stop()
    assert res.status == "interrupted" and res.iterations == 3
    assert res.history[-1]["iteration"] == 3


def test_python_api_on_a_local_cluster_needs_no_run_dir(tmp_path, monkeypatch):
    """fit(cfg) with the default cluster and no run directory keeps its state in a scratch
    directory of its own and removes it; the result carries the weights."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = _with(_cfg(iterations=3), cluster={"kind": "local", "in_process_mb": 0},
                run={"checkpoint_every": 0}, storage={"url": None})
    res = api.fit(cfg, dataset=load_dataset(cfg.data, seed=0))
    assert res.status == "max_iter" and res.info["store"] is None
    # (Dask's own dask-scratch-space lands in the temp dir too)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("daskadmm-")] == []
    ref = api.fit(_with(cfg, cluster={"kind": "synchronous"}, storage={"url": str(
        tmp_path / "ref.zarr")}), dataset=load_dataset(cfg.data, seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(ref.weights, res.weights, strict=True))


def test_public_namespace():
    import daskadmm
    from daskadmm import api, storage

    assert daskadmm.fit is api.fit and daskadmm.load_model is storage.load_model
    assert set(daskadmm.__all__) >= {"Config", "Result", "fit", "load_data", "load_model"}
    assert daskadmm.__version__[0].isdigit()
