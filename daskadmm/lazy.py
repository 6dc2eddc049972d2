"""Data larger than memory: Dask and Zarr arrays as input, never gathered on the client.

The estimators (:mod:`daskadmm.estimator`) accept ``X`` as a Dask or Zarr array. When the run
keeps its state in the Zarr store on a Dask cluster, ``X`` stays lazy all the way: the
standardisation statistics are sums of fixed row blocks computed where the data lives (the same
blocks and the same order of additions as for a NumPy ``X``, so both give bit-for-bit the same
model), the train/validation split is a lazy row selection, and the store's data arrays are
written chunk by chunk by Dask tasks, each with its fingerprint (SHA-256 for the data set's
digest, CRC-32 for the resume check) computed from the same chunk. Only small vectors (column
sums, per-chunk fingerprints) travel to the client. The in-memory engines need the data in
memory; for them :func:`materialise` reads it (the result says so).

This module and :mod:`daskadmm.engines` are the package's only Dask importers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import STAT_ROWS, Dataset, combine_column_parts, lazy_arrays

__all__ = ["as_dask", "column_moments", "fingerprints", "materialise", "predict_blocks",
           "write_data"]


def as_dask(X: Any):
    """``X`` as a Dask array if it is a Dask or Zarr array, else None (NumPy and the rest are
    the estimators' ordinary path)."""
    import dask.array as da

    if isinstance(X, da.Array):
        return X
    if type(X).__module__.split(".")[0] == "zarr" and hasattr(X, "chunks"):
        return da.from_zarr(X)
    return None


def _compute(client, *xs):
    import dask

    return dask.compute(*xs, scheduler=client if client is not None else "threads")


def _sum_rows(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float64).sum(axis=0)[None, :]


def _sq_dev_rows(block: np.ndarray, mean: np.ndarray) -> np.ndarray:
    d = np.ascontiguousarray(block, dtype=np.float64) - mean
    return (d * d).sum(axis=0)[None, :]


def column_moments(X, client=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column of the Dask array ``X`` (rows are samples),
    summed over blocks of :data:`~daskadmm.data.STAT_ROWS` rows in order, as
    :func:`daskadmm.data.column_moments` does for a NumPy array (bitwise the same values)."""
    n, d = X.shape
    Xb = X.astype(np.float64).rechunk({0: STAT_ROWS, 1: -1})
    nb = len(Xb.chunks[0])
    (sums,) = _compute(client, Xb.map_blocks(_sum_rows, chunks=((1,) * nb, (d,)),
                                             dtype=np.float64))
    mean = combine_column_parts(list(sums)) / n
    (sq,) = _compute(client, Xb.map_blocks(_sq_dev_rows, mean, chunks=((1,) * nb, (d,)),
                                           dtype=np.float64))
    return mean, np.sqrt(combine_column_parts(list(sq)) / n)


def _fingerprint_block(block: np.ndarray) -> np.ndarray:
    from .storage import chunk_fingerprint

    sha, crc = chunk_fingerprint(block)
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = (sha, crc)
    return out


def _by_store_chunks(a, chunk_size: int):
    """``a`` (``rows x n``) rechunked to the store's sample chunks (one chunk of all rows)."""
    cs = a.shape[1] if chunk_size <= 0 else min(chunk_size, a.shape[1])
    return a.rechunk({0: -1, 1: max(1, cs)})


def fingerprints(arrays: dict[str, Any], chunk_size: int, client=None
                 ) -> dict[str, tuple[tuple[int, ...], list[bytes], list[int]]]:
    """Per array: its shape, and the SHA-256 and CRC-32 of each of its store chunks (computed
    by tasks on the chunks: nothing but the fingerprints reaches the client)."""
    import dask.array as da

    from .storage import array_fingerprints

    out = {}
    lazy, graphs = [], []
    for name in sorted(arrays):
        a = arrays[name]
        if isinstance(a, da.Array):
            b = _by_store_chunks(a, chunk_size)
            lazy.append(name)
            graphs.append(b.map_blocks(_fingerprint_block,
                                       chunks=((1,), (1,) * len(b.chunks[1])), dtype=object))
        else:  # in memory already (the targets): fingerprinted here
            out[name] = (tuple(a.shape), *array_fingerprints(a, chunk_size))
    for name, fp in zip(lazy, _compute(client, *graphs), strict=True):
        pairs = list(fp[0])
        out[name] = (tuple(arrays[name].shape), [p[0] for p in pairs], [int(p[1]) for p in pairs])
    return out


def write_data(store, arrays: dict[str, Any], chunk_size: int, compressor: str,
               sums: dict[str, list[int]], client=None) -> None:
    """Write the data arrays into ``store``: NumPy ones directly, lazy ones chunk by chunk by
    Dask tasks (the store must be reachable from where they run); ``sums`` are the chunks'
    CRC-32 from :func:`fingerprints`."""
    import dask.array as da

    sources, targets = [], []
    for name, a in arrays.items():
        target = store.data_target(name, tuple(a.shape), chunk_size, compressor, a.dtype)
        if isinstance(a, da.Array):
            sources.append(_by_store_chunks(a, chunk_size))
            targets.append(target)
        else:
            target[...] = a
    if sources:
        da.store(sources, targets, lock=False, compute=True,
                 scheduler=client if client is not None else "threads")
    store.record_data_checksums(sums)


def materialise(ds: Dataset, client=None) -> Dataset:
    """``ds`` with every lazy array read into memory (for the in-memory engines)."""
    import dataclasses

    lazy = lazy_arrays(ds)
    if not lazy:
        return ds
    values = _compute(client, *lazy.values())
    arrays: dict[str, Any] = {k: np.ascontiguousarray(v, dtype=np.float64)
                              for k, v in zip(lazy, values, strict=True)}
    return dataclasses.replace(ds, **arrays)


def predict_blocks(X, fn, n_out: int | None, dtype=np.float64):
    """``fn`` applied to each block of rows of the Dask array ``X``: a lazy result with the
    same row chunks (``n_out`` columns, or 1-d when None)."""
    Xr = X.rechunk({1: -1})
    if n_out is None:
        return Xr.map_blocks(fn, drop_axis=1, dtype=dtype)
    return Xr.map_blocks(fn, chunks=(Xr.chunks[0], (n_out,)), dtype=dtype)
