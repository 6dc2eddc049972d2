"""Fused elementwise kernels, compiled with Numba when it is installed: the smooth activation
prox (:func:`kernels`) and the block updates' other elementwise steps (:func:`elementwise`).

:func:`~daskadmm.splitting.base.prox_activation` with tanh or sigmoid runs a safeguarded
Newton per element. In NumPy every line of an iteration is a pass over the working set (about
forty per iteration). Here the arithmetic of an iteration is two compiled loops around the
vectorised activation (``np.tanh``, NumPy's own SIMD kernel, so sigma is evaluated exactly as
before):

- ``newton_pass``: derivatives, gradient, the stopping test, curvature, phi, the step, the
  outright test and the full-step candidate, per element, in a loop without branches (so it
  vectorises); once half of the working set has finished, a second loop writes the finished
  elements out and compacts the set;
- ``accept_pass``: the full step's acceptance test and move, per element, without branches
  (so it vectorises too); returns the rejected positions for the (rare) line search;
- ``load_pass``: a block's working set and its constant ``beta (|c| + 1)`` in one loop,
  read from the start where it is (no copy of it into the result first).

When every element of the working set is done (the usual end), the last Newton pass only
writes them out.

:func:`elementwise` holds one loop per elementwise step that would otherwise take several
NumPy passes over sample-sized arrays: the piecewise-linear prox (relu, leaky_relu, identity)
with sigma of its result, the U step's target, the V step's right-hand side and shifted
target, and RADMM-3A's over-relaxed combinations, prox target and multiplier step. Each is
one pass over memory instead of several, as are the W step's ``rho U + Lam``, the
multiplier step with its residual, the dual residual's ``(V - V^k)^2``, the V step's
``rhs + tau V^k`` and the activation residual; reductions (sums) stay in NumPy,
whose pairwise summation they would not reproduce.

Each element's operations are those of the NumPy formulation (see
:func:`~daskadmm.splitting.base._prox_smooth_block`), in the same order and type, with no
contraction into fused multiply-adds (Numba compiles without ``fastmath``), so the results are
the same bits: the tests compare both paths. Every constant reaches the loops as a scalar of
the arrays' type (float32 runs stay float32, as NumPy 2 computes them with Python scalars).

Without Numba (``pip install 'daskadmm[fast]'`` adds it), :data:`AVAILABLE` is False and the
NumPy formulation runs. ``DASKADMM_NO_NUMBA=1`` switches the compiled path off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.util import find_spec
from typing import NamedTuple

__all__ = ["AVAILABLE", "SIGMOID", "TANH", "Elementwise", "elementwise", "elementwise_for",
           "kernels"]

AVAILABLE = find_spec("numba") is not None and not os.environ.get("DASKADMM_NO_NUMBA")
"""Numba is installed (and not switched off): the smooth prox uses :func:`kernels`. Numba is
imported, and the kernels compiled, at their first use only, so a run that never needs them
(relu, the default) pays nothing."""

TANH, SIGMOID = 0, 1


def _newton_pass(kind, uu, ss, cc, mm, bc, idx, step, phi, outright, cand, done, u_out,
                 s_out, a, consts):
    """One Newton iteration's arithmetic on the working set ``[0, a)``.

    ``consts = (beta, kappa, hb, hk, neg_beta, grad_tol, outright_tol, newton_min, sup_df2,
    sup_d2f, sup_abs, one, two)``, scalars of the arrays' type. The first loop computes every
    element's step, phi, outright flag and candidate, and whether it passes the stopping test
    (``done``), without branches, so that it vectorises. A done element's candidate is its
    point, taken outright, so it stays where it is (and is done again at the next iteration:
    the same numbers give the same test). When at least half of the set is done, the second
    loop writes the finished elements' points to ``u_out[idx]``, ``s_out[idx]`` and moves the
    unfinished ones down to the front, in order; when all are done (the usual end), it only
    writes them out. Returns
    ``(new size, done elements still in the set)``."""
    (beta, kappa, hb, hk, neg_beta, grad_tol, outright_tol, newton_min, sup_df2, sup_d2f,
     sup_abs, one, two) = consts
    for j in range(a):
        u = uu[j]
        s = ss[j]
        c = cc[j]
        m = mm[j]
        if kind == 0:  # tanh: ds = 1 - s s, d2 = (-2 s) ds
            ds = one - s * s
            d2 = (s * -two) * ds
        else:  # sigmoid: ds = (1 - s) s, d2 = (1 - 2 s) ds
            ds = (one - s) * s
            d2 = (one - s * two) * ds
        r = c - s
        d = u - m
        g = (r * neg_beta) * ds + d * kappa
        dn = abs(g) <= (((abs(u) + abs(m)) * kappa) + bc[j]) * grad_tol
        h = ((ds * ds - r * d2) * beta) + kappa
        p = (r * hb) * r + (d * d) * hk
        newton = h >= newton_min
        # g / h, or g / L_phi where h is too small: one division
        st = g / (h if newton else kappa + beta * (sup_df2 + sup_d2f * (abs(c) + sup_abs)))
        outright[j] = dn | (newton & ((g * g) / h <= abs(p) * outright_tol))
        step[j] = st
        phi[j] = p
        cand[j] = u if dn else u - st
        done[j] = dn
    n_done = 0
    for j in range(a):  # a loop of its own: the float loop above vectorises at full width
        n_done += done[j]
    if 2 * n_done < a:
        return a, n_done
    if n_done == a:  # all finished (the usual end): write them out, nothing to move
        for j in range(a):
            i = idx[j]
            u_out[i] = uu[j]
            s_out[i] = ss[j]
        return 0, 0
    w = 0
    for j in range(a):
        i = idx[j]
        if done[j]:
            u_out[i] = uu[j]
            s_out[i] = ss[j]
        else:
            uu[w] = uu[j]
            ss[w] = ss[j]
            cc[w] = cc[j]
            mm[w] = mm[j]
            bc[w] = bc[j]
            idx[w] = i
            step[w] = step[j]
            phi[w] = phi[j]
            outright[w] = outright[j]
            cand[w] = cand[j]
            w += 1
    return w, 0


def _accept_pass(uu, ss, cc, mm, phi, outright, cand, sc, rejected, a, consts):
    """The full step's test on ``[0, a)``: where ``phi(cand) <= phi + slack |phi|`` (or the
    step is outright), the candidate becomes the element's point; the others' positions go to
    ``rejected``. Returns how many were rejected. ``consts = (hb, hk, slack)``.

    The test and the move are one loop without branches (it vectorises); ``outright`` is
    overwritten with the test's result, from which a second loop, only where some were
    rejected (rarely), gathers their positions."""
    hb, hk, slack = consts
    nrej = 0
    for j in range(a):
        r = cc[j] - sc[j]
        d = cand[j] - mm[j]
        pc = (r * hb) * r + (d * hk) * d
        p = phi[j]
        ok = (pc <= abs(p) * slack + p) | outright[j]
        uu[j] = cand[j] if ok else uu[j]
        ss[j] = sc[j] if ok else ss[j]
        outright[j] = ok
        nrej += not ok
    if nrej:
        w = 0
        for j in range(a):
            if not outright[j]:
                rejected[w] = j
                w += 1
    return nrej


def _load_pass(c, m, u, uu, cc, mm, bc, idx, beta, one):
    """Start a block of the smooth prox: ``uu, cc, mm`` from ``u, c, m``, ``bc = (|c| + 1)
    beta`` and ``idx`` the identity, in one loop (as the NumPy copies and passes of
    ``_SmoothBuffers.load`` compute them)."""
    for j in range(u.size):
        x = c[j]
        uu[j] = u[j]
        cc[j] = x
        mm[j] = m[j]
        bc[j] = (abs(x) + one) * beta
        idx[j] = j


# Piecewise-linear activations in :func:`piecewise_pass`: sigma(u) is
RELU = 0  # np.maximum(u, 0.0)
LEAKY_MAX = 1  # 0 < alpha < 1: np.maximum(u, alpha u)
LEAKY_WHERE = 2  # any other alpha but 1: alpha u, with u where u > 0
IDENTITY = 3  # alpha = 1: u


def _piecewise_pass(kind, c, m, out, sig, with_sig, consts):
    """The piecewise-linear prox of :func:`~daskadmm.splitting.base._prox_piecewise`, one
    element at a time: both branch candidates, their phi, the one with the smaller (ties and
    NaN as ``np.where(phi+ <= phi-, u+, u-)``), and ``sigma`` of it into ``sig`` when
    ``with_sig``. ``consts = (beta, kappa, alpha beta, beta + kappa, alpha^2 beta + kappa,
    beta/2, kappa/2, alpha, 0)``, scalars of the arrays' type.

    ``np.maximum(a, b)`` is written ``a if (a > b or a != a) else b``: NaN from either, and of
    two equal values (0.0 and -0.0) the second, as NumPy's vector loops give it (tested
    against NumPy, signed zeros and NaN included); ``np.minimum`` likewise."""
    beta, kappa, ab, den_p, den_m, hb, hk, alpha, zero = consts
    for j in range(c.size):
        cj = c[j]
        mj = m[j]
        km = mj * kappa
        x = ((cj * beta) + km) / den_p
        up = zero if (zero > x or zero != zero) else x  # np.maximum(0.0, x)
        x = ((cj * ab) + km) / den_m
        um = zero if (zero < x or zero != zero) else x  # np.minimum(0.0, x)
        pp = pm = fp = fm = zero
        for branch in range(2):
            x = up if branch == 0 else um
            if kind == 0:  # np.maximum(x, 0.0)
                f = x if (x > zero or x != x) else zero
            elif kind == 1:  # np.maximum(x, alpha x)
                y = x * alpha
                f = x if (x > y or x != x) else y
            elif kind == 2:  # alpha x, x where x > 0
                f = x if x > zero else x * alpha
            else:
                f = x
            r = cj - f
            d = x - mj
            if branch == 0:
                pp = ((r * hb) * r) + ((d * hk) * d)
                fp = f
            else:
                pm = ((r * hb) * r) + ((d * hk) * d)
                fm = f
        keep_plus = pp <= pm
        out[j] = up if keep_plus else um
        if with_sig:  # sigma of the chosen candidate, already evaluated
            sig[j] = fp if keep_plus else fm


def _preactivation_target(Z, Lam, U, out, rho, tau, kappa):
    """``((Z rho - Lam) + U tau) / kappa`` elementwise into ``out`` (the U step's ``m``,
    :func:`~daskadmm.splitting.radmm3.update_preactivation`, operation for operation)."""
    for j in range(Z.size):
        out[j] = ((Z[j] * rho - Lam[j]) + U[j] * tau) / kappa


def _activation_rhs_pass(kind, sig_own, Vleft, Vr, Ur, out, s, s2, beta, alpha, zero):
    """The V step's right-hand side before its product,
    ``(sig_own beta + Vleft beta) + (Vr - sigma(Ur)) beta`` elementwise into ``out`` (the
    middle term only with ``s``, the last only with ``s2``), operation for operation
    :func:`~daskadmm.splitting.radmm3._activation_rhs`'s NumPy passes. ``kind``: a
    :func:`_piecewise_pass` activation, or -1 where ``Ur`` already holds ``sigma(U_{i+1})``."""
    for j in range(out.size):
        x = sig_own[j] * beta
        if s:
            x = x + Vleft[j] * beta
        if s2:
            u = Ur[j]
            if kind == 0:
                f = u if (u > zero or u != u) else zero
            elif kind == 1:
                y = u * alpha
                f = u if (u > y or u != u) else y
            elif kind == 2:
                f = u if u > zero else u * alpha
            else:  # identity, or sigma given
                f = u
            x = x + (Vr[j] - f) * beta
        out[j] = x


def _shifted_target(U, b, Lam, out, with_b, rho):
    """``(U - b) rho + Lam`` (``U rho + Lam`` without ``with_b``) elementwise into ``out``,
    ``b`` one value per row, as the NumPy passes compute it."""
    rows, cols = U.shape
    for i in range(rows):
        bi = b[i]
        for j in range(cols):
            if with_b:
                out[i, j] = (U[i, j] - bi) * rho + Lam[i, j]
            else:
                out[i, j] = U[i, j] * rho + Lam[i, j]


def _relaxed(x, y, z, s, a, b, out):
    """``x a + (y - z) b`` elementwise into ``out`` (``x a + y b`` without ``s``): RADMM-3A's
    over-relaxed combinations, as ``alpha x + (1 - alpha) (y - z)`` computes them in NumPy."""
    for j in range(out.size):
        t = y[j] - z[j] if s else y[j]
        out[j] = x[j] * a + t * b


def _shifted_quotient(y, z, g, s, beta, out):
    """``(y - z) + g / beta`` elementwise into ``out`` (``y + g / beta`` without ``s``):
    RADMM-3A's prox target ``V_i - s_i V_{i-1} + Gam_i / beta``."""
    for j in range(out.size):
        t = y[j] - z[j] if s else y[j]
        out[j] = t + g[j] / beta


