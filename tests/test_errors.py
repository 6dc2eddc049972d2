"""The error hierarchy (``daskadmm.errors``) and its one-line formatter."""

from __future__ import annotations

import pickle

import pytest

from daskadmm import errors
from daskadmm.errors import DaskadmmError, one_line

# (class name, the module that raises it and still exports it, its builtin base)
WHERE = [
    ("ConfigError", "daskadmm.config", ValueError),
    ("DataError", "daskadmm.data", ValueError),
    ("StoreError", "daskadmm.storage", RuntimeError),
    ("ClusterError", "daskadmm.engines.driver", RuntimeError),
    ("TorchMissingError", "daskadmm.baseline", ImportError),
    ("UsageError", "daskadmm.cli", Exception),
    ("ReportError", "daskadmm.report", Exception),
]


@pytest.mark.parametrize(("name", "module", "base"), WHERE)
def test_every_error_is_a_daskadmm_error_importable_where_it_was(name, module, base):
    import importlib

    cls = getattr(errors, name)
    assert issubclass(cls, DaskadmmError) and issubclass(cls, base)
    assert getattr(importlib.import_module(module), name) is cls
    exc = cls("x: bad")
    again = pickle.loads(pickle.dumps(exc))  # raised on Dask workers, so it must travel
    assert type(again) is cls and str(again) == "x: bad"


def test_public_namespace_exports_the_base():
    import daskadmm

    assert daskadmm.DaskadmmError is DaskadmmError
    assert daskadmm.ConfigError is errors.ConfigError


def test_one_line_collapses_whitespace_and_lines():
    assert one_line(ValueError("  a   b\n\n  c  d.\n")) == "a b c d."
    assert one_line("x\ty") == "x y"


def test_one_line_joins_a_one_item_a_line_list_with_commas():
    exc = RuntimeError("Could not find 'data/nope'\nAvailable options in 'data':\n\tcsv\n\tdigits"
                       "\n\tmnist\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf")
    assert one_line(exc) == ("Could not find 'data/nope' Available options in 'data': csv, "
                             "digits, mnist")


def test_one_line_names_the_type_when_asked_or_when_the_message_is_empty():
    assert one_line(OSError()) == "OSError"
    assert one_line(FileNotFoundError(2, "No such file"), with_type=True) == \
        "FileNotFoundError: [Errno 2] No such file"
    assert one_line(ValueError("bad"), with_type=False) == "bad"


# ------------------------------------------------------------------ the algorithm registry


def test_the_registry_holds_the_configs_algorithms():
    """One record per algorithm the configuration offers, each under its own name (its
    splitting's too); the registry imports every algorithm module, so a broken import fails
    at ``import daskadmm.algorithms`` with its own error, never as "unknown algorithm"."""
    from daskadmm.algorithms import ALGORITHMS
    from daskadmm.config import ADMM_ALGORITHMS

    assert sorted(ALGORITHMS) == sorted(ADMM_ALGORITHMS)
    for name, alg in ALGORITHMS.items():
        assert alg.name == name == alg.splitting.name


@pytest.mark.parametrize("name", ["no_such_algorithm", "../radmm3", "radmm3.x"])
def test_an_unknown_algorithm_is_a_value_error(name):
    from daskadmm.algorithms import get_algorithm

    with pytest.raises(ValueError, match="unknown ADMM algorithm .*known: radmm3, "):
        get_algorithm(name)


# ------------------------------------------------------------------------- PyTorch missing


def test_missing_torch_message(monkeypatch):
    """Runs with or without PyTorch installed (moved here from test_baseline.py, which is
    skipped without it); the helpers that built its inputs there are written out."""
    import sys

    import numpy as np

    from daskadmm import baseline
    from daskadmm.api import evaluator
    from daskadmm.config import Config
    from daskadmm.data import Dataset
    from daskadmm.model import Architecture, init_weights
    from daskadmm.monitor import Monitor

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError) as info:
        baseline.require_torch("adam")
    assert isinstance(info.value, baseline.TorchMissingError)
    assert str(info.value) == "algorithm=adam needs PyTorch: pip install 'daskadmm[torch]'"
    arch = Architecture(kind="resnet", depth=4, d_in=3, width=5, d_out=2, activation="relu",
                        leaky_slope=0.1, bias=True, loss="mse")
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3, 18))
    Y = np.tanh(rng.standard_normal((2, 3)) @ X)
    ds = Dataset(name="tiny", task="regression", X_train=X[:, :12], Y_train=Y[:, :12],
                 X_test=X[:, 12:], Y_test=Y[:, 12:])
    cfg = Config()
    cfg.algorithm.name = "sgd"
    cfg.run.iterations = 1
    cfg.run.eval_every = 1
    monitor = Monitor(iterations=1, eval_every=1, evaluate=evaluator(arch, ds))
    with pytest.raises(baseline.TorchMissingError, match="algorithm=sgd needs PyTorch"):
        baseline.fit(cfg.algorithm, arch, ds, init_weights(arch, np.random.default_rng(0)),
                     monitor)
