"""The scikit-learn estimators: scikit-learn's own estimator checks are the judge; they also work
in Pipeline / GridSearchCV / cross_val_score, on Dask and Zarr arrays, and on a client the user
already has (no second cluster)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_regression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

import daskadmm
from daskadmm import ADMMClassifier, ADMMRegressor
from daskadmm.config import (
    ALGORITHM_OVERRIDES,
    ALGORITHM_VARIANTS,
    AlgorithmConfig,
    algorithm_defaults,
)

ROOT = Path(__file__).resolve().parents[1]

# Small networks and few iterations keep the ~110 checks at a few seconds. Left out: only
# scikit-learn's array-API check (it needs SCIPY_ARRAY_API=1 and array-api-compat, and the
# estimators compute in NumPy: they convert any input with validate_data).
SMALL = {"depth": 3, "width": 16, "iterations": 20}
NOT_APPLICABLE = ("check_array_api_input",)


def _checks():
    for est in (ADMMClassifier(**SMALL), ADMMRegressor(**SMALL)):
        for estimator, check in estimator_checks_generator(est, legacy=True):
            name = getattr(check, "func", check).__name__
            if name not in NOT_APPLICABLE:
                args = ",".join(f"{k}={v}" for k, v in getattr(check, "keywords", {}).items())
                yield pytest.param(estimator, check,
                                   id=f"{type(est).__name__}-{name}" + (f"({args})" if args
                                                                        else ""))


@pytest.mark.parametrize(("estimator", "check"), list(_checks()))
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _digits(n=600):
    X, y = load_digits(return_X_y=True)
    return X[:n], y[:n]


def test_public_namespace():
    assert daskadmm.ADMMClassifier is ADMMClassifier
    assert daskadmm.ADMMRegressor is ADMMRegressor


def test_classifier_learns_and_reports():
    X, y = _digits()
    clf = ADMMClassifier(depth=3, width=32, iterations=15).fit(X[:500], y[:500])
    assert clf.score(X[500:], y[500:]) > 0.5  # chance is 0.1
    P = clf.predict_proba(X[500:])
    assert P.shape == (100, 10)
    np.testing.assert_allclose(P.sum(axis=1), 1.0)
    assert np.array_equal(clf.predict(X[500:]), clf.classes_[P.argmax(axis=1)])
    assert clf.n_iter_ == 15 and clf.status_ == "max_iter"
    assert [r["iteration"] for r in clf.history_] == list(range(16))  # 0: the initial weights
    assert "train_metric" in clf.history_[-1] and "test_metric" not in clf.history_[-1]
    assert len(clf.coefs_) == 3 and clf.n_features_in_ == 64


def test_validation_fraction_records_held_out_metrics():
    X, y = _digits(400)
    clf = ADMMClassifier(depth=3, width=16, iterations=3, validation_fraction=0.25).fit(X, y)
    rec = clf.history_[-1]
    assert {"train_metric", "test_metric"} <= set(rec)
    assert rec["train_metric"] != rec["test_metric"]


def test_string_labels_and_multioutput_regression():
    X, y = _digits(300)
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])[y]
    clf = ADMMClassifier(depth=2, width=16, iterations=5).fit(X, names)
    assert set(clf.predict(X)) <= set(names)
    Xr, Yr = make_regression(n_samples=120, n_features=5, n_targets=2, random_state=0)
    reg = ADMMRegressor(depth=2, width=16, iterations=5).fit(Xr, Yr)
    assert reg.predict(Xr).shape == (120, 2)
    reg1 = ADMMRegressor(depth=2, width=16, iterations=5).fit(Xr, Yr[:, 0])
    assert reg1.predict(Xr).shape == (120,)


def test_bad_hyperparameters_fail_at_fit_with_one_line():
    X, y = _digits(100)
    for est, key in ((ADMMClassifier(algorithm="nope"), "algorithm"),
                     (ADMMClassifier(rho=-1.0), "rho"),
                     (ADMMClassifier(cluster="mars"), "cluster"),
                     (ADMMClassifier(validation_fraction=1.5), "validation_fraction")):
        with pytest.raises(ValueError, match=key) as info:
            est.fit(X, y)
        assert "\n" not in str(info.value)


def test_per_algorithm_defaults_match_their_yaml():
    omegaconf = pytest.importorskip("omegaconf")
    names = sorted(p.stem for p in (ROOT / "conf" / "algorithm").glob("*.yaml")
                   if p.stem not in ALGORITHM_VARIANTS)  # variants: tests/test_config.py
    assert set(ALGORITHM_OVERRIDES) <= set(names)
    fields = AlgorithmConfig.__dataclass_fields__
    for name in names:
        on_disk = omegaconf.OmegaConf.to_container(
            omegaconf.OmegaConf.load(ROOT / "conf" / "algorithm" / f"{name}.yaml"))
        # the file lists what differs from the schema; the schema fills in the rest
        assert on_disk == {"name": name, **ALGORITHM_OVERRIDES.get(name, {})}
        expected = algorithm_defaults(name)
        composed = AlgorithmConfig(**on_disk)
        for key in fields:
            assert getattr(composed, key) == getattr(expected, key), (name, key)


def test_none_penalties_take_the_algorithms_defaults():
    X, y = _digits(100)
    clf = ADMMClassifier(algorithm="pdadmm", network="mlp", depth=3, width=8, iterations=2)
    cfg, _ = clf.fit(X, y)._config()
    assert cfg.algorithm.rho == algorithm_defaults("pdadmm").rho == 0.1
    cfg, _ = ADMMClassifier(algorithm="pdadmm", rho=0.7)._config()
    assert cfg.algorithm.rho == 0.7
    cfg, _ = ADMMClassifier()._config()  # radmm3a: its own over-relaxation
    assert cfg.algorithm.relax == algorithm_defaults("radmm3a").relax == 1.8
    cfg, _ = ADMMClassifier(relax=1.0)._config()
    assert cfg.algorithm.relax == 1.0
    cfg, _ = ADMMClassifier()._config()  # and its own hidden blocks' weight decay
    assert cfg.algorithm.hidden_lam_scale == algorithm_defaults("radmm3a").hidden_lam_scale
    cfg, _ = ADMMClassifier(hidden_lam_scale=1.0, input_lam_scale=3)._config()
    assert cfg.algorithm.hidden_lam_scale == 1.0 and cfg.algorithm.input_lam_scale == 3.0
    cfg, _ = ADMMClassifier()._config()  # restarts: off unless asked for
    assert cfg.algorithm.restart_every == algorithm_defaults("radmm3a").restart_every == 0
    cfg, _ = ADMMClassifier(restart_every=3)._config()
    assert cfg.algorithm.restart_every == 3
    assert cfg.algorithm.restart_guard is True  # guarded unless asked otherwise
    cfg, _ = ADMMClassifier(restart_every=3, restart_guard=False)._config()
    assert cfg.algorithm.restart_guard is False
    cfg, _ = ADMMClassifier(algorithm="radmm3")._config()
    assert cfg.algorithm.hidden_lam_scale == 1.0
    cfg, _ = ADMMClassifier(relax=np.float64(1.5), lam=np.float32(0.01))._config()
    assert type(cfg.algorithm.relax) is float and type(cfg.algorithm.lam) is float  # noqa: E721


def test_engines_agree_through_the_estimator():
    """In-memory Dask state equals the reference bit for bit; the Zarr-resident engine (its
    per-chunk reductions sum in another order) to relative 1e-8."""
    X, y = _digits(300)
    ref = ADMMClassifier(depth=3, width=16, iterations=4, cluster="reference").fit(X, y)
    mem = ADMMClassifier(depth=3, width=16, iterations=4, cluster="synchronous",
                         state="memory").fit(X, y)
    zar = ADMMClassifier(depth=3, width=16, iterations=4, cluster="synchronous",
                         state="zarr").fit(X, y)
    assert mem.result_.info["engine"] == "dask" and zar.result_.info["engine"] == "dask-zarr"
    for a, b, c in zip(ref.coefs_, mem.coefs_, zar.coefs_, strict=True):
        assert np.array_equal(a, b)
        assert np.max(np.abs(a - c)) <= 1e-8 * np.max(np.abs(a))


def test_pipeline_grid_search_and_cross_validation():
    X, y = _digits(300)
    pipe = make_pipeline(StandardScaler(), ADMMClassifier(depth=2, width=16, iterations=5))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and np.all(scores > 0.3)  # chance is 0.1
    grid = GridSearchCV(ADMMClassifier(depth=2, width=16, iterations=5),
                        {"rho": [0.5, 2.0], "width": [8, 16]}, cv=2).fit(X, y)
    assert grid.best_params_["rho"] in (0.5, 2.0)
    assert grid.best_estimator_.coefs_[0].shape[0] == grid.best_params_["width"]


def test_backprop_baseline_through_the_estimator():
    pytest.importorskip("torch")
    X, y = _digits(300)
    clf = ADMMClassifier(algorithm="adam", depth=3, width=16, activation="tanh",
                         iterations=20).fit(X, y)
    assert clf.score(X, y) > 0.5


@pytest.fixture(scope="module")
def user_client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", host="127.0.0.1")
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _no_new_cluster(monkeypatch):
    from daskadmm.engines import cluster as runner

    def refuse(*a, **k):
        raise AssertionError("a second cluster was started")

    monkeypatch.setattr(runner, "_start_local_cluster", refuse)


@pytest.fixture
def no_gather(monkeypatch):
    """Fail if any Dask array of more than 2,000 values is read into this process."""
    da = pytest.importorskip("dask.array")
    original = da.Array.__array__

    def guarded(self, *args, **kwargs):
        if self.size > 2000:
            raise AssertionError(f"a Dask array of shape {self.shape} was gathered")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(da.Array, "__array__", guarded)


@pytest.mark.slow
def test_dask_and_zarr_inputs_on_the_users_client(user_client, monkeypatch, tmp_path):
    """A Dask array (and a Zarr array) fit on the active client: no second cluster, the client
    stays open, and the weights equal the same engine's synchronous run of the NumPy data bit
    for bit (the Dask input's row chunks become the store's chunks)."""
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    _no_new_cluster(monkeypatch)
    X, y = _digits(400)
    ref = ADMMClassifier(depth=3, width=16, iterations=4, cluster="reference").fit(X, y)
    syn = ADMMClassifier(depth=3, width=16, iterations=4, cluster="synchronous",
                         chunk_size=100).fit(X, y)
    Xd = da.from_array(X, chunks=(100, 64))
    est = ADMMClassifier(depth=3, width=16, iterations=4)  # cluster="auto": Client.current()
    est.fit(Xd, y)
    assert est.result_.info.get("engine") == "dask-zarr"
    assert est.result_.info.get("workers") == 2
    assert "data_note" not in est.result_.info
    for a, b in zip(syn.coefs_, est.coefs_, strict=True):
        assert np.array_equal(a, b)
    assert user_client.status == "running"
    Xz = zarr.open_array(str(tmp_path / "X.zarr"), mode="w", shape=X.shape, chunks=(100, 64),
                         dtype="f8")
    Xz[:] = X
    est2 = ADMMClassifier(depth=3, width=16, iterations=4, client=user_client,
                          state="memory").fit(Xz, y)  # in-memory state: read into memory
    for a, b in zip(ref.coefs_, est2.coefs_, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(est2.predict(Xz).compute(), ref.predict(X))  # lazy for Zarr input
    assert user_client.status == "running"
    assert not list(tmp_path.glob("daskadmm-*"))


@pytest.mark.slow
def test_out_of_core_input_is_never_gathered(user_client, no_gather, tmp_path):
    """X as a Dask array goes into the store chunk by chunk from the workers: no Dask array
    larger than a few columns' statistics is read into this process, for the fit, the
    validation split and the predictions, and the model is bitwise the NumPy input's."""
    da = pytest.importorskip("dask.array")
    X, y = _digits(600)
    Xd = da.from_array(X, chunks=(150, 64)).persist()
    kw = dict(depth=3, width=16, iterations=3, validation_fraction=0.25)
    syn = ADMMRegressor(cluster="synchronous", chunk_size=150, **kw).fit(X, y.astype(float))
    est = ADMMRegressor(client=user_client, **kw).fit(Xd, da.from_array(y.astype(float), 150))
    assert est.result_.info["engine"] == "dask-zarr"
    for a, b in zip(syn.coefs_, est.coefs_, strict=True):
        assert np.array_equal(a, b)
    assert [r["test_loss"] for r in est.history_] == [r["test_loss"] for r in syn.history_]
    pred = est.predict(Xd)
    assert isinstance(pred, da.Array) and pred.chunks == ((150,) * 4,)
    assert np.allclose(pred.compute(), syn.predict(X), rtol=1e-12, atol=1e-12)
    run = tmp_path / "run"
    from daskadmm import Config, fit

    cfg = Config()
    cfg.model.depth, cfg.model.width, cfg.run.iterations = 3, 16, 2
    cfg.storage.chunk_size, cfg.storage.keep_state = 150, True
    ds = est._dataset(Xd, y.astype(float)[:, None], 0, user_client)
    fit(cfg, dataset=ds, run_dir=run, client=user_client)
    from daskadmm.storage import StateStore

    StateStore.open(str(run / "state.zarr"), mode="check").verify_data()  # checksums match


