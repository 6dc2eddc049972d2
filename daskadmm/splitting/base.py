"""What every splitting shares: block specs, penalties, and the elementwise / small solvers.

Scaling convention: the penalty terms (beta, rho, multiplier terms) and the proximal terms
``(tau/2n)||x - x^k||^2`` are divided by the sample count ``n``; the loss is a mean; the regulariser
``(lam/2) sum ||W_i||^2`` is **not** divided by n and includes the bias column. The multipliers
``Lam`` are stored n-scaled (the multiplier of the unscaled problem is ``Lam/n``). All update
functions below work in **n-units**: they minimise ``n * F`` where F is the subproblem objective, so
the 1/n factors cancel. With this scaling beta, rho and tau weigh a per-sample mean like the loss
does, so their useful values do not change with the data set's size, while lam keeps its usual
meaning as the weight decay of the mean loss.

Every decision of an iterative inner solver is made per element (or per column), so results do
not depend on how the samples are chunked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypedDict

import numpy as np
import scipy.linalg as sla

from ..model import Activation, Architecture, augment, softmax
from . import fused

__all__ = [
    "StepOut",
    "BlockSpec",
    "block_lam",
    "block_penalties",
    "Options",
    "Penalties",
    "lambda_max",
    "prox_activation",
    "prox_output",
    "restarts_after",
    "spd_inverse",
    "spd_solve",
    "spd_solve_right",
]

Array = np.ndarray


class Stats(TypedDict):
    """A block's statistics of one iteration (or one chunk's share): ``objective`` (its share
    of L at the new point), ``primal_sq``, ``dual_sq`` (squared residual norms) and
    ``capped`` (inner solves that hit their cap)."""

    objective: float
    primal_sq: float
    dual_sq: float
    capped: float


class StepOut(NamedTuple):
    """What a step's task returns: the block's whole new ``state`` (the algorithm's ``State``,
    a TypedDict of its variables) and its :class:`Stats`."""

    state: Mapping[str, Any]
    stats: Stats


@dataclass(frozen=True)
class Penalties:
    """Penalty parameters in force for one iteration (a schedule may change rho and beta), and
    dlADMM's first trial curvature of its backtracking searches (``backtrack_start``; None:
    half the last accepted value; a schedule may change it with rho)."""

    rho: float
    beta: float
    tau: float
    lam: float
    nu: float | None = None
    backtrack_start: float | None = None


@dataclass(frozen=True)
class Options:
    """Inner-solver options: step rule of linearized steps and every cap; how dlADMM's output
    layer starts (``output_init``: ``forward`` or ``labels``); RADMM-3A's over-relaxation
    (``relax``, 1: none); the weight decay of the input block and of the hidden blocks
    2..N-1 as multiples of ``lam`` (``input_lam_scale``, ``hidden_lam_scale``, RADMM-3/3L/3A;
    1: every block ``lam``, see :func:`block_lam`); RADMM-3A's restarts (``restart_every``:
    iteration k+1 starts again from ``W^k`` when k is a multiple of it, see
    :func:`restarts_after`; 0: never) and whether a restart whose objective rose is rejected
    (``restart_guard``, see :class:`daskadmm.schedules.RestartGuard`)."""

    step: str = "backtracking"  # "lipschitz" | "backtracking"
    backtrack_max: int = 30
    newton_max_iter: int = 100
    output_init: str = "forward"
    relax: float = 1.0
    input_lam_scale: float = 1.0
    hidden_lam_scale: float = 1.0
    restart_every: int = 0
    restart_guard: bool = False


def restarts_after(options: Options, k: int, guard: Any = None) -> bool:
    """Whether iteration k+1 starts again from the weights of iteration k (``k >= 1`` a
    multiple of ``options.restart_every``, and, with a restart guard, ``guard.allows(k)``:
    none after the guard stopped restarts): the algorithm's start (its ``init_state``: for
    RADMM-3A a forward pass for the auxiliaries and one backward pass for the multipliers) on
    ``W^k``, in place of iteration k's auxiliaries and multipliers. It depends on ``W^k`` and
    the data only, so a run resumed from a checkpoint at such a k restarts the same way.
    Every engine asks this one function."""
    r = options.restart_every
    return r > 0 and k >= 1 and k % r == 0 and (guard is None or guard.allows(k))


@dataclass(frozen=True)
class BlockSpec:
    """Static facts about block ``i`` (1-based) of a network trained on ``n`` samples."""

    arch: Architecture
    i: int
    n: int
    options: Options = field(default_factory=Options)

    @property
    def N(self) -> int:
        return self.arch.depth

    @property
    def is_output(self) -> bool:
        return self.i == self.arch.depth

    @property
    def s(self) -> int:
        """``s_i``."""
        return self.arch.skip(self.i)

    @property
    def s_next(self) -> int:
        """``s' = s_{i+1}`` for i < N-1, and 0 for i = N-1 (``U_N`` carries the loss)."""
        return self.arch.skip(self.i + 1) if self.i + 1 < self.arch.depth else 0

    @property
    def act(self) -> Activation:
        return self.arch.act

    @property
    def bias(self) -> bool:
        return self.arch.bias

    def aug(self, V: Array) -> Array:
        return augment(V, self.arch.bias)

    def split_bias(self, W: Array) -> tuple[Array, Array | None]:
        """``W = [A, b]`` with a bias, else ``(W, None)``."""
        if self.arch.bias:
            return W[:, :-1], W[:, -1:]
        return W, None


