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

from collections.abc import Callable, Iterator
from typing import Any, TypedDict

import numpy as np

from ..model import Architecture, forward, loss_grad_n, loss_value
from .base import BlockSpec, Options, Penalties, Stats, StepOut, lambda_max, spd_solve
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

class State(TypedDict, total=False):
    """Block i's variables: ``W_i``; hidden blocks ``V_i`` and the last accepted step
    constants ``eta_W``, ``eta_V`` (0-d float64); the output block ``U_N``, ``Lam_N``."""

    W: Array
    V: Array
    U: Array
    Lam: Array
    eta_W: Any
    eta_V: Any


def trial_etas(eta0: float, start: int, stop: int) -> Iterator[tuple[int, float]]:
    """Trials ``t = start .. stop-1`` of the backtracking and their curvatures
    ``eta0 * 2^t`` (exact doublings, the same bits however the trials are split up)."""
    eta = float(eta0) * 2.0 ** start  # a NumPy float64 scalar would turn float32 into float64
    for t in range(start, stop):
        yield t, eta
        eta *= 2.0


def capped_eta(eta0: float, max_trials: int) -> float:
    """The eta recorded when no trial passed: ``eta0`` doubled ``max_trials`` times."""
    return float(eta0) * 2.0 ** max_trials


def trial_step(x: Array, grad: Array, eta: float, tau: float) -> tuple[Array, Array]:
    """The trial point ``x+ = x + delta``, ``delta = -grad/(eta + tau)``; returns
    ``(x+, delta)``."""
    delta = -grad / (eta + tau)
    return x + delta, delta


def accepts(f_new: float, f0: float, gd: float, dd: float, eta: float) -> bool:
    """The backtracking test ``f(x+) <= f(x) + <G, delta> + (eta/2)||delta||^2`` from
    ``gd = <G, delta>`` and ``dd = ||delta||^2`` (sums a chunked engine adds up over chunks)."""
    return f_new <= f0 + gd + 0.5 * eta * dd


def _backtrack(f, x: Array, grad: Array, eta0: float, tau: float, max_trials: int,
               f0: float | None = None) -> tuple[Array, float, int, bool]:
    """Capped backtracking for ``x+ = x - grad/(eta + tau)`` (see the module docstring);
    ``f0``: ``f(x)`` when already known.

    Returns ``(x+, accepted eta, trials, capped)``; when capped, ``x+ = x`` and eta is
    ``eta0 * 2^max_trials``.
    """
    if f0 is None:
        f0 = f(x)
    for t, eta in trial_etas(eta0, 0, max_trials):
        xn, delta = trial_step(x, grad, eta, tau)
        if accepts(f(xn), f0, float(np.sum(grad * delta)), float(np.sum(delta * delta)), eta):
            return xn, eta, t + 1, False
    return x, capped_eta(eta0, max_trials), max_trials, True


def eta_start(spec: BlockSpec, last: float, lipschitz: Callable[[], float]) -> float:
    """Initial eta: the Lipschitz / Gauss-Newton value (step=lipschitz), or half the last
    accepted eta of this variable, or a quarter of the Lipschitz value (step=backtracking).
    ``lipschitz`` is called only when the value is needed."""
    if spec.options.step == "lipschitz":
        return lipschitz()
    if float(last) > 0:
        return 0.5 * float(last)
    return 0.25 * lipschitz()


# -- the hidden W step, in pieces that are sums over the samples (a chunked engine adds them) --

def w_target(spec: BlockSpec, V: Array, Vleft: Array) -> Array:
    """``c = V_i - s_i V_{i-1}``, what ``sigma(W_i V~_{i-1})`` should match."""
    return V - Vleft if spec.s else V


def w_fit(spec: BlockSpec, pen: Penalties, c: Array, Vt: Array, W: Array) -> float:
    """``(beta/2)||c - sigma(W V~)||^2`` (the data term of the W subproblem)."""
    r = c - spec.act.f(W @ Vt)
    return 0.5 * pen.beta * float(np.sum(r * r))