def test_out_of_core_input_errors_are_one_line():
    da = pytest.importorskip("dask.array")
    X, y = _digits(200)
    est = ADMMClassifier(depth=2, width=8, iterations=1, cluster="synchronous")
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        est.fit(da.from_array(X, chunks=(50, 64)), y[:-1])
    bad = X.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.fit(da.from_array(bad, chunks=(50, 64)), y)
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        Xd = da.from_array(X, chunks=(50, 64))
        est.fit(Xd[Xd[:, 0] > -1], y)
    with pytest.raises(ValueError, match="numeric"):
        est.fit(da.from_array(X.astype(str), chunks=(50, 64)), y)


def test_dask_and_numpy_column_statistics_agree_bitwise():
    """The standardisation statistics are sums of fixed row blocks in order, whatever the
    input's chunks (so a Dask X and its NumPy values give the same model)."""
    da = pytest.importorskip("dask.array")
    from daskadmm.data import STAT_ROWS, column_moments
    from daskadmm.lazy import column_moments as lazy_moments

    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 2.0, size=(2 * STAT_ROWS + 77, 5))
    m, s = column_moments(X)
    for chunks in ((1000, 5), (STAT_ROWS, 2), (X.shape[0], 5)):
        lm, ls = lazy_moments(da.from_array(X, chunks=chunks))
        assert np.array_equal(m, lm) and np.array_equal(s, ls)
    assert np.allclose(m, X.mean(axis=0), rtol=1e-13) and np.allclose(s, X.std(axis=0),
                                                                      rtol=1e-12)


