"""RADMM-3A: RADMM-3 with a multiplier on the activation constraints and a backward-pass start.

RADMM-3 (:mod:`~daskadmm.splitting.radmm3`) keeps the nonlinear constraints
``V_i = s_i V_{i-1} + sigma(U_i)`` as a pure quadratic penalty (weight beta, no multiplier). Its
fixed points therefore solve the *penalised* problem: the auxiliaries ``U``, ``V`` fit the targets
while the network's true forward pass does not (on digits, a resnet with N = 16 reaches 100 %
training accuracy on ``U_N`` and about 97 % on the forward pass). RADMM-3A is the augmented
Lagrangian of the network's own problem: every constraint carries a multiplier, so a fixed point
with zero residuals is a stationary point of the training loss itself. With n-scaled
multipliers ``Gam_i`` of the activation constraints (i < N)::

    L_A = L_RADMM-3 + sum_{i<N} <Gam_i, V_i - s_i V_{i-1} - sigma(U_i)>/n

Block i's sweep is RADMM-3's (W, U, Lam, V, same inputs: ``V_{i-1}`` of this iteration, block
i+1's state of the previous one), with three changes:

- the U prox uses ``c = V_i - s_i V_{i-1} + Gam_i / beta`` (completing the square);
- the V solve's right-hand side gains ``- Gam_i + s' Gam_{i+1}`` (``s' = s_{i+1}``, 0 for i = N-1);
- after V: ``Gam_i <- Gam_i + GAMMA_STEP * beta * (V_i - s_i V_{i-1} - sigma(U_i))``.

So the dependency graph, and with it the pipelined wavefront, is RADMM-3's: block i reads only
``Gam_{i+1}`` of the previous iteration from its right neighbour.

**Backward-pass start.** :func:`init_state` runs the forward pass (all constraints hold) and then
one backward pass of the true network to set the multipliers dual-consistently:
``Lam_N = -n grad l(U_N)``, and for i = N-1..1::

    Gam_i = A_{i+1}^T Lam_{i+1} + s' Gam_{i+1},    Lam_i = Gam_i * sigma'(U_i)

(``A_{i+1}`` is ``W_{i+1}`` without its bias column): ``-Lam_i/n`` and ``-Gam_i/n`` are the
gradients of the loss with respect to ``U_i`` and ``V_i``. Every block then sees the loss in its
first update: block i's W step solves ``W (rho G + (n lam + tau) I) = (rho W V~ + Lam_i) V~^T +
tau W`` with ``Lam_i V~^T = -n grad_W l``, a preconditioned gradient step of the true loss, at
every depth in iteration 1. L at the start still equals the forward loss plus the regulariser.
Without ``Gam`` (RADMM-3 with only ``Lam_i`` seeded) the same start changes almost nothing,
because the loss signal has no multiplier to travel through.

``GAMMA_STEP = 0.5``: the full step (1.0) oscillated more with relu (digits, N = 64, seed 0:
test accuracy 0.89 instead of 0.96, 54 instead of 10 rises of L in 60 iterations); 0.25 was
within seed noise of 0.5. Shrinking the step of a block whose activation residual grew (by
``min(1, ||p^k|| / ||p^{k+1}||)``) changed nothing (digits, N = 16, seeds 0-4: mean test
accuracy 0.940 either way at 60 iterations).

**Over-relaxation** (``Options.relax``, the config's ``algorithm.relax``: 1.8 by default for
RADMM-3A, 1 = none, the same bits as without it): as in ADMM's over-relaxed form, block i's U
and Lam steps use ``Z_a = alpha W_i V~ + (1 - alpha) U_i^k`` in place of ``Z = W_i V~``, and its
V and Gam steps use ``sigma_a = alpha sigma(U_i) + (1 - alpha) (V_i^k - s_i V_{i-1})`` in place
of ``sigma(U_i)``. Both are elementwise, so the Zarr engine's chunk tasks apply them per chunk
(:func:`relaxed_product`, :func:`relaxed_activation`); the objective and the residuals are
those of the unrelaxed point. Measured (relu, lam 0.03, rho 2, 100 iterations; the README's
"Deep networks" has the table): mnist_5k test accuracy 0.908 against 0.896 (seeds 0-4, better
on every seed), synthetic MSE 0.078 against 0.081; digits and wine within seed noise; it makes
each iteration count for more, not the end point better (mnist_5k at 300 iterations: 0.918
against 0.915); digits N = 64 loses 0.011 (0.951 against 0.962, seeds 0-4). 1.95, or 1.8
with rho 1, took digits N = 32 to 0.950.

**Activation.** With tanh RADMM-3A trains worse than RADMM-3 (digits, width 64, N = 16, seed 0,
60 iterations: 0.836 against 0.922): its training loss falls faster for ten iterations, then
jumps (0.68 at iteration 10, 1.09 at 15) and stays near 0.55 for 30 iterations. The shifted
target ``c`` of the nonconvex U prox is not the cause: ``Gam/beta`` is 0.1 RMS or less, so ``c``
stays inside tanh's range, under 0.05 % of the pre-activations of blocks 5, 9, 13 have
``|U|>2``, and linearising ``-<Gam, sigma(U)>`` at ``U^k`` (a shift of ``m`` instead of ``c``,
the same fixed points) gives the same accuracy within 0.006 along the run; beta = 2 or 4, a
multiplier step of 0.25 or 1.0, tau = 0.1 or lam = 1e-3 do not reach RADMM-3 either. Use relu
with RADMM-3A.

Its state travels between tasks like RADMM-3's, so it runs on the reference engine and on every
Dask scheduler with the state in worker memory. On the Zarr-resident engine
(:mod:`daskadmm.chunks.radmm3`) ``Gam_i`` is stored per chunk of samples like ``V_i``: every update
but W's acts on each sample on its own, and so does the backward pass (:func:`backward_step`),
so the chunk tasks call the functions below (:func:`prox_target`, :func:`update_activation`,
:func:`update_multiplier`, :func:`multiplier_objective`) on their chunk; W's step is RADMM-3's.
"""

