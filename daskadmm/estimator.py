"""scikit-learn estimators: :class:`ADMMClassifier` and :class:`ADMMRegressor`.

    from daskadmm import ADMMClassifier
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    clf = ADMMClassifier(depth=4, width=64, iterations=60).fit(X, y)
    clf.predict(X[:5]), clf.score(X, y)

Rows are samples, as everywhere in scikit-learn. Every hyper-parameter is an ``__init__``
argument (``get_params`` / ``set_params``, ``clone``, ``Pipeline``, ``GridSearchCV`` work as
usual); ``None`` for ``rho``, ``beta``, ``tau``, ``lam``, ``relax``, ``input_lam_scale``,
``hidden_lam_scale``, ``restart_every``, ``lr`` means the algorithm's own default (the values of
``conf/algorithm/<name>.yaml``). Features are standardised with the training mean and standard
deviation (regression targets centred), as the command line does.

Where it runs (``cluster``):

- ``"auto"`` (default): on ``client`` if one is given, else on the active
  ``distributed.Client`` of this process (``Client.current()``), else in this process with the
  serial reference engine (no cluster is started: right for small data);
- ``"reference"``, ``"synchronous"``, ``"threads"``, ``"local"`` (a LocalCluster started for
  the fit, ``n_workers`` processes): as ``cluster.kind`` on the command line;
- a scheduler address such as ``"tcp://10.0.0.5:8786"``.

A client given or found is used as it is and never closed.

Input arrays may be NumPy arrays, Dask arrays or Zarr arrays. With the Zarr-resident state on
Dask (``state="zarr"``, the default, on a client or ``cluster="local"``), a Dask or Zarr ``X`` is
never gathered on the client: its column statistics are computed by tasks, and its chunks are
written into the run's store by tasks (see :mod:`daskadmm.lazy`); ``chunk_size="auto"`` (the
default) or 0 then takes ``X``'s row chunks as the store's. ``y`` (one value or row per
sample) is read into memory. The other engines read ``X`` into memory first. ``predict`` and
``predict_proba`` of a Dask or Zarr ``X`` return a lazy Dask array with ``X``'s row chunks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .config import (
    ADMM_ALGORITHMS,
    BASELINE_ALGORITHMS,
    CLUSTERS,
    AlgorithmConfig,
    Config,
    ConfigError,
    ModelConfig,
    RunConfig,
    StorageConfig,
    algorithm_defaults,
    validate,
)
from .data import Dataset, column_moments
from .model import Architecture, predict, softmax

__all__ = ["ADMMClassifier", "ADMMRegressor"]

_A, _M, _R, _S = AlgorithmConfig(), ModelConfig(), RunConfig(), StorageConfig()
# hyper-parameters that default to the algorithm's own value when None
_PER_ALGORITHM = ("rho", "beta", "tau", "lam", "relax", "input_lam_scale", "hidden_lam_scale",
                  "restart_every", "lr")


@dataclass(frozen=True)
class _RowFunction:
    """A fitted network's prediction for a block of rows (picklable: Dask tasks run it on the
    blocks of a lazy ``X``). ``what``: ``proba``, ``class`` or ``value``."""

    what: str
    arch: Architecture
    coefs: list[np.ndarray]
    x_mean: np.ndarray
    x_scale: np.ndarray
    classes: np.ndarray | None
    y_mean: np.ndarray | None
    y_1d: bool

    def __call__(self, X: np.ndarray) -> np.ndarray:
        Xs = (np.asarray(X, dtype=np.float64) - self.x_mean) / self.x_scale
        out = predict(self.arch, self.coefs, np.ascontiguousarray(Xs.T)).T
        if self.what == "proba":
            return softmax(out.T).T
        if self.what == "class":
            assert self.classes is not None
            return self.classes[np.argmax(out, axis=1)]
        assert self.y_mean is not None
        out = out + self.y_mean
        return out[:, 0] if self.y_1d else out


class _ADMMEstimator(BaseEstimator):
    """Common parameters and fitting; see :class:`ADMMClassifier` for the parameters."""

    _task = ""

    def __init__(
        self,
        algorithm: str = _A.name,
        *,
        network: str = _M.kind,
        depth: int = _M.depth,
        width: int = _M.width,
        activation: str = _M.activation,
        loss: str = _M.loss,
        bias: bool = _M.bias,
        residual_scale: float = _M.residual_scale,
        rho: float | None = None,
        beta: float | None = None,
        tau: float | None = None,
        lam: float | None = None,
        nu: float | None = _A.nu,
        relax: float | None = None,
        input_lam_scale: float | None = None,
        hidden_lam_scale: float | None = None,
        restart_every: int | None = None,
        restart_guard: bool = _A.restart_guard,
        schedule: str = _A.schedule,
        growth: float = _A.growth,
        step: str = _A.step,
        lr: float | None = None,
        batch_size: int = _A.batch_size,
        iterations: int = _R.iterations,
        eval_every: int = _R.eval_every,
        tol_primal: float = _R.tol_primal,
        tol_dual: float = _R.tol_dual,
        validation_fraction: float | None = None,
        cluster: str = "auto",
        client: Any = None,
        n_workers: int = 2,
        state: str = _S.state,
        chunk_size: int | str = _S.chunk_size,
        dtype: str = _R.dtype,
        random_state: Any = 0,
    ):
        self.algorithm = algorithm
        self.network = network
        self.depth = depth
        self.width = width
        self.activation = activation
        self.loss = loss
        self.bias = bias
        self.residual_scale = residual_scale
        self.rho = rho
        self.beta = beta
        self.tau = tau
        self.lam = lam
        self.nu = nu
        self.relax = relax
        self.input_lam_scale = input_lam_scale
        self.hidden_lam_scale = hidden_lam_scale
        self.restart_every = restart_every
        self.restart_guard = restart_guard
        self.schedule = schedule
        self.growth = growth
        self.step = step
        self.lr = lr
        self.batch_size = batch_size
        self.iterations = iterations
        self.eval_every = eval_every
        self.tol_primal = tol_primal
        self.tol_dual = tol_dual
        self.validation_fraction = validation_fraction
        self.cluster = cluster
        self.client = client
        self.n_workers = n_workers
        self.state = state
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.random_state = random_state

    # -- configuration -------------------------------------------------------------------------
    def _seed(self) -> int:
        rs = self.random_state
        if rs is None or isinstance(rs, np.random.RandomState):
            # scikit-learn's convention: None is numpy's global random state
            return int(check_random_state(rs).randint(0, 2**31 - 1))
        if isinstance(rs, bool) or not isinstance(rs, int | np.integer):
            raise ValueError(f"random_state must be an int, a numpy RandomState or None, "
                             f"got {rs!r}")
        return int(rs)

    def _config(self) -> tuple[Config, Any]:
        """The run's :class:`Config` and the client to run on (or None)."""
        known = ADMM_ALGORITHMS + BASELINE_ALGORITHMS  # checked first: it picks the defaults
        if self.algorithm not in known:
            raise ValueError(f"algorithm must be one of {', '.join(known)}; got "
                             f"{self.algorithm!r}")
        cfg = Config()
        cfg.algorithm = algorithm_defaults(self.algorithm)
        a = cfg.algorithm
        for key in _PER_ALGORITHM:
            value = getattr(self, key)
            if value is not None:  # (validate turns a NumPy scalar into a Python float)
                setattr(a, key, value)
        a.rho_max = max(a.rho_max, a.rho)
        a.beta_max = max(a.beta_max, a.beta)
        a.nu, a.schedule, a.growth, a.step = self.nu, self.schedule, self.growth, self.step
        a.restart_guard = self.restart_guard
        a.batch_size = self.batch_size
        m = cfg.model
        m.kind, m.depth, m.width, m.activation = self.network, self.depth, self.width, \
            self.activation
        m.loss, m.bias, m.residual_scale = self.loss, self.bias, self.residual_scale
        r = cfg.run
        r.iterations, r.eval_every = self.iterations, self.eval_every
        r.tol_primal, r.tol_dual = self.tol_primal, self.tol_dual
        r.seed, r.progress, r.plot = self._seed(), False, False
        r.dtype = self.dtype
        s = cfg.storage
        s.state, s.chunk_size = self.state, self.chunk_size
        c = cfg.cluster
        c.n_workers = self.n_workers
        c.in_process_mb = 0.0  # cluster= says where the fit runs; no size-based choice
        client = self.client
        where = self.cluster
        if not isinstance(where, str):
            raise ValueError(f"cluster must be a string, got {where!r}")
        if where == "auto":
            if client is None:
                from .engines.cluster import current_client

                client = current_client()
            c.kind = "local" if client is not None else "reference"
        elif where in CLUSTERS and where != "address":
            c.kind = where
        elif "://" in where or ":" in where:
            c.kind, c.address = "address", where
        else:
            kinds = ", ".join(k for k in CLUSTERS if k != "address")
            raise ValueError(f"cluster must be auto, {kinds} or a scheduler address, "
                             f"got {where!r}")
        if client is not None and c.kind == "reference":
            raise ValueError("cluster='reference' runs in this process; drop client= or use "
                             "cluster='auto'")
        vf = self.validation_fraction
        if vf is not None and not (isinstance(vf, float | int) and 0 < vf < 1):
            raise ValueError(f"validation_fraction must be None or in (0, 1), got {vf!r}")
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return cfg, client

    # -- data ----------------------------------------------------------------------------------
    def _encode(self, y: np.ndarray) -> np.ndarray:
        """Targets as the math's ``dy x n`` matrix (one-hot or centred values)."""
        raise NotImplementedError

    def _out_of_core(self, X, cfg: Config):
        """``X`` as a Dask array when it is a Dask or Zarr array and the run keeps its state in
        the Zarr store on Dask (then it is never gathered here), else None."""
        if isinstance(X, np.ndarray) or cfg.cluster.kind == "reference" or \
                cfg.storage.state != "zarr" or cfg.algorithm.name not in ADMM_ALGORITHMS:
            return None
        from .lazy import as_dask

        Xd = as_dask(X)
        if Xd is None:
            return None
        if Xd.ndim != 2:
            raise ValueError(f"Expected a 2D array, got a {Xd.ndim}D Dask array instead.")
        if any(np.isnan(c) for c in Xd.chunks[0]):
            raise ValueError("X has unknown chunk sizes: call X.compute_chunk_sizes() first")
        kind = np.dtype(Xd.dtype).kind
        if kind not in "biuf":
            raise ValueError(f"X must be numeric, got dtype {Xd.dtype}")
        n, d = Xd.shape
        if n < 2 or d < 1:
            raise ValueError(f"Found array with {n} sample(s) and {d} feature(s) (shape "
                             f"{Xd.shape}) while a minimum of 2 samples and 1 feature is "
                             "required.")
        self.n_features_in_ = d
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        if cfg.storage.chunk_size in (0, "auto"):  # the input's row chunks become the store's
            cfg.storage.chunk_size = int(max(Xd.chunks[0]))
        return Xd

    def _checked(self, X, y, cfg: Config, **kw):
        """``(X, y)`` validated as scikit-learn does: NumPy, or ``X`` lazy (out of core) with
        ``y`` (one value or row per sample) read into memory."""
        Xd = self._out_of_core(X, cfg)
        if Xd is None:
            return validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2, **kw)
        y = np.asarray(y.compute() if hasattr(y, "compute") else y)
        if y.shape[0] != Xd.shape[0]:
            raise ValueError(f"Found input variables with inconsistent numbers of samples: "
                             f"[{Xd.shape[0]}, {y.shape[0]}]")
        if not kw.get("multi_output") and y.ndim != 1:
            y = column_or_1d(y, warn=True)
        return Xd, y

    def _dataset(self, X, y: np.ndarray, seed: int, client: Any = None) -> Dataset:
        lazy = not isinstance(X, np.ndarray)
        if lazy:
            from .lazy import column_moments as lazy_moments

            self.x_mean_, scale = lazy_moments(X, client)
            if not (np.isfinite(self.x_mean_).all() and np.isfinite(scale).all()):
                raise ValueError("Input X contains NaN or infinity.")
        else:
            self.x_mean_, scale = column_moments(X)
        scale[scale <= 1e-12 * np.maximum(1.0, np.abs(self.x_mean_))] = 1.0
        self.x_scale_ = scale
        Xs = (X - self.x_mean_) / scale
        Y = self._encode(y)
        n = X.shape[0]
        train = np.arange(n)
        test = train
        if self.validation_fraction is not None:
            from sklearn.model_selection import train_test_split

            strat = y if self._task == "classification" else None
            try:
                train, test = train_test_split(train, test_size=self.validation_fraction,
                                               random_state=seed, stratify=strat)
            except ValueError as exc:
                raise ValueError(f"validation_fraction={self.validation_fraction}: {exc}") \
                    from None
            # in sample order: a lazy X is then read in order, chunk by chunk
            train, test = np.sort(train), np.sort(test)
        if lazy:
            Xtr = Xs.T if train.size == n else Xs[train].T
            Xte = Xs.T if test.size == n else Xs[test].T
        else:
            Xtr, Xte = np.ascontiguousarray(Xs[train].T), np.ascontiguousarray(Xs[test].T)
        return Dataset(
            name="arrays", task=self._task,
            X_train=Xtr, Y_train=np.ascontiguousarray(Y[:, train]),
            X_test=Xte, Y_test=np.ascontiguousarray(Y[:, test]),
            feature_names=[str(f) for f in getattr(self, "feature_names_in_", [])],
            classes=None, y_mean=getattr(self, "_y_mean", None), x_mean=self.x_mean_,
            x_scale=self.x_scale_, source="arrays",
        )

    # -- fit -----------------------------------------------------------------------------------
    def _fit(self, X, y, cfg: Config, client: Any):
        from .api import fit

        ds = self._dataset(X, y, cfg.run.seed, client)
        result = fit(cfg, dataset=ds, client=client)
        if result.status in ("diverged", "nonfinite"):
            warnings.warn(f"{self.algorithm}: {result.message}", UserWarning, stacklevel=3)
        self.coefs_ = [w.copy() for w in result.weights]
        self.arch_: Architecture = result.arch
        self.n_iter_ = int(result.iterations)
        self.status_ = result.status
        keep = None if self.validation_fraction is not None else ("test_loss", "test_metric")
        self.history_ = [{k: v for k, v in rec.items() if keep is None or k not in keep}
                         for rec in result.history]
        self.result_ = result
        return self

    def _rows(self, X, what: str, n_out: int | None, dtype=np.float64):
        """``what`` (see :class:`_RowFunction`) of the rows of ``X``: NumPy in, NumPy out; a
        Dask or Zarr ``X`` gives a lazy Dask array with ``X``'s row chunks (nothing is read
        until it is computed)."""
        check_is_fitted(self, "coefs_")
        fn = _RowFunction(what, self.arch_, self.coefs_, self.x_mean_, self.x_scale_,
                          getattr(self, "classes_", None), getattr(self, "y_mean_", None),
                          getattr(self, "_y_1d", False))
        Xd = None
        if not isinstance(X, np.ndarray):
            from .lazy import as_dask

            Xd = as_dask(X)
        if Xd is None:
            return fn(validate_data(self, X, reset=False, dtype=np.float64))
        if Xd.ndim != 2 or Xd.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {Xd.shape}, but {type(self).__name__} is expecting "
                             f"{self.n_features_in_} features as input.")
        from .lazy import predict_blocks

        return predict_blocks(Xd, fn, n_out, dtype)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class ADMMClassifier(ClassifierMixin, _ADMMEstimator):
    """A residual network (or MLP) classifier trained with ADMM (or the backprop baseline).

    Parameters
    ----------
    algorithm : ``radmm3a`` (default: RADMM-3 with multipliers on the activation constraints),
        ``radmm3``, ``radmm3l``, ``radmm2``, ``dladmm``, ``pdadmm``, or the backprop baselines
        ``adam``, ``sgd``.
    network : ``resnet`` (input layer, residual blocks, linear output) or ``mlp``.
    depth, width : weight layers N (>= 2) and hidden width.
    activation : ``relu`` (default), ``tanh``, ``leaky_relu``, ``sigmoid`` or ``identity``.
    loss : ``auto`` (softmax cross-entropy), ``cross_entropy`` or ``mse`` (on one-hot labels).
    bias, residual_scale : bias columns; initial scale of the residual branches.
    rho, beta, tau, lam, nu : the ADMM penalties (None: the algorithm's default). ``rho``
        weights the linear constraints, ``beta`` the activation penalties, ``tau`` the proximal
        terms, ``lam`` the weight decay; ``nu`` dlADMM's/pdADMM's relaxed hidden constraints.
    relax : RADMM-3A's over-relaxation in [1, 2) (None: its default, 1.8; 1: none).
    input_lam_scale, hidden_lam_scale : the weight decay of the input block and of the hidden
        blocks 2..N-1 as multiples of ``lam`` (RADMM-3/3L/3A; None: the algorithm's default:
        1 and 0.1 for RADMM-3A, 1 and 1 for the others).
    restart_every : RADMM-3A starts again from the current weights every this many
        iterations (a forward pass for its auxiliaries, a backward pass for its multipliers;
        None: its default; 0: never).
    restart_guard : with restarts, reject a restart whose objective (training loss plus weight
        decay) rose: start again from the last accepted weights with rho and beta multiplied
        by ``adapt_factor`` (2; capped by ``rho_max`` and ``beta_max``; at the caps the run
        goes on from the accepted weights without further restarts).
    schedule, growth : penalty schedule (``constant``, ``grow``, ``adaptive``) and its factor.
    step : linearized steps, ``backtracking`` or ``lipschitz``.
    lr, batch_size : the backprop baselines' learning rate and batch size (0: full batch).
    iterations : ADMM iterations (epochs for the baselines).
    eval_every : evaluate the true forward pass every this many iterations (``history_``).
    tol_primal, tol_dual : stop when both residuals are below these (0: off).
    validation_fraction : None (all rows train; ``history_`` has training metrics) or a
        fraction held out (stratified) whose metrics ``history_`` records as ``test_*``.
    cluster, client, n_workers : where to run (see the module docstring).
    state, chunk_size : where a Dask run keeps its ADMM variables (``zarr``: a chunked Zarr
        store in a scratch directory removed after the fit; ``memory``: worker memory) and the
        samples per chunk (0: one chunk; ``"auto"``: one per worker thread, more where worker
        memory needs it, none below 4,096 samples).
    dtype : ``float64`` (default) or ``float32`` (half the memory, about twice the matrix-product
        rate; ``coefs_`` are then float32).
    random_state : seed of the initial weights (and of the validation split).

    Attributes
    ----------
    classes_ : the class labels. coefs_ : the weight matrices ``W_1..W_N`` (``out x in``, bias
    in the last column; they act on standardised features ``(X - x_mean_) / x_scale_``).
    n_iter_ : iterations run. status_ : ``max_iter``, ``converged``, ``diverged``,
    ``nonfinite`` or ``interrupted``. history_ : one record per evaluation (objective,
    residuals, train loss and accuracy, rho, beta, wall time). n_features_in_, x_mean_,
    x_scale_, result_ (the :class:`~daskadmm.result.Result`).
    """

    _task = "classification"

    def fit(self, X, y):
        """Fit on ``X`` (``n_samples x n_features``) and labels ``y`` (``n_samples``)."""
        cfg, client = self._config()
        X, y = self._checked(X, y, cfg)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if self.classes_.size < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got "
                             f"1 class ({self.classes_[0]!r})")
        self._y_mean = None
        return self._fit(X, y, cfg, client)

    def _encode(self, y):
        index = np.searchsorted(self.classes_, y)
        return np.eye(self.classes_.size)[index].T

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax of the network's output), ``n x n_classes``."""
        check_is_fitted(self, "coefs_")
        return self._rows(X, "proba", self.classes_.size)

    def predict(self, X) -> np.ndarray:
        """The most likely class of each row."""
        check_is_fitted(self, "coefs_")
        return self._rows(X, "class", None, self.classes_.dtype)


class ADMMRegressor(RegressorMixin, _ADMMEstimator):
    """A residual network (or MLP) regressor trained with ADMM (or the backprop baseline).

    The parameters are :class:`ADMMClassifier`'s (``loss``: ``auto`` is the squared error).
    ``y`` may have one column or several (multi-output); targets are centred with their
    training mean (``y_mean_``) and predicted in their original units.
    """

    _task = "regression"

    def fit(self, X, y):
        """Fit on ``X`` (``n_samples x n_features``) and targets ``y`` (``n_samples`` or
        ``n_samples x n_outputs``)."""
        cfg, client = self._config()
        X, y = self._checked(X, y, cfg, multi_output=True, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self._y_1d = y.ndim == 1
        Y = y[:, None] if self._y_1d else y
        self.y_mean_ = Y.mean(axis=0)
        self._y_mean = self.y_mean_
        return self._fit(X, Y, cfg, client)

    def _encode(self, y):
        return (y - self.y_mean_).T

    def predict(self, X) -> np.ndarray:
        """Predicted targets in their original units (1-d when ``y`` was)."""
        check_is_fitted(self, "coefs_")
        return self._rows(X, "value", None if self._y_1d else self.y_mean_.size)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
