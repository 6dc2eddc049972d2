"""The PyTorch backprop baseline (algorithm=adam|sgd): same network, same loss, same monitor.

Skipped without PyTorch (the ``torch`` extra); what happens then is tested in
``test_errors.py`` (``test_missing_torch_message``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from daskadmm import baseline
from daskadmm.api import evaluator, fit
from daskadmm.config import Config, DataConfig
from daskadmm.data import Dataset
from daskadmm.model import Architecture, forward, init_weights, loss_value
from daskadmm.monitor import Monitor
from daskadmm.result import HISTORY_COLUMNS, Result

torch = pytest.importorskip("torch", reason="needs PyTorch: pip install 'daskadmm[torch]'")


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def make_arch(kind="resnet", depth=4, bias=True, activation="relu", loss="mse", d_in=3,
              width=5, d_out=2) -> Architecture:
    return Architecture(kind=kind, depth=depth, d_in=d_in, width=width, d_out=d_out,
                        activation=activation, leaky_slope=0.1, bias=bias, loss=loss)


def random_weights(arch: Architecture, seed: int = 0) -> list[np.ndarray]:
    """Initial weights with nonzero biases, so that the bias column is exercised."""
    rng = np.random.default_rng(seed)
    weights = init_weights(arch, rng, residual_scale=1.0)
    if arch.bias:
        for W in weights:
            W[:, -1] = 0.3 * rng.standard_normal(W.shape[0])
    return weights


def make_dataset(arch: Architecture, n: int = 12, n_test: int = 6, seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((arch.d_in, n + n_test))
    if arch.loss == "cross_entropy":
        labels = rng.integers(0, arch.d_out, size=n + n_test)
        Y = np.eye(arch.d_out)[labels].T
        task = "classification"
    else:
        Y = np.tanh(rng.standard_normal((arch.d_out, arch.d_in)) @ X)
        task = "regression"
    return Dataset(name="tiny", task=task, X_train=X[:, :n], Y_train=Y[:, :n],
                   X_test=X[:, n:], Y_test=Y[:, n:])


def make_cfg(name="sgd", lr=1e-3, momentum=0.0, batch_size=0, weight_decay=0.0,
             iterations=1, seed=0, eval_every=1) -> Config:
    cfg = Config()
    cfg.algorithm.name = name
    cfg.algorithm.lr = lr
    cfg.algorithm.momentum = momentum
    cfg.algorithm.batch_size = batch_size
    cfg.algorithm.weight_decay = weight_decay
    cfg.run.iterations = iterations
    cfg.run.eval_every = eval_every
    cfg.run.seed = seed
    return cfg


def run_baseline(cfg: Config, arch: Architecture, ds: Dataset,
                 weights0: list[np.ndarray]) -> Result:
    monitor = Monitor(iterations=cfg.run.iterations, eval_every=cfg.run.eval_every,
                      evaluate=evaluator(arch, ds))
    return baseline.fit(cfg.algorithm, arch, ds, [W.copy() for W in weights0], monitor,
                        seed=cfg.run.seed, dtype=cfg.run.dtype)


def numpy_objective(arch, weights, X, Y, lam):
    out = forward(arch, weights, X)[0][-1]
    return loss_value(arch.loss, out, Y) + 0.5 * lam * sum(float(np.sum(W * W)) for W in weights)


def fd_gradient(arch, weights, X, Y, lam, h=1e-6) -> list[np.ndarray]:
    grads = []
    for i, W in enumerate(weights):
        G = np.zeros_like(W)
        for idx in np.ndindex(*W.shape):
            plus = [w.copy() for w in weights]
            minus = [w.copy() for w in weights]
            plus[i][idx] += h
            minus[i][idx] -= h
            G[idx] = (numpy_objective(arch, plus, X, Y, lam)
                      - numpy_objective(arch, minus, X, Y, lam)) / (2 * h)
        grads.append(G)
    return grads


# ------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("kind", ["resnet", "mlp"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "sigmoid", "identity"])
def test_forward_matches_numpy(kind, bias, activation):
    arch = make_arch(kind=kind, depth=5, bias=bias, activation=activation)
    weights = random_weights(arch, seed=3)
    X = np.random.default_rng(4).standard_normal((arch.d_in, 17))
    expected = forward(arch, weights, X)[0][-1]
    got = baseline.torch_forward(arch, [t64(W) for W in weights], t64(X))
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_forward_depth_two():
    arch = make_arch(kind="resnet", depth=2)
    weights = random_weights(arch)
    X = np.random.default_rng(0).standard_normal((arch.d_in, 4))
    got = baseline.torch_forward(arch, [t64(W) for W in weights], t64(X)).numpy()
    np.testing.assert_allclose(got, forward(arch, weights, X)[0][-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_loss_matches_numpy(loss):
    arch = make_arch(loss=loss, d_out=3, activation="tanh")
    weights = random_weights(arch, seed=5)
    ds = make_dataset(arch, n=20)
    out = forward(arch, weights, ds.X_train)[0][-1]
    expected = loss_value(loss, out, ds.Y_train)
    got = float(baseline.torch_loss(loss, t64(out), t64(ds.Y_train)))
    assert got == pytest.approx(expected, rel=1e-13, abs=1e-15)
    lam = 0.37
    obj = float(baseline.torch_objective(arch, [t64(W) for W in weights], t64(ds.X_train),
                                         t64(ds.Y_train), lam))
    assert obj == pytest.approx(numpy_objective(arch, weights, ds.X_train, ds.Y_train, lam),
                                rel=1e-13)


@pytest.mark.parametrize("kind,loss,lam", [("resnet", "mse", 0.0), ("mlp", "cross_entropy", 0.05),
                                           ("resnet", "cross_entropy", 0.1)])
def test_sgd_step_is_minus_lr_times_gradient(kind, loss, lam):
    arch = make_arch(kind=kind, depth=3, loss=loss, activation="tanh", d_in=2, width=3, d_out=2)
    weights0 = random_weights(arch, seed=7)
    ds = make_dataset(arch, n=9)
    lr = 1e-6
    cfg = make_cfg("sgd", lr=lr, momentum=0.0, weight_decay=lam, iterations=1)
    result = run_baseline(cfg, arch, ds, weights0)
    assert result.iterations == 1
    assert result.info["steps"] == 1
    grads = fd_gradient(arch, weights0, ds.X_train, ds.Y_train, lam)
    for W0, W1, G in zip(weights0, result.weights, grads, strict=True):
        assert W1.shape == W0.shape
        step = (W0 - W1) / lr  # the gradient torch used
        np.testing.assert_allclose(step, G, rtol=1e-5, atol=1e-7)
    # the recorded objectives are the numpy objective before and after the step
    assert result.history[0]["objective"] == pytest.approx(
        numpy_objective(arch, weights0, ds.X_train, ds.Y_train, lam), rel=1e-12)
    assert result.history[1]["objective"] == pytest.approx(
        numpy_objective(arch, result.weights, ds.X_train, ds.Y_train, lam), rel=1e-12)


def test_adam_decreases_loss():
    arch = make_arch(kind="resnet", depth=3, activation="tanh", width=8)
    ds = make_dataset(arch, n=40)
    cfg = make_cfg("adam", lr=1e-2, iterations=100, eval_every=10)
    result = run_baseline(cfg, arch, ds, random_weights(arch))
    objs = [h["objective"] for h in result.history]
    assert [h["iteration"] for h in result.history] == list(range(0, 101, 10))
    assert result.status == "max_iter"
    assert objs[-1] < 0.2 * objs[0]
    assert result.info["optimizer"] == "adam"
    assert result.info["engine"] == "torch"


def test_weights_not_modified_in_place():
    arch = make_arch()
    weights0 = random_weights(arch)
    copy = [W.copy() for W in weights0]
    ds = make_dataset(arch)
    monitor = Monitor(iterations=3, eval_every=1, evaluate=evaluator(arch, ds))
    baseline.fit(make_cfg("adam", lr=1e-2, iterations=3).algorithm, arch, ds, weights0, monitor)
    for a, b in zip(weights0, copy, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------- through the API


def api_cfg(name="adam", batch_size=0, seed=0, iterations=15) -> Config:
    cfg = make_cfg(name, lr=1e-2, momentum=0.9, batch_size=batch_size, iterations=iterations,
                   seed=seed)
    cfg.data = DataConfig(name="synthetic", n_samples=200)
    cfg.model.width = 16
    cfg.model.depth = 4
    return cfg


def test_api_fit_adam():
    result = fit(api_cfg("adam"))
    assert isinstance(result, Result)
    assert result.status == "max_iter"
    assert result.iterations == 15
    assert result.metric == "mse"
    assert len(result.history) == 16
    for rec in result.history:
        for col in HISTORY_COLUMNS:
            assert col in rec
            if col not in ("rho", "beta"):
                assert math.isfinite(rec[col]), (col, rec)
        assert math.isnan(rec["rho"]) and math.isnan(rec["beta"])
        assert rec["primal_residual"] == 0.0 and rec["dual_residual"] == 0.0
    walls = [rec["wall_time"] for rec in result.history]
    assert walls == sorted(walls)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    arch = result.arch
    assert [W.shape for W in result.weights] == [arch.weight_shape(i)
                                                 for i in range(1, arch.depth + 1)]
    assert all(isinstance(W, np.ndarray) and W.dtype == np.float64 for W in result.weights)
    assert result.info["engine"] == "torch"
    assert result.info["epochs"] == 15
    assert result.info["batch_size"] == 0
    assert result.info["data"]["name"] == "synthetic"


def test_api_fit_sgd_classification():
    cfg = api_cfg("sgd")
    cfg.data = DataConfig(name="synthetic", n_samples=200, n_classes=3)
    result = fit(cfg)
    assert result.metric == "accuracy"
    assert result.info["optimizer"] == "sgd"
    assert result.arch.loss == "cross_entropy"
    assert 0.0 <= result.history[-1]["test_metric"] <= 1.0
    assert result.history[-1]["objective"] < result.history[0]["objective"]


def test_deterministic():
    a = fit(api_cfg("adam", batch_size=32))
    b = fit(api_cfg("adam", batch_size=32))
    for Wa, Wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(Wa, Wb)
    assert [h["objective"] for h in a.history] == [h["objective"] for h in b.history]


def test_minibatch_seeded():
    arch = make_arch(width=6)
    ds = make_dataset(arch, n=50)
    weights0 = random_weights(arch)

    def run(seed):
        return run_baseline(make_cfg("sgd", lr=1e-2, momentum=0.5, batch_size=16,
                                     iterations=4, seed=seed), arch, ds, weights0)

    r0, r0b, r1 = run(0), run(0), run(1)
    assert r0.info["steps"] == 4 * 4  # ceil(50 / 16) = 4 batches per epoch
    assert r0.info["full_batch"] is False
    for a, b in zip(r0.weights, r0b.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    # same initial weights, another shuffling seed: other iterates
    assert any(not np.array_equal(a, b) for a, b in zip(r0.weights, r1.weights, strict=True))
    assert r0.history[-1]["objective"] < r0.history[0]["objective"]


def test_batch_at_least_n_is_full_batch():
    arch = make_arch()
    ds = make_dataset(arch, n=10)
    w0 = random_weights(arch)
    full = run_baseline(make_cfg("sgd", lr=1e-2, iterations=3), arch, ds, w0)
    big = run_baseline(make_cfg("sgd", lr=1e-2, iterations=3, batch_size=100), arch, ds, w0)
    assert big.info["full_batch"] is True and big.info["steps"] == 3
    for a, b in zip(full.weights, big.weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops():
    arch = make_arch(activation="identity", width=6)
    ds = make_dataset(arch, n=20)
    cfg = make_cfg("sgd", lr=50.0, iterations=200)
    result = run_baseline(cfg, arch, ds, random_weights(arch))
    assert result.status in ("diverged", "nonfinite")
    assert result.iterations < 200


def test_threads_restored():
    before = torch.get_num_threads()
    arch = make_arch()
    run_baseline(make_cfg("adam", iterations=1), arch, make_dataset(arch), random_weights(arch))
    assert torch.get_num_threads() == before

