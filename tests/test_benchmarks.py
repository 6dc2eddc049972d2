"""The benchmark suite (``benchmarks/suite.py`` and its ``suite_*.py`` modules): its helpers
and a smoke run of its tiny plan.

The flop count of RADMM-3 is checked against a brute-force count: one real iteration of the
serial reference runs on arrays that log every matrix product (shapes, and whether NumPy gets
both operands from one buffer, i.e. a syrk), with the Cholesky factorisations and solves logged
by wrapping scipy's ``cho_factor``/``cho_solve`` and BLAS ``dtrsm`` (a V step's solve is two
triangular solves with the factor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from support import load_benchmark

from daskadmm import api
from daskadmm.algorithms import get_algorithm
from daskadmm.engines.reference import initial_outputs, sweep
from daskadmm.model import Architecture, init_weights
from daskadmm.splitting import BlockSpec, Penalties, base

ROOT = Path(__file__).resolve().parent.parent


suite = load_benchmark("suite")  # the plans and the driver
suite_common = load_benchmark("suite_common")
suite_flops = load_benchmark("suite_flops")
suite_sections = load_benchmark("suite_sections")
suite_report = load_benchmark("suite_report")


# ------------------------------------------------------------------ brute-force flop counting


class _Log:
    products: list[tuple[int, int, int, bool]] = []  # (m, k, n, same buffer transposed)
    factors: list[int] = []
    solves: list[tuple[int, int]] = []
    trsms: list[tuple[int, int]] = []  # (m, right-hand sides): m^2 r flops each
    inverses: list[int] = []  # spd_inverse of an m x m matrix: potri's 2 m^3 / 3 flops


def _plain(x):
    if isinstance(x, _Counted):
        return x.view(np.ndarray)
    if isinstance(x, list | tuple):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, _Counted):
        return x.view(_Counted)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _data(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class _Counted(np.ndarray):
    """An ndarray that logs the shape of every matrix product it takes part in."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = _plain(inputs)
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        if ufunc is np.matmul and method == "__call__":
            a, b = args[0], args[1]
            assert a.ndim == 2 and b.ndim == 2
            same = (_data(a) == _data(b) and a.shape == b.shape[::-1]
                    and a.strides == b.strides[::-1])
            _Log.products.append((a.shape[0], a.shape[1], b.shape[1], same))
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_plain(args), **_plain(kwargs)))


def _count(monkeypatch, fn):
    """Run ``fn()`` with the factorisations and solves logged; return (executed, gemm-equivalent)
    flops counted from the log."""
    _Log.products, _Log.factors, _Log.solves, _Log.trsms = [], [], [], []
    _Log.inverses = []
    cho_factor, cho_solve = scipy.linalg.cho_factor, scipy.linalg.cho_solve
    spd_inverse = base.spd_inverse
    dtrsm = scipy.linalg.blas.dtrsm

    def factor(a, *args, **kwargs):
        _Log.factors.append(np.shape(a)[0])
        return cho_factor(_plain(a), *args, **kwargs)

    def solve(c, b, *args, **kwargs):
        b = _plain(b)
        _Log.solves.append((c[0].shape[0], 1 if b.ndim == 1 else b.shape[1]))
        return _wrap(cho_solve(c, b, *args, **kwargs))

    def trsm(alpha, a, b, *args, side=0, **kwargs):
        b = _plain(b)
        m = np.shape(a)[0]
        _Log.trsms.append((m, b.shape[0] if side else b.shape[1]))
        return _wrap(dtrsm(alpha, _plain(a), b, *args, side=side, **kwargs))

    def inverse(M):  # potrf then potri (base.spd_solve's many-right-hand-side path)
        _Log.factors.append(np.shape(M)[0])
        _Log.inverses.append(np.shape(M)[0])
        return spd_inverse(_plain(M))

    monkeypatch.setattr(base, "spd_inverse", inverse)
    monkeypatch.setattr(scipy.linalg, "cho_factor", factor)
    monkeypatch.setattr(scipy.linalg, "cho_solve", solve)
    monkeypatch.setattr(scipy.linalg.blas, "dtrsm", trsm)
    fn()
    monkeypatch.undo()
    chol = sum(m ** 3 / 3 + m ** 2 / 2 + m / 6 for m in _Log.factors)
    chol += sum(2 * m * m * r for m, r in _Log.solves)
    chol += sum(m * m * r for m, r in _Log.trsms)
    chol += sum(2 * m ** 3 / 3 for m in _Log.inverses)
    executed = chol + sum(m * (m + 1) * k if same else 2 * m * k * n
                          for m, k, n, same in _Log.products)
    gemm = chol + sum(2 * m * k * n for m, k, n, _ in _Log.products)
    return executed, gemm


