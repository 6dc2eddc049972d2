"""Helpers shared by the tests that build configs, run the CLI or load a benchmark script."""

from __future__ import annotations

import dataclasses
import importlib.util
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
    """Import ``benchmarks/<script>.py`` as a module (once per test session)."""
    name = f"daskadmm_benchmark_{script}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


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
