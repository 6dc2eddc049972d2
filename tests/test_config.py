"""The Hydra config groups in conf/ compose into valid typed configs, and bad values are refused."""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf

from daskadmm.config import (
    ADMM_ALGORITHMS,
    ALGORITHM_KEYS,
    ALGORITHM_OVERRIDES,
    ALGORITHM_VARIANTS,
    BASELINE_ALGORITHMS,
    AlgorithmConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    StorageConfig,
    algorithm_defaults,
    from_mapping,
    variant_config,
)

CONF_DIR = Path(str(importlib.resources.files("daskadmm.conf")))
GROUP_SCHEMA = {
    "algorithm": AlgorithmConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "cluster": ClusterConfig,
    "storage": StorageConfig,
}
# Options that validation refuses without these (their YAML leaves them null on purpose).
REQUIRED_EXTRA = {
    ("data", "csv"): ["data.path=some.csv", "data.target=y", "data.task=regression"],
    ("cluster", "address"): ["cluster.address=tcp://127.0.0.1:8786"],
}


def _group_files() -> list[tuple[str, str]]:
    out = []
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        if group_dir.name.startswith(("_", ".")) or group_dir.name == "experiment":
            continue
        for f in sorted(group_dir.glob("*.yaml")):
            out.append((group_dir.name, f.stem))
    return out


# algorithm variants (conf/algorithm/<variant>.yaml, global package) are tested on their own
GROUP_FILES = [(g, o) for g, o in _group_files()
               if not (g == "algorithm" and o in ALGORITHM_VARIANTS)]
VARIANT_FILES = [o for g, o in _group_files() if g == "algorithm" and o in ALGORITHM_VARIANTS]
EXPERIMENTS = sorted(f.stem for f in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _hydra():
    GlobalHydra.instance().clear()
    with initialize_config_module("daskadmm.conf", version_base=None):
        yield
    GlobalHydra.instance().clear()


def build(*overrides: str) -> Config:
    cfg = compose("config", list(overrides))
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return from_mapping(container)


def test_groups_found():
    groups = {g for g, _ in GROUP_FILES}
    assert groups == set(GROUP_SCHEMA)
    assert {"radmm3", "radmm3l", "radmm2", "dladmm", "pdadmm", "adam", "sgd"} <= {
        o for g, o in GROUP_FILES if g == "algorithm"
    }
    assert {"wine_red_radmm3", "digits_radmm3"} <= set(EXPERIMENTS)


def test_default_config():
    cfg = build()
    assert cfg.algorithm.name == "radmm3a"
    assert cfg.model.kind == "resnet"
    assert cfg.data.name == "digits"
    assert cfg.cluster.kind == "local"  # the embedded default: a LocalCluster of processes
    assert cfg.storage.url is None
    assert cfg.experiment is None
    # every default comes from the schema (the dataclasses), and the YAML repeats none of it
    assert cfg == Config()
    assert "run" not in yaml.safe_load((CONF_DIR / "config.yaml").read_text())


def test_composed_config_has_every_key():
    """``daskadmm --cfg job`` shows the whole schema: every section, every key, in order."""
    raw = OmegaConf.to_container(compose("config", []), resolve=True)
    raw.pop("hydra", None)
    assert raw == Config().to_dict()
    assert list(raw["algorithm"]) == [f.name for f in dataclasses.fields(AlgorithmConfig)]


@pytest.mark.parametrize(("group", "option"), GROUP_FILES, ids=[f"{g}/{o}" for g, o in GROUP_FILES])
def test_group_option_composes_and_validates(group, option):
    cfg = build(f"{group}={option}", *REQUIRED_EXTRA.get((group, option), []))
    section = getattr(cfg, group)
    name_key = {"algorithm": "name", "data": "name", "model": "kind", "cluster": "kind"}.get(group)
    if name_key is not None:
        assert getattr(section, name_key) == option
    # each option file lists only what it changes: schema keys whose value differs from the
    # schema's default (the option's own name excepted), nothing else
    raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}
    schema = dataclasses.asdict(GROUP_SCHEMA[group]())
    assert set(raw) <= set(schema)
    repeated = {k for k, v in raw.items() if k != name_key and v == schema[k]}
    assert not repeated, f"{group}/{option}.yaml repeats the schema's defaults of {repeated}"
    if name_key is not None:
        assert raw[name_key] == option
    for key, value in raw.items():
        assert getattr(section, key) == value


