"""Helpers shared by the tests that build configs, run the CLI or load a benchmark script."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def replace_sections(cfg, **sections):
    """A copy of ``cfg`` with ``section={key: value}`` replaced, e.g.
    ``replace_sections(cfg, run={"iterations": 3})``."""
    out = cfg
    for sec, kw in sections.items():
        out = dataclasses.replace(out, **{sec: dataclasses.replace(getattr(out, sec), **kw)})
    return out


def load_benchmark(script: str) -> ModuleType:
    """Import ``benchmarks/<script>.py`` as the module ``<script>`` (once per test session).

    ``benchmarks/`` goes first on ``sys.path``, as when the script runs as
    ``python benchmarks/<script>.py``, so the scripts' imports of each other (``suite`` of
    ``suite_common``, ``bench_dtype`` of ``bench_kernels``, ...) resolve to these same modules.
    """
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(script)


def run_cli(tmp_path: Path, *args: str, script: str | None = None, timeout: float = 120):
    """Run the CLI (or ``script``, a Python program's text, in its place) with cwd
    ``tmp_path/work``; return (completed process, work dir)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if script is not None:
        path = tmp_path / "fake_cli.py"
        path.write_text(script)
        cmd = [sys.executable, str(path)]
    else:
        cmd = [sys.executable, "-m", "daskadmm.cli"]
    cmd += [*args, f"hydra.run.dir={work / 'run'}", f"hydra.sweep.dir={work / 'sweep'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout,
                          env=env)
    return proc, work


def assert_usage_error(proc, work: Path, needle: str) -> None:
    """One line ``daskadmm: error: ...`` on stderr, exit code 2, nothing written."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("daskadmm: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (work / "run").exists()
    assert list(work.iterdir()) == [], "something was written"


def chunked_window(N: int, K: int, n: int, chunk: int, name: str = "radmm3"):
    """Iterations 1..K of the Zarr engine's graph of algorithm ``name`` (resnet of depth N, n
    samples in chunks of ``chunk``) as the runner builds it after its start tasks (named as the
    runner names them), with a checkpoint at iteration 2; returns (window, number of chunks)."""
    import numpy as np

    from daskadmm.graph import chunked as chunk_graph
    from daskadmm.model import Architecture
    from daskadmm.splitting.base import BlockSpec, Options, Penalties
    from daskadmm.storage import StoreRef, chunk_slices

    arch = Architecture("resnet", N, 3, 4, 2)
    specs = [BlockSpec(arch, i, n, Options()) for i in range(1, N + 1)]
    slices = chunk_slices(n, chunk)
    url = StoreRef("memory://x")
    weights = [np.zeros(arch.weight_shape(i)) for i in range(1, N + 1)]
    _, prev, _ = chunk_graph.start_nodes(name, arch, url, slices, "r", weights, n, None,
                                         Options(), 1.0, rho_first=(1.0,))
    prev.update({f"small-b{i}": f"init_small-b{i}-r" for i in range(1, N + 1)})
    pens = {k: Penalties(1.0, 1.0, 1e-3, 1e-3) for k in range(1, K + 2)}
    return chunk_graph.build_window(name, specs, pens, 0, K, prev, "r", url, slices,
                                    ckpt_slots={2: "a"}), len(slices)
