"""The task graph of a window of ADMM iterations with the state in the chunked store (the
Zarr-resident engine): wiring only.

Every algorithm plugs in as an iteration plan (the ``plan`` of its record in
:data:`daskadmm.algorithms.ALGORITHMS`): it appends its chunk tasks, with the chunks each reads
and writes, and its small tasks through a :class:`~daskadmm.chunks.common.PlanContext` that
:func:`build_window` makes. The builder adds
the start (a forward pass per chunk, or a restore from a checkpoint), the statistics of each
iteration, the evaluations and the checkpoint copies.

**Dependencies.** Tasks declare which chunks they read and write; :class:`Hazards` turns that
into task dependencies (read after write, and write after read or write), so no task can
overwrite a chunk another task still has to read, whatever the scheduler does. A dependency
on a chunk task is taken through a small task that runs after it (its layer's statistics at
the end of an iteration, or a task the plan names): a chunk task's output may hold ``d x d``
statistics, which a dependent task would keep in memory or make travel.

**Two backends.** With a store (``url``) tasks read and write its chunks and the dependencies
above only order them. With ``flow=True`` (the in-memory engine: no store) every task that
reads a location gets the output of the task that last wrote it as an input, and the data
chunks as inputs (``X`` to block 1's tasks, ``Y`` to block N's, both to the start);
:func:`~daskadmm.chunks.common.run_flow` runs the same task bodies on those values. Same
plans, same tasks, same results; only where the values live differs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from ..algorithms import ALGORITHMS
from ..chunks.common import (
    Array,
    ChunkTask,
    FlowCall,
    PlanContext,
    evaluate_combine,
    evaluate_part,
    group_stats,
    pick_written,
    run_flow,
    start_result,
)
from ..model import Architecture
from ..splitting import BlockSpec, Options, Penalties
from ..storage import StoreRef
from .nodes import Node, Ref, iteration_stats, key

__all__ = [
    "build_window",
    "ChunkWindow",
    "data_key",
    "EAGER",
    "eager_order",
    "GROUP",
    "Hazards",
    "start_nodes",
]


class Hazards:
    """Chunk-level read/write bookkeeping that turns declared accesses into dependencies.

    A location is ``"b<i>/<var>/<slot>/c<c>"``. A task that reads a location runs after its
    last writer; a task that writes it runs after its last writer and after every task that
    read the previous value. The state is carried between windows as roles
    (``w|<loc>`` -> writer key, ``r|<loc>|<j>`` -> reader key). With ``flow``, it also keeps
    the task that wrote each location (never a marker: its output holds the value), as
    ``d|<loc>``."""

    def __init__(self, roles: dict[str, str], flow: bool = False):
        self.writer: dict[str, str] = {}
        self.readers: dict[str, list[str]] = {}
        self.aliases: dict[str, str] = {}
        self.flow = flow
        self.data: dict[str, str] = {}
        self.wrote: dict[str, set[str]] = {}  # with flow: task -> the locations it holds
        for role, value in roles.items():
            if role.startswith("d|"):
                self.data[role[2:]] = value
                self.wrote.setdefault(value, set()).add(role[2:])
            elif role.startswith("w|"):
                self.writer[role[2:]] = value
            elif role.startswith("r|"):
                self.readers.setdefault(role[2:].rpartition("|")[0], []).append(value)

    def task(self, task_key: str, reads: Iterable[str], writes: Iterable[str]) -> list[Ref]:
        reads, writes = list(reads), list(writes)
        deps: list[str] = []
        for loc in reads:
            if loc in self.writer:
                deps.append(self.writer[loc])
        for loc in writes:
            if loc in self.writer:
                deps.append(self.writer[loc])
            deps.extend(self.readers.get(loc, ()))
        for loc in reads:
            self.readers.setdefault(loc, []).append(task_key)
        for loc in writes:
            self.writer[loc] = task_key
            self.readers[loc] = []
            if self.flow:
                self.wrote.setdefault(task_key, set()).add(loc)
                old = self.data.get(loc)
                if old is not None and old != task_key:
                    self.wrote[old].discard(loc)
                self.data[loc] = task_key
        if self.aliases:
            deps = [self._alias_of(d) for d in dict.fromkeys(deps)]
        return [Ref(d) for d in dict.fromkeys(deps) if d != task_key]

    def _alias_of(self, d: str) -> str:
        while d in self.aliases:  # a marker of a marker runs after both
            d = self.aliases[d]
        return d

    def alias(self, markers: dict[str, str]) -> None:
        """Until the next :meth:`replace`, tasks wait for ``markers[key]`` instead of task
        ``key`` (a task that runs after it); the bookkeeping keeps ``key``, so the markers of
        :meth:`replace` take over after."""
        self.aliases.update({d: m for d, m in markers.items() if d != m})

    def replace(self, markers: dict[str, str]) -> None:
        """Later tasks wait for ``markers[key]`` instead of task ``key`` (a task that runs after
        it)."""
        self.writer = {loc: markers.get(v, v) for loc, v in self.writer.items()}
        self.readers = {loc: list(dict.fromkeys(markers.get(v, v) for v in keys))
                        for loc, keys in self.readers.items()}
        self.aliases = {}

    def source(self, loc: str) -> Ref:
        """The task whose output holds location ``loc`` (with ``flow``)."""
        try:
            return Ref(self.data[loc])
        except KeyError:
            raise KeyError(f"{loc} is read before any task wrote it") from None

    def roles(self) -> dict[str, str]:
        out = {f"w|{loc}": v for loc, v in self.writer.items()}
        out.update({f"d|{loc}": v for loc, v in self.data.items()})
        for loc, keys in self.readers.items():
            for j, v in enumerate(dict.fromkeys(keys)):
                out[f"r|{loc}|{j}"] = v
        return out


def _locs(c: int, *names: str) -> list[str]:
    return [f"{x}/c{c}" for x in names]


GROUP = 4  # chunk outputs per statistics group (:func:`daskadmm.chunks.common.group_stats`)

EAGER: frozenset[Callable] = frozenset({group_stats}).union(
    *(alg.plan.eager for alg in ALGORITHMS.values()))
"""The reductions submitted right after their inputs: the statistics groups and every
algorithm's own (``ChunkAlgorithm.eager``)."""