def _lam_scale(spec: BlockSpec) -> float | None:
    """The multiple of ``lam`` that block i's weight decay is (None: ``lam`` itself)."""
    o = spec.options
    scale = (o.input_lam_scale if spec.i == 1 else
             o.hidden_lam_scale if spec.i < spec.N else 1.0)
    return None if scale == 1.0 else scale


def block_lam(spec: BlockSpec, lam: float) -> float:
    """Block i's weight decay: ``lam``, times ``spec.options.input_lam_scale`` for the input
    block 1 and ``spec.options.hidden_lam_scale`` for the hidden blocks ``2..N-1`` (the output
    block keeps ``lam``). Where the scale is 1 this is ``lam`` itself, so the arithmetic is
    that of one ``lam`` for every block."""
    scale = _lam_scale(spec)
    return lam if scale is None else lam * scale


def block_penalties(spec: BlockSpec, pen: Penalties) -> Penalties:
    """``pen`` with block i's weight decay (:func:`block_lam`): ``pen`` itself where that is
    ``pen.lam``."""
    return pen if _lam_scale(spec) is None else replace(pen, lam=block_lam(spec, pen.lam))


def lambda_max(G: Array) -> float:
    """Largest eigenvalue of a symmetric PSD matrix (exact, via LAPACK's ``syevr``)."""
    m = G.shape[0]
    if not np.all(np.isfinite(G)):
        return float("nan")  # propagates: the run ends with status nonfinite
    return float(sla.eigvalsh(G, subset_by_index=[m - 1, m - 1], check_finite=False)[0])


def spd_inverse(M: Array) -> Array:
    """``M^{-1}`` of a symmetric positive definite ``M`` (LAPACK ``potrf`` then ``potri``),
    exactly symmetric; NaN where ``M`` is not SPD numerically (see :func:`spd_solve`)."""
    if not np.all(np.isfinite(M)):
        return np.full(M.shape, np.nan, dtype=M.dtype)
    potrf, potri = sla.get_lapack_funcs(("potrf", "potri"), (M,))
    L, info = potrf(M, lower=1, clean=1)
    if info == 0:
        Mi, info = potri(L, lower=1)
    if info != 0:
        return np.full(M.shape, np.nan, dtype=M.dtype)
    Mi = np.tril(Mi)
    Mi += np.tril(Mi, -1).T
    return Mi


# A right-hand side with at least this many columns per row of M is solved through the
# explicit inverse and one matrix product; with fewer, by triangular solves (see spd_solve).
INVERSE_MIN_COLUMNS_PER_ROW = 0.5


