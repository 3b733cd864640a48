"""The Lightning callback with ``Trainer(accelerator="gpu")``: ``"16-mixed"``, ``"bf16-mixed"``
and the ladder on a CUDA GPU.

Skipped without a GPU (the CI machine has none). ``.ci/gpu-check`` runs this file on a GPU
machine; ``NANGUARD_CUDA_TESTS_ON_CPU=1`` runs the same tests with ``accelerator="cpu"`` to
check their own logic (there ``"16-mixed"`` has no GradScaler: Lightning makes one on CUDA
only, so the scaler test hands a CPU one in as a plugin).
"""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import nanguard  # noqa: E402
from nanguard.lightning import NanGuard  # noqa: E402
from tests.test_lightning_guard import (  # noqa: E402
    Classifier,
    SnapshotWatcher,
    assert_finite,
    make_data,
    trainer,
)

if torch.cuda.is_available():
    DEVICE: str | None = "cuda"
elif os.environ.get("NANGUARD_CUDA_TESTS_ON_CPU") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
pytestmark = [
    pytest.mark.lightning,
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (.ci/gpu-check runs it)"),
]


def on_device(tmp_path, guard, **kwargs):
    return trainer(tmp_path, guard, accelerator=ACCELERATOR, **kwargs)


class DeviceSeen(pl.Callback):
    """Where the module's parameters were while it trained."""

    def __init__(self):
        self.types: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.types |= {p.device.type for p in pl_module.parameters()}


def test_16_mixed_scaler_skips_are_the_scalers(tmp_path):
    # The case: with "16-mixed" on a GPU, the AMP scaler's own skipped steps are
    # counted as the scaler's, not as nanguard events. A scale far too large makes the
    # float16 backward overflow until the scaler has lowered it.
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**40, backoff_factor=2.0**-10)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    seen = DeviceSeen()
    t = on_device(tmp_path, guard, extra_callbacks=[seen],
                  plugins=[MixedPrecision("16-mixed", DEVICE, scaler=scaler)])
    t.fit(model, make_data(8))
    assert seen.types == {DEVICE}
    assert guard.amp_skips >= 1
    assert guard.events == [] and guard.dumps == []
    skipped = [r for r in guard.history if r.cause == "amp_scaler_skip"]
    assert len(skipped) == guard.amp_skips
    assert all(r.action is None and not math.isfinite(r.grad_norm) for r in skipped)
    assert any(math.isfinite(r.grad_norm) for r in guard.history)
    assert scaler.get_scale() < 2.0**40  # the scaler did its own work
    assert_finite(model)


def test_16_mixed_a_nan_batch_is_a_nanguard_skip(tmp_path):
    # precision="16-mixed" as users write it (Lightning's own GradScaler on a GPU): a NaN
    # batch makes the loss NaN, which is no scaler overflow but a nanguard event.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    on_device(tmp_path, guard, precision="16-mixed").fit(model, make_data(8, nan_batches=(3,)))
    assert [r.action for r in guard.history] == [None, None, None, "skip", None, None, None,
                                                 None]
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "input_nonfinite")
    dump = nanguard.load(guard.dumps[0])
    assert math.isnan(dump.tensors["inputs"][0, 1])
    assert_finite(model)


def test_bf16_mixed_a_nan_batch_is_skipped(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    on_device(tmp_path, guard, precision="bf16-mixed").fit(model, make_data(6, nan_batches=(2,)))
    assert [r.action for r in guard.history] == [None, None, "skip", None, None, None]
    assert guard.events[0].cause == "input_nonfinite"
    assert nanguard.load(guard.dumps[0]).tensors["output"].dtype.name == "float32"
    assert_finite(model)


def test_rollback_is_bit_for_bit_on_the_device(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=1, snapshot_every=2)
    watcher = SnapshotWatcher(guard)
    model = Classifier(lr=1e-2, sched=True)
    t = on_device(tmp_path, guard, extra_callbacks=[watcher])
    t.fit(model, make_data(10, nan_batches=(5, 6)))
    assert [r.action for r in guard.history][5:7] == ["skip", "rollback"]
    assert watcher.checked_rollbacks == 1
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-3)
    assert_finite(model)


def test_a_fault_on_every_step_aborts_out_of_fit(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=1, max_rollbacks=1)
    model = Classifier()
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        on_device(tmp_path, guard).fit(model, make_data(10, nan_batches=tuple(range(2, 10))))
    assert [r.action for r in guard.history] == [None, None, "skip", "rollback", "skip", "abort"]
    dump = nanguard.load(info.value.dump_path)
    assert (dump.event.step, dump.event.action) == (5, "abort")
    assert dump.state and all(v.dtype.kind == "f" for v in dump.state.values())
    assert_finite(model)