def eager_order(nodes: list[Node], eager: frozenset[Callable]) -> list[Node]:
    """``nodes`` with every task whose function is in ``eager`` moved up to just after
    the last of its inputs (the order of the others kept). The driver submits in this order
    and Dask runs earlier-submitted tasks first among those ready, so a reduction or a
    statistics group runs as soon as its chunk tasks are done and their outputs (``d x d``
    statistics) can go, instead of after every chunk task of the block."""
    keys = {n.key for n in nodes}
    waiting: dict[str, list[Node]] = {}  # key -> eager nodes whose last missing input it is
    out: list[Node] = []
    placed: set[str] = set()

    def place(node: Node) -> None:
        out.append(node)
        placed.add(node.key)
        for nxt in waiting.pop(node.key, []):
            settle(nxt)

    def settle(node: Node) -> None:
        missing = [d for d in node.deps() if d in keys and d not in placed]
        if missing:
            waiting.setdefault(missing[-1], []).append(node)
        else:
            place(node)

    is_eager = [node.fn in eager for node in nodes]
    for node, e in zip(nodes, is_eager, strict=True):
        if e:
            settle(node)
    for node, e in zip(nodes, is_eager, strict=True):
        if not e:
            place(node)
    assert len(out) == len(nodes)  # every eager node's inputs are in the list
    return out


def rhos_role(rhos: tuple[float, ...]) -> str:
    """Candidate rhos as a role value (the roles are strings): their exact decimal forms."""
    return json.dumps([float(r) for r in rhos])


def rhos_of_role(value: str | None) -> tuple[float, ...]:
    """:func:`rhos_role` back to the floats (the same bits: JSON keeps a float's repr); none
    without a role."""
    return () if value is None else tuple(float(r) for r in json.loads(value))


def _key(base: str, k: int, run_id: str, i: int, tag: str = "") -> str:
    """``<base>-b<i>-k<k>-<runid>``, or ``<base>-b<i>-<tag>-k<k>-<runid>`` (one of several
    tasks of that kind, e.g. a node of a reduction tree)."""
    return key(base, k, run_id, i) if not tag else f"{base}-b{i}-{tag}-k{k}-{run_id}"


