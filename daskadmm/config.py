"""Typed run configuration and its validation.

The dataclasses here are the structured-config schema that Hydra composes into (``cli.py``), and
the only configuration objects the layers below the CLI ever see. :func:`validate` turns every
bad value into a :class:`ConfigError` with a one-line message naming the key.

Nothing in this module imports Hydra: ``from_mapping`` accepts any nested mapping (an OmegaConf
``DictConfig`` converted with ``OmegaConf.to_container`` or a plain dict).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMM_ALGORITHMS",
    "ACTIVATIONS",
    "BASELINE_ALGORITHMS",
    "DATASETS",
    "AlgorithmConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "StorageConfig",
    "from_mapping",
    "validate",
]

ADMM_ALGORITHMS = ("radmm3", "radmm3l", "radmm2", "dladmm", "pdadmm")
# the algorithms whose state can live in a chunked Zarr store (radmm2's global backtracking
# reductions do not fit the per-chunk graph yet)
ZARR_ALGORITHMS = ("radmm3", "radmm3l", "pdadmm", "dladmm")
BASELINE_ALGORITHMS = ("adam", "sgd")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")
DATASETS = ("digits", "wine_red", "wine_white", "synthetic", "mnist", "mnist_5k", "fashion_mnist",
            "csv")
SCHEDULES = ("constant", "grow", "adaptive")
CLUSTERS = ("reference", "synchronous", "threads", "local", "address")


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line and names the key."""


@dataclass
class AlgorithmConfig:
    """Which trainer, and its penalties.

    ``rho`` weights the linear constraints ``U_i = W_i V_{i-1}``, ``beta`` the activation
    penalties, ``tau`` the proximal terms, ``lam`` the weight decay ``(lam/2) sum ||W_i||^2``
    (not divided by n). All penalty terms are divided by the sample count n, so rho, beta, tau do
    not depend on the data size.
    """

    name: str = "radmm3"
    rho: float = 2.0
    beta: float = 1.0
    tau: float = 1e-3
    lam: float = 1e-2
    # dlADMM's / pdADMM's penalty on the relaxed hidden constraints (None: nu = rho, as the
    # authors' code; beta and tau are not used by those two).
    nu: float | None = None
    # Penalty schedule: constant; grow (multiply rho, beta by `growth` per iteration up to
    # rho_max, beta_max); adaptive (every `adapt_every` iterations, if the primal residual did not
    # fall below `adapt_tol` times its value `adapt_every` iterations earlier, multiply rho and
    # beta by `adapt_factor`, capped).
    schedule: str = "constant"
    growth: float = 1.05
    rho_max: float = 1e3
    beta_max: float = 1e3
    adapt_every: int = 10
    adapt_factor: float = 2.0
    adapt_tol: float = 0.9
    # Linearized steps (radmm3l, radmm2): "lipschitz" uses the exact / Lipschitz step constant
    # where one exists, "backtracking" the capped backtracking rule. radmm2 with relu/leaky_relu
    # always backtracks (no Lipschitz constant exists).
    step: str = "backtracking"
    backtrack_max: int = 30
    newton_max_iter: int = 100
    # Backprop baseline (algorithm=adam|sgd).
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 0  # 0: full batch
    weight_decay: float = 0.0


@dataclass
class ModelConfig:
    """The network: ``kind=resnet`` (input layer, depth-2 residual blocks, linear output) or
    ``kind=mlp``. ``depth`` counts weight layers (N >= 2)."""

    kind: str = "resnet"
    depth: int = 4
    width: int = 128
    activation: str = "tanh"
    leaky_slope: float = 0.01
    bias: bool = True
    loss: str = "auto"  # auto: mse for regression, cross_entropy for classification
    residual_scale: float = 0.3  # init scale of residual blocks relative to He


@dataclass
class DataConfig:
    """Which data set. ``path``/``target``/``task`` are for ``name=csv`` (``path`` also overrides
    the location of the Wine Quality files)."""

    name: str = "digits"
    path: str | None = None
    target: str | None = None
    task: str | None = None  # regression | classification (csv only)
    test_size: float = 0.2
    n_train: int | None = None  # subsample the training split (None: all)
    n_test: int | None = None
    seed: int | None = None  # split seed (None: run.seed)
    cache_dir: str = "data"
    download: bool = True
    # synthetic
    n_samples: int = 1000
    n_features: int = 10
    n_outputs: int = 1
    n_classes: int = 0  # 0: regression; >= 2: classification
    noise: float = 0.1


