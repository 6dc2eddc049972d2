"""Fully connected residual networks and MLPs: activations, forward pass, losses, metrics.

Conventions: samples are **columns**. ``X`` is ``d0 x n``, targets ``Y`` are ``dy x n`` (one-hot
for classification). With a bias, every layer's input gets a constant-1 row appended,
``V~ = [V; 1^T]``, and ``W_i`` has one extra column.

FCResNet with N weight layers::

    V_0 = X
    V_1 = sigma(W_1 V~_0)                          (s_1 = 0)
    V_i = V_{i-1} + sigma(W_i V~_{i-1}),  i=2..N-1  (s_i = 1)
    Y^  = W_N V~_{N-1}

An MLP is the same with every ``s_i = 0``.

Loss: ``mse``: ``l = (1/2n) ||Y^ - Y||^2`` (the *reported* MSE is ``(1/n) sum_j ||y^_j - y_j||^2
= 2 l``); ``cross_entropy``: mean softmax cross-entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Activation",
    "Architecture",
    "augment",
    "forward",
    "get_activation",
    "init_weights",
    "loss_grad_n",
    "loss_sum",
    "loss_value",
    "metrics",
    "predict",
    "softmax",
]

Array = np.ndarray


@dataclass(frozen=True)
class Activation:
    """An elementwise activation and the constants the solvers need.

    ``slope`` is the negative-side slope for piecewise-linear activations (relu 0, leaky_relu
    alpha, identity 1) and ``None`` for smooth ones. ``sup_df2 = sup sigma'^2``,
    ``sup_d2f = sup |sigma''|``, ``sup_abs = sup |sigma|`` (inf where unbounded).

    The solvers use two kernels that work in caller-owned buffers and give bit for bit what
    ``f``, ``df`` and ``d2f`` give: ``f_into(u, out)`` writes ``sigma(u)`` into ``out``, and
    ``derivs_from_value(s, ds, d2)`` writes ``sigma'`` and ``sigma''`` into ``ds`` and ``d2``
    from ``s = sigma(u)`` alone (tanh and sigmoid are functions of their value), so a Newton
    step evaluates sigma once. A smooth activation must have both: the smooth prox has no
    other path.
    """

    name: str
    f: Callable[[Array], Array]
    df: Callable[[Array], Array]
    d2f: Callable[[Array], Array]
    slope: float | None
    sup_df2: float
    sup_d2f: float
    sup_abs: float
    f_into: Callable[[Array, Array], Array] | None = None
    derivs_from_value: Callable[[Array, Array, Array], None] | None = None

    @property
    def piecewise_linear(self) -> bool:
        return self.slope is not None

    def __reduce__(self):  # pickle by name: lambdas do not pickle
        return (get_activation, (self.name, self.slope if self.name == "leaky_relu" else 0.01))


def _sigmoid(u: Array) -> Array:
    # numerically stable logistic function
    out = np.empty_like(u, dtype=u.dtype if u.dtype == np.float32 else np.float64)
    pos = u >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-u[pos]))
    e = np.exp(u[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _sigmoid_into(u: Array, out: Array) -> Array:
    """:func:`_sigmoid` into ``out`` (same bits): ``e = exp(-|u|)`` is ``exp(-u)`` for u >= 0
    and ``exp(u)`` below, so ``sigma = 1/(1+e)`` or ``e/(1+e)``."""
    np.abs(u, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    den = out + 1.0
    np.copyto(out, 1.0, where=u >= 0)
    np.divide(out, den, out=out)
    return out


def _tanh_derivs(s: Array, ds: Array, d2: Array) -> None:
    # the same operations as df = 1 - tanh^2 and d2f = -2 tanh (1 - tanh^2) below
    np.multiply(s, s, out=ds)
    np.subtract(1.0, ds, out=ds)
    np.multiply(s, -2.0, out=d2)
    d2 *= ds


def _sigmoid_derivs(s: Array, ds: Array, d2: Array) -> None:
    # df = s (1 - s), d2f = s (1 - s) (1 - 2 s), operation for operation
    np.subtract(1.0, s, out=ds)
    ds *= s
    np.multiply(s, 2.0, out=d2)
    np.subtract(1.0, d2, out=d2)
    d2 *= ds


def _leaky_into(alpha: float):
    """``where(u > 0, u, alpha u)`` into ``out``; for ``0 < alpha < 1`` that is
    ``max(u, alpha u)``, bit for bit (signed zeros, infinities and NaN included)."""
    if 0.0 < alpha < 1.0:
        def f_into(u: Array, out: Array) -> Array:
            np.multiply(u, alpha, out=out)
            return np.maximum(u, out, out=out)
    else:
        def f_into(u: Array, out: Array) -> Array:
            np.multiply(u, alpha, out=out)
            np.copyto(out, u, where=u > 0)
            return out
    return f_into


def _copy_into(u: Array, out: Array) -> Array:
    np.copyto(out, u)
    return out


def _piecewise(name: str, alpha: float) -> Activation:
    if alpha == 1.0:
        return Activation(name, lambda u: u.copy(), np.ones_like, np.zeros_like, 1.0,
                          1.0, 0.0, math.inf, _copy_into)
    if alpha == 0.0:  # np.maximum is ~10x faster than np.where here
        return Activation(name, lambda u: np.maximum(u, 0.0),
                          lambda u: (u > 0).astype(u.dtype if u.dtype == np.float32
                                                    else np.float64),
                          np.zeros_like, 0.0, 1.0, 0.0, math.inf,
                          lambda u, out: np.maximum(u, 0.0, out=out))
    f_into = _leaky_into(alpha)
    return Activation(
        name,
        lambda u: f_into(u, np.empty_like(u, dtype=u.dtype if u.dtype == np.float32
                                           else np.float64)),
        lambda u: np.where(u > 0, 1.0, alpha).astype(u.dtype if u.dtype == np.float32
                                                        else np.float64),
        np.zeros_like,
        alpha,
        1.0,
        0.0,
        math.inf,
        f_into,
    )


def get_activation(name: str, leaky_slope: float = 0.01) -> Activation:
    """Return the activation called ``name`` (relu, leaky_relu, tanh, sigmoid, identity)."""
    if name == "relu":
        return _piecewise("relu", 0.0)
    if name == "leaky_relu":
        return _piecewise("leaky_relu", float(leaky_slope))
    if name == "identity":
        return _piecewise("identity", 1.0)
    if name == "tanh":
        def d2(u: Array) -> Array:
            t = np.tanh(u)
            return -2.0 * t * (1.0 - t * t)

        return Activation("tanh", np.tanh, lambda u: 1.0 - np.tanh(u) ** 2, d2, None,
                          1.0, 4.0 / (3.0 * math.sqrt(3.0)), 1.0,
                          lambda u, out: np.tanh(u, out=out), _tanh_derivs)
    if name == "sigmoid":
        def d1(u: Array) -> Array:
            s = _sigmoid(u)
            return s * (1.0 - s)

        def d2s(u: Array) -> Array:
            s = _sigmoid(u)
            return s * (1.0 - s) * (1.0 - 2.0 * s)

        return Activation("sigmoid", _sigmoid, d1, d2s, None,
                          1.0 / 16.0, 1.0 / (6.0 * math.sqrt(3.0)), 1.0,
                          _sigmoid_into, _sigmoid_derivs)
    raise ValueError(f"unknown activation {name!r}")


@dataclass(frozen=True)
class Architecture:
    """Shape of the network. Blocks are numbered ``1..depth`` as in the math."""

    kind: str  # "resnet" | "mlp"
    depth: int  # N >= 2 weight layers
    d_in: int
    width: int
    d_out: int
    activation: str = "relu"
    leaky_slope: float = 0.01
    bias: bool = True
    loss: str = "mse"  # "mse" | "cross_entropy"

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")
        if self.kind not in ("resnet", "mlp"):
            raise ValueError(f"kind must be resnet or mlp, got {self.kind!r}")
        if self.loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss must be mse or cross_entropy, got {self.loss!r}")

    @property
    def act(self) -> Activation:
        return get_activation(self.activation, self.leaky_slope)

    def skip(self, i: int) -> int:
        """``s_i``: 1 for the residual blocks 2..N-1 of a resnet, else 0 (also 0 for i = N)."""
        return int(self.kind == "resnet" and 2 <= i <= self.depth - 1)

    def in_dim(self, i: int) -> int:
        """Rows of ``V_{i-1}`` (without the bias row)."""
        return self.d_in if i == 1 else self.width

    def out_dim(self, i: int) -> int:
        return self.d_out if i == self.depth else self.width

    def weight_shape(self, i: int) -> tuple[int, int]:
        return (self.out_dim(i), self.in_dim(i) + int(self.bias))


def augment(V: Array, bias: bool) -> Array:
    """``V~ = [V; 1^T]`` when ``bias`` else ``V`` itself."""
    if not bias:
        return V
    return np.vstack([V, np.ones((1, V.shape[1]), dtype=V.dtype)])


def init_weights(arch: Architecture, rng: np.random.Generator,
                 residual_scale: float = 0.3, depth_scaling: bool = False,
                 normal_std: float | None = None) -> list[Array]:
    """Scaled Gaussian initialisation; residual blocks scaled down by ``residual_scale``.

    He scaling (``2/fan_in``) for relu-like activations, Glorot-like (``1/fan_in``) otherwise;
    the output layer uses ``1/fan_in``. Bias columns start at zero.

    With ``depth_scaling`` the residual blocks are scaled by ``residual_scale / sqrt(R)``, R the
    number of residual blocks (``N - 2`` for a resnet). Each block then adds a variance of order
    ``residual_scale^2 / R`` to the forward signal, so the signal no longer grows geometrically
    with depth: for relu, width 64, ``residual_scale = 0.3``, the RMS of the last block output
    over the first is 1.3 / 2.1 / 3.0 at N = 8 / 32 / 64 (without: 2.4 / 123 / 24,578; what
    remains is the drift of the positive relu means), and on digits the initial loss is
    2.8 / 3.4 at N = 16 / 32 instead of 10.4 / 194.

    ``normal_std`` given: every weight and bias is ``N(0, normal_std^2)`` instead, whatever the
    layer and the scaling options (``model.init=normal``: the dlADMM authors' initialisation,
    std 0.1). The draws are the same matrices, in the same order, from ``rng``.
    """
    if normal_std is not None:
        return [rng.standard_normal(arch.weight_shape(i)) * normal_std
                for i in range(1, arch.depth + 1)]
    gain = 2.0 if arch.activation in ("relu", "leaky_relu") else 1.0
    n_residual = sum(arch.skip(i) for i in range(1, arch.depth + 1))
    if depth_scaling and n_residual > 1:
        residual_scale = residual_scale / math.sqrt(n_residual)
    weights = []
    for i in range(1, arch.depth + 1):
        rows, cols = arch.weight_shape(i)
        fan_in = arch.in_dim(i)
        scale = math.sqrt((gain if i < arch.depth else 1.0) / fan_in)
        if arch.skip(i):
            scale *= residual_scale
        W = rng.standard_normal((rows, cols)) * scale
        if arch.bias:
            W[:, -1] = 0.0
        weights.append(W)
    return weights


def forward(arch: Architecture, weights: list[Array], X: Array) -> tuple[list[Array], list[Array]]:
    """Forward pass. Returns ``(U, V)`` with ``U[i-1] = W_i V~_{i-1}`` for i = 1..N and
    ``V[i] = V_i`` for i = 0..N-1 (``V[0] = X``)."""
    act = arch.act
    V = [X]
    U = []
    for i in range(1, arch.depth + 1):
        Z = weights[i - 1] @ augment(V[-1], arch.bias)
        U.append(Z)
        if i < arch.depth:
            V.append(V[-1] + act.f(Z) if arch.skip(i) else act.f(Z))
    return U, V


def predict(arch: Architecture, weights: list[Array], X: Array) -> Array:
    """Network output ``Y^ = W_N V~_{N-1}`` (``dy x n``; logits for cross-entropy)."""
    return forward(arch, weights, X)[0][-1]


def softmax(Z: Array) -> Array:
    """Column-wise softmax."""
    E = np.exp(Z - Z.max(axis=0, keepdims=True))
    return E / E.sum(axis=0, keepdims=True)


def loss_sum(loss: str, out: Array, Y: Array) -> float:
    """``n l(out; Y)`` over the columns given (a sum, not a mean: additive over chunks of
    samples): ``(1/2)||out - Y||^2`` or the summed softmax cross-entropy."""
    if loss == "mse":
        return 0.5 * float(np.sum((out - Y) ** 2))
    zmax = out.max(axis=0, keepdims=True)
    logz = zmax[0] + np.log(np.exp(out - zmax).sum(axis=0))
    return float(np.sum(logz - np.sum(Y * out, axis=0)))


def loss_value(loss: str, out: Array, Y: Array) -> float:
    """``l(out; Y)``: ``(1/2n)||out - Y||^2`` or the mean softmax cross-entropy."""
    return loss_sum(loss, out, Y) / Y.shape[1]


def loss_grad_n(loss: str, out: Array, Y: Array) -> Array:
    """``n * grad_out l``: ``out - Y`` (mse) or ``softmax(out) - Y`` (cross-entropy)."""
    if loss == "mse":
        return out - Y
    return softmax(out) - Y


def metrics(arch: Architecture, weights: list[Array], X: Array, Y: Array,
            task: str) -> dict[str, float]:
    """Metrics of the **true forward pass**: ``loss``, and ``mse`` (regression, ``(1/n) sum
    ||y^ - y||^2``) or ``accuracy`` (classification)."""
    out = predict(arch, weights, X)
    result = {"loss": loss_value(arch.loss, out, Y)}
    if task == "classification":
        result["accuracy"] = float(np.mean(out.argmax(axis=0) == Y.argmax(axis=0)))
    else:
        result["mse"] = float(np.sum((out - Y) ** 2)) / Y.shape[1]
    return result
