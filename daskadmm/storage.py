"""The Zarr store that holds a run's state: layout, chunk I/O, checkpoints, resume, the model.

Layout (Zarr v3, any store URL: a local path, ``memory://name`` for tests, any fsspec URL)::

    attrs       schema, schema_version, config (of the run that created the store),
                determinants (every setting that determines the iterates), arithmetic (the
                revision of the updates' arithmetic it was made with), data_sha256 and
                data_checksums (identity and integrity of the stored data), algorithm, arch, n,
                chunk_size, n_chunks, ready (data and state arrays complete), owner (the run
                writing it: run id, pid, process start time, host), status
    checkpoint.json  the manifest of the last complete checkpoint: iteration, slot, metrics
                history, penalty-schedule state, per-block scalars, the determinants and one
                checksum per checkpoint chunk; replaced atomically (write, then rename)
    data/       X, Y (training data), X_test, Y_test: samples chunked like the state
    live/b<i>/  the working state of block i, double-buffered by iteration parity: the
                sample-sized variables (RADMM: U, V, Lam, and RADMM-3A's Gam; pdADMM: z,
                q, p, u and the scratches ql and g (slot 0 only); dlADMM: z, a, u and the
                scratch g) have shape (slots, rows, n), chunked (1, rows, chunk_size).
                Iteration k reads slot (k-1) % 2 and writes slot k % 2 (dlADMM has a third
                slot for its backward sweep, the only one its g uses; g is a gradient a
                first pass computes for the second, never checkpointed). The small W
                (d x d) and the scalars travel through the task graph as values.
    ckpt/<s>/b<i>/  two checkpoint slots s in {a, b}: the state variables chunked like live,
                and W (one chunk)
    model/      W1..WN of the final model (plain float64 arrays) with the architecture and the
                data normalisation in its attributes: readable with plain zarr, no pickle.

Safety rules:

- A new store is only created at a path that does not exist or is an empty directory. An
  existing daskadmm store is replaced only on request (``overwrite``), and anything else is
  never touched.
- A checkpoint is one atomic commit: the manifest is the only thing that says which slot holds
  which iteration, and it carries a checksum of every chunk of that slot. The runner never
  writes the slot a committed manifest points to (at most one checkpoint is in flight, and it
  goes into the other slot). Resume verifies every checksum and refuses a damaged or missing
  chunk instead of reading zeros.
- Symbolic links inside a local store are refused (a store made by someone else must not make
  a run write outside it).

Chunk I/O: the per-chunk tasks read and write whole chunk files of a local, uncompressed store
themselves (:class:`ChunkIO`, the same bytes Zarr writes; every other store, codec or selection
goes through Zarr). Only the live state is overwritten in place, and only a regular file of the
right size with no other link; everything else is written to a new file and renamed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import stat
import time
import uuid
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import StoreError

__all__ = [
    "ChunkIO",
    "MANIFEST",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Model",
    "StateStore",
    "StoreError",
    "checksum",
    "chunk_slices",
    "array_fingerprints",
    "chunk_fingerprint",
    "chunk_io",
    "combine_digest",
    "data_digest",
    "load_model",
]

SCHEMA = "daskadmm-state"
SCHEMA_VERSION = 2
MANIFEST = "checkpoint.json"
# what a daskadmm store directory may hold (anything else: not ours to delete)
LOCK_FILE = ".lock"  # a local store's lock: flock()ed by the run writing it
STORE_ENTRIES = frozenset({"zarr.json", "data", "live", "ckpt", "model", MANIFEST, LOCK_FILE})


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    """Sample ranges of the chunks: ``chunk_size`` samples each (0: one chunk), last uneven."""
    if chunk_size <= 0 or chunk_size >= n:
        return [slice(0, n)]
    return [slice(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def _sample_chunks(arr) -> list[slice]:
    """The sample ranges of a stored array's chunks (its last axis)."""
    n, cs = arr.shape[-1], arr.chunks[-1]
    return chunk_slices(n, cs if cs < n else 0)


def checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's float64 values (C order): what checkpoints record per chunk."""
    return zlib.crc32(np.ascontiguousarray(a, dtype=np.float64).data)


def chunk_fingerprint(a: np.ndarray) -> tuple[bytes, int]:
    """SHA-256 and CRC-32 of one data chunk's float64 values (C order)."""
    b = np.ascontiguousarray(a, dtype=np.float64)
    return hashlib.sha256(b.data).digest(), zlib.crc32(b.data)


