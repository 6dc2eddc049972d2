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


GROUP_FILES = _group_files()
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
    assert cfg.algorithm.name == "radmm3"
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
