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

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

from ..model import Activation, Architecture, augment, softmax

__all__ = [
    "BlockSpec",
    "Options",
    "Penalties",
    "lambda_max",
    "prox_activation",
    "prox_output",
    "spd_solve",
    "spd_solve_right",
]

Array = np.ndarray


@dataclass(frozen=True)
class Penalties:
    """Penalty parameters in force for one iteration (a schedule may change rho and beta)."""

    rho: float
    beta: float
    tau: float
    lam: float
    nu: float | None = None


@dataclass(frozen=True)
class Options:
    """Inner-solver options: step rule of linearized steps and every cap."""

    step: str = "backtracking"  # "lipschitz" | "backtracking"
    backtrack_max: int = 30
    newton_max_iter: int = 100


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


def lambda_max(G: Array) -> float:
    """Largest eigenvalue of a symmetric PSD matrix (exact, via LAPACK's ``syevr``)."""
    m = G.shape[0]
    if not np.all(np.isfinite(G)):
        return float("nan")  # propagates: the run ends with status nonfinite
    return float(sla.eigvalsh(G, subset_by_index=[m - 1, m - 1], check_finite=False)[0])


def spd_solve(M: Array, R: Array) -> Array:
    """Solve ``M X = R`` for symmetric positive definite ``M`` (Cholesky).

    ``M`` is SPD in exact arithmetic for every system here; if it is not numerically (entries
    overflowing after an exploding forward pass), the result is NaN, so the run stops with
    status ``nonfinite`` instead of raising."""
    if not np.all(np.isfinite(M)):
        return np.full(R.shape, np.nan)
    try:
        c = sla.cho_factor(M, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return np.full(R.shape, np.nan)
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
                    act: Activation, max_iter: int = 100) -> tuple[Array, int]:
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

    Returns ``(u, n_capped)``: the solution and how many elements hit the iteration cap.
    """
    if act.piecewise_linear:
        a = act.slope
        assert a is not None  # every piecewise-linear activation has a slope
        up = np.maximum(0.0, (beta * c + kappa * m) / (beta + kappa))
        um = np.minimum(0.0, (a * beta * c + kappa * m) / (a * a * beta + kappa))
        pp = _phi(act, up, c, m, beta, kappa)
        pm = _phi(act, um, c, m, beta, kappa)
        return np.where(pp <= pm, up, um), 0

    shape = c.shape
    c, m = c.ravel(), m.ravel()
    u = np.array(u0, dtype=np.float64).ravel().copy()
    lphi = kappa + beta * (act.sup_df2 + act.sup_d2f * (np.abs(c) + act.sup_abs))
    active = np.arange(u.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        uu, cc, mm = u[active], c[active], m[active]
        s, ds, d2 = act.f(uu), act.df(uu), act.d2f(uu)
        r = cc - s
        g = -beta * r * ds + kappa * (uu - mm)
        h = beta * (ds * ds - r * d2) + kappa
        phi = 0.5 * beta * r * r + 0.5 * kappa * (uu - mm) ** 2
        done = np.abs(g) <= 1e-14 * (beta * (np.abs(cc) + 1.0) + kappa * (np.abs(uu) + np.abs(mm)))
        newton = h >= 1e-6 * kappa
        step = np.where(newton, g / np.where(newton, h, 1.0), g / lphi[active])
        outright = newton & (g * g / np.where(newton, h, 1.0) <= 1e-8 * np.abs(phi)) & ~done
        unew = uu.copy()
        unew[outright] = uu[outright] - step[outright]
        # halving line search on the others
        search = np.flatnonzero(~done & ~outright)
        t = 1.0
        stalled = np.zeros(uu.size, dtype=bool)
        for _halving in range(60):
            if search.size == 0:
                break
            cand = uu[search] - t * step[search]
            pc = _phi(act, cand, cc[search], mm[search], beta, kappa)
            ok = pc <= phi[search] + 1e-15 * np.abs(phi[search])
            unew[search[ok]] = cand[ok]
            search = search[~ok]
            t *= 0.5
        stalled[search] = True
        u[active] = unew
        finished = done | stalled
        active = active[~finished]
    return u.reshape(shape), int(active.size)


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


def prox_output(loss: str, Y: Array, m: Array, kappa: float, u0: Array,
                max_iter: int = 50) -> tuple[Array, int]:
    """``argmin_U  n l(U; Y) + (kappa/2) ||U - m||^2`` (columns independent).

    Notes
    -----
    MSE (``n l = (1/2)||U - Y||^2``): ``U = (Y + kappa m) / (1 + kappa)``.

    Softmax cross-entropy: per column, Newton on ``CE(u; y) + (kappa/2)||u - m||^2`` from ``u0``
    with gradient ``softmax(u) - y + kappa (u - m)`` and Hessian ``diag(p) - p p^T + kappa I``
    (positive definite), halving the step while the column objective rises (a step whose predicted
    decrease ``g^T H^-1 g`` is below ``1e-8`` times the size of the objective's summands is taken
    outright); a column stops when
    ``||g||_inf <= 1e-13 (1 + kappa ||u||_inf)`` or after ``max_iter`` iterations.

    Returns ``(U, n_capped)``.
    """
    if loss == "mse":
        return (Y + kappa * m) / (1.0 + kappa), 0
    U = np.array(u0, dtype=np.float64, copy=True)
    dy = U.shape[0]
    active = np.arange(U.shape[1])
    eye = np.eye(dy)
    for _ in range(max_iter):
        if active.size == 0:
            break
        u, y, mm = U[:, active], Y[:, active], m[:, active]
        p = softmax(u)
        g = p - y + kappa * (u - mm)
        done = np.abs(g).max(axis=0) <= 1e-13 * (1.0 + kappa * np.abs(u).max(axis=0))
        H = (p.T[:, :, None] * eye[None]) - p.T[:, :, None] * p.T[:, None, :] + kappa * eye[None]
        step = np.linalg.solve(H, g.T[:, :, None])[:, :, 0].T
        f0, scale = _ce_column_objective(u, y, mm, kappa, with_scale=True)
        # Near the solution the decrease g^T H^-1 g falls below the rounding error of f (about
        # 1e-16 x the size of its summands): take the full Newton step outright there
        # (H >= kappa I, so it is a descent direction).
        outright = ~done & (np.sum(g * step, axis=0) <= 1e-8 * scale)
        unew = u.copy()
        unew[:, outright] = u[:, outright] - step[:, outright]
        search = np.flatnonzero(~done & ~outright)
        t = 1.0
        for _halving in range(40):
            if search.size == 0:
                break
            cand = u[:, search] - t * step[:, search]
            fc = _ce_column_objective(cand, y[:, search], mm[:, search], kappa)
            ok = fc <= f0[search] + 1e-15 * scale[search]
            unew[:, search[ok]] = cand[:, ok]
            search = search[~ok]
            t *= 0.5
        U[:, active] = unew
        finished = done.copy()
        finished[search] = True  # no decrease possible: stationary to rounding
        active = active[~finished]
    return U, int(active.size)
