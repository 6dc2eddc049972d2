"""Per-(block, chunk) tasks of the Zarr-resident engine for RADMM-2.

RADMM-2's hidden steps are proximal-linearized with backtracking (see
:mod:`daskadmm.splitting.radmm2`): a trial ``x+ = x - G/(eta + tau)`` is accepted when
``f(x+) <= f(x) + <G, delta> + (eta/2)||delta||^2``, else eta doubles. Every term of that test
is a sum over the samples, and so is the W gradient, but ``f`` is not quadratic, so unlike
pdADMM's and dlADMM's steps the test cannot be decided from two sums: each trial needs ``f``
at its own point, summed over every chunk. So a backtracked step is a small chain:

1. **gradient pass** (W step only): each chunk returns ``f`` at ``W^k`` and its share of the
   gradient (and, when the first trial's eta is the Lipschitz value, its share of ``V~ V~^T``
   and the maxima that value needs); a small task sums them.
2. **trial pass**: each chunk evaluates its share of ``f`` (and, for V, of ``<G, delta>`` and
   ``||delta||^2``) at the first :data:`W_LADDER` (V: :data:`V_LADDER`) trial points at once,
   a *ladder* of trials.
3. **decision** (a small task): the first accepted trial of the ladder, in trial order. When
   none is accepted and trials are left, the decision goes on by itself, one trial at a time,
   reading every chunk in turn (it declares those reads, so no later task overwrites them
   first). So the graph has the same shape whatever the data, and a step accepted within the
   ladder (almost all of them) costs one parallel pass of trials.
4. **step pass** (V only): each chunk writes its ``V_i^{k+1}`` (the gradient recomputed: the
   same function on the same inputs, so the same bits).

The exact steps are RADMM-3's: ``V_{N-1}`` is a column-separable solve (one pass, which also
returns its share of ``W_N``'s statistics), ``W_N`` a ridge solve of the summed statistics, and
``U_N``, ``Lam_N`` elementwise (one pass). Per hidden block and iteration that is four passes
over the chunks (three for block N-1) and three small tasks.

With one chunk every sum is the unchunked one in the same order, so the results are the
reference's bit for bit; with several chunks only the order of additions changes.

**Slots.** Iteration k reads slot ``(k-1) % 2`` and writes slot ``k % 2``. The small state of
a block travels through the graph: ``W``, the last accepted ``eta_W``, ``eta_V``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from ..model import Architecture, loss_sum
from ..splitting import BlockSpec, Penalties
from ..splitting import radmm2 as r2
from ..splitting.radmm3 import update_duals, update_preactivation, update_weights, weight_stats
from .common import (
    Array,
    ChunkTask,
    PlanContext,
    Small,
    get_data,
    get_live,
    put_live,
    state_layout,
    sum_partials,
)

__all__ = [
    "V_LADDER",
    "W_LADDER",
    "TrialOut",
    "init_small",
    "layout",
    "plan_iteration",
    "state_vars",
]


W_LADDER = 3
V_LADDER = 2
"""Trials of a backtracked W or V step evaluated in one parallel pass (the rest, if any, one
at a time by the decision task). Measured over 30 iterations at depth 4 and 16 on digits,
wine_red and synthetic (defaults): a V step starts at half its last eta and is accepted at
the second trial in 97% of steps (the third in the rest); a W step is accepted within 2
trials in 70-82% of steps, within 3 in 92-100%, within 4 in 99.6-100%."""


def state_vars(arch: Architecture, i: int) -> tuple[str, ...]:
    """The sample-sized variables of block i: ``V_i`` (hidden), ``U_N`` and ``Lam_N``."""
    return ("V",) if i < arch.depth else ("U", "Lam")


def layout(arch: Architecture) -> list[dict[str, tuple]]:
    """The store: ``W`` and the state variables of each block."""
    return state_layout(arch, state_vars)


def init_small(arch: Architecture, weights: list[Array]) -> list[Small]:
    """The small state of iteration 0 (as :func:`~daskadmm.splitting.radmm2.init_state`)."""
    return [{"W": np.array(W, copy=True), **({"eta_W": 0.0, "eta_V": 0.0}
                                             if i < arch.depth else {})}
            for i, W in enumerate(weights, start=1)]


class TrialOut(NamedTuple):
    """What a RADMM-2 chunk pass returns (every field optional): its statistics, its share
    ``w`` of ``W_N``'s statistics ``(V~ V~^T, (rho U + Lam) V~^T)``, the objective ``f0`` at the
    current point, its share ``grad`` of the W gradient's data term, ``gram`` (``V~ V~^T``),
    ``cmax`` / ``r2max`` (the maxima the Lipschitz values need), ``trials``: per trial of
    the ladder, ``(f,)`` (W) or ``(f, <G, delta>, ||delta||^2)`` (V), and ``guess``: the V
    trial already written and its statistics."""

    stats: dict[str, float] | None = None
    w: tuple | None = None
    f0: float = 0.0
    grad: Array | None = None
    gram: Array | None = None
    cmax: float = 0.0
    r2max: float = 0.0
    trials: tuple = ()
    guess: tuple[int, dict[str, float] | None] | None = None


def _left(ct: ChunkTask, spec: BlockSpec, k: int) -> Array:
    """``V_{i-1}`` of iteration k (X for block 1)."""
    if spec.i == 1:
        return get_data(ct, "X")
    return get_live(ct, spec.i - 1, "V", k % 2)


def _w_inputs(ct: ChunkTask, spec: BlockSpec, k: int) -> tuple[Array, Array]:
    """``(c, V~_{i-1})`` of the chunk for block i's W step of iteration k."""
    Vleft = _left(ct, spec, k)
    return r2.w_target(spec, get_live(ct, spec.i, "V", (k - 1) % 2), Vleft), spec.aug(Vleft)


