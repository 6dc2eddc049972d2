"""The import directions the layout promises: Hydra (and OmegaConf) only in the CLI, Zarr only
in the storage layer, Dask and distributed only in the engines, PyTorch only in the backprop
baseline, Numba only in the compiled kernels. Checked on every module's source (imports
inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "daskadmm"

# library -> the modules allowed to import it
ALLOWED = {
    "hydra": {"cli"},
    "omegaconf": {"cli"},
    "zarr": {"storage"},
    # the engines and the out-of-core input adapter
    "dask": {"engines.driver", "engines.executors", "engines.cluster", "lazy"},
    "distributed": {"engines.driver", "engines.executors", "engines.cluster"},
    "torch": {"baseline"},
    "numba": {"splitting.fused"},  # the optional compiled kernels
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_checked():
    assert len(MODULES) > 20 and any(p.name == "driver.py" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_import_directions(path):
    name = str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
    for library in sorted(_imports(path) & set(ALLOWED)):
        assert name in ALLOWED[library], f"daskadmm.{name} imports {library}"


# Only the front ends read the whole run configuration: api.fit (which hands the Dask engines a
# daskadmm.engine_options.EngineOptions, the baseline its AlgorithmConfig and three run
# settings), the CLI and the estimators (which build a Config), config itself (the schema) and
# the package's __init__ (which re-exports it). The section dataclasses (ClusterConfig,
# StorageConfig, AlgorithmConfig, ...) may be imported anywhere. outputs.py takes the config as
# a plain dict (what its summary stores) and the plot flag, so it needs no Config either.
READS_CONFIG = {"api", "cli", "config", "estimator", "__init__"}


def _config_uses(path: Path) -> list[str]:
    """Where a module imports ``Config`` from daskadmm.config or reads ``<x>.Config``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (
                (node.level == 1 and node.module == "config")
                or (node.level == 0 and node.module == "daskadmm.config")):
            found += [f"line {node.lineno}: imports Config" for alias in node.names
                      if alias.name in ("Config", "*")]
        elif isinstance(node, ast.Attribute) and node.attr == "Config":
            found.append(f"line {node.lineno}: reads .Config")
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".")


BELOW_API = [p for p in MODULES if _name(p) not in READS_CONFIG]


def test_the_front_ends_exist():
    assert READS_CONFIG <= {_name(p) for p in MODULES}
    assert len(BELOW_API) > 20


@pytest.mark.parametrize("path", BELOW_API, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_front_ends_read_the_whole_config(path):
    uses = _config_uses(path)
    assert not uses, f"daskadmm.{_name(path)} uses the whole Config: {'; '.join(uses)}"


def test_the_config_check_sees_an_import(tmp_path):
    """The check above finds each way a module can reach Config."""
    for text in ("from .config import ClusterConfig, Config\n",
                 "from daskadmm.config import Config as C\n",
                 "from . import config\nx: config.Config\n"):
        module = tmp_path / "m.py"
        module.write_text(text)
        assert _config_uses(module), text
    module.write_text("from .config import ClusterConfig, StorageConfig\n")
    assert not _config_uses(module)


def _private_imports(path: Path) -> list[str]:
    """Imports of another package's private modules (a component starting with ``_``, such as
    ``hydra._internal``): they change without notice between releases."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"line {node.lineno}: {n}" for n in names
                  if any(part.startswith("_") and part != "__future__"
                         for part in n.split("."))]
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_imports_of_other_packages(path):
    assert _private_imports(path) == []


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from hydra._internal.utils import get_args_parser\nimport os\n")
    assert _private_imports(bad) == ["line 1: hydra._internal.utils"]
