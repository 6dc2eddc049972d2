"""The pure helpers of the fault-injection benchmark (``benchmarks/torture.py``): the command
line, history comparison, outcome classification, kill moments and the worker-process rule.
Synthetic inputs only: nothing here starts a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


torture = load_benchmark("torture")

COLUMNS = ["iteration", "wall_time", "objective", "primal_residual", "test_metric", "rho"]


def _history(n: int = 3, **changes):
    rows = [{"iteration": str(k), "wall_time": repr(0.5 * k + 0.123),
             "objective": repr(1.0 / (k + 1)), "primal_residual": repr(0.1 * k),
             "test_metric": "nan" if k == 0 else "0.5", "rho": "1.0"} for k in range(n)]
    for key, (row, value) in changes.items():
        rows[row][key] = value
    return COLUMNS, rows


def test_build_command_radmm3_and_resume():
    cfg = torture.RunConfig(width=16, depth=3, iterations=6, checkpoint_every=3, chunk_size=100)
    cmd = torture.build_command("/venv/bin/daskadmm", "radmm3", cfg, "/t/s.zarr", "/t/run")
    assert cmd[0] == "/venv/bin/daskadmm"
    for o in ("algorithm=radmm3", "model.width=16", "model.depth=3", "run.iterations=6",
              "run.checkpoint_every=3", "storage.chunk_size=100", "storage.url=/t/s.zarr",
              "hydra.run.dir=/t/run", "cluster=local", "cluster.n_workers=2",
              "run.progress=false", "run.plot=false"):
        assert o in cmd
    assert "run.resume=true" not in cmd
    assert not any(o.startswith("model.kind=") for o in cmd)
    again = torture.build_command("/venv/bin/daskadmm", "radmm3", cfg, "/t/s.zarr", "/t/run2",
                                  resume=True)
    assert again[-1] == "run.resume=true"
    assert [o for o in again if not o.startswith("hydra.run.dir")][:-1] == \
        [o for o in cmd if not o.startswith("hydra.run.dir")]


def test_build_command_pdadmm_is_an_mlp():
    cmd = torture.build_command("daskadmm", "pdadmm", torture.RunConfig(), "s", "r")
    assert "algorithm=pdadmm" in cmd and "model.kind=mlp" in cmd
    more = torture.RunConfig(extra=("algorithm.restart_every=3",))  # --set
    cmd = torture.build_command("daskadmm", "radmm3a", more, "s", "r", resume=True)
    assert "algorithm.restart_every=3" in cmd and cmd[-1] == "run.resume=true"
    with pytest.raises(ValueError):
        torture.build_command("daskadmm", "sgd", torture.RunConfig(), "s", "r")


def test_compare_histories_ignores_wall_time_only():
    ref = _history()
    assert torture.compare_histories(ref, _history(wall_time=(2, "99.0"))) == (True, "")
    # same float, another spelling; nan equals nan
    assert torture.compare_histories(ref, _history(rho=(1, "1.00")))[0]
    same, what = torture.compare_histories(ref, _history(objective=(2, repr(1 / 3 + 1e-16))))
    assert not same and "objective" in what and "row 2" in what
    same, what = torture.compare_histories(ref, _history(n=2))
    assert not same and "2 rows" in what
    same, what = torture.compare_histories(ref, (COLUMNS[:-1], _history()[1]))
    assert not same and "columns" in what


def test_time_columns():
    assert torture.time_columns(COLUMNS) == {"wall_time"}
    assert torture.time_columns(["time", "compute_seconds", "timeout_count"]) == \
        {"time", "compute_seconds"}


def test_read_history_roundtrip(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("iteration,wall_time,objective\n0,0.1,2.5\n1,0.2,nan\n")
    cols, rows = torture.read_history(path)
    assert cols == ["iteration", "wall_time", "objective"]
    assert rows[1] == {"iteration": "1", "wall_time": "0.2", "objective": "nan"}


def test_classify():
    assert torture.classify(0, False, True, True) == "equal"
    assert torture.classify(0, False, False, True) == "different"
    assert torture.classify(0, False, True, False) == "different"
    assert torture.classify(0, False, None, None) == "different"
    assert torture.classify(2, False, True, True) == "failed"
    assert torture.classify(-9, True, None, None) == "failed"
    assert torture.classify(0, True, True, True) == "failed"
    assert torture.classify(None, False, None, None) == "failed"


def test_resume_refused():
    msg = "daskadmm: error: state store /x has no complete checkpoint to resume from\n"
    assert torture.resume_refused(2, msg)
    assert torture.resume_refused(2, "daskadmm: error: nothing to resume in /x")
    assert not torture.resume_refused(1, msg)
    assert not torture.resume_refused(2, "daskadmm: error: a Dask worker was lost mid-run")


def test_weights_comparison():
    a = [np.arange(6.0).reshape(2, 3), np.ones((1, 3))]
    b = [w.copy() for w in a]
    assert torture.weights_equal(a, b) and torture.max_weight_difference(a, b) == 0.0
    b[1][0, 2] += 1e-15
    assert not torture.weights_equal(a, b)
    assert torture.max_weight_difference(a, b) == pytest.approx(1e-15, rel=0.5)
    assert torture.max_weight_difference(a, a[:1]) == math.inf
    assert torture.max_weight_difference(a, [a[0], np.ones((3, 1))]) == math.inf
    assert not torture.weights_equal(a, [a[0], np.ones((3, 1))])


def test_pick_kill_plan_bounds_and_seed():
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = torture.pick_kill_plan(rng, "time", startup=2.0, expected_end=10.0)
        assert t["mode"] == "time" and 2.0 <= t["at"] <= 10.0
        c = torture.pick_kill_plan(rng, "checkpoint", startup=2.0, expected_end=10.0,
                                   checkpoints=5, after_checkpoint=3.0)
        assert 1 <= c["j"] <= 3 and 0.0 <= c["delay"] <= 3.0
        w = torture.pick_kill_plan(rng, "worker", startup=2.0, expected_end=12.0, rows=21)
        assert 4 <= w["after_row"] <= 10 and 0.0 <= w["delay"] <= 0.5
    js = {torture.pick_kill_plan(rng, "checkpoint", startup=0, expected_end=1,
                                 checkpoints=5)["j"] for _ in range(100)}
    assert js == {1, 2, 3}
    assert torture.pick_kill_plan(rng, "checkpoint", startup=0, expected_end=1,
                                  checkpoints=2)["j"] == 1
    assert torture.pick_kill_plan(rng, "worker", startup=0, expected_end=1,
                                  rows=1)["after_row"] == 1
    p1 = torture.pick_kill_plan(np.random.default_rng(7), "time", startup=1, expected_end=5)
    p2 = torture.pick_kill_plan(np.random.default_rng(7), "time", startup=1, expected_end=5)
    assert p1 == p2
    # a degenerate window still gives a moment
    assert torture.pick_kill_plan(rng, "time", startup=5, expected_end=3)["at"] == 5
    with pytest.raises(ValueError):
        torture.pick_kill_plan(rng, "never", startup=0, expected_end=1)


def test_trial_schedule_alternates():
    s = torture.trial_schedule(8, ("radmm3", "pdadmm"))
    assert [a for a, _ in s] == ["radmm3", "pdadmm"] * 4
    for alg in ("radmm3", "pdadmm"):
        modes = [m for a, m in s if a == alg]
        assert modes.count("checkpoint") == modes.count("time") == 2
    assert [m for _, m in torture.trial_schedule(4, ("pdadmm",))] == \
        ["checkpoint", "time", "checkpoint", "time"]


def test_n_checkpoints():
    assert torture.n_checkpoints(torture.RunConfig(iterations=20, checkpoint_every=2)) == 10
    assert torture.n_checkpoints(torture.RunConfig(iterations=3, checkpoint_every=5)) == 1


SPAWN = ["/v/bin/python", "-c", "from multiprocessing.spawn import spawn_main; "
         "spawn_main(tracker_fd=28, pipe_handle=34)", "--multiprocessing-fork"]
TRACKER = ["/v/bin/python", "-B", "-c",
           "from multiprocessing.resource_tracker import main;main(27)"]


def test_worker_pids_local_cluster():
    # what `cluster=local` looks like: nannies inside the driver (pid 100), one spawned
    # process per worker, and multiprocessing's resource tracker
    tree = [(101, 100, TRACKER), (102, 100, SPAWN), (103, 100, SPAWN)]
    assert torture.worker_pids(tree) == [102, 103]
    assert torture.worker_pids([(101, 100, TRACKER)]) == []


def test_worker_pids_nanny_processes():
    # nannies as spawned processes of their own: the workers are the leaves
    tree = [(201, 100, SPAWN), (202, 100, SPAWN), (203, 201, SPAWN), (204, 202, SPAWN),
            (205, 203, ["/bin/sh", "-c", "true"])]
    assert torture.worker_pids(tree) == [203, 204]


def test_count_outcomes_and_json_safe():
    recs = [{"kind": "kill", "outcome": "equal"}, {"kind": "kill", "outcome": "failed"},
            {"kind": "lost_worker", "outcome": "different"}]
    assert torture.count_outcomes(recs, "kill") == {"equal": 1, "different": 0, "failed": 1}
    assert torture.count_outcomes(recs, "lost_worker") == {"equal": 0, "different": 1,
                                                           "failed": 0}
    assert torture._json_safe({"a": (np.float64(1.5), math.inf, math.nan)}) == \
        {"a": [1.5, "inf", None]}


def test_parse_args_quick():
    a = torture.parse_args(["--quick"])
    assert (a.kills, a.lost_workers) == (4, 2)
    assert a.algorithms == ("radmm3a", "radmm3", "radmm2", "pdadmm", "dladmm")
    a = torture.parse_args(["--quick", "--kills", "1", "--algorithms", "pdadmm"])
    assert (a.kills, a.lost_workers, a.algorithms) == (1, 2, ("pdadmm",))
    a = torture.parse_args([])
    assert (a.kills, a.lost_workers, a.timeout) == (100, 20, 300.0)
    with pytest.raises(SystemExit):
        torture.parse_args(["--algorithms", "sgd"])


def test_rows_counts_complete_lines(tmp_path):
    path = tmp_path / "metrics.csv"
    assert torture._rows(path) == 0
    path.write_text("iteration,objective\n")
    assert torture._rows(path) == 0
    path.write_text("iteration,objective\n0,1.5\n1,1.2\n2,1.")  # a row being written
    assert torture._rows(path) == 2


def test_build_command_dladmm_is_an_mlp():
    cmd = torture.build_command("daskadmm", "dladmm", torture.RunConfig(), "s", "r")
    assert "algorithm=dladmm" in cmd and "model.kind=mlp" in cmd