def _sum(values: Iterable[float]) -> float:
    """Left to right from 0.0, as the reference adds (builtin ``sum`` may compensate)."""
    total = 0.0
    for v in values:
        total += v
    return total


def _first_accepted(eta0: float, max_trials: int, outs: tuple[TrialOut, ...],
                    later: Callable[[int], list[tuple]],
                    accepted: Callable[[float, list[tuple]], bool]) -> tuple[int, float] | None:
    """``(t, eta)`` of the first trial whose chunk shares pass ``accepted(eta, shares)``: the
    shares from the ladder in ``outs`` or, past it, from ``later(t)`` (evaluated here, chunk by
    chunk); None when no trial passes (capped)."""
    ladder = len(outs[0].trials)
    for t, eta in r2.trial_etas(eta0, 0, max_trials):
        if accepted(eta, [o.trials[t] for o in outs] if t < ladder else later(t)):
            return t, eta
    return None


# ---------------------------------------------------------------------------------------------
# Hidden W step
# ---------------------------------------------------------------------------------------------

def w_grad_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                right: Small | None, *order) -> TrialOut:
    """The data term at ``W_i^k`` and its gradient share; the Gram matrix and ``max|c|`` when
    the first trial needs the Lipschitz value, and ``max|R_{i+1}|`` for the V step's."""
    c, Vt = _w_inputs(ct, spec, k)
    f0, grad = r2.w_fit_grad(spec, pen, c, Vt, small["W"])
    out = TrialOut(f0=f0, grad=grad)
    if r2.needs_lipschitz(spec, small["eta_W"]):
        out = out._replace(gram=Vt @ Vt.T, cmax=float(np.abs(c).max()))
    if right is not None and spec.i < spec.N - 1 and r2.v_needs_max(spec, small["eta_V"]):
        o = (k - 1) % 2
        R2, _ = r2.v_next_residual(spec, right["W"], get_live(ct, spec.i + 1, "V", o),
                                   get_live(ct, spec.i, "V", o))
        out = out._replace(r2max=float(np.abs(R2).max()))
    return out


def w_decide_grad(spec: BlockSpec, pen: Penalties, small: Small, right: Small,
                  *outs: TrialOut) -> dict:
    """The W gradient and objective from the summed shares, and the first trials' etas of
    the W and V steps."""
    (grad,) = sum_partials(*[(o.grad,) for o in outs])
    W = small["W"]
    gram = [(o.gram,) for o in outs if o.gram is not None]

    def lip_w() -> float:
        return r2.w_lipschitz(spec, pen, sum_partials(*gram)[0], max(o.cmax for o in outs))

    def lip_v() -> float:
        return r2.v_lipschitz(spec, pen, r2.right_norm_sq(spec, right["W"]),
                              max(o.r2max for o in outs))

    return {"grad": r2.w_gradient(spec, pen, W, grad),
            "f0": _sum(o.f0 for o in outs) + r2.w_reg(spec, pen, W),
            "eta0": r2.eta_start(spec, small["eta_W"], lip_w),
            "eta0_v": (r2.eta_start(spec, small["eta_V"], lip_v) if spec.i < spec.N - 1
                       else 0.0)}