def data_key(name: str, c: int, N: int, run_id: str) -> str:
    """The key of chunk c of data array ``name`` in the dataflow backend; the block in it
    (1 for ``X``, ``X_test``; N for ``Y``, ``Y_test``) places it on that block's worker."""
    block = 1 if name.startswith("X") else N
    return f"data_{name.lower()}-b{block}-c{c}-{run_id}"


def _data_names(block: int | None, N: int) -> tuple[str, ...]:
    """The data a task of ``block`` may read (None: the start, which reads both)."""
    if block is None:
        return ("X", "Y")
    return (("X",) if block == 1 else ()) + (("Y",) if block == N else ())


def _key_block(task_key: str) -> int | None:
    """The block in a task key (``<base>-b<i>-...``), None for one without (the start)."""
    m = re.search(r"-b(\d+)-", task_key)
    return None if m is None else int(m.group(1))


class _Flow:
    """The dataflow backend's inputs of each task (``key -> (locations, refs, writes)``).

    A task's output holds everything it wrote. When a task reads from a task of another block
    (a neighbour, or the start), a ``pick`` task on the writer's worker takes out just the
    locations read, so only those travel."""

    def __init__(self, hz: Hazards, N: int, run_id: str, nodes: list[Node]):
        self.hz, self.N, self.run_id, self.out = hz, N, run_id, nodes
        self.inputs: dict[str, tuple[list[str], list[Ref], bool]] = {}
        self.picks: set[str] = set()

    def add(self, key_: str, block: int | None, cs: Iterable[int], reads: Iterable[str],
            writes: bool, data: Iterable[str] | None = None, keep: Iterable[str] = ()) -> None:
        """Task ``key_`` (not appended yet) reads the locations ``reads`` (their last
        writers' values), and the data chunks ``cs`` of its block's data (or of ``data``);
        ``keep``: locations it may not write, whose values it then hands on."""
        locs = [*reads, *(x + "?" for x in keep)]
        srcs = [self.hz.source(loc.rstrip("?")).key for loc in locs]
        away: dict[str, list[str]] = {}  # a writer of another block -> what is read of it
        for loc, src in zip(locs, srcs, strict=True):
            if _key_block(src) != block:
                away.setdefault(src, []).append(loc.rstrip("?"))
        # (a task that reads all a writer holds takes its output as it is)
        away = {src: ls for src, ls in away.items() if not self.hz.wrote[src] <= set(ls)}
        picked = {src: self._pick(src, tuple(sorted(set(ls)))) for src, ls in away.items()}
        refs = [Ref(picked.get(src, src)) for src in srcs]
        names = _data_names(block, self.N) if data is None else tuple(data)
        for c in cs:
            for name in names:
                locs.append(f"data/{name}/c{c}")
                refs.append(Ref(data_key(name, c, self.N, self.run_id)))
        self.inputs[key_] = (locs, refs, writes)

    def _pick(self, src: str, locs: tuple[str, ...]) -> str:
        kk = f"pick-{'.'.join(x.replace('/', '') for x in locs)}-of-{src}"
        if kk not in self.picks:
            self.picks.add(kk)
            self.out.append(Node(kk, pick_written, (Ref(src), locs), block=_key_block(src)))
        return kk

    def add_eval_part(self, key_: str, train: Iterable[int], test: Iterable[int]) -> None:
        """A part of an evaluation reads the train data's chunks ``train`` and the test
        data's chunks ``test``."""
        self.add(key_, None, train, (), False)
        locs, refs, _ = self.inputs[key_]
        self.add(key_, None, test, (), False, ("X_test", "Y_test"))
        more, more_refs, _ = self.inputs[key_]
        self.inputs[key_] = (locs + more, refs + more_refs, False)

    def nodes(self, nodes: list[Node]) -> list[Node]:
        """Every node as a :func:`~daskadmm.chunks.common.run_flow` task (a pick as it is)."""
        out = []
        for n in nodes:
            if n.fn is pick_written:
                out.append(n)
                continue
            locs, refs, writes = self.inputs.get(n.key, ((), (), False))
            out.append(Node(n.key, run_flow,
                            (FlowCall(n.fn, len(n.args), tuple(locs), writes), *n.args, *refs),
                            block=n.block, chunk=n.chunk, priority=n.priority))
        return out