@dataclass
class RunConfig:
    iterations: int = 60
    seed: int = 0
    eval_every: int = 1
    tol_primal: float = 0.0  # stop when primal and dual residual are below these (0: off)
    tol_dual: float = 0.0
    window: int = 0  # iterations in flight on Dask (0: chosen automatically)
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    diverge_factor: float = 1e8  # diverged when objective > factor * max(1, initial objective)
    plot: bool = True


@dataclass
class ClusterConfig:
    kind: str = "local"
    address: str | None = None
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard_address: str = "127.0.0.1:8787"  # a busy port makes Dask pick another one
    connect_timeout: float = 10.0  # seconds, for cluster.kind=address
    blas_threads: int = 1


@dataclass
class StorageConfig:
    """Where the ADMM variables live on Dask clusters. ``state=zarr``: a chunked Zarr store
    (radmm3, radmm3l, pdadmm, dladmm; radmm2 keeps its state in worker memory); ``state=memory``:
    in worker memory. ``chunk_size`` samples per chunk (0: one chunk)."""

    state: str = "zarr"
    url: str | None = None  # None: <run dir>/state.zarr
    chunk_size: int = 0  # samples per chunk (0: one chunk)
    compressor: str = "none"


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    experiment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "algorithm": AlgorithmConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "run": RunConfig,
    "cluster": ClusterConfig,
    "storage": StorageConfig,
}