@pytest.mark.parametrize("kind,bias", [("resnet", True), ("mlp", False), ("resnet", False)])
def test_radmm3_flops_match_a_brute_force_count(monkeypatch, kind, bias):
    depth, d_in, width, d_out, n = 5, 3, 6, 2, 11
    arch = Architecture(kind=kind, depth=depth, d_in=d_in, width=width, d_out=d_out,
                        activation="relu", bias=bias, loss="mse")
    rng = np.random.default_rng(1)
    weights = init_weights(arch, rng)
    X = rng.standard_normal((d_in, n)).view(_Counted)
    Y = rng.standard_normal((d_out, n)).view(_Counted)
    splitting = get_algorithm("radmm3").splitting
    states = splitting.init_state(arch, weights, X, Y)
    states = [{k: np.asarray(v).view(_Counted) for k, v in s.items()} for s in states]
    specs = [BlockSpec(arch, i, n) for i in range(1, depth + 1)]
    pen = Penalties(rho=2.0, beta=1.0, tau=1e-3, lam=1e-2)
    out = {}

    def one_iteration():
        out["cur"], _ = sweep(splitting, specs, pen, initial_outputs(splitting, states), X, Y)

    executed, gemm = _count(monkeypatch, one_iteration)
    assert _Log.products and _Log.factors and _Log.solves and _Log.inverses
    assert len(_Log.factors) == 2 * depth - 1  # a W solve per block, a V solve per hidden block
    # and it really was the solver's iteration: the iterate is finite and W changed
    assert all(np.all(np.isfinite(s["W"])) for s in out["cur"]["radmm3_block"])
    flops = suite_flops.radmm3_iteration_flops(depth, d_in, width, d_out, n, bias=bias)
    assert flops["total"] == pytest.approx(executed, rel=1e-12)
    gemm_eq = suite_flops.radmm3_iteration_flops(depth, d_in, width, d_out, n, bias=bias,
                                                 syrk=False)
    assert gemm_eq["total"] == pytest.approx(gemm, rel=1e-12)
    assert sum(v for k, v in flops.items() if k != "total") == flops["total"]


def test_hidden_block_flops_by_hand():
    d, n = 7, 50
    potrf = d ** 3 / 3 + d ** 2 / 2 + d / 6
    # gemm-equivalent: five (d x d)(d x n)-sized products, W and V Grams, two factorisations,
    # the W solve with d right-hand sides and the V solve with n (by the inverse: potri, then
    # the product, as many flops as potrs)
    expected = 5 * 2 * d * d * n + 2 * d ** 3 + 2 * potrf + 2 * d * d * d + 2 * d ** 3 / 3
    block = suite_flops.radmm3_block_flops(d, d, d, n, bias=False, syrk=False)
    assert sum(block.values()) == pytest.approx(expected)
    # syrk halves (plus the diagonal) the two Gram products
    block = suite_flops.radmm3_block_flops(d, d, d, n, bias=False)
    expected_syrk = expected - 2 * d * d * n + d * (d + 1) * n - 2 * d ** 3 + d * (d + 1) * d
    assert sum(block.values()) == pytest.approx(expected_syrk)
    # fewer than d/2 samples: the V solve by triangular solves, no inverse
    narrow = suite_flops.radmm3_block_flops(d, d, d, 3, bias=False)
    assert "v_inverse" not in narrow and narrow["v_solve"] == 2 * d * d * 3
    out_block = suite_flops.radmm3_block_flops(d, 3, None, n, bias=True)
    assert "v_solve" not in out_block and out_block["gram"] == (d + 1) * (d + 2) * n


# ------------------------------------------------------------------ fits and targets


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0, 2.7])
def test_fit_exponent_recovers_known_exponents(exponent):
    rng = np.random.default_rng(0)
    x = np.array([64, 128, 256, 512, 1024], dtype=float)
    t = 3e-6 * x ** exponent * np.exp(0.01 * rng.standard_normal(x.size))
    assert suite_common.fit_exponent(x, t) == pytest.approx(exponent, abs=0.03)
    exact = 0.1 * x ** exponent
    assert suite_common.fit_exponent(x, exact) == pytest.approx(exponent, abs=1e-12)
    assert suite_common.fit_exponent(x[-2:], exact[-2:]) == pytest.approx(exponent, abs=1e-12)