def _plus_scaled(x, y, c, out):
    """``x + c y`` elementwise into ``out`` (RADMM-3A's multiplier step)."""
    for j in range(out.size):
        out[j] = x[j] + y[j] * c


def _multiplier_step(g, v, sig, z, s, c, out):
    """``g + ((v - sig) - z) c`` elementwise into ``out`` (without ``s``: ``g + (v - sig) c``):
    RADMM-3A's multiplier step at the over-relaxed residual, as NumPy computes
    ``p = v - sig; p -= z; g + c * p``."""
    for j in range(out.size):
        p = v[j] - sig[j]
        if s:
            p = p - z[j]
        out[j] = g[j] + p * c


def _scaled_sum(x, c, y, out):
    """``x c + y`` elementwise into ``out`` (NumPy's ``t = x * c; t += y``): the W step's
    ``rho U + Lam``."""
    for j in range(out.size):
        out[j] = x[j] * c + y[j]


def _dual_step(u, z, c, lam, r_out, out):
    """``r = u - z`` into ``r_out`` (if it is not None) and ``r c + lam`` into ``out``,
    elementwise (NumPy's ``r = u - z``, then ``out = r * c; out += lam``): the multiplier step
    and the residual it is taken at."""
    for j in range(out.size):
        r = u[j] - z[j]
        if r_out is not None:
            r_out[j] = r
        out[j] = r * c + lam[j]


