"""pdADMM (Wang, Chai, Cheng, Zhao, ICDM 2020): layer-parallel ADMM with input/output copies.

Layer l has its own input ``p_l`` (``p_1 = X``, fixed), weights ``W_l = [A_l, b_l]`` (bias as
the last column), pre-activation ``z_l`` and output ``q_l`` (l < L). Neighbouring layers are
joined by the hard constraints ``p_{l+1} = q_l`` with n-scaled multipliers ``u_l``; everything
inside a layer is relaxed with weight ``nu`` (``pen.nu``; None: ``nu = rho``). In this package's
scaling convention (``base``)::

    L_rho = l(z_L; Y) + (lam/2) sum_l ||W_l||^2
          + (nu/2n) [ sum_l ||z_l - W_l p~_l||^2 + sum_{l<L} ||q_l - s_l p_l - sigma(z_l)||^2 ]
          + sum_{l<L} [ <u_l, p_{l+1} - q_l>/n + (rho/2n) ||p_{l+1} - q_l||^2 ]

MLP: every ``s_l = 0`` (the paper's problem). Residual network (``q_l = p_l + sigma(z_l)`` for
l = 2..L-1): only the penalty of ``q_l`` changes and it stays inside layer l, so both kinds are
supported.

One iteration of the paper (Algorithm 2), every phase for all layers in parallel::

    p_l   <- quadratic approximation of L_rho in p_l, backtracking          (l >= 2)
    W_l   <- quadratic approximation of L_rho in W_l, backtracking
    b_l   <- argmin L_rho                                                    (exact)
    z_l   <- argmin L_rho + (nu/2)||z_l - z_l^k||^2  (l < L);  z_L <- argmin L_rho
    q_l   <- argmin L_rho   (uses p_{l+1} of this iteration)                 (l < L)
    u_l   <- u_l + rho (p_{l+1} - q_l)                                       (l < L)

**How it becomes one task per layer with only lag-1 inputs.** ``q_l`` needs ``p_{l+1}`` of the
same iteration and ``p_{l+1}`` needs ``q_l``, ``u_l`` of the previous one, so the cut between two
tasks is placed after the z phase: the task of layer l at iteration k first finishes iteration
k-1 (its ``q_l`` from its own state and layer l+1's ``p_{l+1}``, ``u_l`` of k-1, and, for the
constraint it owns, ``q_{l-1}`` again from layer l-1's state of k-1 (an elementwise closed form:
bitwise the value layer l-1 computes for itself) and ``u_{l-1}``), then runs the p, W, b, z
phases of iteration k. Every input is of iteration k-1 (itself and both neighbours), so in the
task graph the longest chain of K iterations is K tasks, and the iterates are exactly the
paper's. A state of "iteration k" is therefore the paper's state after the z phase of iteration
k: ``p, W, z`` of k with ``q_l``, ``u_{l-1}`` of k-1 (``pending`` = 1; at iteration 0 nothing
is pending). The penalties of the pending q/u phase are remembered in the state (``rho``,
``nu``), so a penalty schedule gives the same iterates as the two-phase loop.

Ownership: layer l holds ``p_l`` (l >= 2), ``W_l``, ``z_l``, ``q_l`` (l < L) and ``u_{l-1}``
(l >= 2), the multiplier of the constraint ``p_l = q_{l-1}`` between it and its left
neighbour. State keys: ``W``, ``z``, ``p``, ``u`` (l >= 2), ``q`` (l < L), the last accepted
curvatures ``theta_W``, ``theta_p`` and ``rho``, ``nu``, ``pending`` (0-d arrays).

Deviations from the paper and the authors' code, on purpose: capped backtracking (on the cap
the old value is kept), started from half the last accepted curvature (the code starts every
call from 10); the regulariser ``(lam/2)||W||^2`` kept exact in the W and b steps; the state
starts forward-consistent with ``u = 0`` (L_rho at iteration 0 is the forward loss plus the
regulariser) where the code starts ``z_L`` from the +-1 labels; the loss is the mean (penalties
n-scaled), which is the code's summed loss divided by n.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from ..model import Activation, Architecture, forward, loss_value
from . import LEFT, RIGHT, SELF, Input, Splitting, Step
from .base import BlockSpec, Options, Penalties, Stats, StepOut, prox_activation, prox_output
from .dladmm import (
    _plus_bias,
    penalty_nu,
    shifted_step,
    update_b,
    update_W,
    update_W_stats,
    w_stats,
)

__all__ = [
    "block_objective",
    "init_state",
    "layer_update",
    "update_W",
    "p_grad",
    "p_hessian",
    "update_b",
    "update_p",
    "update_q",
    "update_u",
    "update_z",
    "update_z_output",
]

Array = np.ndarray
# arrays, and 0-d float64 scalars (accepted curvatures, penalties) under their own keys

class State(TypedDict, total=False):
    """Layer l's variables (see the module's docstring): arrays ``W``, ``z``, ``p``, ``u``,
    ``q`` and 0-d float64 scalars ``theta_W``, ``theta_p`` (accepted curvatures) and ``rho``,
    ``nu``, ``pending`` (the penalties of a p step still to be applied)."""

    W: Array
    z: Array
    p: Array
    u: Array
    q: Array
    theta_W: Any
    theta_p: Any
    rho: Any
    nu: Any
    pending: Any


def update_p(p: Array, A: Array, b: Array | None, z: Array, R: Array | None, s: int,
             u: Array, q_left: Array, nu: float, rho: float, theta0: float | None,
             max_trials: int, step: str = "backtracking") -> tuple[Array, float, int, bool]:
    """p step (l >= 2): quadratic approximation + backtracking.

    Notes
    -----
    The n-units subproblem in ``p = p_l`` (``W_l = [A, b]``, ``z = z_l``, ``q_{l-1}``,
    ``u = u_{l-1}`` of the previous iteration)::

        f(p) = (nu/2)||z - A p - b 1^T||^2 + (nu/2)||R - s p||^2
             + <u, p - q_{l-1}> + (rho/2)||p - q_{l-1}||^2

    with ``R = q_l - sigma(z_l)`` and ``s = s_l`` (the residual skip; the term is absent when
    ``s = 0`` and for l = L)::

        grad f = -nu A^T (z - A p - b 1^T) - nu s (R - s p) + u + rho (p - q_{l-1})

    ``p+ = p^k - grad f / theta`` by :func:`~daskadmm.splitting.dladmm.shifted_step`
    (``theta`` from :func:`~daskadmm.splitting.dladmm.quad_theta`; ``f`` is quadratic). ``theta0``
    None starts from the mean eigenvalue ``nu ||A||_F^2 / cols(A) + nu s^2 + rho`` of the
    curvature ``nu A^T A + (nu s^2 + rho) I`` (``step="lipschitz"``: its largest eigenvalue).

    Returns ``(p+, theta, trials, capped)``.
    """
    grad = p_grad(p, A, b, z, R, s, u, q_left, nu, rho)
    return shifted_step(p, grad, A, *p_hessian(s, nu, rho), theta0, max_trials, step)


def p_grad(p: Array, A: Array, b: Array | None, z: Array, R: Array | None, s: int, u: Array,
           q_left: Array, nu: float, rho: float) -> Array:
    """``grad f(p)`` of the p subproblem (see :func:`update_p`); column-separable."""
    r1 = z - _plus_bias(A @ p, b)
    grad = rho * (p - q_left) + u - nu * (A.T @ r1)
    if s:
        grad -= nu * s * (R - s * p)
    return grad


def p_hessian(s: int, nu: float, rho: float) -> tuple[float, float]:
    """``(c, kappa)`` of the p step's Hessian ``c I + kappa A^T A``: ``(nu s^2 + rho, nu)``."""
    return nu * float(s) ** 2 + rho, nu