@pytest.mark.parametrize("name", ADMM_ALGORITHMS + BASELINE_ALGORITHMS)
def test_algorithm_option_is_its_defaults(name):
    """``algorithm=<name>`` composes to :func:`algorithm_defaults` (what the estimators use),
    and its file holds exactly ``name`` plus :data:`ALGORITHM_OVERRIDES`."""
    assert build(f"algorithm={name}").algorithm == algorithm_defaults(name)
    raw = yaml.safe_load((CONF_DIR / "algorithm" / f"{name}.yaml").read_text())
    assert raw == {"name": name, **ALGORITHM_OVERRIDES.get(name, {})}


def test_every_variant_has_its_file():
    assert VARIANT_FILES == sorted(ALGORITHM_VARIANTS)


@pytest.mark.parametrize("name", sorted(ALGORITHM_VARIANTS))
def test_variant_option_is_its_preset(name):
    """``algorithm=<variant>`` composes to :func:`variant_config` (every other key at the
    schema's default) and keeps the algorithm's own name; its file holds exactly the variant's
    keys, each one differing from the schema; the other groups still apply on top."""
    assert build(f"algorithm={name}") == variant_config(name)
    raw = yaml.safe_load((CONF_DIR / "algorithm" / f"{name}.yaml").read_text())
    assert raw == ALGORITHM_VARIANTS[name]
    assert raw["algorithm"]["name"] in ADMM_ALGORITHMS
    schema = Config().to_dict()
    # variant_config starts from the schema's own AlgorithmConfig(), not from the default
    # algorithm's overrides (a radmm3a variant must list radmm3a's)
    schema["algorithm"] = dataclasses.asdict(AlgorithmConfig())
    repeated = {f"{sec}.{k}" for sec, values in raw.items() for k, v in values.items()
                if k != "name" and v == schema[sec][k]}
    assert not repeated, f"algorithm/{name}.yaml repeats the schema's defaults of {repeated}"
    cfg = build(f"algorithm={name}", "model=mlp", "model.width=9")
    assert (cfg.model.kind, cfg.model.width) == ("mlp", 9)
    for sec, values in raw.items():
        for k, v in values.items():
            assert getattr(getattr(cfg, sec), k) == v


def test_dladmm_published_is_the_authors_settings():
    # github.com/xianggebenben/dlADMM, MLP/pytorch_version/main.py: rho = 1e-06, tau = theta
    # = 1, `rho = np.minimum(10 * rho, 0.1)` (and tau, theta x10) when train_cost rose at three
    # consecutive iterations, W and b ~ torch.normal(std=0.1), z3 = +-1 from the labels, u = 0;
    # no regulariser, nu = rho
    cfg = build("algorithm=dladmm_published")
    a, m = cfg.algorithm, cfg.model
    assert a.name == "dladmm" and a.rho == 1e-6 and a.nu is None and a.lam == 0.0
    assert (a.schedule, a.rise_count, a.adapt_factor, a.rho_max) == ("rises", 3, 10.0, 0.1)
    assert cfg.run.eval_every == 1  # the loss is seen every iteration, as theirs
    assert (a.step, a.backtrack_start, a.output_init) == ("backtracking", 1.0, "labels")
    assert (m.init, m.init_std) == ("normal", 0.1)
    exp = build("experiment=dladmm_mnist_published")
    assert exp.algorithm == a and (exp.model.init, exp.model.init_std) == ("normal", 0.1)
    assert exp.run.eval_every == 1


