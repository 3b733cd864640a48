"""nanguard.keras with an optimizer's gradient_accumulation_steps: one guard step is one
optimizer step. The scenarios live in ``_keras_accumulation.py``; they run here with the
TensorFlow backend (compiled, compiled with XLA, and eager) and with Keras's torch backend
in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

keras = pytest.importorskip("keras")

pytestmark = pytest.mark.keras

HERE = os.path.dirname(__file__)


def check(out, backend):
    healthy = out["healthy"]
    assert healthy["identical"]  # the guard changes nothing in a healthy run
    assert healthy["steps"] == list(range(8)) and healthy["step_count"] == 8  # 16 batches, k=2
    assert healthy["norm"] == pytest.approx(healthy["norm_expected"], rel=1e-4)
    assert healthy["loss"] == pytest.approx(healthy["loss_expected"], rel=1e-6)
    assert healthy["logged_on"] == list(range(1, 16, 2))  # the batch that ends each window
    for name, place in (("first", 0), ("last", 1)):
        bad = out[name]
        assert bad["events"] == [[2, "input_nonfinite", "skip"]], name
        assert bad["actions"] == [None, None, "skip", None]
        assert bad["window_unchanged"], name  # nothing of batches 4 and 5 reached the state
        assert bad["next_trains"]
        assert bad["iterations"] == list(range(1, 9))  # Keras's window count goes on
        assert bad["norm_finite"] == [True, True, False, True]
        assert bad["micro_batch"] == [place, 2]
        assert bad["message"].startswith(f"Step 2 (batch {place + 1} of the 2 it accumulates): ")
        assert bad["dump"] == [2, "input_nonfinite", [0, 1, 2], 1]
    label = out["label"]
    assert label["events"] == [[1, "target_invalid", "skip"]]
    assert label["window_unchanged"]
    assert "the first is 7" in label["message"]
    # the label check masks the loss: its micro-batch's own gradients are 0, finite
    assert label["norms"] == [0.0] * 5
    clip = out["clip"]
    assert clip["close"] and clip["moved"]
    assert all(n > 0.05 for n in clip["norms"])  # recorded before clipping
    ladder = out["ladder"]
    assert ladder["raised"]
    assert ladder["events"] == [[1, "input_nonfinite", "skip"], [2, "input_nonfinite", "rollback"],
                                [3, "input_nonfinite", "skip"], [5, "input_nonfinite", "skip"],
                                [6, "input_nonfinite", "abort"]]
    assert ladder["rolled_back_to_start"]
    assert ladder["iterations"][4:6] == [5, 0]  # the rollback restored the count too
    assert ladder["dumps"] == 5
    assert out["open_bad"] == {"events": [[2, "input_nonfinite", "skip"]], "steps": 3,
                               "iterations": 6, "zero": True}
    assert out["open_good"] == {"events": [], "steps": 2, "iterations": 5, "zero": False}
    lso = out["lso"]
    assert lso["identical"]
    assert lso["amp_skips"] >= 1 and lso["amp_in_history"] == 0
    # Every one of the 16 micro-batches is a scaler's skip or in a window (of which the
    # optimizer counted `iterations`, and the guard recorded the ended ones as steps).
    assert lso["amp_skips"] + lso["iterations"] == 16
    assert lso["steps"] == lso["iterations"] // 2
    assert lso["bad_events"] == [["input_nonfinite", "skip"]]
    skips, steps, iterations = lso["bad_counts"]
    assert lso["bad_skipped"] >= 1 and skips + iterations == 16 and steps == iterations // 2
    assert lso["finite"]
    overflow = out["overflow_clip"]
    assert overflow["identical"] and overflow["amp_skips"] >= 1 and overflow["events"] == []
    assert out["lazy"] == {"identical": True, "events": [[2, "input_nonfinite", "skip"]]}
    resumed = out["resumed"]
    # 5 batches of the first fit: the interrupted window's end moved to 6; then 8 more.
    assert resumed == {"marked": True, "events": [], "warned": True, "iterations": 14,
                       "finite": True}
    assert out["backup"] == {"events": [], "warned": True, "finite": True}
    spe = out["spe"]
    if backend == "torch":  # Keras's torch backend refuses steps_per_execution > 1
        assert spe is None
        return
    assert spe["events"] == [["input_nonfinite", "skip"]]
    assert spe["lr"] == [pytest.approx(0.1)] * len(spe["lr"])  # no rollback, no lowering
    assert spe["finite"]


@pytest.mark.parametrize("mode", ["compiled", "xla", "eager"])
def test_tensorflow_backend(tmp_path, mode):
    if keras.backend.backend() != "tensorflow":  # pragma: no cover - conftest sets it
        pytest.skip("the TensorFlow backend")
    sys.path.insert(0, HERE)
    try:
        import _keras_accumulation
    finally:
        sys.path.remove(HERE)
    check(_keras_accumulation.run(str(tmp_path), mode == "eager", xla=mode == "xla"),
          "tensorflow")


def test_torch_backend(tmp_path):
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_keras_accumulation.py"), str(tmp_path), "run"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    check(json.loads(lines[-1][len("RESULT "):]), "torch")
