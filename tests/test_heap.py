"""Freed memory kept for reuse (daskadmm.heap): what the speed of sample-sized temporaries
relies on, checked by counting page faults (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daskadmm import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc's malloc only")

# A fresh process allocates, touches and frees a 48 MB array (above glibc's adaptive 32 MiB
# mmap limit) ten times and reports the page faults of the last nine.
_PROBE = """
import json, resource, sys
import numpy as np
from daskadmm import heap
applied = heap.reuse_freed_memory() if sys.argv[1] == "reuse" else None
a = np.ones(6_000_000); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    a = np.ones(6_000_000); del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
heap.give_back()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_freed_arrays_are_reused_without_faulting_in_again():
    plain, reuse = _probe("plain"), _probe("reuse")
    assert reuse["applied"] is True
    assert plain["faults"] >= 9 * 10  # every allocation maps new memory (hugepages or not)
    assert reuse["faults"] <= plain["faults"] // 9  # the first one's memory serves the rest


def test_worker_environment_names_the_same_setting():
    env = heap.worker_environ()
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(heap.THRESHOLD),
                   "MALLOC_TRIM_THRESHOLD_": str(heap.THRESHOLD), "MALLOC_ARENA_MAX": "1"}


def test_fit_applies_the_setting_only_when_asked(monkeypatch):
    from daskadmm import api
    from daskadmm.config import Config

    calls = []
    monkeypatch.setattr(heap, "reuse_freed_memory", lambda: calls.append("reuse") or True)
    monkeypatch.setattr(heap, "give_back", lambda: calls.append("give_back"))
    cfg = Config()
    cfg.cluster.kind = "reference"
    cfg.run.iterations = 1
    cfg.run.plot = False
    api.fit(cfg)
    assert calls == ["reuse", "give_back"]
    calls.clear()
    cfg.cluster.reuse_memory = False
    api.fit(cfg)
    assert calls == []
