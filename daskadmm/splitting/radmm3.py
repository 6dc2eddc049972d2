"""RADMM-3 (3-splitting proximal ADMM) and RADMM-3L (its proximal-linearized variant).

Variables per block i: weights ``W_i``, pre-activations ``U_i`` (``U_N`` is the network output),
block outputs ``V_i`` (i < N) and n-scaled multipliers ``Lam_i`` of ``U_i = W_i V~_{i-1}``::

    L = l(U_N; Y) + (lam/2) sum_i ||W_i||^2
      + (beta/2n) sum_{i<N} ||V_i - s_i V_{i-1} - sigma(U_i)||^2
      + sum_i [ <Lam_i, U_i - W_i V~_{i-1}>/n + (rho/2n) ||U_i - W_i V~_{i-1}||^2 ]

One iteration sweeps the blocks i = 1..N (Gauss-Seidel); block i updates W_i, U_i, Lam_i, V_i in
that order, each with a proximal term ``(tau/2n)||x - x^k||^2``. Block i needs ``V_{i-1}`` of
the current iteration (its left neighbour) and block i+1's state of the previous iteration (its
right neighbour): :func:`block_update` takes exactly those.

The update functions are split so that the sample-sized work can run per chunk of samples:
``weight_stats`` (per chunk, summed), ``update_weights`` (d x d), then :func:`column_update`
(every step after W, one sample at a time), which the reference and the chunked engine share.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np

from ..model import Architecture, forward, loss_grad_n, loss_sum
from . import fused
from .base import (
    BlockSpec,
    Options,
    Penalties,
    Stats,
    StepOut,
    block_lam,
    block_penalties,
    float_type,
    lambda_max,
    piecewise_kind,
    prox_activation,
    prox_output,
    spd_solve,
    spd_solve_right,
)

__all__ = [
    "block_objective",
    "block_update",
    "augmented",
    "column_update",
    "init_state",
    "solve_activation",
    "update_activation",
    "update_activation_linearized",
    "update_duals",
    "update_preactivation",
    "update_weights",
    "update_weights_linearized",
    "weight_rhs",
    "weight_stats",
]

Array = np.ndarray


class State(TypedDict, total=False):
    """Block i's variables: ``W_i``, ``U_i``, ``Lam_i``; ``V_i`` (i < N); RADMM-3A's ``Gam_i``
    (i < N). A set of samples' columns of them where a function takes a part."""

    W: Array
    U: Array
    Lam: Array
    V: Array
    Gam: Array


class Scratch:
    """Work arrays of one block update: handed out by shape, given back when dead, handed out
    again. A fresh array of tens of MB is page-faulting, zero-filled memory (a third of an
    iteration's CPU time at width 512 went to the kernel), so a block update allocates each
    shape a few times instead of once per temporary. Only the arrays handed out and never given
    back (the update's results) outlive the update. New arrays are C-ordered, of the type of
    ``like`` (an ndarray subclass stays one) and its float type (float32 or float64); what is
    given back must be C-ordered arrays of that type."""

    def __init__(self, like: Array | None = None) -> None:
        self._free: dict[tuple, list[Array]] = {}
        self._like = like
        self.dtype = float_type(like) if like is not None else np.dtype(np.float64)

    def get(self, shape: tuple) -> Array:
        free = self._free.get(tuple(shape))
        if free:
            return free.pop()
        if self._like is None:
            return np.empty(shape)
        return np.empty_like(self._like, dtype=self.dtype, order="C", shape=shape)

    def put(self, *arrays: Array | None) -> None:
        for a in arrays:
            if a is not None:
                self._free.setdefault(a.shape, []).append(a)


def _get(pool: Scratch | None, shape: tuple, like: Array | None = None) -> Array:
    """A C-ordered scratch array: from ``pool``, else new, of ``like``'s float type."""
    if pool is not None:
        return pool.get(shape)
    return np.empty(shape, dtype=float_type(like) if like is not None else np.float64)


