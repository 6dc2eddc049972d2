"""Shared builders and *independent* reference formulas for the math tests.

Everything in this module is written from the formulas stated in its docstrings (the augmented
Lagrangians of RADMM-3/3L and RADMM-2 with penalties and proximal terms divided by the sample count
n, the regulariser not), not from daskadmm's update code: the activations, the losses, the forward
pass and the augmented Lagrangians are coded term by term here. The library is only used to build
architectures and initial weights, which the formulas do not depend on.

Conventions (as in the library): samples are columns, blocks are numbered 1..N, a bias is a
constant-1 row appended to every layer input, ``states[i - 1]`` is block i's state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from daskadmm.model import Architecture, init_weights
from daskadmm.splitting.base import Penalties

Array = np.ndarray

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid")
LEAKY = 0.1  # leaky_relu slope used by every test problem


# ---------------------------------------------------------------------------------------------
# Tolerances, per dtype, in one place
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances of the math tests (they only depend on the floating-point type)."""

    rounding: float  # comparisons of function values at machine precision
    exact: float  # quantities that are equal in exact arithmetic (L at initialisation, ...)
    closed_form: float  # closed forms, grids and exact linear algebra vs the library
    identity: float  # per-step identities and decreases of L, relative to max(1, |L|)
    stationarity: float  # |phi'| of the elementwise prox, relative to the size of its terms
    kkt: float  # the multiplier identity after the U step, elementwise
    fd_grad: float  # |n grad F| by central differences at an exact minimiser, relative to
    #                 |n grad F| at x^k (FD of a quadratic is exact up to rounding)
    fd_rel: float  # a gradient recovered from a step vs central differences; FD curvature
    oracle: float  # agreement with a scipy.optimize minimiser
    limit: float  # limit cases (huge rho, lambda, tau)


TOLERANCES: dict[np.dtype, Tolerances] = {
    np.dtype(np.float64): Tolerances(
        rounding=1e-15,
        exact=1e-13,
        closed_form=1e-12,
        identity=1e-10,
        stationarity=1e-10,
        kkt=1e-9,
        fd_grad=1e-7,
        fd_rel=1e-5,
        oracle=1e-5,
        limit=1e-7,
    ),
}


def tol(dtype=np.float64) -> Tolerances:
    return TOLERANCES[np.dtype(dtype)]


# Penalties of the RADMM subproblem and sweep tests: all four parameters different, so that a
# mix-up of two of them shows; and beta large against rho + tau, where the smooth U subproblem
# is nonconvex for most elements.
PEN = Penalties(rho=1.3, beta=0.7, tau=0.2, lam=0.01)
PEN_NONCONVEX = Penalties(rho=0.4, beta=6.0, tau=0.05, lam=0.002)

# (kind, bias, loss) variants of the small problems
VARIANTS = [("resnet", True, "mse"), ("mlp", False, "cross_entropy")]
VARIANT_IDS = ["resnet-bias-mse", "mlp-nobias-ce"]


# ---------------------------------------------------------------------------------------------
# Activations and losses, written independently of daskadmm.model
# ---------------------------------------------------------------------------------------------

def sigma(name: str, u: Array) -> Array:
    if name == "relu":
        return np.maximum(u, 0.0)
    if name == "leaky_relu":
        return np.where(u >= 0.0, u, LEAKY * u)
    if name == "identity":
        return np.asarray(u, dtype=float).copy()
    if name == "tanh":
        return np.tanh(u)
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * u))
    raise ValueError(name)


def dsigma(name: str, u: Array) -> Array:
    """sigma'(u) (piecewise-linear: the one-sided value; callers exclude u == 0)."""
    if name == "relu":
        return (u > 0).astype(float)
    if name == "leaky_relu":
        return np.where(u > 0, 1.0, LEAKY)
    if name == "identity":
        return np.ones_like(u)
    if name == "tanh":
        return 1.0 / np.cosh(u) ** 2
    if name == "sigmoid":
        s = sigma("sigmoid", u)
        return s * (1.0 - s)
    raise ValueError(name)


def loss(kind: str, out: Array, Y: Array) -> float:
    """ell(out; Y): (1/2n)||out - Y||^2 or the mean softmax cross-entropy."""
    n = Y.shape[1]
    if kind == "mse":
        return 0.5 * float(np.sum((out - Y) ** 2)) / n
    return float(np.sum(logsumexp(out, axis=0) - np.sum(Y * out, axis=0))) / n


