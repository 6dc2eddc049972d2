"""What every algorithm's chunk tasks share on the Zarr-resident engine (NumPy only, no Dask).

A chunk task gets a :class:`ChunkTask` (the store, its sample range, the chunk index), reads
the chunks it needs with :func:`get_live` (and the data with ``_read``), calls the
algorithm's pure update functions on them and writes its chunks back with :func:`put_live`. An
algorithm's iteration plan appends its tasks through a :class:`PlanContext`, which the window
builder (:mod:`daskadmm.graph.chunked`) makes. Also here: the checkpoint copy and restore of a
chunk, the true forward pass on the stored data, one chunk at a time, and the reductions
every plan uses (:func:`sum_partials`, :func:`group_stats`).

**Two backends, one set of tasks.** With a store (``ChunkTask.url``) a task reads and writes
Zarr chunks. In the *dataflow* backend (the in-memory engine) there is no store: the graph
builder hands each task the values it declared it reads, as inputs (the outputs of the tasks
that wrote them, or the data chunks), and the task returns what it writes with its result
(:func:`run_flow`, :class:`Written`). A location is named as the builder names it:
``"b<i>/<var>/<slot>/c<c>"`` for block i's variable, ``"data/<name>/c<c>"`` for the data.
The task bodies are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..model import Architecture, forward, loss_sum
from ..storage import StoreRef, chunk_io, committed_slot

__all__ = [
    "checkpoint_chunk",
    "ChunkTask",
    "each_stats",
    "FlowCall",
    "evaluate_chunks",
    "evaluate_combine",
    "evaluate_part",
    "get_data",
    "get_live",
    "group_stats",
    "pick_written",
    "PlanContext",
    "StartContext",
    "start_result",
    "put_live",
    "restore_chunk",
    "run_flow",
    "sample_vars",
    "state_layout",
    "Small",
    "StatsGroup",
    "sum_partials",
    "Written",
]

Array = np.ndarray

Small = dict


def state_layout(arch: Architecture, state_vars: Callable[[Architecture, int], tuple[str, ...]],
                 rows: Callable[[int, str], int] | None = None) -> list[dict[str, tuple]]:
    """Each block's store variables: ``W`` (its shape) and every state variable of
    ``state_vars(arch, i)`` as ``(rows, "n")``, ``rows(i, var)`` or the block's output rows."""
    out = []
    for i in range(1, arch.depth + 1):
        v: dict[str, tuple] = {"W": arch.weight_shape(i)}
        for var in state_vars(arch, i):
            v[var] = (arch.out_dim(i) if rows is None else rows(i, var), "n")
        out.append(v)
    return out


def sample_vars(variables: dict[str, tuple]) -> tuple[str, ...]:
    """The sample-sized variables of one block's layout (chunked, in the live slots)."""
    return tuple(v for v, shape in variables.items() if shape and shape[-1] == "n")


@dataclass
class _Frame:
    """The values a dataflow task reads (by location) and the ones it writes."""

    reads: dict[str, Array]
    writes: dict[str, Array] = field(default_factory=dict)


_FLOW: ContextVar[_Frame | None] = ContextVar("daskadmm_flow", default=None)


def _read(url: StoreRef | None, path: str, sl: slice, slot: int | None = None) -> Array:
    assert url is not None, f"{path}: no store (and not in a dataflow task)"
    return chunk_io(url, path).read(sl, slot)


def _write(url: StoreRef | None, path: str, sl: slice, value: Array,
           slot: int | None = None) -> None:
    assert url is not None, f"{path}: no store (and not in a dataflow task)"
    chunk_io(url, path).write(sl, value, slot)


def _flow_read(frame: _Frame, loc: str) -> Array:
    try:
        return frame.reads[loc]
    except KeyError:
        raise KeyError(f"a dataflow task read {loc}, which its plan did not declare") from None


def get_data(ct: ChunkTask, name: str) -> Array:
    """Chunk ``ct`` of the stored data array ``name`` (``X`` or ``Y``: the training set;
    ``X_test``, ``Y_test``)."""
    frame = _FLOW.get()
    if frame is not None:
        return _flow_read(frame, f"data/{name}/c{ct.c}")
    return _read(ct.url, f"data/{name}", ct.sl)


