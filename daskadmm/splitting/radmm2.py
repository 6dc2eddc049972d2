"""RADMM-2: 2-splitting proximal-linearized ADMM.

Variables: ``W_i`` (all blocks), ``V_i`` (i < N), the output ``U_N`` and its n-scaled multiplier
``Lam_N``. The activation stays inside the penalty::

    L = l(U_N; Y) + (lam/2) sum_i ||W_i||^2
      + (beta/2n) sum_{i<N} ||V_i - s_i V_{i-1} - sigma(W_i V~_{i-1})||^2
      + <Lam_N, U_N - W_N V~_{N-1}>/n + (rho/2n) ||U_N - W_N V~_{N-1}||^2

Hidden ``W_i`` and ``V_i`` (i < N-1) are nonlinear least squares: one proximal-linearized step each,
``x+ = x^k - G/(eta + tau)``, with ``eta`` from backtracking (the subproblem has no closed form, and
its Lipschitz bound is loose for smooth sigma and does not exist for relu, so the step is checked,
not trusted): start from the Lipschitz / Gauss-Newton value (``step=lipschitz``) or from a quarter
of it, later half the last accepted eta (``step=backtracking``); accept when ``f(x+) <= f(x^k) + <G,
x+ - x^k> + (eta/2)||x+ - x^k||^2``, else double eta; at most ``backtrack_max`` trials, after which
``x^k`` is kept (so L never increases). For relu there is no Lipschitz constant, so every step is
checked this way. ``W_N``, ``U_N``, ``Lam_N`` and ``V_{N-1}`` are exact, as in RADMM-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model import Architecture, forward, loss_grad_n, loss_value
from .base import BlockSpec, Options, Penalties, lambda_max, spd_solve
from .radmm3 import update_duals, update_preactivation, update_weights, weight_stats

__all__ = [
    "block_objective",
    "block_update",
    "init_state",
    "update_activation",
    "update_activation_last",
    "update_weights_hidden",
]

Array = np.ndarray
# arrays, and 0-d float64 scalars (accepted curvatures, penalties) under their own keys
State = dict[str, Any]


def _backtrack(f, x: Array, grad: Array, eta0: float, tau: float, max_trials: int
               ) -> tuple[Array, float, int, bool]:
    """Capped backtracking for ``x+ = x - grad/(eta + tau)`` (see the module docstring).

    Returns ``(x+, accepted eta, trials, capped)``; when capped, ``x+ = x``.
    """
    f0 = f(x)
    eta = float(eta0)  # a NumPy float64 scalar would turn float32 arrays into float64
    for trial in range(1, max_trials + 1):
        delta = -grad / (eta + tau)
        xn = x + delta
        if f(xn) <= f0 + float(np.sum(grad * delta)) + 0.5 * eta * float(np.sum(delta * delta)):
            return xn, eta, trial, False
        eta *= 2.0
    return x, eta, max_trials, True


def _eta0(spec: BlockSpec, own: State, key: str, lipschitz: float) -> float:
    """Initial eta: the Lipschitz / Gauss-Newton value (step=lipschitz), or half the last
    accepted eta of this variable, or a quarter of the Lipschitz value (step=backtracking)."""
    if spec.options.step == "lipschitz":
        return lipschitz
    last = own.get(key)
    if last is not None and float(last) > 0:
        return 0.5 * float(last)
    return 0.25 * lipschitz


def update_weights_hidden(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array
                          ) -> tuple[Array, float, int, bool]:
    """Proximal-linearized step on hidden ``W_i`` (i < N).

    Notes
    -----
    ``f(W) = (beta/2)||c - sigma(W V~)||^2 + (n lam/2)||W||^2`` with ``c = V_i - s_i V_{i-1}``;
    ``G_W = n lam W - beta (R (.) sigma'(Z)) V~^T`` with ``Z = W V~``, ``R = c - sigma(Z)``.
    Lipschitz value ``eta_W = beta h ||V~||_2^2 + n lam`` with
    ``h = sup sigma'^2 + sup|sigma''| (max|c| + sup|sigma|)`` (tanh, sigmoid; a global constant)
    or the Gauss-Newton value ``h = 1`` (relu-like, checked by backtracking).
    """
    act, beta, nlam = spec.act, pen.beta, spec.n * pen.lam
    Vt = spec.aug(Vleft)
    c = own["V"] - Vleft if spec.s else own["V"]
    W = own["W"]

    def f(Wx: Array) -> float:
        r = c - act.f(Wx @ Vt)
        return 0.5 * beta * float(np.sum(r * r)) + 0.5 * nlam * float(np.sum(Wx * Wx))

    Z = W @ Vt
    grad = nlam * W - beta * ((c - act.f(Z)) * act.df(Z)) @ Vt.T
    h = 1.0 if act.piecewise_linear else (
        act.sup_df2 + act.sup_d2f * (float(np.abs(c).max()) + act.sup_abs))
    lip = beta * h * lambda_max(Vt @ Vt.T) + nlam
    return _backtrack(f, W, grad, _eta0(spec, own, "eta_W", lip), pen.tau,
                      spec.options.backtrack_max)


def update_activation(spec: BlockSpec, pen: Penalties, own: State, W: Array, Vleft: Array,
                      right: State) -> tuple[Array, float, int, bool]:
    """Proximal-linearized step on ``V_i`` for i < N-1 (its right neighbour is a hidden block).

    Notes
    -----
    ``f(V) = (beta/2)||V - s_i V_{i-1} - sigma(Z_i)||^2 + (beta/2)||R_{i+1}(V)||^2`` with
    ``Z_i = W_i^{k+1} V~_{i-1}``, ``R_{i+1} = V_{i+1} - s' V - sigma(A V + b)``, ``W_{i+1} =
    [A, b]`` of iteration k; ``G_V = beta (V - s_i V_{i-1} - sigma(Z_i))
    - beta [s' R_{i+1} + A^T (R_{i+1} (.) sigma'(Z_{i+1}))]``. Lipschitz / Gauss-Newton value
    ``eta_V = beta [1 + (s' + sup|sigma'| ||A||_2)^2 + sup|sigma''| max|R_{i+1}| ||A||_2^2]``.
    """
    act, beta, s2 = spec.act, pen.beta, spec.s_next
    A, b = spec.split_bias(right["W"])
    base = act.f(W @ spec.aug(Vleft))
    if spec.s:
        base = base + Vleft
    Vn = right["V"]

    def residual_next(V: Array) -> tuple[Array, Array]:
        Z2 = A @ V if b is None else A @ V + b
        R2 = Vn - act.f(Z2)
        if s2:
            R2 = R2 - V
        return R2, Z2

    def f(V: Array) -> float:
        R2, _ = residual_next(V)
        r1 = V - base
        return 0.5 * beta * (float(np.sum(r1 * r1)) + float(np.sum(R2 * R2)))

    V = own["V"]
    R2, Z2 = residual_next(V)
    grad = beta * (V - base) - beta * (A.T @ (R2 * act.df(Z2)))
    if s2:
        grad -= beta * R2
    a2 = lambda_max(A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A)
    sup_df = 1.0 if act.piecewise_linear else (0.25 if act.name == "sigmoid" else 1.0)
    lip = beta * (1.0 + (s2 + sup_df * np.sqrt(a2)) ** 2
                  + act.sup_d2f * float(np.abs(R2).max()) * a2)
    return _backtrack(f, V, grad, _eta0(spec, own, "eta_V", lip), pen.tau,
                      spec.options.backtrack_max)


def update_activation_last(spec: BlockSpec, pen: Penalties, own: State, W: Array, Vleft: Array,
                           right: State) -> Array:
    """Exact step on ``V_{N-1}``.

    Notes
    -----
    ``[(beta + tau) I + rho A_N^T A_N] V = beta (s_{N-1} V_{N-2} + sigma(W_{N-1} V~_{N-2}))
    + A_N^T (rho (U_N - b_N 1^T) + Lam_N) + tau V^k`` with ``W_{N-1}`` of iteration k+1 and
    ``W_N = [A_N, b_N]``, ``U_N``, ``Lam_N`` of iteration k.
    """
    A, b = spec.split_bias(right["W"])
    Ur = right["U"] if b is None else right["U"] - b
    rhs = pen.beta * spec.act.f(W @ spec.aug(Vleft))
    if spec.s:
        rhs += pen.beta * Vleft
    rhs += A.T @ (pen.rho * Ur + right["Lam"]) + pen.tau * own["V"]
    M = pen.rho * (A.T @ A)
    M[np.diag_indices_from(M)] += pen.beta + pen.tau
    return spd_solve(M, rhs)


def block_objective(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                    Y: Array | None) -> float:
    """Block i's share of L (L units): ``(lam/2)||W_i||^2`` plus the activation penalty of
    ``V_i`` (i < N), or the loss and the output constraint terms (i = N)."""
    n, W = spec.n, own["W"]
    total = 0.5 * pen.lam * float(np.sum(W * W))
    Z = W @ spec.aug(Vleft)
    if spec.is_output:
        r = own["U"] - Z
        assert Y is not None  # the output block is given the targets
        total += loss_value(spec.arch.loss, own["U"], Y)
        total += (float(np.sum(own["Lam"] * r)) + 0.5 * pen.rho * float(np.sum(r * r))) / n
    else:
        p = own["V"] - spec.act.f(Z)
        if spec.s:
            p -= Vleft
        total += 0.5 * pen.beta * float(np.sum(p * p)) / n
    return total


def block_update(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                 right: State | None, Y: Array | None) -> tuple[State, dict[str, float]]:
    """One iteration of block i (same neighbour contract as RADMM-3's ``block_update``)."""
    if spec.is_output:
        Vt = spec.aug(Vleft)
        G, B = weight_stats(Vt, own["U"], own["Lam"], pen.rho)
        W = update_weights(own["W"], G, B, pen, spec.n)
        Z = W @ Vt
        U, capped = update_preactivation(spec, pen, own["U"], Z, own["Lam"], None, Y)
        Lam = update_duals(own["Lam"], U, Z, pen.rho)
        new: State = {"W": W, "U": U, "Lam": Lam}
        r = U - Z
        stats = {"primal_sq": float(np.sum(r * r)), "dual_sq": 0.0, "capped": float(capped)}
    else:
        assert right is not None  # every block but the output one has a right neighbour
        W, eta_w, _, cap_w = update_weights_hidden(spec, pen, own, Vleft)
        capped = int(cap_w)
        if spec.i == spec.N - 1:
            V = update_activation_last(spec, pen, own, W, Vleft, right)
            eta_v = 0.0
        else:
            V, eta_v, _, cap_v = update_activation(spec, pen, own, W, Vleft, right)
            capped += int(cap_v)
        new = {"W": W, "V": V, "eta_W": np.float64(eta_w), "eta_V": np.float64(eta_v)}
        stats = {"primal_sq": 0.0, "dual_sq": float(np.sum((V - own["V"]) ** 2)),
                 "capped": float(capped)}
    stats["objective"] = block_objective(spec, pen, new, Vleft, Y)
    return new, stats


def init_state(arch: Architecture, weights: list[Array], X: Array, Y: Array,
               options: Options | None = None) -> list[State]:
    """Forward pass sets V and ``U_N``; ``Lam_N = -n grad l(U_N)`` so L = forward loss + reg."""
    U, V = forward(arch, weights, X)
    states: list[State] = []
    for i in range(1, arch.depth):
        states.append({"W": weights[i - 1].copy(), "V": V[i],
                       "eta_W": np.float64(0.0), "eta_V": np.float64(0.0)})
    states.append({"W": weights[-1].copy(), "U": U[-1],
                   "Lam": -loss_grad_n(arch.loss, U[-1], Y)})
    return states