def loss_grad_n(kind: str, out: Array, Y: Array) -> Array:
    """n * grad ell."""
    if kind == "mse":
        return out - Y
    e = np.exp(out - out.max(axis=0))
    return e / e.sum(axis=0) - Y


def skip(arch: Architecture, i: int) -> int:
    """s_i: 1 for the residual blocks 2..N-1 of a resnet."""
    return int(arch.kind == "resnet" and 2 <= i <= arch.depth - 1)


def skip_term(arch: Architecture, i: int, V_prev: Array) -> Array | float:
    """s_i V_{i-1} (0 when s_i = 0; V_{i-1} may then have another height)."""
    return V_prev if skip(arch, i) else 0.0


def aug(arch: Architecture, V: Array) -> Array:
    return np.vstack([V, np.ones((1, V.shape[1]))]) if arch.bias else V


def forward(arch: Architecture, weights: list[Array], X: Array) -> tuple[list[Array], list[Array]]:
    """U[i-1] = W_i V~_{i-1} (i = 1..N), V[i] = V_i (V[0] = X)."""
    U, V = [], [X]
    for i in range(1, arch.depth + 1):
        Z = weights[i - 1] @ aug(arch, V[-1])
        U.append(Z)
        if i < arch.depth:
            V.append(skip_term(arch, i, V[-1]) + sigma(arch.activation, Z))
    return U, V


def forward_objective(arch: Architecture, weights: list[Array], X: Array, Y: Array,
                      lam: float) -> float:
    """Forward loss + (lam/2) sum ||W_i||^2."""
    out = forward(arch, weights, X)[0][-1]
    return loss(arch.loss, out, Y) + 0.5 * lam * sum(float(np.sum(W * W)) for W in weights)


# ---------------------------------------------------------------------------------------------
# The augmented Lagrangians, term by term
# ---------------------------------------------------------------------------------------------

def lagrangian3(arch: Architecture, states: list[dict], X: Array, Y: Array,
                pen: Penalties) -> float:
    """RADMM-3 / 3L:  L = ell(U_N; Y) + (lam/2) sum ||W_i||^2
    + (beta/2n) sum_{i<N} ||V_i - s_i V_{i-1} - sigma(U_i)||^2
    + sum_i [<Lam_i, U_i - W_i V~_{i-1}>/n + (rho/2n)||U_i - W_i V~_{i-1}||^2]."""
    n, N = X.shape[1], arch.depth
    V = [X] + [states[i]["V"] for i in range(N - 1)]
    total = loss(arch.loss, states[N - 1]["U"], Y)
    for i in range(1, N + 1):
        st = states[i - 1]
        W, U, Lam = st["W"], st["U"], st["Lam"]
        total += 0.5 * pen.lam * float(np.sum(W * W))
        r = U - W @ aug(arch, V[i - 1])
        total += float(np.sum(Lam * r)) / n
        total += 0.5 * pen.rho * float(np.sum(r * r)) / n
        if i < N:
            p = V[i] - skip_term(arch, i, V[i - 1]) - sigma(arch.activation, U)
            total += 0.5 * pen.beta * float(np.sum(p * p)) / n
    return total


def lagrangian2(arch: Architecture, states: list[dict], X: Array, Y: Array,
                pen: Penalties) -> float:
    """RADMM-2:  L = ell(U_N; Y) + (lam/2) sum ||W_i||^2
    + (beta/2n) sum_{i<N} ||V_i - s_i V_{i-1} - sigma(W_i V~_{i-1})||^2
    + <Lam_N, U_N - W_N V~_{N-1}>/n + (rho/2n)||U_N - W_N V~_{N-1}||^2."""
    n, N = X.shape[1], arch.depth
    V = [X] + [states[i]["V"] for i in range(N - 1)]
    out = states[N - 1]
    total = loss(arch.loss, out["U"], Y)
    for i in range(1, N + 1):
        W = states[i - 1]["W"]
        total += 0.5 * pen.lam * float(np.sum(W * W))
        Z = W @ aug(arch, V[i - 1])
        if i < N:
            p = V[i] - skip_term(arch, i, V[i - 1]) - sigma(arch.activation, Z)
            total += 0.5 * pen.beta * float(np.sum(p * p)) / n
        else:
            r = out["U"] - Z
            total += float(np.sum(out["Lam"] * r)) / n
            total += 0.5 * pen.rho * float(np.sum(r * r)) / n
    return total


def with_value(states: list[dict], i: int, key: str, value: Array) -> list[dict]:
    """A shallow copy of ``states`` with block i's ``key`` replaced."""
    new = [dict(s) for s in states]
    new[i - 1][key] = value
    return new


