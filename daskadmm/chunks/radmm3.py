"""Per-(block, chunk) tasks of the Zarr-resident engine (RADMM-3, RADMM-3L and RADMM-3A).

Each task reads single chunks from the state store, calls the pure update functions of
:mod:`daskadmm.splitting.radmm3` (and, for RADMM-3A, of :mod:`daskadmm.splitting.radmm3a`) on
them, and writes single chunks back, so a worker holds one chunk
of each n-sized array plus a few ``d x d`` matrices: every update except W's acts on each sample
(column) on its own, and W's needs only sums over the samples of ``d x d`` products, which chunks
compute in parts and a reduction adds. Iteration k reads parity slot ``(k-1) % 2`` and writes slot
``k % 2``.

``update_chunk`` of block i, chunk c, iteration k computes ``U_i``, ``Lam_i``, ``V_i`` of the
chunk and, while it has them in hand, the chunk's share of the statistics the next W updates
need: ``G = V~_i V~_i^T`` and ``B = (rho U_{i+1} + Lam_{i+1}) V~_i^T`` for ``W_{i+1}`` of
iteration k (right neighbour of iteration k-1 is read anyway), and for block 1
``B = (rho' U_1 + Lam_1) X~^T`` for ``W_1`` of iteration k+1, with that iteration's ``rho'``
(when an adaptive or rises schedule decides it only after iteration k: one ``B`` for each
value it can take, and the W step takes the one in force). These are the reference's
products, so with one chunk the iterates are the reference's bits. A reduction on the same
worker sums these in a fixed order (:func:`pick_partials`, as a tree of fan-in
:data:`FAN_IN`), and the tree's root solves (:func:`reduce_weights`: block i's statistics
give ``W_{i+1}``, on block i's worker). The small state of a block
that travels through the graph is ``{"W": W_i}``; :func:`plan_iteration` wires an iteration
for the window builder (:mod:`daskadmm.graph.chunked`), which derives the dependencies from the
chunks each task declares it reads and writes. The U, Lam, V steps are column-separable
and the inner solvers decide per element, so chunking only reorders the additions of the W
statistics (results agree with the unchunked reference to ~1e-13 relative; with the same
chunking every scheduler is bitwise equal).

RADMM-3A adds the multipliers ``Gam_i`` (i < N) of the activation constraints, sample-sized and
stored like ``V``: block i's task reads ``Gam_i`` and, when ``s_{i+1} = 1``, ``Gam_{i+1}`` of the
previous iteration (as it reads ``V_{i+1}``), uses them in the U prox and the V solve, and
writes the new ``Gam_i`` after V. Its start is a forward pass and one backward pass of the
network; both act on each sample on its own, so ``init_chunk`` runs them on its chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..model import Architecture, augment, forward, loss_grad_n, loss_sum
from ..splitting import BlockSpec, Penalties, radmm3, radmm3a
from ..splitting.base import Stats, block_penalties
from .common import (
    Array,
    ChunkTask,
    PlanContext,
    Small,
    StartContext,
    each_stats,
    get_data,
    get_live,
    put_live,
    sample_vars,
    sum_partials,
)

__all__ = [
    "block_stats",
    "ChunkOut",
    "FAN_IN",
    "gram_add",
    "init_chunk",
    "init_partials",
    "layout",
    "pick_partials",
    "plan_iteration",
    "start_chunk",
    "start_sum",
    "reduce_tree",
    "reduce_weights",
    "update_chunk",
    "update_weights",
]


FAN_IN = 4  # inputs of a node of the reduction tree of chunk statistics

def layout(name: str, arch: Architecture) -> list[dict[str, tuple]]:
    """Variables of each block of algorithm ``name``: (rows, "n") for sample-sized ones, the
    shape for small ones. What the store holds and what a checkpoint copies and checksums."""
    out = []
    for i in range(1, arch.depth + 1):
        rows = arch.out_dim(i)
        v: dict[str, tuple] = {"W": arch.weight_shape(i), "U": (rows, "n"), "Lam": (rows, "n")}
        if i < arch.depth:
            v["V"] = (rows, "n")
            if name == "radmm3a":
                v["Gam"] = (rows, "n")
        out.append(v)
    return out


class ChunkOut(NamedTuple):
    """What :func:`update_chunk` returns for one chunk: its statistics (``objective``,
    ``primal_sq``, ``dual_sq``, ``capped``), its share ``(G, B)`` of the statistics of
    ``W_{i+1}`` of the same iteration (hidden blocks) and its share ``(B,)`` (one ``B`` per
    candidate rho) of those of ``W_1`` of the next iteration (block 1)."""

    stats: Stats
    w_next: tuple[Array, Array] | None = None
    w_first: tuple[Array, ...] | None = None


def init_chunk(ct: ChunkTask, name: str, arch: Architecture, weights: list[Array],
               n: int, options: Any = None, rho: float | None = None, names: Any = None,
               slot: int = 0) -> dict:
    """The start of algorithm ``name`` on one chunk, written into ``slot`` (0; a restart
    after iteration k writes k's: :func:`~daskadmm.splitting.base.restarts_after`): the
    forward pass gives U, V; ``Lam_N = -n grad l``; RADMM-3/3L: ``Lam_i = 0`` (i < N);
    RADMM-3A: one backward pass over the blocks
    (:func:`daskadmm.splitting.radmm3a.backward_step`) gives ``Gam_i`` and ``Lam_i``.
    Returns the chunk's share of L^0 without the regulariser (the constraints hold).
    (``options``, ``rho``, ``names``: the engine's start signature; this start depends on
    none of them.)"""
    X = get_data(ct, "X")
    Y = get_data(ct, "Y")
    U, V = forward(arch, weights, X)
    N = arch.depth
    Lam = -loss_grad_n(arch.loss, U[-1], Y)
    put_live(ct, N, "U", slot, U[-1])
    put_live(ct, N, "Lam", slot, Lam)
    Gam = None
    for i in range(N - 1, 0, -1):  # backward: block i needs block i+1's Lam and Gam
        if name == "radmm3a":
            Gam, Lam = radmm3a.backward_step(arch, i, weights[i], Lam, Gam, U[i - 1])
            put_live(ct, i, "Gam", slot, Gam)
        else:
            Lam = np.zeros_like(U[i - 1])
        put_live(ct, i, "U", slot, U[i - 1])
        put_live(ct, i, "Lam", slot, Lam)
        put_live(ct, i, "V", slot, V[i])
    return {"objective": loss_sum(arch.loss, U[-1], Y) / n}


def _first_stats(Xt: Array, U: Array, Lam: Array, rhos: tuple[float, ...]
                 ) -> tuple[Array, ...]:
    """A chunk's share of ``W_1``'s ``B = (rho U_1 + Lam_1) X~^T`` for each value ``rhos`` the
    next iteration's rho can take (one where it is known; kept and raised while a schedule
    has not decided it: :meth:`~daskadmm.schedules.PenaltySchedule.next_rhos`), each with the
    reference's arithmetic."""
    return tuple(radmm3.weight_rhs(Xt, U, Lam, r) for r in rhos)


