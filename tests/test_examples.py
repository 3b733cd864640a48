"""The README's demo runs end to end: the unguarded run is lost, the guarded one survives."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--dump-dir", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "final loss nan" in out  # unguarded: lost
    assert "step 60: input_nonfinite -> skip" in out
    assert "step 120: logit_overflow -> skip" in out
    assert "cause   logit_overflow  at step 120" in out  # the inspect report
    assert out.rstrip().endswith("demo OK")
    assert len(list(tmp_path.glob("*.nanguard.zip"))) == 2
