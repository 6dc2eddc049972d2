"""daskadmm: train residual networks and MLPs with ADMM on Dask, state in chunked Zarr stores.

    from daskadmm import ADMMClassifier, Config, fit, load_model

    clf = ADMMClassifier(depth=4, width=64).fit(X, y)   # scikit-learn estimator, rows = samples

    cfg = Config()
    cfg.run.iterations = 30
    result = fit(cfg)               # a Result: weights, history, status
    model = load_model("outputs/2026-11-29/12-00-00/state.zarr")   # a run's saved model
"""

from importlib.metadata import PackageNotFoundError, version

from .api import fit, load_data
from .config import Config
from .errors import ConfigError, DaskadmmError, DataError, StoreError
from .estimator import ADMMClassifier, ADMMRegressor
from .result import Result
from .storage import Model, load_model

try:
    __version__ = version("daskadmm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["ADMMClassifier", "ADMMRegressor", "Config", "ConfigError", "DaskadmmError",
           "DataError", "Model", "Result", "StoreError", "__version__", "fit", "load_data",
           "load_model"]
