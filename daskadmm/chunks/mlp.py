"""Per-(layer, chunk) tasks and iteration plans of the Zarr-resident engine for pdADMM and
dlADMM.

Every sample-sized variable lives in the state store, chunked along samples; a task reads and
writes single chunks, so a worker holds one chunk of each variable it touches plus ``d x d``
statistics. What does not split along samples is small and travels through the task graph as a
value, the layer's *small state*: ``W`` and the scalars (last accepted curvatures, pdADMM's
pending penalties).

**Why the updates split.** The z, q, u steps are elementwise; the p (pdADMM) and a (dlADMM)
steps take one gradient step whose gradient is column-separable, and their backtracking is
decided exactly by two sums over the samples (``curv = g^T H g``, ``sq = ||g||^2``, see
:func:`~daskadmm.splitting.dladmm.quad_theta`); the W and b steps need only
``(V V^T, T V^T, V 1, T 1)`` (:func:`~daskadmm.splitting.dladmm.w_stats`). So a step that
needs a backtracked curvature is two passes over the chunks with a scalar reduction between
them (the second pass recomputes the gradient: the same function on the same inputs, so the
same bits), and a W step is a reduction of chunk statistics. Chunking only reorders sums: the
results agree with the unchunked reference to rounding, and with the same chunking every
scheduler computes the same bits.

**Slots.** pdADMM: iteration k reads slot ``(k-1) % 2`` and writes slot ``k % 2``. dlADMM:
the backward sweep of iteration k reads slot ``(k-1) % 2`` (the forward output of k-1) and
writes slot 2, the forward sweep reads slot 2 and writes slot ``k % 2``.

The window builder (:mod:`daskadmm.graph.chunked`) wires the tasks of these plans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import numpy as np

from ..graph.nodes import Ref
from ..model import Architecture, augment, loss_sum
from ..splitting import BlockSpec, Options, Penalties
from ..splitting import dladmm as dl
from ..splitting import pdadmm as pd
from ..splitting.base import Stats
from ..splitting.dladmm import (
    _plus_bias,
    a_grad,
    a_hessian,
    penalty_nu,
    quad_theta,
    shifted_curv,
    shifted_theta0,
    update_b,
    update_W_stats,
    w_stats,
)
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
    state_layout,
    sum_partials,
)

__all__ = [
    "gram_chunk",
    "init_chunk",
    "layer_stats",
    "PassOut",
    "plan_dladmm",
    "plan_pdadmm",
    "start_chunk",
    "start_sum",
]


BWD = 2  # dlADMM: the slot of the backward sweep's output


def pd_state_vars(arch: Architecture, i: int) -> tuple[str, ...]:
    return ("z", *(("q",) if i < arch.depth else ()), *(("p", "u") if i > 1 else ()))


def dl_state_vars(arch: Architecture, i: int) -> tuple[str, ...]:
    return ("z", "a") if i < arch.depth else ("z", "u")


def pd_layout(arch: Architecture) -> list[dict[str, tuple]]:
    """pdADMM's store: its state variables (``p``, ``u`` with the layer's input rows) and the
    scratches ``ql`` (``q_{l-1}`` of the pending phase) and ``g`` (the p step's gradient,
    written by pass A, read by pass B; slot 0 only) of every layer but the first."""
    out = state_layout(arch, pd_state_vars,
                       lambda i, var: arch.in_dim(i) if var in ("p", "u") else arch.out_dim(i))
    for i, v in enumerate(out, start=1):
        if i > 1:
            v["ql"] = (arch.in_dim(i), "n")
            v["g"] = (arch.in_dim(i), "n")
    return out


def dl_layout(arch: Architecture) -> list[dict[str, tuple]]:
    """dlADMM's store: its state variables and the scratch ``g`` (the a step's gradient,
    written by the pass that sums its curvature, read by the pass that takes the step, in
    slot ``BWD`` only, in both sweeps) of every layer but the last."""
    out = state_layout(arch, dl_state_vars)
    for i, v in enumerate(out, start=1):
        if i < arch.depth:
            v["g"] = (arch.out_dim(i), "n")
    return out


def pd_init_small(arch: Architecture, weights: list[Array]) -> list[Small]:
    out = []
    for i, W in enumerate(weights, start=1):
        s: Small = {"W": np.array(W, copy=True), "theta_W": 0.0, "rho": 0.0, "nu": 0.0,
                    "pending": 0.0}
        if i > 1:
            s["theta_p"] = 0.0
        out.append(s)
    return out


def dl_init_small(arch: Architecture, weights: list[Array]) -> list[Small]:
    out = []
    for i, W in enumerate(weights, start=1):
        s: Small = {"W": np.array(W, copy=True), "theta_W": 0.0}
        if i < arch.depth:
            s["theta_a"] = 0.0
        out.append(s)
    return out


def init_chunk(ct: ChunkTask, name: str, arch: Architecture, weights: list[Array],
               n: int, options: Options, rho: float, names: tuple[tuple[str, ...], ...],
               slot: int = 0, *, init_state: Callable[..., list[Any]]) -> dict:
    """Iteration 0 of one chunk: the splitting's ``init_state`` on the chunk's samples
    (a forward pass; every initial value is column-separable), written into ``slot`` (block i's
    variables ``names[i - 1]``). Returns
    the chunk's share of L^0 without the regulariser: the loss, plus the output constraint's
    terms when dlADMM's output layer does not start on the forward output
    (``options.output_init="labels"``, at iteration 1's ``rho``)."""
    X, Y = get_data(ct, "X"), get_data(ct, "Y")
    states = init_state(arch, weights, X, Y, options)
    for i, st in enumerate(states, start=1):
        for var in names[i - 1]:
            put_live(ct, i, var, slot, st[var])
    out = states[-1]
    obj = loss_sum(arch.loss, out["U" if name == "radmm2" else "z"], Y) / n
    if name == "dladmm" and options.output_init == "labels":
        r = out["z"] - weights[-1] @ augment(states[-2]["a"], arch.bias)
        obj += (float(np.sum(out["u"] * r)) + 0.5 * rho * float(np.sum(r * r))) / n
    return {"objective": obj}


def gram_chunk(ct: ChunkTask) -> tuple[Array, Array]:
    """``(X X^T, X 1)`` of one chunk: the constant statistics of layer 1's W steps."""
    X = get_data(ct, "X")
    return X @ X.T, X.sum(axis=1, keepdims=True)


def start_chunk(ctx: StartContext, ct: ChunkTask, arch: Architecture) -> Any:
    """The start's statistics of chunk ``ct``: X's ``(X X^T, X 1)`` (:func:`gram_chunk`)."""
    return ctx.task(f"gram_chunk-c{ct.c}-{ctx.run_id}", 1, gram_chunk, (ct,))


def start_sum(ctx: StartContext, parts: list, arch: Architecture) -> tuple[str, str | None]:
    """X's constant statistics: the chunks' summed in chunk order. Returns the sum's key (and
    no ``W_1`` statistics: layer 1's W steps read them with the Gram matrix)."""
    gk = f"gram_x-{ctx.run_id}"
    ctx.task(gk, 1, sum_partials, tuple(parts))
    return gk, None


class PassOut(NamedTuple):
    """What a chunk pass returns (every field optional): its statistics (``objective``,
    ``primal_sq``, ``dual_sq``, ``capped``: any subset), its share ``w`` of a W step's
    statistics (:func:`_chunk_w_stats`), and its shares ``curv``, ``sq`` of a backtracked step's
    curvature sums (:func:`~daskadmm.splitting.dladmm.shifted_curv`)."""

    stats: dict[str, float] | None = None
    w: tuple | None = None
    curv: float | None = None
    sq: float | None = None


def _w_stats_of(i: int, outs: Iterable[PassOut], gram: tuple | None) -> tuple:
    """W statistics from chunk outputs: layer 1's ``V V^T``, ``V 1`` are the constant ``gram``
    (its chunks carry only ``T V^T``, ``T 1``)."""
    parts: list[tuple] = []
    for o in outs:
        assert o.w is not None  # passes that carry W statistics
        parts.append(o.w)
    G, P, sV, sT = sum_partials(*parts)
    if i == 1:
        assert gram is not None  # layer 1 is given X's constant statistics
        G, sV = gram
    return G, P, sV, sT


def _chunk_w_stats(i: int, V: Array, T: Array) -> tuple:
    """The chunk's share of :func:`w_stats` (layer 1: only the parts that change)."""
    if i == 1:
        return None, T @ V.T, None, T.sum(axis=1, keepdims=True)
    return w_stats(V, T)


def layer_stats(small: Small, *outs: PassOut) -> Stats:
    """Layer statistics of one iteration: the chunk shares (each pass carries some of the
    entries) in a fixed order, the regulariser, and the caps counted by the small tasks."""
    lam = small["lam"]
    W = small["W"]
    total = {"objective": 0.5 * lam * float(np.sum(W * W)), "primal_sq": 0.0, "dual_sq": 0.0,
             "capped": float(small.get("capped", 0.0))}
    for st in each_stats(outs):
        for k, v in (st or {}).items():
            total[k] += v
    return cast(Stats, total)


def _decide(sums: Iterable[PassOut], theta0: float, max_trials: int) -> tuple[float, bool]:
    curv = sq = 0.0
    for o in sums:
        assert o.curv is not None and o.sq is not None  # a pass that computes the sums
        curv += o.curv
        sq += o.sq
    theta, _, capped = quad_theta(curv, sq, theta0, max_trials)
    return theta, capped


def _stats(**kw: float) -> dict[str, float]:
    return {k: float(v) for k, v in kw.items()}


def pd_pass_a(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
              *order) -> PassOut:
    """The q and u phases of iteration k-1 (when pending) and the chunk's share of the p
    step's curvature sums (l >= 2)."""
    i, act, N = spec.i, spec.act, spec.N
    o, w = (k - 1) % 2, k % 2
    pending = small["pending"] > 0
    rho0, nu0 = small["rho"], small["nu"]
    dual = 0.0
    z = get_live(ct, i, "z", o)
    p_o = get_live(ct, i, "p", o) if i > 1 else None
    if i < N:
        q_o = get_live(ct, i, "q", o)
        q = q_o
        if pending:
            q = pd.update_q(z, p_o if spec.s else None,
                            get_live(ct, i + 1, "p", o), get_live(ct, i + 1, "u", o), rho0,
                            nu0, act)
            dual = float(np.sum((q - q_o) ** 2))
        put_live(ct, i, "q", w, q)
    out = PassOut(stats=_stats(dual_sq=dual))
    if i > 1:
        assert p_o is not None
        u = get_live(ct, i, "u", o)
        if pending:
            p_left = get_live(ct, i - 1, "p", o) if spec.arch.skip(i - 1) else None
            q_left = pd.update_q(get_live(ct, i - 1, "z", o), p_left, p_o, u, rho0, nu0, act)
            u = pd.update_u(u, p_o, q_left, rho0)
        else:
            q_left = get_live(ct, i - 1, "q", o)
        put_live(ct, i, "u", w, u)
        put_live(ct, i, "ql", w, q_left)
        # the p step's gradient: pass B takes the step with it (from g) once theta is known
        nu, rho = penalty_nu(pen), pen.rho
        A, b = spec.split_bias(small["W"])
        R = q - act.f(z) if spec.s else None
        g = pd.p_grad(p_o, A, b, z, R, spec.s, u, q_left, nu, rho)
        put_live(ct, i, "g", 0, g)
        curv, sq = shifted_curv(g, A, *pd.p_hessian(spec.s, nu, rho))
        out = out._replace(curv=curv, sq=sq)
    return out


def pd_decide_p(spec: BlockSpec, pen: Penalties, small: Small, *outs: PassOut) -> dict:
    """The p step's curvature from the summed chunk shares (layer l >= 2)."""
    A, _ = spec.split_bias(small["W"])
    nu, o = penalty_nu(pen), spec.options
    t0 = shifted_theta0(A, *pd.p_hessian(spec.s, nu, pen.rho), small["theta_p"], o.step)
    theta, capped = _decide(outs, t0, o.backtrack_max)
    return {"theta": theta, "capped": capped}


def pd_pass_b(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, dec: dict | None,
              *order) -> PassOut:
    """The p step (l >= 2) and the chunk's W statistics; the constraint terms of L."""
    i, n = spec.i, spec.n
    o, w = (k - 1) % 2, k % 2
    if i == 1:
        z = get_live(ct, i, "z", o)
        return PassOut(w=_chunk_w_stats(1, get_data(ct, "X"), z))
    rho = pen.rho
    p_o = get_live(ct, i, "p", o)
    z, u, q_left = get_live(ct, i, "z", o), get_live(ct, i, "u", w), get_live(ct, i, "ql", w)
    assert dec is not None  # layers >= 2 are given the p step's decision
    if dec["capped"]:
        p = p_o
    else:  # the gradient pass A computed (and wrote into g)
        p = p_o - get_live(ct, i, "g", 0) / dec["theta"]
    put_live(ct, i, "p", w, p)
    d = p - q_left
    dd = float(np.sum(d * d))
    return PassOut(w=_chunk_w_stats(i, p, z),
                   stats=_stats(objective=(float(np.sum(u * d)) + 0.5 * rho * dd) / n,
                                primal_sq=dd, dual_sq=float(np.sum((p - p_o) ** 2))))


def pd_update_w(spec: BlockSpec, pen: Penalties, small: Small, dec: dict | None,
                gram: tuple | None, *outs: PassOut) -> Small:
    """W then b of layer l from the summed chunk statistics; the layer's new small state."""
    o, nu, n = spec.options, penalty_nu(pen), spec.n
    ws = _w_stats_of(spec.i, outs, gram)
    A, b = spec.split_bias(small["W"])
    A, th_w, _, cap_w = update_W_stats(A, b, ws, nu, n * pen.lam, small["theta_W"],
                                       o.backtrack_max, o.step)
    if b is not None:
        b = update_b(A, ws[2], ws[3], n, nu, pen.lam)
    new = dict(small)
    new.update({"W": A if b is None else np.hstack([A, b]), "theta_W": th_w, "rho": pen.rho,
                "nu": nu, "pending": 1.0, "lam": pen.lam, "capped": float(cap_w)})
    if dec is not None:
        new["theta_p"] = dec["theta"]
        new["capped"] += float(dec["capped"])
    return new


def pd_pass_c(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
              *order) -> PassOut:
    """The z step of layer l on one chunk; the layer's penalty terms of L."""
    i, n, act, opt = spec.i, spec.n, spec.act, spec.options
    o, w = (k - 1) % 2, k % 2
    nu = penalty_nu(pen)
    A, b = spec.split_bias(small["W"])
    p = get_data(ct, "X") if i == 1 else get_live(ct, i, "p", w)
    z_o = get_live(ct, i, "z", o)
    Z = _plus_bias(A @ p, b)
    if spec.is_output:
        Y = get_data(ct, "Y")
        z, nc = pd.update_z_output(spec.arch.loss, Y, Z, nu, z_o, opt.newton_max_iter)
        obj = loss_sum(spec.arch.loss, z, Y) / n
    else:
        q = get_live(ct, i, "q", w)
        c = q - p if spec.s else q
        z, nc = pd.update_z(c, Z, z_o, nu, act, opt.newton_max_iter)
        r2 = c - act.f(z)
        obj = 0.5 * nu * float(np.sum(r2 * r2)) / n
    put_live(ct, i, "z", w, z)
    r = z - Z
    obj += 0.5 * nu * float(np.sum(r * r)) / n
    return PassOut(stats=_stats(objective=obj, dual_sq=float(np.sum((z - z_o) ** 2)),
                                capped=nc))


def _dl_right(ct: ChunkTask, spec: BlockSpec, pen: Penalties, right: Small, o: int):
    """Layer l+1's backward values for layer l's a step: ``A, b, T, kappa, R``."""
    i, N = spec.i, spec.N
    A, b = spec.split_bias(right["W"])
    z = get_live(ct, i + 1, "z", BWD)
    if i + 1 == N:
        return A, b, z + get_live(ct, N, "u", o) / pen.rho, pen.rho, None
    R = get_live(ct, i + 1, "a", BWD) - spec.act.f(z) if spec.s_next else None
    return A, b, z, penalty_nu(pen), R


def _dl_grad(ct: ChunkTask, spec: BlockSpec, pen: Penalties, right: Small, o: int, a: Array,
             z: Array, left: Array) -> tuple[Array, Array]:
    c0 = spec.act.f(z)
    if spec.s:
        c0 = c0 + left
    A, b, T, kappa, R = _dl_right(ct, spec, pen, right, o)
    return a_grad(a, c0, A, b, T, kappa, R, spec.s_next, penalty_nu(pen)), A


def _dl_left(ct: ChunkTask, spec: BlockSpec, slot: int) -> Array:
    return get_data(ct, "X") if spec.i == 1 else get_live(ct, spec.i - 1, "a", slot)


def _a_hessian(spec: BlockSpec, pen: Penalties) -> tuple[float, float]:
    """``(c, kappa)`` of layer l's a-step Hessian (``kappa = rho`` next to the output)."""
    kappa = pen.rho if spec.i + 1 == spec.N else penalty_nu(pen)
    return a_hessian(kappa, spec.s_next, penalty_nu(pen))


def _curv(spec: BlockSpec, pen: Penalties, g: Array, A: Array) -> PassOut:
    curv, sq = shifted_curv(g, A, *_a_hessian(spec, pen))
    return PassOut(curv=curv, sq=sq)


def _dl_a_step(ct: ChunkTask, spec: BlockSpec, step: tuple[float, bool], a0: Array) -> Array:
    """The decided a step on one chunk, with the gradient its curvature pass wrote into
    ``g``: the reference's values (the same inputs gave it), read, not recomputed."""
    theta, capped = step
    if capped:
        return a0
    return a0 - get_live(ct, spec.i, "g", BWD) / theta


def _caps(small: Small, k: int) -> float:
    """Caps hit so far in iteration k (a small state of an earlier iteration counts 0)."""
    return float(small.get("capped", 0.0)) if small.get("k") == k else 0.0


def dl_decide_a(spec: BlockSpec, pen: Penalties, k: int, small: Small, right: Small,
                *outs: PassOut) -> Small:
    """The a step's curvature from the summed chunk shares; ``small`` with the new
    ``theta_a`` and the decision (``step``)."""
    A, _ = spec.split_bias(right["W"])
    o = spec.options
    t0 = shifted_theta0(A, *_a_hessian(spec, pen), small["theta_a"], o.step,
                        pen.backtrack_start)
    theta, capped = _decide(outs, t0, o.backtrack_max)
    new = dict(small)
    new.update({"theta_a": theta, "step": (theta, capped), "k": k,
                "capped": _caps(small, k) + float(capped)})
    return new


def dl_bwd_a(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, right: Small,
             *order) -> PassOut:
    """Backward sweep, layer l < L, pass 1: the a gradient's curvature sums."""
    o = (k - 1) % 2
    left = _dl_left(ct, spec, o)
    g, A = _dl_grad(ct, spec, pen, right, o, get_live(ct, spec.i, "a", o),
                    get_live(ct, spec.i, "z", o), left)
    put_live(ct, spec.i, "g", BWD, g)
    return _curv(spec, pen, g, A)


def dl_bwd_az(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
              *order) -> PassOut:
    """Backward sweep, layer l < L, pass 2: the a step, then z (old W); W statistics."""
    i, o, nu, opt = spec.i, (k - 1) % 2, penalty_nu(pen), spec.options
    left = _dl_left(ct, spec, o)
    z_o = get_live(ct, i, "z", o)
    a = _dl_a_step(ct, spec, small["step"], get_live(ct, i, "a", o))
    A, b = spec.split_bias(small["W"])
    c = a - left if spec.s else a
    z, nc = dl.update_z(c, _plus_bias(A @ left, b), nu, z_o, spec.act, opt.newton_max_iter)
    put_live(ct, i, "a", BWD, a)
    put_live(ct, i, "z", BWD, z)
    return PassOut(w=_chunk_w_stats(i, left, z), stats=_stats(capped=nc))


def dl_bwd_out(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
               *order) -> PassOut:
    """Backward sweep, layer L: the output z (old W); W statistics of ``T = z + u/rho``."""
    i, o, opt = spec.i, (k - 1) % 2, spec.options
    left = _dl_left(ct, spec, o)
    A, b = spec.split_bias(small["W"])
    u = get_live(ct, i, "u", o)
    Y = get_data(ct, "Y")
    z, nc = dl.update_z_output(spec.arch.loss, Y, _plus_bias(A @ left, b), u, pen.rho,
                               get_live(ct, i, "z", o), opt.newton_max_iter)
    put_live(ct, i, "z", BWD, z)
    return PassOut(w=_chunk_w_stats(i, left, z + u / pen.rho), stats=_stats(capped=nc))


def dl_update_w(spec: BlockSpec, pen: Penalties, k: int, small: Small, gram: tuple | None,
                backward: bool, *outs: PassOut) -> Small:
    """W and b of layer l from summed chunk statistics: backward b (old A) then W; forward W
    then b (new A)."""
    o, n = spec.options, spec.n
    kappa = pen.rho if spec.is_output else penalty_nu(pen)
    ws = _w_stats_of(spec.i, outs, gram)
    A, b = spec.split_bias(small["W"])
    if backward and b is not None:
        b = update_b(A, ws[2], ws[3], n, kappa, pen.lam)
    A, th_w, _, cap_w = update_W_stats(A, b, ws, kappa, n * pen.lam, small["theta_W"],
                                       o.backtrack_max, o.step, pen.backtrack_start)
    if not backward and b is not None:
        b = update_b(A, ws[2], ws[3], n, kappa, pen.lam)
    new = dict(small)
    new.pop("step", None)
    new.update({"W": A if b is None else np.hstack([A, b]), "theta_W": th_w, "lam": pen.lam,
                "k": k, "capped": _caps(small, k) + float(cap_w)})
    return new


def dl_fwd_z(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
             right: Small, *order) -> PassOut:
    """Forward sweep, layer l < L, pass 1: z with the new W, then the a gradient's sums."""
    i, o, w, nu, opt = spec.i, (k - 1) % 2, k % 2, penalty_nu(pen), spec.options
    left = _dl_left(ct, spec, w)
    a = get_live(ct, i, "a", BWD)
    A, b = spec.split_bias(small["W"])
    Z = _plus_bias(A @ left, b)
    c = a - left if spec.s else a
    z, nc = dl.update_z(c, Z, nu, get_live(ct, i, "z", BWD), spec.act, opt.newton_max_iter)
    put_live(ct, i, "z", w, z)
    g, Ar = _dl_grad(ct, spec, pen, right, o, a, z, left)
    put_live(ct, i, "g", BWD, g)
    r = z - Z
    return _curv(spec, pen, g, Ar)._replace(
        stats=_stats(objective=0.5 * nu * float(np.sum(r * r)) / spec.n,
                     dual_sq=float(np.sum((z - get_live(ct, i, "z", o)) ** 2)), capped=nc))


def dl_fwd_a(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
             *order) -> PassOut:
    """Forward sweep, layer l < L, pass 2: the a step; statistics of layer l+1's W step."""
    i, o, w, nu = spec.i, (k - 1) % 2, k % 2, penalty_nu(pen)
    left = _dl_left(ct, spec, w)
    z = get_live(ct, i, "z", w)
    a = _dl_a_step(ct, spec, small["step"], get_live(ct, i, "a", BWD))
    put_live(ct, i, "a", w, a)
    p = a - spec.act.f(z)
    if spec.s:
        p = p - left
    T = get_live(ct, i + 1, "z", BWD)
    if i + 1 == spec.N:
        T = T + get_live(ct, spec.N, "u", o) / pen.rho
    return PassOut(w=w_stats(a, T),
                   stats=_stats(objective=0.5 * nu * float(np.sum(p * p)) / spec.n,
                                dual_sq=float(np.sum((a - get_live(ct, i, "a", o)) ** 2))))


def dl_fwd_out(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
               *order) -> PassOut:
    """Forward sweep, layer L: the output z with the new W, then the multiplier."""
    i, o, w, rho, opt = spec.i, (k - 1) % 2, k % 2, pen.rho, spec.options
    left = _dl_left(ct, spec, w)
    A, b = spec.split_bias(small["W"])
    Z = _plus_bias(A @ left, b)
    u = get_live(ct, i, "u", o)
    Y = get_data(ct, "Y")
    z, nc = dl.update_z_output(spec.arch.loss, Y, Z, u, rho, get_live(ct, i, "z", BWD),
                               opt.newton_max_iter)
    u = dl.update_u(u, z, Z, rho)
    put_live(ct, i, "z", w, z)
    put_live(ct, i, "u", w, u)
    r = z - Z
    rr = float(np.sum(r * r))
    obj = loss_sum(spec.arch.loss, z, Y) / spec.n + \
        (float(np.sum(u * r)) + 0.5 * rho * rr) / spec.n
    return PassOut(stats=_stats(objective=obj, primal_sq=rr,
                                dual_sq=float(np.sum((z - get_live(ct, i, "z", o)) ** 2)),
                                capped=nc))


def plan_pdadmm(ctx: PlanContext, specs: list[BlockSpec], pen: Penalties, k: int,
                small: dict[int, str]) -> dict[int, str]:
    """pdADMM's iteration k, every layer at once: per layer pass A (pending q/u phases, p
    gradient) -> p curvature -> pass B (p step, W statistics) -> W, b -> pass C (z step)."""
    N, arch, gram = len(specs), specs[0].arch, ctx.gram
    chunk_tasks, small_task = ctx.chunk_tasks, ctx.small_task
    o, w = (k - 1) % 2, k % 2
    sm_keys: dict[int, str] = {}
    for i in range(1, N + 1):
        spec = specs[i - 1]
        reads = [f"b{i}/z/{o}"]
        writes = []
        if i < N:
            reads += [f"b{i}/q/{o}", f"b{i + 1}/p/{o}", f"b{i + 1}/u/{o}"]
            writes += [f"b{i}/q/{w}"]
        if i > 1:
            reads += [f"b{i}/p/{o}", f"b{i}/u/{o}", f"b{i - 1}/z/{o}", f"b{i - 1}/q/{o}"]
            if arch.skip(i - 1):
                reads.append(f"b{i - 1}/p/{o}")
            writes += [f"b{i}/u/{w}", f"b{i}/ql/{w}", f"b{i}/g/0"]
        a_refs = chunk_tasks("pd_a", i, pd_pass_a, (spec, pen, k, Ref(small[i])),
                             reads, writes)
        dec = None
        if i > 1:
            dec = Ref(small_task("pd_decide_p", i, pd_decide_p,
                                 (spec, pen, Ref(small[i]), *a_refs)))
        reads = [f"b{i}/z/{o}"]
        writes = []
        if i > 1:
            reads += [f"b{i}/p/{o}", f"b{i}/u/{w}", f"b{i}/ql/{w}", f"b{i}/g/0"]
            writes.append(f"b{i}/p/{w}")
        b_refs = chunk_tasks("pd_b", i, pd_pass_b, (spec, pen, k, dec),
                             reads, writes)
        sm = small_task("pd_update_w", i, pd_update_w,
                        (spec, pen, Ref(small[i]), dec, gram if i == 1 else None,
                         *b_refs))
        reads = [f"b{i}/z/{o}"] + ([f"b{i}/p/{w}"] if i > 1 else []) + \
            ([f"b{i}/q/{w}"] if i < N else [])
        chunk_tasks("pd_c", i, pd_pass_c, (spec, pen, k, Ref(sm)), reads,
                    [f"b{i}/z/{w}"])
        sm_keys[i] = sm
    return sm_keys


def plan_dladmm(ctx: PlanContext, specs: list[BlockSpec], pen: Penalties, k: int,
                small: dict[int, str]) -> dict[int, str]:
    """dlADMM's iteration k: the backward sweep (layer L..1; each a step two passes with its
    curvature between, then z and W) and the forward sweep (layer 1..L)."""
    N, gram = len(specs), ctx.gram
    chunk_tasks, small_task = ctx.chunk_tasks, ctx.small_task
    o, w = (k - 1) % 2, k % 2
    sm_keys: dict[int, str] = {}
    bwd: dict[int, str] = {}
    b_outs: dict[int, list[Ref]] = {}
    for i in range(N, 0, -1):
        spec = specs[i - 1]
        left = [f"b{i - 1}/a/{o}"] if i > 1 else []
        if i == N:
            outs = chunk_tasks("dl_bwd_out", i, dl_bwd_out,
                               (spec, pen, k, Ref(small[i])),
                               [*left, f"b{i}/z/{o}", f"b{i}/u/{o}"], [f"b{i}/z/{BWD}"])
            sm_a = small[i]
        else:
            right = [f"b{i + 1}/z/{BWD}"]
            if i + 1 == N:
                right.append(f"b{N}/u/{o}")
            elif spec.s_next:
                right.append(f"b{i + 1}/a/{BWD}")
            own = [f"b{i}/a/{o}", f"b{i}/z/{o}"]
            a_refs = chunk_tasks("dl_bwd_a", i, dl_bwd_a,
                                 (spec, pen, k, Ref(bwd[i + 1])), [*left, *own, *right],
                                 [f"b{i}/g/{BWD}"])
            sm_a = small_task("dl_decide_bwd", i, dl_decide_a,
                              (spec, pen, k, Ref(small[i]), Ref(bwd[i + 1]), *a_refs))
            outs = chunk_tasks("dl_bwd_az", i, dl_bwd_az, (spec, pen, k, Ref(sm_a)),
                               [*left, f"b{i}/a/{o}", f"b{i}/z/{o}", f"b{i}/g/{BWD}"],
                               [f"b{i}/a/{BWD}", f"b{i}/z/{BWD}"])
        b_outs[i] = outs
        bwd[i] = small_task("dl_update_w_bwd", i, dl_update_w,
                            (spec, pen, k, Ref(sm_a), gram if i == 1 else None, True,
                             *outs))
    stats_in = b_outs[1]
    for i in range(1, N + 1):
        spec = specs[i - 1]
        fw = small_task("dl_update_w_fwd", i, dl_update_w,
                        (spec, pen, k, Ref(bwd[i]), gram if i == 1 else None, False,
                         *stats_in))
        left = [f"b{i - 1}/a/{w}"] if i > 1 else []
        if i == N:
            chunk_tasks("dl_fwd_out", i, dl_fwd_out, (spec, pen, k, Ref(fw)),
                        [*left, f"b{i}/z/{BWD}", f"b{i}/z/{o}", f"b{i}/u/{o}"],
                        [f"b{i}/z/{w}", f"b{i}/u/{w}"])
            sm_keys[i] = fw
            continue
        right = [f"b{i + 1}/z/{BWD}"]
        if i + 1 == N:
            right.append(f"b{N}/u/{o}")
        elif spec.s_next:
            right.append(f"b{i + 1}/a/{BWD}")
        z_refs = chunk_tasks("dl_fwd_z", i, dl_fwd_z,
                             (spec, pen, k, Ref(fw), Ref(bwd[i + 1])),
                             [*left, f"b{i}/a/{BWD}", f"b{i}/z/{BWD}", f"b{i}/z/{o}",
                              *right], [f"b{i}/z/{w}", f"b{i}/g/{BWD}"])
        fin = small_task("dl_decide_fwd", i, dl_decide_a,
                         (spec, pen, k, Ref(fw), Ref(bwd[i + 1]), *z_refs))
        # the a step's gradient is in g; of layer l+1 only what its W statistics read
        t_next = [f"b{i + 1}/z/{BWD}", *([f"b{N}/u/{o}"] if i + 1 == N else [])]
        reads = [*left, f"b{i}/a/{BWD}", f"b{i}/z/{w}", f"b{i}/a/{o}", f"b{i}/g/{BWD}",
                 *t_next]
        stats_in = chunk_tasks("dl_fwd_a", i, dl_fwd_a, (spec, pen, k, Ref(fin)), reads,
                               [f"b{i}/a/{w}"])
        sm_keys[i] = fin
    return sm_keys