def _small_task(nodes: list[Node], k: int, run_id: str, base: str, i: int, fn, args: tuple,
                tag: str = "", on: int | None = None) -> str:
    """Append one task of iteration k of block i to ``nodes`` (a plan's ``small_task``), on
    block i's worker, or block ``on``'s (where its inputs are); its key (:func:`_key`)."""
    kk = _key(base, k, run_id, i, tag)
    nodes.append(Node(kk, fn, args, block=i if on is None else on))
    return kk


def eval_split(n_train: int, n_test: int) -> list[tuple[list[int], list[int]]]:
    """The chunks of each part of an evaluation: one part per train chunk, the test chunks
    shared out in order over the parts (test chunk j to part ``j * n_train // n_test``), so
    the parts in order visit the train chunks and the test chunks each in order."""
    parts: list[tuple[list[int], list[int]]] = [([c], []) for c in range(n_train)]
    for j in range(n_test):
        parts[j * n_train // n_test][1].append(j)
    return parts


def _evaluation(eval_key: str, url: StoreRef | None, eval_args: tuple, w_keys: list[str],
                fl: _Flow | None) -> list[Node]:
    """An evaluation as one :func:`~daskadmm.chunks.common.evaluate_part` per train chunk
    (placed with that chunk's tasks) and their sum, ``eval_key``
    (:func:`~daskadmm.chunks.common.evaluate_combine`: the same figures as one pass over
    every chunk). Both at priority -1: nothing in the wavefront waits for them, so a
    worker runs them when it has no chunk task ready. ``eval_args``: ``(arch, task, metric,
    train slices, test slices)``; ``fl``: the dataflow backend's inputs (None with a
    store)."""
    arch, task, _metric, train, test = eval_args
    smalls = [Ref(x) for x in w_keys]
    nodes, parts = [], []
    for c, (cs, js) in enumerate(eval_split(len(train), len(test))):
        pk = eval_key.replace("evaluate-", f"evaluate_part-c{c}-", 1)
        if fl is not None:
            fl.add_eval_part(pk, cs, js)
        nodes.append(Node(pk, evaluate_part,
                          (url, arch, task, tuple((i, train[i]) for i in cs),
                           tuple((j, test[j]) for j in js), *smalls), chunk=c,
                          priority=-1))
        parts.append(Ref(pk))
    nodes.append(Node(eval_key, evaluate_combine, (len(parts), *parts, *smalls), priority=-1))
    return nodes


@dataclass
class ChunkWindow:
    """The nodes of a window of iterations; ``last``: the roles the next window depends on;
    ``stats[k]`` / ``evals[k]``: the keys of iteration k's statistics and evaluation;
    ``weights[k]``: the keys of the layers' small states of iteration k (what a checkpoint
    stores besides the chunks); ``checkpoints[k]``: the checkpoint task keys."""

    nodes: list[Node]
    last: dict[str, str]
    stats: dict[int, str]
    evals: dict[int, str]
    weights: dict[int, list[str]]
    checkpoints: dict[int, list[str]]

    def __len__(self) -> int:
        return len(self.nodes)


def start_nodes(name: str, arch: Architecture, url: StoreRef | None, slices: list[slice],
                run_id: str, weights: list[Array], n: int, restore: tuple[int, str] | None,
                options: Options, rho: float, flow: bool = False,
                rho_first: tuple[float, ...] = (), restart: int | None = None, tag: str = ""
                ) -> tuple[list[Node], dict[str, str], list[str]]:
    """Tasks that bring the store to iteration k0: the algorithm's start of each chunk (fresh;
    ``ChunkAlgorithm.init``, given ``options`` and iteration 1's ``rho``) or a copy of the
    checkpoint back into slot ``k0 % 2`` (``restore = (k0, ckpt slot)``), each followed by
    the chunk's start statistics, then their sums (``ChunkAlgorithm.start_chunk`` and
    ``start_sum``: X's constant statistics, role ``gram``, and for RADMM-3/3L/3A ``W_1``'s
    statistics for iteration k0+1, role ``first``, with ``rho_first``: the values that
    iteration's rho can take, kept as role ``first_rhos``). Returns (nodes, roles, the
    keys of the fresh start's results: each chunk's share of L^0). ``flow``: the dataflow
    backend (no store, no restore; the data chunks are the keys of :func:`data_key`).
    ``restart``: k, a restart after iteration k
    (:func:`~daskadmm.splitting.base.restarts_after`): the fresh start on ``weights``
    (``W^k``) into slot ``k % 2``, its keys tagged ``r<k>`` before the run id (so they still
    end with it, as every task of the run does); the caller submits it once nothing reads or
    writes that slot any more (nothing orders it after earlier tasks). ``tag``: more of the
    restart's key tag (``r<k><tag>``), for a second start after the same iteration (the
    restart guard's, on other weights).
    """
    from ..chunks.common import StartContext, restore_chunk

    eng = ALGORITHMS[name].plan
    N = arch.depth
    k0 = restart if restart is not None else 0 if restore is None else restore[0]
    assert not (flow and restore), "the dataflow backend has no checkpoints"
    assert restart is None or restore is None, "a restart is a fresh start"
    nodes: list[Node] = []
    hz = Hazards({}, flow)
    fl = _Flow(hz, N, run_id, nodes)  # (the data chunks' keys: the run's)
    if restart is not None:
        run_id = f"r{restart}{tag}-{run_id}"
    init_keys: list[str] = []
    block_vars = tuple(eng.state_vars(arch, i) for i in range(1, N + 1))
    cts = tuple(ChunkTask(url, sl, c) for c, sl in enumerate(slices))

    def task(kk: str, block: int, fn, args: tuple, reads: Iterable[str] = ()) -> Ref:
        reads = list(reads)
        if flow:
            if args and isinstance(args[0], ChunkTask):
                fl.add(kk, block, [args[0].c], reads, False)
            order = []
        else:
            order = hz.task(kk, reads, ()) if reads else []
        chunk = args[0].c if args and isinstance(args[0], ChunkTask) else None
        nodes.append(Node(kk, fn, (*args, *order), block=block, chunk=chunk))
        return Ref(kk)

    small_task = partial(_small_task, nodes, k0, run_id)

    ctx = StartContext(task, small_task, hz.replace, cts, k0 % 2, run_id, rho_first)
    parts = []
    for ct in cts:
        c = ct.c
        if restore is None:
            kk = f"init_chunk-c{c}-{run_id}"
            hz.task(kk, (), [f"b{i}/{v}/{k0 % 2}/c{c}" for i in range(1, N + 1)
                             for v in block_vars[i - 1]])
            if flow:
                fl.add(kk, None, [c], (), True)
            nodes.append(Node(kk, eng.init, (ct, name, arch, weights, n, options, rho,
                                             block_vars, k0 % 2), chunk=c))
            init_keys.append(kk)
        else:
            for i in range(1, N + 1):
                names = block_vars[i - 1]
                kk = f"restore_chunk-b{i}-c{c}-{run_id}"
                hz.task(kk, (), [f"b{i}/{v}/{k0 % 2}/c{c}" for v in names])
                nodes.append(Node(kk, restore_chunk, (ct, i, names, k0 % 2, restore[1]),
                                  block=i, chunk=c))
        parts.append(eng.start_chunk(ctx, ct, arch))
    gram, first = eng.start_sum(ctx, parts, arch)
    roles: dict[str, str] = {"gram": gram}
    if first is not None:
        roles["first"] = first
        roles["first_rhos"] = rhos_role(rho_first)
    roles.update(hz.roles())
    nodes = eager_order(nodes, EAGER)
    # the start's results (its share of L^0) apart from the state it wrote: what the driver
    # fetches (a dataflow start's output holds the whole state of its chunk)
    outs = [f"init_out-{kk}" for kk in init_keys]
    nodes += [Node(o, start_result, (Ref(kk),)) for o, kk in zip(outs, init_keys, strict=True)]
    return (fl.nodes(nodes) if flow else nodes), roles, outs


def build_window(name: str, specs: list[BlockSpec], pens: dict[int, Penalties], k0: int,
                 k1: int, prev: dict[str, str], run_id: str, url: StoreRef | None,
                 slices: list[slice], eval_iters: Iterable[int] = (), eval_args: tuple = (),
                 ckpt_slots: dict[int, str] | None = None, flow: bool = False,
                 next_rhos: tuple[float, ...] = ()) -> ChunkWindow:
    """Nodes of iterations ``k0+1 .. k1`` of the chunked graph of algorithm ``name``.

    ``prev``: ``small-b<i>`` (the key of layer i's small state of iteration k0), ``gram``
    (the constant X statistics), ``first`` (RADMM-3/3L/3A: ``W_1``'s statistics for
    iteration k0+1; ``first_rhos``: the candidate rhos they were made for) and the
    :class:`Hazards` roles. ``pens``: the penalties of every iteration of the window and of
    the next one if they are known; ``next_rhos``: otherwise the values the next one's rho
    can take (:meth:`~daskadmm.schedules.PenaltySchedule.next_rhos`). ``eval_args``:
    ``(arch, task, metric, train slices, test slices)``. ``flow``: the dataflow backend (no
    store, no checkpoints)."""
    from ..chunks.common import checkpoint_chunk

    N = len(specs)
    arch = specs[0].arch
    hz = Hazards(prev, flow)
    nodes: list[Node] = []
    fl = _Flow(hz, N, run_id, nodes)
    assert not (flow and ckpt_slots), "the dataflow backend has no checkpoints"
    small = {i: prev[f"small-b{i}"] for i in range(1, N + 1)}
    gram = Ref(prev["gram"])
    first = prev.get("first")
    first_rhos = rhos_of_role(prev.get("first_rhos"))
    eval_iters = set(eval_iters)
    ckpt_slots = ckpt_slots or {}
    stats_keys: dict[int, str] = {}
    eval_keys: dict[int, str] = {}
    w_keys: dict[int, list[str]] = {}
    ck_keys: dict[int, list[str]] = {}
    done: dict[str, str] = {}  # chunk task -> its layer's statistics task (runs after it)
    cts = tuple(ChunkTask(url, sl, c) for c, sl in enumerate(slices))
    for k in range(k0 + 1, k1 + 1):
        pen = pens[k]
        w = k % 2
        parts: dict[int, list[Ref]] = {i: [] for i in range(1, N + 1)}
        sm_keys: dict[int, str] = {}
        waits: dict[str, list[str]] = {}  # chunk task -> the tasks it waits for (hazards)

        def chunk_tasks(base: str, i: int, fn, args: tuple, reads, writes, each=None,
                        _k=k, _parts=parts, _waits=waits) -> list[Ref]:
            """One task per chunk: ``fn(chunk, *args, [each[c],] *order)``."""
            refs = []
            for c, sl in enumerate(slices):
                kk = f"{base}-b{i}-c{c}-k{_k}-{run_id}"
                wlocs = _locs(c, *(x.rstrip("?") for x in writes))
                if flow:
                    # a write it may leave out ("?") hands on the value it had
                    fl.add(kk, i, [c], _locs(c, *reads), bool(writes),
                           keep=_locs(c, *(x[:-1] for x in writes if x.endswith("?"))))
                order = hz.task(kk, _locs(c, *reads), wlocs)
                _waits[kk] = [r.key for r in order]
                if flow:
                    order = []  # the inputs are the data dependencies
                own = () if each is None else (each[c],)
                nodes.append(Node(kk, fn, (ChunkTask(url, sl, c), *args, *own, *order),
                                  block=i, chunk=c))
                refs.append(Ref(kk))
            _parts[i].extend(refs)
            return refs

        small_task = partial(_small_task, nodes, k, run_id)

        def reader(task_key: str, locs: list[str]) -> None:
            """``task_key`` may read ``locs`` of every chunk (a decision that goes on by
            itself): later writers wait for it."""
            every = [loc for c in range(len(slices)) for loc in _locs(c, *locs)]
            if flow:
                at = next(j for j in range(len(nodes) - 1, -1, -1) if nodes[j].key == task_key)
                node = nodes.pop(at)  # after the picks of what it reads
                fl.add(task_key, node.block, range(len(slices)), every, False)
                nodes.append(node)
            hz.task(task_key, every, ())

        def after(marker: str, refs: list[Ref], _waits=waits) -> None:
            """Task ``marker`` runs after the chunk tasks ``refs``, so after everything they
            wait for: tasks of this iteration that have to run after one of those wait for
            ``marker`` instead."""
            hz.alias({d: marker for r in refs for d in [r.key, *_waits[r.key]]})

        nxt = pens.get(k + 1)
        if nxt is None and first is not None and not next_rhos:
            raise ValueError(f"iteration {k + 1}'s rho is neither known nor given as "
                             "candidates (next_rhos)")
        ctx = PlanContext(chunk_tasks, small_task, reader, after, gram, cts, first,
                          next_rhos if nxt is None else (nxt.rho,), first_rhos)
        sm_keys = ALGORITHMS[name].plan.plan(ctx, specs, pen, k, small)
        first, first_rhos = ctx.first, ctx.first_rhos
        # statistics: per layer, then one sum
        lstats = []
        for i in range(1, N + 1):
            lk = key("layer_stats", k, run_id, i)
            ins = parts[i]
            if len(slices) > GROUP:
                # the chunk outputs' statistics a few at a time, each group as soon as its
                # chunks are done, so no chunk output waits for the whole block
                ins = [Ref(small_task("group_stats", i, group_stats,
                                      tuple(ins[j:j + GROUP]), tag=f"g{j // GROUP}"))
                       for j in range(0, len(ins), GROUP)]
            nodes.append(Node(lk, ALGORITHMS[name].plan.stats,
                              (Ref(sm_keys[i]), *ins), block=i))
            lstats.append(Ref(lk))
            done.update({r.key: lk for r in parts[i]})
        # from here on, tasks that must run after a chunk task of iteration k (the
        # checkpoint, iteration k+1's chunk tasks) wait for its layer's statistics task: see
        # the end of this function (a window of K iterations is wired as K windows of one)
        hz.replace(done)
        stats_keys[k] = key("iteration_stats", k, run_id)
        nodes.append(Node(stats_keys[k], iteration_stats, (specs[0].n, pen.rho, *lstats)))
        w_keys[k] = [sm_keys[i] for i in range(1, N + 1)]
        if k in eval_iters:
            eval_keys[k] = key("evaluate", k, run_id)
            nodes.extend(_evaluation(eval_keys[k], url, eval_args, w_keys[k], fl if flow
                                     else None))
        if k in ckpt_slots:
            ck_keys[k] = []
            for i in range(1, N + 1):
                names = ALGORITHMS[name].plan.state_vars(arch, i)
                for c, sl in enumerate(slices):
                    kk = f"checkpoint-b{i}-c{c}-k{k}-{run_id}"
                    order = hz.task(kk, [f"b{i}/{v}/{w}/c{c}" for v in names], ())
                    nodes.append(Node(kk, checkpoint_chunk,
                                      (ChunkTask(url, sl, c), i, names, w, ckpt_slots[k],
                                       *order), block=i, chunk=c))
                    ck_keys[k].append(kk)
        small = sm_keys
    # Carry completion markers, not chunk tasks: a chunk task's output holds d x d statistics,
    # and a future kept for a dependency (or a later task that takes it only to run after it)
    # keeps its output in cluster memory. The layer's statistics task runs after all of that
    # layer's chunk tasks of its iteration (and its output is a few floats), so a later task
    # may wait for it instead.
    nodes = eager_order(nodes, EAGER)
    if flow:
        nodes = fl.nodes(nodes)
    last = hz.roles()
    last.update({f"small-b{i}": small[i] for i in range(1, N + 1)})
    last["gram"] = prev["gram"]
    if first is not None:
        last["first"] = first
        last["first_rhos"] = rhos_role(first_rhos)
    return ChunkWindow(nodes, last, stats_keys, eval_keys, w_keys, ck_keys)