def test_radmm3a_restarts_is_radmm3a_with_restarts():
    # the variant's file replaces radmm3a's: every other key must stay radmm3a's
    assert build("algorithm=radmm3a_restarts") == build(
        "algorithm=radmm3a", "algorithm.rho=1", "algorithm.restart_every=3")
    a = variant_config("radmm3a_restarts").algorithm
    assert (a.name, a.rho, a.beta, a.restart_every, a.restart_guard) == (
        "radmm3a", 1.0, 1.0, 3, True)


def test_unknown_variant():
    with pytest.raises(ConfigError, match="nope"):
        variant_config("nope")


def _reads_comment(text: str) -> list[str]:
    """The keys of the ``# reads: a, b,`` comment (continued on ``#   c, d`` lines)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# reads:"))
    words = lines[start][len("# reads:"):]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        words += " " + line[1:]
    return [w.strip() for w in words.split(",")]


@pytest.mark.parametrize("name", ADMM_ALGORITHMS + BASELINE_ALGORITHMS)
def test_algorithm_file_documents_what_it_reads(name):
    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    assert set(ALGORITHM_KEYS[name]) <= fields - {"name"}
    assert set(ALGORITHM_OVERRIDES.get(name, {})) <= set(ALGORITHM_KEYS[name])
    text = (CONF_DIR / "algorithm" / f"{name}.yaml").read_text()
    assert _reads_comment(text) == list(ALGORITHM_KEYS[name])


def test_every_algorithm_key_is_read_by_some_algorithm():
    assert set(ALGORITHM_KEYS) == set(ADMM_ALGORITHMS + BASELINE_ALGORITHMS)
    read = {k for keys in ALGORITHM_KEYS.values() for k in keys}
    assert read == {f.name for f in dataclasses.fields(AlgorithmConfig)} - {"name"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = build(f"experiment={name}")
    assert cfg.experiment == name
    # experiments still take overrides on top
    cfg = build(f"experiment={name}", "model.width=7")
    assert cfg.model.width == 7


def test_experiment_overrides_groups():
    cfg = build("experiment=wine_red_radmm3")
    assert cfg.data.name == "wine_red"
    assert cfg.algorithm.name == "radmm3"


def test_csv_requires_path_target_task():
    with pytest.raises(ConfigError, match="data.path"):
        build("data=csv")


def test_address_requires_address():
    with pytest.raises(ConfigError, match="cluster.address"):
        build("cluster=address")


# The user-facing keys are a contract.
CONTRACT = [
    ("algorithm=pdadmm", lambda c: c.algorithm.name == "pdadmm"),
    ("algorithm.rho=2.5", lambda c: c.algorithm.rho == 2.5),
    ("algorithm.beta=3", lambda c: c.algorithm.beta == 3.0),
    ("algorithm.tau=0.01", lambda c: c.algorithm.tau == 0.01),
    ("algorithm.lam=0", lambda c: c.algorithm.lam == 0.0),
    ("model.depth=7", lambda c: c.model.depth == 7),
    ("model.width=33", lambda c: c.model.width == 33),
    ("model.activation=tanh", lambda c: c.model.activation == "tanh"),
    ("data=wine_white", lambda c: c.data.name == "wine_white"),
    ("data.path=/some/where.csv", lambda c: c.data.path == "/some/where.csv"),
    ("run.iterations=5", lambda c: c.run.iterations == 5),
    ("run.seed=11", lambda c: c.run.seed == 11),
    ("run.eval_every=3", lambda c: c.run.eval_every == 3),
]


@pytest.mark.parametrize(("override", "check"), CONTRACT, ids=[o for o, _ in CONTRACT])
def test_contract_key_overridable(override, check):
    assert check(build(override))


def test_mnist_subsampled():
    for name in ("mnist", "fashion_mnist"):
        cfg = build(f"data={name}")
        assert (cfg.data.n_train, cfg.data.n_test) == (10000, 2000)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algorithm.rho=-1"], "algorithm.rho"),
        (["algorithm.beta=0"], "algorithm.beta"),
        (["model.depth=1"], "model.depth"),
        (["model.activation=foo"], "model.activation"),
        (["model.width=abc"], "model.width"),
        (["data=csv"], "data.path"),
        (["data=csv", "data.path=x.csv"], "data.target"),
        (["run.iterations=0"], "run.iterations"),
        (["+model.foo=3"], "model.foo"),
        (["+algorithm.nonexistent=1"], "algorithm.nonexistent"),
        (["algorithm.schedule=sometimes"], "algorithm.schedule"),
        (["algorithm.rise_count=0"], "algorithm.rise_count"),
        (["algorithm.backtrack_start=0"], "algorithm.backtrack_start"),
        (["algorithm.backtrack_start=1", "algorithm.step=lipschitz"],
         "algorithm.backtrack_start"),
        (["algorithm.output_init=zeros"], "algorithm.output_init"),
        (["algorithm.hidden_lam_scale=0"], "algorithm.hidden_lam_scale"),
        (["algorithm.hidden_lam_scale=.nan"], "algorithm.hidden_lam_scale"),
        (["algorithm.input_lam_scale=-1"], "algorithm.input_lam_scale"),
        (["algorithm.restart_every=-1"], "algorithm.restart_every"),
        (["algorithm.restart_guard=sometimes"], "algorithm.restart_guard"),
        (["algorithm.restart_every=3", "algorithm.schedule=grow"], "algorithm.restart_guard"),
        (["algorithm.restart_every=3", "algorithm.adapt_factor=1"], "algorithm.restart_guard"),
        (["model.init=uniform"], "model.init"),
        (["model.init_std=0"], "model.init_std"),
    ],
)
def test_bad_value_names_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        build(*overrides)
    assert "\n" not in str(info.value)


def test_unknown_key_without_plus_is_refused_by_hydra():
    with pytest.raises(HydraException, match="model.foo"):
        build("model.foo=3")


def test_unknown_key_in_mapping():
    data = Config().to_dict()
    data["model"]["foo"] = 3
    with pytest.raises(ConfigError, match=r"model\.foo"):
        from_mapping(data)
    with pytest.raises(ConfigError, match="bogus"):
        from_mapping({"bogus": {}})


def test_sweep_value_needs_multirun():
    with pytest.raises(HydraException, match="multirun"):
        build("model.depth=4,8")


def test_numpy_float_scalars_become_python_floats():
    """A NumPy float scalar in any section (a scikit-learn grid's) is a Python float after
    validation: NumPy 2 would compute float32 arrays with a float64 scalar in float64."""
    import numpy as np

    from daskadmm.config import Config, validate

    cfg = Config()
    cfg.algorithm.rho, cfg.algorithm.relax = np.float64(0.5), np.float32(1.5)
    cfg.model.residual_scale = np.float64(0.3)
    validate(cfg)
    for value, expected in ((cfg.algorithm.rho, 0.5), (cfg.model.residual_scale, 0.3),
                            (cfg.algorithm.relax, 1.5)):
        assert type(value) is float and value == expected


def test_the_restart_guard_checks_only_algorithms_that_restart():
    """The guard's checks (not with schedule=grow, adapt_factor > 1) apply where it acts: an
    algorithm without restarts takes the same keys (as a sweep over methods passes them)."""
    cfg = build("algorithm=dladmm", "algorithm.restart_every=3", "algorithm.schedule=grow")
    assert cfg.algorithm.name == "dladmm"
    cfg = build("algorithm.restart_every=3", "algorithm.restart_guard=false",
                "algorithm.schedule=grow")
    assert cfg.algorithm.restart_guard is False