def get_live(ct: ChunkTask, i: int, var: str, slot: int) -> Array:
    """Chunk ``ct`` of block i's variable ``var`` in live slot ``slot``."""
    frame = _FLOW.get()
    if frame is not None:
        return _flow_read(frame, f"b{i}/{var}/{slot}/c{ct.c}")
    return _read(ct.url, f"live/b{i}/{var}", ct.sl, slot)


def put_live(ct: ChunkTask, i: int, var: str, slot: int, value: Array) -> None:
    """Write chunk ``ct`` of block i's variable ``var`` into live slot ``slot``."""
    frame = _FLOW.get()
    if frame is not None:
        # handed on as it is: read-only, so neither this task nor a reader can change it
        value = np.asarray(value)
        value.flags.writeable = False
        frame.writes[f"b{i}/{var}/{slot}/c{ct.c}"] = value
        return
    _write(ct.url, f"live/b{i}/{var}", ct.sl, value, slot)


@dataclass(frozen=True)
class Written:
    """A dataflow task's output: its result and the chunks it wrote (by location)."""

    out: Any
    data: dict[str, Array]


@dataclass(frozen=True)
class FlowCall:
    """How :func:`run_flow` calls ``fn``: its first ``n_args`` inputs are its arguments, the
    rest the values of the locations ``reads`` (task outputs :class:`Written` that hold them,
    or the arrays themselves; ``"<loc>?"``: a location it may leave as it is, handed on
    unless it writes it); ``writes``: whether it writes (returns a :class:`Written`)."""

    fn: Callable
    n_args: int
    reads: tuple[str, ...] = ()
    writes: bool = False


def start_result(out: Any) -> Any:
    """A start task's result, without the state it wrote (what the driver fetches)."""
    return out.out if isinstance(out, Written) else out


def pick_written(w: Written, locs: tuple[str, ...]) -> Written:
    """The locations ``locs`` of a dataflow task's output (what a task of another block reads
    of it: only that travels)."""
    return Written(None, {loc: w.data[loc] for loc in locs})


def _unwrap(x: Any) -> Any:
    if isinstance(x, Written):
        return x.out
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v) for v in x)
    return x


def _readable(a: Array) -> Array:
    """``a`` aligned (a worker may deserialise at any byte offset; BLAS would not be used on it)
    and read-only."""
    if not a.flags.aligned:
        a = a.copy()
    v = a.view()
    v.flags.writeable = False
    return v


def run_flow(call: FlowCall, *inputs: Any) -> Any:
    """Run a task of the dataflow backend: ``call.fn`` on its arguments (other tasks' outputs
    as their results), with :func:`get_live` / :func:`get_data` answered from the values
    handed in and :func:`put_live` collected; returns ``Written(result, writes)`` for a task
    that writes, the result otherwise."""
    args = [_unwrap(a) for a in inputs[:call.n_args]]
    reads, kept = {}, {}
    for loc, v in zip(call.reads, inputs[call.n_args:], strict=True):
        if loc.endswith("?"):  # a location it may leave as it is: the value to hand on
            kept[loc[:-1]] = v.data[loc[:-1]]
        else:
            reads[loc] = _readable(v.data[loc] if isinstance(v, Written) else v)
    frame = _Frame(reads)
    token = _FLOW.set(frame)
    try:
        out = call.fn(*args)
    finally:
        _FLOW.reset(token)
    if not call.writes:
        return out
    return Written(out, {**kept, **frame.writes})


@dataclass(frozen=True)
class ChunkTask:
    """Where a task's chunk lives: store URL, sample range, chunk index."""

    url: StoreRef | None  # the store (its URL and creation id); None: the dataflow backend
    sl: slice
    c: int


