"""``daskadmm-predict``: predict with a trained model from its Zarr store.

    daskadmm-predict outputs/2026-11-23/14-42-02/state.zarr new_wines.csv --out pred.csv

The store is a run's ``state.zarr`` (Zarr-resident engine) or ``model.zarr`` (other engines).
The CSV needs the training features by name (extra columns, such as the target, are ignored);
the output has one row per input row: the predicted class, or the predicted value(s) in the
original units. ``--out`` is written whole or not at all (a temporary file renamed over it),
and may not be the input CSV, a directory, or a path inside the store.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import DataError, read_csv, write_atomically
from .errors import one_line
from .storage import StoreError, load_model

__all__ = ["main"]


def _features(table, names: list[str]) -> np.ndarray:
    missing = [f for f in names if f not in table.header]
    if missing:
        raise DataError(f"{table.path}: missing feature columns {', '.join(map(repr, missing))}")
    cols = []
    for f in names:
        cells = table.columns[table.header.index(f)]
        try:
            cols.append([float(c) for c in cells])
        except ValueError:
            raise DataError(f"{table.path}: column {f!r} is not numeric") from None
    X = np.array(cols, dtype=np.float64).T
    if not np.all(np.isfinite(X)):
        raise DataError(f"{table.path}: features contain NaN or inf")
    return X


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="daskadmm-predict", description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a run's state.zarr or model.zarr")
    ap.add_argument("csv", help="CSV file with the feature columns")
    ap.add_argument("--out", help="output CSV (default: standard output)")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.store)
        table = read_csv(args.csv)
        names = model.feature_names or table.header[: model.arch.d_in]
        pred = model.predict(_features(table, names))
    except (StoreError, DataError, ValueError) as exc:
        print(f"daskadmm-predict: error: {one_line(exc)}", file=sys.stderr)
        return 2
    text = io.StringIO(newline="")
    w = csv.writer(text)
    if model.task == "classification":
        w.writerow(["prediction"])
        w.writerows([[p] for p in pred])
    else:
        w.writerow(model.target_names or [f"y{j}" for j in range(pred.shape[1])])
        w.writerows([[repr(float(v)) for v in row] for row in pred])
    if not args.out:
        sys.stdout.write(text.getvalue())
        return 0
    try:
        _write_out(Path(args.out), text.getvalue(), Path(args.csv), args.store)
    except (OSError, ValueError) as exc:
        print(f"daskadmm-predict: error: --out {args.out}: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _write_out(out: Path, text: str, csv_path: Path, store: str) -> None:
    """``text`` into ``out`` through a temporary file in its directory, renamed over it (an
    existing ``out`` is replaced whole or left as it was). Refused (ValueError): the input
    CSV itself, a directory, a path inside a local store."""
    from .storage import local_path

    if out.is_dir():
        raise ValueError("is a directory")
    if out.exists() and csv_path.exists() and os.path.samefile(out, csv_path):
        raise ValueError("is the input CSV: give another path")
    root = local_path(store)
    if root is not None and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(root)):
        raise ValueError("is inside the model store: give another path")
    write_atomically(out, lambda fh: fh.write(text.encode("utf-8")), suffix=".partial")


if __name__ == "__main__":
    sys.exit(main())
