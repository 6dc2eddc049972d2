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
    AlgorithmConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    StorageConfig,
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
    ("algorithm", "radmm3a"): ["cluster=reference"],  # the Dask engines do not run it yet
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
    # the run section is complete and typed
    assert set(yaml.safe_load((CONF_DIR / "config.yaml").read_text())["run"]) == {
        f.name for f in dataclasses.fields(RunConfig)
    }


@pytest.mark.parametrize(("group", "option"), GROUP_FILES, ids=[f"{g}/{o}" for g, o in GROUP_FILES])
def test_group_option_composes_and_validates(group, option):
    cfg = build(f"{group}={option}", *REQUIRED_EXTRA.get((group, option), []))
    section = getattr(cfg, group)
    name_key = {"algorithm": "name", "data": "name", "model": "kind", "cluster": "kind"}.get(group)
    if name_key is not None:
        assert getattr(section, name_key) == option
    # each option file is a full section: every schema key, nothing else
    raw = yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text())
    assert set(raw) == {f.name for f in dataclasses.fields(GROUP_SCHEMA[group])}


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