def _w_trials(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, W: Array, dec: dict,
              start: int, stop: int) -> tuple:
    c, Vt = _w_inputs(ct, spec, k)
    return tuple((r2.w_fit(spec, pen, c, Vt, r2.trial_step(W, dec["grad"], eta, pen.tau)[0]),)
                 for _, eta in r2.trial_etas(dec["eta0"], start, stop))


def w_trial_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                 dec: dict, *order) -> TrialOut:
    """The chunk's data term at the ladder's trial points."""
    stop = min(W_LADDER, spec.options.backtrack_max)
    return TrialOut(trials=_w_trials(ct, spec, pen, k, small["W"], dec, 0, stop))


def w_decide(spec: BlockSpec, pen: Penalties, k: int, small: Small, dec: dict,
             cts: tuple[ChunkTask, ...], *outs: TrialOut) -> Small:
    """The first accepted trial of the W step (trials past the ladder evaluated here, chunk
    by chunk); the block's small state with the new ``W`` and ``eta_W``."""
    W, grad, tau, max_trials = small["W"], dec["grad"], pen.tau, spec.options.backtrack_max

    def accepted(eta: float, fits: list[tuple]) -> bool:
        Wn, delta = r2.trial_step(W, grad, eta, tau)
        return r2.accepts(_sum(f[0] for f in fits) + r2.w_reg(spec, pen, Wn), dec["f0"],
                          float(np.sum(grad * delta)), float(np.sum(delta * delta)), eta)

    hit = _first_accepted(dec["eta0"], max_trials, outs, lambda t: [
        _w_trials(ct, spec, pen, k, W, dec, t, t + 1)[0] for ct in cts], accepted)
    new = dict(small)
    if hit is None:
        new.update({"eta_W": r2.capped_eta(dec["eta0"], max_trials), "capped": 1.0})
    else:
        new.update({"W": r2.trial_step(W, grad, hit[1], tau)[0], "eta_W": hit[1],
                    "capped": 0.0})
    new["lam"] = pen.lam
    return new


# ---------------------------------------------------------------------------------------------
# Hidden V step (i < N-1) and the exact V_{N-1} step
# ---------------------------------------------------------------------------------------------

def _v_inputs(ct: ChunkTask, spec: BlockSpec, k: int, small: Small):
    """``(Z_i, base, V_{i+1}^k, V_i^k, V_{i-1}^{k+1})`` of the chunk (``Z_i = W_i V~_{i-1}``
    with the new ``W_i``)."""
    o = (k - 1) % 2
    Vleft = _left(ct, spec, k)
    Z = small["W"] @ spec.aug(Vleft)
    return (Z, r2.v_base(spec, Z, Vleft), get_live(ct, spec.i + 1, "V", o),
            get_live(ct, spec.i, "V", o), Vleft)


def _v_trials(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
              right: Small, eta0: float, start: int, stop: int, guess: int = -1
              ) -> tuple[float, tuple, dict[str, float] | None]:
    """``f(V^k)`` on the chunk, its shares per trial ``start .. stop-1`` and, for trial
    ``guess``, the step written to slot ``k % 2`` with its statistics."""
    Z, base, Vr, V, Vleft = _v_inputs(ct, spec, k, small)
    grad, R2 = r2.v_gradient(spec, pen, base, right["W"], Vr, V)
    trials = []
    stats = None
    for t, eta in r2.trial_etas(eta0, start, stop):
        Vn, delta = r2.trial_step(V, grad, eta, pen.tau)
        trials.append((r2.v_value(spec, pen, base, right["W"], Vr, Vn),
                       float(np.sum(grad * delta)), float(np.sum(delta * delta))))
        if t == guess:
            put_live(ct, spec.i, "V", k % 2, Vn)
            stats = _hidden_stats(spec, pen, Z, Vn, V, Vleft)
    return r2.v_value(spec, pen, base, right["W"], Vr, V, R2), tuple(trials), stats


def _guess(spec: BlockSpec, small: Small, ladder: int) -> int:
    """The trial most likely accepted: the second (eta back at its last accepted value) when
    backtracking starts from half of it, else the first."""
    return min(ladder - 1, 1 if not r2.needs_lipschitz(spec, small["eta_V"]) else 0)


def v_trial_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                 right: Small, dec: dict, *order) -> TrialOut:
    """The chunk's shares of ``f(V^k)`` and, per trial of the ladder, of ``f``,
    ``<G, delta>`` and ``||delta||^2``; the most likely trial's step is written now (the
    step pass rewrites it only when the decision differs)."""
    stop = min(V_LADDER, spec.options.backtrack_max)
    g = _guess(spec, small, stop)
    f0, trials, stats = _v_trials(ct, spec, pen, k, small, right, dec["eta0_v"], 0, stop, g)
    return TrialOut(f0=f0, trials=trials, guess=(g, stats))


