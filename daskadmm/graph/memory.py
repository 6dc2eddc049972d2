"""The task graph of a window of ADMM iterations with the state in worker memory: wiring only.

For every iteration k of the window, every step of the splitting and every block b, one task
``<step>-b<b>-k<k>-<runid>`` runs the step's pure NumPy function (``daskadmm.splitting``) on
exactly the inputs its :class:`~daskadmm.splitting.Input` s name: for RADMM that is block b-1 of
iteration k (left neighbour), block b+1 of iteration k-1 (right neighbour) and block b of
iteration k-1 (itself). Submitting several iterations at once lets the scheduler run a
wavefront: block 1 starts iteration k+2 while block 3 still works on k+1.

Besides the update tasks, each iteration has N tiny ``block_stats`` tasks (pull the per-block
statistics out where the data lives) and one ``iteration_stats`` task that sums them in block
order, and evaluation iterations have one ``evaluate`` task (true forward pass on the train and
test data, fed the N weight matrices). None of these lie on the update chain.

Task keys put the step first and the run id last: the dashboard groups tasks by the text before
the first hyphen, and two runs on one scheduler never share a key.

The nodes are :mod:`daskadmm.graph.nodes`'; the Zarr-resident engine's graph, one task per block
and chunk, is built of the same nodes by :func:`daskadmm.graph.chunked.build_window`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model import Architecture, metrics
from ..splitting import BlockSpec, Penalties, Splitting, select
from ..splitting.base import StepOut
from .nodes import Node, Ref, iteration_stats, key

__all__ = [
    "build_window",
    "evaluate_weights",
    "run_step",
    "WindowGraph",
]


def run_step(fn: Callable, spec: BlockSpec, pen: Penalties, Y: Any, picks: tuple,
             *inputs) -> StepOut:
    """Run one step's function. ``picks[j]``: None (input j is data, pass as is), ``""``
    (input j is a task output :class:`~daskadmm.splitting.base.StepOut`: pass the state) or
    a state key (pass that entry)."""
    args = []
    for pick, value in zip(picks, inputs, strict=True):
        if pick is None or value is None:
            args.append(value)
        elif pick == "":
            args.append(value.state)
        else:
            args.append(value.state[pick])
    return fn(spec, pen, *args, Y=Y)


def select_output(out: StepOut, keys: tuple[str, ...]) -> StepOut:
    """A step output cut down to the state entries ``keys``."""
    return StepOut(select(out.state, keys), {})


def block_stats(out: StepOut, capped_before: tuple[StepOut, ...] = ()) -> dict[str, float]:
    """The last step's statistics, with ``capped`` summed over the iteration's steps."""
    stats = dict(out.stats)
    stats["capped"] = float(stats.get("capped", 0.0)) + sum(
        float(o.stats.get("capped", 0.0)) for o in capped_before)
    return stats


def evaluate_weights(arch: Architecture, task: str, metric: str, X_train, Y_train, X_test,
                     Y_test, *outs: StepOut) -> tuple[dict[str, float], list[np.ndarray]]:
    """Metrics of the true forward pass; returns ``(record, weights)``."""
    weights = [o.state["W"] for o in outs]
    with np.errstate(all="ignore"):
        tr = metrics(arch, weights, X_train, Y_train, task)
        te = metrics(arch, weights, X_test, Y_test, task)
    rec = {"train_loss": tr["loss"], "test_loss": te["loss"],
           "train_metric": tr[metric], "test_metric": te[metric]}
    return rec, weights


@dataclass
class WindowGraph:
    nodes: list[Node]
    last: dict[str, list[str]]  # step name -> keys of the window's last iteration, per block
    stats: dict[int, str]  # iteration -> iteration_stats key
    evals: dict[int, str]  # iteration -> evaluate key

    def __len__(self) -> int:
        return len(self.nodes)


def build_window(splitting: Splitting, specs: list[BlockSpec], pens: dict[int, Penalties],
                 k0: int, k1: int, prev: dict[str, list[str]], run_id: str,
                 data_keys: dict[str, str], eval_iters: Iterable[int] = (),
                 eval_args: tuple = ()) -> WindowGraph:
    """Nodes of iterations ``k0+1 .. k1``.

    ``prev`` maps every step name to the keys holding that step's per-block outputs of
    iteration ``k0`` (at k0 = 0, the initial-state keys). ``data_keys`` has ``X`` and ``Y``
    (and the evaluation data ``X_train``, ``Y_train``, ``X_test``, ``Y_test`` when
    ``eval_iters`` is not empty). Only references to keys are placed in the graph, never arrays.
    """
    N = len(specs)
    n = specs[0].n
    eval_iters = set(eval_iters)
    nodes: list[Node] = []
    stats_keys: dict[int, str] = {}
    eval_keys: dict[int, str] = {}
    X, Y = Ref(data_keys["X"]), Ref(data_keys["Y"])
    last_step = splitting.steps[-1].name
    selected: set[str] = set()
    for k in range(k0 + 1, k1 + 1):
        pen = pens[k]
        cur: dict[str, list[str]] = {}
        for step in splitting.steps:
            cur[step.name] = [key(step.name, k, run_id, b + 1) for b in range(N)]
            order = range(N) if step.order == "ascending" else range(N - 1, -1, -1)
            for b in order:  # emitted in execution order: the node list is topological
                refs: list[Ref | None] = []
                picks: list[str | None] = []
                for inp in step.inputs:
                    j = b + inp.block
                    if j < 0:
                        refs.append(X)
                        picks.append(None)
                    elif j >= N:
                        refs.append(None)
                        picks.append(None)
                    else:
                        src = cur if inp.lag == 0 else prev
                        ref = Ref(src[inp.step][j])
                        if inp.keys is not None:
                            # on the producer's worker: only the entries read travel
                            sk = f"select-{inp.step}-{'-'.join(inp.keys)}-b{j + 1}-" \
                                 f"k{k - inp.lag}-{run_id}"
                            if sk not in selected:
                                selected.add(sk)
                                nodes.append(Node(sk, select_output, (ref, inp.keys),
                                                  block=j + 1))
                            ref = Ref(sk)
                        refs.append(ref)
                        picks.append("" if inp.key is None else inp.key)
                nodes.append(Node(cur[step.name][b], run_step,
                                  (step.fn, specs[b], pen, Y if b == N - 1 else None,
                                   tuple(picks), *refs), block=b + 1))
        earlier = [s.name for s in splitting.steps[:-1]]
        bstats = []
        for b in range(N):
            bk = key("block_stats", k, run_id, b + 1)
            nodes.append(Node(bk, block_stats,
                              (Ref(cur[last_step][b]), tuple(Ref(cur[s][b]) for s in earlier)),
                              block=b + 1))
            bstats.append(Ref(bk))
        stats_keys[k] = key("iteration_stats", k, run_id)
        nodes.append(Node(stats_keys[k], iteration_stats, (n, pen.rho, *bstats)))
        if k in eval_iters:
            eval_keys[k] = key("evaluate", k, run_id)
            nodes.append(Node(eval_keys[k], evaluate_weights,
                              (*eval_args, Ref(data_keys["X_train"]), Ref(data_keys["Y_train"]),
                               Ref(data_keys["X_test"]), Ref(data_keys["Y_test"]),
                               *[Ref(kk) for kk in cur[last_step]])))
        prev = cur
    return WindowGraph(nodes, prev, stats_keys, eval_keys)
