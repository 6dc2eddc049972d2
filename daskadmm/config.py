"""Typed run configuration and its validation.

The dataclasses here are the schema and the one place every default is written: the CLI
registers them in Hydra's ConfigStore (``cli.register_schema``) as the base that
``conf/config.yaml`` composes first, so the group files in ``conf/`` list only what their option
changes (``ALGORITHM_OVERRIDES``, ``ALGORITHM_KEYS``: what each algorithm changes and reads;
``ALGORITHM_VARIANTS``: named presets such as ``algorithm=dladmm_published``). They are also the
only configuration objects the layers below the CLI ever see. :func:`validate`
turns every bad value into a :class:`ConfigError` with a one-line message naming the key.

Nothing in this module imports Hydra: ``from_mapping`` accepts any nested mapping (an OmegaConf
``DictConfig`` converted with ``OmegaConf.to_container`` or a plain dict).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "ADMM_ALGORITHMS",
    "ALGORITHM_KEYS",
    "ALGORITHM_OVERRIDES",
    "ALGORITHM_VARIANTS",
    "ACTIVATIONS",
    "BASELINE_ALGORITHMS",
    "DATASETS",
    "AlgorithmConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "algorithm_defaults",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "StorageConfig",
    "check_resources",
    "from_mapping",
    "validate",
    "variant_config",
]

DTYPES = ("float64", "float32")
ADMM_ALGORITHMS = ("radmm3", "radmm3a", "radmm3l", "radmm2", "dladmm", "pdadmm")
BASELINE_ALGORITHMS = ("adam", "sgd")
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")
DATASETS = ("digits", "wine_red", "wine_white", "synthetic", "mnist", "mnist_5k", "fashion_mnist",
            "csv")
SCHEDULES = ("constant", "grow", "adaptive", "rises")
INITS = ("scaled", "normal")
OUTPUT_INITS = ("forward", "labels")
CLUSTERS = ("reference", "synchronous", "threads", "local", "address")
PLACEMENTS = ("auto", "blocks", "chunks")
# Dask's comm schemes a scheduler address may use (``inproc`` only works inside one process).
ADDRESS_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (and scikit-learn's random_state) take 32 bits
MAX_WIDTH = 65536
MAX_DEPTH = 10000
# check_resources' estimate: copies of the weights counted in memory (an allowance for previous
# values, updates and optimizer moments), sample-sized ADMM variables per layer, and the
# iteration slots a Zarr state store keeps.
WEIGHT_COPIES = 4
STATE_VARIABLES = 3
STORE_SLOTS = 2


@dataclass
class AlgorithmConfig:
    """Which trainer, and its penalties.

    ``rho`` weights the linear constraints ``U_i = W_i V_{i-1}``, ``beta`` the activation
    penalties, ``tau`` the proximal terms, ``lam`` the weight decay ``(lam/2) sum ||W_i||^2``
    (not divided by n). All penalty terms are divided by the sample count n, so rho, beta, tau do
    not depend on the data size.
    """

    name: str = "radmm3a"
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
    # beta by `adapt_factor`, capped); rises (after the forward training loss rose at
    # `rise_count` consecutive evaluations, multiply rho and beta by `adapt_factor`, capped: the
    # dlADMM authors' rule with run.eval_every = 1). adaptive and rises also multiply
    # `backtrack_start` (when set) by `adapt_factor`, uncapped, as the authors' code does.
    schedule: str = "constant"
    growth: float = 1.05
    rho_max: float = 1e3
    beta_max: float = 1e3
    adapt_every: int = 10
    adapt_factor: float = 2.0
    adapt_tol: float = 0.9
    rise_count: int = 3
    # Linearized steps (radmm3l, radmm2): "lipschitz" uses the exact / Lipschitz step constant
    # where one exists, "backtracking" the capped backtracking rule. radmm2 with relu/leaky_relu
    # always backtracks (no Lipschitz constant exists).
    step: str = "backtracking"
    backtrack_max: int = 30
    newton_max_iter: int = 100
    # dlADMM: the first trial curvature of every backtracking search (n-units; null: half the
    # last accepted value of the same variable), and how the output layer starts: "forward"
    # (z_L the forward output, u dual-consistent) or "labels" (z_L = 2Y - 1 for cross-entropy,
    # Y for MSE; u = 0: the authors' code).
    backtrack_start: float | None = None
    output_init: str = "forward"
    # RADMM-3A: over-relaxation alpha in [1, 2) of both constraint families (U_i = W_i V~ in
    # the U and Lam steps, the activation constraint in the V and Gam steps); 1: none.
    relax: float = 1.0
    # RADMM-3/3L/3A: the weight decay of the input block 1 and of the hidden blocks 2..N-1 as
    # multiples of lam (the output block keeps lam); 1: every block lam.
    input_lam_scale: float = 1.0
    hidden_lam_scale: float = 1.0
    # RADMM-3A: every this many iterations start again from the current weights (the
    # auxiliaries from a forward pass, the multipliers from one backward pass); 0: never.
    restart_every: int = 0
    # RADMM-3A with restart_every > 0: a restart whose objective (training loss plus weight
    # decay at the restart's weights) is above that of the last accepted one is rejected: the
    # run starts again from the accepted weights with rho and beta times adapt_factor (at
    # rho_max and beta_max: from the accepted weights, and no further restarts).
    restart_guard: bool = True
    # Backprop baseline (algorithm=adam|sgd).
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 0  # 0: full batch
    weight_decay: float = 0.0


# Each algorithm's defaults where they differ from AlgorithmConfig's. conf/algorithm/<name>.yaml
# holds exactly these (besides ``name``), and a test checks that they agree.
ALGORITHM_OVERRIDES: dict[str, dict[str, Any]] = {
    "dladmm": {"rho": 0.1},
    "pdadmm": {"rho": 0.1},
    # RADMM-3A's multiplier steps follow relu's kinks: a larger weight decay damps the W step
    # (digits N = 4..64 and three regression sets, 3-5 seeds: better everywhere but wine_red);
    # over-relaxation 1.8 speeds it up (mnist_5k +0.013, 5 seeds); a tenth of that decay on the
    # hidden blocks lets the residual branches fit (synthetic, wine_white, digits N = 64 better,
    # the rest within noise; 0.03 is as good, 0.003 fails on the wine sets; README "Deep
    # networks")
    "radmm3a": {"lam": 0.03, "relax": 1.8, "hidden_lam_scale": 0.1},
}

# The schedule keys (every ADMM algorithm goes through the penalty schedule).
_SCHEDULE_KEYS = ("schedule", "growth", "rho_max", "beta_max", "adapt_every", "adapt_factor",
                  "adapt_tol", "rise_count")
# dlADMM / pdADMM have no beta: their schedule scales rho (and nu = rho) only.
_NU_SCHEDULE_KEYS = tuple(k for k in _SCHEDULE_KEYS if k != "beta_max")

# The algorithm keys each algorithm reads (besides ``name``); the others are accepted and
# ignored. conf/algorithm/<name>.yaml lists them in its ``# reads:`` comment (tested).
ALGORITHM_KEYS: dict[str, tuple[str, ...]] = {
    "radmm3": ("rho", "beta", "tau", "lam", *_SCHEDULE_KEYS, "newton_max_iter",
               "input_lam_scale", "hidden_lam_scale"),
    "radmm3a": ("rho", "beta", "tau", "lam", *_SCHEDULE_KEYS, "newton_max_iter", "relax",
                "input_lam_scale", "hidden_lam_scale", "restart_every", "restart_guard"),
    "radmm3l": ("rho", "beta", "tau", "lam", *_SCHEDULE_KEYS, "newton_max_iter",
                "input_lam_scale", "hidden_lam_scale"),
    "radmm2": ("rho", "beta", "tau", "lam", *_SCHEDULE_KEYS, "step", "backtrack_max",
               "newton_max_iter"),
    "dladmm": ("rho", "nu", "lam", *_NU_SCHEDULE_KEYS, "step", "backtrack_max",
               "newton_max_iter", "backtrack_start", "output_init"),
    "pdadmm": ("rho", "nu", "lam", *_NU_SCHEDULE_KEYS, "step", "backtrack_max",
               "newton_max_iter"),
    "adam": ("lr", "batch_size", "weight_decay"),
    "sgd": ("lr", "momentum", "batch_size", "weight_decay"),
}


def algorithm_defaults(name: str) -> AlgorithmConfig:
    """The ``algorithm`` section of ``algorithm=<name>`` with every default in force."""
    return AlgorithmConfig(name=name, **ALGORITHM_OVERRIDES.get(name, {}))


# Named variants: an algorithm with a preset of keys, some outside the ``algorithm`` section,
# each listing every key whose value differs from the schema's (the algorithm's own overrides
# included). ``algorithm=<variant>`` on the command line selects conf/algorithm/<variant>.yaml
# (a global-package file that holds exactly these sections; a test checks it);
# ``algorithm.name`` stays the algorithm's own. From Python: ``fit(variant_config(name))``
# after setting the data, the model's size and the run.
ALGORITHM_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # dlADMM as the authors ran it (github.com/xianggebenben/dlADMM, MLP/pytorch_version):
    # rho = 1e-6, multiplied by 10 (at most to 0.1) after the training cost rose three times in
    # a row, the backtracking starts (their tau, theta) at 1 and multiplied by 10 with it, no
    # regulariser, z_L = +-1 and u = 0 at the start, N(0, 0.1^2) weights and biases.
    "dladmm_published": {
        "algorithm": {"name": "dladmm", "rho": 1e-6, "lam": 0.0, "schedule": "rises",
                      "rho_max": 0.1, "adapt_factor": 10.0, "backtrack_start": 1.0,
                      "output_init": "labels"},
        "model": {"init": "normal"},
    },
    # RADMM-3A with guarded restarts every 3 iterations at rho = 1 (beta stays 1): the one
    # setting measured to meet every quality target of benchmarks/quality.py at 100 iterations
    # (README, "The restart guard"). Not the default because each restart drains the pipeline:
    # the longest chain of K iterations grows from about 2K + N to about 2K + 2NK/3. Lists
    # radmm3a's own keys (ALGORITHM_OVERRIDES), as a variant starts from the schema's.
    "radmm3a_restarts": {
        "algorithm": {"name": "radmm3a", "lam": 0.03, "relax": 1.8, "hidden_lam_scale": 0.1,
                      "rho": 1.0, "restart_every": 3},
    },
}


def variant_config(name: str) -> Config:
    """A :class:`Config` with the variant's keys set (:data:`ALGORITHM_VARIANTS`) and every
    other key at its default, as ``algorithm=<name>`` composes it."""
    if name not in ALGORITHM_VARIANTS:
        raise ConfigError(f"unknown algorithm variant {name!r} "
                          f"(known: {', '.join(ALGORITHM_VARIANTS)})")
    cfg = Config()
    cfg.algorithm = AlgorithmConfig()  # the schema's defaults: the variant's file replaces the
    # default algorithm's, overrides included
    for section, values in ALGORITHM_VARIANTS[name].items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return validate(cfg)


@dataclass
class ModelConfig:
    """The network: ``kind=resnet`` (input layer, depth-2 residual blocks, linear output) or
    ``kind=mlp``. ``depth`` counts weight layers (N >= 2)."""

    kind: str = "resnet"
    depth: int = 4
    width: int = 128
    activation: str = "relu"
    leaky_slope: float = 0.01
    bias: bool = True
    loss: str = "auto"  # auto: mse for regression, cross_entropy for classification
    residual_scale: float = 0.3  # init scale of residual blocks relative to He
    # divide residual_scale by sqrt(number of residual blocks), so the forward signal does not
    # grow with depth (every method, Adam included, starts from these weights)
    depth_scaling: bool = True
    # initial weights: "scaled" (He / Glorot-scaled, zero biases, the residual scaling above) or
    # "normal" (every weight and bias N(0, init_std^2), as the dlADMM authors' code)
    init: str = "scaled"
    init_std: float = 0.1


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
    iterations: int = 100
    seed: int = 0
    eval_every: int = 1
    tol_primal: float = 0.0  # stop when primal and dual residual are below these (0: off)
    tol_dual: float = 0.0
    window: int = 0  # iterations in flight on Dask (0: chosen automatically)
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    diverge_factor: float = 1e8  # diverged when objective > factor * max(1, initial objective)
    # stop with status "stalled" when after this many iterations the forward training loss has
    # not fallen, or the training accuracy stayed at chance over the last this many (0: off)
    stall_iterations: int = 25
    plot: bool = True
    dtype: str = "float64"  # float32: half the memory, about twice the matrix-product rate


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
    # keep freed memory in the run's processes for reuse (glibc malloc; see daskadmm.heap)
    reuse_memory: bool = True
    # where the Zarr-resident engine's chunk tasks run: "blocks" (every task of a block on
    # one worker, blocks in contiguous ranges), "chunks" (chunk c of every block on one
    # worker) or "auto" (chunks when every worker gets a chunk, else blocks)
    placement: str = "auto"
    # cluster.kind=local: a run whose ADMM state (estimated in float64) is at most this many
    # MiB runs in this process on Dask's threaded scheduler with the state in memory instead
    # of starting a LocalCluster (faster there; no dashboard); 0: always start the LocalCluster
    in_process_mb: float = 256.0

    @property
    def threads(self) -> int:
        """Worker threads in all of the configured LocalCluster (or threaded scheduler):
        ``n_workers x threads_per_worker``."""
        return self.n_workers * self.threads_per_worker


@dataclass
class StorageConfig:
    """Where the ADMM variables live on Dask clusters. ``state=zarr``: a chunked Zarr store
    (every ADMM algorithm); ``state=memory``: in worker memory. ``chunk_size`` samples per
    chunk (0: one chunk; ``auto``: chosen from the data, the workers and their memory, see
    :func:`daskadmm.engines.cluster.auto_chunk_size`; a resumed run keeps its store's).

    ``overwrite``: replace an existing daskadmm state store at ``storage.url`` (never anything
    else). ``keep_state``: keep the data and solver state in the store after the run (None:
    only with checkpoints or resume; otherwise only the final model is kept). ``break_lock``:
    take over a store whose lock is held by a run that cannot be verified dead (another host,
    reused pid); says whose lock it broke."""

    state: str = "zarr"
    url: str | None = None  # None: <run dir>/state.zarr
    # samples per chunk (0: one chunk; auto: one chunk per worker thread, more where a
    # worker's memory asks for it, none below 4,096 samples)
    chunk_size: int | str = "auto"
    compressor: str = "none"
    # replace an existing daskadmm state store at storage.url (never anything else)
    overwrite: bool = False
    # take over a store whose lock is held by a run that cannot be verified dead (another host,
    # reused pid); says whose lock it broke
    break_lock: bool = False
    # keep the solver state (data and ADMM variables) in the store after a finished run; null:
    # only when checkpoints are on (run.checkpoint_every > 0) or the run resumed one. Without
    # it the store keeps only the final model (what daskadmm-predict and load_model read).
    keep_state: bool | None = None


@dataclass
class Config:
    """A whole run's configuration: every default of the ``daskadmm`` command.

    ``algorithm`` is the default algorithm's section with that algorithm's own overrides (as
    ``algorithm=<default>`` composes it); to switch algorithm with its own defaults, assign
    ``algorithm_defaults(name)`` rather than only ``algorithm.name``."""

    # the default algorithm with its own overrides (as ``algorithm=<default>`` composes it)
    algorithm: AlgorithmConfig = field(
        default_factory=lambda: algorithm_defaults(AlgorithmConfig.name))
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


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
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
    if annotation == "int | str" and isinstance(value, str):  # an integer, or a word
        try:
            return int(value)
        except ValueError:
            return value
    if "int" in annotation and "float" not in annotation:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact, however large (float() would round it)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
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
            setattr(obj, key, _coerce(section, key, v, str(f.type)))
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _finite_pos(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    _check(ok, f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")


def _plain_floats(cfg: Config) -> None:
    """NumPy float scalars (a scikit-learn grid's, a value computed with NumPy) become Python
    floats, in place: NumPy 2 computes with a Python float in the arrays' type, with a NumPy
    float64 in float64, so a float32 run given one would drift to float64."""
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        if dataclasses.is_dataclass(sec):
            for f in dataclasses.fields(sec):
                v = getattr(sec, f.name)
                if isinstance(v, np.floating):
                    setattr(sec, f.name, float(v))


def validate(cfg: Config) -> Config:
    """Check every value; raise :class:`ConfigError` (one line, naming the key) if one is bad.
    NumPy float scalars become Python floats first (:func:`_plain_floats`)."""
    _plain_floats(cfg)
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
    _check(a.rise_count >= 1, f"algorithm.rise_count must be >= 1, got {a.rise_count}")
    _check(a.step in ("lipschitz", "backtracking"),
           f"algorithm.step must be lipschitz or backtracking, got {a.step!r}")
    _check(a.backtrack_max >= 1, f"algorithm.backtrack_max must be >= 1, got {a.backtrack_max}")
    _check(a.newton_max_iter >= 1,
           f"algorithm.newton_max_iter must be >= 1, got {a.newton_max_iter}")
    _check(math.isfinite(a.relax) and 1.0 <= a.relax < 2.0,
           f"algorithm.relax must be in [1, 2), got {a.relax!r}")
    for key in ("input_lam_scale", "hidden_lam_scale"):
        value = getattr(a, key)
        _check(math.isfinite(value) and value > 0,
               f"algorithm.{key} must be a positive number, got {value!r}")
    _check(a.restart_every >= 0,
           f"algorithm.restart_every must be >= 0 (0: never), got {a.restart_every}")
    _check(isinstance(a.restart_guard, bool),
           f"algorithm.restart_guard must be true or false, got {a.restart_guard!r}")
    if a.restart_every and a.restart_guard is True and \
            "restart_guard" in ALGORITHM_KEYS.get(a.name, ()):
        _check(a.schedule != "grow",
               "algorithm.restart_guard raises rho and beta when it rejects a restart, which "
               "algorithm.schedule=grow would override: use another schedule or "
               "algorithm.restart_guard=false")
        _check(a.adapt_factor > 1.0,
               "algorithm.restart_guard raises rho and beta by algorithm.adapt_factor when it "
               f"rejects a restart: it must be > 1, got {a.adapt_factor} (or set "
               "algorithm.restart_guard=false)")
    if a.backtrack_start is not None:
        _finite_pos("algorithm.backtrack_start", a.backtrack_start)
        _check(a.step == "backtracking", "algorithm.backtrack_start is where the backtracking "
               "search starts: it needs algorithm.step=backtracking (lipschitz starts from the "
               "exact curvature), got algorithm.step=lipschitz")
    _check(a.output_init in OUTPUT_INITS, f"algorithm.output_init must be one of "
           f"{', '.join(OUTPUT_INITS)}, got {a.output_init!r}")
    _finite_pos("algorithm.lr", a.lr)
    _check(0 <= a.momentum < 1, f"algorithm.momentum must be in [0, 1), got {a.momentum}")
    _check(a.batch_size >= 0, f"algorithm.batch_size must be >= 0, got {a.batch_size}")
    _finite_pos("algorithm.weight_decay", a.weight_decay, allow_zero=True)

    _check(m.kind in ("resnet", "mlp"), f"model.kind must be resnet or mlp, got {m.kind!r}")
    _check(m.depth >= 2, f"model.depth must be >= 2 (input and output layer), got {m.depth}")
    _check(m.depth <= MAX_DEPTH, f"model.depth must be <= {MAX_DEPTH}, got {m.depth}")
    _check(m.width >= 1, f"model.width must be >= 1, got {m.width}")
    _check(m.width <= MAX_WIDTH, f"model.width must be <= {MAX_WIDTH}, got {m.width}")
    _check(m.activation in ACTIVATIONS,
           f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {m.activation!r}")
    _check(0 < m.leaky_slope < 1, f"model.leaky_slope must be in (0, 1), got {m.leaky_slope}")
    _check(m.loss in ("auto", "mse", "cross_entropy"),
           f"model.loss must be auto, mse or cross_entropy, got {m.loss!r}")
    _finite_pos("model.residual_scale", m.residual_scale, allow_zero=True)
    _check(m.init in INITS, f"model.init must be one of {', '.join(INITS)}, got {m.init!r}")
    _finite_pos("model.init_std", m.init_std)

    _check(d.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}, got {d.name!r}")
    if d.name == "csv":
        _check(bool(d.path), "data.path is required with data=csv (data.path=FILE)")
        _check(bool(d.target), "data.target is required with data=csv (data.target=COLUMN)")
        _check(d.task in ("regression", "classification"),
               f"data.task must be regression or classification with data=csv, got {d.task!r}")
    elif d.task is not None:
        _check(d.task in ("regression", "classification"),
               f"data.task must be regression or classification, got {d.task!r}")
    _check(d.seed is None or 0 <= d.seed <= MAX_SEED,
           f"data.seed must be in [0, {MAX_SEED}] (2**32 - 1) or null, got {d.seed}")
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
    _check(0 <= r.seed <= MAX_SEED, f"run.seed must be in [0, {MAX_SEED}] (2**32 - 1), "
           f"got {r.seed}")
    _check(r.eval_every >= 1, f"run.eval_every must be >= 1, got {r.eval_every}")
    _finite_pos("run.tol_primal", r.tol_primal, allow_zero=True)
    _finite_pos("run.tol_dual", r.tol_dual, allow_zero=True)
    _check(r.window >= 0, f"run.window must be >= 0, got {r.window}")
    _check(r.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {r.checkpoint_every}")
    _finite_pos("run.diverge_factor", r.diverge_factor)
    _check(r.dtype in DTYPES, f"run.dtype must be one of {', '.join(DTYPES)}, got {r.dtype!r}")
    _check(r.stall_iterations >= 0,
           f"run.stall_iterations must be >= 0 (0: off), got {r.stall_iterations}")

    _check(c.kind in CLUSTERS, f"cluster.kind must be one of {', '.join(CLUSTERS)}, got {c.kind!r}")
    _check(math.isfinite(c.in_process_mb) and c.in_process_mb >= 0,
           f"cluster.in_process_mb must be a finite number >= 0 (0: off), got {c.in_process_mb}")
    if c.kind == "address":
        _check(bool(c.address), "cluster.address is required with cluster=address "
               "(cluster.address=tcp://host:8786)")
        problem = _address_problem(str(c.address))
        _check(problem is None, f"cluster.address must be [scheme://]host:port with scheme "
               f"{', '.join(ADDRESS_SCHEMES)} and port 1..65535, e.g. "
               f"cluster.address=tcp://host:8786; got {c.address!r} ({problem})")
    _check(c.n_workers >= 1, f"cluster.n_workers must be >= 1, got {c.n_workers}")
    _check(c.threads_per_worker >= 1,
           f"cluster.threads_per_worker must be >= 1, got {c.threads_per_worker}")
    _check(c.blas_threads >= 1, f"cluster.blas_threads must be >= 1, got {c.blas_threads}")
    _check(c.placement in PLACEMENTS, f"cluster.placement must be one of "
           f"{', '.join(PLACEMENTS)}, got {c.placement!r}")
    _check(_memory_limit_ok(c.memory_limit),
           "cluster.memory_limit must be auto, a number of bytes, a fraction in (0, 1] of the "
           f"machine's memory or a size such as 4GB or '512 MiB', got {c.memory_limit!r}")
    _finite_pos("cluster.connect_timeout", c.connect_timeout)

    _check(s.state in ("zarr", "memory"), f"storage.state must be zarr or memory, got {s.state!r}")
    _check(s.chunk_size == "auto" or (isinstance(s.chunk_size, numbers.Integral)
                                      and not isinstance(s.chunk_size, bool)
                                      and s.chunk_size >= 0),
           f"storage.chunk_size must be auto or an integer >= 0, got {s.chunk_size!r}")
    if r.resume:
        _check(bool(s.url), "run.resume=true needs storage.url=<the state store to resume>")
        _check(not s.overwrite, "storage.overwrite=true contradicts run.resume=true: resume "
               "continues the store at storage.url, overwrite replaces it (drop one)")
    if r.resume or r.checkpoint_every:
        ok = c.kind != "reference" and s.state == "zarr" and a.name in ADMM_ALGORITHMS
        _check(ok, "checkpoints and resume need the Zarr-resident engine: an ADMM algorithm "
               f"({', '.join(ADMM_ALGORITHMS)}), storage.state=zarr and a Dask cluster (not "
               "cluster=reference)")
    _check(s.compressor in ("none", "zstd", "blosc"),
           f"storage.compressor must be none, zstd or blosc, got {s.compressor!r}")
    return cfg


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]")


def _address_problem(address: str) -> str | None:
    """Why ``address`` is not a Dask scheduler address ``[scheme://]host:port`` (None: it is).

    ``inproc://`` addresses (``inproc://ip/pid/n``) name an in-process scheduler and have no
    port; any non-empty location is accepted for them.
    """
    rest = address
    if "://" in address:
        scheme, rest = address.split("://", 1)
        if scheme.lower() not in ADDRESS_SCHEMES:
            return f"unknown scheme {scheme!r}"
        if scheme.lower() == "inproc":
            return None if rest and not any(ch.isspace() for ch in rest) else "no location"
    host, sep, port = rest.rpartition(":")
    if not sep:
        return "no port"
    if not host:
        return "no host"
    if not (_HOSTNAME.fullmatch(host) or _IPV6.fullmatch(host)):
        return f"bad host {host!r}" + ("; write an IPv6 host in brackets" if ":" in host else "")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not an integer in 1..65535"
    return None


def _memory_limit_ok(value: Any) -> bool:
    """``value`` is a worker memory limit Dask accepts: ``auto``, a number (bytes, or a fraction
    in (0, 1] of the machine's memory) or a size string (``4GB``, ``512 MiB``), and positive."""
    text = str(value)
    if text == "auto":
        return True
    if not text.strip():
        return False  # dask.utils.parse_bytes("") is 1
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        return math.isfinite(number) and number > 0
    size = _parse_bytes(text)
    return size is not None and size > 0


# Byte units as Dask reads a memory_limit (decimal k/M/G/T/P, binary Ki/Mi/Gi/Ti/Pi, optional B,
# any case); this module does not import Dask.
_BYTE_UNITS = {"": 1, "b": 1, **{f"{p}{b}": 1000 ** (i + 1) for i, p in enumerate("kmgtp")
                                 for b in ("", "b")},
               **{f"{p}i{b}": 1024 ** (i + 1) for i, p in enumerate("kmgtp") for b in ("", "b")}}


def _parse_bytes(text: str) -> int | None:
    """Bytes of a size such as ``4GB``, ``512 MiB``, ``1e6`` or ``MB`` (what Dask's
    ``parse_bytes`` accepts); None if it is not one."""
    s = text.replace(" ", "")
    if not any(ch.isdigit() for ch in s):
        s = "1" + s
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    try:
        number = float(s[:i])
    except ValueError:
        return None
    unit = _BYTE_UNITS.get(s[i:].lower())
    if unit is None or not math.isfinite(number):
        return None
    return int(number * unit)


# ------------------------------------------------------------------------------------------
# resources


def _gib(nbytes: float) -> str:
    """``nbytes`` in GiB, short: 0.031, 18.2, 512, 7.3e3."""
    g = nbytes / 2**30
    if g >= 1000:
        mantissa, exponent = f"{g:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if g >= 100:
        return f"{g:.0f}"
    if g >= 0.1:
        return f"{g:.1f}"
    return f"{g:.2g}"


def _weight_count(cfg: Config, d_in: int, d_out: int) -> int:
    """Entries of the weight matrices (bias columns included) of the configured network."""
    m = cfg.model
    b = int(m.bias)
    first = m.width * (d_in + b)
    hidden = (m.depth - 2) * m.width * (m.width + b)
    last = d_out * (m.width + b)
    return first + hidden + last


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return None
    try:
        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - an unusual platform: no check
        return None


def _store_location(url: str | None, default_store: str | None) -> tuple[str, Path | None]:
    """Where the Zarr state store goes: ("memory", None), ("disk", its local path) or
    ("remote", None) for an fsspec URL this machine cannot measure."""
    target = url or default_store
    if target is None:
        return "disk", Path.cwd() / "state.zarr"
    if "://" in target:
        scheme, rest = target.split("://", 1)
        if scheme == "memory":
            return "memory", None
        if scheme != "file":
            return "remote", None
        target = rest
    path = Path(target).expanduser()
    return "disk", path if path.is_absolute() else Path.cwd() / path


def _free_disk(path: Path) -> tuple[Path, int] | None:
    """The nearest existing directory at or above ``path`` and its free bytes."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir():
        probe = probe.parent
    try:
        return probe, int(shutil.disk_usage(probe).free)
    except OSError:
        return None


def state_bytes(cfg: Config, n_train: int) -> int:
    """The sample-sized ADMM state in bytes, estimated in float64: :data:`STATE_VARIABLES` x
    depth x width x ``n_train``."""
    m = cfg.model
    return 8 * STATE_VARIABLES * m.depth * m.width * n_train


def check_resources(cfg: Config, n_train: int, n_test: int, d_in: int, d_out: int, *,
                    default_store: str | os.PathLike | None = None) -> None:
    """Refuse a run that cannot fit this machine; raise :class:`ConfigError` (one line, with the
    estimate and what is available in GiB).

    The estimate (float64, no allocation): the weights, rows x cols summed over the layers
    (bias columns included), counted :data:`WEIGHT_COPIES` times; the sample-sized ADMM state,
    :data:`STATE_VARIABLES` x depth x width x n_train; the data, (d_in + d_out) x (n_train +
    n_test). The state is held in memory by the reference engine and by the in-memory Dask
    engines of this machine (not by the workers of ``cluster=address``); the Zarr-resident
    engine keeps :data:`STORE_SLOTS` copies of it in its store: in memory for a ``memory://``
    store, else on disk, checked when the store is a local path (``storage.url``, else
    ``default_store``, else the current directory; the nearest existing parent directory is
    measured; an existing store is not checked). Baseline algorithms (adam, sgd) hold no ADMM
    state.
    """
    m, a, c, s = cfg.model, cfg.algorithm, cfg.cluster, cfg.storage
    key = f"model.width={m.width}, model.depth={m.depth}"
    weights = WEIGHT_COPIES * 8 * _weight_count(cfg, d_in, d_out)
    data = 8 * (d_in + d_out) * (n_train + n_test)
    state = state_bytes(cfg, n_train)
    available = _available_memory()

    if available is not None and weights > available:
        raise ConfigError(f"{key}: the weights alone need {_gib(weights)} GiB, this machine has "
                          f"{_gib(available)} GiB available")

    in_memory = 0  # state bytes held in this machine's memory
    on_disk = 0
    kind, store_path = "none", None
    if a.name in ADMM_ALGORITHMS:
        if c.kind != "reference" and s.state == "zarr":
            default = None if default_store is None else str(default_store)
            kind, store_path = _store_location(s.url, default)
            if kind == "memory":
                in_memory = STORE_SLOTS * state
            elif kind == "disk":
                on_disk = STORE_SLOTS * state
        elif c.kind != "address":
            kind, in_memory = "memory", state

    need = weights + in_memory + data
    if available is not None and need > available:
        hint = "lower model.width, model.depth or data.n_train"
        if kind == "memory":  # (only an ADMM state is ever "memory")
            hint += (", or keep the state on disk (a Dask cluster, storage.state=zarr, "
                     "storage.url=PATH)")
        raise ConfigError(
            f"{key}, {n_train} training samples: the run needs {_gib(need)} GiB of memory "
            f"(weights {_gib(weights)}, ADMM state {_gib(in_memory)}, data {_gib(data)} GiB), "
            f"this machine has {_gib(available)} GiB available; {hint}"
        )

    if on_disk and store_path is not None and not store_path.exists():
        free = _free_disk(store_path)
        if free is not None and on_disk > free[1]:
            url = s.url if s.url else "null"
            raise ConfigError(
                f"storage.url={url}: the ADMM state store for {key}, {n_train} training "
                f"samples needs {_gib(on_disk)} GiB on disk, {free[0]} has {_gib(free[1])} GiB "
                "free; choose another storage.url or lower model.width, model.depth or "
                "data.n_train"
            )