def array_fingerprints(a: np.ndarray, chunk_size: int) -> tuple[list[bytes], list[int]]:
    """SHA-256 and CRC-32 of each store chunk (``chunk_size`` samples) of an in-memory array,
    from one pass over it."""
    pairs = [chunk_fingerprint(a[:, sl]) for sl in chunk_slices(a.shape[1], chunk_size)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def combine_digest(parts: dict[str, tuple[tuple[int, ...], list[bytes]]]) -> str:
    """The data set's digest from each array's shape and its chunks' SHA-256 (in order)."""
    h = hashlib.sha256()
    for name in sorted(parts):
        shape, digests = parts[name]
        h.update(f"{name}{tuple(shape)}{len(digests)}".encode())
        for d in digests:
            h.update(d)
    return h.hexdigest()


def data_digest(arrays: dict[str, np.ndarray], chunk_size: int = 0) -> str:
    """SHA-256 over the names, shapes and float64 values of the training and test data, chunk
    by chunk along the samples (``chunk_size`` as the store's): the identity of a data set (a
    resumed run must train on the same one). A lazy (Dask) array gets the same digest from its
    chunks' fingerprints without being gathered (:func:`combine_digest`)."""
    return combine_digest({name: (a.shape, array_fingerprints(a, chunk_size)[0])
                           for name, a in arrays.items()})


def local_path(url: str) -> Path | None:
    """The directory of a local store URL (a plain path or ``file://``), else None."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url)


def _zarr_target(url: str) -> str:
    """What Zarr opens for ``url``: a ``file://`` URL as its path (Zarr's fsspec route for it
    cannot create a store), anything else as given."""
    return str(local_path(url)) if url.startswith("file://") else url


def _open_group(url: str, mode: Literal["r", "r+", "w", "w-"]):
    import zarr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "checkpoint.json is not a Zarr component"
            return zarr.open_group(_zarr_target(url), mode=mode)
    except FileNotFoundError:
        raise StoreError(f"no state store at {url}") from None
    except PermissionError:
        raise StoreError(f"state store {url} is not writable (permission denied)") from None
    except Exception as exc:  # zarr raises several types for foreign/corrupt stores
        raise StoreError(f"cannot open state store {url}: {type(exc).__name__}: {exc}") \
            from None


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def lock_holder_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the run recorded in ``owner`` still runs: True / False, or None when this
    host cannot tell (another host)."""
    if owner.get("host") != socket.gethostname():
        return None
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = owner.get("pid_start")
    now = _process_start(pid)
    if start is not None and now is not None and abs(now - float(start)) > 1.0:
        return False  # the pid was reused by another process
    return True