@pytest.mark.slow
def test_api_fit_uses_the_active_client(user_client, monkeypatch):
    from daskadmm import Config, fit

    _no_new_cluster(monkeypatch)
    cfg = Config()
    cfg.run.iterations, cfg.model.depth, cfg.model.width = 2, 3, 8
    cfg.run.progress = cfg.run.plot = False
    cfg.data.n_train = 200
    result = fit(cfg)
    assert result.iterations == 2 and result.info.get("workers") == 2
    assert user_client.status == "running"


def test_a_dask_array_has_the_digest_and_checksums_of_its_values():
    """A resumed out-of-core run is checked against the same digest and chunk checksums as
    NumPy data of the same values, computed chunk by chunk."""
    da = pytest.importorskip("dask.array")
    from daskadmm.lazy import fingerprints
    from daskadmm.storage import checksum, chunk_slices, combine_digest, data_digest

    rng = np.random.default_rng(1)
    arrays = {"X": rng.normal(size=(3, 50)), "Y": rng.normal(size=(2, 50))}
    lazy = {"X": da.from_array(arrays["X"], chunks=(3, 7)), "Y": arrays["Y"]}
    fps = fingerprints(lazy, 20)
    assert combine_digest({k: (s, d) for k, (s, d, _) in fps.items()}) == \
        data_digest(arrays, 20)
    assert fps["X"][2] == [checksum(arrays["X"][:, sl]) for sl in chunk_slices(50, 20)]
    changed = arrays["X"].copy()
    changed[2, 49] += 1e-12
    assert data_digest({**arrays, "X": changed}, 20) != data_digest(arrays, 20)