def augmented(V: Array, bias: bool, pool: Scratch | None = None) -> Array:
    """``V~ = [V; 1^T]`` with a bias (an array from ``pool``, if given), else ``V`` itself:
    :func:`daskadmm.model.augment`'s values."""
    if not bias:
        return V
    Vt = _get(pool, (V.shape[0] + 1, V.shape[1]), V)
    Vt[:-1] = V
    Vt[-1] = 1.0
    return Vt


def _sigma_into(act, U: Array, out: Array) -> Array:
    if act.f_into is not None:
        return act.f_into(U, out)
    out[...] = act.f(U)
    return out


def weight_stats(Vt: Array, U: Array, Lam: Array, rho: float,
                 pool: Scratch | None = None) -> tuple[Array, Array]:
    """Sufficient statistics of the W subproblem over a set of samples (additive over chunks).

    Returns ``G = V~ V~^T`` and ``B = (rho U + Lam) V~^T``.
    """
    return Vt @ Vt.T, weight_rhs(Vt, U, Lam, rho, pool)


def weight_rhs(Vt: Array, U: Array, Lam: Array, rho: float,
               pool: Scratch | None = None) -> Array:
    """``B = (rho U + Lam) V~^T`` of :func:`weight_stats` (``rho U + Lam`` in one compiled
    loop where :mod:`~daskadmm.splitting.fused` has one, the same bits)."""
    T = _get(pool, U.shape, U)
    compiled = fused.elementwise_for(T, U, Lam)
    if compiled is not None:
        compiled.scaled_sum(U.reshape(-1), T.dtype.type(rho), Lam.reshape(-1), T.reshape(-1))
    else:
        np.multiply(U, float(rho), out=T)
        T += Lam
    B = T @ Vt.T
    if pool is not None:
        pool.put(T)
    return B


def update_weights(W: Array, G: Array, B: Array, pen: Penalties, n: int) -> Array:
    """Exact W step (ridge regression, one SPD solve of size ``d_{i-1}`` (+1 with a bias)).

    Notes
    -----
    Solves ``argmin_W (lam/2)||W||^2 + <Lam, U - W V~>/n + (rho/2n)||U - W V~||^2
    + (tau/2n)||W - W^k||^2``, whose optimality condition is::

        W (rho G + (n lam + tau) I) = B + tau W^k,   G = V~ V~^T,  B = (rho U + Lam) V~^T
    """
    M = pen.rho * G
    M[np.diag_indices_from(M)] += n * pen.lam + pen.tau
    return spd_solve_right(M, B + pen.tau * W)


def update_weights_linearized(W: Array, G: Array, B: Array, pen: Penalties, n: int) -> Array:
    """Proximal-linearized W step (RADMM-3L): one gradient step with the exact step constant.

    Notes
    -----
    ``W+ = W - G_W / (eta_W + tau)`` with the gradient of n L in W::

        G_W = n lam W - (Lam + rho (U - W V~)) V~^T = n lam W - B + rho W G
        eta_W = rho lambda_max(G) + n lam

    (``eta_W`` is the exact curvature: the Hessian of n L in W is ``(rho G + n lam I) (x) I``).
    The step minimises the linearization plus ``((eta_W + tau)/2)||W - W^k||^2``.
    """
    grad = n * pen.lam * W - B + pen.rho * (W @ G)
    eta = pen.rho * lambda_max(G) + n * pen.lam
    return W - grad / (eta + pen.tau)


def update_preactivation(spec: BlockSpec, pen: Penalties, U: Array, Z: Array, Lam: Array,
                         c: Array | None, Y: Array | None, *,
                         sigma_out: Array | None = None,
                         pool: Scratch | None = None) -> tuple[Array, int]:
    """U step: elementwise prox (hidden blocks) or prox of the loss (output block).

    Notes
    -----
    With ``Z = W^{k+1} V~_{i-1}``, ``kappa = rho + tau`` and ``m = (rho Z - Lam + tau U^k)/kappa``:

    - i < N: ``argmin_u (beta/2)(c - sigma(u))^2 + (kappa/2)(u - m)^2`` elementwise, with
      ``c = V_i^k - s_i V_{i-1}^{k+1}`` (see :func:`~daskadmm.splitting.base.prox_activation`);
    - i = N: ``argmin_U n l(U; Y) + (kappa/2)||U - m||^2``; for MSE
      ``U_N = (Y + rho Z - Lam + tau U^k) / (1 + rho + tau)``.

    Returns ``(U, n_capped)``; a hidden block writes ``sigma(U)`` into ``sigma_out`` if given.
    """
    kappa = pen.rho + pen.tau
    m = preactivation_target(Z, Lam, U, pen.rho, pen.tau, _get(pool, Z.shape, Z), sigma_out,
                             pool)
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        out = prox_output(spec.arch.loss, Y, m, kappa, U, spec.options.newton_max_iter)
    else:
        assert c is not None  # a hidden block is given c
        out = prox_activation(c, m, pen.beta, kappa, U, spec.act, spec.options.newton_max_iter,
                              sigma_out=sigma_out,
                              out=None if pool is None else pool.get(U.shape))
    if pool is not None:
        pool.put(m)  # the results are new arrays
    return out


