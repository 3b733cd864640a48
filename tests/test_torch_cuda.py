"""The plain-PyTorch guard on a CUDA GPU: real models and faults, on the device.

Skipped without a GPU (the CI machine has none). ``.ci/gpu-check`` runs this file, the
Lightning one and the benchmarks on a GPU machine. ``NANGUARD_CUDA_TESTS_ON_CPU=1`` runs the
same tests on the CPU, to check their own logic where no GPU is at hand; the CUDA-only
ones (synchronisation counts) skip then.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nanguard  # noqa: E402
from nanguard.torch import NanGuard  # noqa: E402
from tests.test_torch_guard import (  # noqa: E402
    BlockLM,
    batches,
    mlp,
    naive_softmax_ce,
    run_blocks,
    same_bits,
    state_copy,
    weights_finite,
)


def _device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("NANGUARD_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    return None


DEVICE = _device()
ON_GPU = DEVICE is not None and DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.torch,
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (.ci/gpu-check runs it)"),
]
F = torch.nn.functional


def on_device(data):
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in data]


def run(guard, model, opt, data, loss_fn=F.cross_entropy, before_step=None):
    for i, (x, y) in enumerate(data):
        if before_step is not None:
            before_step(i)
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(loss_fn(model(x), y))
            opt.step()


def test_a_nan_batch_is_skipped_and_dumped_from_the_device(tmp_path):
    model = mlp().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = on_device(batches(10))
    data[4][0][3, 1] = math.nan
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data)
    assert [r.action for r in guard.history] == [None] * 4 + ["skip"] + [None] * 5
    (event,) = guard.events
    assert (event.step, event.cause) == (4, "input_nonfinite")
    assert all(math.isfinite(r.grad_norm) for i, r in enumerate(guard.history) if i != 4)
    assert weights_finite(model)
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    dump = nanguard.load(guard.dumps[0])
    assert np.isnan(dump.tensors["inputs"][3, 1])
    assert dump.tensors["output"].shape == (16, 4)
    assert dump.meta["environment"]["torch"] == torch.__version__


def test_the_global_norm_is_torchs_for_many_tensors(tmp_path):
    # Over 8 tensors: the fused per-tensor norm (torch._foreach_norm on a GPU).
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.ReLU()]
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), *layers, torch.nn.Linear(32, 4)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    expected = []
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for x, y in on_device(batches(5)):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                grads = [p.grad for p in model.parameters()]
                expected.append(float(torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
                opt.step()
    assert len(list(model.parameters())) > 8
    assert [r.grad_norm for r in guard.history] == pytest.approx(expected, rel=1e-5)


def test_a_good_step_reads_from_the_device_once(tmp_path):
    # STYLE's hot-path rule, counted by CUDA's own synchronisation check: the guard adds
    # at most one device-to-host transfer per good step (its stats' .tolist()).
    if not ON_GPU:
        pytest.skip("counts CUDA synchronisations")
    torch.manual_seed(0)
    guarded = mlp(n_in=64, n_out=10).to(DEVICE)
    plain = mlp(n_in=64, n_out=10).to(DEVICE)
    g_opt = torch.optim.Adam(guarded.parameters(), lr=1e-3)
    p_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    data = on_device(batches(24, n_in=64, n_out=10))
    guard = NanGuard(guarded, g_opt, snapshot_every=10**6, dump_dir=str(tmp_path))

    def guarded_step(x, y):
        g_opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(F.cross_entropy(guarded(x), y))
            g_opt.step()

    def plain_step(x, y):
        p_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        p_opt.step()

    def syncs(step, pairs):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for x, y in pairs:
                    step(x, y)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    for x, y in data[:4]:  # warm-up: the first snapshot, lazily built state
        guarded_step(x, y)
        plain_step(x, y)
    counted = data[4:]
    extra = syncs(guarded_step, counted) - syncs(plain_step, counted)
    guard.close()
    assert guard.events == []
    assert 1 <= extra <= len(counted)


def test_corrupted_weights_roll_back_bit_for_bit_on_the_device(tmp_path):
    model = mlp().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    saved = {}

    def corrupt(i):
        if i == 4:  # the step-4 snapshot is taken next
            saved["model"] = state_copy(model)
            saved["adam"] = {n: {k: v.clone() for k, v in opt.state[p].items()}
                             for n, p in model.named_parameters()}
        if i == 6:
            with torch.no_grad():
                model[2].weight[0, 0] = math.inf

    with NanGuard(model, opt, snapshot_every=4, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, on_device(batches(7)), before_step=corrupt)
    (event,) = guard.events
    assert (event.step, event.cause, event.where, event.action) == (
        6, "weights_nonfinite", "2.weight", "rollback")
    assert same_bits(saved["model"], state_copy(model))
    for n, p in model.named_parameters():
        assert p.device.type == DEVICE.type
        for k, v in saved["adam"][n].items():
            assert torch.equal(opt.state[p][k], v), (n, k)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert np.isinf(nanguard.load(guard.dumps[0]).tensors["localized.2.weight"][0, 0])


def test_a_fault_on_every_step_aborts_with_the_state_in_the_dump(tmp_path):
    model = mlp().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = on_device(batches(12))
    for x, _ in data:
        x[0, 0] = math.nan
    before = state_copy(model)
    guard = NanGuard(model, opt, max_skips=1, max_rollbacks=1, dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        run(guard, model, opt, data)
    guard.close()
    assert [r.action for r in guard.history] == ["skip", "rollback", "skip", "abort"]
    dump = nanguard.load(info.value.dump_path)
    assert (dump.event.step, dump.event.cause) == (3, "input_nonfinite")
    assert np.array_equal(dump.state["model.0.weight"], before["0.weight"].cpu().numpy())
    assert same_bits(before, state_copy(model))


class Exp(torch.nn.Module):
    """A hidden layer that overflows for large inputs: exp(88.8) is Inf in float32."""

    def forward(self, x):
        return torch.exp(x)


def test_a_replay_with_dropout_names_the_layer(tmp_path):
    # The replay re-runs the step's forward with the step's (CUDA) RNG state, so the
    # dropout mask is the same and the first non-finite layer is found again.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Dropout(0.2), Exp(), torch.nn.Linear(32, 4)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = on_device(batches(6))
    data[3] = (data[3][0] * 1e3, data[3][1])
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "activation_nonfinite", "2")
    assert weights_finite(model)


def test_a_naive_softmax_overflow_is_logit_overflow(tmp_path):
    model = mlp().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = on_device(batches(6))
    data[3] = (data[3][0] * 1e3, data[3][1])
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, loss_fn=naive_softmax_ce)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "logit_overflow", "output")
    assert weights_finite(model)


def test_grad_scaler_skips_are_the_scalers_and_a_nan_batch_is_an_event(tmp_path):
    model = mlp().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**40, backoff_factor=2.0**-10)
    data = on_device(batches(12))
    data[9][0][0, 0] = math.nan
    before = state_copy(model)
    with NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path)) as guard:
        for x, y in data:
            opt.zero_grad()
            with guard.step(x, targets=y):
                with torch.autocast(DEVICE.type, dtype=torch.float16):
                    loss = F.cross_entropy(model(x), y)
                guard.backward(loss)
                scaler.step(opt)
                scaler.update()
    skipped = [r for r in guard.history if r.cause == "amp_scaler_skip"]
    assert guard.amp_skips == len(skipped) >= 1
    assert all(r.action is None and math.isfinite(r.loss) for r in skipped)
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (9, "input_nonfinite", "skip")
    assert weights_finite(model)
    assert not same_bits(before, state_copy(model))


def test_a_language_models_view_targets_train_on(tmp_path):
    # On a GPU the class ids are defused on every step, without looking (an in-place write
    # that changes nothing when they are valid). The targets here share storage with the
    # inputs the embedding saved for backward: that write must not break the backward.
    model = BlockLM().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 20, (4, 9), generator=g).to(DEVICE) for _ in range(6)]
    blocks[4][0, -1] = 25
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run_blocks(guard, model, opt, blocks)
    assert [r.action for r in guard.history] == [None] * 4 + ["skip", None]
    assert [(e.step, e.cause) for e in guard.events] == [(4, "target_invalid")]
    assert int(blocks[4][0, -1]) == 25
    assert weights_finite(model)


LABELS_SCRIPT = textwrap.dedent("""
    import json, math, sys, tempfile
    import torch
    from nanguard.torch import NanGuard
    from tests.test_torch_guard import batches, mlp

    device = torch.device(sys.argv[1])
    model = mlp().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [(x.to(device), y.to(device)) for x, y in batches(6)]
    data[0][1][2] = 4  # 4 classes: ids 0-3. The first step: no output gradient seen yet
    data[3][1][5] = -3
    with NanGuard(model, opt, dump_dir=tempfile.mkdtemp()) as guard:
        for x, y in data:
            opt.zero_grad()
            with guard.step(x, targets=y):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                guard.backward(loss)
                opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # a device-side assert would surface here
    print(json.dumps({
        "events": [[e.step, e.cause, e.action] for e in guard.events],
        "given_back": [int(data[0][1][2]), int(data[3][1][5])],
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "messages": [e.message for e in guard.events],
    }))
""")


def test_out_of_range_class_ids_are_caught_before_the_device_asserts(tmp_path):
    # On CUDA an out-of-range id is a device-side assert inside cross_entropy, which ruins
    # the process's CUDA context: the guard must defuse the ids before the loss reads them.
    # In a subprocess, so that a failure here cannot break the other tests' context.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", LABELS_SCRIPT, DEVICE.type], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["events"] == [[0, "target_invalid", "skip"], [3, "target_invalid", "skip"]]
    assert found["given_back"] == [4, -3]  # the loader's tensors hold their ids again
    assert found["finite"]
    assert "4" in found["messages"][0] and "-3" in found["messages"][1]