def spd_solve(M: Array, R: Array, *, overwrite_r: bool = False,
              out: Array | None = None) -> Array:
    """Solve ``M X = R`` for symmetric positive definite ``M``.

    ``M`` is SPD in exact arithmetic for every system here; if it is not numerically (entries
    overflowing after an exploding forward pass), the result is NaN, so the run stops with
    status ``nonfinite`` instead of raising.

    Many right-hand sides (the ``d x n`` V steps: at least half as many columns as ``M`` has
    rows, C-ordered) are solved as ``X = M^{-1} R`` with :func:`spd_inverse`: the inverse
    costs ``d^3`` flops once, and one matrix product runs at the machine's matmul rate, where
    the two triangular solves (BLAS ``trsm``, the same ``2 d^2 n`` flops) ran at half of it
    (measured at d = 512, n = 8,192: 0.146 s against 0.075 s). The systems here are well
    conditioned (``M = c I + rho A^T A`` with ``c >= beta``), and the two ways agree to the
    rounding of ``cond(M) * eps`` (tested). ``out`` (C-ordered, ``R``'s shape and type, not
    ``R``): where that product goes; without it a new array. ``R`` is then left as it is.

    Fewer right-hand sides, C-ordered, are solved as ``X^T M = R^T``: two right-side
    triangular solves on ``R^T``, which is Fortran-ordered in the same memory: no transposing
    copies in or out, and ``X`` comes back C-ordered like ``R`` (LAPACK's ``potrs`` would
    copy ``R`` to Fortran order and return a Fortran-ordered ``X``, which makes every later
    elementwise operation that mixes it with C-ordered arrays several times slower).
    ``overwrite_r``: ``R`` may be overwritten (it then holds ``X``). Other right-hand sides go
    through ``potrs``. Each column of ``X`` depends only on its column of ``R``."""
    if not np.all(np.isfinite(M)):
        return np.full(R.shape, np.nan, dtype=R.dtype)
    c_rhs = (R.ndim == 2 and R.dtype in (np.float64, np.float32) and M.dtype == R.dtype
             and R.flags.c_contiguous and not R.flags.f_contiguous)
    if c_rhs and R.shape[1] >= INVERSE_MIN_COLUMNS_PER_ROW * M.shape[0]:
        return np.matmul(spd_inverse(M), R, out=out)
    try:
        c = sla.cho_factor(M, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return np.full(R.shape, np.nan, dtype=R.dtype)
    if c_rhs and c[0].dtype == R.dtype:
        B = (R if overwrite_r else R.copy()).T  # n x d, Fortran-ordered
        trsm = sla.blas.dtrsm if R.dtype == np.float64 else sla.blas.strsm
        B = trsm(1.0, c[0], B, side=1, lower=1, trans_a=1, overwrite_b=1)
        B = trsm(1.0, c[0], B, side=1, lower=1, trans_a=0, overwrite_b=1)
        return B.T
    return sla.cho_solve(c, R, check_finite=False)


def spd_solve_right(M: Array, R: Array) -> Array:
    """Solve ``X M = R`` for symmetric positive definite ``M`` (see :func:`spd_solve`)."""
    return spd_solve(M, R.T).T


# ---------------------------------------------------------------------------------------------
# Elementwise prox of the activation penalty
# ---------------------------------------------------------------------------------------------

def _phi(act: Activation, u: Array, c: Array, m: Array, beta: float, kappa: float) -> Array:
    r = c - act.f(u)
    d = u - m
    return 0.5 * beta * r * r + 0.5 * kappa * d * d


def prox_activation(c: Array, m: Array, beta: float, kappa: float, u0: Array,
                    act: Activation, max_iter: int = 100, *,
                    sigma_out: Array | None = None, out: Array | None = None
                    ) -> tuple[Array, int]:
    """Elementwise ``argmin_u phi(u) = (beta/2)(c - sigma(u))^2 + (kappa/2)(u - m)^2``.

    Notes
    -----
    Piecewise-linear sigma (relu: slope 0, leaky_relu: slope alpha, identity: slope 1) is solved
    exactly: the two branch candidates are::

        u+ = max(0, (beta c + kappa m) / (beta + kappa))
        u- = min(0, (alpha beta c + kappa m) / (alpha^2 beta + kappa))

    and the one with the smaller phi is taken; ties go to ``u+`` (deterministic).

    Smooth sigma (tanh, sigmoid): phi may be nonconvex, so a safeguarded Newton runs **per element
    from u0** (started from the current iterate, every accepted step lowers phi, so the result never
    raises L even where phi is nonconvex): a Newton step where ``phi'' >= 1e-6 kappa``, else a
    gradient step ``phi'/L_phi`` with ``L_phi = kappa + beta (sup sigma'^2 + sup|sigma''| (|c| +
    sup|sigma|))``; the step is halved while phi rises (tolerance ``1e-15|phi|``); a Newton step
    whose predicted decrease ``g^2/h`` is below ``1e-8 |phi|`` is accepted outright; an element
    stops when ``|phi'| <= 1e-14 (beta (|c| + 1) + kappa (|u| + |m|))`` or after ``max_iter``
    iterations. The result is stationary with ``phi(u) <= phi(u0)``, not necessarily the global
    minimiser.

    The smooth solver works on blocks of elements (cache-sized, in preallocated buffers) and
    iterates only on the elements of a block that are still active. It evaluates sigma once per
    element and iteration: the full step ``u - step`` is evaluated for every active element
    (it is the new point of an outright step and the first trial of the line search), and
    ``sigma'``, ``sigma''`` of the next iteration come from that value. Every decision is per
    element, so the result does not depend on the blocking, and it is bit for bit the result of
    the plain formulation (:func:`_prox_smooth_block` documents the operations). With Numba
    installed the arithmetic of each iteration runs in two compiled loops
    (:func:`_prox_smooth_fused`, :mod:`daskadmm.splitting.fused`): the same operations, so the
    same bits, about 3.5 times faster.

    ``sigma_out``, if given (an array of ``c``'s shape), receives ``sigma(u)`` of the result
    (bit for bit ``act.f(u)``), which the callers need next. ``out``: a C-contiguous float64
    array of ``c``'s shape (not ``u0``, ``c`` or ``m``) for the result; a new one if None.

    Returns ``(u, n_capped)``: the solution and how many elements hit the iteration cap.
    """
    dt = float_type(c, m)
    if out is not None and not (out.flags.c_contiguous and out.dtype == dt
                                and out.shape == c.shape):
        raise ValueError(f"prox_activation: out must be C-contiguous {dt} of c's shape")
    # Python floats: NumPy 2 computes with them in the arrays' type (a NumPy float64 scalar
    # would turn float32 arithmetic into float64 rounded back), and the compiled path casts
    # its constants to that type, so both paths compute the same bits
    beta, kappa = float(beta), float(kappa)
    if act.piecewise_linear:
        if fused.AVAILABLE and fused.elementwise() is not None:
            return _prox_piecewise_fused(c, m, beta, kappa, act, dt, out, sigma_out), 0
        u = _prox_piecewise(c, m, beta, kappa, act, out)
        if sigma_out is not None:
            if act.f_into is not None and sigma_out.flags.c_contiguous:
                act.f_into(u, sigma_out)
            else:
                sigma_out[...] = act.f(u)
        return u, 0

    shape = c.shape
    c = np.ascontiguousarray(c, dtype=dt).ravel()
    m = np.ascontiguousarray(m, dtype=dt).ravel()
    if act.f_into is None or act.derivs_from_value is None:
        raise ValueError(f"prox_activation: the smooth activation {act.name!r} needs its "
                         "in-place kernels f_into and derivs_from_value")
    compiled = fused.AVAILABLE and act.name in _FUSED and fused.kernels() is not None
    u0 = np.asarray(u0)
    # the compiled solver reads the start from u0 and writes every element of the result, so
    # a C-contiguous u0 of the type needs no copy into the result first
    direct = compiled and u0.dtype == dt and u0.flags.c_contiguous and u0.size == c.size
    if out is None:
        u = np.empty(c.size, dtype=dt) if direct else np.array(u0, dtype=dt).ravel()
    else:
        u = out.reshape(-1)
        if not direct:
            u[...] = u0.reshape(-1)
    start = u0.reshape(-1) if direct else u
    s = np.empty_like(u) if sigma_out is None else sigma_out.reshape(-1)
    bufs = _SmoothBuffers(min(u.size, _BLOCK), dt)
    capped = 0
    with np.errstate(all="ignore"):
        for lo in range(0, u.size, _BLOCK):
            sl = slice(lo, min(lo + _BLOCK, u.size))
            if compiled:
                capped += _prox_smooth_fused(c[sl], m[sl], beta, kappa, u[sl], s[sl], act,
                                             max_iter, bufs, start[sl])
            else:
                capped += _prox_smooth_block(c[sl], m[sl], beta, kappa, u[sl], s[sl], act,
                                             max_iter, bufs)
    if sigma_out is not None and not np.shares_memory(s, sigma_out):
        sigma_out[...] = s.reshape(shape)
    return u.reshape(shape), capped


# Elements per block of the smooth solver: a block's dozen work arrays (8 bytes per element)
# stay in a core's L2 cache, and the per-call overhead of NumPy is small against the work.
_BLOCK = 16384


def _prox_piecewise(c: Array, m: Array, beta: float, kappa: float, act: Activation,
                    out: Array | None = None) -> Array:
    """The two branch candidates and the one with the smaller phi, on cache-sized blocks in
    preallocated buffers (operation for operation the formulas of :func:`prox_activation`)."""
    a = act.slope
    assert a is not None  # every piecewise-linear activation has a slope
    shape = c.shape
    dt = float_type(c, m)
    c = np.ascontiguousarray(c, dtype=dt).ravel()
    m = np.ascontiguousarray(m, dtype=dt).ravel()
    f_into = act.f_into
    if f_into is None:
        def f_into(x, out):
            out[...] = act.f(x)
            return out
    out = np.empty_like(c) if out is None else out.reshape(-1)
    size = min(c.size, _BLOCK)
    up, um, km, t1, t2, pp = (np.empty(size, dtype=dt) for _ in range(6))
    mask = np.empty(size, dtype=bool)
    hb, hk = 0.5 * beta, 0.5 * kappa
    ab = a * beta
    den_p, den_m = beta + kappa, a * a * beta + kappa
    for lo in range(0, c.size, _BLOCK):
        hi = min(lo + _BLOCK, c.size)
        k = hi - lo
        cb, mb = c[lo:hi], m[lo:hi]
        upk, umk, kmk, t1k, t2k, ppk = up[:k], um[:k], km[:k], t1[:k], t2[:k], pp[:k]
        np.multiply(mb, kappa, out=kmk)
        # u+ = max(0, (beta c + kappa m) / (beta + kappa))
        np.multiply(cb, beta, out=upk)
        upk += kmk
        upk /= den_p
        np.maximum(0.0, upk, out=upk)
        # u- = min(0, (alpha beta c + kappa m) / (alpha^2 beta + kappa))
        np.multiply(cb, ab, out=umk)
        umk += kmk
        umk /= den_m
        np.minimum(0.0, umk, out=umk)
        for x, ph in ((upk, ppk), (umk, kmk)):  # phi(x) = ((beta/2) r) r + ((kappa/2) d) d
            f_into(x, t1k)
            np.subtract(cb, t1k, out=t1k)  # r
            np.subtract(x, mb, out=t2k)  # d
            np.multiply(t1k, hb, out=ph)
            ph *= t1k
            np.multiply(t2k, hk, out=t1k)
            t1k *= t2k
            ph += t1k
        np.less_equal(ppk, kmk, out=mask[:k])
        out[lo:hi] = np.where(mask[:k], upk, umk)  # (copyto's where= is 2x slower)
    return out.reshape(shape)


def piecewise_kind(alpha: float) -> int:
    """The :mod:`~daskadmm.splitting.fused` code of a piecewise-linear activation's sigma."""
    if alpha == 0.0:
        return fused.RELU
    if alpha == 1.0:
        return fused.IDENTITY
    return fused.LEAKY_MAX if 0.0 < alpha < 1.0 else fused.LEAKY_WHERE


def _prox_piecewise_fused(c: Array, m: Array, beta: float, kappa: float, act: Activation,
                          dt: np.dtype, out: Array | None, sigma_out: Array | None) -> Array:
    """:func:`_prox_piecewise` and ``sigma`` of its result in one compiled loop
    (:func:`daskadmm.splitting.fused._piecewise_pass`): the same operations per element, so
    the same bits, in one pass over memory instead of a dozen over cache-sized blocks."""
    a = act.slope
    assert a is not None  # every piecewise-linear activation has a slope
    shape = c.shape
    cf = np.ascontiguousarray(c, dtype=dt).ravel()
    mf = np.ascontiguousarray(m, dtype=dt).ravel()
    u = np.empty(shape, dtype=dt) if out is None else out
    direct = False
    sig = u.reshape(-1)  # (not written unless direct)
    if sigma_out is not None and sigma_out.flags.c_contiguous and sigma_out.dtype == dt:
        direct, sig = True, sigma_out.reshape(-1)
    f = np.dtype(dt).type
    consts = (f(beta), f(kappa), f(a * beta), f(beta + kappa), f(a * a * beta + kappa),
              f(0.5 * beta), f(0.5 * kappa), f(a), f(0.0))
    compiled = fused.elementwise()
    assert compiled is not None  # the caller checked
    compiled.piecewise_pass(piecewise_kind(a), cf, mf, u.reshape(-1), sig, direct, consts)
    if sigma_out is not None and not direct:
        sigma_out[...] = act.f(u)
    return u


@dataclass(frozen=True)
class Tolerances:
    """The inner solvers' relative tolerances for one floating-point type: ``grad`` (an element
    is done when ``|phi'|`` is below it times the size of its terms), ``outright`` (a Newton
    step whose predicted decrease is below it times ``|phi|`` is taken without line search),
    ``slack`` (a line-search trial may exceed ``phi`` by it times ``|phi|``), ``output`` (the
    cross-entropy output prox's gradient test). float64's are about 45, 1/sqrt, 4.5 and 450
    units of rounding (``eps`` = 2.2e-16); float32's are the same multiples of its ``eps``
    (1.2e-7)."""

    grad: float
    outright: float
    slack: float
    output: float


TOLERANCES = {np.dtype(np.float64): Tolerances(1e-14, 1e-8, 1e-15, 1e-13),
              np.dtype(np.float32): Tolerances(5e-6, 3e-4, 5e-7, 5e-5)}


def float_type(*arrays) -> np.dtype:
    """The floating-point type the math runs in: float32 when every array is float32, else
    float64 (so mixing in a float64 array never silently runs a float32 problem)."""
    if arrays and all(np.asarray(a).dtype == np.float32 for a in arrays):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


class _SmoothBuffers:
    """Work arrays of the smooth solver, allocated once per call and reused for every block.

    ``f`` maps names to float arrays of the block size: the working set's per-element data
    (``carried``), the quantities of an iteration computed before the working set may shrink
    (``derived``), temporaries, and a ``spare`` that compaction gathers into (then swaps)."""

    carried = ("uu", "cc", "mm", "s", "bc")
    derived = ("ds", "d2", "r", "d", "g")
    temps = ("h", "phi", "step", "cand", "sc", "t1", "t2", "spare")

    def __init__(self, size: int, dtype=np.float64):
        self.tol = TOLERANCES[np.dtype(dtype)]
        self.f = {name: np.empty(size, dtype=dtype)
                  for name in self.carried + self.derived + self.temps}
        self.iota = np.arange(size)
        self.idx = np.empty(size, dtype=np.intp)
        self.ispare = np.empty(size, dtype=np.intp)
        self.b1 = np.empty(size, dtype=bool)
        self.b2 = np.empty(size, dtype=bool)
        self.b3 = np.empty(size, dtype=bool)

    def load(self, c: Array, m: Array, u: Array, beta: float, f_into) -> int:
        """Start a block of elements: the working set ``uu, cc, mm`` from ``u, c, m``, ``s =
        sigma(uu)``, ``bc = beta (|c| + 1)`` (constant per element) and ``idx`` the identity;
        returns its size."""
        F = self.f
        a = u.size
        F["uu"][:a] = u
        F["cc"][:a] = c
        F["mm"][:a] = m
        self.idx[:a] = self.iota[:a]
        f_into(F["uu"][:a], F["s"][:a])
        bc = F["bc"][:a]
        np.abs(F["cc"][:a], out=bc)
        bc += 1.0
        bc *= beta
        return a

    def compact(self, a: int, keep: Array, names: tuple[str, ...]) -> int:
        """Keep the working-set positions ``keep`` (ascending) of the arrays ``names`` and of
        ``idx``; returns the new size."""
        k = keep.size
        f = self.f
        for name in names:
            src, dst = f[name], f["spare"]
            np.take(src[:a], keep, out=dst[:k])
            f[name], f["spare"] = dst, src
        np.take(self.idx[:a], keep, out=self.ispare[:k])
        self.idx, self.ispare = self.ispare, self.idx
        return k


def _prox_smooth_block(c: Array, m: Array, beta: float, kappa: float, u: Array, s_out: Array,
                       act: Activation, max_iter: int, B: _SmoothBuffers) -> int:
    """Safeguarded Newton of :func:`prox_activation` on one block of elements (in place on
    ``u``; ``s_out`` receives sigma(u)). Returns how many elements hit the cap.

    The operations are those of the plain formulation, in the same order, so that every
    element's iterates are bit for bit the same (with ``r = c - s``, ``d = u - m``)::

        g = (-beta r) s' + kappa d
        h = beta (s'^2 - r s'') + kappa
        phi = (beta/2) r r + (kappa/2) d^2
        done: |g| <= 1e-14 (beta (|c| + 1) + kappa (|u| + |m|))
        step = g / h where h >= 1e-6 kappa (Newton), else g / L_phi
        outright: Newton and g^2 / h <= 1e-8 |phi| (and not done)
        line search: u - t step, t = 1, 1/2, ... (60 trials), accepted where
                     phi(u - t step) <= phi + 1e-15 |phi|, phi(x) = ((beta/2) r) r + ((kappa/2) d) d

    Finished elements (done, or a line search that stalled) leave the working set, which is
    then compacted (``idx`` maps it back to the block). While fewer than half of it is done,
    the done elements stay (unchanged: a done element is done again at the next iteration,
    the same numbers giving the same test) and are dropped later, which saves the gathers.
    """
    f_into, derivs = act.f_into, act.derivs_from_value
    assert f_into is not None and derivs is not None  # smooth activations have both
    hb, hk = 0.5 * beta, 0.5 * kappa
    F = B.f
    a = B.load(c, m, u, beta, f_into)
    it = 0
    n_done = 0  # done elements still in the working set after the last iteration
    while a and it < max_iter:
        it += 1
        uu, cc, mm, s, bc = (F[k][:a] for k in B.carried)
        ds, d2, r, d, g = (F[k][:a] for k in B.derived)
        t1, t2 = F["t1"][:a], F["t2"][:a]
        done = B.b1[:a]
        derivs(s, ds, d2)
        np.subtract(cc, s, out=r)
        np.subtract(uu, mm, out=d)
        # g = -beta r s' + kappa d
        np.multiply(r, -beta, out=g)
        g *= ds
        np.multiply(d, kappa, out=t1)
        g += t1
        # done: |g| <= 1e-14 (beta (|c| + 1) + kappa (|u| + |m|))
        np.abs(uu, out=t1)
        np.abs(mm, out=t2)
        t1 += t2
        t1 *= kappa
        t1 += bc
        t1 *= B.tol.grad
        np.abs(g, out=t2)
        np.less_equal(t2, t1, out=done)
        n_done = int(np.count_nonzero(done))
        done_at = None
        if 2 * n_done >= a:  # most are finished: write them out and shrink the working set
            fin = np.flatnonzero(done)
            gi = B.idx[fin]
            u[gi] = uu[fin]
            s_out[gi] = s[fin]
            a = B.compact(a, np.flatnonzero(~done), B.carried + B.derived)
            n_done = 0
            if a == 0:
                break
            uu, cc, mm, s, bc = (F[k][:a] for k in B.carried)
            ds, d2, r, d, g = (F[k][:a] for k in B.derived)
            t1, t2 = F["t1"][:a], F["t2"][:a]
        elif n_done:
            done_at = np.flatnonzero(done)
        h, phi, step = F["h"][:a], F["phi"][:a], F["step"][:a]
        cand, sc = F["cand"][:a], F["sc"][:a]
        newton, ok = B.b2[:a], B.b3[:a]
        # h = beta (s'^2 - r s'') + kappa
        np.multiply(ds, ds, out=h)
        np.multiply(r, d2, out=t1)
        h -= t1
        h *= beta
        h += kappa
        # phi = (beta/2) r r + (kappa/2) d^2
        np.multiply(r, hb, out=phi)
        phi *= r
        np.multiply(d, d, out=t1)
        t1 *= hk
        phi += t1
        # Newton step where h >= 1e-6 kappa, else g / L_phi
        np.greater_equal(h, 1e-6 * kappa, out=newton)
        np.divide(g, h, out=step)
        if not newton.all():
            grad = np.flatnonzero(~newton)
            lphi = kappa + beta * (act.sup_df2 + act.sup_d2f * (np.abs(cc[grad]) + act.sup_abs))
            step[grad] = g[grad] / lphi
        # outright (newton & g^2 / h <= 1e-8 |phi|), kept in "done" from here on
        outright = B.b1[:a]
        np.multiply(g, g, out=t1)
        t1 /= h
        np.abs(phi, out=t2)
        t2 *= B.tol.outright
        np.less_equal(t1, t2, out=outright)
        outright &= newton
        # the full step for every element: the outright ones' new point, the others' first
        # trial, accepted where ((beta/2) r) r + ((kappa/2) d) d <= phi + 1e-15 |phi|
        np.subtract(uu, step, out=cand)
        f_into(cand, sc)
        np.subtract(cc, sc, out=r)
        np.subtract(cand, mm, out=d)
        np.multiply(r, hb, out=t1)
        t1 *= r
        np.multiply(d, hk, out=t2)
        t2 *= d
        t1 += t2
        np.abs(phi, out=t2)
        t2 *= B.tol.slack
        t2 += phi
        np.less_equal(t1, t2, out=ok)
        ok |= outright
        if done_at is not None:
            ok[done_at] = True  # not searched (they keep their point, below)
        stalled = None
        if not ok.all():  # halve the step of the rejected ones
            stalled = _halve(np.flatnonzero(~ok), uu, step, cc, mm, phi, hb, hk, B.tol.slack,
                             f_into,
                             cand, sc)
            cand[stalled] = uu[stalled]
            sc[stalled] = s[stalled]
        if done_at is not None:
            cand[done_at] = uu[done_at]
            sc[done_at] = s[done_at]
        # the new points: swap the buffers instead of copying
        F["uu"], F["cand"] = F["cand"], F["uu"]
        F["s"], F["sc"] = F["sc"], F["s"]
        if stalled is not None and stalled.size:  # finished: drop them (and the done ones)
            fin = stalled if done_at is None else np.union1d(stalled, done_at)
            uu, s = F["uu"][:a], F["s"][:a]
            gi = B.idx[fin]
            u[gi] = uu[fin]
            s_out[gi] = s[fin]
            keep = np.ones(a, dtype=bool)
            keep[fin] = False
            a = B.compact(a, np.flatnonzero(keep), B.carried)
            n_done = 0
    if a:
        gi = B.idx[:a]
        u[gi] = F["uu"][:a]
        s_out[gi] = F["s"][:a]
    return a - n_done


_FUSED = {"tanh": fused.TANH, "sigmoid": fused.SIGMOID}


def _prox_smooth_fused(c: Array, m: Array, beta: float, kappa: float, u: Array, s_out: Array,
                       act: Activation, max_iter: int, B: _SmoothBuffers,
                       u0: Array | None = None) -> int:
    """:func:`_prox_smooth_block` with the arithmetic of an iteration in two compiled loops
    (:mod:`daskadmm.splitting.fused`) around the vectorised activation: the same operations
    per element, so the same bits. ``u0``: the start (``u``'s values if None); every element
    of ``u`` is written. Returns how many elements hit the cap."""
    f_into = act.f_into
    assert f_into is not None  # smooth activations have it
    F = B.f
    dt = F["uu"].dtype.type
    tol = B.tol
    consts = (dt(beta), dt(kappa), dt(0.5 * beta), dt(0.5 * kappa), dt(-beta), dt(tol.grad),
              dt(tol.outright), dt(1e-6 * kappa), dt(act.sup_df2), dt(act.sup_d2f),
              dt(act.sup_abs), dt(1.0), dt(2.0))
    accept = (dt(0.5 * beta), dt(0.5 * kappa), dt(tol.slack))
    uu, ss, cc, mm, bc = F["uu"], F["s"], F["cc"], F["mm"], F["bc"]
    step, phi, cand, sc = F["step"], F["phi"], F["cand"], F["sc"]
    idx, rejected, outright, done = B.idx, B.ispare, B.b1, B.b2
    kind = _FUSED[act.name]
    compiled = fused.kernels()
    assert compiled is not None  # prox_activation checked
    newton_pass, accept_pass, load_pass = compiled
    a = u.size
    load_pass(c, m, u if u0 is None else u0, uu, cc, mm, bc, idx, dt(beta), dt(1.0))
    f_into(uu[:a], ss[:a])
    it = 0
    n_done = 0  # done elements still in the working set after the last iteration
    while a and it < max_iter:
        it += 1
        a, n_done = newton_pass(kind, uu, ss, cc, mm, bc, idx, step, phi, outright, cand,
                                      done, u, s_out, a, consts)
        if not a:
            break
        f_into(cand[:a], sc[:a])
        nrej = accept_pass(uu, ss, cc, mm, phi, outright, cand, sc, rejected, a, accept)
        if not nrej:
            continue
        rest = rejected[:nrej].copy()
        stalled = _halve(rest, uu, step, cc, mm, phi, 0.5 * beta, 0.5 * kappa, tol.slack,
                         f_into, cand, sc)
        moved = np.setdiff1d(rest, stalled, assume_unique=True)
        uu[moved] = cand[moved]
        ss[moved] = sc[moved]
        if stalled.size:  # finished where they are
            gi = idx[stalled]
            u[gi] = uu[stalled]
            s_out[gi] = ss[stalled]
            keep = np.ones(a, dtype=bool)
            keep[stalled] = False
            k = a - stalled.size
            for arr in (uu, ss, cc, mm, bc, idx, done):
                arr[:k] = arr[:a][keep]
            a = k
    if a:
        gi = idx[:a]
        u[gi] = uu[:a]
        s_out[gi] = ss[:a]
    return a - n_done


def _halve(rest: Array, uu: Array, step: Array, cc: Array, mm: Array, phi: Array, hb: float,
           hk: float, slack: float, f_into, cand: Array, sc: Array) -> Array:
    """Line search from t = 1/2 on the elements ``rest`` whose full step was rejected: writes
    accepted trials into ``cand``/``sc``; returns the stalled ones (no decrease in 60 trials)."""
    ur, sr, cr, mr = uu[rest], step[rest], cc[rest], mm[rest]
    pr = phi[rest]
    bound = pr + slack * np.abs(pr)
    pos = np.arange(rest.size)
    t = 0.5
    for _halving in range(59):
        if pos.size == 0:
            break
        cnd = ur[pos] - t * sr[pos]
        scn = np.empty_like(cnd)
        f_into(cnd, scn)
        r = cr[pos] - scn
        d = cnd - mr[pos]
        pc = hb * r * r + hk * d * d
        ok = pc <= bound[pos]
        hit = rest[pos[ok]]
        cand[hit] = cnd[ok]
        sc[hit] = scn[ok]
        pos = pos[~ok]
        t *= 0.5
    return rest[pos]


# ---------------------------------------------------------------------------------------------
# Prox of the loss (output block)
# ---------------------------------------------------------------------------------------------

def _ce_column_objective(u: Array, y: Array, m: Array, kappa: float,
                         with_scale: bool = False):
    """Column objective; with ``with_scale`` also the size of its summands (the rounding
    error of the objective is about 1e-16 times that, however small the objective is)."""
    zmax = u.max(axis=0)
    lse = zmax + np.log(np.exp(u - zmax).sum(axis=0))
    yu = np.sum(y * u, axis=0)
    quad = 0.5 * kappa * np.sum((u - m) ** 2, axis=0)
    f = lse - yu + quad
    if with_scale:
        return f, np.abs(lse) + np.abs(yu) + quad
    return f


def _ce_newton_step(p: Array, g: Array, kappa: float) -> Array:
    """``H^{-1} g`` per column for ``H = diag(p) - p p^T + kappa I`` (softmax ``p``, every
    column at once).

    ``H`` is a diagonal ``D = diag(p + kappa)`` minus a rank-one term, so by Sherman-Morrison::

        H^{-1} g = D^{-1} g + D^{-1} p (p^T D^{-1} g) / (1 - p^T D^{-1} p)

    in O(d) per column (a batched d x d LU costs O(d^3) and, at d = 10, most of the output
    block's time). With ``sum(p) = 1`` the denominator is ``kappa sum(p / (p + kappa))``, a sum
    of positive terms, so nothing cancels however close the columns are to one-hot."""
    D = p + kappa
    Dg = g / D
    Dp = p / D
    return Dg + Dp * (np.sum(p * Dg, axis=0) / (kappa * np.sum(Dp, axis=0)))


def prox_output(loss: str, Y: Array, m: Array, kappa: float, u0: Array,
                max_iter: int = 50) -> tuple[Array, int]:
    """``argmin_U  n l(U; Y) + (kappa/2) ||U - m||^2`` (columns independent).

    Notes
    -----
    MSE (``n l = (1/2)||U - Y||^2``): ``U = (Y + kappa m) / (1 + kappa)``.

    Softmax cross-entropy: per column, Newton on ``CE(u; y) + (kappa/2)||u - m||^2`` from ``u0``
    with gradient ``softmax(u) - y + kappa (u - m)`` and Hessian ``diag(p) - p p^T + kappa I``
    (positive definite; its step costs O(d) per column, see :func:`_ce_newton_step`), halving
    the step while the column objective rises (a step whose predicted decrease
    ``g^T H^-1 g`` is below ``1e-8`` times the size of the objective's summands is taken
    outright); a column stops when ``||g||_inf <= 1e-13 (1 + kappa ||u||_inf)`` or after
    ``max_iter`` iterations.

    Returns ``(U, n_capped)``.
    """
    if loss == "mse":
        return (Y + kappa * m) / (1.0 + kappa), 0
    dt = float_type(Y, m)
    tol = TOLERANCES[dt]
    U = np.array(u0, dtype=dt, copy=True)
    active = np.arange(U.shape[1])
    for _ in range(max_iter):
        if active.size == 0:
            break
        u, y, mm = U[:, active], Y[:, active], m[:, active]
        p = softmax(u)
        g = p - y + kappa * (u - mm)
        done = np.abs(g).max(axis=0) <= tol.output * (1.0 + kappa * np.abs(u).max(axis=0))
        step = _ce_newton_step(p, g, kappa)
        f0, scale = _ce_column_objective(u, y, mm, kappa, with_scale=True)
        # Near the solution the decrease g^T H^-1 g falls below the rounding error of f (about
        # 1e-16 x the size of its summands): take the full Newton step outright there
        # (H >= kappa I, so it is a descent direction).
        outright = ~done & (np.sum(g * step, axis=0) <= tol.outright * scale)
        unew = u.copy()
        unew[:, outright] = u[:, outright] - step[:, outright]
        search = np.flatnonzero(~done & ~outright)
        t = 1.0
        for _halving in range(40):
            if search.size == 0:
                break
            cand = u[:, search] - t * step[:, search]
            fc = _ce_column_objective(cand, y[:, search], mm[:, search], kappa)
            ok = fc <= f0[search] + tol.slack * scale[search]
            unew[:, search[ok]] = cand[:, ok]
            search = search[~ok]
            t *= 0.5
        U[:, active] = unew
        finished = done.copy()
        finished[search] = True  # no decrease possible: stationary to rounding
        active = active[~finished]
    return U, int(active.size)