def preactivation_target(Z: Array, Lam: Array, U: Array, rho: float, tau: float, out: Array,
                         spare: Array | None = None, pool: Scratch | None = None) -> Array:
    """The U step's ``m = (rho Z - Lam + tau U^k) / kappa`` (``kappa = rho + tau``) into
    ``out``, computed as ``((Z rho - Lam) + U tau) / kappa``: in one compiled loop with Numba
    (:mod:`daskadmm.splitting.fused`) where every array is C-contiguous of one type, else in
    NumPy, with ``spare`` (or a pool array) for ``U tau``; the same bits either way (the
    penalties as Python floats: NumPy 2 computes with them in the arrays' type)."""
    rho, tau = float(rho), float(tau)
    kappa = rho + tau
    compiled = fused.elementwise_for(out, Z, Lam, U)
    if compiled is not None:
        f = out.dtype.type
        compiled.preactivation_target(Z.reshape(-1), Lam.reshape(-1), U.reshape(-1),
                                      out.reshape(-1), f(rho), f(tau), f(kappa))
        return out
    m = np.multiply(Z, rho, out=out)
    m -= Lam
    tmp = spare if spare is not None else _get(pool, U.shape, U)  # free until the prox
    m += np.multiply(U, tau, out=tmp)
    m /= kappa
    if pool is not None and tmp is not spare:
        pool.put(tmp)
    return m


def update_duals(Lam: Array, U: Array, Z: Array, rho: float, r: Array | None = None,
                 out: Array | None = None, r_out: Array | None = None) -> Array:
    """Multiplier step ``Lam <- Lam + rho (U - W V~)`` (dual ascent with step rho n),
    computed as ``(U - Z) rho + Lam``; ``r``: ``U - W V~`` if already computed; ``r_out``:
    where to write ``U - Z`` as well (without ``r``; it may be ``Z``); ``out``: an array for
    the result (not ``Lam``: the NumPy passes overwrite it before they add it). One compiled
    loop where :mod:`~daskadmm.splitting.fused` has one (the same bits as the NumPy
    passes)."""
    rho = float(rho)
    if out is None:
        out = np.empty(U.shape, dtype=float_type(U, Z, Lam))
    compiled = fused.elementwise_for(out, U, Z, Lam,
                                     *(a for a in (r, r_out) if a is not None))
    if compiled is not None:
        f = out.dtype.type(rho)
        if r is None:
            compiled.dual_step(U.reshape(-1), Z.reshape(-1), f, Lam.reshape(-1),
                               None if r_out is None else r_out.reshape(-1), out.reshape(-1))
        else:
            compiled.scaled_sum(r.reshape(-1), f, Lam.reshape(-1), out.reshape(-1))
        return out
    if r is None:
        r = np.subtract(U, Z, out=r_out)
        out = np.multiply(r, rho, out=out)
    else:
        out = np.multiply(r, rho, out=out)
    out += Lam
    return out


