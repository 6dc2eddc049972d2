"""The dataflow backend (the in-memory engine): chunk tasks read what their plan declared, as
inputs, and hand on what they wrote; nothing is shared that a task could change."""

from __future__ import annotations

import numpy as np
import pytest

from daskadmm.chunks.common import (
    ChunkTask,
    FlowCall,
    Written,
    get_data,
    get_live,
    pick_written,
    put_live,
    run_flow,
)
from daskadmm.graph.chunked import Hazards, _Flow

CT = ChunkTask(None, slice(0, 3), 0)


def _double(ct: ChunkTask, factor: float) -> float:
    V = get_live(ct, 1, "V", 0)
    put_live(ct, 2, "V", 1, factor * V)
    return float(V.sum())


def test_a_task_reads_its_inputs_and_hands_on_what_it_wrote():
    V = np.arange(3.0)[None, :]
    call = FlowCall(_double, 2, ("b1/V/0/c0",), writes=True)
    out = run_flow(call, CT, 2.0, Written(None, {"b1/V/0/c0": V}))
    assert isinstance(out, Written) and out.out == 3.0
    assert list(out.data) == ["b2/V/1/c0"]
    np.testing.assert_array_equal(out.data["b2/V/1/c0"], 2.0 * V)
    # a task that writes nothing returns its result only; results of other tasks come as
    # their results
    plain = run_flow(FlowCall(lambda a, b: a + b, 2), Written(1.0, {}), 2.0)
    assert plain == 3.0


def test_data_chunks_come_as_arrays():
    X = np.ones((2, 3))
    call = FlowCall(lambda ct: get_data(ct, "X").sum(), 1, ("data/X/c0",))
    assert run_flow(call, CT, X) == 6.0


def test_a_read_the_plan_did_not_declare_fails_loudly():
    call = FlowCall(_double, 2, (), writes=True)
    with pytest.raises(KeyError, match="did not declare"):
        run_flow(call, CT, 2.0)


def test_nothing_handed_on_can_be_changed():
    V = np.arange(3.0)[None, :]

    def change_input(ct):
        get_live(ct, 1, "V", 0)[0, 0] = 7.0

    def change_after_writing(ct):
        W = np.zeros((1, 3))
        put_live(ct, 1, "V", 1, W)
        W += 1.0

    with pytest.raises(ValueError, match="read-only"):
        run_flow(FlowCall(change_input, 1, ("b1/V/0/c0",)), CT, Written(None, {"b1/V/0/c0": V}))
    with pytest.raises(ValueError, match="read-only"):
        run_flow(FlowCall(change_after_writing, 1, (), writes=True), CT)
    assert V[0, 0] == 0.0


def test_a_write_it_may_leave_out_hands_on_the_old_value():
    old = np.full((1, 3), 5.0)

    def maybe(ct, write):
        if write:
            put_live(ct, 1, "V", 1, np.zeros((1, 3)))

    call = FlowCall(maybe, 2, ("b1/V/1/c0?",), writes=True)
    kept = run_flow(call, CT, False, Written(None, {"b1/V/1/c0": old}))
    assert kept.data["b1/V/1/c0"] is old
    new = run_flow(call, CT, True, Written(None, {"b1/V/1/c0": old}))
    np.testing.assert_array_equal(new.data["b1/V/1/c0"], 0.0)


def test_a_pick_takes_only_what_is_read():
    w = Written("stats", {"b1/V/0/c0": np.zeros(2), "b1/U/0/c0": np.ones(2)})
    p = pick_written(w, ("b1/V/0/c0",))
    assert p.out is None and list(p.data) == ["b1/V/0/c0"]


def test_the_builder_refuses_a_read_before_any_write():
    hz = Hazards({}, flow=True)
    fl = _Flow(hz, 2, "r", [])
    with pytest.raises(KeyError, match="before any task wrote it"):
        fl.add("t", 1, [0], ["b1/V/0/c0"], False)


def test_reads_of_another_block_go_through_a_pick_unless_they_take_everything():
    nodes: list = []
    hz = Hazards({}, flow=True)
    fl = _Flow(hz, 3, "r", nodes)
    hz.task("w-b1-c0-k1-r", (), ["b1/V/1/c0", "b1/U/1/c0"])
    fl.add("a-b2-c0-k1-r", 2, [0], ["b1/V/1/c0"], True)  # one of two: picked
    fl.add("b-b2-c0-k1-r", 2, [0], ["b1/V/1/c0", "b1/U/1/c0"], True)  # all: as it is
    fl.add("c-b1-c0-k1-r", 1, [0], ["b1/U/1/c0"], True)  # its own block: as it is
    assert [n.key for n in nodes] == ["pick-b1V1c0-of-w-b1-c0-k1-r"]
    assert nodes[0].block == 1  # on the writer's worker
    assert [r.key for r in fl.inputs["a-b2-c0-k1-r"][1]] == ["pick-b1V1c0-of-w-b1-c0-k1-r"]
    assert [r.key for r in fl.inputs["b-b2-c0-k1-r"][1]] == ["w-b1-c0-k1-r"] * 2
    assert [r.key for r in fl.inputs["c-b1-c0-k1-r"][1]] == ["w-b1-c0-k1-r", "data_x-b1-c0-r"]
