"""A run that does not learn says so: status ``stalled`` (the monitor's rule), the message says
what to try, the CLI exits 3 with one line, and the run's outputs are written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daskadmm import Config, fit
from daskadmm.monitor import STALL_HINT, IterationStats, Monitor
from tests.support import run_cli


def _monitor(losses, accuracies=None, stall=5, chance=None):
    """A monitor fed records with these forward training losses (index = iteration)."""
    values = iter(
        {"train_loss": loss, "test_loss": loss,
         "train_metric": (accuracies[k] if accuracies else 0.5), "test_metric": 0.5}
        for k, loss in enumerate(losses))
    mon = Monitor(iterations=100, eval_every=1, evaluate=lambda w: next(values),
                  stall_iterations=stall, chance=chance)
    W = [np.ones((2, 2))]
    mon.start(1.0, W, 1.0, 1.0)
    statuses = []
    for k in range(1, len(losses)):
        rec = mon.record(k, IterationStats(1.0, 0.1, 0.1, 0), W, 1.0, 1.0)
        statuses.append(mon.check(rec))
    return mon, statuses


def test_a_forward_loss_that_never_falls_stalls_after_stall_iterations():
    mon, statuses = _monitor([2.0, 2.5, 2.2, 2.1, 2.0, 1.999, 1.9995])
    assert statuses == [None, None, None, None, "stalled", "stalled"]
    assert "has not fallen below its initial value" in mon.stall_reason(5)
    assert STALL_HINT in mon.message("stalled", 5)


def test_a_falling_loss_never_stalls_even_on_a_plateau():
    _, statuses = _monitor([2.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert statuses == [None] * 8


def test_accuracy_at_chance_stalls_only_if_it_stays_there():
    chance = 0.1
    acc = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    mon, statuses = _monitor([2.0 - 0.1 * k for k in range(9)], acc, stall=5, chance=chance)
    assert statuses[:4] == [None] * 4 and statuses[4] == "stalled"
    assert "stayed at chance" in mon.stall_reason(5)
    acc = [0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # off chance at iteration 3
    _, statuses = _monitor([2.0 - 0.1 * k for k in range(10)], acc, stall=5, chance=chance)
    # the window k-5..k holds iteration 3 up to k = 8; statuses[j] is iteration j + 1's
    assert statuses[:8] == [None] * 8 and statuses[8] == "stalled"


def test_stall_iterations_zero_turns_it_off():
    _, statuses = _monitor([2.0] * 10, stall=0)
    assert statuses == [None] * 9


@pytest.mark.slow
def test_a_deep_relu_net_at_chance_is_reported_stalled():
    """The case that motivated it: relu at depth 32 without the depth-scaled initialisation
    (the forward signal grows with depth): RADMM-3's accuracy stays at chance."""
    cfg = Config()
    cfg.cluster.kind = "reference"
    cfg.model.depth, cfg.model.width, cfg.model.activation = 32, 16, "relu"
    cfg.model.depth_scaling = False
    cfg.run.iterations, cfg.run.stall_iterations = 40, 10
    cfg.data.n_train = 400
    result = fit(cfg)
    if result.status != "stalled":
        pytest.fail(f"expected a stall, got {result.status}: {result.history[-1]}")
    assert result.iterations == 10
    assert STALL_HINT in result.message


@pytest.mark.slow
def test_cli_exits_3_with_one_line_and_keeps_the_outputs(tmp_path):
    proc, work = run_cli(tmp_path, "cluster=reference", "model.depth=32", "model.width=16",
                         "model.activation=relu", "model.depth_scaling=false",
                         "data.n_train=400", "run.iterations=40",
                         "run.stall_iterations=10", "run.progress=false", timeout=300)
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("daskadmm: error")]
    assert len(errors) == 1 and "did not learn" in errors[0] and "stalled" in errors[0]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["status"] == "stalled"
    assert (work / "run" / "weights.npz").exists() and (work / "run" / "metrics.csv").exists()
    assert "the run did not learn" in (work / "run" / "daskadmm.log").read_text()