def _activation_rhs(spec: BlockSpec, pen: Penalties, Vleft: Array, Uown: Array,
                    right: State, sigma_own: Array | None = None,
                    pool: Scratch | None = None) -> tuple[Array, Array, Array]:
    """Pieces shared by both V steps: ``A_{i+1}``, the right-hand side without ``tau V^k``
    and a work array of its shape. ``sigma_own``: ``sigma(U_i)`` if already computed.

    In place, operation for operation the formula
    ``beta sigma(U_i) + beta s V_{i-1} + beta s' (V_{i+1} - sigma(U_{i+1}))
    + A^T (rho (U_{i+1} - b) + Lam_{i+1})``."""
    act, s, s2 = spec.act, spec.s, spec.s_next
    A, b = spec.split_bias(right["W"])
    shape = Uown.shape
    rhs = _get(pool, shape, Uown)  # C-ordered: the result (V, after the solve)
    work = _get(pool, shape, Uown)  # C-ordered: the product below goes into it
    sig = act.f(Uown) if sigma_own is None else sigma_own
    beta, rho = float(pen.beta), float(pen.rho)  # computed in the arrays' type, as fused
    T = _get(pool, right["U"].shape, right["U"])
    Vl = Vleft if s else sig  # (X, for block 1, has another shape: not read then)
    Vr = right["V"] if s2 else sig
    compiled = fused.elementwise_for(rhs, sig, Vl, right["U"], Vr, right["Lam"], T)
    if compiled is not None and (b is None or b.dtype == rhs.dtype):
        f = rhs.dtype.type
        if s2 and act.slope is None:  # a smooth sigma(U_{i+1}): NumPy's, then the loop
            kind, Ur = -1, _sigma_into(act, right["U"], work)
        else:
            kind, Ur = (piecewise_kind(act.slope) if act.slope is not None else -1), right["U"]
        compiled.activation_rhs_pass(
            kind, sig.reshape(-1), Vl.reshape(-1), Vr.reshape(-1), Ur.reshape(-1),
            rhs.reshape(-1), bool(s), bool(s2), f(beta),
            f(act.slope if act.slope is not None else 0.0), f(0.0))
        compiled.shifted_target(right["U"], (b if b is not None else A[:, :1]).reshape(-1),
                                right["Lam"], T, b is not None, f(rho))
    else:
        np.multiply(sig, beta, out=rhs)
        if s:
            rhs += np.multiply(Vleft, beta, out=work)
        if s2:
            _sigma_into(act, right["U"], work)
            np.subtract(right["V"], work, out=work)
            work *= beta
            rhs += work
        if b is None:
            np.multiply(right["U"], rho, out=T)
        else:
            np.subtract(right["U"], b, out=T)
            T *= rho
        T += right["Lam"]
    rhs += np.matmul(A.T, T, out=work)
    if pool is not None:
        pool.put(T)
    return A, rhs, work


def update_activation(spec: BlockSpec, pen: Penalties, V: Array, Vleft: Array, Uown: Array,
                      right: State, sigma_own: Array | None = None,
                      pool: Scratch | None = None) -> Array:
    """Exact V step (i < N): one SPD solve of size d with n right-hand sides.

    Notes
    -----
    Minimises the terms of n L that contain ``V_i`` plus ``(tau/2)||V - V^k||^2``; with
    ``W_{i+1} = [A, b]`` (iteration k), ``s' = s_{i+1}`` (0 for i = N-1)::

        [(beta (1 + s') + tau) I + rho A^T A] V
            = beta (s_i V_{i-1} + sigma(U_i)) + beta s' (V_{i+1} - sigma(U_{i+1}))
              + A^T (rho (U_{i+1} - b 1^T) + Lam_{i+1}) + tau V^k
    """
    A, rhs, work = _activation_rhs(spec, pen, Vleft, Uown, right, sigma_own, pool)
    return solve_activation(spec, pen, A, rhs, work, V, pool)


def solve_activation(spec: BlockSpec, pen: Penalties, A: Array, rhs: Array, work: Array,
                     V: Array, pool: Scratch | None = None) -> Array:
    """The exact V step's solve: ``[(beta (1 + s') + tau) I + rho A^T A] V+ = rhs + tau V``
    (``rhs``, ``work``: from :func:`_activation_rhs`, both overwritten; the result is one of
    them, see :func:`~daskadmm.splitting.base.spd_solve`, and the other goes back to
    ``pool``)."""
    M = pen.rho * (A.T @ A)
    M[np.diag_indices_from(M)] += pen.beta * (1 + spec.s_next) + pen.tau
    compiled = fused.elementwise_for(rhs, V)
    if compiled is not None:  # rhs + V tau in one loop, the same bits
        compiled.plus_scaled(rhs.reshape(-1), V.reshape(-1), rhs.dtype.type(pen.tau),
                             rhs.reshape(-1))
    else:
        rhs += np.multiply(V, float(pen.tau), out=work)
    V_new = spd_solve(M, rhs, overwrite_r=True, out=work)
    if pool is not None:  # the one of rhs and work that does not hold the result
        pool.put(rhs if np.shares_memory(V_new, work) else work)
    return V_new


