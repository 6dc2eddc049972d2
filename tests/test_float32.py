"""``run.dtype=float32``: every update keeps float32 (nothing silently promotes to float64), the
iterates stay within float32 rounding of the float64 run, the Dask engines equal the reference
as in float64, and the Zarr store, checkpoints and resume keep float32."""

from __future__ import annotations

import numpy as np
import pytest

from daskadmm import Config, api
from daskadmm.algorithms import get_algorithm
from daskadmm.config import ADMM_ALGORITHMS, ConfigError, validate
from daskadmm.engines.reference import solve
from daskadmm.model import init_weights
from daskadmm.monitor import Monitor
from daskadmm.schedules import PenaltySchedule
from daskadmm.splitting import Options
from daskadmm.storage import StateStore

MLP_ONLY = ("pdadmm", "dladmm")


def _cfg(name: str, act: str = "tanh", dtype: str = "float32", iterations: int = 4) -> Config:
    cfg = Config()
    cfg.algorithm.name = name
    cfg.model.kind = "mlp" if name in MLP_ONLY else "resnet"
    cfg.model.activation, cfg.model.width, cfg.model.depth = act, 12, 3
    cfg.data.name, cfg.data.n_samples = "synthetic", 120
    cfg.run.iterations, cfg.run.dtype, cfg.run.progress = iterations, dtype, False
    cfg.cluster.kind = "reference"
    return cfg


def _reference(cfg: Config):
    """The reference solve of ``cfg``, and every state array seen after each iteration."""
    ds = api.load_data(cfg)
    if cfg.run.dtype != "float64":
        ds = api.with_dtype(ds, np.dtype(cfg.run.dtype))
    arch = api.build_architecture(cfg, ds)
    w0 = [W.astype(cfg.run.dtype) for W in init_weights(arch, np.random.default_rng(0), 0.3,
                                                         True)]
    seen: list[tuple[int, int, str, np.dtype]] = []

    def inspect(k, states):
        seen.extend((k, i, key, np.asarray(v).dtype) for i, st in enumerate(states)
                    for key, v in st.items() if np.ndim(v) > 0)

    monitor = Monitor(iterations=cfg.run.iterations, eval_every=1,
                      evaluate=api.evaluator(arch, ds))
    res = solve(get_algorithm(cfg.algorithm.name).splitting, arch, ds.X_train, ds.Y_train, w0,
                PenaltySchedule(api.schedule_options(cfg.algorithm)), monitor, Options(),
                state_callback=inspect)
    return res, seen


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("name", ADMM_ALGORITHMS)
def test_every_update_keeps_float32(name, act):
    res32, seen = _reference(_cfg(name, act))
    res64, _ = _reference(_cfg(name, act, "float64"))
    promoted = sorted({(key, str(dt)) for _, _, key, dt in seen if dt != np.float32})
    assert seen and not promoted, f"{name}: float64 state arrays {promoted}"
    assert all(W.dtype == np.float32 for W in res32.weights)
    assert res32.info["inner_solver_caps_hit"] == 0  # the float32 tolerances are reachable
    for a, b in zip(res64.weights, res32.weights, strict=True):
        assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()  # a few iterations of rounding
    o64 = np.array([r["objective"] for r in res64.history])
    o32 = np.array([r["objective"] for r in res32.history])
    assert np.allclose(o32, o64, rtol=1e-3)
    assert not np.array_equal(o32, o64)  # it really ran in float32


@pytest.mark.parametrize("name", ["radmm3", "radmm3a", "pdadmm"])
def test_float32_dask_engines_equal_the_reference(name):
    ref = api.fit(_cfg(name))
    cfg = _cfg(name)
    cfg.cluster.kind, cfg.storage.state = "synchronous", "memory"
    mem = api.fit(cfg)
    for a, b in zip(ref.weights, mem.weights, strict=True):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    cfg.storage.state, cfg.storage.chunk_size = "zarr", 50
    zs = api.fit(cfg)
    cfg.cluster.kind = "threads"
    zt = api.fit(cfg)
    for a, b, c in zip(ref.weights, zs.weights, zt.weights, strict=True):
        assert b.dtype == np.float32 and np.array_equal(b, c)  # same chunking: bitwise
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # float32 rounding


def test_float32_store_checkpoint_and_resume(tmp_path):
    cfg = _cfg("radmm3", iterations=6)
    cfg.cluster.kind, cfg.storage.chunk_size = "synchronous", 50
    cfg.run.checkpoint_every, cfg.run.eval_every = 2, 2
    full = api.fit(cfg, run_dir=tmp_path / "full")
    store = StateStore.open(str(tmp_path / "full" / "state.zarr"), mode="check")
    assert store.array("data/X").dtype == np.float32
    assert store.array("live/b1/U").dtype == np.float32
    assert store.array("ckpt/a/b1/W").dtype == np.float32
    cfg.run.iterations = 4
    api.fit(cfg, run_dir=tmp_path / "part")
    cfg.run.iterations, cfg.run.resume = 6, True
    cfg.storage.url = str(tmp_path / "part" / "state.zarr")
    resumed = api.fit(cfg, run_dir=tmp_path / "part")
    assert resumed.info["resumed_from"] == 4
    for a, b in zip(full.weights, resumed.weights, strict=True):
        assert b.dtype == np.float32 and np.array_equal(a, b)


def test_dtype_is_validated():
    cfg = _cfg("radmm3")
    cfg.run.dtype = "float16"
    with pytest.raises(ConfigError, match="run.dtype must be one of float64, float32"):
        validate(cfg)


def test_float32_estimator():
    from sklearn.datasets import load_digits

    from daskadmm import ADMMClassifier

    X, y = load_digits(return_X_y=True)
    clf = ADMMClassifier(depth=3, width=16, iterations=5, dtype="float32").fit(X[:300], y[:300])
    assert all(W.dtype == np.float32 for W in clf.coefs_)
    c64 = ADMMClassifier(depth=3, width=16, iterations=5).fit(X[:300], y[:300])
    assert abs(clf.score(X[300:600], y[300:600]) - c64.score(X[300:600], y[300:600])) < 0.02


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_float32_baseline(name):
    pytest.importorskip("torch")
    cfg = _cfg(name)
    res = api.fit(cfg)
    assert all(W.dtype == np.float32 for W in res.weights)
    r64 = api.fit(_cfg(name, dtype="float64"))
    assert np.isclose(res.history[-1]["train_loss"], r64.history[-1]["train_loss"], rtol=1e-3)