def v_decide(spec: BlockSpec, pen: Penalties, k: int, small: Small, right: Small, dec: dict,
             cts: tuple[ChunkTask, ...], *outs: TrialOut) -> Small:
    """The first accepted trial of the V step (past the ladder: here, chunk by chunk); the
    block's small state with ``eta_V`` and the decision ``step = (eta, capped, trial)``."""
    f0 = _sum(o.f0 for o in outs)
    eta0, max_trials = dec["eta0_v"], spec.options.backtrack_max

    def accepted(eta: float, parts: list[tuple]) -> bool:
        return r2.accepts(_sum(p[0] for p in parts), f0, _sum(p[1] for p in parts),
                          _sum(p[2] for p in parts), eta)

    hit = _first_accepted(eta0, max_trials, outs, lambda t: [
        _v_trials(ct, spec, pen, k, small, right, eta0, t, t + 1)[1][0] for ct in cts], accepted)
    new = dict(small)
    if hit is None:
        eta = r2.capped_eta(eta0, max_trials)
        new.update({"eta_V": eta, "step": (eta, True, -1), "capped": small["capped"] + 1.0})
    else:
        new.update({"eta_V": hit[1], "step": (hit[1], False, hit[0])})
    return new


def v_step_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                right: Small, tried: TrialOut, *order) -> TrialOut:
    """The decided V step on the chunk in slot ``k % 2`` and its statistics: nothing to do
    when the trial pass's guess was the accepted trial, else the step (the gradient
    recomputed: the same function on the same inputs, so the same bits) written over it."""
    eta, capped, t = small["step"]
    assert tried.guess is not None  # the V trial pass always guesses
    if t == tried.guess[0]:
        return TrialOut(stats=tried.guess[1])
    Z, base, Vr, V0, Vleft = _v_inputs(ct, spec, k, small)
    V = V0
    if not capped:
        grad, _ = r2.v_gradient(spec, pen, base, right["W"], Vr, V0)
        V = r2.trial_step(V0, grad, eta, pen.tau)[0]
    put_live(ct, spec.i, "V", k % 2, V)
    return TrialOut(stats=_hidden_stats(spec, pen, Z, V, V0, Vleft))


def _hidden_stats(spec: BlockSpec, pen: Penalties, Z: Array, V: Array, V0: Array,
                  Vleft: Array) -> dict[str, float]:
    return {"objective": r2.activation_penalty(spec, pen, V, Z, Vleft),
            "dual_sq": float(np.sum((V - V0) ** 2))}


def v_last_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
                right: Small, *order) -> TrialOut:
    """The exact ``V_{N-1}`` step on the chunk; its share of ``W_N``'s statistics."""
    o, N = (k - 1) % 2, spec.N
    Vleft = _left(ct, spec, k)
    V0 = get_live(ct, spec.i, "V", o)
    nxt: r2.State = {"W": right["W"], "U": get_live(ct, N, "U", o),
                     "Lam": get_live(ct, N, "Lam", o)}
    Z = small["W"] @ spec.aug(Vleft)
    V = r2.update_activation_last(spec, pen, {"V": V0}, small["W"], Vleft, nxt, Z)
    put_live(ct, spec.i, "V", k % 2, V)
    return TrialOut(stats=_hidden_stats(spec, pen, Z, V, V0, Vleft),
                    w=weight_stats(spec.aug(V), nxt["U"], nxt["Lam"], pen.rho))


# ---------------------------------------------------------------------------------------------
# Output block
# ---------------------------------------------------------------------------------------------

def sum_w(*outs: TrialOut) -> tuple:
    """``W_N``'s statistics summed over the chunks in chunk order (on block N-1's worker, where
    the chunk outputs are: one ``d x d`` pair travels)."""
    parts: list[tuple] = []
    for o in outs:
        assert o.w is not None  # passes that carry W_N's statistics
        parts.append(o.w)
    return sum_partials(*parts)


def out_update_w(spec: BlockSpec, pen: Penalties, small: Small, stats: tuple) -> Small:
    """``W_N`` from the summed statistics (RADMM-3's exact step)."""
    G, B = stats
    return {**small, "W": update_weights(small["W"], G, B, pen, spec.n), "lam": pen.lam,
            "capped": 0.0}


