"""What the Dask engines read of a run's configuration: :class:`EngineOptions`.

Only :func:`daskadmm.api.fit` (and the CLI's checks) read the whole
:class:`~daskadmm.config.Config`; they hand the engines in :mod:`daskadmm.engines` this small,
typed object instead (built by :func:`daskadmm.api.engine_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ClusterConfig, StorageConfig

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """The settings a Dask engine (in-memory or Zarr-resident state) runs with.

    ``algorithm``: ``algorithm.name``. ``iterations``, ``window`` (0: chosen from the depth),
    ``checkpoint_every``, ``resume`` and ``dtype``: the ``run`` section's. ``cluster`` and
    ``storage``: those sections. ``config``: the whole configuration as a plain dict (kept in
    the state store's metadata); ``determinants``: the settings that determine the iterates
    (:func:`daskadmm.storage.determinants` of ``config``), which a resumed run must share with
    the run that made the store.
    """

    algorithm: str
    iterations: int
    window: int
    checkpoint_every: int
    resume: bool
    dtype: str
    cluster: ClusterConfig
    storage: StorageConfig
    config: dict[str, Any]
    determinants: dict[str, Any]