def _square_of_difference(x, y, out):
    """``(x - y)^2`` elementwise into ``out`` (NumPy's ``d = x - y; d *= d``): the V step's
    dual residual before its sum."""
    for j in range(out.size):
        d = x[j] - y[j]
        out[j] = d * d


def _residual(v, sig, z, s, out):
    """``(v - sig) - z`` elementwise into ``out`` (``v - sig`` without ``s``): the activation
    residual ``V_i - sigma(U_i) - s_i V_{i-1}`` as NumPy's ``p = v - sig; p -= z``."""
    for j in range(out.size):
        p = v[j] - sig[j]
        out[j] = p - z[j] if s else p


class Elementwise(NamedTuple):
    """The compiled kernels of :func:`elementwise`, by name."""

    piecewise_pass: Callable
    preactivation_target: Callable
    activation_rhs_pass: Callable
    shifted_target: Callable
    relaxed: Callable
    shifted_quotient: Callable
    plus_scaled: Callable
    multiplier_step: Callable
    scaled_sum: Callable
    dual_step: Callable
    square_of_difference: Callable
    residual: Callable


_COMPILED: tuple[Callable, Callable, Callable] | None = None
_COMPILED_PW: Elementwise | None = None


def _jit(numba, fn: Callable) -> Callable:
    try:
        return numba.njit(cache=True, error_model="numpy", nogil=True)(fn)
    except RuntimeError:  # no writable cache location: compile in memory
        return numba.njit(error_model="numpy", nogil=True)(fn)


