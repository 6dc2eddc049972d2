"""The Zarr store that holds a run's state: layout, chunk I/O, checkpoints, resume, the model.

Layout (Zarr v3, any store URL: a local path, ``memory://name`` for tests, any fsspec URL)::

    attrs       schema, schema_version, config, algorithm, arch, n, chunk_size, n_chunks,
                owner (the run writing it), checkpoint {iteration, slot} (the last complete one),
                history (metrics records up to the checkpoint), schedule (penalty state), status
    data/       X, Y (training data), X_test, Y_test: samples chunked like the state
    live/b<i>/  the working state of block i, double-buffered by iteration parity: the
                sample-sized variables (RADMM: U, V, Lam; pdADMM: z, q, p, u and the scratch
                ql; dlADMM: z, a, u) have shape (slots, rows, n), chunked
                (1, rows, chunk_size). Iteration k reads slot (k-1) % 2 and writes slot k % 2
                (dlADMM has a third slot for its backward sweep). The small W (d x d) and the
                scalars travel through the task graph as values.
    ckpt/<s>/b<i>/  two checkpoint slots s in {a, b}: the state variables chunked like live,
                and W (one chunk); the scalars go in the checkpoint attribute
    model/      W1..WN of the final model (plain float64 arrays) with the architecture and the
                data normalisation in its attributes: readable with plain zarr, no pickle.

Only the driver writes attributes; tasks write whole, chunk-aligned pieces (one writer per
chunk), which Zarr's local store commits atomically (write + rename). A checkpoint is committed
by one attribute write after every array of its slot is complete, alternating between the two
slots, so a process killed at any moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Model",
    "StateStore",
    "StoreError",
    "chunk_slices",
    "load_model",
]

SCHEMA = "daskadmm-state"
SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The state store cannot be used. The message is one line and names the store."""


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    """Sample ranges of the chunks: ``chunk_size`` samples each (0: one chunk), last uneven."""
    if chunk_size <= 0 or chunk_size >= n:
        return [slice(0, n)]
    return [slice(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def _open_group(url: str, mode: str):
    import zarr

    try:
        return zarr.open_group(url, mode=mode)
    except FileNotFoundError:
        raise StoreError(f"no state store at {url}") from None
    except Exception as exc:  # zarr raises several types for foreign/corrupt stores
        raise StoreError(f"cannot open state store {url}: {type(exc).__name__}: {exc}") \
            from None


def _pid_alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell: assume alive
    try:
        os.kill(int(owner["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def _array(group, path: str, shape, chunks, dtype="f8", compressor: str = "none"):
    compressors = None
    if compressor == "zstd":
        from zarr.codecs import ZstdCodec

        compressors = [ZstdCodec(level=1)]
    elif compressor == "blosc":
        from zarr.codecs import BloscCodec

        compressors = [BloscCodec()]
    return group.create_array(path, shape=shape, chunks=chunks, dtype=dtype,
                              compressors=compressors, fill_value=0.0, overwrite=True)


@dataclass
class Model:
    """A trained network as stored in ``model/``: enough to predict on raw features."""

    arch: Any
    weights: list[np.ndarray]
    task: str
    x_mean: np.ndarray | None = None
    x_scale: np.ndarray | None = None
    y_mean: np.ndarray | None = None
    classes: list | None = None
    feature_names: list[str] | None = None
    target_names: list[str] | None = None

    def predict(self, X_raw: np.ndarray) -> np.ndarray:
        """Predict from raw features, **samples as rows** (``n x d0``): class labels for
        classification, values in original units for regression (``n x dy``)."""
        from .model import predict

        X = np.asarray(X_raw, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.arch.d_in:
            raise ValueError(f"expected {self.arch.d_in} features per row, got shape {X.shape}")
        if self.x_mean is not None:
            X = (X - self.x_mean) / self.x_scale
        out = predict(self.arch, self.weights, X.T)
        if self.task == "classification":
            idx = out.argmax(axis=0)
            return np.asarray(self.classes)[idx] if self.classes is not None else idx
        if self.y_mean is not None:
            out = out + self.y_mean[:, None]
        return out.T


class StateStore:
    """One run's state store (see the module docstring for the layout)."""

    def __init__(self, url: str, group):
        self.url = url
        self.group = group

    # -- creation and locking ----------------------------------------------------------------
    @classmethod
    def create(cls, url: str, *, meta: dict[str, Any], owner: str) -> StateStore:
        """Create a new store (refuses to touch an existing one)."""
        import zarr

        try:
            existing = zarr.open_group(url, mode="r")
        except Exception:
            existing = None
        if existing is not None:
            attrs = dict(existing.attrs)
            if attrs.get("schema") == SCHEMA:
                raise StoreError(f"state store {url} already exists: resume it with "
                                 "run.resume=true or choose another storage.url")
            if len(list(existing.keys())) or attrs:
                raise StoreError(f"{url} holds something that is not a daskadmm state store")
        group = _open_group(url, "w")
        group.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **meta,
                            "checkpoint": None, "history": [], "status": "running",
                            "owner": cls._owner_record(owner)})
        return cls(url, group)

    @classmethod
    def open(cls, url: str, *, owner: str | None = None, mode: str = "r+") -> StateStore:
        """Open an existing store; with ``owner``, take it over (refuses while another live
        run holds it)."""
        group = _open_group(url, "r" if owner is None and mode == "r" else "r+")
        attrs = dict(group.attrs)
        if attrs.get("schema") != SCHEMA:
            raise StoreError(f"{url} is not a daskadmm state store (no '{SCHEMA}' schema "
                             "attribute)")
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{url} has state schema version {attrs.get('schema_version')}, "
                             f"this daskadmm reads version {SCHEMA_VERSION}")
        store = cls(url, group)
        if owner is not None:
            cur = attrs.get("owner")
            if cur and attrs.get("status") == "running" and _pid_alive(cur):
                raise StoreError(f"state store {url} is in use by run {cur.get('run_id')} "
                                 f"(pid {cur.get('pid')} on {cur.get('host')}): a second run "
                                 "may not write to it")
            group.attrs.update({"owner": cls._owner_record(owner), "status": "running"})
        return store

    @staticmethod
    def _owner_record(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.time()}

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def release(self, status: str) -> None:
        self.group.attrs.update({"status": status, "owner": None})

    # -- arrays ----------------------------------------------------------------------------
    def write_data(self, arrays: dict[str, np.ndarray], chunk_size: int,
                   compressor: str = "none") -> None:
        for name, a in arrays.items():
            cs = a.shape[1] if chunk_size <= 0 else min(chunk_size, a.shape[1])
            arr = _array(self.group, f"data/{name}", a.shape, (a.shape[0], max(1, cs)),
                         compressor=compressor)
            arr[...] = a

    def create_state(self, layout: list[dict[str, tuple]], n: int, chunk_size: int,
                     compressor: str = "none", slots: int = 2) -> None:
        """``layout[i-1]`` maps variable name -> row shape for block i; a trailing ``"n"``
        marks a sample-sized variable (chunked along samples; ``slots`` live copies)."""
        cs = n if chunk_size <= 0 else min(chunk_size, n)
        for b, variables in enumerate(layout, start=1):
            for name, shape in variables.items():
                if shape and shape[-1] == "n":
                    rows = tuple(shape[:-1])
                    full = (*rows, n)
                    chunks = (*rows, cs)
                else:
                    full = chunks = tuple(shape)
                if shape and shape[-1] == "n":  # small ones (W) travel in the graph
                    _array(self.group, f"live/b{b}/{name}", (slots, *full), (1, *chunks),
                           compressor=compressor)
                for s in ("a", "b"):
                    _array(self.group, f"ckpt/{s}/b{b}/{name}", full, chunks or (1,),
                           compressor=compressor)

    def array(self, path: str):
        return self.group[path]

    def read(self, path: str, sl: slice | None = None, slot: int | None = None) -> np.ndarray:
        arr = self.group[path]
        idx: tuple = () if slot is None else (slot,)
        if sl is not None:
            idx = (*idx, ..., sl)
        return np.asarray(arr[idx] if idx else arr[...])

    def write(self, path: str, value: np.ndarray, sl: slice | None = None,
              slot: int | None = None) -> None:
        arr = self.group[path]
        idx: tuple = () if slot is None else (slot,)
        if sl is not None:
            idx = (*idx, ..., sl)
        if idx:
            arr[idx] = value
        else:
            arr[...] = value

    # -- checkpoints -----------------------------------------------------------------------
    def next_checkpoint_slot(self) -> str:
        cp = self.attrs.get("checkpoint")
        return "b" if cp and cp.get("slot") == "a" else "a"

    def write_checkpoint_states(self, slot: str, states: list[dict[str, np.ndarray]]) -> None:
        """Write whole block states into checkpoint slot ``slot`` (driver side)."""
        for b, st in enumerate(states, start=1):
            for name, value in st.items():
                self.write(f"ckpt/{slot}/b{b}/{name}", np.asarray(value, dtype=np.float64))

    def commit_checkpoint(self, iteration: int, slot: str, history: list[dict],
                          schedule: dict[str, Any], small: list[dict] | None = None) -> None:
        """Record "iteration k complete in slot s": the single atomic commit point. ``small``:
        per-block scalars of the state (curvatures, pending penalties), stored exactly (JSON
        floats round-trip float64)."""
        self.group.attrs.update({"checkpoint": {"iteration": iteration, "slot": slot,
                                                "time": time.time(), "small": small},
                                 "history": _jsonable(history), "schedule": schedule})

    def checkpoint(self) -> dict[str, Any] | None:
        return self.attrs.get("checkpoint")

    def read_checkpoint_states(self, layout: list[dict[str, tuple]]) -> tuple[int, list[dict]]:
        cp = self.checkpoint()
        if not cp:
            raise StoreError(f"state store {self.url} has no complete checkpoint to resume "
                             "from")
        states = []
        for b, variables in enumerate(layout, start=1):
            st = {}
            for name in variables:
                v = self.read(f"ckpt/{cp['slot']}/b{b}/{name}")
                st[name] = v if v.ndim else np.float64(v)
            states.append(st)
        return int(cp["iteration"]), states

    # -- the final model -------------------------------------------------------------------
    def save_model(self, arch, weights: list[np.ndarray], *, task: str, metric: str,
                   x_mean=None, x_scale=None, y_mean=None, classes=None, feature_names=None,
                   target_names=None) -> None:
        for i, W in enumerate(weights, start=1):
            arr = _array(self.group, f"model/W{i}", W.shape, W.shape)
            arr[...] = W
        extra = {}
        for name, v in (("x_mean", x_mean), ("x_scale", x_scale), ("y_mean", y_mean)):
            if v is not None:
                arr = _array(self.group, f"model/{name}", np.shape(v), np.shape(v))
                arr[...] = np.asarray(v, dtype=np.float64)
                extra[name] = True
        self.group["model"].attrs.update({
            "arch": asdict(arch), "task": task, "metric": metric,
            "classes": None if classes is None else [_py(c) for c in classes],
            "feature_names": list(feature_names) if feature_names else None,
            "target_names": list(target_names) if target_names else None,
            "depth": len(weights), **{f"has_{k}": v for k, v in extra.items()}})


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_model(url: str) -> Model:
    """Load the final model of a run from its state store (plain zarr arrays, no pickle)."""
    from .model import Architecture

    store = StateStore.open(url, mode="r")
    if "model" not in store.group:
        raise StoreError(f"state store {url} holds no final model (the run did not finish)")
    mg = store.group["model"]
    attrs = dict(mg.attrs)
    try:
        arch = Architecture(**attrs["arch"])
        weights = [np.asarray(mg[f"W{i}"][...]) for i in range(1, int(attrs["depth"]) + 1)]
    except (KeyError, TypeError) as exc:
        raise StoreError(f"state store {url} has a corrupt model group: {exc}") from None
    for i, W in enumerate(weights, start=1):
        if W.shape != arch.weight_shape(i):
            raise StoreError(f"state store {url}: model/W{i} has shape {W.shape}, expected "
                             f"{arch.weight_shape(i)}")

    def opt(name):
        return np.asarray(mg[name][...]) if attrs.get(f"has_{name}") else None

    return Model(arch, weights, attrs.get("task", "regression"), opt("x_mean"), opt("x_scale"),
                 opt("y_mean"), attrs.get("classes"), attrs.get("feature_names"),
                 attrs.get("target_names"))


def dataset_meta(ds) -> dict[str, Any]:
    """What a stored model needs from the data set to predict on raw features."""
    return {"x_mean": ds.x_mean, "x_scale": ds.x_scale, "y_mean": ds.y_mean,
            "classes": ds.classes, "feature_names": ds.feature_names or None,
            "target_names": ds.target_names or None}


def save_model_store(url: str, arch, weights: list[np.ndarray], ds, metric: str,
                     meta: dict[str, Any]) -> None:
    """A store holding only the final model (for engines that keep their state in memory)."""
    store = StateStore.create(url, meta=meta, owner="model")
    store.save_model(arch, weights, task=ds.task, metric=metric, **dataset_meta(ds))
    store.release("complete")