def _flock(root: Path, create: bool) -> int | None:
    """Take the store's lock file (an exclusive ``flock``, released by the kernel when the
    holder dies, so no lock outlives its run on this machine). Returns the open descriptor,
    None if another live process holds it; -1 when there is no lock file and ``create`` is
    False (nobody on this machine holds it)."""
    import fcntl

    lock = root / LOCK_FILE
    if not create and not lock.exists():
        return -1
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unflock(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing releases the flock


def _is_store_dir(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("attributes") or {}).get("schema") == SCHEMA


def _foreign_files(root: Path) -> str | None:
    """The first file under a store directory that is not part of a daskadmm store: Zarr
    metadata (``zarr.json``), chunks (under a ``c/`` directory), the manifest, the lock file
    and Zarr's unfinished atomic writes (``*.partial``)."""
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = rel_dir / name
            if name == "zarr.json" or name.endswith(".partial"):
                continue
            if rel_dir == Path(".") and name in (MANIFEST, LOCK_FILE):
                continue
            if rel_dir.parts and rel_dir.parts[0] in STORE_ENTRIES and "c" in rel_dir.parts:
                continue
            return str(rel)
    return None


def _check_no_links(root: Path, url: str) -> None:
    """Refuse symbolic links (and anything but files and directories) inside a local store."""
    if root.is_symlink():
        raise StoreError(f"state store {url} is a symbolic link: give its real path")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise StoreError(f"state store {url} contains a symbolic link "
                                 f"({p.relative_to(root)}): refusing to use it")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise StoreError(f"state store {url} contains {p.relative_to(root)}, which is "
                                 "not a regular file: refusing to use it")


def _check_writable(root: Path, url: str) -> None:
    for dirpath, _dirnames, _filenames in os.walk(root, followlinks=False):
        if not os.access(dirpath, os.W_OK | os.X_OK):
            raise StoreError(f"state store {url} is read-only ({dirpath} is not writable)")


def _array(group, path: str, shape, chunks, dtype="f8", compressor: str = "none"):
    compressors: list[Any] | None = None
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
        self.broken_lock: dict[str, Any] | None = None  # the owner whose lock this run broke
        self._lock_fd: int | None = None

    # -- creation and locking ----------------------------------------------------------------
    @classmethod
    def check_new(cls, url: str, *, overwrite: bool = False) -> bool:
        """Check, without writing anything, that a new store may be created at ``url``: a
        path that does not exist or an empty directory, or (``overwrite``) an existing
        daskadmm store that no live run holds. Returns whether an existing store will be
        replaced. Raises :class:`StoreError` for anything else."""
        path = local_path(url)
        if path is not None:
            if path.is_symlink():
                raise StoreError(f"storage.url={url} is a symbolic link: give a real path")
            if not path.exists():
                parent = next((p for p in path.absolute().parents if p.exists()), None)
                if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
                    raise StoreError(f"cannot create state store {url}: {parent} is not "
                                     "writable")
                return False
            if not path.is_dir():
                raise StoreError(f"storage.url={url} is a file, not a state store directory: "
                                 "nothing was changed")
            entries = sorted(e.name for e in path.iterdir())
            if not entries:
                return False
            if not _is_store_dir(path):
                raise StoreError(f"storage.url={url} is a directory that is not empty and not "
                                 "a daskadmm state store: give a new or empty directory "
                                 "(nothing was changed)")
            existing_attrs = json.loads((path / "zarr.json").read_text()).get("attributes")
        else:
            import zarr

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    existing_attrs = dict(zarr.open_group(_zarr_target(url), mode="r").attrs)
            except Exception:
                return False  # nothing readable there: "w-" below refuses anything else
            if existing_attrs.get("schema") != SCHEMA:
                raise StoreError(f"storage.url={url} holds something that is not a daskadmm "
                                 "state store (nothing was changed)")
        if not overwrite:
            raise StoreError(f"state store {url} already exists: continue it with "
                             "run.resume=true, replace it with storage.overwrite=true, or "
                             "choose another storage.url")
        owner = existing_attrs.get("owner")
        if path is not None:
            fd = _flock(path, create=False)
            held = fd is None
            _unflock(fd)
        else:
            held = bool(owner) and lock_holder_alive(owner) is not False
        if owner and existing_attrs.get("status") == "running" and \
                owner.get("host") != socket.gethostname():
            held = True  # another host's run: this host cannot tell
        if held:
            who = f"run {owner.get('run_id')} (pid {owner.get('pid')} on {owner.get('host')})" \
                if owner else "another run"
            raise StoreError(f"state store {url} is in use by {who}: not replacing it")
        if path is None:
            raise StoreError(f"storage.overwrite=true replaces local stores only: remove "
                             f"{url} yourself, or choose another storage.url")
        _check_no_links(path, url)
        foreign = _foreign_files(path)
        if foreign:
            raise StoreError(f"state store {url} also holds {foreign}, which daskadmm did not "
                             "write: not replacing it")
        _check_writable(path, url)
        return True

    @classmethod
    def create(cls, url: str, *, meta: dict[str, Any], owner: str,
               overwrite: bool = False) -> StateStore:
        """Create a new store at ``url`` (see :meth:`check_new` for what is refused)."""
        if cls.check_new(url, overwrite=overwrite):
            path = local_path(url)
            if path is not None:
                shutil.rmtree(path)
                group = _open_group(url, "w-")
            else:
                group = _open_group(url, "w")
        else:
            try:
                group = _open_group(url, "w-")
            except StoreError as exc:
                raise StoreError(f"cannot create state store {url}: it holds something "
                                 f"already ({exc})") from None
        store = cls(url, group)
        path = local_path(url)
        if path is not None:
            store._lock_fd = _flock(path, create=True)
            if store._lock_fd is None:
                raise StoreError(f"state store {url} was taken by another run while this one "
                                 "created it")
        group.update_attributes({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **meta,
                                 "ready": False, "status": "running",
                                 "store_id": uuid.uuid4().hex,
                                 "owner": cls._owner_record(owner)})
        return store

    @classmethod
    def open(cls, url: str, *, owner: str | None = None, mode: str = "r+",
             break_lock: bool = False, versions: tuple[int, ...] = (SCHEMA_VERSION,)
             ) -> StateStore:
        """Open an existing store; with ``owner``, take it over (refuses while another live
        run holds it; ``break_lock`` takes over a lock whose holder cannot be checked from
        here, and records whose lock it broke in :attr:`broken_lock`)."""
        path = local_path(url)
        writing = not (owner is None and mode == "r")
        if path is not None:
            if not path.exists():
                raise StoreError(f"no state store at {url}")
            if not path.is_dir():
                raise StoreError(f"{url} is a file, not a state store")
            if writing or mode == "check":
                _check_no_links(path, url)
                _check_writable(path, url)
        group = _open_group(url, "r+" if writing and mode != "check" else "r")
        attrs = dict(group.attrs)
        if attrs.get("schema") != SCHEMA:
            raise StoreError(f"{url} is not a daskadmm state store (no '{SCHEMA}' schema "
                             "attribute)")
        if attrs.get("schema_version") not in versions:
            raise StoreError(f"{url} has state schema version {attrs.get('schema_version')}, "
                             f"this daskadmm reads version {SCHEMA_VERSION}")
        store = cls(url, group)
        if owner is not None:
            if path is not None:
                store._lock_fd = _flock(path, create=True)
                if store._lock_fd is None:
                    raise StoreError(f"state store {url} is in use by {store._holder()}: a "
                                     "second run may not write to it")
            try:
                store.broken_lock = store.check_lock(break_lock, locked=path is not None)
            except BaseException:
                store.close()
                raise
            store.set_attrs({"owner": cls._owner_record(owner), "status": "running"})
        return store

    def _holder(self) -> str:
        cur = self.attrs.get("owner") or {}
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(cur.get("since") or 0)))
        return (f"run {cur.get('run_id')} (pid {cur.get('pid')} on {cur.get('host')}, "
                f"since {since})")

    def check_lock(self, break_lock: bool = False, locked: bool = False
                   ) -> dict[str, Any] | None:
        """Refuse (StoreError) if another run holds the store; writes nothing. Returns the
        lock that taking the store over would break (``break_lock``), else None.

        A local store's lock is its lock file's ``flock`` (``locked``: this process holds it;
        otherwise it is tested and let go): a run on this machine that died left no lock. A
        run recorded from another host cannot be checked from here: ``break_lock``."""
        attrs = self.attrs
        cur = attrs.get("owner")
        path = local_path(self.url)
        if path is not None and not locked:
            fd = _flock(path, create=False)
            _unflock(fd)
            if fd is None:
                raise StoreError(f"state store {self.url} is in use by {self._holder()}: a "
                                 "second run may not write to it")
        if not cur or attrs.get("status") != "running":
            return None
        if path is not None and cur.get("host") == socket.gethostname():
            return None  # its flock is free: that run is gone
        alive = lock_holder_alive(cur)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(cur.get("since") or 0)))
        who = (f"run {cur.get('run_id')} (pid {cur.get('pid')} on {cur.get('host')}, "
               f"since {since})")
        if alive is True:
            raise StoreError(f"state store {self.url} is in use by {who}: a second run may not "
                             "write to it")
        if alive is None and not break_lock:
            raise StoreError(f"state store {self.url} is locked by {who}, which this host "
                             "cannot check: if that run is gone, pass storage.break_lock=true")
        return dict(cur) if alive is None else None

    @staticmethod
    def _owner_record(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "pid_start": _process_start(os.getpid()), "since": time.time()}

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def ref(self) -> StoreRef:
        """What tasks name this store by: its URL and the id it was created with."""
        return StoreRef(self.url, str(self.group.attrs.get("store_id", "")))

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Update attributes in one write of the group's metadata."""
        try:
            self.group.update_attributes(values)
        except PermissionError:
            raise StoreError(f"state store {self.url} is not writable (permission denied)") \
                from None

    def release(self, status: str) -> None:
        """Record the run's end and let go of the lock."""
        try:
            self.set_attrs({"status": status, "owner": None})
        finally:
            self.close()

    def close(self) -> None:
        _unflock(getattr(self, "_lock_fd", None))
        self._lock_fd = None

    def drop_state(self) -> None:
        """Delete the data and the solver state (``data/``, ``live/``, ``ckpt/`` and the
        manifest), keeping the final model: what a finished run with no checkpoints needs.
        The store can no longer be resumed (``state_dropped`` in its attributes)."""
        from zarr.core.sync import sync

        self.set_attrs({"state_dropped": True, "ready": False})
        for name in ("data", "live", "ckpt"):
            if name in self.group:
                del self.group[name]
        sync(self.group.store.delete(MANIFEST))

    def holds_results(self) -> bool:
        """Whether the store holds a final model or a complete checkpoint (never deleted)."""
        return "model" in self.group or self.checkpoint() is not None

    # -- arrays ----------------------------------------------------------------------------
    def write_data(self, arrays: dict[str, np.ndarray], chunk_size: int,
                   compressor: str = "none", sums: dict[str, list[int]] | None = None) -> None:
        """Write the data arrays, chunked along samples, and record one checksum per chunk
        (verified on resume); ``sums``: those checksums if already computed (as
        :func:`array_fingerprints` gives them)."""
        if sums is None:
            sums = {name: [checksum(a[:, sl]) for sl in chunk_slices(a.shape[1], chunk_size)]
                    for name, a in arrays.items()}
        for name, a in arrays.items():
            self.data_target(name, a.shape, chunk_size, compressor, a.dtype)[...] = a
        self.record_data_checksums(sums)

    def data_target(self, name: str, shape: tuple[int, int], chunk_size: int,
                    compressor: str = "none", dtype: Any = "f8"):
        """A new data array ``data/<name>`` chunked along samples, for a writer that fills it
        chunk by chunk (the out-of-core input path writes each chunk from a Dask task)."""
        cs = shape[1] if chunk_size <= 0 else min(chunk_size, shape[1])
        return _array(self.group, f"data/{name}", shape, (shape[0], max(1, cs)),
                      dtype=dtype, compressor=compressor)

    def record_data_checksums(self, sums: dict[str, list[int]]) -> None:
        """Record the CRC-32 of every data chunk (what :meth:`verify_data` checks)."""
        self.set_attrs({"data_checksums": sums})

    def verify_data(self) -> None:
        """Read every stored data chunk back and compare it with its recorded checksum."""
        sums = self.attrs.get("data_checksums") or {}
        if not sums:
            raise StoreError(f"state store {self.url} records no data checksums")
        for name, expected in sums.items():
            arr = self._array_or_fail(f"data/{name}")
            slices = _sample_chunks(arr)
            if len(slices) != len(expected):
                raise StoreError(f"state store {self.url}: data/{name} has {len(slices)} "
                                 f"chunks, its record {len(expected)}")
            for c, (sl, want) in enumerate(zip(slices, expected, strict=True)):
                self._verify_chunk(arr, f"data/{name}", c, sl, want, "data chunk")

    def create_state(self, layout: list[dict[str, tuple]], n: int, chunk_size: int,
                     compressor: str = "none", slots: int = 2, dtype: Any = "f8") -> None:
        """``layout[i-1]`` maps variable name -> row shape for block i; a trailing ``"n"``
        marks a sample-sized variable (chunked along samples; ``slots`` live copies). Arrays
        are of ``dtype`` (the run's float type); scalars (shape ``()``: step sizes, penalties)
        stay float64 in every run."""
        cs = n if chunk_size <= 0 else min(chunk_size, n)
        for b, variables in enumerate(layout, start=1):
            for name, shape in variables.items():
                if shape and shape[-1] == "n":
                    rows = tuple(shape[:-1])
                    full = (*rows, n)
                    chunks = (*rows, cs)
                else:
                    full = chunks = tuple(shape)
                dt = dtype if shape else "f8"
                if shape and shape[-1] == "n":  # small ones (W) travel in the graph
                    _array(self.group, f"live/b{b}/{name}", (slots, *full), (1, *chunks),
                           dtype=dt, compressor=compressor)
                for s in ("a", "b"):
                    _array(self.group, f"ckpt/{s}/b{b}/{name}", full, chunks or (1,),
                           dtype=dt, compressor=compressor)

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

    def _array_or_fail(self, path: str):
        try:
            return self.group[path]
        except Exception as exc:
            raise StoreError(f"state store {self.url} is missing {path} "
                             f"({type(exc).__name__})") from None

    def _verify_chunk(self, arr, path: str, c: int, sl: slice | None, want: int,
                      what: str) -> None:
        """Compare one chunk's values with its recorded checksum. Zarr does not store a chunk
        that equals the fill value (0) and reads a missing chunk as zeros, so a missing chunk
        passes exactly when the recorded values were all zeros; otherwise it is refused."""
        from zarr.core.sync import sync

        coords = (0,) * arr.ndim if sl is None else (*((0,) * (arr.ndim - 1)), c)
        key = arr.metadata.encode_chunk_key(coords)
        try:
            values = np.asarray(arr[...] if sl is None else arr[..., sl])
        except Exception as exc:
            raise StoreError(f"state store {self.url}: {what} {path}/{key} cannot be read "
                             f"({type(exc).__name__})") from None
        if checksum(values) == want:
            return
        try:
            present = sync(self.group.store.exists(f"{path}/{key}"))
        except Exception:
            present = True
        state = "damaged (checksum mismatch)" if present else "missing"
        raise StoreError(f"state store {self.url}: {what} {path}/{key} is {state}; it cannot "
                         "be used exactly")

    # -- checkpoints -----------------------------------------------------------------------
    def commit_checkpoint(self, manifest: dict[str, Any]) -> None:
        """Commit a checkpoint: write its manifest in one atomic replace. ``manifest`` holds
        ``iteration``, ``slot``, ``checksums`` (``"b<i>/<name>"`` -> one CRC per chunk) and
        whatever the runner needs to continue (history, schedule, per-block scalars)."""
        from zarr.core.buffer import cpu
        from zarr.core.sync import sync

        body = json.dumps(_jsonable({**manifest, "time": time.time()}), allow_nan=False)
        try:
            sync(self.group.store.set(MANIFEST, cpu.Buffer.from_bytes(body.encode())))
        except PermissionError:
            raise StoreError(f"state store {self.url} is not writable (permission denied)") \
                from None

    def checkpoint(self) -> dict[str, Any] | None:
        """The committed manifest, or None when no checkpoint is complete."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = sync(self.group.store.get(MANIFEST, prototype=default_buffer_prototype()))
        if buf is None:
            return None
        try:
            cp = json.loads(buf.to_bytes())
            int(cp["iteration"])
            assert cp["slot"] in ("a", "b") and isinstance(cp["checksums"], dict)
        except Exception:
            raise StoreError(f"state store {self.url}: its checkpoint manifest {MANIFEST} is "
                             "damaged") from None
        return cp

    def next_checkpoint_slot(self) -> str:
        """The slot the next checkpoint goes into: never the committed one."""
        cp = self.checkpoint()
        return "b" if cp and cp.get("slot") == "a" else "a"

    def verify_checkpoint(self, layout: list[dict[str, tuple]]) -> dict[str, Any]:
        """Read every chunk of the committed checkpoint and compare it with the manifest's
        checksums; return the manifest. A missing or damaged chunk is a StoreError naming it."""
        cp = self.checkpoint()
        if cp is None:
            raise StoreError(f"state store {self.url} has no complete checkpoint")
        sums = cp["checksums"]
        for b, variables in enumerate(layout, start=1):
            for name, shape in variables.items():
                path = f"ckpt/{cp['slot']}/b{b}/{name}"
                want = sums.get(f"b{b}/{name}")
                if want is None:
                    raise StoreError(f"state store {self.url}: the checkpoint manifest has no "
                                     f"checksum for {path}")
                arr = self._array_or_fail(path)
                if shape and shape[-1] == "n":
                    slices: list[slice | None] = [*_sample_chunks(arr)]
                else:
                    slices = [None]
                if len(slices) != len(want):
                    raise StoreError(f"state store {self.url}: {path} has {len(slices)} chunks, "
                                     f"the manifest {len(want)}")
                for c, (sl, w) in enumerate(zip(slices, want, strict=True)):
                    self._verify_chunk(arr, path, c, sl, w, "checkpoint chunk")
        return cp

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


# Settings that do not change the iterates (and so may differ on resume) are left out:
# run.iterations, eval cadence, tolerances, divergence factor, window, checkpoint cadence,
# cluster, compressor, progress, plot. Data paths are left out too: the data's own digest
# stands for the data.
_BASELINE_KEYS = ("lr", "momentum", "batch_size", "weight_decay")
_DATA_LOCATION_KEYS = ("path", "cache_dir", "download")


# The revision of the updates' arithmetic, per loss: raised whenever a change to the library
# alters the iterates of a run with unchanged settings (an update's floating-point operations),
# so a store resumes only under the arithmetic that made it (anything else would give the
# iterates of neither). A store without the record counts as revision 1. cross_entropy 2: the
# output prox's Newton step solved by Sherman-Morrison instead of a dense LU per column.
ARITHMETIC: dict[str, int] = {"mse": 1, "cross_entropy": 2}


def arithmetic_revision(loss: str) -> int:
    """The revision of the arithmetic of runs with this loss (see :data:`ARITHMETIC`)."""
    return ARITHMETIC[loss]


def determinants(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine a run's iterates, flattened to ``section.key``: what a
    resumed run must share with the run that made the store."""
    out: dict[str, Any] = {}
    for key, v in cfg_dict["algorithm"].items():
        if key not in _BASELINE_KEYS:
            out[f"algorithm.{key}"] = v
    if "restart_guard" in cfg_dict["algorithm"]:
        # the guard acts only on restarts: without them any value gives the same iterates
        out["algorithm.restart_guard"] = bool(cfg_dict["algorithm"]["restart_guard"]) and \
            bool(cfg_dict["algorithm"].get("restart_every"))
    for key, v in cfg_dict["model"].items():
        out[f"model.{key}"] = v
    data = cfg_dict["data"]
    for key, v in data.items():
        if key not in _DATA_LOCATION_KEYS:
            out[f"data.{key}"] = v
    out["run.seed"] = cfg_dict["run"]["seed"]
    if cfg_dict["algorithm"].get("schedule") == "rises":
        # the rises schedule sees the training loss at the evaluations
        out["run.eval_every"] = cfg_dict["run"]["eval_every"]
    out["storage.chunk_size"] = cfg_dict["storage"]["chunk_size"]
    return _jsonable(out)