def update_z(c: Array, m: Array, z_prev: Array, nu: float, act: Activation, max_iter: int
             ) -> tuple[Array, int]:
    """Hidden z step (l < L), elementwise, with the paper's proximal term.

    Notes
    -----
    ``z_l = argmin_z (nu/2)(z - m)^2 + (nu/2)(c - sigma(z))^2 + (nu/2)(z - z^k)^2`` per element
    with ``m = W_l p~_l`` (new W, b, p), ``c = q_l - s_l p_l``. The two quadratics merge into
    ``nu (z - (m + z^k)/2)^2``, so this is :func:`base.prox_activation` with ``beta = nu``,
    ``kappa = 2 nu`` and centre ``(m + z^k)/2``. ReLU exact: candidates
    ``max(0, (c + m + z^k)/3)`` and ``min(0, (m + z^k)/2)``, the smaller objective wins (ties:
    the nonnegative one). Smooth activations: safeguarded Newton from ``z^k``, capped.

    Returns ``(z, n_capped)``.
    """
    return prox_activation(c, 0.5 * (m + z_prev), nu, 2.0 * nu, z_prev, act, max_iter)


def update_z_output(loss: str, Y: Array, m: Array, nu: float, z0: Array, max_iter: int
                    ) -> tuple[Array, int]:
    """Output z step: ``z_L = argmin_z n l(z; Y) + (nu/2)||z - m||^2``, ``m = W_L p~_L``.

    Notes
    -----
    :func:`base.prox_output` with ``kappa = nu``: MSE ``(Y + nu m)/(1 + nu)``, cross-entropy a
    per-column Newton from ``z0``. Returns ``(z, n_capped)``.
    """
    return prox_output(loss, Y, m, nu, z0, max_iter)