def update_activation_linearized(spec: BlockSpec, pen: Penalties, V: Array, Vleft: Array,
                                 Uown: Array, right: State,
                                 sigma_own: Array | None = None,
                                 pool: Scratch | None = None) -> Array:
    """Proximal-linearized V step (RADMM-3L).

    Notes
    -----
    ``V+ = V - G_V / (eta_V + tau)`` with ``G_V = n grad_V L`` =
    ``[beta (1 + s') I + rho A^T A] V - rhs`` (the exact-step right-hand side without
    ``tau V^k``) and the exact curvature ``eta_V = beta (1 + s') + rho lambda_max(A^T A)``.
    """
    A, rhs, _ = _activation_rhs(spec, pen, Vleft, Uown, right, sigma_own)  # no pool: rhs
    grad = pen.beta * (1 + spec.s_next) * V + pen.rho * (A.T @ (A @ V)) - rhs
    small = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    eta = pen.beta * (1 + spec.s_next) + pen.rho * lambda_max(small)
    return V - grad / (eta + pen.tau)


def block_objective(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                    Y: Array | None, *, r: Array | None = None, r_sq: float | None = None,
                    p: Array | None = None, regulariser: bool = True,
                    pool: Scratch | None = None) -> float:
    """Block i's share of L (in L units, not n-units): ``(lam/2)||W_i||^2``, the constraint
    terms of ``U_i = W_i V~_{i-1}``, the activation penalty of ``V_i`` (i < N), and the loss
    (i = N). Summed over blocks this is L. Every term but the regulariser is a sum over the
    samples, so on a chunk of the samples (with ``n`` the whole set's) it is the chunk's share;
    ``regulariser=False`` leaves ``(lam/2)||W_i||^2`` out (every chunk but the first).

    A caller that has them passes ``r = U_i - W_i V~_{i-1}`` (computed with the same product,
    so the same numbers), ``r_sq = sum(r * r)`` and ``p = V_i - s_i V_{i-1} - sigma(U_i)``;
    they are not recomputed then (``p`` is overwritten)."""
    n = spec.n
    W, U, Lam = own["W"], own["U"], own["Lam"]
    if r is None:
        r = U - W @ spec.aug(Vleft)
    if r_sq is None:
        r_sq = float(np.sum(r * r))
    total = 0.5 * block_lam(spec, pen.lam) * float(np.sum(W * W)) if regulariser else 0.0
    work = np.multiply(Lam, r, out=_get(pool, r.shape, r))
    total += (float(np.sum(work)) + 0.5 * pen.rho * r_sq) / n
    if pool is not None:
        pool.put(work)
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        total += loss_sum(spec.arch.loss, U, Y) / n
    else:
        if p is None:
            p = np.subtract(own["V"], spec.act.f(U), out=_get(pool, U.shape, U))
            if spec.s:
                p -= Vleft
        p *= p
        total += 0.5 * pen.beta * float(np.sum(p)) / n
        if pool is not None:
            pool.put(p)
    return total


def _sum_of_squared_difference(x: Array, y: Array, pool: Scratch | None = None) -> float:
    """``sum((x - y)^2)``: the squares in one compiled loop where there is one, the sum in
    NumPy (its pairwise summation), so the same bits either way."""
    dv = _get(pool, x.shape, x)
    compiled = fused.elementwise_for(dv, x, y)
    if compiled is not None:
        compiled.square_of_difference(x.reshape(-1), y.reshape(-1), dv.reshape(-1))
    else:
        np.subtract(x, y, out=dv)
        dv *= dv
    total = float(np.sum(dv))
    if pool is not None:
        pool.put(dv)
    return total