def init_partials(ct: ChunkTask, bias: bool, slot: int, rhos: tuple[float, ...],
                  *order) -> tuple:
    """Chunk statistics for ``W_1`` from ``slot``: ``(X~ X~^T, *share)``, the share of
    ``B`` as :func:`_first_stats` (``rhos``: the first iteration's rho candidates)."""
    Xt = augment(get_data(ct, "X"), bias)
    U = get_live(ct, 1, "U", slot)
    Lam = get_live(ct, 1, "Lam", slot)
    return (Xt @ Xt.T, *_first_stats(Xt, U, Lam, rhos))


def update_weights(spec: BlockSpec, pen: Penalties, small: Small, stats: tuple,
                   name: str, rhos: tuple[float, ...] | None = None) -> Small:
    """W step of algorithm ``name`` from the reduced statistics ``(G, B)`` (see
    radmm3.update_weights; RADMM-3A's W step is RADMM-3's), or, for ``W_1``, ``(G, B_1, ...,
    B_m)`` made for the candidate rhos ``rhos``: the ``B`` of the rho in force. Returns the
    block's new small state."""
    if rhos is None:
        G, B = stats
    else:
        if pen.rho not in rhos:
            raise RuntimeError(f"W_1's statistics were made for rho in {rhos}, but the "
                               f"schedule set rho = {pen.rho}")
        G, B = stats[0], stats[1 + rhos.index(pen.rho)]
    step = radmm3.update_weights_linearized if name == "radmm3l" else radmm3.update_weights
    return {"W": step(small["W"], G, B, block_penalties(spec, pen), spec.n)}


