"""`import nanguard` and `import nanguard.cli` must not pull in any framework."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "lightning", "pytorch_lightning",
              "matplotlib")


@pytest.mark.parametrize("module", ["nanguard", "nanguard.cli"])
def test_core_imports_no_framework(module):
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, f"{module} imported {res.stdout.strip()} {res.stderr}"


def test_cli_help_runs_without_frameworks():
    code = (
        "import sys; from nanguard.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