def elementwise() -> Elementwise | None:
    """The elementwise kernels (:class:`Elementwise`: ``_piecewise_pass`` and the others)
    compiled by Numba (as :func:`kernels`), on views of C-contiguous arrays; None without
    Numba."""
    global _COMPILED_PW, AVAILABLE
    if _COMPILED_PW is None:
        try:
            import numba
        except ImportError:
            AVAILABLE = False
            return None
        _COMPILED_PW = Elementwise(*(_jit(numba, f) for f in (
            _piecewise_pass, _preactivation_target, _activation_rhs_pass, _shifted_target,
            _relaxed, _shifted_quotient, _plus_scaled, _multiplier_step,
            _scaled_sum, _dual_step, _square_of_difference, _residual)))
    return _COMPILED_PW


def elementwise_for(*arrays) -> Elementwise | None:
    """:func:`elementwise` when Numba is there and every array is C-contiguous of the first
    one's type (the kernels' element-by-element view), else None: the caller's NumPy
    formulation runs (the same bits)."""
    if not AVAILABLE:
        return None
    dt = arrays[0].dtype
    if not all(a.flags.c_contiguous and a.dtype == dt for a in arrays):
        return None
    return elementwise()


def kernels() -> tuple[Callable, Callable, Callable] | None:
    """``(newton_pass, accept_pass, load_pass)`` compiled by Numba (on the first call in a process:
    about a second per float type, cached on disk where Numba can write its cache); None, and
    :data:`AVAILABLE` False from then on, when Numba is installed but does not import (e.g. a
    release too old for the installed NumPy): the NumPy formulation runs instead."""
    global _COMPILED, AVAILABLE
    if _COMPILED is None:
        try:
            import numba
        except ImportError:
            AVAILABLE = False
            return None

        def jit(fn: Callable) -> Callable:
            try:
                return numba.njit(cache=True, error_model="numpy", nogil=True)(fn)
            except RuntimeError:  # no writable cache location: compile in memory
                return numba.njit(error_model="numpy", nogil=True)(fn)

        _COMPILED = (jit(_newton_pass), jit(_accept_pass), jit(_load_pass))
    return _COMPILED