def activation_residual_into(V: Array, sigma: Array, Vleft: Array, s: bool) -> Array:
    """``V_i - sigma(U_i) - s_i V_{i-1}`` into ``sigma`` (overwritten; it is returned), as
    ``p = V - sigma; p -= Vleft`` computes it (one compiled loop where there is one)."""
    z = Vleft if s else V  # (X, for block 1, has another shape: not read then)
    compiled = fused.elementwise_for(sigma, V, z)
    if compiled is not None:
        compiled.residual(V.reshape(-1), sigma.reshape(-1), z.reshape(-1), s,
                          sigma.reshape(-1))
        return sigma
    p = np.subtract(V, sigma, out=sigma)
    if s:
        p -= Vleft
    return p


VARIANTS = ("radmm3", "radmm3l", "radmm3a")


def column_update(spec: BlockSpec, pen: Penalties, W: Array, own: State, Vleft: Array,
                  Vt: Array, right: State | None, Y: Array | None, *,
                  variant: str = "radmm3", regulariser: bool = True,
                  pool: Scratch | None = None) -> StepOut:
    """Block i's steps after W (U, Lam, then V and, for RADMM-3A, Gam; i < N) on a set of
    samples, with block i's new ``W``: every one of them acts on each sample (column) on its
    own, so the serial reference calls this on all the samples (:func:`block_update`) and the
    chunked engine on one chunk at a time (:mod:`daskadmm.chunks.radmm3`), the same operations
    in the same order.

    ``own``: block i's ``U``, ``Lam`` (and ``V``, ``Gam``) of iteration k on these samples;
    ``Vleft``: ``V_{i-1}`` of iteration k+1 (X for i = 1) and ``Vt`` its augmented form
    (:meth:`BlockSpec.aug`); ``right``: block i+1's ``W``, ``U``, ``Lam`` (and, when
    ``s_{i+1} = 1``, ``V``, ``Gam``) of iteration k (None for i = N); ``Y``: the targets
    (output block only). ``variant``: "radmm3" (exact steps), "radmm3l" (linearized V step;
    W's is the caller's) or "radmm3a" (:mod:`~daskadmm.splitting.radmm3a`: the multiplier
    ``Gam_i`` and over-relaxation). ``regulariser``: include ``(lam/2)||W_i||^2`` in the
    objective (see :func:`block_objective`). ``pool``: where the temporaries come from.

    Returns ``StepOut`` of the new ``U``, ``Lam`` (``V``, ``Gam``) and the statistics of
    :func:`block_update` on these samples."""
    from . import radmm3a  # RADMM-3A's pieces are built on this module's

    if variant not in VARIANTS:
        raise ValueError(f"unknown RADMM-3 variant {variant!r} (known: {', '.join(VARIANTS)})")
    gam = variant == "radmm3a"
    U0, Lam0 = own["U"], own["Lam"]
    Z = np.matmul(W, Vt, out=_get(pool, (W.shape[0], Vt.shape[1]), U0))
    c = sigma = V0 = None
    if not spec.is_output:
        V0 = own["V"]
        if gam:
            c = radmm3a.prox_target(spec, pen, V0, Vleft, own["Gam"])
        elif spec.s:
            c = np.subtract(V0, Vleft, out=_get(pool, Z.shape, U0))
        else:
            c = V0
        sigma = _get(pool, Z.shape, U0)  # sigma(U) from the prox, for the V step and p
    Za = radmm3a.relaxed_product(spec, Z, U0) if gam else Z  # Z itself unless over-relaxed
    U, capped = update_preactivation(spec, pen, U0, Za, Lam0, c, Y, sigma_out=sigma, pool=pool)
    if pool is not None and c is not V0:
        pool.put(c)
    if Za is Z:  # r = U - W V~ into Z (not needed any more), and the step at it
        Lam = update_duals(Lam0, U, Z, pen.rho, out=_get(pool, Z.shape, U0), r_out=Z)
        r = Z
    else:
        Lam = update_duals(Lam0, U, Za, pen.rho, out=_get(pool, Z.shape, U0))
        r = np.subtract(U, Z, out=Z)
    new: State = {"U": U, "Lam": Lam}
    dual_sq = 0.0
    p = None
    mult = 0.0
    if not spec.is_output:
        assert right is not None and V0 is not None and sigma is not None  # a hidden block
        sig = radmm3a.relaxed_activation(spec, sigma, V0, Vleft) if gam else sigma
        if gam:
            V = radmm3a.update_activation(spec, pen, V0, Vleft, U, own["Gam"], right,
                                          sigma_own=sig, pool=pool)
        elif variant == "radmm3l":
            V = update_activation_linearized(spec, pen, V0, Vleft, U, right, sigma_own=sigma)
        else:
            V = update_activation(spec, pen, V0, Vleft, U, right, sigma_own=sigma, pool=pool)
        new["V"] = V
        dual_sq = _sum_of_squared_difference(V, V0, pool)
        p = activation_residual_into(V, sigma, Vleft, bool(spec.s))
        if gam:
            if sig is sigma:
                new["Gam"] = radmm3a.update_multiplier(pen, own["Gam"], p)
            else:  # at the over-relaxed residual V - s V_{i-1} - sig
                new["Gam"] = radmm3a.update_multiplier_at(spec, pen, own["Gam"], V, Vleft, sig)
            mult = radmm3a.multiplier_objective(spec, new["Gam"], p)
    rr = np.multiply(r, r, out=_get(pool, r.shape, U0))
    primal_sq = float(np.sum(rr))
    if pool is not None:
        pool.put(rr)
    objective = block_objective(spec, pen, {"W": W, **new}, Vleft, Y, r=r, r_sq=primal_sq,
                                p=p, regulariser=regulariser, pool=pool)
    if gam and not spec.is_output:
        objective += mult
    if pool is not None:
        pool.put(r)
    stats: Stats = {"objective": objective, "primal_sq": primal_sq, "dual_sq": dual_sq,
                    "capped": float(capped)}
    return StepOut(new, stats)