# Determining settings added after stores were first written, with the value that gives the
# iterates those stores were made with: a store without the key resumes when the setting has
# that value now, and is refused otherwise.
ADDED_DETERMINANTS: dict[str, Any] = {"algorithm.relax": 1.0, "algorithm.input_lam_scale": 1.0,
                                       "algorithm.hidden_lam_scale": 1.0,
                                       "algorithm.restart_every": 0,
                                       "algorithm.restart_guard": False}


def changed_determinants(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key (stored -> now)`` for every determining setting that differs (a key the stored
    settings predate counts as :data:`ADDED_DETERMINANTS` says)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a = stored.get(key, ADDED_DETERMINANTS.get(key, "<unset>"))
        b = now.get(key, "<unset>")
        if a != b:
            out.append(f"{key} ({a} -> {b})")
    return out


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

    store = StateStore.open(url, mode="r", versions=(1, SCHEMA_VERSION))
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
        if not np.all(np.isfinite(W)):
            raise StoreError(f"state store {url}: model/W{i} holds NaN or inf (the run "
                             "failed): refusing to predict with it")

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


@dataclass(frozen=True)
class StoreRef:
    """A store as tasks name it: its URL and the id it was created with. Worker processes
    cache open array handles per reference, so a store replaced at the same URL (a new id) is
    never written through a stale handle of the old one (other shapes, other chunks)."""

    url: str
    store_id: str = ""

    def __str__(self) -> str:
        return self.url


@functools.lru_cache(maxsize=8)
def _open_rw(ref: StoreRef | str):
    import zarr

    return zarr.open_group(_zarr_target(str(ref)), mode="r+")


@functools.lru_cache(maxsize=4096)
def array_handle(ref: StoreRef | str, path: str):
    """The array at ``path`` of the store ``ref``, opened read-write and cached per process
    (opening one reads its metadata, ~0.4 ms): what the per-chunk tasks read and write."""
    return _open_rw(ref)[path]


# Chunk I/O of the per-chunk tasks. Zarr's own path costs ~3.5x a plain file read and ~1.6x a
# plain (atomic) file write per 2 MB chunk, most of it the round trip to Zarr's event-loop thread;
# for what these tasks move (whole chunks of uncompressed little-endian arrays in a local store)
# the bytes of a chunk file are exactly the chunk's values in C order, so ChunkIO reads and
# writes such chunk files itself, the way Zarr's LocalStore does (missing file: the fill value;
# write to a temporary file in the same directory, then rename; unlike Zarr's default it also
# writes a chunk that is all fill value, which reads back the same), and leaves every other case
# (other stores, codecs, or selections) to Zarr. DIRECT_IO = False sends everything through Zarr.
#
# The live state (``live/``) is rewritten every iteration: an existing chunk file of the right
# size is overwritten in place (~25x faster than a new file and a rename: no new pages). A torn
# live chunk cannot be read: the graph orders every read after the write it needs, and after a
# kill or a lost worker the live state is restored from a checkpoint (or started afresh) before
# anything reads it. Checkpoints, data and the model are always written to a new file and
# renamed; a file with other links is never written in place.
DIRECT_IO = True


class ChunkIO:
    """Reads and writes whole chunks along the last (sample) axis of one array: ``read(sl,
    slot)`` is ``arr[slot, ..., sl]`` (``arr[..., sl]`` without a slot) and ``write`` its
    assignment, with the same bytes in the store as Zarr writes."""

    def __init__(self, arr, in_place: bool = False):
        self.arr = arr
        self.dtype = np.dtype(arr.dtype)
        self.root = self._direct_root(arr)
        self.in_place = in_place

    @staticmethod
    def _direct_root(arr) -> Path | None:
        """The array's directory when its chunks are plain files of C-order native values."""
        import sys

        from zarr.codecs import BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore

        m, dt = arr.metadata, np.dtype(arr.dtype)
        codecs: tuple[Any, ...] = tuple(getattr(m, "codecs", ()))
        ok = (m.zarr_format == 3 and isinstance(arr.store, LocalStore)
              and isinstance(m.chunk_key_encoding, DefaultChunkKeyEncoding)
              and isinstance(m.chunk_grid, RegularChunkGrid)
              and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
              and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
              and dt.isnative and arr.order == "C" and dt.kind == "f")
        return Path(arr.store.root) / arr.path if ok else None

    def _chunk(self, sl: slice, slot: int | None) -> tuple[Path, tuple[int, ...], int] | None:
        """The chunk file, its full shape and the selection's width, when ``(slot, ..., sl)``
        is exactly one chunk (the last one may be partial); None otherwise."""
        if self.root is None or not DIRECT_IO:
            return None
        shape, chunks = self.arr.shape, self.arr.chunks
        lead = 1 if slot is not None else 0
        if slot is not None and (chunks[0] != 1 or not 0 <= slot < shape[0]):
            return None
        if tuple(chunks[lead:-1]) != tuple(shape[lead:-1]):
            return None  # the rows are split into several chunks
        n, cs = shape[-1], chunks[-1]
        start, stop, step = sl.indices(n)
        if step != 1 or start % cs or stop != min(start + cs, n) or stop <= start:
            return None
        coords = (*((slot,) if slot is not None else ()), *(0,) * (len(shape) - 1 - lead),
                  start // cs)
        key = self.arr.metadata.chunk_key_encoding.encode_chunk_key(coords)
        return self.root / key, tuple(chunks[lead:]), stop - start

    def read(self, sl: slice, slot: int | None = None) -> np.ndarray:
        where = self._chunk(sl, slot)
        if where is None:
            arr = self.arr
            return np.asarray(arr[(slot, ..., sl)] if slot is not None else arr[..., sl])
        path, shape, width = where
        out = np.empty(shape, dtype=self.dtype)
        try:
            with open(path, "rb") as f:
                got = os.fstat(f.fileno()).st_size
                if got == out.nbytes:
                    got = f.readinto(out.data.cast("B"))
        except FileNotFoundError:  # never written, or written as all fill value
            out.fill(self.arr.metadata.fill_value)
            got = out.nbytes
        if got != out.nbytes:
            raise StoreError(f"chunk {path} has {got} bytes, expected {out.nbytes}")
        return out if width == shape[-1] else np.ascontiguousarray(out[..., :width])

    def write(self, sl: slice, value: np.ndarray, slot: int | None = None) -> None:
        where = self._chunk(sl, slot)
        if where is None:
            if slot is not None:
                self.arr[(slot, ..., sl)] = value
            else:
                self.arr[..., sl] = value
            return
        path, shape, width = where
        value = np.asarray(value)
        if value.shape != (*shape[:-1], width):
            raise ValueError(f"chunk of shape {(*shape[:-1], width)} given {value.shape}")
        if width == shape[-1]:
            buf = np.ascontiguousarray(value, dtype=self.dtype)
        else:  # the last chunk: Zarr stores it whole, the padding at the fill value
            buf = np.full(shape, self.arr.metadata.fill_value, dtype=self.dtype)
            buf[..., :width] = value
        if self.in_place and _overwrite(path, buf):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(buf.data.cast("B"))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _overwrite(path: Path, buf: np.ndarray) -> bool:
    """Write ``buf`` over the existing chunk file ``path`` in place; False (nothing written)
    unless it is a regular file of exactly that size with no other link."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != buf.nbytes:
            return False
        view = buf.data.cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        return True
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=4096)
def chunk_io(ref: StoreRef | str, path: str) -> ChunkIO:
    """:class:`ChunkIO` of the array at ``path`` of the store ``ref`` (cached per process); the
    live state's chunks are overwritten in place."""
    return ChunkIO(array_handle(ref, path), in_place=path.startswith("live/"))


def clear_handles() -> None:
    """Forget the cached store and array handles of this process."""
    _open_rw.cache_clear()
    array_handle.cache_clear()
    chunk_io.cache_clear()


def committed_slot(url: StoreRef | str) -> str | None:
    """The slot of the store's committed checkpoint (None: no checkpoint)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(_open_rw(url).store.get(MANIFEST, prototype=default_buffer_prototype()))
    return None if buf is None else json.loads(buf.to_bytes()).get("slot")


def save_model_store(url: str, arch, weights: list[np.ndarray], ds, metric: str,
                     meta: dict[str, Any], *, overwrite: bool = False) -> None:
    """A store holding only the final model (for engines that keep their state in memory);
    ``overwrite``: replace a daskadmm store already there (:meth:`StateStore.check_new`)."""
    store = StateStore.create(url, meta=meta, owner="model", overwrite=overwrite)
    store.save_model(arch, weights, task=ds.task, metric=metric, **dataset_meta(ds))
    store.release("complete")