@dataclass
class PlanContext:
    """What an algorithm's iteration plan appends tasks through (the Zarr engine's window
    builder, :func:`daskadmm.graph.chunked.build_window`, makes it):

    - ``chunk_tasks(base, block, fn, args, reads, writes, each=None)``: one task per chunk,
      ``fn(chunk, *args, [each[c],] *order)``, with the chunk locations (``"b<i>/<var>/<slot>"``)
      it reads and writes (a write ending in ``?``: one it may leave out, keeping the value);
      returns their refs;
    - ``small_task(base, block, fn, args, tag="", on=None)``: one task of the block, on its
      worker (or block ``on``'s: where its inputs are); its key;
    - ``reader(key, locs)``: task ``key`` may read ``locs`` of every chunk (later writers wait);
    - ``after(marker, refs)``: task ``marker`` runs after the chunk tasks ``refs``, so a task
      that has to run after one of them may wait for it instead;
    - ``gram``: X's constant statistics; ``cts``: every chunk; ``first``: RADMM-3's ``W_1``
      statistics for the next iteration (the plan updates it), and ``first_rhos``: the
      candidate rhos it was made for; ``rho_next``: the values the next iteration's rho can
      take (one where it is known; two while an adaptive or rises schedule has not decided
      it)."""

    chunk_tasks: Callable[..., list]
    small_task: Callable[..., str]
    reader: Callable[[str, list[str]], None]
    after: Callable[[str, list], None]
    gram: Any
    cts: tuple[ChunkTask, ...]
    first: str | None = None
    rho_next: tuple[float, ...] = ()
    first_rhos: tuple[float, ...] = ()


@dataclass
class StartContext:
    """What an algorithm's start statistics (``ChunkAlgorithm.start_chunk`` and
    ``start_sum``) append tasks through
    (:func:`daskadmm.graph.chunked.start_nodes` makes it), after the chunks of iteration k0 are
    in live slot ``slot``:

    - ``task(key, block, fn, args, reads=())``: one task, after the writers of the chunk
      locations ``reads`` (``"b<i>/<var>/<slot>/c<c>"``; later writers wait for it), called
      ``fn(*args, *order)`` when it reads any; returns a :class:`~daskadmm.graph.nodes.Ref`;
    - ``small_task(base, block, fn, args, tag="", on=None)``: one task named like a plan's
      (on block ``on``'s worker if given); its key;
    - ``replace(markers)``: later tasks wait for ``markers[key]`` instead of task ``key``;
    - ``cts``: every chunk; ``run_id``: the run's key suffix; ``rho_first``: the values
      iteration k0+1's rho can take (one where it is known)."""

    task: Callable[..., Any]
    small_task: Callable[..., str]
    replace: Callable[[dict[str, str]], None]
    cts: tuple[ChunkTask, ...]
    slot: int
    run_id: str
    rho_first: tuple[float, ...] = ()


def sum_partials(*parts: tuple) -> tuple:
    """Sum chunk statistics (equal-length tuples of arrays) entry by entry in the given (fixed)
    order: a node of a reduction tree. A None entry (a statistic the chunks do not carry, e.g.
    a constant Gram matrix) stays None."""
    acc = [None if p is None else p.copy() for p in parts[0]]
    for part in parts[1:]:
        for j, p in enumerate(part):
            if acc[j] is not None:
                acc[j] += p
    return tuple(acc)


def checkpoint_chunk(ct: ChunkTask, block: int, names: tuple[str, ...], slot: int, ckpt: str,
                     *order) -> dict[str, int]:
    """Copy one chunk of block ``block``'s live slot into checkpoint slot ``ckpt``; return
    the checksum of each variable's chunk (recorded in the checkpoint's manifest).

    Refuses to write the slot of the committed checkpoint: that can only happen when Dask
    re-runs a finished checkpoint task after a lost worker, and the committed checkpoint is
    what the run recovers from."""
    from ..storage import checksum

    assert ct.url is not None  # checkpoints are the store's
    if committed_slot(ct.url) == ckpt:
        raise RuntimeError(f"checkpoint slot {ckpt} of {ct.url} holds the committed "
                           "checkpoint: not overwriting it")
    out = {}
    for name in names:
        value = _read(ct.url, f"live/b{block}/{name}", ct.sl, slot)
        _write(ct.url, f"ckpt/{ckpt}/b{block}/{name}", ct.sl, value)
        out[name] = checksum(value)
    return out


def restore_chunk(ct: ChunkTask, block: int, names: tuple[str, ...], slot: int,
                  ckpt: str) -> None:
    """Copy one chunk of checkpoint slot ``ckpt`` back into live slot ``slot`` (resume)."""
    for name in names:
        _write(ct.url, f"live/b{block}/{name}", ct.sl,
               _read(ct.url, f"ckpt/{ckpt}/b{block}/{name}", ct.sl), slot)