def w_reg(spec: BlockSpec, pen: Penalties, W: Array) -> float:
    """``(n lam/2)||W||^2``."""
    return 0.5 * (spec.n * pen.lam) * float(np.sum(W * W))


def w_fit_grad(spec: BlockSpec, pen: Penalties, c: Array, Vt: Array, W: Array
               ) -> tuple[float, Array]:
    """The data term at ``W`` and its share of the gradient, ``beta (R (.) sigma'(Z)) V~^T``
    (``Z = W V~``, ``R = c - sigma(Z)``)."""
    act = spec.act
    Z = W @ Vt
    R = c - act.f(Z)
    return 0.5 * pen.beta * float(np.sum(R * R)), (pen.beta * (R * act.df(Z))) @ Vt.T


def w_gradient(spec: BlockSpec, pen: Penalties, W: Array, fit_grad: Array) -> Array:
    """``G_W = n lam W - beta (R (.) sigma'(Z)) V~^T`` from the summed data-term shares."""
    return (spec.n * pen.lam) * W - fit_grad


def w_lipschitz(spec: BlockSpec, pen: Penalties, gram: Array, cmax: float) -> float:
    """``eta_W = beta h ||V~||_2^2 + n lam`` from ``gram = V~ V~^T`` and ``cmax = max|c|``:
    ``h = sup sigma'^2 + sup|sigma''| (max|c| + sup|sigma|)`` (tanh, sigmoid) or the
    Gauss-Newton value ``h = 1`` (relu-like, checked by backtracking)."""
    act = spec.act
    h = 1.0 if act.piecewise_linear else act.sup_df2 + act.sup_d2f * (cmax + act.sup_abs)
    return pen.beta * h * lambda_max(gram) + spec.n * pen.lam


def needs_lipschitz(spec: BlockSpec, last: float) -> bool:
    """Whether :func:`eta_start` needs the Lipschitz value (given the last accepted eta)."""
    return spec.options.step == "lipschitz" or not float(last) > 0


def update_weights_hidden(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array
                          ) -> tuple[Array, float, int, bool]:
    """Proximal-linearized step on hidden ``W_i`` (i < N).

    Notes
    -----
    ``f(W) = (beta/2)||c - sigma(W V~)||^2 + (n lam/2)||W||^2`` with ``c = V_i - s_i V_{i-1}``;
    ``G_W = n lam W - beta (R (.) sigma'(Z)) V~^T`` with ``Z = W V~``, ``R = c - sigma(Z)``;
    the first trial's eta from :func:`w_lipschitz` or the last accepted one
    (:func:`eta_start`).
    """
    Vt = spec.aug(Vleft)
    c = w_target(spec, own["V"], Vleft)
    W = own["W"]
    fit0, part = w_fit_grad(spec, pen, c, Vt, W)
    grad = w_gradient(spec, pen, W, part)
    eta0 = eta_start(spec, own.get("eta_W", 0.0),
                     lambda: w_lipschitz(spec, pen, Vt @ Vt.T, float(np.abs(c).max())))
    return _backtrack(lambda Wx: w_fit(spec, pen, c, Vt, Wx) + w_reg(spec, pen, Wx), W, grad,
                      eta0, pen.tau, spec.options.backtrack_max, fit0 + w_reg(spec, pen, W))


# -- the hidden V step (i < N-1): every term acts on each sample (column) on its own --------

def v_base(spec: BlockSpec, Z: Array, Vleft: Array) -> Array:
    """``s_i V_{i-1} + sigma(Z_i)``, ``Z_i = W_i V~_{i-1}`` with ``W_i`` of iteration k+1."""
    base = spec.act.f(Z)
    if spec.s:
        base = base + Vleft
    return base


