"""dlADMM (Wang, Yu, Chen, Zhao, KDD 2019): relaxed MLP training, backward-then-forward sweeps.

Variables of layer l: weights ``W_l = [A_l, b_l]`` (bias as the last column, so
:func:`daskadmm.model.forward` evaluates the network), pre-activation ``z_l`` and output ``a_l``
(l < L); layer L holds the network output ``z_L`` and the n-scaled multiplier ``u`` of the one
hard constraint ``z_L = W_L a~_{L-1}`` (``a~ = [a; 1^T]``, ``a_0 = X``). The hidden constraints
are relaxed into penalties of weight ``nu`` (``pen.nu``; None: ``nu = rho``, as the authors'
code). In this package's scaling convention (``base``)::

    L_rho = l(z_L; Y) + (lam/2) sum_l ||W_l||^2
          + (nu/2n) sum_{l<L} ( ||z_l - W_l a~_{l-1}||^2 + ||a_l - s_l a_{l-1} - sigma(z_l)||^2 )
          + <u, z_L - W_L a~_{L-1}>/n + (rho/2n) ||z_L - W_L a~_{L-1}||^2

For an MLP every ``s_l = 0`` (the paper's problem). A residual network (``s_l = 1`` for l =
2..L-1, ``a_l = a_{l-1} + sigma(z_l)``) only changes the activation penalty; every subproblem
keeps its form, so both kinds are supported.

One iteration k is two sweeps (Algorithm 1 of the paper):

- **backward** (l = L..1): layer L updates ``z_L``, ``b_L``, ``W_L``; layer l < L updates
  ``a_l`` (with layer l+1's new backward values), ``z_l``, ``b_l``, ``W_l`` (with ``a_{l-1}``
  of iteration k-1);
- **forward** (l = 1..L): layer l < L updates ``W_l``, ``b_l`` (with ``a_{l-1}`` of iteration
  k), ``z_l``, ``a_l`` (with layer l+1's backward values); layer L updates ``W_L``, ``b_L``,
  ``z_L`` and then the multiplier ``u <- u + rho (z_L - W_L a~_{L-1})``.

Task inputs (the two :class:`~daskadmm.splitting.Step` s): backward of layer l at iteration k
reads its own state of k-1, ``a_{l-1}`` of k-1 (left neighbour's forward output) and layer
l+1's backward output of k; forward of layer l reads its own backward output of k (and its
state of k-1, only for the dual residual), ``a_{l-1}`` of k (left neighbour's forward output)
and layer l+1's backward output of k. One iteration is thus a chain of 2L tasks and the next
backward sweep waits for the last forward task: K iterations are one chain of 2LK tasks.
State keys: ``W``, ``z``, ``a`` (l < L), ``u`` (l = L), and the last accepted curvatures
``theta_W``, ``theta_a`` (0-d arrays).

``W`` and ``a`` take one quadratic-approximation step each, with the curvature ``theta`` found by
capped backtracking (:func:`quad_theta`: each subproblem is a quadratic, so the paper's
sufficient-decrease test is evaluated exactly from two sums over the samples, which also lets
the Zarr engine split it into chunks); ``b`` is exact (its objective is a quadratic with a
known curvature, so its quadratic approximation *is* the objective); ``z_l`` is an elementwise
prox (closed form for ReLU and leaky ReLU, safeguarded Newton for smooth activations);
``z_L`` is the prox of the loss.

Against the authors' published runs (github.com/xianggebenben/dlADMM, ``MLP/pytorch_version``;
the TensorFlow version is the same), each update agrees with their update function to ~2e-15 on
the same inputs, and the sweep order is theirs (their ``W_1`` is also updated twice in a row,
backward then forward). The runs differ in settings; ``algorithm=dladmm_published`` (a variant
of this splitting, :data:`daskadmm.config.ALGORITHM_VARIANTS`) removes the first five:

1. **penalty schedule** -- theirs: ``rho = 1e-6``, multiplied by 10 (``min(10 rho, 0.1)``)
   after each iteration whose training cost (the forward network's mean cross-entropy) rose
   for the third time in a row (at iteration i > 2, ``cost[i] > cost[i-1] > cost[i-2] >
   cost[i-3]``; a fourth rise fires again); ``nu = rho``. Default here: constant ``rho = 0.1``
   (``nu = rho``). Variant: ``schedule=rises`` (:mod:`daskadmm.schedules`), ``rho=1e-6``,
   ``rho_max=0.1``, ``adapt_factor=10``, ``rise_count=3``; the loss is seen at every
   evaluation, i.e. every iteration with ``run.eval_every=1`` (the default).
2. **backtracking start** -- theirs: every W and a search starts at ``theta = tau = 1``,
   doubles, and forgets the accepted value; both starts are multiplied by 10 with rho (when
   the hidden width is >= 100, as in their runs; uncapped, also once rho is at 0.1). Default
   here: half the last accepted ``theta`` of the same variable (first: the mean eigenvalue of
   the curvature). Variant: ``backtrack_start=1``, multiplied by ``adapt_factor`` whenever the
   schedule fires (whatever the width). ``theta`` is in the same units as theirs (n-units, see
   below).
3. **initial weights** -- theirs: every weight and bias ``N(0, 0.1^2)`` (torch's generator,
   reseeded with 13 before each tensor, so the tensors' draws are not independent). Default
   here: the package's He/Glorot-scaled weights with zero biases
   (:func:`daskadmm.model.init_weights`), the same for every method. Variant:
   ``model.init=normal`` (``init_std=0.1``; independent draws from ``run.seed``).
4. **output-layer start** -- theirs: ``z_L = +-1`` (+1 for the true class) and ``u = 0``.
   Default here: the forward output with the dual-consistent ``u = -n grad l(z_L)``, so L_rho
   at iteration 0 equals the forward loss plus the regulariser. Variant: ``output_init=labels``
   (:func:`init_state`).
5. **regulariser** -- theirs: none. Default here: ``(lam/2)||W||^2`` (the paper's
   ``Omega_l``), exact inside the W and b steps (``lam = 1e-2``, the dlADMM experiments 1e-3).
   Variant: ``lam=0``.

What the variant does not remove:

6. **output-layer solve** -- theirs is inexact: FISTA from the previous ``z_L`` with step 4, at
   most 500 iterations, stopped when the summed objective changes by less than 1e-3. Here the
   ``z_L`` subproblem is solved to convergence
   (:func:`~daskadmm.splitting.base.prox_output`: closed form for MSE, safeguarded Newton per
   column for cross-entropy). Their stopping test sums over all samples, so on the
   Zarr-resident engine it would take a reduction per FISTA iteration, and a per-chunk test
   would make the iterates depend on the chunking.
7. **capped backtracking** -- theirs loops until the sufficient-decrease test passes (it need
   not end); here every search is capped (``backtrack_max``; on the cap the old value is kept,
   so no step raises L_rho). Their test compares function values; here its exact equivalent
   for a quadratic (:func:`quad_theta`) decides, the same up to rounding.
8. **precision and numerics** -- theirs: float32; here float64. Their softmax clips ``exp`` at
   ``exp(88.6)`` and adds 1e-10 to its denominator, and a probability of exactly 0 becomes
   1e-10 in the log; here a log-sum-exp. At a tie of the two ReLU z candidates theirs keeps the
   nonpositive one, here the nonnegative one (a measure-zero event).
9. **data and network** -- theirs: the first 55,000 MNIST training images and the 10,000 test
   images, pixels in [0, 1], 784-1000-1000-10 ReLU, 200 iterations, full batch. Here the
   configured data (features standardised) and network; ``experiment=dladmm_mnist_published``
   runs the variant on 784-256-256-10 on mnist_5k (4,000 / 1,000 images), 200 iterations.

Scaling: the loss is the package's mean loss with n-scaled penalties; the authors' summed
cross-entropy with unscaled penalties is the same problem times n, so their rho is this rho, and
their ``theta``, ``tau`` are the n-unit curvatures of :func:`quad_theta`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np

from ..model import Activation, Architecture, forward, loss_grad_n, loss_value
from . import LEFT, RIGHT, SELF, Input, Splitting, Step
from .base import (
    BlockSpec,
    Options,
    Penalties,
    Stats,
    StepOut,
    lambda_max,
    prox_activation,
    prox_output,
)

__all__ = [
    "a_grad",
    "a_hessian",
    "backward_update",
    "block_objective",
    "forward_update",
    "init_state",
    "penalty_nu",
    "quad_theta",
    "shifted_curv",
    "shifted_step",
    "shifted_theta0",
    "update_W",
    "update_W_stats",
    "update_a",
    "update_b",
    "update_u",
    "update_z",
    "update_z_output",
    "w_stats",
]

Array = np.ndarray
# arrays, and 0-d float64 scalars (accepted curvatures, penalties) under their own keys

class State(TypedDict, total=False):
    """Layer l's variables: arrays ``W``, ``z``, ``a`` (l < L), ``u`` (l = L) and the last
    accepted curvatures ``theta_W``, ``theta_a`` (0-d float64)."""

    W: Array
    z: Array
    a: Array
    u: Array
    theta_W: Any
    theta_a: Any

def penalty_nu(pen: Penalties) -> float:
    """The relaxation weight ``nu`` (``rho`` when unset, as in the authors' code)."""
    return pen.rho if pen.nu is None else pen.nu


def quad_theta(curv: float, sq: float, theta0: float, max_trials: int
               ) -> tuple[float, int, bool]:
    """Capped backtracking for a quadratic subproblem, with the test evaluated exactly.

    Notes
    -----
    Every W, a and p subproblem here is ``phi(x) + (shrink/2)||x||^2`` with ``phi`` quadratic
    (Hessian ``H``). The quadratic-approximation step for curvature ``theta`` is::

        x+ = argmin_x  phi(x^k) + <g, x - x^k> + (theta/2)||x - x^k||^2 + (shrink/2)||x||^2
           = (theta x^k - g) / (theta + shrink),     d = x+ - x^k = -h / (theta + shrink)

    with ``g = grad phi(x^k)`` and ``h = g + shrink x^k``. The paper's sufficient-decrease test
    ``phi(x+) <= phi(x^k) + <g, d> + (theta/2)||d||^2`` is, because ``phi`` is quadratic,
    ``d^T H d <= theta ||d||^2``, i.e.::

        curv = h^T H h  <=  theta ||h||^2 = theta sq

    This form needs two sums over the samples (so chunks add their shares) and suffers no
    cancellation, where evaluating ``phi(x+) - phi(x^k)`` loses all digits once the decrease
    is at the rounding level. ``theta = theta0, 2 theta0, 4 theta0, ...`` for at most
    ``max_trials`` trials; the first that passes is accepted. When none passes (or the sums are
    not finite) the caller keeps ``x^k``: then no step raises the subproblem objective.

    Returns ``(theta, trials, capped)``; when capped ``theta`` is the last tried.
    """
    theta = theta0
    for trial in range(1, max_trials + 1):
        if curv <= theta * sq:
            return theta, trial, False
        if trial < max_trials:
            theta *= 2.0
    return theta, max_trials, True


def _theta0(step: str, last: float, estimate: float, exact: Callable[[], float],
            start: float | None = None) -> float:
    """First trial curvature: the exact one (``step="lipschitz"``), else ``start`` when given
    (the authors' fixed start, ``algorithm.backtrack_start``), else half the last accepted
    value of this variable, else ``estimate`` (a cheap lower bound: the mean eigenvalue)."""
    if step == "lipschitz":
        return exact()
    if start is not None:
        return start
    if last > 0:
        return 0.5 * last
    return estimate


def _gram_max(M: Array) -> float:
    """``lambda_max(M^T M)`` from the smaller Gram matrix."""
    return lambda_max(M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M)


def _plus_bias(AV: Array, b: Array | None) -> Array:
    return AV if b is None else AV + b


def w_stats(V: Array, T: Array) -> tuple[Array, Array, Array, Array]:
    """What the W and b steps need of the samples: ``(V V^T, T V^T, V 1, T 1)``. Sums over the
    samples, so chunks add their shares."""
    return V @ V.T, T @ V.T, V.sum(axis=1, keepdims=True), T.sum(axis=1, keepdims=True)


def update_W_stats(A: Array, b: Array | None, stats: tuple, kappa: float, nlam: float,
                   theta0: float | None, max_trials: int, step: str = "backtracking",
                   start: float | None = None) -> tuple[Array, float, int, bool]:
    """The W step of :func:`update_W` from :func:`w_stats` (``T 1`` unused here).

    ``grad phi = -kappa (T V^T - A V V^T - b (V 1)^T)``; the Hessian of ``phi`` maps ``D`` to
    ``kappa D V V^T``, so :func:`quad_theta` gets ``curv = kappa <h V V^T, h>`` with
    ``h = grad + n lam A``. Returns ``(A+, theta, trials, capped)``."""
    G, P, sV = stats[0], stats[1], stats[2]
    M = P - A @ G
    if b is not None:
        M -= b @ sV.T
    grad = -kappa * M
    h = grad + nlam * A
    curv = kappa * float(np.sum((h @ G) * h))
    sq = float(np.sum(h * h))
    t0 = _theta0(step, 0.0 if theta0 is None else theta0,
                 kappa * float(np.trace(G)) / G.shape[0], lambda: kappa * lambda_max(G), start)
    theta, trials, capped = quad_theta(curv, sq, t0, max_trials)
    if capped:
        return A, theta, trials, True
    return (theta * A - grad) / (theta + nlam), theta, trials, False


def update_W(A: Array, b: Array | None, V: Array, T: Array, kappa: float, nlam: float,
             theta0: float | None, max_trials: int, step: str = "backtracking",
             start: float | None = None) -> tuple[Array, float, int, bool, Array]:
    """W step (weight matrix ``A``, bias column fixed): quadratic approximation + backtracking.

    Notes
    -----
    In n-units the W subproblem is ``min_A phi(A) + (n lam/2)||A||^2`` with::

        phi(A) = (kappa/2) ||T - A V - b 1^T||^2,   grad phi = -kappa (T - A V - b 1^T) V^T

    where, for a hidden layer, ``kappa = nu``, ``T = z_l``, ``V = a_{l-1}``; for the output
    layer ``kappa = rho``, ``T = z_L + u/rho``, ``V = a_{L-1}`` (``<u, r> + (rho/2)||r||^2 =
    (rho/2)||r + u/rho||^2 - ||u||^2/(2 rho)``). One step with ``shrink = n lam`` and the
    curvature from :func:`quad_theta`: ``A+ = (theta A^k - grad phi) / (theta + n lam)``.
    ``theta0`` None starts from the mean eigenvalue ``kappa ||V||_F^2 / rows(V)`` of the
    curvature ``kappa V V^T`` (``step="lipschitz"``: from its largest eigenvalue; ``start``
    given: from ``start``, whatever ``theta0``). Computed from :func:`w_stats` by
    :func:`update_W_stats` (the chunked engine sums those over chunks).

    Returns ``(A+, theta, trials, capped, A+ V)``.
    """
    An, theta, trials, capped = update_W_stats(A, b, w_stats(V, T), kappa, nlam, theta0,
                                               max_trials, step, start)
    return An, theta, trials, capped, An @ V


def update_b(A: Array, sV: Array, sT: Array, n: int, kappa: float, lam: float) -> Array:
    """Exact b step.

    Notes
    -----
    ``b = argmin_b (kappa/2)||T - A V - b 1^T||^2 + (n lam/2)||b||^2`` (n-units; ``kappa``, ``T``
    as in :func:`update_W`; ``sV = V 1``, ``sT = T 1`` from :func:`w_stats`)::

        b = kappa (T - A V) 1 / (n (kappa + lam)) = kappa (sT - A sV) / (n (kappa + lam))

    The objective is a quadratic in b with curvature ``n (kappa + lam)``, so the paper's
    quadratic approximation with that curvature is exact and needs no backtracking.
    """
    return (kappa / (n * (kappa + lam))) * (sT - A @ sV)


def a_grad(a: Array, c0: Array, A: Array, b: Array | None, T: Array, kappa: float,
           R: Array | None, s_next: int, nu: float) -> Array:
    """``grad f(a)`` of the a subproblem (see :func:`update_a`); column-separable."""
    r1 = T - _plus_bias(A @ a, b)
    grad = nu * (a - c0) - kappa * (A.T @ r1)
    if s_next:
        grad -= nu * s_next * (R - s_next * a)
    return grad


def a_hessian(kappa: float, s_next: int, nu: float) -> tuple[float, float]:
    """``(c, kappa)`` of the a step's Hessian ``c I + kappa A^T A``, ``c = nu (1 + s'^2)``."""
    return nu * (1.0 + float(s_next) ** 2), kappa


def shifted_curv(grad: Array, A: Array, c: float, kappa: float) -> tuple[float, float]:
    """``(g^T H g, ||g||^2)`` for :func:`quad_theta` with ``H = c I + kappa A^T A`` (the a and
    p steps' Hessian): sums over the samples, so chunks add their shares."""
    sq = float(np.sum(grad * grad))
    Ag = A @ grad
    return c * sq + kappa * float(np.sum(Ag * Ag)), sq


def shifted_theta0(A: Array, c: float, kappa: float, last: float | None, step: str,
                   start: float | None = None) -> float:
    """First trial curvature for ``H = c I + kappa A^T A`` (see :func:`_theta0`): its mean
    eigenvalue ``c + kappa ||A||_F^2 / cols(A)``, or its largest."""
    return _theta0(step, 0.0 if last is None else last,
                   c + kappa * float(np.sum(A * A)) / A.shape[1],
                   lambda: c + kappa * _gram_max(A), start)


def shifted_step(x: Array, grad: Array, A: Array, c: float, kappa: float,
                 theta0: float | None, max_trials: int, step: str, start: float | None = None
                 ) -> tuple[Array, float, int, bool]:
    """One gradient step ``x - grad / theta`` on a quadratic with Hessian ``c I + kappa A^T A``,
    ``theta`` from :func:`quad_theta` (on the cap ``x`` is kept). Returns
    ``(x+, theta, trials, capped)``."""
    curv, sq = shifted_curv(grad, A, c, kappa)
    theta, trials, capped = quad_theta(
        curv, sq, shifted_theta0(A, c, kappa, theta0, step, start), max_trials)
    if capped:
        return x, theta, trials, True
    return x - grad / theta, theta, trials, False


def update_a(a: Array, c0: Array, A: Array, b: Array | None, T: Array, kappa: float,
             R: Array | None, s_next: int, nu: float, theta0: float | None, max_trials: int,
             step: str = "backtracking", start: float | None = None
             ) -> tuple[Array, float, int, bool]:
    """a step (l < L): quadratic approximation + backtracking.

    Notes
    -----
    With layer l+1's values ``W_{l+1} = [A, b]``, the n-units subproblem in ``a = a_l`` is::

        f(a) = (nu/2)||a - c0||^2 + (kappa/2)||T - A a - b 1^T||^2 + (nu/2)||R - s' a||^2

    with ``c0 = s_l a_{l-1} + sigma(z_l)``; ``kappa = nu``, ``T = z_{l+1}`` for a hidden layer
    l+1, ``kappa = rho``, ``T = z_L + u/rho`` for l+1 = L; the last term is the residual block
    l+1's skip (``s' = s_{l+1}``, ``R = a_{l+1} - sigma(z_{l+1})``; absent when ``s' = 0``)::

        grad f = nu (a - c0) - kappa A^T (T - A a - b 1^T) - nu s' (R - s' a)

    ``a+ = a^k - grad f / theta`` with ``theta`` from :func:`quad_theta` (Hessian
    ``nu (1 + s'^2) I + kappa A^T A``). ``theta0`` None starts from its mean eigenvalue
    ``nu (1 + s'^2) + kappa ||A||_F^2 / cols(A)`` (``step="lipschitz"``: from its largest;
    ``start`` given: from ``start``).

    Returns ``(a+, theta, trials, capped)``.
    """
    grad = a_grad(a, c0, A, b, T, kappa, R, s_next, nu)
    return shifted_step(a, grad, A, *a_hessian(kappa, s_next, nu), theta0, max_trials, step,
                        start)


def update_z(c: Array, m: Array, nu: float, z0: Array, act: Activation, max_iter: int
             ) -> tuple[Array, int]:
    """Hidden z step, elementwise.

    Notes
    -----
    ``z_l = argmin_z (nu/2)(z - m)^2 + (nu/2)(c - sigma(z))^2`` per element, with
    ``m = W_l a~_{l-1}`` and ``c = a_l - s_l a_{l-1}``: :func:`base.prox_activation` with
    ``beta = kappa = nu``. ReLU (leaky ReLU) is exact: the candidates
    ``max(0, (c + m)/2)`` and ``min(0, m)`` (``min(0, (alpha c + m)/(alpha^2 + 1))``) are
    compared, ties go to the nonnegative one. Smooth activations: safeguarded Newton from ``z0``
    (a stationary point no worse than ``z0``), capped at ``max_iter``.

    Returns ``(z, n_capped)``.
    """
    return prox_activation(c, m, nu, nu, z0, act, max_iter)


def update_z_output(loss: str, Y: Array, Z: Array, u: Array, rho: float, z0: Array,
                    max_iter: int) -> tuple[Array, int]:
    """Output z step: prox of the loss.

    Notes
    -----
    ``z_L = argmin_z n l(z; Y) + <u, z - Z> + (rho/2)||z - Z||^2`` with ``Z = W_L a~_{L-1}``,
    i.e. :func:`base.prox_output` with ``m = Z - u/rho``, ``kappa = rho``. MSE:
    ``z_L = (Y + rho Z - u) / (1 + rho)``; cross-entropy: per-column Newton from ``z0``.

    Returns ``(z, n_capped)``.
    """
    return prox_output(loss, Y, Z - u / rho, rho, z0, max_iter)


def update_u(u: Array, z: Array, Z: Array, rho: float) -> Array:
    """Multiplier step ``u <- u + rho (z_L - W_L a~_{L-1})`` (n-scaled: dual ascent step rho n)."""
    return u + rho * (z - Z)


# ---------------------------------------------------------------------------------------------
# Objective and the two task functions
# ---------------------------------------------------------------------------------------------

def _objective(spec: BlockSpec, pen: Penalties, st: State, left: Array, Y: Array | None,
               Z: Array | None = None) -> float:
    n, W = spec.n, st["W"]
    if Z is None:
        Z = W @ spec.aug(left)
    total = 0.5 * pen.lam * float(np.sum(W * W))
    if spec.is_output:
        r = st["z"] - Z
        assert Y is not None  # the output block is given the targets
        total += loss_value(spec.arch.loss, st["z"], Y)
        total += (float(np.sum(st["u"] * r)) + 0.5 * pen.rho * float(np.sum(r * r))) / n
    else:
        r = st["z"] - Z
        p = st["a"] - spec.act.f(st["z"])
        if spec.s:
            p = p - left
        total += 0.5 * penalty_nu(pen) * (float(np.sum(r * r)) + float(np.sum(p * p))) / n
    return total


def block_objective(spec: BlockSpec, pen: Penalties, state: State, left: Array,
                    Y: Array | None) -> float:
    """Layer l's share of L_rho (L units): ``(lam/2)||W_l||^2`` plus, for l < L, the relaxed
    penalties ``(nu/2n)(||z_l - W_l a~_{l-1}||^2 + ||a_l - s_l a_{l-1} - sigma(z_l)||^2)``, or
    for l = L the loss and the output constraint terms. ``left`` is ``a_{l-1}`` (``X`` for
    l = 1). Summed over the layers this is L_rho."""
    return _objective(spec, pen, state, left, Y)


def _right_terms(spec: BlockSpec, pen: Penalties, right: State
                 ) -> tuple[Array, Array | None, Array, float, Array | None]:
    """What layer l's a step needs of layer l+1: ``A, b, T, kappa, R`` (see :func:`update_a`)."""
    A, b = spec.split_bias(right["W"])
    if spec.i + 1 == spec.N:
        return A, b, right["z"] + right["u"] / pen.rho, pen.rho, None
    R = right["a"] - spec.act.f(right["z"]) if spec.s_next else None
    return A, b, right["z"], penalty_nu(pen), R


def _a_step(spec: BlockSpec, pen: Penalties, a: Array, z: Array, left: Array, right: State,
            theta: float) -> tuple[Array, float, bool]:
    c0 = spec.act.f(z)
    if spec.s:
        c0 = c0 + left
    A, b, T, kappa, R = _right_terms(spec, pen, right)
    o = spec.options
    an, th, _, capped = update_a(a, c0, A, b, T, kappa, R, spec.s_next, penalty_nu(pen),
                                 theta, o.backtrack_max, o.step, pen.backtrack_start)
    return an, th, capped


def _c(spec: BlockSpec, a: Array, left: Array) -> Array:
    return a - left if spec.s else a


def backward_update(spec: BlockSpec, pen: Penalties, own: State, left: Array,
                    right: State | None, Y: Array | None = None
                    ) -> StepOut:
    """Backward sweep of layer l at iteration k.

    ``own``: layer l's state of iteration k-1 (its forward output); ``left``: ``a_{l-1}`` of
    iteration k-1 (``X`` for l = 1); ``right``: layer l+1's backward output of iteration k
    (None for l = L). Layer L: ``z_L``, ``b_L``, ``W_L``; layer l < L: ``a_l``, ``z_l``,
    ``b_l``, ``W_l``. Only ``capped`` of this step counts in the statistics.
    """
    o, nu = spec.options, penalty_nu(pen)
    A, b = spec.split_bias(own["W"])
    capped = 0
    new: State = own.copy()
    if spec.is_output:
        rho, u = pen.rho, own["u"]
        AV = A @ left
        assert Y is not None  # the output block is given the targets
        z, nc = update_z_output(spec.arch.loss, Y, _plus_bias(AV, b), u, rho, own["z"],
                                o.newton_max_iter)
        T, kappa = z + u / rho, rho
    else:
        assert right is not None  # every block but the output one has a right neighbour
        a, th_a, cap_a = _a_step(spec, pen, own["a"], own["z"], left, right,
                                 float(own["theta_a"]))
        AV = A @ left
        z, nc = update_z(_c(spec, a, left), _plus_bias(AV, b), nu, own["z"], spec.act,
                         o.newton_max_iter)
        T, kappa = z, nu
        new["a"], new["theta_a"] = a, np.float64(th_a)
        capped += int(cap_a)
    ws = w_stats(left, T)
    if b is not None:
        b = update_b(A, ws[2], ws[3], spec.n, kappa, pen.lam)
    A, th_w, _, cap_w = update_W_stats(A, b, ws, kappa, spec.n * pen.lam,
                                       float(own["theta_W"]), o.backtrack_max, o.step,
                                       pen.backtrack_start)
    new["W"] = A if b is None else np.hstack([A, b])
    new["z"], new["theta_W"] = z, np.float64(th_w)
    capped += int(cap_w) + nc
    return StepOut(new, {"objective": 0.0, "primal_sq": 0.0, "dual_sq": 0.0,
                        "capped": float(capped)})


def forward_update(spec: BlockSpec, pen: Penalties, own: State, prev: State, left: Array,
                   right: State | None, Y: Array | None = None
                   ) -> StepOut:
    """Forward sweep of layer l at iteration k.

    ``own``: layer l's backward output of iteration k; ``prev``: its state of iteration k-1
    (only for ``dual_sq``); ``left``: ``a_{l-1}`` of iteration k (``X`` for l = 1);
    ``right``: layer l+1's backward output of iteration k (None for l = L). Layer l < L:
    ``W_l``, ``b_l``, ``z_l``, ``a_l``; layer L: ``W_L``, ``b_L``, ``z_L``, then ``u``.

    Statistics: ``objective`` (layer share of L_rho at the new state), ``primal_sq``
    (``||z_L - W_L a~_{L-1}||^2`` for l = L, else 0: the hidden constraints are penalties),
    ``dual_sq`` (``||z_l^k - z_l^{k-1}||^2 + ||a_l^k - a_l^{k-1}||^2``), ``capped``.
    """
    o, nu = spec.options, penalty_nu(pen)
    A, b = spec.split_bias(own["W"])
    new: State = own.copy()
    if spec.is_output:
        rho, u = pen.rho, own["u"]
        T, kappa = own["z"] + u / rho, rho
    else:
        T, kappa = own["z"], nu
    ws = w_stats(left, T)
    A, th_w, _, cap_w = update_W_stats(A, b, ws, kappa, spec.n * pen.lam,
                                       float(own["theta_W"]), o.backtrack_max, o.step,
                                       pen.backtrack_start)
    if b is not None:
        b = update_b(A, ws[2], ws[3], spec.n, kappa, pen.lam)
    Z = _plus_bias(A @ left, b)
    capped = int(cap_w)
    primal_sq = 0.0
    if spec.is_output:
        assert Y is not None  # the output block is given the targets
        z, nc = update_z_output(spec.arch.loss, Y, Z, u, rho, own["z"], o.newton_max_iter)
        new["u"] = update_u(u, z, Z, rho)
        r = z - Z
        primal_sq = float(np.sum(r * r))
        dual_sq = float(np.sum((z - prev["z"]) ** 2))
    else:
        assert right is not None  # every block but the output one has a right neighbour
        z, nc = update_z(_c(spec, own["a"], left), Z, nu, own["z"], spec.act, o.newton_max_iter)
        a, th_a, cap_a = _a_step(spec, pen, own["a"], z, left, right, float(own["theta_a"]))
        new["a"], new["theta_a"] = a, np.float64(th_a)
        capped += int(cap_a)
        dual_sq = float(np.sum((z - prev["z"]) ** 2)) + float(np.sum((a - prev["a"]) ** 2))
    new["W"] = A if b is None else np.hstack([A, b])
    new["z"], new["theta_W"] = z, np.float64(th_w)
    capped += nc
    stats: Stats = {"objective": _objective(spec, pen, new, left, Y, Z), "primal_sq": primal_sq,
             "dual_sq": dual_sq, "capped": float(capped)}
    return StepOut(new, stats)


def init_state(arch: Architecture, weights: list[Array], X: Array, Y: Array,
               options: Options | None = None) -> list[State]:
    """Forward pass sets ``z_l``, ``a_l``; ``u = -n grad l(z_L)`` (dual-consistent: ``z_L`` is
    then stationary for its subproblem). Every relaxed penalty and the output constraint are 0,
    so L_rho equals the forward loss plus the regulariser. Both ``kind`` s are supported.

    ``options.output_init="labels"`` starts the output layer as the authors' code does:
    ``z_L = 2Y - 1`` (cross-entropy: +1 for the true class, -1 for the others) or ``z_L = Y``
    (MSE), and ``u = 0``; L_rho then also holds the output constraint's penalty
    ``(rho/2n)||z_L - W_L a~_{L-1}||^2``. Every value is column-separable either way."""
    U, V = forward(arch, weights, X)
    labels = options is not None and options.output_init == "labels"
    states: list[State] = []
    for i in range(1, arch.depth + 1):
        st: State = {"W": weights[i - 1].copy(), "z": U[i - 1], "theta_W": np.float64(0.0)}
        if i < arch.depth:
            st["a"] = V[i]
            st["theta_a"] = np.float64(0.0)
        elif labels:
            Yf = np.asarray(Y, dtype=np.float64)
            st["z"] = 2.0 * Yf - 1.0 if arch.loss == "cross_entropy" else Yf.copy()
            st["u"] = np.zeros_like(st["z"])
        else:
            st["u"] = -loss_grad_n(arch.loss, U[i - 1], Y)
        states.append(st)
    return states


SPLITTING = Splitting(
    "dladmm",
    init_state,
    (
        # layer l at iteration k: its own state of k-1, a_{l-1} of k-1, layer l+1's backward
        # output of k (so the sweep runs l = L..1)
        Step("dladmm_backward", backward_update,
             (Input(SELF, "dladmm_forward", 1), Input(LEFT, "dladmm_forward", 1, "a"),
              Input(RIGHT, "dladmm_backward", 0)), order="descending"),
        # layer l at iteration k: its own backward output of k (and its state of k-1 for the
        # dual residual), a_{l-1} of k, layer l+1's backward output of k (l = 1..L)
        Step("dladmm_forward", forward_update,
             (Input(SELF, "dladmm_backward", 0), Input(SELF, "dladmm_forward", 1),
              Input(LEFT, "dladmm_forward", 0, "a"), Input(RIGHT, "dladmm_backward", 0)),
             order="ascending"),
    ),
    block_objective,
    objective_left="a",
)
"""The serial iteration (the reference engine runs it)."""
