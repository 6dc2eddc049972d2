"""Run outputs: metrics.csv, summary.json, weights.npz, convergence.png."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from daskadmm.config import Config
from daskadmm.model import Architecture, init_weights
from daskadmm.outputs import (
    MetricsWriter,
    load_weights,
    plot_convergence,
    plot_wavefront,
    save_weights,
    to_json_safe,
    wavefront_boxes,
    write_metrics_csv,
    write_run_outputs,
    write_summary,
)
from daskadmm.result import HISTORY_COLUMNS, Result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_history(n: int = 5, nan: bool = False) -> list[dict[str, float]]:
    hist = []
    for k in range(n):
        rec = {
            "iteration": k,
            "wall_time": 0.1 * k,
            "objective": 10.0 / (k + 1),
            "primal_residual": 1.0 / (k + 1) if k else 0.0,
            "dual_residual": 0.5 / (k + 1),
            "train_loss": 2.0 / (k + 1),
            "test_loss": 2.5 / (k + 1),
            "train_metric": 0.5 + 0.05 * k,
            "test_metric": 0.45 + 0.05 * k,
            "rho": 1.0,
            "beta": 1.0,
        }
        hist.append(rec)
    if nan:
        hist[-1]["objective"] = float("nan")
        hist[-1]["primal_residual"] = float("inf")
        hist[1]["test_metric"] = float("nan")
    return hist


def make_result(history=None, kind="resnet", depth=4, status="max_iter") -> Result:
    arch = Architecture(kind=kind, depth=depth, d_in=5, width=6, d_out=3, activation="tanh",
                        leaky_slope=0.02, bias=True, loss="cross_entropy")
    weights = init_weights(arch, np.random.default_rng(0))
    history = make_history() if history is None else history
    return Result(status=status, message="stopped", iterations=len(history), weights=weights,
                  arch=arch, metric="accuracy", history=history, wall_time=1.25,
                  info={"n_blocks": depth, "array": np.arange(3), "bad": float("nan")})


def test_metrics_csv(tmp_path):
    hist = make_history(4, nan=True)
    path = write_metrics_csv(tmp_path / "metrics.csv", hist)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == HISTORY_COLUMNS
        rows = list(reader)
    assert len(rows) == 4
    assert float(rows[2]["objective"]) == pytest.approx(hist[2]["objective"], rel=1e-15)
    assert math.isnan(float(rows[3]["objective"]))
    assert int(float(rows[3]["iteration"])) == 3


def test_metrics_writer_streams(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricsWriter(path) as writer:
        assert path.read_text().strip() == ",".join(HISTORY_COLUMNS)
        writer.write({"iteration": 1, "objective": 2.0, "extra_key": "ignored"})
        lines = path.read_text().splitlines()  # flushed while still open
        assert len(lines) == 2
        assert lines[1].split(",")[:3] == ["1", "", "2.0"]
        writer.write({"iteration": np.int64(2), "objective": np.float64(1.5)})
    assert writer.closed
    assert len(path.read_text().splitlines()) == 3


def test_lazy_metrics_writer_touches_nothing_before_its_first_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("an earlier run's\n")
    with MetricsWriter(path, lazy=True) as writer:
        pass
    assert writer.closed and path.read_text() == "an earlier run's\n"
    with MetricsWriter(path, lazy=True) as writer:
        writer.write({"iteration": 1})
        assert path.read_text().splitlines()[0] == ",".join(HISTORY_COLUMNS)
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="closed"):
        writer.write({"iteration": 2})


def test_summary_strict_json(tmp_path):
    result = make_result(make_history(3, nan=True))
    path = write_summary(tmp_path / "summary.json", Config().to_dict(), result,
                         extra={"run_dir": tmp_path})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    for key in ("config", "status", "message", "iterations", "metric", "train_metric",
                "test_metric", "train_loss", "test_loss", "wall_time", "versions", "host", "info",
                "final"):
        assert key in summary, key
    assert summary["status"] == "max_iter"
    assert summary["metric"] == "accuracy"
    assert summary["final"]["objective"] is None  # NaN -> null
    assert summary["final"]["primal_residual"] is None  # inf -> null
    assert summary["config"]["algorithm"]["name"] == "radmm3a"
    assert summary["info"]["array"] == [0, 1, 2]
    assert summary["info"]["bad"] is None
    assert summary["run_dir"] == str(tmp_path)
    versions = summary["versions"]
    for lib in ("python", "numpy", "scipy", "dask", "distributed", "zarr", "hydra-core",
                "omegaconf", "scikit-learn", "matplotlib", "daskadmm", "torch"):
        assert lib in versions
    assert versions["numpy"] == np.__version__
    assert summary["host"]["cpu_count"] >= 1


def test_summary_empty_history(tmp_path):
    result = make_result([])
    summary = json.loads(write_summary(tmp_path / "s.json", Config().to_dict(), result).read_text())
    assert summary["train_metric"] is None


def test_to_json_safe():
    assert to_json_safe({"a": [np.float32(1.5), float("-inf")], 3: (np.bool_(True),)}) == {
        "a": [1.5, None], "3": [True]}


@pytest.mark.parametrize("kind", ["resnet", "mlp"])
def test_weights_round_trip(tmp_path, kind):
    result = make_result(kind=kind, depth=5)
    path = save_weights(tmp_path / "weights.npz", result)
    with np.load(path, allow_pickle=False) as data:
        assert {f"W{i}" for i in range(1, 6)} <= set(data.files)
    arch, weights = load_weights(path)
    assert arch == result.arch
    assert len(weights) == 5
    for w, w0 in zip(weights, result.weights, strict=True):
        np.testing.assert_array_equal(w, w0)
        assert w.shape == w0.shape


@pytest.mark.parametrize("nan", [False, True])
def test_plot(tmp_path, nan):
    path = plot_convergence(tmp_path / "convergence.png", make_history(6, nan=nan), "accuracy")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_single_record_and_all_nan(tmp_path):
    one = make_history(1)
    plot_convergence(tmp_path / "one.png", one, "mse")
    assert (tmp_path / "one.png").read_bytes().startswith(PNG_MAGIC)
    bad = [{c: float("nan") for c in HISTORY_COLUMNS} for _ in range(3)]
    plot_convergence(tmp_path / "nan.png", bad, "mse")
    assert (tmp_path / "nan.png").stat().st_size > 1000
    plot_convergence(tmp_path / "empty.png", [], "mse")
    assert (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("plot", [True, False])
def test_write_run_outputs(tmp_path, plot):
    run_dir = tmp_path / "run"
    paths = write_run_outputs(run_dir, Config().to_dict(), make_result(), plot=plot)
    names = {p.name for p in run_dir.iterdir()}
    expected = {"metrics.csv", "summary.json", "weights.npz"}
    expected |= {"convergence.png"} if plot else set()
    assert names == expected
    assert set(paths) == {"metrics", "summary", "weights"} | ({"plot"} if plot else set())


def test_a_failing_plot_costs_no_result(tmp_path, monkeypatch, capsys):
    from daskadmm import outputs

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(outputs, "plot_convergence", broken)
    run_dir = tmp_path / "run"
    paths = write_run_outputs(run_dir, Config().to_dict(), make_result())
    assert set(paths) == {"metrics", "summary", "weights"}
    assert {p.name for p in run_dir.iterdir()} == {"metrics.csv", "summary.json", "weights.npz"}
    assert "convergence plot failed (RuntimeError: no fonts)" in capsys.readouterr().err


def _stream(blocks=3, iterations=4, chunks=2, rid="ab12cd34"):
    """Task-stream rows of a pipelined run: iteration k of block b starts at (k + b) / 10."""
    rows = [{"key": f"init_chunk-c0-{rid}", "worker": "w1", "action": "compute",
             "start": 100.0, "stop": 100.05}]
    for k in range(1, iterations + 1):
        for b in range(1, blocks + 1):
            for c in range(chunks):
                t = 100.0 + (k + b) / 10 + c / 100
                rows.append({"key": f"radmm3_chunk-b{b}-c{c}-k{k}-{rid}", "worker": "w1",
                             "action": "compute", "start": t, "stop": t + 0.05})
                rows.append({"key": f"radmm3_chunk-b{b}-c{c}-k{k}-{rid}", "worker": "w2",
                             "action": "transfer", "start": t - 0.01, "stop": t})
        rows.append({"key": f"evaluate-k{k}-{rid}", "worker": "w1", "action": "compute",
                     "start": 101.0, "stop": 101.1})
        rows.append({"key": f"checkpoint-b1-c0-k{k}-{rid}", "worker": "w1",
                     "action": "compute", "start": 101.0, "stop": 101.1})
    return rows


def test_wavefront_boxes_are_the_block_updates():
    boxes = wavefront_boxes(_stream())
    assert len(boxes) == 3 * 4 * 2  # compute of each (block, chunk, iteration) only
    assert {(b, c, k) for b, c, k, _, _ in boxes} == {
        (b, c, k) for b in (1, 2, 3) for c in (0, 1) for k in (1, 2, 3, 4)}
    # in-memory engine keys (no chunk)
    (box,) = wavefront_boxes([{"key": "radmm3_block-b7-k12-ff00ff00", "action": "compute",
                               "start": 1.0, "stop": 2.0}])
    assert box == (7, 0, 12, 1.0, 2.0)


def test_plot_wavefront(tmp_path):
    path = plot_wavefront(tmp_path / "wavefront.png", _stream())
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no block update"):
        plot_wavefront(tmp_path / "none.png", _stream()[:1])


def test_run_outputs_draw_the_wavefront_from_the_task_stream(tmp_path, monkeypatch, capsys):
    from daskadmm import outputs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "task-stream.json").write_text(json.dumps(_stream()))
    paths = write_run_outputs(run_dir, Config().to_dict(), make_result())
    assert paths["wavefront"].name == "wavefront.png"
    assert (run_dir / "wavefront.png").read_bytes()[:8] == PNG_MAGIC

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(outputs, "plot_wavefront", broken)
    (run_dir / "wavefront.png").unlink()
    paths = write_run_outputs(run_dir, Config().to_dict(), make_result())
    assert "wavefront" not in paths and {"metrics", "summary", "weights"} <= set(paths)
    assert "wavefront plot failed (RuntimeError: no fonts)" in capsys.readouterr().err