from __future__ import annotations

import numpy as np

from ..model import Architecture
from . import fused, radmm3
from .base import BlockSpec, Options, Penalties, StepOut

__all__ = [
    "GAMMA_STEP",
    "activation_residual",
    "backward_step",
    "block_objective",
    "block_update",
    "init_state",
    "multiplier_objective",
    "prox_target",
    "relaxed_activation",
    "relaxed_product",
    "update_activation",
    "update_multiplier",
]

Array = np.ndarray
State = radmm3.State

GAMMA_STEP = 0.5


def relaxed_product(spec: BlockSpec, Z: Array, U: Array) -> Array:
    """``Z_a = alpha Z + (1 - alpha) U^k`` for the U and Lam steps (``Z = W_i V~`` with the new
    ``W_i``, ``alpha = spec.options.relax``); ``Z`` itself when alpha is 1."""
    alpha = float(spec.options.relax)  # a Python float keeps float32 arrays float32
    if alpha == 1.0:
        return Z
    k = fused.elementwise_for(Z, U)
    if k is not None:
        out = np.empty_like(Z)
        f = Z.dtype.type
        k.relaxed(Z.reshape(-1), U.reshape(-1), U.reshape(-1), False, f(alpha), f(1.0 - alpha),
                  out.reshape(-1))
        return out
    return alpha * Z + (1.0 - alpha) * U


def relaxed_activation(spec: BlockSpec, sigma_U: Array, V: Array, Vleft: Array) -> Array:
    """``alpha sigma(U_i) + (1 - alpha) (V_i^k - s_i V_{i-1})`` for the V and Gam steps (i < N;
    ``sigma_U`` at the new ``U_i``, ``alpha = spec.options.relax``); ``sigma_U`` itself when
    alpha is 1."""
    alpha = float(spec.options.relax)
    if alpha == 1.0:
        return sigma_U
    z = Vleft if spec.s else V  # (X, for block 1, has another shape: not read then)
    k = fused.elementwise_for(sigma_U, V, z)
    if k is not None:
        out = np.empty_like(sigma_U)
        f = out.dtype.type
        k.relaxed(sigma_U.reshape(-1), V.reshape(-1), z.reshape(-1), bool(spec.s), f(alpha),
                  f(1.0 - alpha), out.reshape(-1))
        return out
    return alpha * sigma_U + (1.0 - alpha) * (V - Vleft if spec.s else V)


def activation_residual(spec: BlockSpec, V: Array, Vleft: Array, U: Array | None,
                        sigma_U: Array | None = None) -> Array:
    """``V_i - s_i V_{i-1} - sigma(U_i)`` (a new array); ``sigma_U``: ``sigma(U_i)`` if already
    computed (bit for bit ``act.f(U_i)``, so the same numbers; ``U`` is not needed then)."""
    if sigma_U is None:
        assert U is not None  # sigma(U_i) comes from one of them
        work = spec.act.f(U)  # a new array: the result goes into it
    else:
        work = np.array(sigma_U, dtype=np.result_type(V, sigma_U), order="C")
    return radmm3.activation_residual_into(V, work, Vleft, bool(spec.s))


def backward_step(arch: Architecture, i: int, W_next: Array, Lam_next: Array,
                  Gam_next: Array | None, U: Array) -> tuple[Array, Array]:
    """One step of the backward pass (i < N): ``(Gam_i, Lam_i)`` from block i+1's ``W``,
    ``Lam`` and ``Gam`` (None for i+1 = N) and ``U_i``::

        Gam_i = A_{i+1}^T Lam_{i+1} + s' Gam_{i+1},    Lam_i = Gam_i * sigma'(U_i)

    Each sample (column) on its own: a chunk of samples gives that chunk of the result."""
    A = W_next[:, :-1] if arch.bias else W_next
    gam = A.T @ Lam_next
    if arch.skip(i + 1) and i + 1 < arch.depth:
        gam += Gam_next
    return gam, gam * arch.act.df(U)