def update_q(z: Array, p: Array | None, p_next: Array, u: Array, rho: float, nu: float,
             act: Activation) -> Array:
    """q step (l < L), closed form.

    Notes
    -----
    ``q_l = argmin_q (nu/2)||q - s_l p_l - sigma(z_l)||^2 + <u_l, p_{l+1} - q>
    + (rho/2)||p_{l+1} - q||^2`` (n-units), i.e.::

        q_l = (nu (s_l p_l + sigma(z_l)) + rho p_{l+1} + u_l) / (nu + rho)

    ``p`` is ``p_l`` for a residual layer (``s_l = 1``) and None otherwise.
    """
    c = act.f(z) if p is None else p + act.f(z)
    return (nu * c + rho * p_next + u) / (nu + rho)


def update_u(u: Array, p: Array, q_left: Array, rho: float) -> Array:
    """Multiplier step ``u_{l-1} <- u_{l-1} + rho (p_l - q_{l-1})`` (n-scaled)."""
    return u + rho * (p - q_left)


# ---------------------------------------------------------------------------------------------
# Objective and the task function
# ---------------------------------------------------------------------------------------------

def _input(spec: BlockSpec, st: State, left: Any) -> Array:
    """``p_l`` (``X`` for layer 1)."""
    return left if spec.i == 1 else st["p"]


def _objective(spec: BlockSpec, pen: Penalties, st: State, left: Any, Y: Array | None,
               Z: Array | None = None) -> float:
    n, W, nu = spec.n, st["W"], penalty_nu(pen)
    p = _input(spec, st, left)
    if Z is None:
        Z = W @ spec.aug(p)
    r = st["z"] - Z
    total = 0.5 * pen.lam * float(np.sum(W * W)) + 0.5 * nu * float(np.sum(r * r)) / n
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        total += loss_value(spec.arch.loss, st["z"], Y)
    else:
        c = st["q"] - spec.act.f(st["z"])
        if spec.s:
            c = c - p
        total += 0.5 * nu * float(np.sum(c * c)) / n
    if spec.i > 1:
        d = p - left
        total += (float(np.sum(st["u"] * d)) + 0.5 * pen.rho * float(np.sum(d * d))) / n
    return total


def block_objective(spec: BlockSpec, pen: Penalties, state: State, left: Array,
                    Y: Array | None) -> float:
    """Layer l's share of L_rho (L units): ``(lam/2)||W_l||^2``, ``(nu/2n)||z_l - W_l p~_l||^2``,
    the output penalty ``(nu/2n)||q_l - s_l p_l - sigma(z_l)||^2`` (l < L) or the loss (l = L),
    and the terms of the constraint ``p_l = q_{l-1}`` it owns (l >= 2). ``left`` is
    ``q_{l-1}`` (``X`` for l = 1). Summed over the layers this is L_rho."""
    return _objective(spec, pen, state, left, Y)


def _left_q(spec: BlockSpec, left: State, p: Array, u: Array, rho: float, nu: float) -> Array:
    """``q_{l-1}`` of the pending iteration, computed exactly as layer l-1 computes it."""
    p_left = left["p"] if spec.arch.skip(spec.i - 1) else None
    return update_q(left["z"], p_left, p, u, rho, nu, spec.act)