EvalRecord = tuple[float, float, int]
"""One chunk's share of an evaluation: (loss sum, metric sum, samples)."""


def _eval_records(url: StoreRef | None, arch: Architecture, task: str,
                  chunks: tuple[tuple[int, slice], ...], xs: str, ys: str,
                  weights: list[Array]) -> list[EvalRecord]:
    """The true forward pass on each chunk ``(c, slice)`` of the stored ``xs`` / ``ys``."""
    out: list[EvalRecord] = []
    with np.errstate(all="ignore"):
        for c, sl in chunks:
            ct = ChunkTask(url, sl, c)
            X, Y = get_data(ct, xs), get_data(ct, ys)
            pred = forward(arch, weights, X)[0][-1]
            if task == "classification":
                err = float(np.sum(pred.argmax(axis=0) == Y.argmax(axis=0)))
            else:
                err = float(np.sum((pred - Y) ** 2))
            out.append((loss_sum(arch.loss, pred, Y), err, Y.shape[1]))
    return out


def evaluate_part(url: StoreRef | None, arch: Architecture, task: str,
                  train: tuple[tuple[int, slice], ...], test: tuple[tuple[int, slice], ...],
                  *smalls: Small) -> tuple[list[EvalRecord], list[EvalRecord]]:
    """Part of an evaluation: the true forward pass, with the blocks' small states (their
    ``W``), on some chunks ``(c, slice)`` of the train and the test data; the records of
    each chunk in order (:func:`evaluate_combine` adds them). One part per train chunk, on
    that chunk's worker, so an evaluation is spread over the workers as the chunk tasks
    are, in pieces no longer than one chunk's forward pass."""
    weights = [s["W"] for s in smalls]
    return (_eval_records(url, arch, task, train, "X", "Y", weights),
            _eval_records(url, arch, task, test, "X_test", "Y_test", weights))


def evaluate_combine(n_parts: int, *items: Any) -> tuple[dict[str, float], list[Array]]:
    """The train and test loss and metric from ``n_parts`` :func:`evaluate_part` outputs
    (``items[:n_parts]``, in chunk order; the sums are added as one pass over the chunks
    would, so the figures do not depend on how the chunks are split into parts), and the
    weights of the small states ``items[n_parts:]`` they were made with."""
    parts: tuple[tuple[list[EvalRecord], list[EvalRecord]], ...] = items[:n_parts]
    smalls: tuple[Small, ...] = items[n_parts:]
    rec: dict[str, float] = {}
    for split, j in (("train", 0), ("test", 1)):
        loss = err = 0.0
        count = 0
        with np.errstate(all="ignore"):
            for part in parts:
                for chunk_loss, chunk_err, n in part[j]:
                    loss += chunk_loss
                    err += chunk_err
                    count += n
        rec[f"{split}_loss"] = loss / count
        rec[f"{split}_metric"] = err / count
    return rec, [s["W"] for s in smalls]


def evaluate_chunks(url: StoreRef | None, arch: Architecture, task: str, metric: str,
                    train: tuple[slice, ...], test: tuple[slice, ...], *Ws: Array
                    ) -> tuple[dict[str, float], list[Array]]:
    """True forward pass on the stored train and test data, one chunk at a time, in one
    task (``metric``: the run's metric, named for the record; the sums are the same)."""
    smalls = [{"W": W} for W in Ws]
    part = evaluate_part(url, arch, task, tuple(enumerate(train)), tuple(enumerate(test)),
                         *smalls)
    return evaluate_combine(1, part, *smalls)


class StatsGroup(NamedTuple):
    """The statistics of a few consecutive chunk outputs (:func:`group_stats`)."""

    items: tuple


def group_stats(*outs) -> StatsGroup:
    """Keep only the ``stats`` of a few chunk outputs: the task runs as soon as they are done,
    so their ``d x d`` statistics need not stay in memory until the block's statistics task,
    which waits for every chunk of the block."""
    return StatsGroup(tuple(o.stats for o in outs))


def each_stats(outs) -> Iterable[dict[str, float] | None]:
    """The chunks' statistics, in order, from chunk outputs and :class:`StatsGroup` s."""
    for o in outs:
        if isinstance(o, StatsGroup):
            yield from o.items
        else:
            yield o.stats