def v_next_residual(spec: BlockSpec, W_right: Array, V_right: Array, V: Array
                    ) -> tuple[Array, Array]:
    """``R_{i+1} = V_{i+1} - s' V - sigma(A V + b)`` and ``Z_{i+1} = A V + b``
    (``W_{i+1} = [A, b]``, ``V_{i+1}`` of iteration k)."""
    A, b = spec.split_bias(W_right)
    Z2 = A @ V if b is None else A @ V + b
    R2 = V_right - spec.act.f(Z2)
    if spec.s_next:
        R2 = R2 - V
    return R2, Z2


def v_value(spec: BlockSpec, pen: Penalties, base: Array, W_right: Array, V_right: Array,
            V: Array, R2: Array | None = None) -> float:
    """``f(V) = (beta/2)||V - base||^2 + (beta/2)||R_{i+1}(V)||^2`` (``R2``: ``R_{i+1}(V)``
    when already known)."""
    if R2 is None:
        R2, _ = v_next_residual(spec, W_right, V_right, V)
    r1 = V - base
    return 0.5 * pen.beta * (float(np.sum(r1 * r1)) + float(np.sum(R2 * R2)))


def v_gradient(spec: BlockSpec, pen: Penalties, base: Array, W_right: Array, V_right: Array,
               V: Array) -> tuple[Array, Array]:
    """``G_V = beta (V - base) - beta [s' R_{i+1} + A^T (R_{i+1} (.) sigma'(Z_{i+1}))]``;
    returns ``(G_V, R_{i+1})``."""
    beta = pen.beta
    A, _ = spec.split_bias(W_right)
    R2, Z2 = v_next_residual(spec, W_right, V_right, V)
    grad = beta * (V - base) - beta * (A.T @ (R2 * spec.act.df(Z2)))
    if spec.s_next:
        grad -= beta * R2
    return grad, R2


def right_norm_sq(spec: BlockSpec, W_right: Array) -> float:
    """``||A||_2^2`` of ``W_{i+1} = [A, b]``."""
    A, _ = spec.split_bias(W_right)
    return lambda_max(A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A)


def v_lipschitz(spec: BlockSpec, pen: Penalties, a2: float, r2max: float) -> float:
    """``eta_V = beta [1 + (s' + sup|sigma'| ||A||_2)^2 + sup|sigma''| max|R_{i+1}| ||A||_2^2]``
    (``a2 = ||A||_2^2``, ``r2max = max|R_{i+1}|`` at ``V^k``)."""
    act = spec.act
    sup_df = 1.0 if act.piecewise_linear else (0.25 if act.name == "sigmoid" else 1.0)
    return pen.beta * (1.0 + (spec.s_next + sup_df * np.sqrt(a2)) ** 2
                       + act.sup_d2f * r2max * a2)


def v_needs_max(spec: BlockSpec, last: float) -> bool:
    """Whether the first trial's eta needs ``max|R_{i+1}|`` (a smooth activation, and the
    Lipschitz value in use)."""
    return spec.act.sup_d2f != 0 and needs_lipschitz(spec, last)


def update_activation(spec: BlockSpec, pen: Penalties, own: State, W: Array, Vleft: Array,
                      right: State) -> tuple[Array, float, int, bool]:
    """Proximal-linearized step on ``V_i`` for i < N-1 (its right neighbour is a hidden block).

    Notes
    -----
    ``f(V) = (beta/2)||V - s_i V_{i-1} - sigma(Z_i)||^2 + (beta/2)||R_{i+1}(V)||^2`` with
    ``Z_i = W_i^{k+1} V~_{i-1}``, ``R_{i+1} = V_{i+1} - s' V - sigma(A V + b)``, ``W_{i+1} =
    [A, b]`` of iteration k (:func:`v_value`, :func:`v_gradient`); the first trial's eta from
    :func:`v_lipschitz` or the last accepted one.
    """
    base = v_base(spec, W @ spec.aug(Vleft), Vleft)
    Wr, Vr, V = right["W"], right["V"], own["V"]
    grad, R2 = v_gradient(spec, pen, base, Wr, Vr, V)
    eta0 = eta_start(spec, own.get("eta_V", 0.0),
                     lambda: v_lipschitz(spec, pen, right_norm_sq(spec, Wr),
                                         float(np.abs(R2).max()) if spec.act.sup_d2f else 0.0))
    return _backtrack(lambda Vx: v_value(spec, pen, base, Wr, Vr, Vx), V, grad, eta0, pen.tau,
                      spec.options.backtrack_max, v_value(spec, pen, base, Wr, Vr, V, R2))