def _coerce(section: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    name = f"{section}.{key}"
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{name} must not be null")
    if "bool" in annotation:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if "int" in annotation and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(f)
    if "float" in annotation:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if "str" in annotation:
        return str(value)
    return value


def from_mapping(mapping: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested mapping; unknown keys are an error."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config must be a mapping, got {type(mapping).__name__}")
    cfg = Config()
    for section, value in mapping.items():
        if section == "experiment":
            cfg.experiment = None if value is None else str(value)
            continue
        if section == "hydra":
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} (known: {', '.join(_SECTIONS)})")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{section} must be a mapping, got {value!r}")
        cls = _SECTIONS[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        obj = getattr(cfg, section)
        for key, v in value.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown key {section}.{key} (known: {', '.join(sorted(fields))})"
                )
            f = fields[key]
            setattr(obj, key, _coerce(section, key, v, f.default, str(f.type)))
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _finite_pos(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    _check(ok, f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check every value; raise :class:`ConfigError` (one line, naming the key) if one is bad."""
    a, m, d, r, c, s = cfg.algorithm, cfg.model, cfg.data, cfg.run, cfg.cluster, cfg.storage
    known = ADMM_ALGORITHMS + BASELINE_ALGORITHMS
    _check(a.name in known, f"algorithm.name must be one of {', '.join(known)}, got {a.name!r}")
    _finite_pos("algorithm.rho", a.rho)
    _finite_pos("algorithm.beta", a.beta)
    _finite_pos("algorithm.tau", a.tau)
    _finite_pos("algorithm.lam", a.lam, allow_zero=True)
    if a.nu is not None:
        _finite_pos("algorithm.nu", a.nu)
    _check(a.schedule in SCHEDULES, f"algorithm.schedule must be one of {', '.join(SCHEDULES)}, "
           f"got {a.schedule!r}")
    _check(math.isfinite(a.growth) and a.growth >= 1.0,
           f"algorithm.growth must be >= 1, got {a.growth!r}")
    _check(a.rho_max >= a.rho,
           f"algorithm.rho_max ({a.rho_max}) must be >= algorithm.rho ({a.rho})")
    _check(a.beta_max >= a.beta,
           f"algorithm.beta_max ({a.beta_max}) must be >= algorithm.beta ({a.beta})")
    _check(a.adapt_every >= 1, f"algorithm.adapt_every must be >= 1, got {a.adapt_every}")
    _check(a.adapt_factor >= 1.0, f"algorithm.adapt_factor must be >= 1, got {a.adapt_factor}")
    _check(0 < a.adapt_tol <= 1, f"algorithm.adapt_tol must be in (0, 1], got {a.adapt_tol}")
    _check(a.step in ("lipschitz", "backtracking"),
           f"algorithm.step must be lipschitz or backtracking, got {a.step!r}")
    _check(a.backtrack_max >= 1, f"algorithm.backtrack_max must be >= 1, got {a.backtrack_max}")
    _check(a.newton_max_iter >= 1,
           f"algorithm.newton_max_iter must be >= 1, got {a.newton_max_iter}")
    _finite_pos("algorithm.lr", a.lr)
    _check(0 <= a.momentum < 1, f"algorithm.momentum must be in [0, 1), got {a.momentum}")
    _check(a.batch_size >= 0, f"algorithm.batch_size must be >= 0, got {a.batch_size}")
    _finite_pos("algorithm.weight_decay", a.weight_decay, allow_zero=True)

    _check(m.kind in ("resnet", "mlp"), f"model.kind must be resnet or mlp, got {m.kind!r}")
    _check(m.depth >= 2, f"model.depth must be >= 2 (input and output layer), got {m.depth}")
    _check(m.width >= 1, f"model.width must be >= 1, got {m.width}")
    _check(m.activation in ACTIVATIONS,
           f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}")
    _check(0 < m.leaky_slope < 1, f"model.leaky_slope must be in (0, 1), got {m.leaky_slope}")
    _check(m.loss in ("auto", "mse", "cross_entropy"),
           f"model.loss must be auto, mse or cross_entropy, got {m.loss!r}")
    _finite_pos("model.residual_scale", m.residual_scale, allow_zero=True)

    _check(d.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {d.name!r}")
    if d.name == "csv":
        _check(bool(d.path), "data.path is required with data=csv (data.path=FILE)")
        _check(bool(d.target), "data.target is required with data=csv (data.target=COLUMN)")
        _check(d.task in ("regression", "classification"),
               f"data.task must be regression or classification with data=csv, got {d.task!r}")
    elif d.task is not None:
        _check(d.task in ("regression", "classification"),
               f"data.task must be regression or classification, got {d.task!r}")
    _check(0 < d.test_size < 1, f"data.test_size must be in (0, 1), got {d.test_size}")
    for key in ("n_train", "n_test"):
        v = getattr(d, key)
        _check(v is None or v >= 1, f"data.{key} must be >= 1 or null, got {v}")
    _check(d.n_samples >= 4, f"data.n_samples must be >= 4, got {d.n_samples}")
    _check(d.n_features >= 1, f"data.n_features must be >= 1, got {d.n_features}")
    _check(d.n_outputs >= 1, f"data.n_outputs must be >= 1, got {d.n_outputs}")
    _check(d.n_classes == 0 or d.n_classes >= 2,
           f"data.n_classes must be 0 (regression) or >= 2, got {d.n_classes}")
    _finite_pos("data.noise", d.noise, allow_zero=True)

    _check(r.iterations >= 1, f"run.iterations must be >= 1, got {r.iterations}")
    _check(r.eval_every >= 1, f"run.eval_every must be >= 1, got {r.eval_every}")
    _finite_pos("run.tol_primal", r.tol_primal, allow_zero=True)
    _finite_pos("run.tol_dual", r.tol_dual, allow_zero=True)
    _check(r.window >= 0, f"run.window must be >= 0, got {r.window}")
    _check(r.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {r.checkpoint_every}")
    _finite_pos("run.diverge_factor", r.diverge_factor)

    _check(c.kind in CLUSTERS, f"cluster.kind must be one of {', '.join(CLUSTERS)}, got {c.kind!r}")
    if c.kind == "address":
        _check(bool(c.address), "cluster.address is required with cluster=address "
               "(cluster.address=tcp://host:8786)")
    _check(c.n_workers >= 1, f"cluster.n_workers must be >= 1, got {c.n_workers}")
    _check(c.threads_per_worker >= 1,
           f"cluster.threads_per_worker must be >= 1, got {c.threads_per_worker}")
    _check(c.blas_threads >= 1, f"cluster.blas_threads must be >= 1, got {c.blas_threads}")

    _check(s.state in ("zarr", "memory"), f"storage.state must be zarr or memory, got {s.state!r}")
    _check(s.chunk_size >= 0, f"storage.chunk_size must be >= 0, got {s.chunk_size}")
    if r.resume:
        _check(bool(s.url), "run.resume=true needs storage.url=<the state store to resume>")
    if r.resume or r.checkpoint_every:
        ok = c.kind != "reference" and s.state == "zarr" and a.name in ZARR_ALGORITHMS
        _check(ok, "checkpoints and resume need the Zarr-resident engine: algorithm "
               f"{', '.join(ZARR_ALGORITHMS)}, storage.state=zarr and a Dask cluster (not "
               "cluster=reference)")
    _check(s.compressor in ("none", "zstd", "blosc"),
           f"storage.compressor must be none, zstd or blosc, got {s.compressor!r}")
    return cfg
