"""The backprop baseline: the same network trained with Adam or SGD in PyTorch.

``algorithm=adam`` / ``algorithm=sgd`` train exactly the network of :mod:`daskadmm.model` (same
initial weights ``weights0``, same skip structure, same bias convention: ``W_i`` carries the bias
as its last column and multiplies ``V~ = [V; 1^T]``; samples are columns) on the same objective::

    l(W_N V~_{N-1}; Y) + (lam/2) sum_i ||W_i||^2        lam = algorithm.weight_decay

with ``l`` the ``(1/2n)||.||^2`` MSE or the mean softmax cross-entropy (``model.loss``). The
regulariser covers every weight including the bias column, as in the ADMM objective, and is
added to the loss explicitly (the optimisers get ``weight_decay=0``), so the gradient of each step
is ``grad l + lam W``.

Iterations are **epochs**: with ``algorithm.batch_size = 0`` (or ``>= n``) an epoch is one
full-batch step; otherwise the training columns are shuffled every epoch (a generator seeded from
``run.seed``) and cut into ``ceil(n / batch_size)`` mini-batches (the last one may be smaller),
one optimiser step each, each step on the mean loss of its batch plus the regulariser. The
objective the :class:`~daskadmm.monitor.Monitor` records (and checks for divergence) is always the
full training loss plus the regulariser; ``primal_residual``/``dual_residual`` are 0 and
``rho``/``beta`` NaN (they do not exist for backprop).

Everything runs in ``run.dtype`` (float64 by default) on the CPU with ``cluster.blas_threads``
torch threads (default 1; the previous thread count is restored afterwards), after
``torch.manual_seed(run.seed)``: two runs with the same config give identical results. The
monitor's clock (``wall_time``) is restarted once torch is imported and the optimiser built, so
that one-off cost (lazy imports, about a second on the first run in a process) does not count as
training time.

PyTorch is an optional extra (``pip install 'daskadmm[torch]'``); without it :func:`fit` raises
:class:`TorchMissingError`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .config import AlgorithmConfig
from .errors import TorchMissingError
from .model import Architecture
from .monitor import IterationStats, Monitor
from .result import Result

__all__ = [
    "OPTIMIZERS",
    "TorchMissingError",
    "fit",
    "require_torch",
    "torch_forward",
    "torch_loss",
    "torch_objective",
]

OPTIMIZERS = ("adam", "sgd")


def require_torch(algorithm: str = "adam"):
    """Import and return :mod:`torch`, or raise :class:`TorchMissingError` (one line)."""
    try:
        import torch
    except ImportError as exc:
        raise TorchMissingError(
            f"algorithm={algorithm} needs PyTorch: pip install 'daskadmm[torch]'"
        ) from exc
    return torch


# ------------------------------------------------------------------------------ the network


def _activation(arch: Architecture):
    torch = require_torch()
    name = arch.activation
    if name == "relu":
        return torch.relu
    if name == "leaky_relu":
        slope = float(arch.leaky_slope)
        return lambda u: torch.where(u > 0, u, slope * u)
    if name == "tanh":
        return torch.tanh
    if name == "sigmoid":
        return torch.sigmoid
    if name == "identity":
        return lambda u: u
    raise ValueError(f"unknown activation {name!r}")


def torch_forward(arch: Architecture, weights: list, X):
    """Network output ``Y^ = W_N V~_{N-1}`` (``dy x n``) for torch tensors, mirroring
    :func:`daskadmm.model.forward`."""
    torch = require_torch()
    f = _activation(arch)
    V = X
    ones = torch.ones((1, X.shape[1]), dtype=X.dtype, device=X.device) if arch.bias else None
    for i in range(1, arch.depth + 1):
        Vt = torch.cat([V, ones], dim=0) if arch.bias else V
        Z = weights[i - 1] @ Vt
        if i == arch.depth:
            return Z
        V = V + f(Z) if arch.skip(i) else f(Z)
    raise AssertionError("unreachable: depth >= 2")


def torch_loss(loss: str, out, Y):
    """``l(out; Y)`` as :func:`daskadmm.model.loss_value`: ``(1/2n)||out - Y||^2`` or the mean
    softmax cross-entropy (columns are samples)."""
    torch = require_torch()
    n = Y.shape[1]
    if loss == "mse":
        return 0.5 * torch.sum((out - Y) ** 2) / n
    if loss == "cross_entropy":
        return torch.sum(torch.logsumexp(out, dim=0) - torch.sum(Y * out, dim=0)) / n
    raise ValueError(f"unknown loss {loss!r}")


def torch_objective(arch: Architecture, weights: list, X, Y, lam: float):
    """Loss plus ``(lam/2) sum_i ||W_i||^2``."""
    value = torch_loss(arch.loss, torch_forward(arch, weights, X), Y)
    if lam:
        value = value + 0.5 * lam * sum((W * W).sum() for W in weights)
    return value


# ------------------------------------------------------------------------------ training


def _numpy_weights(params: list) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in params]


def _optimizer(torch, name: str, params: list, a) -> Any:
    if name == "adam":
        return torch.optim.Adam(params, lr=a.lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=a.lr, momentum=a.momentum)
    raise ValueError(f"algorithm.name must be one of {', '.join(OPTIMIZERS)} for the backprop "
                     f"baseline, got {name!r}")


def fit(a: AlgorithmConfig, arch: Architecture, ds, weights0: list[np.ndarray],
        monitor: Monitor, *, seed: int = 0, dtype: str = "float64", threads: int = 1) -> Result:
    """Train ``arch`` from ``weights0`` on ``ds`` with the optimiser of the ``algorithm``
    section ``a`` (``name``, ``lr``, ``momentum``, ``batch_size``, ``weight_decay``); ``seed``
    (``run.seed``) seeds the mini-batch order, ``dtype`` (``run.dtype``) is the training
    precision, and ``threads`` (``cluster.blas_threads``) the number of PyTorch threads.

    ``monitor.iterations`` epochs (or until the monitor's stopping rules fire: ``nonfinite``,
    ``diverged``); the monitor records the full objective and the metrics of ``ds`` every
    ``eval_every`` epochs and at the last. Returns a :class:`~daskadmm.result.Result` whose
    ``weights`` have the shapes of ``weights0``.
    """
    torch = require_torch(a.name)
    if a.name not in OPTIMIZERS:
        raise ValueError(f"algorithm.name must be one of {', '.join(OPTIMIZERS)} for the backprop "
                         f"baseline, got {a.name!r}")
    threads = max(1, int(threads or 1))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(torch, a, arch, ds, weights0, monitor, seed, dtype, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _train(torch, a: AlgorithmConfig, arch: Architecture, ds, weights0: list[np.ndarray],
           monitor: Monitor, seed: int, dtype_name: str, threads: int) -> Result:
    seed = int(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    np_dtype = np.dtype(dtype_name)
    dtype = torch.float32 if np_dtype == np.float32 else torch.float64
    lam = float(a.weight_decay)

    X = torch.as_tensor(np.ascontiguousarray(ds.X_train, dtype=np_dtype), dtype=dtype)
    Y = torch.as_tensor(np.ascontiguousarray(ds.Y_train, dtype=np_dtype), dtype=dtype)
    n = X.shape[1]
    params = [torch.nn.Parameter(torch.tensor(np.asarray(W, dtype=np_dtype), dtype=dtype))
              for W in weights0]
    opt = _optimizer(torch, a.name, params, a)
    # Restart the clock: the first torch import and optimiser construction (~1-2 s of lazy
    # imports) are not training time.
    monitor.t0 = time.perf_counter()
    batch = int(a.batch_size)
    full_batch = batch <= 0 or batch >= n

    def objective() -> float:
        with torch.no_grad():
            return float(torch_objective(arch, params, X, Y, lam))

    def step(Xb, Yb) -> None:
        opt.zero_grad(set_to_none=True)
        value = torch_objective(arch, params, Xb, Yb, lam)
        value.backward()
        opt.step()

    nan = math.nan
    monitor.start(objective(), _numpy_weights(params), nan, nan)
    status, k, steps = "max_iter", 0, 0
    for k in range(1, monitor.iterations + 1):
        if full_batch:
            step(X, Y)
            steps += 1
        else:
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch):
                idx = perm[start:start + batch]
                step(X[:, idx], Y[:, idx])
                steps += 1
        if monitor.is_eval(k):
            rec = monitor.record(k, IterationStats(objective(), 0.0, 0.0, 0),
                                 _numpy_weights(params), nan, nan)
            stop = monitor.check(rec)
            if stop is not None:
                status = stop
                break
    message = monitor.message(status, k)
    if status == "nonfinite":
        message = f"NaN or inf at epoch {k}: lower algorithm.lr"
    elif status == "max_iter":
        message = f"reached run.iterations = {k} epochs"
    return Result(
        status=status,
        message=message,
        iterations=k,
        weights=_numpy_weights(params),
        arch=arch,
        metric="",
        history=monitor.history,
        wall_time=monitor.elapsed(),
        info={
            "engine": "torch",
            "optimizer": a.name,
            "epochs": k,
            "steps": steps,
            "batch_size": batch,  # as configured (0: full batch)
            "full_batch": full_batch,
            "lr": float(a.lr),
            "momentum": float(a.momentum) if a.name == "sgd" else None,
            "weight_decay": lam,
            "threads": threads,
            "torch_version": str(torch.__version__),
        },
    )
