"""The ``daskadmm`` command, run in a subprocess.

Bad input must give one line on stderr (``daskadmm: error: ...``), exit code 2, no traceback and
nothing written. The flow tests use a stand-in for ``daskadmm.api`` (injected by a small wrapper
script) so that they check the CLI, not the solvers; the smoke test runs the real thing.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
import support
from support import assert_usage_error

from daskadmm.result import HISTORY_COLUMNS, STATUSES

FAKE_API = textwrap.dedent(
    """
    import sys, time, types
    from pathlib import Path

    import numpy as np

    from daskadmm.data import DataError, Dataset
    from daskadmm.model import Architecture, init_weights
    from daskadmm.result import Result

    CALLS = {"load_data": 0}

    def load_data(cfg):
        CALLS["load_data"] += 1
        if cfg.data.path is not None and not Path(cfg.data.path).exists():
            raise DataError(f"cannot read {cfg.data.path}: no such file")
        rng = np.random.default_rng(cfg.run.seed)
        onehot = lambda n: np.eye(2)[:, rng.integers(0, 2, n)]
        return Dataset(name=cfg.data.name, task="classification",
                       X_train=rng.normal(size=(3, 40)), Y_train=onehot(40),
                       X_test=rng.normal(size=(3, 10)), Y_test=onehot(10))

    def fit(cfg, *, run_dir=None, callback=None, dataset=None):
        assert dataset is not None and run_dir is not None
        # metrics.csv comes with the first evaluation (a run refused before it leaves one
        # already there as it was)
        assert sorted(p.name for p in Path(run_dir).iterdir() if p.name != ".hydra") in (
            ["daskadmm.log"], [])
        arch = Architecture(kind=cfg.model.kind, depth=cfg.model.depth, d_in=dataset.d_in,
                            width=cfg.model.width, d_out=dataset.d_out,
                            activation=cfg.model.activation, loss="cross_entropy")
        weights = init_weights(arch, np.random.default_rng(0))
        history, t0 = [], time.perf_counter()
        for k in range(1, cfg.run.iterations + 1):
            rec = dict(iteration=k, wall_time=time.perf_counter() - t0, objective=1.0 / k,
                       primal_residual=0.1 / k, dual_residual=float("nan"), train_loss=1.0 / k,
                       test_loss=1.2 / k, train_metric=0.5, test_metric=0.4, rho=1.0, beta=1.0)
            history.append(rec)
            callback(rec)
        # metrics.csv streams: the rows are on disk before fit returns
        assert len((Path(run_dir) / "metrics.csv").read_text().splitlines()) == len(history) + 1
        return Result(status="max_iter", message="fake", iterations=cfg.run.iterations,
                      weights=weights, arch=arch, metric="accuracy", history=history,
                      wall_time=time.perf_counter() - t0, info={"load_calls": CALLS["load_data"]})

    from daskadmm.api import engine_options  # the real one: the CLI's store checks use it

    mod = types.ModuleType("daskadmm.api")
    mod.load_data, mod.fit, mod.engine_options = load_data, fit, engine_options
    sys.modules["daskadmm.api"] = mod
    import daskadmm
    daskadmm.api = mod

    from daskadmm.cli import main
    main()
    """
)

BAD = {
    "rho": (["algorithm.rho=-1"], "algorithm.rho"),
    "depth": (["model.depth=1"], "model.depth"),
    "activation": (["model.activation=foo"], "model.activation"),
    "unknown_key": (["model.nonexistent_key=3"], "model.nonexistent_key"),
    "appended_unknown_key": (["+model.nonexistent_key=3"], "model.nonexistent_key"),
    "unknown_option": (["data=nope"], "data/nope"),
    "csv_without_path": (["data=csv"], "data.path"),
    "sweep_without_m": (["model.depth=4,8"], "multirun"),
    "bad_syntax": (["model.depth=["], "model.depth"),
    "multirun_bad_job": (["-m", "model.depth=3,1"], "model.depth"),
    "multirun_bad_group": (["-m", "algorithm=radmm3,nope"], "algorithm/nope"),
    "multirun_interval": (["-m", "algorithm.rho=interval(0.1,1)"], "interval"),
}


def run_cli(tmp_path: Path, *args: str, fake: bool = False, timeout: float = 120):
    """Run the CLI (``fake``: over a stand-in API) with cwd ``tmp_path/work``."""
    return support.run_cli(tmp_path, *args, script=FAKE_API if fake else None, timeout=timeout)


@pytest.mark.parametrize(("args", "needle"), BAD.values(), ids=BAD.keys())
def test_bad_input(tmp_path, args, needle):
    proc, work = run_cli(tmp_path, *args)
    assert_usage_error(proc, work, needle)


def test_missing_data_file(tmp_path):
    proc, work = run_cli(tmp_path, "data=wine_red", "data.path=/nonexistent.csv")
    assert_usage_error(proc, work, "nonexistent.csv")


@pytest.mark.parametrize(
    "args", [["data=wine_red", "data.path=/nonexistent.csv"],
             ["-m", "data=synthetic", "data.path=/nonexistent.csv,/none2.csv"]],
    ids=["run", "multirun"],
)
def test_data_error_fake_api(tmp_path, args):
    proc, work = run_cli(tmp_path, *args, fake=True)
    assert_usage_error(proc, work, "nonexistent.csv")


def test_show_config_writes_nothing(tmp_path):
    proc, work = run_cli(tmp_path, "--cfg", "job", "model.depth=7")
    assert proc.returncode == 0, proc.stderr
    assert "depth: 7" in proc.stdout
    assert list(work.iterdir()) == []


def check_run_dir(run_dir: Path, iterations: int) -> dict:
    names = {p.name for p in run_dir.iterdir()}
    assert {"metrics.csv", "summary.json", "weights.npz", "convergence.png", ".hydra"} <= names
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == ",".join(HISTORY_COLUMNS)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] in STATUSES
    assert summary["iterations"] <= iterations
    assert summary["config"]["run"]["iterations"] == iterations
    assert (run_dir / "convergence.png").read_bytes().startswith(b"\x89PNG")
    return summary


def test_happy_path_fake_api(tmp_path):
    proc, work = run_cli(tmp_path, "data=synthetic", "model.width=8", "run.iterations=3",
                         fake=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = check_run_dir(work / "run", 3)
    assert summary["info"]["load_calls"] == 1  # the pre-flight's data set is reused
    assert summary["overrides"] == ["data=synthetic", "model.width=8", "run.iterations=3"]
    assert len((work / "run" / "metrics.csv").read_text().splitlines()) == 4
    assert "max_iter after 3 iterations" in proc.stdout
    assert "test_accuracy=0.4" in proc.stderr  # the progress bar's postfix
    from daskadmm.outputs import load_weights

    arch, weights = load_weights(work / "run" / "weights.npz")
    assert arch.width == 8 and len(weights) == arch.depth


def test_progress_off_fake_api(tmp_path):
    proc, work = run_cli(tmp_path, "run.iterations=2", "run.progress=false", "run.plot=false",
                         fake=True)
    assert proc.returncode == 0, proc.stderr
    assert "it/s" not in proc.stderr and "test_accuracy" not in proc.stderr
    assert not (work / "run" / "convergence.png").exists()


def test_multirun_fake_api(tmp_path):
    proc, work = run_cli(tmp_path, "-m", "model.depth=2,3", "run.iterations=2",
                         "run.progress=false", "cluster=synchronous", fake=True)
    assert proc.returncode == 0, proc.stderr
    for job, depth in ((0, 2), (1, 3)):
        summary = check_run_dir(work / "sweep" / str(job), 2)
        assert summary["config"]["model"]["depth"] == depth
        assert summary["info"]["load_calls"] == 1  # one data set, loaded once for both jobs


def test_pristine_run_dir(tmp_path):
    from daskadmm.cli import _pristine_run_dir, _remove_if_pristine

    started = time.time()
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1\n")
    (run_dir / "daskadmm.log").write_text("")
    assert _pristine_run_dir(run_dir, started)
    (run_dir / "metrics.csv").write_text("x\n")
    assert not _pristine_run_dir(run_dir, started)
    _remove_if_pristine(run_dir, started)
    assert run_dir.exists()
    (run_dir / "metrics.csv").unlink()
    _remove_if_pristine(run_dir, started)
    assert not run_dir.exists()
    assert tmp_path.exists()


def test_smoke(tmp_path):
    proc, work = run_cli(tmp_path, "data=synthetic", "data.n_samples=200", "model.width=8",
                         "run.iterations=3", timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = check_run_dir(work / "run", 3)
    assert summary["metric"] in ("accuracy", "mse")
    # the job log is not empty: it has the run's summary line
    log = (work / "run" / "daskadmm.log").read_text()
    assert "max_iter after 3 iterations" in log, log


def test_real_multirun_shares_one_local_cluster(tmp_path):
    proc, work = run_cli(tmp_path, "-m", "model.depth=2,3", "data=synthetic",
                         "data.n_samples=120", "model.width=6", "run.iterations=3",
                         "run.progress=false", "cluster=local", "cluster.in_process_mb=0",
                         "cluster.dashboard_address=127.0.0.1:0", timeout=240)
    assert proc.returncode == 0, proc.stderr
    dashboards = set()
    for job in (0, 1):
        summary = json.loads((work / "sweep" / str(job) / "summary.json").read_text())
        assert summary["info"]["engine"].startswith("dask")
        assert (work / "sweep" / str(job) / "dask-report.html").exists()
        assert (work / "sweep" / str(job) / "wavefront.png").stat().st_size > 0
        dashboards.add(summary["info"]["dashboard"])
    assert len(dashboards) == 1  # one cluster for the whole sweep
    # distributed's size probe of the report's profile trees is not the user's business
    assert "Sizeof calculation" not in proc.stderr


def test_small_multirun_runs_in_process_without_a_cluster(tmp_path):
    """The default cluster=local with small problems starts no LocalCluster, not even the
    multirun's shared one; every job says where it ran, on the terminal and in its log."""
    proc, work = run_cli(tmp_path, "-m", "model.depth=2,3", "data=synthetic",
                         "data.n_samples=120", "model.width=6", "run.iterations=3",
                         "run.progress=false", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("small problem") == 2 and "Dask dashboard" not in proc.stderr
    for job in (0, 1):
        summary = json.loads((work / "sweep" / str(job) / "summary.json").read_text())
        assert summary["info"]["cluster"] == "threads" and "dashboard" not in summary["info"]
        assert "cluster.in_process_mb=0" in summary["info"]["engine_note"]
        log = (work / "sweep" / str(job) / "daskadmm.log").read_text()
        assert "small problem" in log
        assert not (work / "sweep" / str(job) / "dask-report.html").exists()


@pytest.mark.parametrize("args, needle", [
    (("cluster=address", "cluster.address=tcp://127.0.0.1:9", "cluster.connect_timeout=1"),
     "cannot reach the Dask scheduler"),
    (("cluster=threads", "run.resume=true", "storage.url=/nonexistent/state.zarr"),
     "no state store"),
], ids=["unreachable-cluster", "missing-store"])
def test_runtime_input_errors_are_one_line(tmp_path, args, needle):
    proc, work = run_cli(tmp_path, "data=synthetic", "data.n_samples=60", "model.width=4",
                         "run.progress=false", *args)
    assert_usage_error(proc, work, needle)


def test_version_is_daskadmm_s(capsys):
    from importlib.metadata import version

    from daskadmm.cli import main

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"daskadmm {version('daskadmm')}"


def test_library_warnings_go_to_the_job_log_not_the_terminal(tmp_path):
    """A busy dashboard port makes distributed warn; the warning lands in daskadmm.log. The
    progress bar is on, and the dashboard line is written around it, not into it."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, work = run_cli(tmp_path, "data=synthetic", "data.n_samples=120", "model.width=6",
                             "run.iterations=2", "cluster=local", "cluster.in_process_mb=0",
                             f"cluster.dashboard_address=127.0.0.1:{port}", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "already in use" not in proc.stderr + proc.stdout
    log = (work / "run" / "daskadmm.log").read_text()
    assert f"Port {port} is already in use" in log
    dash = [line for line in proc.stderr.splitlines() if "Dask dashboard:" in line]
    assert len(dash) == 1 and dash[0].startswith("Dask dashboard:"), proc.stderr


@pytest.mark.parametrize("overrides", [
    ["model.depth=4,8", "algorithm=radmm3,radmm3a", "run.seed=0"],
    ["run.seed=range(0,3)", "model.width=choice(16,32)", "model.depth=4"],
    ["model.depth=4,8", "run.seed=1", "model.depth=16"],  # a later value replaces the sweep
    ["algorithm=glob(radmm3*)", "run.seed=0,1"],
    [],
])
def test_multirun_expansion_matches_hydras_basic_sweeper(overrides):
    """The pre-flight's jobs are those Hydra's basic sweeper launches, in its order."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from daskadmm import cli

    GlobalHydra.instance().clear()
    with initialize_config_module(cli.CONFIG_MODULE, version_base=None):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        ours = cli._expand_sweeps(parser.parse_overrides(overrides))
        (hydras,) = BasicSweeper.split_arguments(parser.parse_overrides(overrides), None)
    GlobalHydra.instance().clear()
    assert ours == hydras and len(ours) >= 1


def test_an_unknown_flag_is_left_to_hydra(tmp_path):
    """A flag this CLI's pre-flight parser does not know goes to hydra.main unchecked."""
    args, unknown = __import__("daskadmm.cli", fromlist=["_args_parser"])._args_parser() \
        .parse_known_args(["--some-newer-flag", "model.depth=4"])
    assert unknown == ["--some-newer-flag"] and args.overrides == ["model.depth=4"]