def test_fit_exponent_skips_bad_points():
    assert math.isnan(suite_common.fit_exponent([1.0], [2.0]))
    assert suite_common.fit_exponent([1, 2, 4, 8], [1, 2, math.nan, 8]) == pytest.approx(1.0)
    assert math.isnan(suite_common.fit_exponent([2, 2], [1, 3]))


def _history(values, dt=0.5):
    return [{"iteration": k, "train_time": dt * k, "test_metric": v}
            for k, v in enumerate(values)]


def test_time_to_target():
    acc = _history([0.1, 0.5, math.nan, 0.9, 0.95, 0.8])
    assert suite_common.time_to_target(acc, 0.9, higher=True) == (1.5, 3)
    assert suite_common.time_to_target(acc, 0.96, higher=True) == (
        pytest.approx(math.nan, nan_ok=True), None)
    mse = _history([1.0, 0.6, 0.4, 0.45, 0.39])
    assert suite_common.time_to_target(mse, 0.4, higher=False) == (1.0, 2)
    assert suite_common.time_to_target(mse, 0.3, higher=False)[1] is None
    assert suite_common.time_to_target(mse, math.nan, higher=False)[1] is None
    assert suite_common.best_metric(acc, True) == 0.95
    assert suite_common.best_metric(mse, False) == 0.39


def test_summarize_run_ratio_and_lower_bound():
    run = {"algorithm": "radmm3", "status": "time_budget", "iterations": 4, "train_time": 2.0,
           "history": [{**r, "train_metric": 0.0} for r in _history([0.2, 0.5, 0.7, 0.8, 0.85])]}
    s = suite_common.summarize_run(run, target=0.7, higher=True, reference_time=0.5)
    assert s["reached_target"] and s["time_to_target"] == 1.0 and s["ratio"] == 2.0
    assert s["iterations_to_target"] == 2 and s["final_test_metric"] == 0.85
    assert math.isnan(s["ratio_lower_bound"])
    s = suite_common.summarize_run(run, target=0.9, higher=True, reference_time=0.5,
                                   reference_relaxed_time=0.25)
    assert not s["reached_target"] and math.isnan(s["ratio"])
    assert s["ratio_lower_bound"] == 4.0
    # relaxed target 0.99 x 0.9 = 0.891: not reached either; 0.8 x 0.99 = 0.792 at 1.5 s
    assert s["relaxed_target"] == pytest.approx(0.891)
    assert s["relaxed_iterations_to_target"] is None and s["relaxed_ratio_lower_bound"] == 8.0
    s = suite_common.summarize_run(run, target=0.8, higher=True, reference_time=1.0,
                                   reference_relaxed_time=0.5)
    assert s["relaxed_iterations_to_target"] == 3 and s["relaxed_ratio"] == 3.0
    assert suite_common.relaxed_target(0.4, higher=False) == pytest.approx(0.404)


# ------------------------------------------------------------------ runs and the driver


def test_timed_fit_budget_error_and_evaluator_restored():
    ds = suite_common.synthetic_problem(64, d_in=4, d_out=2, n_test=16)
    original = api.evaluator
    cfg = suite_common.make_config("radmm3", depth=3, width=6, activation="relu", iterations=10_000)
    run = suite_common.timed_fit(cfg, ds, budget=0.05)
    assert run["status"] == "time_budget" and 0 < run["iterations"] < 10_000
    assert run["train_time"] >= 0.05 and run["eval_time"] > 0
    times = [r["train_time"] for r in run["history"]]
    assert times == sorted(times) and all(r["train_time"] <= r["wall_time"]
                                          for r in run["history"])
    assert suite_flops.iteration_times(run) and min(suite_flops.iteration_times(run)) > 0
    bad = suite_common.make_config("radmm3", depth=1, width=6)
    run = suite_common.timed_fit(bad, ds)
    assert run["status"] == "error" and "depth" in run["error"] and run["history"] == []
    assert api.evaluator is original