def update_chunk(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                 right_small: Small | None, name: str, rho_next: tuple[float, ...] | None,
                 *order
                 ) -> ChunkOut:
    """U, Lam, V (and RADMM-3A's Gam) of block i on one chunk for iteration k of algorithm
    ``name`` (:func:`daskadmm.splitting.radmm3.column_update`, as the reference calls it on
    all the samples), with the block's ``W`` of iteration k and (hidden blocks) the right
    neighbour's of k-1 (``rho_next``: the values iteration k+1's rho can take, for W_1's
    statistics (block 1 only);
    ``order``: results of the tasks this one must run after; their values are not used).

    Returns a :class:`ChunkOut`.
    """
    i = spec.i
    new, old = k % 2, (k - 1) % 2
    Vleft = get_data(ct, "X") if i == 1 else get_live(ct, i - 1, "V", new)
    own: radmm3.State = {"U": get_live(ct, i, "U", old), "Lam": get_live(ct, i, "Lam", old)}
    Y = get_data(ct, "Y") if spec.is_output else None
    right: radmm3.State | None = None
    if not spec.is_output:
        own["V"] = get_live(ct, i, "V", old)
        if name == "radmm3a":
            own["Gam"] = get_live(ct, i, "Gam", old)
        assert right_small is not None  # a hidden block has a right neighbour
        right = {"W": right_small["W"],
                 "U": get_live(ct, i + 1, "U", old),
                 "Lam": get_live(ct, i + 1, "Lam", old)}
        if spec.s_next:
            right["V"] = get_live(ct, i + 1, "V", old)
            if name == "radmm3a":
                right["Gam"] = get_live(ct, i + 1, "Gam", old)
    pool = radmm3.Scratch(like=own["U"])
    Vt = radmm3.augmented(Vleft, spec.bias, pool)
    out = radmm3.column_update(spec, pen, small["W"], own, Vleft, Vt, right, Y, variant=name,
                               regulariser=ct.c == 0, pool=pool)
    for v, a in out.state.items():
        put_live(ct, i, v, new, a)
    w_next = w_first = None
    if right is not None:
        w_next = radmm3.weight_stats(radmm3.augmented(out.state["V"], spec.bias, pool),
                                     right["U"], right["Lam"], pen.rho, pool)
    if i == 1:
        assert rho_next is not None  # block 1 is given W_1's next rho (or its candidates)
        w_first = _first_stats(Vt, out.state["U"], out.state["Lam"], rho_next)
    return ChunkOut(out.stats, w_next, w_first)


def pick_partials(which: str, gram_x: Array | None, *outs) -> tuple:
    """Sum, in the given order, the W statistics that chunk outputs carry.

    ``which``: "next" (``G, B`` for ``W_{i+1}`` of the same iteration), "first" (one ``B``
    per candidate rho for ``W_1`` of the next iteration; ``G`` is the constant ``gram_x``, or
    None inside the reduction tree), "init" / "sum" (already ``(G, ...)`` tuples: init_partials'
    outputs or tree nodes). A tree node of "first" statistics carries ``G = None``; the root
    adds ``gram_x`` once.
    """
    if which == "next":
        parts = [o.w_next for o in outs]
    elif which == "first":
        parts = [(None, *o.w_first) for o in outs]
    else:
        parts = list(outs)
    G, *rest = sum_partials(*parts)
    if which == "first" or (which == "sum" and G is None):
        G = gram_x
    return (G, *rest)