def block_update(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                 right: State | None, Y: Array | None, *, variant: str = "radmm3"
                 ) -> StepOut:
    """One iteration of block i: W, then :func:`column_update` (U, Lam, then V for i < N;
    RADMM-3A's ``Gam`` after V). ``variant``: "radmm3", "radmm3l" (linearized W and V steps)
    or "radmm3a".

    ``own`` is block i's state at iteration k, ``Vleft`` is ``V_{i-1}`` at iteration k+1 (X
    for i = 1), ``right`` is block i+1's state at iteration k (None for i = N) and ``Y`` the
    targets (output block only). Returns the new state and statistics: ``objective`` (block
    share of L at the new point), ``primal_sq`` (``||U_i - W_i V~_{i-1}||^2``), ``dual_sq``
    (``||V_i^{k+1} - V_i^k||^2``) and ``capped`` (inner solves that hit their cap).
    """
    pool = Scratch(like=own["U"])  # the temporaries reuse a few arrays
    Vt = augmented(Vleft, spec.bias, pool)
    G, B = weight_stats(Vt, own["U"], own["Lam"], pen.rho, pool)
    step_w = update_weights_linearized if variant == "radmm3l" else update_weights
    W = step_w(own["W"], G, B, block_penalties(spec, pen), spec.n)
    out = column_update(spec, pen, W, own, Vleft, Vt, right, Y, variant=variant, pool=pool)
    return StepOut({"W": W, **out.state}, out.stats)


def init_state(arch: Architecture, weights: list[Array], X: Array, Y: Array,
               options: Options | None = None) -> list[State]:
    """Forward pass sets U, V; ``Lam_i = 0`` for i < N and ``Lam_N = -n grad l(U_N)``.

    Every constraint then holds, so L equals the forward loss plus the regulariser.
    """
    U, V = forward(arch, weights, X)
    states: list[State] = []
    for i in range(1, arch.depth + 1):
        st: State = {"W": weights[i - 1].copy(), "U": U[i - 1]}
        if i < arch.depth:
            st["Lam"] = np.zeros_like(U[i - 1])
            st["V"] = V[i]
        else:
            st["Lam"] = -loss_grad_n(arch.loss, U[i - 1], Y)
        states.append(st)
    return states