def test_resolve_data_dir(tmp_path):
    root = tmp_path / "repo"
    shared = tmp_path / "shared" / "data"
    (root / "data").mkdir(parents=True)
    shared.mkdir(parents=True)
    assert suite_common.resolve_data_dir(None, root) == root / "data"  # neither has the files
    for f in suite_common.WINE_FILES.values():
        (shared / f).write_text("x")
    assert suite_common.resolve_data_dir(None, root) == shared.resolve()
    for f in suite_common.WINE_FILES.values():
        (root / "data" / f).write_text("x")
    assert suite_common.resolve_data_dir(None, root) == root / "data"
    assert suite_common.resolve_data_dir(str(tmp_path), root) == tmp_path.resolve()


def test_a_failing_run_is_recorded_not_raised():
    plan = suite.PLANS["tiny"]
    import dataclasses

    plan = dataclasses.replace(plan, datasets=("no_such_data",))
    out = suite_sections.section_quality(plan, ROOT / "data", lambda msg: None)
    assert len(out["configs"]) == 1 and "no_such_data" in out["configs"][0]["error"]


def test_tiny_suite_smoke(tmp_path):
    pytest.importorskip("torch", reason="the suite's quality section runs the adam baseline")
    plan = suite.PLANS["tiny"]
    results, path = suite.run_suite(plan, suite.SECTIONS, tmp_path,
                                    suite_common.resolve_data_dir(None))
    assert results["errors"] == []
    data = json.loads(path.read_text())
    assert json.loads((tmp_path / "suite-latest.json").read_text()) == data
    assert data["machine"]["cpus"] >= 1 and "numpy" in data["machine"]["versions"]
    for name in suite.SECTIONS:
        assert "error" not in data["sections"][name], data["sections"][name]
    q = data["sections"]["quality"]["configs"][0]
    for label in ("adam", "sgd", *suite_common.ADMM_RESNET):
        assert q["runs"][label]["status"] in ("max_iter", "time_budget"), q["runs"][label]
        assert q["curves"][label]["test_metric"]
    assert q["target"] == q["runs"]["adam"]["final_test_metric"]
    assert q["relaxed_target"] == pytest.approx(0.99 * q["target"])
    roof = data["sections"]["roofline"]
    assert roof["profile"]["top_own_time"] and "error" not in roof["profile"]
    assert [r["width"] for r in roof["rows"]] == list(plan.roofline_widths)
    assert all(r["fraction_of_matmul"] > 0 for r in roof["rows"])
    sweeps = data["sections"]["scaling"]["sweeps"]
    assert set(sweeps) == {"depth", "width", "n"}
    g = data["sections"]["gradients"]["rows"][0]
    assert g["init_gradients"]["grad_norm_first"] > 0 and "status" in g["radmm3"]
    headline = (tmp_path / "headline.md").read_text()
    assert "| digits | 3 |" in headline and "Roofline" in headline
    assert (tmp_path / "quality.png").stat().st_size > 1000
    again = suite_report.render(path, tmp_path / "rendered")
    assert [p.name for p in again] == ["headline.md", "quality.png"]
    assert again[0].read_text() == headline


def test_main_cli(tmp_path, capsys):
    assert suite.main(["--tiny", "--only", "scaling", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "suite-latest.json").read_text())
    assert list(data["sections"]) == ["scaling"]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "nope"])
    args = suite.parse_args(["--quick", "--depths", "4", "--datasets", "digits"])
    plan = suite.plan_from_args(args)
    assert plan.mode == "quick" and plan.depths == (4,) and plan.datasets == ("digits",)