def layer_update(spec: BlockSpec, pen: Penalties, own: State, left: State | Array,
                 right: State | None, Y: Array | None = None
                 ) -> StepOut:
    """One task of layer l at iteration k: the q/u phases of iteration k-1, then p, W, b, z.

    ``own``, ``left``, ``right``: the states of layers l, l-1, l+1 at iteration k-1 (``left``
    is ``X`` for l = 1, ``right`` None for l = L). Statistics: ``objective`` (layer share of
    L_rho at the new state), ``primal_sq`` (``||p_l - q_{l-1}||^2``, l >= 2),
    ``dual_sq`` (``||p^k - p^{k-1}||^2 + ||z^k - z^{k-1}||^2 + ||q^{k-1} - q^{k-2}||^2``) and
    ``capped``.
    """
    o, act = spec.options, spec.act
    nu, rho = penalty_nu(pen), pen.rho
    i, s = spec.i, spec.s
    p_old = _input(spec, own, left)
    pending = float(own["pending"]) > 0
    rho0, nu0 = float(own["rho"]), float(own["nu"])
    new: State = own.copy()
    capped = 0
    dual_sq = 0.0

    # q/u phases of iteration k-1
    if not spec.is_output:
        assert right is not None  # every block but the output one has a right neighbour
        q = own["q"]
        if pending:
            q = update_q(own["z"], p_old if s else None, right["p"], right["u"], rho0, nu0, act)
            dual_sq += float(np.sum((q - own["q"]) ** 2))
        new["q"] = q
    if i > 1:
        assert isinstance(left, dict)  # layer l-1's state (X only for layer 1)
        q_left, u = left["q"], own["u"]
        if pending:
            q_left = _left_q(spec, left, own["p"], own["u"], rho0, nu0)
            u = update_u(own["u"], own["p"], q_left, rho0)
        new["u"] = u

    # p, W, b, z phases of iteration k
    A, b = spec.split_bias(own["W"])
    if i > 1:
        R = new["q"] - act.f(own["z"]) if s else None
        p, th_p, _, cap_p = update_p(own["p"], A, b, own["z"], R, s, u, q_left, nu, rho,
                                     float(own["theta_p"]), o.backtrack_max, o.step)
        new["p"], new["theta_p"] = p, np.float64(th_p)
        capped += int(cap_p)
        dual_sq += float(np.sum((p - p_old) ** 2))
    else:
        p = p_old
    ws = w_stats(p, own["z"])
    A, th_w, _, cap_w = update_W_stats(A, b, ws, nu, spec.n * pen.lam, float(own["theta_W"]),
                                       o.backtrack_max, o.step)
    capped += int(cap_w)
    if b is not None:
        b = update_b(A, ws[2], ws[3], spec.n, nu, pen.lam)
    Z = _plus_bias(A @ p, b)
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        z, nc = update_z_output(spec.arch.loss, Y, Z, nu, own["z"], o.newton_max_iter)
    else:
        c = new["q"] - p if s else new["q"]
        z, nc = update_z(c, Z, own["z"], nu, act, o.newton_max_iter)
    capped += nc
    dual_sq += float(np.sum((z - own["z"]) ** 2))
    new["W"] = A if b is None else np.hstack([A, b])
    new["z"], new["theta_W"] = z, np.float64(th_w)
    new["rho"], new["nu"], new["pending"] = np.float64(rho), np.float64(nu), np.float64(1.0)

    primal_sq = 0.0
    if i > 1:
        d = p - q_left
        primal_sq = float(np.sum(d * d))
    stats: Stats = {"objective": _objective(spec, pen, new, q_left if i > 1 else left, Y, Z),
             "primal_sq": primal_sq, "dual_sq": dual_sq, "capped": float(capped)}
    return StepOut(new, stats)


def init_state(arch: Architecture, weights: list[Array], X: Array, Y: Array,
               options: Options | None = None) -> list[State]:
    """Forward pass: ``z_l = W_l p~_l``, ``q_l = s_l p_l + sigma(z_l)``, ``p_{l+1} = q_l``,
    ``u = 0``; nothing pending. Every penalty and constraint is then 0, so L_rho equals the
    forward loss plus the regulariser. Both ``kind`` s are supported."""
    U, V = forward(arch, weights, X)
    states: list[State] = []
    for i in range(1, arch.depth + 1):
        st: State = {"W": weights[i - 1].copy(), "z": U[i - 1], "theta_W": np.float64(0.0),
                     "rho": np.float64(0.0), "nu": np.float64(0.0),
                     "pending": np.float64(0.0)}
        if i > 1:
            st["p"] = V[i - 1].copy()
            st["u"] = np.zeros_like(V[i - 1])
            st["theta_p"] = np.float64(0.0)
        if i < arch.depth:
            st["q"] = V[i]
        states.append(st)
    return states


SPLITTING = Splitting(
    "pdadmm",
    init_state,
    # one task per layer and iteration; every input is of the previous iteration
    (Step("pdadmm_layer", layer_update,
          (Input(SELF, "pdadmm_layer", 1),
           Input(LEFT, "pdadmm_layer", 1, keys=("z", "q", "p")),
           Input(RIGHT, "pdadmm_layer", 1, keys=("p", "u")))),),
    block_objective,
    objective_left="q",
)
"""The serial iteration (the reference engine runs it)."""