def gram_add(acc: Array | None, part: tuple) -> Array:
    """``acc + X~_c X~_c^T`` (a new array) from one chunk's :func:`init_partials`; a chain of
    these adds the chunks in order, as :func:`sum_partials` would."""
    return part[0].copy() if acc is None else acc + part[0]


def block_stats(small: Small, *outs) -> Stats:
    """Sum the per-chunk statistics of one block (in chunk order; the regulariser is in chunk
    0's, so ``small`` is not used: the task runs after the block's W of the iteration)."""
    total: Stats = {"objective": 0.0, "primal_sq": 0.0, "dual_sq": 0.0, "capped": 0.0}
    for st in each_stats(outs):
        assert st is not None  # every RADMM-3 chunk output has statistics
        total["objective"] += st["objective"]
        total["primal_sq"] += st["primal_sq"]
        total["dual_sq"] += st["dual_sq"]
        total["capped"] += st["capped"]
    return total


def reduce_weights(spec: BlockSpec, pen: Penalties, small: Small, name: str, kind: str,
                   gram: Array | None, *outs) -> Small:
    """:func:`update_weights` on :func:`pick_partials` ``(kind, gram, *outs)``: a reduction's
    root and the W step it feeds in one task (one hop less on the wavefront's path)."""
    return update_weights(spec, pen, small, pick_partials(kind, gram, *outs), name)


def reduce_tree(small_task, base: str, i: int, kind: str, refs: list, gram,
                solve: tuple | None = None) -> str:
    """Append the reduction of chunk statistics ``refs`` (``kind``, see :func:`pick_partials`)
    on block i's worker through the builder's ``small_task``: with more than :data:`FAN_IN`
    inputs, a tree of fan-in :data:`FAN_IN` whose nodes sum their inputs in a fixed order (so a
    chunk output can go as soon as its node has run, and the root sums at most ``FAN_IN``
    inputs); the root adds ``gram``. ``solve = (spec, pen, small, name)``: the root is the W
    step of block ``spec.i`` on these statistics (:func:`reduce_weights`, keyed as that
    block's ``update_weights``, still on block i's worker, so only ``W`` travels). Returns the
    root's key."""
    from ..graph.nodes import Ref

    level = 0
    while len(refs) > FAN_IN:
        refs = [Ref(small_task(base, i, pick_partials,
                               (kind if level == 0 else "sum", None, *refs[j:j + FAN_IN]),
                               tag=f"r{level}x{j // FAN_IN}"))
                for j in range(0, len(refs), FAN_IN)]
        level += 1
    args = (kind if level == 0 else "sum", gram, *refs)
    if solve is None:
        return small_task(base, i, pick_partials, args)
    spec = solve[0]
    return small_task("update_weights", spec.i, reduce_weights, (*solve, *args), on=i)


