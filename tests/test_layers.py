"""The import directions the layout promises: Hydra (and OmegaConf) only in the CLI, Zarr only
in the storage layer, Dask and distributed only in the engines, PyTorch only in the backprop
baseline. Checked on every module's source (imports inside functions count too)."""

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
    "dask": {"runner", "lazy"},  # the engine and its out-of-core input adapter
    "distributed": {"runner"},
    "torch": {"baseline"},
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
    assert len(MODULES) > 20 and any(p.name == "runner.py" for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_import_directions(path):
    name = str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
    for library in sorted(_imports(path) & set(ALLOWED)):
        assert name in ALLOWED[library], f"daskadmm.{name} imports {library}"
