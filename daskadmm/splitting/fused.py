"""Fused kernels of the smooth activation prox, compiled with Numba when it is installed.

:func:`~daskadmm.splitting.base.prox_activation` with tanh or sigmoid runs a safeguarded
Newton per element. In NumPy every line of an iteration is a pass over the working set (about
forty per iteration). Here the arithmetic of an iteration is two compiled loops around the
vectorised activation (``np.tanh``, NumPy's own SIMD kernel, so sigma is evaluated exactly as
before):

- ``newton_pass``: derivatives, gradient, the stopping test, curvature, phi, the step, the
  outright test and the full-step candidate, per element, in a loop without branches (so it
  vectorises); once half of the working set has finished, a second loop writes the finished
  elements out and compacts the set;
- ``accept_pass``: the full step's acceptance test, per element; returns the rejected
  positions for the (rare) line search.

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

__all__ = ["AVAILABLE", "SIGMOID", "TANH", "kernels"]

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
    loop writes every element's point to ``u_out[idx]``, ``s_out[idx]`` (the final value of a
    finished one; a later write replaces the others') and moves the unfinished ones down to
    the front, in order. Returns ``(new size, done elements still in the set)``."""
    (beta, kappa, hb, hk, neg_beta, grad_tol, outright_tol, newton_min, sup_df2, sup_d2f,
     sup_abs, one, two) = consts
    n_done = 0
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
        n_done += dn
    if 2 * n_done < a:
        return a, n_done
    w = 0
    for j in range(a):
        i = idx[j]
        u_out[i] = uu[j]
        s_out[i] = ss[j]
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
        w += not done[j]
    return w, 0


def _accept_pass(uu, ss, cc, mm, phi, outright, cand, sc, rejected, a, consts):
    """The full step's test on ``[0, a)``: where ``phi(cand) <= phi + slack |phi|`` (or the
    step is outright), the candidate becomes the element's point; the others' positions go to
    ``rejected``. Returns how many were rejected. ``consts = (hb, hk, slack)``."""
    hb, hk, slack = consts
    nrej = 0
    for j in range(a):
        r = cc[j] - sc[j]
        d = cand[j] - mm[j]
        pc = (r * hb) * r + (d * hk) * d
        p = phi[j]
        if pc <= abs(p) * slack + p or outright[j]:
            uu[j] = cand[j]
            ss[j] = sc[j]
        else:
            rejected[nrej] = j
            nrej += 1
    return nrej


_COMPILED: tuple[Callable, Callable] | None = None


def kernels() -> tuple[Callable, Callable] | None:
    """``(newton_pass, accept_pass)`` compiled by Numba (on the first call in a process:
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

        _COMPILED = (jit(_newton_pass), jit(_accept_pass))
    return _COMPILED