def plan_iteration(name: str, ctx: PlanContext, specs: list[BlockSpec], pen: Penalties, k: int,
                   small: dict[int, str]) -> dict[int, str]:
    """Append iteration k of algorithm ``name`` through ``ctx`` (:class:`PlanContext`).
    ``small``: the keys of the blocks' small states of iteration k-1; ``ctx.first``: W_1's
    statistics for iteration k. Returns the small states' keys of iteration k and sets
    ``ctx.first`` to W_1's statistics for iteration k+1.

    Per block i: ``W_i`` from the statistics that block i-1's chunk tasks of k returned
    (``W_1``: block 1's of k-1), then one chunk task per chunk. Block i's chunk statistics are
    reduced on block i's worker, right after its chunk tasks, and the reduction's root is
    ``W_{i+1}``'s step (:func:`reduce_weights`), so only ``W_{i+1}`` travels and the chain
    from block i's chunk tasks to block i+1's has one task between them; block 1's are also
    reduced for ``W_1`` of k+1. A chunk task reads ``V_{i-1}`` of iteration k, which block i-1's
    chunk task of the same chunk wrote; ``W_i`` runs after all of those, and the chunk task
    takes ``W_i`` anyway, so it waits for ``W_i`` rather than for a chunk output (``d x d``
    statistics that would have to travel)."""
    from ..graph.nodes import Ref

    N = len(specs)
    o, w = (k - 1) % 2, k % 2
    lay = layout(name, specs[0].arch)
    new: dict[int, str] = {}
    assert ctx.first is not None  # start_nodes and every window hand it on
    stats = ctx.first
    chunk_tasks, small_task = ctx.chunk_tasks, ctx.small_task
    prev_chunks: list = []
    for i in range(1, N + 1):
        spec = specs[i - 1]
        if i == 1:
            new[i] = small_task("update_weights", i, update_weights,
                                (spec, pen, Ref(small[i]), Ref(stats), name, ctx.first_rhos))
        else:  # the root of block i-1's reduction solves (on block i-1's worker)
            new[i] = reduce_tree(small_task, "reduce_next", i - 1, "next", prev_chunks, None,
                                 solve=(spec, pen, Ref(small[i]), name))
            ctx.after(new[i], prev_chunks)
        own = sample_vars(lay[i - 1])
        reads = [f"b{i - 1}/V/{w}"] if i > 1 else []
        reads += [f"b{i}/{v}/{o}" for v in own]
        right = None
        if i < N:
            right = Ref(small[i + 1])
            reads += [f"b{i + 1}/U/{o}", f"b{i + 1}/Lam/{o}"]
            if spec.s_next:
                reads += [f"b{i + 1}/{v}/{o}" for v in own if v in ("V", "Gam")]
        prev_chunks = chunk_tasks(f"{name}_chunk", i, update_chunk,
                                  (spec, pen, k, Ref(new[i]), right, name,
                                   ctx.rho_next if i == 1 else None), reads,
                                  [f"b{i}/{v}/{w}" for v in own])
        if i == 1:
            ctx.first = reduce_tree(small_task, "reduce_first", 1, "first", prev_chunks,
                                    ctx.gram)
            ctx.first_rhos = ctx.rho_next
    return new


def start_chunk(ctx: StartContext, ct: ChunkTask, arch: Architecture) -> Any:
    """The start's statistics of chunk ``ct``: ``(X~ X~^T, B...)`` of slot ``ctx.slot``, one
    ``B`` per candidate of iteration k0+1's rho (:func:`init_partials`)."""
    if not ctx.rho_first:
        raise ValueError("the start of RADMM-3/3L/3A needs rho_first: iteration k0+1's rho "
                         "or the values it can take")
    s = ctx.slot
    return ctx.task(f"init_partials-c{ct.c}-{ctx.run_id}", 1, init_partials,
                    (ct, arch.bias, s, ctx.rho_first),
                    reads=[f"b1/U/{s}/c{ct.c}", f"b1/Lam/{s}/c{ct.c}"])


def start_sum(ctx: StartContext, parts: list, arch: Architecture) -> tuple[str, str | None]:
    """X's Gram matrix from the chunks' start statistics ``parts`` as a chain that adds one
    chunk's at a time (:func:`sum_partials`' order, so the same bits: each chunk's statistics
    can go as soon as the chain and W_1's reduction have them, instead of when every chunk is
    done), and W_1's statistics for the first iteration as a reduction tree. Later writers of
    ``b1/U``, ``b1/Lam`` wait for the Gram matrix (summed after every chunk's statistics).
    Returns the keys of the Gram matrix and of W_1's statistics."""
    gk = f"gram_x-{ctx.run_id}"
    acc = None
    for j, p in enumerate(parts):
        acc = ctx.task(gk if j == len(parts) - 1 else f"gram_x-{j}-{ctx.run_id}", 1, gram_add,
                       (acc, p))
    first = reduce_tree(ctx.small_task, "reduce_first", 1, "init", parts, None)
    ctx.replace({p.key: gk for p in parts})
    return gk, first