def update_activation_last(spec: BlockSpec, pen: Penalties, own: State, W: Array, Vleft: Array,
                           right: State, Z: Array | None = None) -> Array:
    """Exact step on ``V_{N-1}``.

    Notes
    -----
    ``[(beta + tau) I + rho A_N^T A_N] V = beta (s_{N-1} V_{N-2} + sigma(W_{N-1} V~_{N-2}))
    + A_N^T (rho (U_N - b_N 1^T) + Lam_N) + tau V^k`` with ``W_{N-1}`` of iteration k+1 and
    ``W_N = [A_N, b_N]``, ``U_N``, ``Lam_N`` of iteration k; ``Z``: ``W_{N-1} V~_{N-2}`` when
    already computed.
    """
    A, b = spec.split_bias(right["W"])
    Ur = right["U"] if b is None else right["U"] - b
    if Z is None:
        Z = W @ spec.aug(Vleft)
    rhs = pen.beta * spec.act.f(Z)
    if spec.s:
        rhs += pen.beta * Vleft
    rhs += A.T @ (pen.rho * Ur + right["Lam"]) + pen.tau * own["V"]
    M = pen.rho * (A.T @ A)
    M[np.diag_indices_from(M)] += pen.beta + pen.tau
    return spd_solve(M, rhs)


def activation_penalty(spec: BlockSpec, pen: Penalties, V: Array, Z: Array, Vleft: Array
                       ) -> float:
    """``(beta/2n)||V_i - s_i V_{i-1} - sigma(Z_i)||^2`` (``Z_i = W_i V~_{i-1}``)."""
    p = V - spec.act.f(Z)
    if spec.s:
        p -= Vleft
    return 0.5 * pen.beta * float(np.sum(p * p)) / spec.n


def output_constraint(spec: BlockSpec, pen: Penalties, Lam: Array, r: Array) -> float:
    """``(<Lam_N, r> + (rho/2)||r||^2)/n`` with ``r = U_N - W_N V~_{N-1}``."""
    return (float(np.sum(Lam * r)) + 0.5 * pen.rho * float(np.sum(r * r))) / spec.n


def block_objective(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                    Y: Array | None) -> float:
    """Block i's share of L (L units): ``(lam/2)||W_i||^2`` plus the activation penalty of
    ``V_i`` (i < N), or the loss and the output constraint terms (i = N)."""
    W = own["W"]
    total = 0.5 * pen.lam * float(np.sum(W * W))
    Z = W @ spec.aug(Vleft)
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        # (the loss and the constraint terms added first, as a chunk task adds them)
        total += loss_value(spec.arch.loss, own["U"], Y) + output_constraint(
            spec, pen, own["Lam"], own["U"] - Z)
    else:
        total += activation_penalty(spec, pen, own["V"], Z, Vleft)
    return total


def block_update(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                 right: State | None, Y: Array | None) -> StepOut:
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
        primal_sq, dual_sq = float(np.sum(r * r)), 0.0
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
        primal_sq, dual_sq = 0.0, float(np.sum((V - own["V"]) ** 2))
    stats: Stats = {"primal_sq": primal_sq, "dual_sq": dual_sq, "capped": float(capped),
                    "objective": block_objective(spec, pen, new, Vleft, Y)}
    return StepOut(new, stats)


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
