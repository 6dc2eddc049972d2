"""``mypy daskadmm`` passes (configured in pyproject.toml's ``[tool.mypy]``; mypy comes with the
``test`` extra). Skipped where mypy is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import ROOT

pytest.importorskip("mypy", reason="mypy is not installed: pip install -e '.[test]'")


@pytest.mark.slow
def test_mypy_passes():
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