def out_pass(ct: ChunkTask, spec: BlockSpec, pen: Penalties, k: int, small: Small,
             *order) -> TrialOut:
    """``U_N`` (prox of the loss) and ``Lam_N`` on the chunk; the loss and constraint terms."""
    o, w, N = (k - 1) % 2, k % 2, spec.N
    Vleft = _left(ct, spec, k)
    Y = get_data(ct, "Y")
    Z = small["W"] @ spec.aug(Vleft)
    U0, Lam0 = get_live(ct, N, "U", o), get_live(ct, N, "Lam", o)
    U, capped = update_preactivation(spec, pen, U0, Z, Lam0, None, Y)
    Lam = update_duals(Lam0, U, Z, pen.rho)
    put_live(ct, N, "U", w, U)
    put_live(ct, N, "Lam", w, Lam)
    r = U - Z
    return TrialOut(stats={
        "objective": loss_sum(spec.arch.loss, U, Y) / spec.n + r2.output_constraint(
            spec, pen, Lam, r),
        "primal_sq": float(np.sum(r * r)), "capped": float(capped)})


# ---------------------------------------------------------------------------------------------
# One iteration's tasks
# ---------------------------------------------------------------------------------------------

def plan_iteration(ctx: PlanContext, specs: list[BlockSpec], pen: Penalties, k: int,
                   small: dict[int, str]) -> dict[int, str]:
    """Append iteration k's tasks through ``ctx`` (:class:`~daskadmm.chunks.common.PlanContext`).
    ``small``: the keys of the blocks' small states of iteration k-1. Returns those of
    iteration k."""
    from ..graph.nodes import Ref

    chunk_tasks, small_task, reader, after, cts = (ctx.chunk_tasks, ctx.small_task, ctx.reader,
                                                   ctx.after, ctx.cts)
    N = len(specs)  # >= 2
    o, w = (k - 1) % 2, k % 2
    new: dict[int, str] = {}
    stats_in: list = []  # W_N's statistics: from block N-1's V pass
    for i in range(1, N):
        spec = specs[i - 1]
        left = [f"b{i - 1}/V/{w}"] if i > 1 else []
        own = [*left, f"b{i}/V/{o}"]
        nxt = [f"b{i + 1}/V/{o}"] if i < N - 1 else [f"b{N}/U/{o}", f"b{N}/Lam/{o}"]
        right = Ref(small[i + 1])
        g = chunk_tasks("r2_w_grad", i, w_grad_pass, (spec, pen, k, Ref(small[i]), right),
                        [*own, *nxt[:1]] if i < N - 1 else own, ())
        dec = small_task("r2_w_decide_grad", i, w_decide_grad,
                         (spec, pen, Ref(small[i]), right, *g))
        t = chunk_tasks("r2_w_trials", i, w_trial_pass, (spec, pen, k, Ref(small[i]), Ref(dec)),
                        own, ())
        sw = small_task("r2_w_decide", i, w_decide,
                        (spec, pen, k, Ref(small[i]), Ref(dec), cts, *t))
        reader(sw, own)
        if i < N - 1:
            t = chunk_tasks("r2_v_trials", i, v_trial_pass,
                            (spec, pen, k, Ref(sw), right, Ref(dec)), [*own, *nxt],
                            [f"b{i}/V/{w}"])
            sv = small_task("r2_v_decide", i, v_decide,
                            (spec, pen, k, Ref(sw), right, Ref(dec), cts, *t))
            reader(sv, [*own, *nxt])
            # (writes V only when the decision is not the trial pass's guess, which it wrote)
            chunk_tasks("r2_v_step", i, v_step_pass, (spec, pen, k, Ref(sv), right),
                        [*own, *nxt], [f"b{i}/V/{w}?"], each=t)
            new[i] = sv
        else:
            stats_in = chunk_tasks("r2_v_last", i, v_last_pass, (spec, pen, k, Ref(sw), right),
                                   [*own, *nxt], [f"b{i}/V/{w}"])
            new[i] = sw
    spec = specs[N - 1]
    ws = small_task("r2_sum_w", N - 1, sum_w, tuple(stats_in))
    sm = small_task("r2_out_update_w", N, out_update_w, (spec, pen, Ref(small[N]), Ref(ws)))
    # the output block's chunk tasks read V_{N-1}, which block N-1's chunk tasks wrote: they
    # wait for W_N (which they take anyway), not for those tasks' outputs (d x d statistics)
    after(sm, stats_in)
    chunk_tasks("r2_out", N, out_pass, (spec, pen, k, Ref(sm)),
                [f"b{N - 1}/V/{w}", f"b{N}/U/{o}", f"b{N}/Lam/{o}"],
                [f"b{N}/U/{w}", f"b{N}/Lam/{w}"])
    new[N] = sm
    return new
