"""daskadmm-report: the comparison table, time to target, curves and error handling."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from daskadmm import report
from daskadmm.result import HISTORY_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, algorithm: str, depth: int, width: int, data: str, metric: str,
              wall: list[float], test: list[float | None], status: str = "max_iter",
              train: list[float | None] | None = None, hydra: bool = True) -> Path:
    """A run directory laid out like daskadmm.outputs writes it."""
    run_dir.mkdir(parents=True)
    train = train if train is not None else [None if t is None else t + 0.01 for t in test]
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(HISTORY_COLUMNS))
        writer.writeheader()
        for k, (w, te, tr) in enumerate(zip(wall, test, train, strict=True)):
            writer.writerow({
                "iteration": k, "wall_time": repr(w), "objective": repr(1.0 / (k + 1)),
                "primal_residual": "0.0", "dual_residual": "0.0",
                "train_loss": "0.5", "test_loss": "0.6",
                "train_metric": "nan" if tr is None else repr(tr),
                "test_metric": "nan" if te is None else repr(te),
                "rho": "nan", "beta": "nan",
            })
    final_test = test[-1]
    final_train = train[-1]
    summary = {
        "status": status,
        "message": "whatever",
        "iterations": len(wall) - 1,
        "metric": metric,
        "wall_time": wall[-1] + 0.25,
        "train_metric": final_train,
        "test_metric": final_test,
        "final": {"objective": 0.1, "train_metric": final_train, "test_metric": final_test},
        "evaluations": len(wall),
        "architecture": {"kind": "resnet", "depth": depth, "width": width},
        "config": {
            "algorithm": {"name": algorithm, "lr": 0.001},
            "model": {"kind": "resnet", "depth": depth, "width": width},
            "data": {"name": data},
            "run": {"iterations": len(wall) - 1, "seed": 0},
        },
        "info": {},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if hydra:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text("algorithm: {}\n")
    return run_dir


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    """Four runs on digits: radmm3 (depth 4 and 8), adam, and a diverged sgd."""
    root = tmp_path / "multirun" / "2026-11-23" / "14-00-00"
    write_run(root / "0", "radmm3", 4, 16, "digits", "accuracy",
              [0.0, 1.0, 2.0, 3.0, 4.0], [0.1, 0.5, 0.8, 0.9, 0.951])
    write_run(root / "1", "radmm3", 8, 16, "digits", "accuracy",
              [0.0, 2.0, 4.0, 6.0, 8.0], [0.1, 0.6, 0.85, 0.93, 0.96])
    write_run(root / "2", "adam", 4, 16, "digits", "accuracy",
              [0.0, 0.5, 1.0, 1.5, 2.0], [0.1, 0.7, 0.9, 0.955, 0.94])
    write_run(root / "3", "sgd", 4, 16, "digits", "accuracy",
              [0.0, 0.1, 0.2], [0.1, None, None], status="diverged")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == report.REPORT_COLUMNS
        return list(reader)


def by_dir(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {Path(r["run_dir"]).name: r for r in rows}


def test_report_multirun(multirun, capsys):
    assert report.main([str(multirun)]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out
    rows = read_rows(multirun / "report.csv")
    assert len(rows) == 4
    runs = by_dir(rows)
    target = 0.96 * 0.99
    for r in rows:
        assert r["data"] == "digits"
        assert r["metric"] == "accuracy"
        assert float(r["target"]) == pytest.approx(target, rel=1e-12)
    # sorted by data, algorithm, depth
    assert [r["algorithm"] for r in rows] == ["adam", "radmm3", "radmm3", "sgd"]
    assert [r["depth"] for r in rows] == ["4", "4", "8", "4"]

    r0, r1, r2, r3 = runs["0"], runs["1"], runs["2"], runs["3"]
    assert (r0["algorithm"], r0["depth"], r0["width"]) == ("radmm3", "4", "16")
    # first record at/above the target
    assert float(r0["time_to_target"]) == 4.0 and r0["iterations_to_target"] == "4"
    assert float(r1["time_to_target"]) == 8.0 and r1["iterations_to_target"] == "4"
    assert float(r2["time_to_target"]) == 1.5 and r2["iterations_to_target"] == "3"
    assert r3["time_to_target"] == "" and r3["iterations_to_target"] == ""
    # final metrics, wall time, iterations, status from summary.json
    assert float(r2["final_test_metric"]) == 0.94
    assert float(r2["final_train_metric"]) == pytest.approx(0.95)
    assert float(r2["wall_time"]) == 2.25
    assert r2["iterations"] == "4"
    assert r3["status"] == "diverged"
    assert r3["final_test_metric"] == ""  # null in summary.json, NaN in metrics.csv
    assert Path(r0["run_dir"]) == multirun / "0"

    md = (multirun / "report.md").read_text()
    assert "| algorithm | data | depth | width |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "digits" in line]
    assert len(table) == 4
    assert any("not reached" in line and "sgd" in line for line in table)
    assert "0.9504" in md
    for name in ("curves_time.png", "curves_iteration.png"):
        data = (multirun / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_explicit_target_and_out(multirun, tmp_path):
    out = tmp_path / "cmp" / "nested"
    assert report.main([str(multirun), "--out", str(out), "--target", "0.85"]) == 0
    assert not (multirun / "report.csv").exists()
    runs = by_dir(read_rows(out / "report.csv"))
    assert float(runs["0"]["time_to_target"]) == 3.0 and runs["0"]["iterations_to_target"] == "3"
    assert float(runs["1"]["time_to_target"]) == 4.0
    assert float(runs["2"]["time_to_target"]) == 1.0
    assert runs["3"]["time_to_target"] == ""
    assert all(float(r["target"]) == 0.85 for r in runs.values())
    assert (out / "curves_time.png").exists() and (out / "report.md").exists()


def test_run_dirs_given_directly(multirun, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(multirun / "2"), str(multirun / "0"), "--out", str(out)]) == 0
    runs = by_dir(read_rows(out / "report.csv"))
    assert set(runs) == {"0", "2"}
    # the target comes from these two runs only: 0.99 x 0.951
    assert float(runs["0"]["target"]) == pytest.approx(0.951 * 0.99)
    assert float(runs["2"]["time_to_target"]) == 1.5  # 0.955 >= 0.94149 > 0.9


def test_default_out_is_first_dir(multirun):
    run_dir = multirun / "1"
    assert report.main([str(run_dir)]) == 0
    assert (run_dir / "report.csv").exists()
    rows = read_rows(run_dir / "report.csv")
    assert len(rows) == 1 and float(rows[0]["time_to_target"]) == 8.0


def test_mse_target_and_two_datasets(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "0", "radmm3", 4, 32, "wine_red", "mse",
              [0.0, 1.0, 2.0, 3.0], [1.0, 0.6, 0.51, 0.5])
    write_run(root / "1", "adam", 4, 32, "wine_red", "mse",
              [0.0, 0.3, 0.6, 0.9], [1.0, 0.7, 0.55, 0.52])
    write_run(root / "2", "adam", 2, 8, "digits", "accuracy",
              [0.0, 1.0], [0.2, 0.9])
    assert report.main([str(root)]) == 0
    runs = by_dir(read_rows(root / "report.csv"))
    target = 0.5 * 1.01
    assert float(runs["0"]["target"]) == pytest.approx(target)
    assert float(runs["0"]["time_to_target"]) == 3.0  # 0.51 > 0.505, 0.5 <= 0.505
    assert runs["1"]["time_to_target"] == ""  # 0.52 > 0.505
    assert float(runs["2"]["target"]) == pytest.approx(0.9 * 0.99)
    assert float(runs["2"]["time_to_target"]) == 1.0
    assert [r["data"] for r in read_rows(root / "report.csv")] == ["digits", "wine_red",
                                                                   "wine_red"]
    assert (root / "curves_iteration.png").read_bytes().startswith(PNG_MAGIC)


def test_time_to_target_function():
    run = report.Run(path=Path("x"), metric="accuracy", curves={
        "iteration": np.array([0.0, 5.0, 10.0, 15.0]),
        "wall_time": np.array([0.0, 0.7, 1.4, 2.1]),
        "test_metric": np.array([0.2, np.nan, 0.8, 0.9]),
    })
    assert report.time_to_target(run, 0.8) == (1.4, 10)
    assert report.time_to_target(run, 0.95) == (pytest.approx(math.nan, nan_ok=True), None)
    run.metric = "mse"
    assert report.time_to_target(run, 0.5) == (0.0, 0)
    run.metric = ""
    assert report.time_to_target(run, 0.5)[1] is None


def test_tolerant_of_missing_files_and_keys(tmp_path):
    root = tmp_path / "runs"
    # a run still going: metrics.csv only, with a column missing
    (root / "0").mkdir(parents=True)
    (root / "0" / "metrics.csv").write_text("iteration,wall_time,test_metric\n0,0.0,0.5\n"
                                            "1,0.5,\n2,1.0,0.7\n")
    # summary.json with almost nothing in it, no metrics.csv
    (root / "1").mkdir()
    (root / "1" / "summary.json").write_text(json.dumps({"status": "max_iter",
                                                         "config": {"model": [1, 2]}}))
    write_run(root / "2", "adam", 4, 16, "digits", "accuracy", [0.0, 1.0], [0.3, 0.6])
    assert report.main([str(root)]) == 0
    runs = by_dir(read_rows(root / "report.csv"))
    assert runs["0"]["algorithm"] == "" and runs["0"]["status"] == ""
    assert float(runs["0"]["final_test_metric"]) == 0.7
    assert float(runs["0"]["wall_time"]) == 1.0 and runs["0"]["iterations"] == "2"
    assert runs["0"]["final_train_metric"] == ""
    assert runs["1"]["status"] == "max_iter" and runs["1"]["depth"] == ""
    assert runs["1"]["wall_time"] == ""
    assert float(runs["2"]["time_to_target"]) == 1.0
    assert (root / "curves_time.png").exists()


def test_with_real_run_outputs(tmp_path):
    """The files daskadmm.outputs writes for a real (tiny) baseline run are read correctly."""
    pytest.importorskip("torch", reason="the adam baseline needs PyTorch")
    from daskadmm.api import fit
    from daskadmm.config import Config, DataConfig
    from daskadmm.outputs import write_run_outputs

    cfg = Config()
    cfg.algorithm.name = "adam"
    cfg.algorithm.lr = 1e-2
    cfg.data = DataConfig(name="synthetic", n_samples=100, n_classes=2)
    cfg.model.depth = 3
    cfg.model.width = 8
    cfg.run.iterations = 5
    cfg.run.plot = False
    result = fit(cfg)
    write_run_outputs(tmp_path / "run", cfg.to_dict(), result, plot=cfg.run.plot)
    run = report.load_run(tmp_path / "run")
    assert (run.algorithm, run.data, run.depth, run.width) == ("adam", "synthetic", 3, 8)
    assert run.metric == "accuracy" and run.status == "max_iter" and run.iterations == 5
    assert run.final_test_metric == pytest.approx(result.history[-1]["test_metric"])
    assert run.curves["iteration"].tolist() == [0, 1, 2, 3, 4, 5]
    assert report.main([str(tmp_path / "run")]) == 0


# ---------------------------------------------------------------------------------- errors


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("daskadmm-report: error: ")
    return lines[0]


def test_error_empty_dir(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 2
    line = error_line(capsys)
    assert "no run directories" in line and "empty" in line
    assert not (tmp_path / "empty" / "report.csv").exists()


def test_error_missing_dir(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in error_line(capsys)


def test_error_malformed_summary(multirun, capsys):
    bad = multirun / "2" / "summary.json"
    bad.write_text('{"status": "max_iter", ')
    assert report.main([str(multirun)]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "malformed JSON" in line
    assert not (multirun / "report.csv").exists()


def test_error_summary_not_object(multirun, capsys):
    bad = multirun / "1" / "summary.json"
    bad.write_text("[1, 2]")
    assert report.main([str(multirun)]) == 2
    assert str(bad) in error_line(capsys)


def test_error_malformed_metrics(multirun, capsys):
    bad = multirun / "0" / "metrics.csv"
    text = bad.read_text().splitlines()
    cells = text[2].split(",")
    cells[list(HISTORY_COLUMNS).index("test_metric")] = "zero point five"
    text[2] = ",".join(cells)
    bad.write_text("\n".join(text) + "\n")
    assert report.main([str(multirun)]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "line 3" in line


def test_error_empty_metrics(multirun, capsys):
    bad = multirun / "3" / "metrics.csv"
    bad.write_text("")
    assert report.main([str(multirun)]) == 2
    assert f"{bad}: the file is empty" in error_line(capsys)


def test_error_bad_arguments(multirun, capsys):
    assert report.main([str(multirun), "--target", "abc"]) == 2
    assert "--target" in error_line(capsys)
    assert report.main([]) == 2
    error_line(capsys)