def test_quality_benchmark_quick_plan(tmp_path, capsys):
    """benchmarks/quality.py runs its grid and summarises mean ± std per method."""
    quality = load_benchmark("quality")
    out = tmp_path / "q.json"
    assert quality.main(["--quick", "--methods", "radmm3a,radmm3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["method"], r["activation"]) for r in rows} == {
        ("radmm3", "tanh"), ("radmm3", "relu"), ("radmm3a", "relu")}
    assert all(r["iterations"] == 3 and 0 <= r["test"] <= 1 for r in rows)
    table = capsys.readouterr().out
    assert "| digits | 4 |" in table and "radmm3a (relu)" in table


def test_quality_runs_a_named_variant_and_refuses_unknown_methods(tmp_path, monkeypatch):
    quality = load_benchmark("quality")
    import daskadmm

    seen = []
    real_fit = daskadmm.fit

    def fit(cfg):
        seen.append(cfg.algorithm)
        return real_fit(cfg)

    monkeypatch.setattr(daskadmm, "fit", fit)
    out = tmp_path / "q.json"
    assert quality.main(["--quick", "--methods", "radmm3a_restarts", "--out", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())] == ["radmm3a_restarts"]
    a = seen[0]  # the variant's keys, radmm3a's own included
    assert (a.name, a.rho, a.restart_every, a.lam, a.relax) == ("radmm3a", 1.0, 3, 0.03, 1.8)
    with pytest.raises(SystemExit, match="unknown method.*radmm4"):
        quality.main(["--quick", "--methods", "radmm3a,radmm4", "--out", str(out)])


def _qrow(method, data, depth, seed, test, curve, lr=None, act="relu", metric="accuracy",
          seconds=1.0):
    return {"method": method, "lr": lr, "data": data, "depth": depth, "seed": seed,
            "activation": act, "metric": metric, "test": test, "curve": curve,
            "seconds": seconds}


def test_quality_time_to_tuned_adam_and_figure(tmp_path, capsys):
    """The time table takes the Adam learning rate with the best mean, and each ADMM run's
    first evaluation at least as good as that mean (a loss: at most); the figure is drawn and
    --table-only redraws both from the JSON."""
    quality = load_benchmark("quality")
    rows = [
        _qrow("adam", "digits", 4, 0, 0.90, [[1.0, 0.90]], lr=1e-3, seconds=2.0),
        _qrow("adam", "digits", 4, 1, 0.94, [[1.0, 0.94]], lr=1e-3, seconds=4.0),
        _qrow("adam", "digits", 4, 0, 0.80, [[1.0, 0.80]], lr=1e-2),
        _qrow("radmm3a", "digits", 4, 0, 0.95, [[0.5, 0.85], [1.5, 0.92], [2.5, 0.95]]),
        _qrow("radmm3a", "digits", 4, 1, 0.91, [[0.5, 0.85], [1.5, 0.91]]),
        _qrow("adam", "synthetic", 4, 0, 0.05, [[1.0, 0.05]], lr=1e-3, metric="mse"),
        _qrow("radmm3a", "synthetic", 4, 0, 0.06, [[1.0, 0.2], [3.0, 0.049], [4.0, 0.06]],
              metric="mse"),
    ]
    assert [r["test"] for r in quality.tuned_adam(rows[:5])] == [0.90, 0.94]
    assert quality.reached(rows[3], 0.92) == 1.5 and quality.reached(rows[4], 0.92) is None
    assert quality.reached(rows[6], 0.05) == 3.0  # a loss: the first value at or below
    table = quality.summarise(rows)
    assert "| digits | 4 | 0.930 ± 0.028 (2) | 0.920 ± 0.028 (2) |" in table
    assert "| digits | 4 | 1.5 (1/2) | 3.0 |" in table
    assert "| synthetic | 4 | 3.0 (1/1) | 1.0 |" in table
    out = tmp_path / "q.json"
    out.write_text(json.dumps(rows))
    assert quality.main(["--table-only", "--out", str(out)]) == 0
    assert "1.5 (1/2)" in capsys.readouterr().out
    assert (tmp_path / "q-depth.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no results"):
        quality.main(["--table-only", "--out", str(tmp_path / "none.json")])


# ------------------------------------------------------------------ the cluster projection

project = load_benchmark("project_cluster")
FREE = project.Network(latency=0.0, bandwidth=1e18)


def _chain(durations, nbytes=10**6, pin=None):
    return [project.Task(f"t{i}", (f"t{i - 1}",) if i else (), d, out_bytes=nbytes,
                         worker=None if pin is None else pin(i))
            for i, d in enumerate(durations)]


def test_the_projection_measures_the_algorithm_it_rebuilds():
    """measure_tasks times a real run of the algorithm whose graph the projection rebuilds
    (it timed the default algorithm's tasks and found none of the projection's kinds once the
    default changed)."""
    m = project.measure_tasks(project.Problem(depth=4, width=6, n=64, chunks=2, d_in=5,
                                              d_out=3), "tanh", iterations=1, repeats=1)
    assert set(m["chunk"]) == {"first", "hidden", "last_hidden", "output"}
    assert all(v > 0 for v in m["chunk"].values())
    assert any(k.startswith(f"{project.ALGORITHM}_chunk-") for k in m["all_tasks"])


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_a_chain_takes_the_sum_of_its_durations_on_any_number_of_workers(workers):
    durations = [0.3, 1.0, 0.2, 2.5, 0.7]
    net = project.Network(latency=0.01, bandwidth=1e8)
    s = project.simulate(_chain(durations), workers, net)
    # Dask's rule keeps each task where its input is: nothing moves
    assert s.makespan == pytest.approx(sum(durations))
    assert s.transfers == 0 and len(set(s.worker.values())) == 1
    # pinned to alternate workers, every edge crosses and pays latency + bytes / bandwidth
    if workers > 1:
        s = project.simulate(_chain(durations, pin=lambda i: i % 2), workers, net)
        assert s.transfers == len(durations) - 1
        assert s.makespan == pytest.approx(sum(durations) + 4 * (0.01 + 10**6 / 1e8))


@pytest.mark.parametrize("n,workers,threads", [(10, 3, 1), (16, 4, 1), (7, 2, 2), (5, 8, 1)])
def test_independent_equal_tasks_take_ceil_n_over_p_rounds(n, workers, threads):
    tasks = [project.Task(f"t{i}", (), 1.5) for i in range(n)]
    s = project.simulate(tasks, workers, FREE, threads=threads)
    assert s.makespan == pytest.approx(math.ceil(n / (workers * threads)) * 1.5)
    assert sum(s.busy) == pytest.approx(1.5 * n)


def test_a_cross_worker_edge_costs_latency_plus_bytes_over_bandwidth():
    net = project.Network(latency=0.01, bandwidth=1e9)

    def graph(worker_b):
        return [project.Task("a", (), 1.0, out_bytes=5 * 10**8, worker=0),
                project.Task("b", ("a",), 2.0, worker=worker_b)]

    s = project.simulate(graph(1), 2, net)
    assert s.start["b"] == pytest.approx(1.0 + 0.01 + 0.5)
    assert s.makespan == pytest.approx(3.51) and s.transfer_bytes == 5 * 10**8
    assert project.simulate(graph(0), 2, net).makespan == pytest.approx(3.0)
    # the scheduler's delay comes before each task, after its data is there
    slow = project.Network(latency=0.01, bandwidth=1e9, overhead=0.1)
    assert project.simulate(graph(1), 2, slow).start["b"] == pytest.approx(0.1 + 1.51 + 0.1)
    # two inputs into one worker share its link: one after the other
    tasks = [project.Task("a0", (), 1.0, out_bytes=10**9, worker=0),
             project.Task("a1", (), 1.0, out_bytes=10**9, worker=1),
             project.Task("c", ("a0", "a1"), 1.0, worker=2)]
    assert project.simulate(tasks, 3, net).start["c"] == pytest.approx(1.0 + 2 * 1.01)


def test_store_traffic_and_driver_gates():
    net = project.Network(latency=0.5, bandwidth=100.0, driver_delay=0.25, submit_cost=0.125)
    tasks = [project.Task("w", (), 1.0, worker=0),
             project.Task("r", ("w",), 1.0, worker=1, store_reads=(("w", 100),)),
             project.Task("s", ("w",), 1.0, worker=0, store_reads=(("w", 100),)),
             project.Task("io", (), 1.0, worker=2, remote_io=(50, 150)),
             project.Task("g", (), 1.0, worker=2, gate=("w",))]
    s = project.simulate(tasks, 3, net)
    # a store read crosses only from another worker's write; it blocks the thread
    assert s.finish["r"] - s.start["r"] == pytest.approx(1.0 + 0.5 + 1.0)
    assert s.finish["s"] - s.start["s"] == pytest.approx(1.0)
    assert s.finish["io"] - s.start["io"] == pytest.approx(1.0 + 2 * 0.5 + 2.0)
    # the ungated tasks were submitted one by one; "g" once "w" was done and the driver free
    assert s.start["w"] == pytest.approx(0.125)
    assert s.start["g"] == pytest.approx(max(1.125 + 0.25, s.finish["io"]))
    with pytest.raises(ValueError, match="unknown key"):
        project.simulate([project.Task("x", ("nope",), 1.0)], 1, net)
    with pytest.raises(ValueError, match="pinned"):
        project.simulate([project.Task("x", (), 1.0, worker=3)], 2, net)


def test_engine_graph_is_the_runners():
    """The rebuilt graph has exactly the keys a real run executes (a synchronous run timed by
    the script's Dask callback), and the runner's placement."""
    from types import SimpleNamespace

    from daskadmm.engines.driver import _Ctx

    prob = project.Problem(depth=5, width=6, n=50, chunks=3, d_in=4, d_out=3, n_test=10)
    ds = project.synthetic_classification(prob.n, prob.d_in, prob.d_out, n_test=prob.n_test)
    cfg = suite_common.make_config("radmm3", depth=prob.depth, width=prob.width, iterations=5)
    cfg.cluster.kind = "synchronous"
    cfg.storage.chunk_size = math.ceil(prob.n / prob.chunks)
    cfg.run.eval_every = 5
    timer = project._Timer()
    with timer.callback:
        res = api.fit(cfg, dataset=ds)
    g = project.engine_graph(prob, 5, res.info["window"], res.info["run_id"], eval_iters=[5])
    assert {n.key for n in g.nodes} == set(timer.seconds) - {
        k for k in timer.seconds if k.startswith(("data_", "init_small"))}
    for N, W in [(5, 2), (8, 3), (4, 7), (128, 64)]:
        workers = [f"w{i}" for i in range(W)]
        runner = _Ctx._placement(SimpleNamespace(N=N, by_chunk=lambda W: False), workers)
        assert {b: workers[w] for b, w in project.placement(N, W).items()} == runner.blocks
        assert runner.chunks is None


def _uniform(g, chunk=1.0):
    return {n.key: chunk if n.key.startswith("radmm3_chunk") else 0.0 for n in g.nodes}


def test_engine_graph_replays_the_wavefront_and_the_window():
    prob = project.Problem(depth=8, width=4, n=8, chunks=1, d_in=2, d_out=2)
    rng = np.random.default_rng(0)
    g = project.engine_graph(prob, 6, 2)
    durations = {n.key: float(rng.uniform(0.1, 1.0)) for n in g.nodes}
    tasks, lits = project.to_tasks(g, prob, 1, durations)
    # one worker and a free network: the whole work, never idle
    assert project.simulate(tasks, 1, FREE, literals=lits).makespan == pytest.approx(
        sum(durations.values()))

    def steady(window, workers, iterations=24):
        g = project.engine_graph(prob, iterations, window)
        tasks, lits = project.to_tasks(g, prob, workers, _uniform(g))
        s = project.simulate(tasks, workers, FREE, literals=lits)
        return project.steady_per_iteration(project.iteration_arrivals(g, s.finish))

    # a block waits for its left neighbour of this iteration and its right neighbour of the
    # last one: with a block per worker, one iteration every two block updates
    assert steady(8, 8) == pytest.approx(2.0)
    assert steady(8, 4) == pytest.approx(2.0)  # two blocks per worker, never both ready
    # one worker does all eight updates of an iteration (the two-point measure sees the
    # iterations interleave, hence the tolerance); one iteration in flight: no overlap at all
    assert steady(8, 1) == pytest.approx(8.0, rel=0.05)
    assert steady(1, 8) == pytest.approx(8.0) and steady(1, 1) == pytest.approx(8.0)


def test_store_traffic_of_a_chunk_update():
    prob = project.Problem(depth=5, width=8, n=30, chunks=3, d_in=3, d_out=2)
    g = project.engine_graph(prob, 3, 3)
    reads, writes = project.store_traffic(prob, "radmm3_chunk-b3-c1-k2-sim", "sim")
    col = 8 * 10  # float64 x 10 samples of the chunk
    left, old, right = ("radmm3_chunk-b2-c1-k2-sim", "radmm3_chunk-b3-c1-k1-sim",
                        "radmm3_chunk-b4-c1-k1-sim")
    # V_2 of this iteration; U, Lam, V of its own last iteration; U, Lam, V of block 4 (residual)
    assert sorted(reads) == sorted([(left, 8 * col)] + [(old, 8 * col)] * 3
                                   + [(right, 8 * col)] * 3)
    assert writes == [8 * col] * 3
    reads, writes = project.store_traffic(prob, "radmm3_chunk-b5-c0-k1-sim", "sim")
    assert (None, 2 * col) in reads and writes == [2 * col] * 2  # output: Y read, no V
    assert ("init_chunk-c0-sim", 2 * col) in reads
    # on one worker: a shared store costs every read and write, a node-local one nothing
    net = project.Network(latency=0.001, bandwidth=1e6)
    durations = _uniform(g)
    plain = sum(durations.values())
    io = 0.0
    for node in g.nodes:
        r, w = project.store_traffic(prob, node.key, g.run_id)
        io += sum(net.cost(b) for b in [*(b for _, b in r), *w])
    for store, extra in (("none", 0.0), ("local", 0.0), ("shared", io)):
        tasks, lits = project.to_tasks(g, prob, 1, durations, store)
        assert project.simulate(tasks, 1, net, literals=lits).makespan == pytest.approx(
            plain + extra)
    assert io > 0
    # across workers the node-local store pays for the neighbours' chunks only
    tasks, lits = project.to_tasks(g, prob, 5, durations, "local")
    assert project.simulate(tasks, 5, net, literals=lits).makespan > project.simulate(
        *project.to_tasks(g, prob, 5, durations, "none")[:1], 5, net,
        literals=lits).makespan


def _task_seconds() -> dict:
    """Made-up measurements of every task kind (``project_cluster.measure_tasks``' shape)."""
    return {"chunk": {"first": 1.0, "hidden": 0.75, "last_hidden": 0.5, "output": 0.25},
            "update_weights": {"first": 0.125, "hidden": 0.0625, "output": 0.03125},
            "reduce_per_input": 0.01, "layer_stats": 0.001, "iteration_stats": 0.002,
            "init_chunk": 3.0, "measured_depth": 4, "init_partials": 0.5, "gram_x": 0.25}


def test_projected_seconds_per_iteration_on_one_worker_is_an_iterations_work():
    prob = project.Problem(depth=6, width=4, n=12, chunks=2, d_in=3, d_out=2)
    m = _task_seconds()
    g = project.engine_graph(prob, 2, 2)
    durations = project.projected_durations(g, prob, m)
    one = sum(v for k, v in durations.items() if "-k2-" in k)  # (W_1's reduction grows by one
    # input after iteration 1: X's Gram matrix)
    assert durations["radmm3_chunk-b5-c1-k1-sim"] == 0.5  # block N-1: its right is the output
    assert durations["init_chunk-c0-sim"] == pytest.approx(3.0 * 6 / 4)
    for window in (None, 2):
        out = project.simulate_admm(prob, m, FREE, (1, 3), window, 4, "none")
        assert out[1]["seconds_per_iteration"] == pytest.approx(one)
        assert out[1]["utilisation"] == pytest.approx(1.0)
        assert out[3]["seconds_per_iteration"] < one


def test_projected_durations_cover_every_task_of_a_many_chunk_graph():
    """Past 4 chunks the graph has reduction trees and groups of chunk statistics: every task
    gets a duration, and a W update that is a reduction's root pays for its inputs."""
    prob = project.Problem(depth=4, width=4, n=40, chunks=10, d_in=3, d_out=2)
    m = _task_seconds()
    g = project.engine_graph(prob, 2, 2)
    durations = project.projected_durations(g, prob, m)
    assert set(durations) == {n.key for n in g.nodes}
    assert any(k.startswith("group_stats-") for k in durations)
    # W_3 is the root of block 2's tree (3 nodes of 10 chunks) and takes W_3 of k-1; the
    # timed W step (one chunk) already summed one input
    assert durations["update_weights-b3-k2-sim"] == pytest.approx(0.0625 + 2 * 0.01)
    assert durations["update_weights-b1-k2-sim"] == 0.125
    assert project.simulate_admm(prob, m, FREE, (1, 2), 2, 4, "none")[2][
        "seconds_per_iteration"] > 0


def test_bench_default_smoke(tmp_path):
    """The default-run benchmark runs whole commands in turn and compares them in one report:
    the same iterates (same test metric), the default in process for a small problem."""
    from support import load_benchmark

    bench = load_benchmark("bench_default")
    out = tmp_path / "d.json"
    report = bench.main(["--rounds", "1", "--variants", "default,reference",
                         "--set", "data=synthetic", "--set", "data.n_samples=80",
                         "--set", "model.width=4", "--set", "run.iterations=2",
                         "--set", "run.plot=false", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (default,) = report["runs"]["default"]
    assert default["cluster"] == "threads" and report["runs"]["reference"][0]["engine"]
    assert report["same_test_metric"] and report["ratio_to_reference"]["default"]["median"] > 0
    assert default["cpu_seconds"] > 0 and report["cpu_ratio_to_reference"]["default"]["median"] > 0
    assert len(default["loadavg"]) == 2 and all(len(x) == 3 for x in default["loadavg"])