# ---------------------------------------------------------------------------------------------
# Problems and states
# ---------------------------------------------------------------------------------------------

@dataclass
class Problem:
    arch: Architecture
    X: Array
    Y: Array
    weights: list[Array]

    @property
    def n(self) -> int:
        return self.X.shape[1]


def make_problem(act: str = "relu", kind: str = "resnet", bias: bool = True, loss: str = "mse",
                 depth: int = 4, d_in: int = 3, width: int = 5, d_out: int = 2, n: int = 24,
                 seed: int = 0) -> Problem:
    """A tiny problem: Gaussian inputs, targets from a random teacher plus noise (mse) or random
    one-hot labels (cross-entropy), and the library's initial weights."""
    arch = Architecture(kind, depth, d_in, width, d_out, act, leaky_slope=LEAKY, bias=bias,
                        loss=loss)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((d_in, n))
    if loss == "mse":
        T = rng.standard_normal((d_out, d_in))
        Y = np.tanh(T @ X) + 0.1 * rng.standard_normal((d_out, n))
    else:
        Y = np.eye(d_out)[:, rng.integers(d_out, size=n)]
    return Problem(arch, X, Y, init_weights(arch, rng))


def random_weights(prob: Problem, rng: np.random.Generator) -> list[Array]:
    """The problem's weights plus a random perturbation (bias columns nonzero)."""
    return [W + 0.3 * rng.standard_normal(W.shape) for W in prob.weights]


def random_state3(prob: Problem, seed: int = 1) -> list[dict]:
    """A random RADMM-3 state that is **not** forward-consistent: every term of L is active."""
    rng = np.random.default_rng(seed)
    W = random_weights(prob, rng)
    U, V = forward(prob.arch, W, prob.X)
    states = []
    for i in range(1, prob.arch.depth + 1):
        st = {"W": W[i - 1], "U": U[i - 1] + 0.5 * rng.standard_normal(U[i - 1].shape),
              "Lam": 0.5 * rng.standard_normal(U[i - 1].shape)}
        if i < prob.arch.depth:
            st["V"] = V[i] + 0.5 * rng.standard_normal(V[i].shape)
        states.append(st)
    return states


def random_state2(prob: Problem, seed: int = 1) -> list[dict]:
    """A random RADMM-2 state (hidden: W, V and no remembered step; output: W, U, Lam)."""
    rng = np.random.default_rng(seed)
    W = random_weights(prob, rng)
    U, V = forward(prob.arch, W, prob.X)
    states = []
    for i in range(1, prob.arch.depth):
        states.append({"W": W[i - 1], "V": V[i] + 0.5 * rng.standard_normal(V[i].shape),
                       "eta_W": np.float64(0.0), "eta_V": np.float64(0.0)})
    states.append({"W": W[-1], "U": U[-1] + 0.5 * rng.standard_normal(U[-1].shape),
                   "Lam": 0.5 * rng.standard_normal(U[-1].shape)})
    return states


def left_value(prob: Problem, states: list[dict], i: int) -> Array:
    """V_{i-1} (X for block 1)."""
    return prob.X if i == 1 else states[i - 2]["V"]


# ---------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------

def fd_grad(f: Callable[[Array], float], x: Array, h: float = 1e-4) -> Array:
    """Central-difference gradient of a scalar function of an array (exact for quadratics up to
    rounding)."""
    x = np.array(x, dtype=float, copy=True)
    g = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        fp = f(x)
        x[idx] = old - h
        fm = f(x)
        x[idx] = old
        g[idx] = (fp - fm) / (2.0 * h)
    return g


def fd_hessian_quadratic(f: Callable[[Array], float], x: Array, h: float = 0.5) -> Array:
    """Hessian of a **quadratic** function of an array by second differences (exact up to
    rounding for any h; a larger h lowers the rounding noise)."""
    x0 = np.array(x, dtype=float, copy=True).ravel()
    m = x0.size

    def fv(v: Array) -> float:
        return f(v.reshape(x.shape))

    f0 = fv(x0)
    fi = np.empty(m)
    for j in range(m):
        e = x0.copy()
        e[j] += h
        fi[j] = fv(e)
    H = np.empty((m, m))
    for j in range(m):
        for k in range(j, m):
            e = x0.copy()
            e[j] += h
            e[k] += h
            H[j, k] = H[k, j] = (fv(e) - fi[j] - fi[k] + f0) / (h * h)
    return H
