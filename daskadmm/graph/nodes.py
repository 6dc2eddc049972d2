"""The nodes of an ADMM task graph and what both window builders share: wiring only.

A graph is a list of :class:`Node` s whose arguments may contain :class:`Ref` s to other keys;
:func:`to_dask_graph` turns it into a plain dict graph (synchronous / threaded schedulers) and
the engine submits the same nodes as futures on a distributed cluster. Task keys put the step
first and the run id last (:func:`key`): the dashboard groups tasks by the text before the
first hyphen, and two runs on one scheduler never share a key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..monitor import IterationStats

__all__ = [
    "critical_path_length",
    "default_window",
    "iteration_stats",
    "key",
    "Node",
    "Ref",
    "to_dask_graph",
]


@dataclass(frozen=True)
class Ref:
    """A reference to the output of the task called ``key``."""

    key: str


@dataclass
class Node:
    key: str
    fn: Callable
    args: tuple
    block: int | None = None  # 1-based block the task belongs to (for worker placement)
    chunk: int | None = None  # the sample chunk a per-chunk task works on (placement by chunk)
    # Dask's priority on a cluster: among the tasks ready on a worker, lower runs later (-1:
    # an evaluation, which nothing in the wavefront waits for, fills a worker's gaps)
    priority: int = 0

    def deps(self) -> list[str]:
        return [a.key for a in _walk(self.args) if isinstance(a, Ref)]


def _walk(args: Iterable) -> Iterable:
    for a in args:
        if isinstance(a, list | tuple):
            yield from _walk(a)
        else:
            yield a


def iteration_stats(n: int, rho: float, *stats: dict[str, float]) -> IterationStats:
    return IterationStats.from_blocks(list(stats), n, rho)


def key(step: str, k: int, run_id: str, block: int | None = None) -> str:
    if block is None:
        return f"{step}-k{k}-{run_id}"
    return f"{step}-b{block}-k{k}-{run_id}"


def _materialise(arg: Any) -> Any:
    if isinstance(arg, Ref):
        return arg.key
    if isinstance(arg, tuple):
        return tuple(_materialise(a) for a in arg)
    return arg


def to_dask_graph(nodes: list[Node], literals: dict[str, Any]) -> dict[str, Any]:
    """A plain Dask dict graph: ``{key: (fn, *args)}`` plus the literal inputs."""
    dsk: dict[str, Any] = dict(literals)
    for node in nodes:
        dsk[node.key] = (node.fn, *(_materialise(a) for a in node.args))
    return dsk


def critical_path_length(nodes: list[Node], prefix: str | None = None) -> int:
    """Longest dependency chain (in tasks) among ``nodes``, counted on the graph itself; with
    ``prefix``, count only tasks whose key starts with it (e.g. ``"radmm3_chunk-"``) along
    chains of such tasks."""
    by_key = {n.key: n for n in nodes}
    depth: dict[str, int] = {}

    def visit(k: str) -> int:
        if k in depth:
            return depth[k]
        stack = [(k, False)]
        while stack:  # iterative post-order DFS (chains can be thousands of tasks long)
            cur, ready = stack.pop()
            if cur in depth:
                continue
            deps = [d for d in by_key[cur].deps() if d in by_key]
            if not ready:
                stack.append((cur, True))
                stack.extend((d, False) for d in deps if d not in depth)
                continue
            own = 1 if prefix is None or cur.startswith(prefix) else 0
            depth[cur] = own + max((depth[d] for d in deps), default=0)
        return depth[k]

    return max((visit(n.key) for n in nodes), default=0)


def default_window(N: int) -> int:
    """Iterations in flight: enough for the wavefront to fill (about N/2 blocks run at once)."""
    return max(2, min(8, math.ceil(N / 2) + 1))
