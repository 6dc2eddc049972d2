"""The ADMM formulations, each as pure NumPy per-block update functions.

A :class:`Splitting` bundles what the serial reference and the Dask graph need to run one:
``init_state`` (initial per-block state from weights and a forward pass), ``block_update`` (one
iteration of one block, given its left neighbour's current output and its right neighbour's
previous state), ``block_objective`` (the block's share of the augmented Lagrangian) and the
neighbour contract. Nothing here imports dask, zarr or hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from . import radmm2, radmm3
from .base import BlockSpec, Options, Penalties

__all__ = ["SPLITTINGS", "BlockSpec", "Options", "Penalties", "Splitting", "get_splitting"]


@dataclass(frozen=True)
class Splitting:
    """One ADMM formulation.

    ``block_update(spec, pen, own, left, right, Y) -> (new_own, stats)``: ``left`` is the left
    neighbour's output of the *current* iteration (``X`` for block 1), ``right`` the right
    neighbour's state of the *previous* iteration (None for the last block) and ``Y`` the targets
    (last block only). ``stats`` has ``objective`` (the block's share of L after the update),
    ``primal_sq``, ``dual_sq`` and ``capped``. ``left_key`` names the state entry that the right
    neighbour receives as ``left``.
    """

    name: str
    init_state: Callable
    block_update: Callable
    block_objective: Callable
    left_key: str = "V"
    order: str = "gauss_seidel"  # gauss_seidel: left neighbour of the same iteration


SPLITTINGS: dict[str, Splitting] = {
    "radmm3": Splitting("radmm3", radmm3.init_state, radmm3.block_update,
                        radmm3.block_objective),
    "radmm3l": Splitting("radmm3l", radmm3.init_state,
                         partial(radmm3.block_update, linearized=True), radmm3.block_objective),
    "radmm2": Splitting("radmm2", radmm2.init_state, radmm2.block_update,
                        radmm2.block_objective),
}


def get_splitting(name: str) -> Splitting:
    try:
        return SPLITTINGS[name]
    except KeyError:
        raise ValueError(f"unknown ADMM algorithm {name!r} (known: {', '.join(SPLITTINGS)})") \
            from None