def init_state(arch: Architecture, weights: list[Array], X: Array, Y: Array,
               options: Options | None = None) -> list[State]:
    """Forward pass for U, V; one backward pass of the true network for ``Lam`` and ``Gam``."""
    states = radmm3.init_state(arch, weights, X, Y)
    for i in range(arch.depth - 1, 0, -1):  # block i is states[i - 1]
        right = states[i]
        states[i - 1]["Gam"], states[i - 1]["Lam"] = backward_step(
            arch, i, right["W"], right["Lam"], right.get("Gam"), states[i - 1]["U"])
    return states


def multiplier_objective(spec: BlockSpec, Gam: Array, p: Array) -> float:
    """``<Gam_i, p>/n`` with ``p`` = :func:`activation_residual` (i < N)."""
    return float(np.sum(Gam * p)) / spec.n


def block_objective(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                    Y: Array | None) -> float:
    """Block i's share of ``L_A``: RADMM-3's share plus ``<Gam_i, V_i - s_i V_{i-1} -
    sigma(U_i)>/n`` (i < N)."""
    total = radmm3.block_objective(spec, pen, own, Vleft, Y)
    if not spec.is_output:
        p = activation_residual(spec, own["V"], Vleft, own["U"])
        total += multiplier_objective(spec, own["Gam"], p)
    return total


def prox_target(spec: BlockSpec, pen: Penalties, V: Array, Vleft: Array, Gam: Array) -> Array:
    """``c`` of the U prox (i < N): ``V_i - s_i V_{i-1} + Gam_i / beta`` (completing the
    square of the multiplier term)."""
    beta = float(pen.beta)
    z = Vleft if spec.s else V  # (X, for block 1, has another shape: not read then)
    k = fused.elementwise_for(V, z, Gam)
    if k is not None:
        out = np.empty_like(V)
        k.shifted_quotient(V.reshape(-1), z.reshape(-1), Gam.reshape(-1), bool(spec.s),
                           out.dtype.type(beta), out.reshape(-1))
        return out
    return (V - Vleft if spec.s else V) + Gam / beta


def update_activation(spec: BlockSpec, pen: Penalties, V: Array, Vleft: Array, U: Array,
                      Gam: Array, right: State, sigma_own: Array | None = None,
                      pool: radmm3.Scratch | None = None) -> Array:
    """Exact V step (i < N): RADMM-3's (:func:`daskadmm.splitting.radmm3.update_activation`)
    with ``- Gam_i + s' Gam_{i+1}`` on the right-hand side. ``right``: block i+1's ``W``, ``U``,
    ``Lam`` and, when ``s' = 1``, ``V`` and ``Gam`` (previous iteration); ``sigma_own``:
    ``sigma(U_i)`` if already computed; ``pool``: where the work arrays come from."""
    A, rhs, work = radmm3._activation_rhs(spec, pen, Vleft, U, right, sigma_own, pool)
    rhs -= Gam
    if spec.s_next:
        rhs += right["Gam"]
    return radmm3.solve_activation(spec, pen, A, rhs, work, V, pool)


def update_multiplier_at(spec: BlockSpec, pen: Penalties, Gam: Array, V: Array, Vleft: Array,
                         sigma_U: Array) -> Array:
    """:func:`update_multiplier` at ``p`` = :func:`activation_residual` ``(V, Vleft, sigma_U)``
    (the over-relaxed residual: ``sigma_U`` from :func:`relaxed_activation`), in one compiled
    loop with Numba (the same bits), without the residual as an array."""
    z = Vleft if spec.s else V  # (X, for block 1, has another shape: not read then)
    k = fused.elementwise_for(Gam, V, sigma_U, z)
    if k is None:
        return update_multiplier(pen, Gam, activation_residual(spec, V, Vleft, None, sigma_U))
    out = np.empty_like(Gam)
    k.multiplier_step(Gam.reshape(-1), V.reshape(-1), sigma_U.reshape(-1), z.reshape(-1),
                      bool(spec.s), out.dtype.type(GAMMA_STEP * float(pen.beta)),
                      out.reshape(-1))
    return out


def update_multiplier(pen: Penalties, Gam: Array, p: Array) -> Array:
    """``Gam_i + GAMMA_STEP * beta * p`` with ``p`` = :func:`activation_residual` at the new
    ``V_i``, ``U_i`` and ``V_{i-1}``."""
    c = GAMMA_STEP * float(pen.beta)
    k = fused.elementwise_for(Gam, p)
    if k is not None:
        out = np.empty_like(Gam)
        k.plus_scaled(Gam.reshape(-1), p.reshape(-1), out.dtype.type(c), out.reshape(-1))
        return out
    return Gam + c * p


def block_update(spec: BlockSpec, pen: Penalties, own: State, Vleft: Array,
                 right: State | None, Y: Array | None) -> StepOut:
    """One iteration of block i: W, U, Lam, V, then Gam (i < N):
    :func:`daskadmm.splitting.radmm3.block_update` with ``variant="radmm3a"``, whose
    :func:`~daskadmm.splitting.radmm3.column_update` calls the functions above."""
    return radmm3.block_update(spec, pen, own, Vleft, right, Y, variant="radmm3a")
