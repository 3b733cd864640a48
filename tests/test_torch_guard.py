"""The plain-PyTorch guard on real small models with real faults."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nanguard  # noqa: E402
from nanguard.cli import main as cli_main  # noqa: E402
from nanguard.torch import NanGuard  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional


def mlp(n_in=8, n_out=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, n_out))


def batches(n, seed=1, n_in=8, n_out=4, size=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, n_in, generator=g), torch.randint(0, n_out, (size,), generator=g))
            for _ in range(n)]


def run(guard, model, opt, data, loss_fn=F.cross_entropy, before_step=None):
    for i, (x, y) in enumerate(data):
        if before_step is not None:
            before_step(i)
        opt.zero_grad()
        with guard.step(x, targets=y):
            loss = loss_fn(model(x), y)
            guard.backward(loss)
            opt.step()


def weights_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def naive_softmax_ce(logits, y):
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def test_nan_batch_is_skipped_and_dumped(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(12)
    data[5][0][3, 1] = float("nan")
    seen = {}

    def watch(i):
        if i == 5:
            seen["before"] = state_copy(model)
            seen["adam_steps"] = [opt.state[p]["step"].item() for p in model.parameters()]
        if i == 6:
            seen["after"] = state_copy(model)

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, before_step=watch)
        history = guard.history
    assert weights_finite(model)
    assert same_bits(seen["before"], seen["after"])  # the bad update never reached the weights
    assert [opt.state[p]["step"].item() for p in model.parameters()] == [
        s + 6 for s in seen["adam_steps"]]  # Adam's step count skipped step 5 only
    assert [r.step for r in history] == list(range(12))
    assert [r.action for r in history].count("skip") == 1 and history[5]["action"] == "skip"
    assert math.isnan(history[5].loss) and math.isfinite(history[4].grad_norm)
    assert all(math.isfinite(r.logits_min) and r.logits_min <= r.logits_max
               for r in history if r.step != 5)
    (dump_path,) = guard.dumps
    dump = nanguard.load(dump_path)
    assert (dump.event.step, dump.event.cause, dump.event.where) == (5, "input_nonfinite", "inputs")
    assert "1 NaN" in dump.event.message
    assert dump.history[-1].step == 5 and len(dump.history) == 6
    assert torch.equal(torch.from_numpy(dump.tensors["inputs"]).isnan(), data[5][0].isnan())
    assert dump.tensors["targets"].tolist() == data[5][1].tolist()
    assert dump.tensors["output"].shape == (16, 4)
    assert dump.state == {}  # dump_state="abort": only aborts carry the model
    assert dump.meta["environment"]["torch"] == torch.__version__
    assert dump.meta["ignore_index"] == guard.ignore_index == -100


@pytest.mark.parametrize("give_batch", [True, False])
def test_nan_made_inside_the_step_before_the_model_is_input_nonfinite(tmp_path, give_batch):
    # Per-batch standardisation in the loop: a constant column has std 0, and 0/0 is NaN in
    # what the model is called with, while the batch the guard was given is finite.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[4][0][:, 3] = 1.0
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for x, y in data:
            opt.zero_grad()
            with guard.step(x if give_batch else None, targets=y if give_batch else None):
                xn = (x - x.mean(0)) / x.std(0)
                guard.backward(F.cross_entropy(model(xn), y))
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (4, "input_nonfinite", "replay.args.0")
    assert "16 NaN" in event.message and "in the model's arguments" in event.message
    origin = "the batch given to the guard is finite" if give_batch else "no batch was given"
    assert origin in event.message
    dump = nanguard.load(guard.dumps[0])
    assert np.isnan(dump.tensors["replay.args.0"][:, 3]).all()  # the tensor it names
    assert weights_finite(model)


def test_nan_in_what_the_guard_took_as_targets_is_not_blamed_on_the_step(tmp_path):
    # The model is called (on its second call of the step) with data given to the guard as
    # "targets": the message must not claim the batch is finite, nor call the second call of
    # a step without gradient accumulation a micro-batch.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4)
    extra = [torch.randn(16, 8) for _ in data]
    extra[2][0, 1] = math.nan
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for (x, y), x2 in zip(data, extra, strict=True):
            opt.zero_grad()
            with guard.step(x, targets=(y, x2)):
                loss = F.cross_entropy(model(x), y) + model(x2).pow(2).mean()
                guard.backward(loss)
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "input_nonfinite")
    assert "model call 1" in event.message and "micro-batch" not in event.message
    assert "the batch given to the guard is finite" not in event.message
    assert "its targets are not" in event.message


def test_nan_made_inside_a_later_micro_batch_is_the_dumped_one(tmp_path):
    # Two micro-batches per step; the in-step standardisation of the second one of step 1
    # divides by a zero std: the event names the argument, and the dump holds that call's.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[3][0][:, 3] = 1.0
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(data):
            with guard.step(x, targets=y):
                xn = (x - x.mean(0)) / x.std(0)
                guard.backward(F.cross_entropy(model(xn), y) / 2)
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (1, "input_nonfinite", "replay.args.0")
    assert "model call 1 (micro-batch 1)" in event.message
    dump = nanguard.load(guard.dumps[0])
    assert np.isnan(dump.tensors["replay.args.0"][:, 3]).all()
    assert not np.isnan(dump.tensors["inputs.1"]).any()  # the batch as the loader gave it


@pytest.mark.parametrize("frozen", [False, True])
def test_weights_non_finite_from_the_start_abort_at_once(tmp_path, frozen):
    # Fine-tuning from a checkpoint holding a NaN: there is no finite snapshot to roll back
    # to, so the guard aborts at the first step instead of pretending to roll back. Also
    # when the NaN is in a frozen layer (requires_grad=False, not in the optimizer).
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    model[0].requires_grad_(not frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as err:
        run(guard, model, opt, batches(3))
    event = err.value.event
    assert (event.step, event.cause, event.where) == (0, "weights_nonfinite", "0.weight")
    assert "no finite snapshot to roll back to" in event.message
    assert opt.param_groups[0]["lr"] == 0.1 and guard.snapshot_step is None
    guard.close()


def test_naive_softmax_overflow_is_logit_overflow(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(6)
    data[3] = (data[3][0] * 1e3, data[3][1])  # an unscaled batch: logits in the hundreds
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, data, loss_fn=naive_softmax_ce)
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "logit_overflow", "output")
    assert guard.history[3].logits_max > 88.7 and math.isfinite(guard.history[3].logits_max)
    assert "cross_entropy" in event.message
    assert weights_finite(model)


def test_loss_dividing_by_zero_is_loss_nonfinite(tmp_path):
    model = mlp(n_out=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.rand(16, 1, generator=g)) for _ in range(6)]
    data[2][1].zero_()  # a batch whose targets sum to zero

    def relative_error(pred, y):
        return ((pred - y) ** 2).sum() / y.sum()

    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, data, loss_fn=relative_error)
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "loss_nonfinite")
    assert "epsilon" in event.message
    assert nanguard.load(guard.dumps[0]).event.cause == "loss_nonfinite"


def test_corrupted_weights_roll_back_bit_for_bit(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    snaps = {}

    seen = {}

    def corrupt(i):
        if i == 3:
            seen["after 3 steps"] = state_copy(model)
        if i == 4:
            snaps["model"] = state_copy(model)
            snaps["adam"] = {n: {k: v.clone() for k, v in opt.state[p].items()}
                             for n, p in model.named_parameters()}
        if i == 6:
            with torch.no_grad():
                model[2].weight[0, 0] = float("inf")

    guard = NanGuard(model, opt, snapshot_every=4, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(7), before_step=corrupt)
    assert guard.snapshot_step == 4
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (6, "weights_nonfinite", "2.weight")
    assert event.action == "rollback"  # skipping cannot help: at once, no skips first
    assert same_bits(snaps["model"], state_copy(model))
    for n, p in model.named_parameters():
        for k, v in snaps["adam"][n].items():
            assert torch.equal(opt.state[p][k], v), (n, k)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # lower_lr: 1e-2 * 0.5
    # The dump holds the tensor the event names, as it was (the contract: "the non-finite
    # tensor when localized"), without dump_state asking for the whole state.
    dump = nanguard.load(guard.dumps[0])
    weight = dump.tensors["localized.2.weight"]
    assert weight.shape == tuple(model[2].weight.shape) and np.isinf(weight[0, 0])
    assert np.isfinite(np.delete(weight.reshape(-1), 0)).all()
    assert dump.state == {}
    guard.close()


def test_fault_on_every_step_ends_in_abort_with_full_dump(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(30)
    for x, _ in data:
        x[0, 0] = float("nan")
    guard = NanGuard(model, opt, max_skips=2, max_rollbacks=2, dump_dir=str(tmp_path))
    before = state_copy(model)
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        run(guard, model, opt, data)
    err = info.value
    actions = [r.action for r in guard.history]
    assert actions == ["skip", "skip", "rollback"] * 2 + ["skip", "skip", "abort"]
    assert err.event.step == 8 and err.event.cause == "input_nonfinite"
    assert err.event.action == "abort"
    dump = nanguard.load(err.dump_path)
    assert dump.event.action == "abort"
    assert set(dump.state) >= {"model.0.weight", "model.2.bias"}
    assert (dump.state["model.0.weight"] == before["0.weight"].numpy()).all()
    assert same_bits(before, state_copy(model))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * 0.5)
    assert len(list(tmp_path.iterdir())) == 9  # every event writes a dump
    guard.close()


def test_too_high_learning_rate_is_survived_by_lowering_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=g)
    data = []
    for _ in range(120):
        x = torch.randn(32, 8, generator=g) * 3
        data.append((x, x @ w))
    guard = NanGuard(model, opt, max_skips=1, max_rollbacks=20, snapshot_every=5,
                     dump_dir=str(tmp_path))
    run(guard, model, opt, data, loss_fn=F.mse_loss)
    guard.close()
    assert weights_finite(model)
    causes = {e.cause for e in guard.events}
    assert guard.events and causes <= {"logit_overflow", "loss_nonfinite", "logits_nonfinite",
                                       "grad_explosion", "update_nonfinite"}
    rollbacks = sum(r.action == "rollback" for r in guard.history)
    assert rollbacks >= 1
    assert opt.param_groups[0]["lr"] == pytest.approx(3.0 * 0.5**rollbacks)
    last = guard.history[-10:]
    assert all(r.action is None and math.isfinite(r.loss) for r in last)
    assert any("learning rate" in e.message for e in guard.events)


def test_update_that_overflows_is_caught_and_rolled_back(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    snap = {}

    def boost(i):
        if i == 3:
            snap["model"] = state_copy(model)
        if i == 4:
            opt.param_groups[0]["lr"] = 3e38  # finite gradients, an update past float32 range
        if i == 5:
            opt.param_groups[0]["lr"] = 1e-2

    def big_loss(logits, y):
        return F.cross_entropy(logits, y) * 100.0

    guard = NanGuard(model, opt, snapshot_every=3, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(7), loss_fn=big_loss, before_step=boost)
    guard.close()
    event = guard.events[0]
    assert (event.step, event.cause) == (4, "update_nonfinite")
    assert "it was 3e+38" in event.message  # step 4's LR, not the reset one of step 5
    assert event.where is not None and event.where.endswith(("weight", "bias"))
    # On the CPU found at step 4's own end (on a GPU, with step 5's numbers): step 4's
    # row takes the rollback, and step 5 trains from the restored weights.
    assert guard.history[4].action == "rollback" and guard.history[5].action is None
    assert math.isfinite(guard.history[4].grad_norm)
    assert weights_finite(model)
    assert guard.history[6].action is None
    # The dump is step 4's: its batch, no output (step 4's was finite and is not kept),
    # history up to step 4; the event says when it was found.
    dump = nanguard.load(guard.dumps[0])
    x4, y4 = batches(7)[4]
    # ... and the weight it names, non-finite as the update left it.
    assert sorted(dump.tensors) == ["inputs", f"localized.{event.where}", "targets"]
    assert not np.isfinite(dump.tensors[f"localized.{event.where}"]).all()
    assert np.array_equal(dump.tensors["inputs"], x4.numpy())
    assert np.array_equal(dump.tensors["targets"], y4.numpy())
    assert [h.step for h in dump.history][-1] == 4
    assert dump.event.details["detected_at_step"] == 4


def test_a_weight_average_updated_after_check_last_update_stays_finite(tmp_path):
    # docs/torch.md: an AveragedModel updated right after optimizer.step() would take in
    # an overflowed update the guard reads only at the next step; check_last_update()
    # first rolls the model back, so the average takes finite weights.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    average = torch.optim.swa_utils.AveragedModel(model)
    with NanGuard(model, opt, snapshot_every=3, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(batches(7)):
            opt.param_groups[0]["lr"] = 3e38 if i == 4 else 1e-2
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) * 100.0)
                opt.step()
            guard.check_last_update()
            average.update_parameters(model)
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (4, "update_nonfinite", "rollback")]
    assert weights_finite(model)
    assert weights_finite(average)


def test_code_after_an_overflowed_update_sees_finite_weights(tmp_path):
    # On the CPU the check is read in optimizer.step()'s own post-hook: the rest of the
    # step, an exception it raises and the loop's handler of it, see the restored weights
    # (the handler saw Inf weights and the event came a step late when the check waited for
    # the context's normal exit).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(batches(6)):
            opt.param_groups[0]["lr"] = 3e38 if i == 3 else 1e-2
            opt.zero_grad()
            try:
                with guard.step(x, targets=y):
                    guard.backward(F.cross_entropy(model(x), y) * 100.0)
                    opt.step()
                    seen.append(weights_finite(model))  # right after the update
                    if i == 3:
                        raise KeyError("the loop's own bug, after the update")
            except KeyError:
                seen.append(weights_finite(model))
    assert all(seen) and len(seen) == 7
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (3, "update_nonfinite", "rollback")
    assert event.details["detected_at_step"] == 3


def test_an_abort_inside_scaler_step_leaves_the_scaler_usable(tmp_path):
    # The abort for an overflowed update is raised from optimizer.step()'s post-hook, inside
    # scaler.step(): scaler.update() never ran, and the scaler kept the optimizer marked as
    # unscaled, so a retry with a new guard applied still-scaled gradients (1024x here).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def one(guard):
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(F.cross_entropy(model(x), y))
            scaler.step(opt)
            scaler.update()

    guard = NanGuard(model, opt, scaler=scaler, actions=("abort",), dump_dir=str(tmp_path))
    one(guard)
    opt.param_groups[0]["lr"] = math.inf
    with pytest.raises(nanguard.NonFiniteTrainingError):
        one(guard)
    opt.param_groups[0]["lr"] = 0.01
    assert weights_finite(model)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.01 * p.grad
    one(NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path / "retry")))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_an_update_check_read_in_its_own_step_keeps_a_batch_refilled_in_place(tmp_path):
    # A loop that copies each batch into one static buffer. On the CPU the update check of
    # step 4 is read as step 4's context ends, before the buffer is refilled: the dump holds
    # step 4's batch. (Read at step 5, as on a GPU, the buffer would hold step 5's data, and
    # the dump leaves it out rather than pass it off as step 4's.)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    bx, by = torch.zeros(16, 8), torch.zeros(16, dtype=torch.long)
    for i, (x, y) in enumerate(batches(7)):
        opt.param_groups[0]["lr"] = 3e38 if i == 4 else 1e-2
        bx.copy_(x)
        by.copy_(y)
        opt.zero_grad()
        with guard.step(bx, targets=by):
            guard.backward(F.cross_entropy(model(bx), by) * 100.0)
            opt.step()
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause) == (4, "update_nonfinite")
    tensors = nanguard.load(guard.dumps[0]).tensors
    np.testing.assert_array_equal(tensors["inputs"], batches(7)[4][0].numpy())
    assert f"localized.{event.where}" in tensors


@pytest.mark.parametrize("how", ["close", "check_last_update", "context"])
def test_the_last_update_is_checked_before_the_model_is_used(tmp_path, how):
    # The update of the loop's last step has no next step to be read with.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(4)

    def boost(i):
        if i == 3:
            opt.param_groups[0]["lr"] = 3e38  # the last step's update leaves float32 range

    def big_loss(logits, y):
        return F.cross_entropy(logits, y) * 100.0

    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    before_first = state_copy(model)
    if how == "context":
        with guard:
            run(guard, model, opt, data, loss_fn=big_loss, before_step=boost)
    else:
        run(guard, model, opt, data, loss_fn=big_loss, before_step=boost)
        getattr(guard, how)()
    assert weights_finite(model)
    assert same_bits(state_copy(model), before_first)  # rolled back to the step-0 snapshot
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (3, "update_nonfinite", "rollback")
    assert "it was 3e+38" in event.message  # the LR of the step that overflowed
    assert [r.action for r in guard.history] == [None, None, None, "rollback"]
    dump = nanguard.load(guard.dumps[0])
    assert dump.event.step == 3
    assert np.array_equal(dump.tensors["inputs"], data[3][0].numpy())  # the last step's batch
    guard.close()


def test_invalid_labels_are_caught_even_when_the_loss_raises(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(5)
    data[2][1][7] = 9  # only 4 classes
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, data)  # cross_entropy raises on the CPU: the guard turns it into a skip
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "target_invalid", "targets")
    assert "outside [0, 4)" in event.message and "9" in event.message
    assert [r.action for r in guard.history] == [None, None, "skip", None, None]


def test_unrelated_exceptions_propagate(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    x, y = batches(1)[0]
    with pytest.raises(ZeroDivisionError), guard.step(x, targets=y):
        model(x)
        raise ZeroDivisionError
    assert guard.events == []


def sqrt_at_zero_run(tmp_path):
    class SafeLooking(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x * 0.0) + x  # forward is fine, backward of sqrt at 0 is inf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), SafeLooking(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(2))
    guard.close()
    assert guard.events[0].cause == "grad_nonfinite"
    assert math.isfinite(guard.history[0].loss) and not math.isfinite(guard.history[0].grad_norm)
    return guard


def test_sqrt_at_zero_backward_is_grad_nonfinite(tmp_path):
    guard = sqrt_at_zero_run(tmp_path)
    assert guard.events[0].where == "1"  # the backward replay names the module
    # NaN gradients (no Inf anywhere) make a NaN norm, as torch's own; an Inf means overflow.
    assert math.isnan(guard.history[guard.events[0].step].grad_norm)
    assert "replay.output_grad.0" in nanguard.load(guard.dumps[0]).tensors


def test_output_gradient_past_the_budget_is_not_kept(tmp_path, monkeypatch):
    # A language model's logits gradient can be gigabytes: past the budget it is not held
    # to the end of the step, and the backward is not replayed (said in the dump).
    import nanguard._torch_replay as replay

    monkeypatch.setattr(replay, "OUTPUT_GRAD_BUDGET", 16 * 4 * 4 - 1)  # under one 16x4 output
    guard = sqrt_at_zero_run(tmp_path)
    assert guard.events[0].where == "0"  # from the gradient norms only: the first bad parameter
    dump = nanguard.load(guard.dumps[0])
    assert "replay.output_grad.0" not in dump.tensors
    assert any("MiB" in note for note in dump.event.details["replay"]["notes"])


def test_growing_gradients_then_overflow_is_grad_explosion(tmp_path):
    class Recurrence(torch.autograd.Function):
        """A backward whose gain grows 100x per step, as in an unstable recurrent net."""

        gain = [1.0]

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * Recurrence.gain[0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.out(Recurrence.apply(self.inp(x)))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)

    def grow(i):
        Recurrence.gain[0] = 100.0**i

    guard = NanGuard(model, opt, dump_dir=str(tmp_path), max_skips=100)
    run(guard, model, opt, batches(25), before_step=grow)
    guard.close()
    first = guard.events[0]
    assert first.cause == "grad_explosion"
    assert math.isfinite(guard.history[first.step].loss)
    assert "clip_grad_norm" in first.message
    layer = guard.history[first.step - 1].layer_grad_norms
    assert layer is not None and len(layer) == 4


def test_clip_grad_norm_clips_good_steps(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    norms_after = []
    opt.register_step_post_hook(lambda o, a, k: norms_after.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    guard = NanGuard(model, opt, clip_grad_norm=0.01, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(3))
    guard.close()
    assert all(r.grad_norm > 0.01 for r in guard.history)  # recorded before clipping
    assert all(n <= 0.01 * 1.001 for n in norms_after)


@pytest.mark.parametrize(("user", "ours"), [(0.05, 1.0), (1.0, 0.05)])
@pytest.mark.parametrize("how", ["plain", "grad scaler"])
def test_clip_grad_norm_on_top_of_the_loops_own_clipping(tmp_path, user, ours, how):
    # The loop clips after guard.backward; the guard's clip must scale by the norm the
    # optimizer will read, not by the one recorded before the loop's clip (that applied
    # user * ours / norm: ~0.008 here instead of 0.05). The tighter clip wins.
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) if how == "grad scaler"
              else None)
    applied = []
    with NanGuard(model, opt, scaler=scaler, clip_grad_norm=ours,
                  dump_dir=str(tmp_path)) as guard:
        # registered after the guard's own hook: sees the gradients the update uses
        opt.register_step_pre_hook(lambda o, a, k: applied.append(float(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))))
        for x, y in batches(4):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x) * 10, y))
                if scaler is not None:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), user)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
    assert all(r.grad_norm > 1.0 for r in guard.history)  # recorded before either clip
    assert applied == pytest.approx([0.05] * 4, rel=1e-4)


def test_clip_after_the_loop_changed_large_gradients_is_not_a_float32_overflow(tmp_path):
    # Per-tensor norms of ~1e19 (finite in float32), a global norm of 2.4e19: its float32
    # sum of squares overflows. The re-read after the loop touched the gradients made the
    # clip factor 0 (a zero update) where the recorded float64 norm was finite.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    applied = []
    with NanGuard(model, opt, clip_grad_norm=1.0, dump_dir=str(tmp_path)) as guard:
        opt.register_step_pre_hook(lambda o, a, k: applied.append(float(torch.sqrt(sum(
            p.grad.double().pow(2).sum() for p in model.parameters())))))
        for _ in range(2):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) * 2e19)
                for p in model.parameters():
                    p.grad.mul_(1.0)  # the loop touches them: the guard reads them again
                opt.step()
    assert all(1e19 < r.grad_norm < 1e20 and r.action is None for r in guard.history)
    assert applied == pytest.approx([1.0, 1.0], rel=1e-4)


SCHEDULERS = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=40),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1000, gamma=0.1),
    # warmup, then cosine from its base LR at the milestone (after the rollback)
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)], milestones=[5]),
    "chained": lambda o: torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=5),
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95)]),
    # anneals toward the group's "swa_lr", not from a base LR
    "swalr": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.05, anneal_epochs=3),
    # anneals toward its eta_min floor: that floor is lowered too
    "cosine_floor": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10,
                                                                         eta_min=0.05),
}

@pytest.mark.parametrize("how", ["plain", "accumulation", "grad scaler"])
def test_the_recorded_norm_is_the_one_before_the_loops_own_clipping(tmp_path, how):
    # nanoGPT's loop clips the gradients itself between the backward and optimizer.step().
    # The contract's grad_norm is the norm before clipping: the one clip_grad_norm_ returns,
    # not ~max_norm on every step (which hid growth from grad_explosion and the snapshots).
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) if how == "grad scaler"
              else None)
    data = batches(12)
    for i in (6, 7, 8):  # growing inputs: the true norm climbs
        data[i] = (data[i][0] * 10.0 ** (i - 5), data[i][1])
    micro = 2 if how == "accumulation" else 1
    returned = []
    with NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path)) as guard:
        for i in range(0, len(data), micro):
            opt.zero_grad()
            for x, y in data[i:i + micro]:
                with guard.step(x, targets=y):
                    guard.backward(F.cross_entropy(model(x), y) / micro)
                    if x is data[i + micro - 1][0]:
                        if scaler is not None:
                            scaler.unscale_(opt)
                        returned.append(float(torch.nn.utils.clip_grad_norm_(
                            model.parameters(), max_norm=1.0)))
                        if scaler is not None:
                            scaler.step(opt)
                            scaler.update()
                        else:
                            opt.step()
    norms = [r.grad_norm for r in guard.history]
    assert norms == pytest.approx(returned, rel=1e-5)
    assert max(norms) > 10.0  # the climb is seen, not flattened to max_norm
    assert guard._engine.measure_at_backward is True


def test_without_changes_between_backward_and_step_the_norm_is_read_at_the_step(tmp_path):
    # The usual loop: nothing touches the gradients after guard.backward; after the first
    # step shows that, they are reduced once per step at optimizer.step() (with gradient
    # accumulation, not once per micro-batch).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(4))
    assert guard._engine.measure_at_backward is False
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in guard.history)


def test_gradients_made_non_finite_after_the_backward_are_rolled_back(tmp_path):
    # The price of measuring before the loop's own changes: NaN that the loop itself writes
    # into the gradients after guard.backward (a normalisation by a zero norm) reaches the
    # weights and is found with the next step's numbers, as an overflowed update: rolled back.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NanGuard(model, opt, snapshot_every=2, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(batches(8)):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                if i == 5:
                    model[0].weight.grad.div_(0.0)
                opt.step()
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (5, "update_nonfinite", "rollback")]
    assert weights_finite(model)



@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_lowered_lr_survives_schedulers(tmp_path, scheduler):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = SCHEDULERS[scheduler](opt)
    guard = NanGuard(model, opt, max_skips=0, dump_dir=str(tmp_path))
    data = batches(12)
    data[3][0][0, 0] = float("nan")
    lrs = []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(F.cross_entropy(model(x), y))
            opt.step()
        if i == 2:
            before = [g["lr"] for g in opt.param_groups]
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    guard.close()
    assert guard.history[3].action == "rollback"
    reference = torch.optim.SGD(mlp().parameters(), lr=0.1)
    ref_sched = SCHEDULERS[scheduler](reference)
    ref_lrs = []
    for _ in data:
        reference.step()
        ref_sched.step()
        ref_lrs.append(reference.param_groups[0]["lr"])
    assert before[0] > 0
    for got, ref in zip(lrs[3:], ref_lrs[3:], strict=True):
        assert got == pytest.approx(ref * 0.5)  # the schedule goes on, at half the rate (once)


def test_outputs_of_other_kinds_and_logits_module(tmp_path):
    class TupleNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"logits": self.head(h), "hidden": h}

    torch.manual_seed(0)
    model = TupleNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = batches(1)[0]
    for logits_module in (None, "head", "body"):
        guard = NanGuard(model, opt, logits_module=logits_module, dump_dir=str(tmp_path))
        opt.zero_grad()
        with guard.step(x, targets=y):
            out = model(x)
            guard.backward(F.cross_entropy(out["logits"], y))
            opt.step()
        guard.close()
        with torch.no_grad():
            ref = model.body(x) if logits_module == "body" else None
        rec = guard.history[0]
        if logits_module == "body":
            assert rec.logits_min == pytest.approx(ref.min().item(), abs=1e-1)
        assert math.isfinite(rec.logits_min) and rec.logits_min < rec.logits_max
    with pytest.raises(ValueError, match="logits_module"):
        NanGuard(model, opt, logits_module="nope")
    # A dict output's "logits" is the output even when the loss comes first.
    from nanguard._torch_engine import first_float_tensor

    logits = torch.randn(2, 3)
    assert first_float_tensor({"loss": torch.tensor(1.0), "logits": logits}) is logits
    assert first_float_tensor({"hidden": logits, "ids": torch.ones(2)}) is logits


def test_bad_set_up_fails_loudly(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="no parameters"):
        NanGuard(torch.nn.ReLU(), opt)
    other = torch.optim.SGD(mlp(seed=3).parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="optimizer holds none"):
        NanGuard(model, other)
    with pytest.raises(ValueError, match="max_skips"):
        NanGuard(model, opt, max_skips=-1)
    with pytest.raises(ValueError, match="'jump'"):
        NanGuard(model, opt, actions=("skip", "jump"))
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="outside"):
        guard.backward(loss)
    loss.backward()
    with pytest.raises(RuntimeError, match="outside"):
        opt.step()
    with pytest.raises(RuntimeError, match="before guard.backward"), guard.step(x, targets=y):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    guard.close()

    lbfgs = torch.optim.LBFGS(model.parameters())
    guard = NanGuard(model, lbfgs, dump_dir=str(tmp_path))

    def closure():
        lbfgs.zero_grad()
        loss = F.cross_entropy(model(x), y)
        guard.backward(loss)
        return loss

    with pytest.raises(RuntimeError, match=r"step\(closure\).*LBFGS"), guard.step(x, targets=y):
        lbfgs.step(closure)
    # Also after guard.backward() in the step: the closure's own gradients would go unchecked.
    with pytest.raises(RuntimeError, match=r"step\(closure\).*LBFGS"), guard.step(x, targets=y):
        guard.backward(F.cross_entropy(model(x), y))
        lbfgs.step(closure)
    guard.close()


def test_close_removes_every_hook(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    base_pre, base_post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    assert len(model._forward_hooks) == 1
    guard.close()
    guard.close()
    assert len(model._forward_hooks) == 0
    assert len(opt._optimizer_step_pre_hooks) == base_pre
    assert len(opt._optimizer_step_post_hooks) == base_post
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    loss = F.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1])
    loss.backward()
    opt.step()  # no guard left: plain PyTorch again
    with pytest.raises(RuntimeError, match="closed"):
        guard.step()


def test_unwritable_dump_dir_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(4)
    data[1][0][0, 0] = float("nan")
    guard = NanGuard(model, opt, dump_dir=str(blocker / "dumps"))
    with pytest.warns(RuntimeWarning, match="could not write a dump"):
        run(guard, model, opt, data)
    guard.close()
    assert guard.history[1].action == "skip" and guard.history[1].cause == "input_nonfinite"
    assert len(guard.history) == 4 and guard.dumps == []


def test_inspect_json_matches_a_real_dump(tmp_path, capsys):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(4)
    data[2][0][1, :] = float("inf")
    guard = NanGuard(model, opt, dump_dir=str(tmp_path), dump_state="always")
    run(guard, model, opt, data)
    guard.close()
    path = guard.dumps[0]
    assert cli_main(["inspect", "--json", path]) == 0
    data_json = json.loads(capsys.readouterr().out)
    dump = nanguard.load(path)
    assert (data_json["step"], data_json["cause"], data_json["where"]) == (
        dump.event.step, dump.event.cause, dump.event.where) == (2, "input_nonfinite", "inputs")
    assert data_json["tensors"]["inputs"]["inf"] == 8
    assert [h["step"] for h in data_json["history"]] == [0, 1, 2]
    assert dump.state and "model.0.weight" in dump.state  # dump_state="always"
    assert cli_main(["inspect", path]) == 0
    assert "input_nonfinite" in capsys.readouterr().out


def test_state_dict_round_trip(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(4)
    data[1][0][0, 0] = float("nan")
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, data)
    saved = guard.state_dict()
    guard.close()
    fresh = NanGuard(model, opt, dump_dir=str(tmp_path))
    fresh.load_state_dict(json.loads(json.dumps(saved)))
    assert fresh.step_count == 4 and fresh.history[1].action == "skip"
    assert [(e.step, e.cause, e.action) for e in fresh.events] == [
        (1, "input_nonfinite", "skip")]
    assert fresh.events[0].details == guard.events[0].details
    fresh.load_state_dict({**saved, "lr_scale": 0.5})  # as an older version saved it
    assert fresh.step_count == 4 and "lr_scale" not in fresh.state_dict()
    fresh.close()


def test_label_check_reads_the_class_dimension():
    from nanguard._torch_engine import check_targets

    y = torch.tensor([0, 3, -100])
    assert check_targets(y, torch.zeros(3, 4)) is None  # -100 is torch's ignore_index
    assert "outside [0, 3)" in check_targets(y, torch.zeros(3, 3))
    assert check_targets(torch.tensor([[0, 5]]), torch.zeros(1, 6, 2)) is None  # (N, C, d)
    assert "outside [0, 4)" in check_targets(torch.tensor([[0, 5]]), torch.zeros(1, 4, 2))
    assert check_targets(torch.tensor([0, 7]), torch.zeros(2, 1)) is None  # one column: no classes
    assert "NaN" in check_targets(torch.tensor([0.5, float("nan")]), torch.zeros(2, 1))


def test_shared_options_have_the_contract_names_and_defaults():
    from tests._options import assert_shared_options

    assert_shared_options(NanGuard)


@pytest.mark.parametrize("where", [(0, 0), (511, 255)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_fast_path_reductions_see_every_non_finite_value(where, bad):
    # Large CPU tensors take BLAS/sum kernels, small ones and odd dtypes the fused norm:
    # both must flag a single bad value anywhere, and the norms must be the true L2 norms.
    from nanguard._torch_engine import _BIG, grad_norms, maybe_finite

    g = torch.Generator().manual_seed(0)
    big = torch.randn(512, 256, generator=g)
    assert big.numel() >= _BIG
    tensors = [big, torch.randn(7, generator=g), torch.randn(300, 300, dtype=torch.float64,
               generator=g), torch.randn(64, 1100, generator=g).t(),  # not contiguous
               torch.randn(5, generator=g).bfloat16(), torch.zeros(0)]
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])
    norms = grad_norms(tensors, torch.device("cpu"))
    assert norms.dtype == torch.float64  # one tensor is float64: its norm is kept in float64
    assert torch.allclose(norms, expected, rtol=1e-5)  # bfloat16 too: summed in float32
    assert grad_norms(tensors[:2], torch.device("cpu")).dtype == torch.float32
    assert bool(maybe_finite(tensors))
    for i in range(5):
        corrupted = [t.clone() for t in tensors]
        flat = min(where[0] * where[1], corrupted[i].numel() - 1)
        corrupted[i][torch.unravel_index(torch.tensor(flat), corrupted[i].shape)] = bad
        assert not bool(maybe_finite(corrupted)), i
        assert not math.isfinite(grad_norms(corrupted, torch.device("cpu"))[i].item()), i


def test_many_small_tensors_take_the_fused_norm_and_the_total_is_torchs():
    # More than a few small CPU tensors go through one _foreach_norm call, large ones and a
    # few small ones through BLAS dot products; either way the norms and the global norm
    # read back on the host are torch's, and float32's overflow is kept (Inf past 3.4e38).
    from nanguard._torch_engine import (
        _FEW,
        _cpu_sq,
        grad_norms,
        maybe_finite,
        norms_of,
        reduce_each,
        stack_on,
        total_norm,
    )

    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(300, 300, generator=g)] + [
        torch.randn(17, generator=g) for _ in range(2 * _FEW)]
    red = reduce_each(tensors, _cpu_sq)
    assert red.squared == [True] + [False] * (2 * _FEW)  # the small ones: fused, plain norms
    values = stack_on(red.values, torch.device("cpu")).tolist()
    expected = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    assert norms_of(values, red.squared) == pytest.approx(expected, rel=1e-5)
    grads = [t.clone() for t in tensors]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, grads, strict=True):
        p.grad = t
    torch_total = float(torch.nn.utils.clip_grad_norm_(params, max_norm=1e9))
    assert total_norm(values, red.squared, wide=False) == pytest.approx(torch_total, rel=1e-6)
    assert total_norm([3e38, 3e38], [False, False], wide=False) == math.inf
    assert total_norm([3e38, 3e38], [False, False], wide=True) == pytest.approx(3e38 * 2**0.5)
    assert grad_norms(tensors, torch.device("cpu")).tolist() == pytest.approx(expected, rel=1e-5)
    assert bool(maybe_finite(tensors))
    tensors[5][3] = math.nan
    assert not bool(maybe_finite(tensors))


def test_half_precision_norms_do_not_overflow_with_finite_entries():
    # A float16 tensor's own L2 norm is Inf past 65504: a large but finite gradient or
    # weight would read as non-finite (a false skip, or an element-wise check every step).
    from nanguard._torch_engine import grad_norms, maybe_finite

    tensors = [torch.full((1000, 1000), 100.0, dtype=torch.float16),  # L2 norm 1e5
               torch.full((100, 100), 20.0, dtype=torch.bfloat16)]  # L2 norm 2000
    norms = grad_norms(tensors, torch.device("cpu"))
    assert torch.allclose(norms, torch.tensor([1e5, 2000.0]), rtol=1e-2)
    assert bool(maybe_finite(tensors))
    tensors[0][3, 4] = float("inf")
    assert not bool(maybe_finite(tensors))


def test_corrupted_large_layer_and_nan_gradients_in_it(tmp_path):
    # A layer past the size where the CPU fast path switches kernels, end to end.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(6)

    def corrupt(i):
        if i == 4:
            with torch.no_grad():
                model[2].weight[200, 300] = float("nan")

    def poison_once(grad):
        handle.remove()
        return grad * math.nan

    def loss_fn(out, y):
        nonlocal handle
        if guard.step_count == 2:  # only the large layer's gradient goes NaN, once
            handle = model[2].weight.register_hook(poison_once)
        return F.cross_entropy(out, y)

    handle = None

    guard = NanGuard(model, opt, snapshot_every=3, dump_dir=str(tmp_path))
    run(guard, model, opt, data, loss_fn=loss_fn, before_step=corrupt)
    guard.close()
    assert weights_finite(model)
    causes = [(e.step, e.cause, e.where) for e in guard.events]
    assert causes[0][:2] == (2, "grad_nonfinite")
    assert (4, "weights_nonfinite", "2.weight") in causes


class PadMask(torch.nn.Module):
    def forward(self, scores, pad):
        return scores.masked_fill(pad[:, None, :], -math.inf)


class PaddedAttention(torch.nn.Module):
    """Scores masked with -inf by a module of their own (allowed), then a softmax; or a
    torch MultiheadAttention given a key_padding_mask."""

    def __init__(self, builtin):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.mask, self.softmax = PadMask(), torch.nn.Softmax(-1)
        self.builtin = builtin

    def forward(self, x, pad):
        h = self.inp(x)
        if self.builtin:
            a, _ = self.attn(h, h, h, key_padding_mask=pad)
        else:
            a = self.softmax(self.mask(h @ h.transpose(1, 2), pad)) @ h
        return self.head(a.mean(1))


@pytest.mark.parametrize("builtin", [False, True])
def test_a_fully_masked_attention_row_is_named_as_such(tmp_path, builtin):
    # A fully padded sequence: its softmax over only -inf is 0/0. The message said "finite
    # inputs ... look for an exp, log, pow or division that overflows" (a black-box tester).
    model = PaddedAttention(builtin)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path), allow_neg_inf=("mask",))
    for i in range(3):
        x, y = torch.randn(4, 6, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        pad = torch.zeros(4, 6, dtype=torch.bool)
        pad[:, 4:] = True
        if i == 2:
            pad[1] = True
        opt.zero_grad()
        with guard.step((x, pad), targets=y):
            guard.backward(F.cross_entropy(model(x, pad), y))
            opt.step()
    guard.close()
    (event,) = guard.events
    where = "attn" if builtin else "softmax"
    assert (event.step, event.cause, event.where) == (2, "activation_nonfinite", where)
    assert "every" in event.message and "exp, log, pow" not in event.message
    key = "activation_attention" if builtin else "activation_input_masked"
    assert event.details[key] is True and weights_finite(model)


def test_events_keep_the_first_and_the_latest_of_a_long_run(tmp_path, monkeypatch):
    # guard.events grew by ~1.7 kB per event without bound: a skip-only run over a bad shard
    # for days. The first EVENTS_FIRST and the latest are kept, EVENTS_KEPT in all (made
    # small here).
    import nanguard.session

    monkeypatch.setattr(nanguard.session, "EVENTS_KEPT", 5)
    monkeypatch.setattr(nanguard.session, "EVENTS_FIRST", 2)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(10)
    for x, _ in data:
        x[0, 0] = math.nan
    with NanGuard(model, opt, dump_dir=str(tmp_path), actions=("skip",), max_dumps=0) as guard:
        run(guard, model, opt, data)
    assert [e.step for e in guard.events] == [0, 1, 7, 8, 9]
    assert guard._engine.session.events_dropped == 5 and len(guard.history) == 10


def _run_under_anomaly_mode(tmp_path, check_nan):
    """Three steps, the last with a NaN batch, under detect_anomaly(check_nan=...): the
    guard, and the anomaly-mode warnings it issued."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(3)
    data[2][0][0, 0] = math.nan
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught, \
            torch.autograd.detect_anomaly(check_nan=check_nan):
        warnings.simplefilter("always")
        if check_nan:
            with pytest.raises(RuntimeError, match="returned nan values"):
                run(guard, model, opt, data)
        else:
            run(guard, model, opt, data)
    guard.close()
    return guard, [w for w in caught if "anomaly mode is on" in str(w.message)]


def test_anomaly_mode_is_said_to_pre_empt_the_guard(tmp_path):
    # Under torch.autograd.detect_anomaly() a NaN's backward raises before the guard can
    # check the step: the guard says so, once.
    _, said = _run_under_anomaly_mode(tmp_path, check_nan=True)
    assert len(said) == 1 and said[0].category is RuntimeWarning


def test_anomaly_mode_without_its_nan_check_is_not_warned_about(tmp_path):
    # detect_anomaly(check_nan=False) raises on nothing: the guard acts as usual (a reviewer
    # saw the warning anyway).
    guard, said = _run_under_anomaly_mode(tmp_path, check_nan=False)
    assert not said
    assert [(e.step, e.cause) for e in guard.events] == [(2, "input_nonfinite")]


def test_a_float16_overflow_under_autocast_is_named_as_such(tmp_path):
    # Finite float32 inputs up to ~2e5 overflow a plain Linear computing in float16; the
    # message told the user to look for "an exp, log, pow or division" (a black-box tester).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    data = batches(3)
    data[2] = (data[2][0] * 1e5, data[2][1])
    guard = NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path))
    for x, y in data:
        opt.zero_grad()
        with guard.step(x, targets=y):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            guard.backward(loss)
            scaler.step(opt)
            scaler.update()
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "activation_nonfinite", "0")
    assert event.details["activation_dtype"] == "float16"
    assert event.details["activation_input_peak"] == float(data[2][0].abs().max())
    assert "in float16" in event.message and "largest finite value is 6.55e+04" in event.message
    assert "exp, log, pow" not in event.message and weights_finite(model)


def float16_step(guard, model, opt, x, y):
    """One guarded step whose forward runs under float16 autocast on the CPU."""
    opt.zero_grad()
    with guard.step(x, targets=y):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        guard.backward(F.cross_entropy(out.float(), y))
        opt.step()


class LogLayer(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN where x < 0: nothing overflows


def test_a_nan_in_a_float16_layer_that_is_no_overflow_keeps_the_generic_message(tmp_path):
    # A log of negatives under float16 autocast got the float16-range message ("scale the
    # inputs down"), a reviewer found: only an Inf in the outputs, or inputs past 65504,
    # point at the range.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), LogLayer(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path), actions=("skip",))
    float16_step(guard, model, opt, *batches(1)[0])
    guard.close()
    (event,) = guard.events
    assert (event.cause, event.where) == ("activation_nonfinite", "1")
    assert "activation_dtype" not in event.details and "float16" not in event.message


def test_grad_scaler_skips_are_the_scalers_and_real_faults_still_events(tmp_path):
    # fp16 autocast with a scale far too large: the scaled backward overflows, the scaler
    # skips those steps and lowers its scale. nanguard counts them and does not act; a NaN
    # batch later is still a nanguard event.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-10)
    data = batches(12)
    data[9][0][0, 0] = float("nan")
    before = state_copy(model)
    guard = NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path))
    for x, y in data:
        opt.zero_grad()
        with guard.step(x, targets=y):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            guard.backward(loss)  # scaled by the guard
            scaler.step(opt)
            scaler.update()
    guard.close()
    skipped = [r for r in guard.history if r.cause == "amp_scaler_skip"]
    assert guard.amp_skips == len(skipped) >= 1
    assert all(r.action is None and not math.isfinite(r.grad_norm) for r in skipped)
    assert all(math.isfinite(r.loss) for r in skipped)  # the unscaled loss is recorded
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (9, "input_nonfinite", "skip")
    applied = [r for r in guard.history if r.cause is None and r.action is None]
    assert applied and all(math.isfinite(r.grad_norm) for r in applied)
    assert weights_finite(model)
    assert not same_bits(before, state_copy(model))  # the good steps trained
    assert guard.state_dict()["amp_skips"] == guard.amp_skips


def test_grad_scaler_must_be_a_scaler(tmp_path):
    model = mlp()
    with pytest.raises(TypeError, match="scaler"):
        NanGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), scaler=object())


def accumulate(guard, model, opt, data, k):
    """The usual accumulation loop: a guard.step() per micro-batch, the optimizer every k."""
    for i, (x, y) in enumerate(data):
        with guard.step(x, targets=y):
            guard.backward(F.cross_entropy(model(x), y) / k)
            if (i + 1) % k == 0:
                opt.step()
                opt.zero_grad()


def twin_run(model, data, k, skip_steps=()):
    """The same accumulation without a guard: (loss, logits min, max, grad norm) per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats, loss, lo, hi = [], 0.0, math.inf, -math.inf
    for i, (x, y) in enumerate(data):
        out = model(x)
        part = F.cross_entropy(out, y) / k
        part.backward()
        loss, lo, hi = loss + part.item(), min(lo, out.min().item()), max(hi, out.max().item())
        if (i + 1) % k == 0:
            grads = [p.grad for p in model.parameters()]
            stats.append((loss, lo, hi, torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item()))
            if i // k not in skip_steps:
                opt.step()
            opt.zero_grad()
            loss, lo, hi = 0.0, math.inf, -math.inf
    return stats


def test_gradient_accumulation_one_step_per_optimizer_step(tmp_path):
    k, model = 4, mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(12)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        accumulate(guard, model, opt, data, k)
    expected = twin_run(twin, data, k)
    assert [r.step for r in guard.history] == [0, 1, 2]
    assert guard.step_count == 3
    for r, (loss, lo, hi, norm) in zip(guard.history, expected, strict=True):
        assert r.action is None
        assert r.loss == pytest.approx(loss, rel=1e-5)  # the micro-batches' mean loss
        assert (r.logits_min, r.logits_max) == pytest.approx((lo, hi), rel=1e-6)
        assert r.grad_norm == pytest.approx(norm, rel=1e-5)  # of the accumulated gradients
    assert same_bits(state_copy(model), state_copy(twin))  # good steps are left alone


def test_gradient_accumulation_bad_micro_batch_skips_its_whole_step(tmp_path):
    k, model = 4, mlp()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(16)
    data[5][0][3, 2] = float("nan")  # step 1, its second micro-batch
    data[10][1][7] = 9  # step 2, its third micro-batch: a class id outside [0, 4)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        accumulate(guard, model, opt, data, k)
    assert [r.step for r in guard.history] == [0, 1, 2, 3]
    assert [r.action for r in guard.history] == [None, "skip", "skip", None]
    first, second = guard.events
    assert (first.step, first.cause) == (1, "input_nonfinite")
    assert (second.step, second.cause) == (2, "target_invalid")
    assert "targets.2" in second.message and "9" in second.message
    dump = nanguard.load(guard.dumps[0])
    assert sorted(n for n in dump.tensors if n.startswith("inputs")) == [
        f"inputs.{i}" for i in range(k)]
    assert int(np.isnan(dump.tensors["inputs.1"]).sum()) == 1
    labels = nanguard.load(guard.dumps[1]).tensors["targets.2"]
    assert labels[7] == 9  # the dump keeps the label as the loader gave it
    data[10][1][7] = 0  # what the guard zeroed in place, for the twin's identical batch
    twin_run(twin, data, k, skip_steps=(1, 2))
    assert weights_finite(model)
    assert same_bits(state_copy(model), state_copy(twin))


def test_gradient_accumulation_with_a_grad_scaler(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    data = batches(8)
    with NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(data):
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) / 2)
                if i % 2 == 1:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
    assert [r.step for r in guard.history] == [0, 1, 2, 3]
    assert guard.amp_skips == 0 and not guard.events
    assert all(math.isfinite(r.grad_norm) and r.grad_norm < 1e3 for r in guard.history)



def test_a_nan_micro_batch_with_a_grad_scaler_makes_its_whole_window_one_skipped_step(tmp_path):
    # Before: the NaN micro-batch was concluded at once as a step, the rest of its window
    # became the next step and scaler.step applied their partial update; every later index
    # was one off.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    data = batches(12)
    data[4][0][1, 1] = float("nan")  # the middle micro-batch of optimizer step 1
    windows = []
    with NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(data):
            if i % 3 == 0:
                before = [p.detach().clone() for p in model.parameters()]
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) / 3)
                if i % 3 == 2:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
            if i % 3 == 2:
                windows.append(all(torch.equal(a, p) for a, p in zip(
                    before, model.parameters(), strict=True)))
    assert guard.step_count == 4 and [r.step for r in guard.history] == [0, 1, 2, 3]
    assert windows == [False, True, False, False]  # window 1 left the weights as they were
    (event,) = guard.events
    assert (event.step, event.cause, event.where, event.action) == (
        1, "input_nonfinite", "inputs.1", "skip")


def test_a_nan_micro_batch_is_the_call_its_dump_replays(tmp_path):
    # The dump's replay call was the step's first micro-batch, a clean one, so
    # `nanguard replay` replayed a finite batch.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[4][0][1, 1] = float("nan")  # micro-batch 1 of step 1
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(data):
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) / 3)
                if i % 3 == 2:
                    opt.step()
                    opt.zero_grad()
    dump = nanguard.load(guard.dumps[0])
    assert (dump.event.step, dump.event.where) == (1, "inputs.1")
    assert dump.event.details["replay_call"]["call"] == 1
    np.testing.assert_array_equal(dump.tensors["replay.args.0"], dump.tensors["inputs.1"])


def test_gradients_non_finite_at_every_scale_are_not_the_scalers_skips(tmp_path):
    # A finite loss whose backward is NaN at any scale (sqrt at 0): the scaler halves its
    # scale at each skip, silently, down to 0. Below a scale of 1 they are nanguard events.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1000)
    guard = NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as err:
        for x, y in batches(40):
            opt.zero_grad()
            with guard.step(x, targets=y):
                out = model(x)
                guard.backward(F.cross_entropy(out, y) + torch.sqrt((out * 0).sum()))
                scaler.step(opt)
                scaler.update()
    guard.close()
    # At scales 16, 8, 4, 2 and 1 the scaler's skips; at 0.5 an event (the scale the step
    # ran at, whether scaler.update() is in the step's context or after it).
    assert guard.amp_skips == 5
    first = guard.events[0]
    assert (first.step, first.cause, first.action) == (5, "grad_nonfinite", "skip")
    assert first.details["amp_scale"] == 0.5 and "GradScaler" in first.message
    assert err.value.event.cause == "grad_nonfinite" and weights_finite(model)


class NaiveSoftmax(torch.nn.Module):
    def forward(self, z):
        e = torch.exp(z)
        return e / e.sum(-1, keepdim=True)


def test_torch_compiled_model_is_guarded_under_its_own_names(tmp_path):
    # backend="eager": dynamo's wrapper and graph capture without a C compiler.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), NaiveSoftmax(), torch.nn.Linear(32, 4))
    model = torch.compile(net, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(6)
    data[2][0][0, 0] = float("nan")
    data[4] = (data[4][0] * 1e4, data[4][1])  # the hidden naive softmax overflows
    with NanGuard(model, opt, dump_dir=str(tmp_path), dump_state="always") as guard:
        run(guard, model, opt, data)
    causes = [(e.step, e.cause, e.where) for e in guard.events]
    assert causes == [(2, "input_nonfinite", "inputs"), (4, "activation_nonfinite", "1")]
    assert weights_finite(net)
    state = nanguard.load(guard.dumps[1]).state
    assert "model.0.weight" in state and not any("_orig_mod" in k for k in state)


def test_a_per_sample_loss_with_backward_weights_records_their_weighted_sum(tmp_path):
    # loss.backward(gradient=w) backpropagates sum(w * loss): that is the step's loss (it
    # was the plain sum, len(batch) times the mean the user computes).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        opt.zero_grad()
        with guard.step(x, targets=y):
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            guard.backward(per_sample, gradient=torch.full_like(per_sample, 1 / 6))
            opt.step()
    assert guard.history[0].loss == pytest.approx(float(per_sample.detach().mean()), rel=1e-6)


def test_backward_weights_of_a_float16_loss_are_multiplied_in_float32(tmp_path):
    # Finite float16 losses times finite float16 weights overflowed float16 in the guard's
    # product (not in backward's): a healthy step was skipped as loss_nonfinite.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    x, y = torch.randn(8, 4).half(), torch.full((8, 1), 250.0).half()
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        opt.zero_grad()
        with guard.step(x, targets=y):
            per_sample = ((model(x) - y) ** 2).mean(1) / 1000
            guard.backward(per_sample, gradient=torch.full((8,), 2000.0, dtype=torch.float16))
            opt.step()
    assert guard.history[0].loss == pytest.approx(
        float((per_sample.detach().float() * 2000.0).sum()), rel=1e-3)
    assert not guard.events


def test_a_huge_finite_target_overflowing_the_loss_is_said_so(tmp_path):
    # A missing label stored as 1e30: the squared error overflows. The message blamed a
    # division by ~0 and suggested a built-in loss, which it already was.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(4):
            x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
            if i == 2:
                y[5] = 1e30
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.mse_loss(model(x), y))
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "loss_nonfinite")
    assert "the targets reach 1e+30" in event.message and "sentinel" in event.message
    assert weights_finite(model)


def test_targets_are_not_blamed_for_a_minus_inf_loss_nor_a_sparse_one_crashes(tmp_path):
    # A -inf loss is a log(0), not a squared error overflowing; moderate targets under a
    # float16 output were measured against float16's range; sparse targets raised.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    dense = torch.full((8, 3), 400.0)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for y in (dense, dense.to_sparse()):
            opt.zero_grad()
            with guard.step(x, targets=y):
                out = model(x).half().float()
                guard.backward(F.mse_loss(out, y.to_dense()) + torch.log(torch.zeros(())))
                opt.step()
    assert [e.cause for e in guard.events] == ["loss_nonfinite"] * 2
    assert all("targets reach" not in e.message for e in guard.events)
    # Each event has its dump, the sparse targets in it as their dense values.
    assert len(guard.dumps) == 2
    np.testing.assert_array_equal(nanguard.load(guard.dumps[1]).tensors["targets"],
                                  dense.numpy())


def test_gradients_whose_norm_overflows_from_huge_weights_name_the_weights(tmp_path):
    # A spike left a layer's weights at ~1e36, finite: the gradients' norm overflows with
    # every entry finite, and the message sent the user to the inputs and the first layer.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def blow_up(i):
        if i == 3:
            with torch.no_grad():
                model[2].weight.mul_(1e36)

    guard = NanGuard(model, opt, dump_dir=str(tmp_path), actions=("skip",))
    run(guard, model, opt, batches(4), before_step=blow_up)
    event = guard.events[0]
    assert (event.step, event.cause) == (3, "grad_nonfinite")
    assert event.details["grad_entries_finite"] and event.details["weights_peak"]["name"] == (
        "2.weight")
    assert "finite but huge" in event.message and "Scale or normalise" not in event.message


class DividesInForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.d1, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.d1(x))) / x.abs().mean(-1, keepdim=True)


def test_an_op_in_the_models_own_forward_is_named_so(tmp_path):
    model = DividesInForward()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(4)
    data[2][0][3] = 0.0  # a zero temperature for one row
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "logits_nonfinite", "<DividesInForward>")
    assert event.details["made_in_model_code"] and "the model's own code" in event.message


class SpanHeads(torch.nn.Module):
    """A span model's two outputs; its forward scales the second by a per-row temperature
    from the inputs (0 for an all-zero row)."""

    def __init__(self, as_dict):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.start, self.end = (torch.nn.Linear(8, 8), torch.nn.Linear(8, 4),
                                           torch.nn.Linear(8, 4))
        self.as_dict = as_dict

    def forward(self, x):
        h = torch.relu(self.body(x))
        start, end = self.start(h), self.end(h) / x.abs().mean(-1, keepdim=True)
        return {"start_logits": start, "end_logits": end} if self.as_dict else (start, end)


@pytest.mark.parametrize(("as_dict", "name"), [(False, "output.1"),
                                               (True, "output.end_logits")])
def test_a_second_output_made_non_finite_in_forward_is_not_blamed_on_the_loss(tmp_path, as_dict,
                                                                              name):
    # The logits are the output's first tensor; the second went Inf in forward and the
    # event read loss_nonfinite: "inputs, weights and outputs are finite and moderate ... the
    # loss function divides by ~0" (a black-box tester's question-answering model).
    model = SpanHeads(as_dict)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = batches(4)
    data[2][0][3] = 0.0

    def loss_fn(out, y):
        start, end = out.values() if as_dict else out
        return F.cross_entropy(start, y) + F.cross_entropy(end, y)

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, loss_fn=loss_fn)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "logits_nonfinite", "<SpanHeads>")
    assert event.details["nonfinite_output"] == name
    assert f"part '{name}' of the model output is non-finite" in event.message
    assert "loss function" not in event.message and weights_finite(model)


class ReturnsLoss(torch.nn.Module):
    """Computes its loss in forward and returns {"loss", "logits"}, as Hugging Face models."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x, labels):
        logits = self.fc(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_a_loss_returned_by_the_model_is_not_called_a_non_finite_output(tmp_path):
    # Every label ignored (-100): the model's own loss is NaN, its logits finite. It read
    # logits_nonfinite "part 'output.loss' of the model output is non-finite ... an operation
    # in the model's forward" (a reviewer); the loss is the loss.
    model = ReturnsLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    for i, (x, y) in enumerate(batches(3)):
        if i == 2:
            y = torch.full_like(y, -100)
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(model(x, y)["loss"])
            opt.step()
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "loss_nonfinite")
    assert "nonfinite_output" not in event.details


class LossInside(torch.nn.Module):
    """Computes its loss in forward, as Hugging Face models do: compiled, the logits are an
    output of the same graph as the loss, and their gradient hook receives None."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), NaiveSoftmax())
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x, labels):
        logits = self.head(self.body(x))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_compiled_model_computing_its_loss_in_forward(tmp_path):
    # backend="aot_eager": AOTAutograd (as inductor, the default) without a C compiler. A bad
    # step raised AttributeError inside the guard (a None output gradient) before the fix.
    net = LossInside()
    model = torch.compile(net, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(6)
    data[2][0][0, 0] = float("nan")
    data[4] = (data[4][0] * 1e4, data[4][1])  # the hidden naive softmax overflows
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for x, y in data:
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(model(x, labels=y)["loss"])
                opt.step()
    causes = [(e.step, e.cause, e.where) for e in guard.events]
    assert causes == [(2, "input_nonfinite", "inputs"), (4, "activation_nonfinite", "body.1")]
    assert [nanguard.load(p).event.step for p in guard.dumps] == [2, 4]
    assert weights_finite(net)


class CompiledBody(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.compile(torch.nn.Sequential(
            torch.nn.Linear(8, 32), NaiveSoftmax(), torch.nn.Linear(32, 4)), backend="eager")

    def forward(self, x):
        return self.body(x)


def test_compiled_submodule_is_named_as_written(tmp_path):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CompiledBody()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    data = batches(4)
    data[2] = (data[2][0] * 1e4, data[2][1])
    NanGuard(model, opt, logits_module="body.2").close()  # the name as written is found
    with NanGuard(model, opt, dump_dir=str(tmp_path), logits_module="body") as guard:
        run(guard, model, opt, data[:2])
        compiled = dict(counters["frames"])
        run(guard, model, opt, data[2:])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (2, "activation_nonfinite", "body.1")]
    # The replay runs the compiled submodule eagerly: its hooks cost no recompile (31 frames
    # were compiled for this replay, each hook a graph break with a printed traceback).
    assert dict(counters["frames"]) == compiled
    assert all("_orig_mod" not in n for n in nanguard.load(guard.dumps[0]).meta["param_names"])


class ExpLayer(torch.nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_a_training_step_compiled_whole_still_has_its_layer_named(tmp_path):
    # With the backward and optimizer.step() inside a torch.compile'd function, dynamo traces
    # the replay itself; the replay's set_stance("force_eager") made it fail there (no layer
    # named, "replay failed: ... forbidden callable set_stance").
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), ExpLayer(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))

    @torch.compile(backend="eager")
    def train_step(x, y):
        guard.backward(F.cross_entropy(model(x), y))
        opt.step()

    data = batches(4)
    data[2] = (data[2][0] * 1e3, data[2][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break notes
        for x, y in data:
            opt.zero_grad()
            with guard.step(x, targets=y):
                train_step(x, y)
    guard.close()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "activation_nonfinite", "1")
    assert weights_finite(model)


class SparseBag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 8, sparse=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_sparse_embedding_gradients(tmp_path):
    torch.manual_seed(0)
    model = SparseBag()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 1000, (8, 5), generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(6)]
    data[1] = (data[1][0].clone(), data[1][1])
    data[1][0][:, 0] = 7  # row 7 looked up eight times: duplicate indices in the sparse grad
    norms, max_norm = [], 0.1
    for x, y in data[:3]:  # the reference: the dense gradients' global norm, then clipped
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        norms.append(torch.linalg.vector_norm(torch.stack(
            [p.grad.to_dense().norm() for p in twin.parameters()])).item())
        for p in twin.parameters():
            p.grad.mul_(min(1.0, max_norm / (norms[-1] + 1e-6)))
        torch.optim.SGD(twin.parameters(), lr=0.5).step()

    seen = {}

    def corrupt(i):
        if i == 3:
            seen["after 3 steps"] = state_copy(model)
        if i == 4:
            with torch.no_grad():
                model.emb.weight[data[4][0][0, 0]] = float("nan")

    with NanGuard(model, opt, dump_dir=str(tmp_path), clip_grad_norm=max_norm) as guard:
        run(guard, model, opt, data, before_step=corrupt)
    assert min(norms) > max_norm  # every step clipped, the sparse gradient too
    assert [r.grad_norm for r in guard.history[:3]] == pytest.approx(norms, rel=1e-5)
    for k, v in state_copy(twin).items():  # the sparse gradient was clipped like the rest
        assert torch.allclose(seen["after 3 steps"][k], v, rtol=1e-5, atol=1e-7), k
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (4, "weights_nonfinite", "rollback")
    assert "emb.weight" in event.where
    assert weights_finite(model)


def test_nan_batch_leaves_batchnorm_statistics_finite(tmp_path):
    # The skipped step's forward already updated BatchNorm's running statistics with the
    # NaN: training would go on (batch statistics) but evaluation would be NaN ever after.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[3][0][0, 0] = float("nan")
    stats = {}

    def keep(i):
        stats[i] = {k: v.clone() for k, v in model.state_dict().items()
                    if "running" in k or "num_batches" in k}

    with NanGuard(model, opt, dump_dir=str(tmp_path), snapshot_every=2) as guard:
        run(guard, model, opt, data, before_step=keep)
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (3, "input_nonfinite", "skip")
    assert opt.param_groups[0]["lr"] == 0.1  # a skip: no rollback, no lower learning rate
    assert nanguard.load(guard.dumps[0]).event.details["nonfinite_buffers"] == [
        "1.running_mean", "1.running_var"]
    # After step 3: the statistics of the last snapshot (taken as step 2 began), bit for bit,
    # num_batches_tracked with them (momentum=None BatchNorm weighs the statistics by it).
    assert "1.num_batches_tracked" in stats[2] and stats[4].keys() == stats[2].keys()
    assert all(torch.equal(stats[4][k], stats[2][k]) for k in stats[2])
    model.eval()
    assert torch.isfinite(model(data[0][0])).all()


def test_model_called_outside_the_step_warns_once(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4)
    data[2][0][0, 0] = float("nan")
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))

    def train():
        for x, y in data:
            opt.zero_grad()
            out = model(x)  # before the step: the forward hook cannot see it
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(out, y))
                opt.step()

    with pytest.warns(RuntimeWarning, match="saw no output of the model") as caught:
        train()
    guard.close()
    assert sum("saw no output" in str(w.message) for w in caught) == 1
    assert [(e.step, e.cause) for e in guard.events] == [(2, "input_nonfinite")]
    assert [r.action for r in guard.history] == [None, None, "skip", None]


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 16)
        self.a, self.b = torch.nn.Linear(16, 4), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h), self.b(h)  # the first output (4 classes) counts as the logits


def test_multi_task_labels_are_never_changed(tmp_path):
    # Task b has 10 classes: its valid ids 4..9 are out of range for the first output. With
    # more than one class-id tensor the guard cannot tell which output scores which, so it
    # changes none of them and sees no fault.
    torch.manual_seed(0)
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    ya, yb = torch.randint(0, 4, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
    assert int(yb.max()) >= 4
    kept = yb.clone()
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for _ in range(3):
            x = torch.randn(16, 8, generator=g)
            opt.zero_grad()
            with guard.step(x, targets=(ya, yb)):
                out_a, out_b = model(x)
                guard.backward(F.cross_entropy(out_a, ya) + F.cross_entropy(out_b, yb))
                opt.step()
    assert torch.equal(yb, kept)
    assert not guard.events and [r.action for r in guard.history] == [None, None, None]


def test_ignore_index_of_a_segmentation_loss(tmp_path):
    # Void pixels labelled 255 that the loss ignores (ignore_index=255) are not invalid once
    # the guard is told; without it the event names the option to pass.
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 5, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, generator=g)
    y = torch.randint(0, 5, (4, 6, 6), generator=g)
    y[:, 0, :] = 255
    for ignore_index in (255, None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        options = {} if ignore_index is None else {"ignore_index": ignore_index}
        labels = y.clone()
        with NanGuard(model, opt, dump_dir=str(tmp_path), **options) as guard:
            for _ in range(2):  # the second step: the first one's gradient says "classes"
                opt.zero_grad()
                with guard.step(x, targets=labels):
                    guard.backward(F.cross_entropy(model(x), labels, ignore_index=255))
                    opt.step()
                assert torch.equal(labels, y)  # never left changed after the step
        if ignore_index is not None:
            assert not guard.events
        else:
            (event,) = guard.events
            assert (event.step, event.cause) == (1, "target_invalid")
            assert "pass ignore_index=255 to NanGuard" in event.message
    with pytest.raises(ValueError, match="ignore_index"):
        NanGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), ignore_index="255")


class NormFaceLoss(torch.nn.Module):
    """A metric-learning loss that owns the class weights: the model outputs embeddings of
    width 16, the targets are identities in [0, 50)."""

    def __init__(self, dim=16, n_ids=50):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_ids, dim) * 0.1)

    def forward(self, emb, y):
        cos = F.normalize(emb) @ F.normalize(self.weight).t()
        return F.cross_entropy(cos * 10.0, y)


def test_an_embedding_model_is_not_a_classifier_with_too_few_classes(tmp_path):
    torch.manual_seed(0)
    model = mlp(n_out=16)
    loss_fn = NormFaceLoss()
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-2)
    data = [(x, torch.randint(0, 50, (16,))) for x, _ in batches(12)]
    given = [y.clone() for _, y in data]
    losses = []
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for x, y in data:
            opt.zero_grad()
            with guard.step(x, targets=y):
                loss = loss_fn(model(x), y)
                guard.backward(loss)
                opt.step()
            losses.append(loss.item())
        assert not guard.events and all(r.action is None for r in guard.history)
        assert not guard._engine.output_scores_classes  # learnt from the first gradient
    assert all(torch.equal(y, g) for (_, y), g in zip(data, given, strict=True))
    assert losses[-1] < losses[0]


def test_an_accelerators_embedding_model_is_blamed_for_its_ids_once_at_most(
        tmp_path, label_branch):
    # On an accelerator the first step's ids are defused before any gradient tells an
    # embedding from class scores (docs/torch.md: one target_invalid event, at step 0).
    # After that, a bad step of another kind must not be put on those ids.
    torch.manual_seed(0)
    model = mlp(n_out=16)
    loss_fn = NormFaceLoss()
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-2)
    data = [(x, torch.randint(0, 50, (16,))) for x, _ in batches(12)]
    given = [y.clone() for _, y in data]
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            with guard.step(x, targets=y):
                loss = loss_fn(model(x), y)
                if i == 8:  # a loss that divided by zero
                    loss = loss / torch.zeros(())
                guard.backward(loss)
                opt.step()
    first = [(0, "target_invalid")] if label_branch == "accelerator" else []
    assert [(e.step, e.cause) for e in guard.events] == [*first, (8, "loss_nonfinite")]
    assert all(torch.equal(y, g) for (_, y), g in zip(data, given, strict=True))
    assert weights_finite(model)


def test_labels_defused_in_place_are_given_back_after_the_step(tmp_path, label_branch):
    # The loader yields views of the dataset's label tensor: zeroing a bad id in place for
    # the loss must not change the dataset.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = torch.randn(64, 8)
    ys = torch.randint(0, 4, (64,))
    ys[40] = 7  # batch 2
    dataset_labels = ys.clone()
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(4):
            opt.zero_grad()
            x, y = xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16]
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    assert torch.equal(ys, dataset_labels)
    assert nanguard.load(guard.dumps[0]).tensors["targets"][8] == 7


class BlockLM(torch.nn.Module):
    def __init__(self, vocab=20, extra_inputs=0):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab + extra_inputs, 16)  # ids past vocab: inputs only
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, ids):
        return self.head(self.emb(ids))


def run_blocks(guard, model, opt, blocks, vocab=20):
    """A token LM's loop: inputs and targets are two views of each block."""
    for block in blocks:
        x, y = block[:, :-1], block[:, 1:]
        opt.zero_grad()
        with guard.step(x, targets=y):
            logits = model(x)
            guard.backward(F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)))
            opt.step()


@pytest.fixture(params=["cpu", "accelerator"])
def label_branch(request, monkeypatch):
    """The CPU's label check (look at the ids first) and an accelerator's (defuse on every
    step without looking, as on a GPU), both run here on the CPU."""
    from nanguard._torch_engine import TorchEngine

    monkeypatch.setattr(TorchEngine, "look_first_on_cpu", request.param == "cpu")
    return request.param


def test_a_bad_label_in_targets_sharing_the_inputs_storage_is_a_skip_not_a_crash(
        tmp_path, label_branch):
    # A language model's inputs and targets are two views of one token block
    # (x = block[:, :-1], y = block[:, 1:]), and the embedding saves x for its backward.
    # Defusing a bad id in y in place must not make that backward fail ("modified by an
    # inplace operation": x and y share a version counter), and x must stay as it was.
    model = BlockLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 20, (4, 9), generator=g) for _ in range(5)]
    blocks[2][1, -1] = 20  # the last position: a target only, never an input
    given = [b.clone() for b in blocks]
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run_blocks(guard, model, opt, blocks)
    assert [r.action for r in guard.history] == [None, None, "skip", None, None]
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    assert "20" in event.message
    assert all(torch.equal(b, c) for b, c in zip(blocks, given, strict=True))
    assert weights_finite(model)


class DictLM(torch.nn.Module):
    """A Hugging Face-style model: the logits come from `head` inside a dict."""

    def __init__(self, vocab=20):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)

    def forward(self, ids):
        return {"logits": self.head(self.emb(ids)), "hidden": self.emb(ids)}


class FeaturesThenLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.ReLU())
        self.head = torch.nn.Linear(3, 6)

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)


def test_a_features_then_logits_tuple_counts_classes_by_the_logits(tmp_path, label_branch):
    # The first floating tensor (the contract's logits source) is 3 features wide: ids 3..5
    # are valid for the 6 logits the loss reads, and are left alone; 7 is out of [0, 6).
    model = FeaturesThenLogits()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    ys = torch.arange(64) % 6
    ys[40] = 7  # batch 2
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(4):
            x, y = xs[i * 16:(i + 1) * 16], ys[i * 16:(i + 1) * 16]
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x)[1], y))
                opt.step()
    assert [r.action for r in guard.history] == [None, None, "skip", None]
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    assert "[0, 6)" in event.message


def test_logits_module_labels_are_defused_before_the_loss(tmp_path, label_branch):
    # With logits_module the label check needs the gradient the loss sent into that module's
    # output (whether it scores classes); without it the CPU branch left the ids to the loss,
    # which raised, and the code after the loss in the step never ran.
    model = DictLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses_seen = []
    with NanGuard(model, opt, dump_dir=str(tmp_path), logits_module="head") as guard:
        for i in range(5):
            ids = torch.randint(0, 20, (4, 9), generator=g)
            labels = ids.clone()
            if i == 3:
                labels[2, 5] = 21
            opt.zero_grad()
            with guard.step(ids, targets=labels):
                logits = model(ids)["logits"]
                loss = F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))
                losses_seen.append(i)
                guard.backward(loss)
                opt.step()
            assert labels[2, 5] == (21 if i == 3 else ids[2, 5])  # given back after the step
    assert losses_seen == [0, 1, 2, 3, 4]
    assert [r.action for r in guard.history] == [None, None, None, "skip", None]
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "target_invalid")
    assert "21" in event.message
    assert weights_finite(model)


def test_a_dump_holds_the_inputs_that_share_storage_with_defused_labels_as_given(
        tmp_path, label_branch):
    # Id 25 is a valid input (the embedding has 36 rows) and an invalid target (20 classes).
    # In x, y = block[:, :-1], block[:, 1:] it sits in both: zeroing it in y zeroes x too.
    # The ids go back before the bad step's replay and dump, which see the batch as given.
    model = BlockLM(extra_inputs=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(0, 20, (4, 9), generator=g) for _ in range(4)]
    blocks[2][1, 5] = 25
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run_blocks(guard, model, opt, blocks)
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    dump = nanguard.load(guard.dumps[0])
    assert dump.tensors["inputs"][1, 5] == 25 and dump.tensors["targets"][1, 4] == 25
    assert int(blocks[2][1, 5]) == 25


class BagOfWords(torch.nn.Module):
    def __init__(self, sparse=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8, sparse=sparse)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def token_batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 50, (10, 5), generator=g), torch.randint(0, 3, (10,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("order", ["sparse first", "dense first"])
def test_several_optimizers_are_guarded_together(tmp_path, order):
    # torch's recipe for a sparse embedding: SparseAdam for it, Adam for the rest.
    model = BagOfWords(sparse=True)
    sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2)
    dense = torch.optim.Adam(model.fc.parameters(), lr=1e-2)
    opts = [sparse, dense] if order == "sparse first" else [dense, sparse]
    data = token_batches(8)
    seen = {}
    with NanGuard(model, [sparse, dense], dump_dir=str(tmp_path)) as guard:
        for i, (ids, y) in enumerate(data):
            for opt in opts:
                opt.zero_grad()
            if i == 5:
                seen["before"] = state_copy(model)
            with guard.step(ids, targets=y):
                out = model(ids)
                if i == 5:
                    out = out * math.nan  # one bad step
                guard.backward(F.cross_entropy(out, y))
                for opt in opts:
                    opt.step()
            if i == 5:
                seen["after"] = state_copy(model)
    assert same_bits(seen["before"], seen["after"])  # neither optimizer applied step 5
    assert [r.action for r in guard.history].count("skip") == 1 and weights_finite(model)
    with pytest.raises(ValueError, match="one optimizer"):
        NanGuard(model, [sparse, dense], scaler=torch.amp.GradScaler("cpu"))


def test_parameters_added_after_the_guard_are_guarded(tmp_path):
    # Progressive unfreezing: the embedding joins the optimizer with add_param_group.
    model = BagOfWords()
    model.emb.weight.requires_grad_(False)
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    data = token_batches(10)
    with NanGuard(model, opt, dump_dir=str(tmp_path), max_skips=1) as guard:
        for i, (ids, y) in enumerate(data):
            if i == 2:
                model.emb.weight.requires_grad_(True)
                opt.add_param_group({"params": [model.emb.weight], "lr": 0.01})
            opt.zero_grad()
            with guard.step(ids, targets=y):
                out = model(ids) * (math.nan if i in (5, 6) else 1.0)
                guard.backward(F.cross_entropy(out, y))
                opt.step()
            assert weights_finite(model), i
        # a snapshot of the new state when the group appeared: rollbacks land on it
        assert guard.snapshot_step == 2
    assert [r.action for r in guard.history][5:7] == ["skip", "rollback"]


def test_a_learnable_loss_weight_is_rolled_back_with_the_model(tmp_path):
    # Uncertainty weighting of two losses: log-variances the optimizer holds, not the model.
    model = mlp()
    log_vars = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([*model.parameters(), log_vars], lr=0.05)
    snap = {}

    def loss_fn(logits, y):
        a, b = F.cross_entropy(logits, y), logits.pow(2).mean()
        return (a * torch.exp(-log_vars[0]) + log_vars[0]
                + b * torch.exp(-log_vars[1]) + log_vars[1])

    def corrupt(i):
        if i == 0:
            snap["log_vars"] = log_vars.detach().clone()
        if i == 4:
            with torch.no_grad():
                log_vars[1] = math.inf
        if i == 5:  # after step 4's rollback to the step-0 snapshot
            snap["restored"] = log_vars.detach().clone()

    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(6), loss_fn=loss_fn, before_step=corrupt)
    guard.close()
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (4, "weights_nonfinite", "rollback")
    assert event.where == "optimizer.param_groups.0.params.4"  # named by its place
    assert guard.snapshot_step == 0 and len(guard.events) == 1
    assert torch.equal(snap["restored"], snap["log_vars"])  # bit for bit
    assert torch.isfinite(log_vars).all()


class RunningNorm(torch.nn.Module):
    """Normalises by running statistics it keeps in non-persistent buffers (left out of the
    state_dict, as some input normalisers are)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n), persistent=False)

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.mean


def test_non_persistent_buffers_are_repaired_after_a_skip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(RunningNorm(8), torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(8)
    data[3][0][0, 0] = float("nan")
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data)
    assert [r.action for r in guard.history].count("skip") == 1 and len(guard.events) == 1
    assert guard.events[0].details["nonfinite_buffers"] == ["0.mean"]
    assert torch.isfinite(model[0].mean).all()
    model.eval()
    assert torch.isfinite(model(data[0][0])).all()


def test_a_classifier_whose_loss_raised_on_a_bad_id_is_a_target_invalid_skip(tmp_path):
    # Distillation: cross-entropy plus an MSE between the student's and a teacher's logits.
    # That second term keeps the output gradient's rows from summing to zero, so the guard
    # cannot tell from it that the output scores classes; the loss raising on the id can.
    model = mlp()
    teacher = mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[3][1][2] = 10

    def distill(logits, y):
        return F.cross_entropy(logits, y) + 0.5 * F.mse_loss(logits, teacher(data[0][0])[:16])

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, loss_fn=distill)
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "target_invalid")
    assert weights_finite(model)


VOCAB = 11


@dataclasses.dataclass
class LMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class SqrtOfSquare(torch.nn.Module):
    def forward(self, x):
        return torch.sqrt(x * x)


class TinyLM(torch.nn.Module):
    """Hugging Face style: ``forward(ids, labels=...)`` computes the loss itself and returns
    it beside the logits (``kind``: an output object, a dict or a ``(loss, logits)`` tuple),
    or returns the logits alone (``"outside"``). ``act``'s backward is NaN at exactly 0."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.body = torch.nn.Linear(8, 8)
        self.act = SqrtOfSquare()
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, ids, labels=None):
        logits = self.head(self.act(self.body(self.emb(ids))))
        if self.kind == "outside":
            return logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        if self.kind == "dict":
            return {"loss": loss, "logits": logits}
        if self.kind == "tuple":
            return loss, logits
        return LMOutput(loss=loss, logits=logits)


def lm_batches(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (4, 6), generator=g),
             torch.randint(0, VOCAB, (4, 6), generator=g)) for _ in range(n)]


def lm_run(tmp_path, kind, data, before_step=None, **options):
    model = TinyLM(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with NanGuard(model, opt, dump_dir=str(tmp_path), **options) as guard:
        for i, (ids, labels) in enumerate(data):
            if before_step is not None:
                before_step(i, model, ids)
            opt.zero_grad()
            with guard.step(ids, targets=labels):
                if kind == "outside":
                    loss = F.cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
                elif kind == "tuple":
                    loss = model(ids, labels=labels)[0]
                elif kind == "dict":
                    loss = model(ids, labels=labels)["loss"]
                else:
                    loss = model(ids, labels=labels).loss
                guard.backward(loss)
                opt.step()
    return guard


@pytest.mark.parametrize("logits_module", [None, "head"])
def test_a_bad_label_read_by_a_loss_inside_forward_is_a_target_invalid_skip(
        tmp_path, logits_module):
    # The model's forward raises on the label (IndexError on the CPU) before it returns, so
    # the forward hook on its output never runs: the loss's error names the id. With
    # logits_module="head" the guard sees the logits first and knows the class count.
    data = lm_batches(6)
    data[3][1][1, 2] = VOCAB + 3
    guard = lm_run(tmp_path, "dataclass", data, logits_module=logits_module)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "target_invalid", "targets")
    assert f"the first is {VOCAB + 3} (batch row 1, position 2)" in event.message
    if logits_module is None:
        assert "logits_module=" in event.message  # what would let it check before the loss
    else:
        assert f"outside [0, {VOCAB})" in event.message
    assert [r.action for r in guard.history] == [None, None, None, "skip", None, None]
    assert int(data[3][1][1, 2]) == VOCAB + 3
    assert nanguard.load(guard.dumps[0]).tensors["targets"][1, 2] == VOCAB + 3


def zero_at_step(step):
    """Make one hidden unit exactly 0 at ``step``: sqrt(x * x)'s backward is NaN there."""

    def before_step(i, model, ids):
        if i == step:
            ids[0, 0] = 3
            with torch.no_grad():
                model.emb.weight[3].zero_()
                model.body.bias[0] = 0.0

    return before_step


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
def test_an_output_holding_the_loss_beside_the_logits(tmp_path, kind):
    # The logits are the output (a 0-dim loss never counts as the logits), and the backward
    # replay starts from the logits' gradient alone, which already holds what flowed through
    # the loss: the same numbers as with the loss computed outside the model.
    data = lm_batches(6)
    ref = lm_run(tmp_path / "outside", "outside", data, zero_at_step(4))
    got = lm_run(tmp_path / kind, kind, data, zero_at_step(4))
    assert [(r.logits_min, r.logits_max) for r in got.history] == [
        (r.logits_min, r.logits_max) for r in ref.history]
    assert all(r.logits_min < r.logits_max for r in got.history)
    def seen(guard):
        return [(e.step, e.cause, e.where, e.details["replay"]["grad_output"])
                for e in guard.events]

    assert seen(got) == seen(ref)
    assert seen(got)[0][:3] == (4, "grad_nonfinite", "act")
    grads = {k: v for k, v in nanguard.load(got.dumps[0]).tensors.items()
             if k.startswith("replay.output_grad.")}
    assert [v.shape for v in grads.values()] == [(4, 6, VOCAB)]  # the logits' only


def test_a_nan_written_into_a_frozen_parameter_is_rolled_back(tmp_path):
    # Fine-tuning a head on a frozen backbone (requires_grad=False, not in the optimizer).
    # A NaN loaded into the backbone mid-run is no activation's fault: it is weights_nonfinite,
    # no snapshot is taken of it, and the rollback brings the backbone back.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for p in model[:4].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model[4].parameters(), lr=1e-2)
    clean = model[2].weight.detach().clone()

    def corrupt(i):
        if i == 3:
            with torch.no_grad():
                model[2].weight[5, 7] = float("nan")

    with NanGuard(model, opt, snapshot_every=1, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(6), before_step=corrupt)
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "weights_nonfinite", "2.weight")
    assert "frozen" in event.message
    assert [r.action for r in guard.history] == [None, None, None, "rollback", None, None]
    assert torch.equal(model[2].weight, clean) and weights_finite(model)


@pytest.mark.parametrize("logits_module", [None, "2"])
def test_a_guarded_model_saved_or_copied_whole_carries_no_guard(tmp_path, logits_module):
    # torch.save(model) of the whole module, an EMA teacher made with copy.deepcopy, an
    # AveragedModel: the guard's hooks on the model become no-ops in the file and the copy.
    def size(module):
        buf = io.BytesIO()
        torch.save(module, buf)
        return len(buf.getvalue())

    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(4)
    plain, plain_averaged = size(model), size(torch.optim.swa_utils.AveragedModel(model))
    guard = NanGuard(model, opt, logits_module=logits_module, dump_dir=str(tmp_path))
    run(guard, model, opt, data[:2])
    saved = io.BytesIO()
    torch.save(model, saved)
    x, y = data[2]
    with torch.no_grad():
        expected = model(x)
    teacher = copy.deepcopy(model)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    # The model's own size: no engine, optimizer or snapshot in the file.
    assert len(saved.getvalue()) < plain + 512 and size(teacher) < plain + 512
    assert size(averaged) < plain_averaged + 512
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(100.0)  # a far wider output than the student's
    with guard.step(x, targets=y):
        with torch.no_grad():
            teacher(x)
            averaged(x)
        logits = model(x)
        guard.backward(F.cross_entropy(logits, y))
        opt.step()
    assert guard.history[-1].logits_max == pytest.approx(float(logits.detach().max()))
    guard.close()
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_a_step_that_raises_still_counts(tmp_path):
    # "Skip the batch on out-of-memory": the loop catches an error raised inside the step
    # and goes on. That step still counts, so later steps are numbered by the batch index.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(7)
    data[5][0][0, 0] = float("nan")
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        try:
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                if i == 2:
                    raise RuntimeError("CUDA out of memory (simulated)")
                opt.step()
        except RuntimeError:
            continue
    guard.close()
    assert guard.step_count == 7
    assert [r.step for r in guard.history] == [0, 1, 3, 4, 5, 6]  # nothing measured at 2
    (event,) = guard.events
    assert (event.step, event.cause) == (5, "input_nonfinite")


def test_a_float64_run_is_judged_in_float64(tmp_path):
    # Targets in the 1e40s (scientific units): the loss (~1e80) and the gradients (~1e40)
    # are finite in float64, past float32's range; nothing is wrong with the step.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64) * 1e40
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for _ in range(3):
            opt.zero_grad()
            with guard.step(x, targets=y):
                loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
                guard.backward(loss)
                opt.step()
    assert [r.action for r in guard.history] == [None, None, None]
    assert guard.history[0].loss == pytest.approx(float(loss), rel=1e-3)
    assert 1e39 < guard.history[0].grad_norm < 1e42
    assert not guard.events and not list(tmp_path.iterdir())


def test_a_parameter_without_gradient_has_a_zero_norm_not_a_nan(tmp_path):
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 3)
            self.unused = torch.nn.Linear(4, 3)  # a pooler the loss never reaches

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for _ in range(6):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(torch.nn.functional.cross_entropy(model(x), y))
                opt.step()
    norms = guard.history[-1].layer_grad_norms
    assert norms[2:] == [0.0, 0.0] and all(n > 0 for n in norms[:2])
    # Steps with an unused parameter still count as healthy for the growth analysis.
    grown = nanguard.detector.layer_growth(
        [*guard.history, nanguard.StepRecord(step=6, loss=1.0, grad_norm=1.0,
                                             layer_grad_norms=[n * 100 for n in norms])])
    assert grown is not None and grown["step"] == 6


class MaskedAttention(torch.nn.Module):
    """Older attention code: a causal mask of -inf kept as a frozen parameter."""

    def __init__(self, t=6, d=8, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.q, self.k = (torch.nn.Linear(3, d), torch.nn.Linear(d, d),
                                    torch.nn.Linear(d, d))
        self.head = torch.nn.Linear(d, classes)
        self.mask = torch.nn.Parameter(torch.full((t, t), -math.inf).triu(1),
                                       requires_grad=False)

    def forward(self, x):
        h = self.emb(x)
        a = (self.q(h) @ self.k(h).transpose(1, 2)) / 3 + self.mask
        return self.head((a.softmax(-1) @ h).mean(1))


@pytest.mark.parametrize("mask_in_optimizer", [False, True])
def test_a_frozen_parameter_holding_an_intended_inf_blocks_nothing(tmp_path, mask_in_optimizer):
    model = MaskedAttention()
    params = model.parameters() if mask_in_optimizer else (
        p for p in model.parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, snapshot_every=5, dump_dir=str(tmp_path)) as guard:
        for i in range(14):
            x, y = torch.randn(8, 6, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
            if i == 12:
                x[0, 0, 0] = math.nan
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (12, "input_nonfinite", "skip")]
    assert guard.snapshot_step == 10
    assert torch.isinf(model.mask).sum() == 15  # the mask as it was


def test_an_unrelated_error_on_a_step_with_bad_labels_still_reaches_the_loop(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 2, 0, 1, 2, 0])
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for _ in range(2):  # the loss's gradient shows the output scores classes
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
        bad = y.clone()
        bad[0] = 5
        opt.zero_grad()
        with pytest.raises(ValueError, match="bug in my metric code"), guard.step(x, targets=bad):
            guard.backward(F.cross_entropy(model(x), bad))  # the guard defused the 5 first
            raise ValueError("bug in my metric code")
        # The bad labels are still the step's event, and its update never comes.
        assert [(e.step, e.cause) for e in guard.events] == [(2, "target_invalid")]
        assert guard.step_count == 3 and bad[0] == 5


def test_a_rejected_id_held_by_several_target_tensors_is_not_pinned_on_one(tmp_path):
    class TwoTasks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(4, 10), torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    model = TwoTasks()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    ya, yb = torch.tensor([0, 4, 9, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3, 0, 4, 1, 2])
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with guard.step(x, targets={"a": ya, "b": yb}):
        out = model(x)  # head a (10 classes) is the logits the guard sees
        loss = F.cross_entropy(out["a"], ya) + F.cross_entropy(out["b"], yb)  # raises
        guard.backward(loss)
        opt.step()
    guard.close()
    (event,) = guard.events
    assert (event.cause, event.where) == ("target_invalid", "targets")
    assert "targets.a, targets.b all hold the id 4" in event.message
    assert "before nanguard saw the logits" not in event.message


@pytest.mark.parametrize("how", ["next_step", "close"])
def test_an_abort_on_an_overflowed_update_leaves_the_snapshot_in_the_model(tmp_path, how):
    # The update is found after it reached the weights; the ladder aborts (no rollback
    # rung). The dump keeps the non-finite state for the post-mortem, and the model the
    # loop gets back is the last finite snapshot's, bit for bit, with its optimizer state.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    last = 5 if how == "next_step" else 3
    snap = {}

    def boost(i):
        if i == 3:  # the snapshot due at step 3 (snapshot_every=3) is taken at this step
            opt.param_groups[0]["lr"] = 3e38
        else:
            opt.param_groups[0]["lr"] = 1e-2

    def keep(i):
        boost(i)
        if i == 3:
            snap["model"] = state_copy(model)
            snap["opt"] = [opt.state[p]["momentum_buffer"].clone()
                           for p in model.parameters()]

    guard = NanGuard(model, opt, actions=("skip", "abort"), snapshot_every=3,
                     dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        run(guard, model, opt, batches(last + 1), before_step=keep,
            loss_fn=lambda o, y: F.cross_entropy(o, y) * 100.0)
        guard.close()
    event = info.value.event
    assert (event.step, event.cause, event.action) == (3, "update_nonfinite", "abort")
    assert "back to the last finite snapshot" in event.message
    assert weights_finite(model)
    assert same_bits(state_copy(model), snap["model"])
    for p, saved in zip(model.parameters(), snap["opt"], strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], saved)
    dump = nanguard.load(info.value.dump_path)
    assert (dump.event.step, dump.event.cause) == (3, "update_nonfinite")
    weights = [v for k, v in dump.state.items() if k.startswith("model.")]
    assert weights and not all(np.isfinite(v).all() for v in weights)


def test_weights_blown_up_but_finite_are_named_with_the_learning_rate(tmp_path):
    # A one-step LR spike leaves the weights finite but ~1e35: the next forward overflows.
    # The output is the first non-finite thing (logits_nonfinite), and the message says the
    # weights are huge, which, not an unstable operation, is what to fix.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def spike(i):
        opt.param_groups[0]["lr"] = 1e36 if i == 3 else 1e-2

    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(5), before_step=spike)
    event = guard.events[0]
    assert (event.step, event.cause) == (4, "logits_nonfinite")
    assert "finite but huge" in event.message and "learning rate" in event.message
    assert "naive softmax" not in event.message
    peak = nanguard.load(guard.dumps[0]).event.details["weights_peak"]
    assert peak["name"].startswith(("0.", "2.")) and 1e8 <= peak["value"] < 3.4e38


def test_without_rollback_an_overflowed_update_is_repaired_from_the_snapshot(tmp_path):
    # actions=("skip",): the bad update is found after it, when it is in the weights
    # already (right after it on the CPU). It was logged and the run trained on from Inf
    # weights. The skip now puts back from the snapshot the parameters it made non-finite
    # and those it blew up to ~1e38 (finite, but every later step would overflow), each with
    # its momentum; the rest is left as it is, and training goes on.
    model = mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD([{"params": first}, {"params": second}], lr=1e-2, momentum=0.9)
    seen = {}

    def boost(i):
        opt.param_groups[0]["lr"] = 3e38 if i == 3 else 1e-2  # the first layer's group
        seen["i"] = i
        if i == 4:  # after the step that repaired it
            seen[5] = {n: p.detach().clone() for n, p in model.named_parameters()}
            seen["momentum5"] = [opt.state[p]["momentum_buffer"].clone() for p in first]
            seen["snapshot"] = {k: v.clone() for k, v in guard._engine.snapshot.model.items()}
            seen["snapshot_momentum"] = [
                guard._engine.snapshot.optim[0][k]["momentum_buffer"][0].clone()
                for k in range(len(first))]

    def after_bad_update(o, a, k):  # right after step 3's update, before the guard reads it
        if seen.get("i") == 3:
            seen[4] = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt.register_step_post_hook(after_bad_update)  # first: runs before the guard's own
    guard = NanGuard(model, opt, actions=("skip",), snapshot_every=2, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(8), loss_fn=lambda o, y: F.cross_entropy(o, y) * 100.0,
        before_step=boost)
    guard.close()
    assert weights_finite(model)
    assert [r.action for r in guard.history][3:] == ["skip", None, None, None, None]
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (3, "update_nonfinite", "skip")
    assert "non-finite or blown up" in event.message
    assert event.details["repaired"] == ["0.weight", "0.bias"]
    assert "Put back: 0.weight, 0.bias." in event.message
    assert nanguard.load(guard.dumps[0]).event.details["repaired"] == ["0.weight", "0.bias"]
    after, repaired, snap = seen[4], seen[5], seen["snapshot"]
    for name in ("0.weight", "0.bias"):  # Inf or ~1e38 after the spike; the snapshot's now
        assert not torch.isfinite(after[name]).all() or float(after[name].abs().max()) >= 1e8
        assert torch.equal(repaired[name], snap[name])
    for a, b in zip(seen["momentum5"], seen["snapshot_momentum"], strict=True):
        assert torch.equal(a, b)
    for name in ("2.weight", "2.bias"):  # left as they were (step 4's update kept out)
        assert torch.equal(repaired[name], after[name])
    assert len(guard.events) == 1  # steps 5-7 trained on


def test_a_skip_only_ladder_repairs_weights_a_spike_blew_up_without_any_inf(tmp_path):
    # One step at lr=1e36 leaves finite weights of ~1e36: every later step overflowed and was
    # skipped for the rest of the run (no Inf, so no repair). They are put back now.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def spike(i):
        opt.param_groups[0]["lr"] = 1e36 if i == 3 else 0.05

    guard = NanGuard(model, opt, actions=("skip",), snapshot_every=2, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(12), before_step=spike)
    actions = [r.action for r in guard.history]
    assert actions.count("skip") == 1 and actions[-4:] == [None] * 4
    assert "blown up" in guard.events[0].message
    assert float(max(p.abs().max() for p in model.parameters())) < 100


def test_an_abort_leaves_the_optimizer_unhooked(tmp_path):
    # The loop's guard.close() is skipped by the abort: the optimizer must still work after
    # it, for a plain step and for a retry under a new guard.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4)
    data[1][0][0, 0] = math.nan
    guard = NanGuard(model, opt, actions=("abort",), dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError):
        run(guard, model, opt, data)
    x, y = data[0]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # no "outside guard.step()" error from the dead guard
    retry = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(retry, model, opt, [data[0], data[2]])
    retry.close()
    assert [r.action for r in retry.history] == [None, None]


def test_a_new_guard_takes_over_from_one_left_open(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(old, model, opt, batches(2))  # never closed (a notebook cell run again)
    with pytest.warns(RuntimeWarning, match="earlier NanGuard"):
        new = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(new, model, opt, batches(3))
    assert len(new.history) == 3 and len(old.history) == 2
    with pytest.raises(RuntimeError, match="closed"):
        old.step()
    new.close()


def test_a_second_update_in_one_step_is_an_error(tmp_path):
    # Two backward/step pairs in one guard.step() (n_critic=2): the second would go
    # unchecked, so it is refused, as is stepping one optimizer twice.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), (x2, y2) = batches(2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with (pytest.raises(RuntimeError, match="after an optimizer already stepped"),
          guard.step(x, targets=y)):
        guard.backward(F.cross_entropy(model(x), y))
        opt.step()
        guard.backward(F.cross_entropy(model(x2), y2))
    opt.zero_grad()
    with (pytest.raises(RuntimeError, match="ran twice in one guard.step"),
          guard.step(x, targets=y)):
        guard.backward(F.cross_entropy(model(x), y))
        opt.step()
        F.cross_entropy(model(x2), y2).backward()
        opt.step()
    guard.close()


def test_a_small_history_size_keeps_detection_and_dumps_whole(tmp_path):
    # history_size cuts what users and dumps see, not what the detector looks back over:
    # snapshot timing and the growth before an explosion are the same at 1 as at 256.
    def diverge(history_size):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = NanGuard(model, opt, history_size=history_size, snapshot_every=5,
                         actions=("skip", "rollback", "lower_lr"),
                         dump_dir=str(tmp_path / str(history_size)))
        x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
        y = x.sum(1, keepdim=True)
        for s in range(20):
            xb, yb = x[s * 8:(s + 1) * 8], y[s * 8:(s + 1) * 8]
            opt.param_groups[0]["lr"] = 0.01 * 1.8 ** s  # a runaway warm-up
            opt.zero_grad()
            with guard.step(xb, targets=yb):
                guard.backward(F.mse_loss(model(xb), yb))
                opt.step()
            if guard.events:
                break
        guard.close()
        return guard

    small, large = diverge(1), diverge(256)
    assert [(e.step, e.cause) for e in small.events] == [(e.step, e.cause) for e in large.events]
    assert small.events[0].cause == "grad_explosion"
    assert small.snapshot_step == large.snapshot_step
    assert len(small.history) == 1
    assert [h.step for h in nanguard.load(small.dumps[0]).history] == [small.events[0].step]


def test_a_late_update_event_with_history_size_1_dumps_its_step(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def boost(i):
        opt.param_groups[0]["lr"] = 3e38 if i == 3 else 1e-2

    guard = NanGuard(model, opt, history_size=1, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(6), loss_fn=lambda o, y: F.cross_entropy(o, y) * 100.0,
        before_step=boost)
    guard.close()
    assert guard.events[0].cause == "update_nonfinite"
    assert [h.step for h in nanguard.load(guard.dumps[0]).history] == [3]


def test_finite_gradients_whose_norm_overflows_are_not_blamed_on_an_unstable_op(tmp_path):
    # Raw features of about 1e10 on a linear model: every gradient entry is finite (about
    # 1e20) but their float32 L2 norm overflows. The step is still bad (the norm is what
    # clip_grad_norm_ and the contract read), but the message must say what the numbers show.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 4) * 1e10
    y = torch.randn(16, 1)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard, guard.step(x, targets=y):
        guard.backward(F.mse_loss(model(x), y))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    (event,) = guard.events
    assert event.cause == "grad_nonfinite" and math.isinf(guard.history[0].grad_norm)
    assert event.details["grad_entries_finite"] is True
    assert "every gradient entry is finite" in event.message and "sqrt" not in event.message


def test_closing_with_an_accumulation_step_open_warns(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), (x2, y2) = batches(2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, [(x, y)])
    with guard.step(x2, targets=y2):  # a micro-batch whose optimizer.step() never comes
        guard.backward(F.cross_entropy(model(x2), y2))
    with pytest.warns(RuntimeWarning, match="step still open: 1 guard.step"):
        guard.close()
    assert guard.step_count == 1


def test_a_late_update_dump_keeps_its_batch_across_a_step_that_never_measured(tmp_path):
    # Step 2's update overflows; step 3 raises (an out-of-memory the loop goes on from) before
    # any measurement. On the CPU step 2's own end finds the bad update (on a GPU, step 4
    # would). The dump is step 2's batch (batch i is filled with i), and once read the batch
    # is not held any longer.
    model = mlp(n_in=6, n_out=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    for i in range(6):
        x, y = torch.full((4, 6), float(i)), torch.full((4,), i % 3)
        opt.zero_grad()
        try:
            with guard.step(x, targets=y):
                if i == 3:
                    raise MemoryError("simulated")
                guard.backward(F.cross_entropy(model(x), y))
                opt.param_groups[0]["lr"] = math.inf if i == 2 else 0.1
                opt.step()
        except MemoryError:
            pass
    event = guard.events[0]
    assert (event.step, event.cause, event.details["detected_at_step"]) == (
        2, "update_nonfinite", 2)
    assert (nanguard.load(guard.dumps[0]).tensors["inputs"] == 2.0).all()
    guard.check_last_update()  # step 5's update is finite: nothing is held for it
    assert guard._engine.last_batch is None
    guard.close()


def test_a_late_update_dump_keeps_a_tensor_passed_unchanged_every_step(tmp_path):
    # Contrastive training: the labels tensor arange(B) is made once and passed every step.
    # Unchanged, it is still the culprit step's; only tensors refilled in place are left out.
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.arange(8)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(6):
            x = torch.full((8, 6), float(i)) + torch.randn(8, 6) * 0.1
            opt.zero_grad()
            with guard.step(x, targets=labels):
                guard.backward(F.cross_entropy(model(x), labels))
                opt.param_groups[0]["lr"] = math.inf if i == 3 else 0.1
                opt.step()
    event = guard.events[0]
    assert (event.step, event.cause) == (3, "update_nonfinite")
    dump = nanguard.load(guard.dumps[0])
    assert sorted(dump.tensors) == ["inputs", f"localized.{event.where}", "targets"]
    assert abs(float(dump.tensors["inputs"].mean()) - 3.0) < 0.1
    assert dump.tensors["targets"].tolist() == list(range(8))


def test_a_constructor_that_fails_does_not_take_over(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = NanGuard(model, opt, dump_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no takeover warning either
        with pytest.raises(ValueError, match="logits_module"):
            NanGuard(model, opt, logits_module="no_such_head", dump_dir=str(tmp_path))
    run(old, model, opt, batches(2))  # the first guard still guards
    assert len(old.history) == 2
    old.close()


def test_rollback_reaches_weights_pruning_renamed_since_the_snapshot(tmp_path):
    # torch.nn.utils.prune turns `0.weight` into the parameter `0.weight_orig` (the same
    # tensor) and a `0.weight_mask` buffer: the rollback finds it under its new name.
    prune = pytest.importorskip("torch.nn.utils.prune")
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(10)
    for i in (5, 6, 7, 8):
        data[i][0][0, 0] = float("nan")
    seen = {}

    def before(i):
        if i == 0:
            seen["snapshot"] = model[0].weight.detach().clone()
        if i == 2:
            prune.l1_unstructured(model[0], "weight", amount=0.5)
        if i == 9:  # right after the rollback
            seen["restored"] = model[0].weight_orig.detach().clone()

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, before_step=before)
    assert [r.action for r in guard.history][5:] == ["skip", "skip", "skip", "rollback", None]
    assert torch.equal(seen["restored"], seen["snapshot"])  # bit for bit, under its new name
    assert weights_finite(model)


@pytest.mark.parametrize("how", ["load_state_dict", "in_place"])
def test_optimizer_state_gone_inf_is_found_when_a_snapshot_is_taken(tmp_path, how):
    # An Inf in Adam's second moment (a corrupt optimizer checkpoint; a float16 state that
    # overflowed): the update of that weight is m / sqrt(inf) = 0 from then on, the weights
    # stay finite, and no per-step check reads the state. The next snapshot finds it (right
    # after a load_state_dict, else when one is due): weights_nonfinite, rolled back at once.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    found_at = 6 if how == "load_state_dict" else 8
    seen = {}

    def corrupt(i):
        if i == 4:
            seen["snapshot"] = state_copy(model)  # the step-4 snapshot is taken next
        if i == 6 and how == "load_state_dict":
            state = opt.state_dict()
            state["state"][0]["exp_avg_sq"][0, 0] = float("inf")
            opt.load_state_dict(state)
        if i == 6 and how == "in_place":
            opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("inf")
        if i == found_at + 1:
            seen["restored"] = state_copy(model)

    with NanGuard(model, opt, snapshot_every=4, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(11), before_step=corrupt)
    (event,) = guard.events
    assert (event.step, event.cause) == (found_at, "weights_nonfinite")
    assert event.where == "optimizer.0.weight.exp_avg_sq"
    actions = [r.action for r in guard.history]
    assert actions[found_at] == "rollback" and actions.count(None) == 10
    assert same_bits(seen["restored"], seen["snapshot"])
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values())
    assert weights_finite(model)
    assert nanguard.load(guard.dumps[0]).event.cause == "weights_nonfinite"


def test_an_eps_that_is_zero_in_float16_is_named_not_a_corrupt_checkpoint(tmp_path):
    # model.half() with Adam's eps=1e-8, which is 0 in float16: Adam's own update divides
    # 0 by 0. It was update_nonfinite at one step and, at the next, "the NaN was there
    # before the step ... a corrupt checkpoint" (an optimizer that "never makes a NaN").
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).half()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with NanGuard(model, opt, dump_dir=str(tmp_path), snapshot_every=2) as guard:
        for _ in range(3):  # each update is a rollback (max_rollbacks=3: the 4th aborts)
            x = torch.randn(5, 8, generator=g).half()
            y = torch.randint(0, 4, (5,), generator=g)
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x).float(), y))
                opt.step()
    assert len(guard.events) >= 2
    for event in guard.events:
        assert event.cause == "update_nonfinite"
        assert "eps=1e-08 is 0 in float16" in event.message
        assert "corrupt" not in event.message
    assert nanguard.load(guard.dumps[0]).event.cause == "update_nonfinite"
    assert weights_finite(model)


def test_non_finite_optimizer_state_spread_by_an_update_is_named(tmp_path):
    # A NaN in Adam's first moment turns the next update into NaN weights: the cause is the
    # state, not a too-large update (the gradients and the learning rate are fine).
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def corrupt(i):
        if i == 5:
            opt.state[model[2].weight]["exp_avg"][1, 3] = float("nan")

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(8), before_step=corrupt)
    (event,) = guard.events
    assert (event.step, event.cause) == (5, "weights_nonfinite")
    assert event.where == "optimizer.2.weight.exp_avg"
    assert "optimizer's state was non-finite" in event.message
    assert event.action == "rollback" and weights_finite(model)
    # The dump holds the state tensor it names, as it was.
    state = nanguard.load(guard.dumps[0]).tensors["localized.optimizer.2.weight.exp_avg"]
    assert state.shape == (4, 32) and np.isnan(state[1, 3])


def test_a_nan_in_an_unused_frozen_parameter_is_reported_at_the_first_snapshot(tmp_path):
    # A checkpoint's spare head, frozen and never called, holds a NaN: no snapshot can be
    # taken, so the first bad batch would find nothing to roll back to. The guard says so at
    # once, naming the tensor, instead of training on without snapshots.
    class WithSpareHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.pooler = torch.nn.Linear(4, 4).requires_grad_(False)
            with torch.no_grad():
                self.pooler.weight[1, 2] = float("nan")

        def forward(self, x):
            return self.body(x)

    model = WithSpareHead()
    opt = torch.optim.Adam(model.body.parameters(), lr=1e-2)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as err:
        run(guard, model, opt, batches(4))
    event = err.value.event
    assert (event.step, event.cause, event.where) == (0, "weights_nonfinite", "pooler.weight")
    assert "frozen" in event.message

    # Without abort in actions: logged once, and training goes on.
    model = WithSpareHead()
    opt = torch.optim.Adam(model.body.parameters(), lr=1e-2)
    with NanGuard(model, opt, actions=("skip", "rollback"), dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(4))
    assert [r.action for r in guard.history] == ["log", None, None, None]
    assert weights_finite(model.body)


def test_a_rollback_never_goes_back_past_a_checkpoint_the_loop_loaded(tmp_path):
    # "Reload the best weights so far" mid-run: the next step takes a fresh snapshot, so a
    # later rollback lands on the reloaded state, not on an older snapshot.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(12)
    for i in (8, 9, 10, 11):
        data[i][0][0, 0] = float("nan")
    seen = {}

    def before(i):
        if i == 3:
            seen["best"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        if i == 6:
            model.load_state_dict(seen["best"][0])
            opt.load_state_dict(seen["best"][1])
            seen["reloaded"] = state_copy(model)

    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, before_step=before)
        assert guard.snapshot_step == 6
    assert [r.action for r in guard.history][8:] == ["skip", "skip", "skip", "rollback"]
    assert same_bits(state_copy(model), seen["reloaded"])  # the last step rolled back


class DoubleBuffered(torch.nn.Module):
    """Keeps its last two batch summaries in buffers swapped each forward (no allocation),
    and the previous running mean beside the current one by reassignment."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(n_in=16)
        self.register_buffer("prev", torch.zeros(8))
        self.register_buffer("cur", torch.zeros(8))
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("prev_mean", torch.zeros(8))

    def forward(self, x):
        self.prev, self.cur = self.cur, self.prev
        self.cur.copy_(x.detach().mean(0))
        self.prev_mean = self.mean
        self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return self.net(torch.cat([x - self.mean, self.prev.expand_as(x)], 1))


def test_buffers_swapped_or_reassigned_are_restored_by_name(tmp_path):
    # The tensor a snapshot saved under `cur` is `prev` now: each name gets its own value
    # back (bit for bit), and a NaN the bad batch wrote into `mean` is repaired on a skip.
    model = DoubleBuffered()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(9, n_in=8)
    data[4][0][0, 0] = float("nan")
    data[7][0][0, 0] = float("nan")
    seen = {}

    def before(i):
        if i == 4:
            seen["snapshot"] = state_copy(model)  # the step-4 snapshot (snapshot_every=4)
        if i == 5:
            seen["after_skip"] = state_copy(model)

    with NanGuard(model, opt, snapshot_every=4, actions=("skip", "rollback", "abort"),
                  max_skips=1, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data, before_step=before)
    assert [r.action for r in guard.history] == [None] * 4 + ["skip", None, None,
                                                              "skip", None]
    assert all(torch.isfinite(v).all() for v in seen["after_skip"].values())
    assert torch.equal(seen["after_skip"]["mean"], seen["snapshot"]["mean"])

    model = DoubleBuffered()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen.clear()
    with NanGuard(model, opt, snapshot_every=4, actions=("rollback", "abort"),
                  dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, data[:6], before_step=before)
    assert [r.action for r in guard.history][4] == "rollback"
    assert same_bits(seen["after_skip"], seen["snapshot"])


def test_optimizer_state_going_bad_again_after_a_rollback_is_found_again(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def corrupt(i):
        if i in (5, 9):  # the second before any new snapshot could be taken
            opt.state[model[0].weight]["exp_avg_sq"][0, 0] = float("inf")

    with NanGuard(model, opt, snapshot_every=4, dump_dir=str(tmp_path)) as guard:
        run(guard, model, opt, batches(16), before_step=corrupt)
    causes = [(e.step, e.cause, e.action) for e in guard.events]
    assert causes[0] == (8, "weights_nonfinite", "rollback")
    assert len(causes) == 2 and causes[1][1:] == ("weights_nonfinite", "rollback")
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values())


def test_a_16_bit_momentum_that_overflows_in_the_update_is_update_nonfinite(tmp_path):
    # float16 state can overflow in the update itself (0.9 * buf + g past 65504): that is
    # the update's fault, not a state that was bad before the step.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).half()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)
    guard = NanGuard(model, opt, actions=("skip", "rollback"), dump_dir=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.rand(32, 4, generator=g) * 200 + 100).half()  # raw features
        y = torch.full((32, 1), 100.0)
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(F.mse_loss(model(x).float(), y))
            opt.step()
    guard.close()
    assert guard.events and guard.events[0].cause == "update_nonfinite"
    assert weights_finite(model)


def test_ctrl_c_while_a_snapshot_copies_leaves_the_guard_usable(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = []

    def interrupt_second_copy(module, prefix, keep_vars):
        copies.append(prefix)
        if len(copies) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, inside a large model's copy

    model.register_state_dict_pre_hook(interrupt_second_copy)
    guard = NanGuard(model, opt, snapshot_every=2, dump_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run(guard, model, opt, batches(5))
    assert guard.step_count == 2  # steps 0 and 1 ran; step 2 never began
    run(guard, model, opt, batches(3))  # the cell run again
    assert [r.step for r in guard.history] == [0, 1, 2, 3, 4]
    guard.close()


def test_ctrl_c_on_a_bad_steps_slow_path_counts_the_step_once(tmp_path):
    import logging

    class Interrupting(logging.Handler):
        def emit(self, record):
            logger.removeHandler(self)
            raise KeyboardInterrupt  # arrives while the event is being reported

    logger = logging.getLogger("nanguard")
    logger.addHandler(Interrupting())
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(6)
    data[3][0][0, 0] = float("nan")
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run(guard, model, opt, data)
    assert guard.step_count == 4
    run(guard, model, opt, batches(2))
    assert [r.step for r in guard.history] == [0, 1, 2, 3, 4, 5]
    guard.close()


def test_a_micro_batch_that_raises_keeps_the_accumulation_step(tmp_path):
    # "Skip the batch on out-of-memory" in an accumulating loop: the step index still counts
    # optimizer steps.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    k, steps_taken, skipped = 4, 0, []
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    for i, (x, y) in enumerate(batches(16)):
        try:
            with guard.step(x, targets=y):
                if i == 5:
                    raise RuntimeError("CUDA out of memory (simulated by the loop)")
                guard.backward(F.cross_entropy(model(x), y) / k)
                if i % k == k - 1:
                    opt.step()
                    opt.zero_grad()
                    steps_taken += 1
        except RuntimeError as err:
            skipped.append(str(err))
    guard.close()
    assert skipped == ["CUDA out of memory (simulated by the loop)"]
    assert steps_taken == 4
    assert [r.step for r in guard.history] == [0, 1, 2, 3] and guard.step_count == 4


def test_an_optimizer_created_again_under_an_old_guard_is_warned_about(tmp_path):
    # A notebook: the optimizer cell is run again with a new learning rate, the guard cell is
    # not. The new optimizer's steps go unguarded and the guard sees one endless
    # "accumulation step": it says so, once, after OPEN_WARN contexts.
    from nanguard._torch_engine import OPEN_WARN

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    run(guard, model, opt, batches(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match="optimizer created again") as seen:
        run(guard, model, opt, [(x, y)] * (OPEN_WARN + 5))
    assert len([w for w in seen if "created again" in str(w.message)]) == 1
    assert guard.step_count == 3
    guard._engine.end_step()  # drop the endless step: close() would warn about it
    guard.close()


def test_a_micro_batch_that_raises_keeps_the_accumulation_step_with_a_scaler(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    k, steps_taken, skipped = 4, 0, []
    guard = NanGuard(model, opt, scaler=scaler, dump_dir=str(tmp_path))
    for i, (x, y) in enumerate(batches(16)):
        try:
            with guard.step(x, targets=y):
                if i == 5:
                    raise RuntimeError("out of memory (simulated by the loop)")
                guard.backward(scaler.scale(F.cross_entropy(model(x), y) / k))
                if i % k == k - 1:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
                    steps_taken += 1
        except RuntimeError as err:
            skipped.append(str(err))
    guard.close()
    assert len(skipped) == 1 and steps_taken == 4
    assert [r.step for r in guard.history] == [0, 1, 2, 3] and guard.step_count == 4


def test_a_snapshot_owed_after_a_load_survives_a_ctrl_c_during_its_copy(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    copies = []

    def interrupt_once_after_the_load(module, prefix, keep_vars):
        copies.append(prefix)
        if len(copies) == 1:
            raise KeyboardInterrupt

    guard = NanGuard(model, opt, dump_dir=str(tmp_path), max_skips=0)
    run(guard, model, opt, batches(2))  # a snapshot before step 0
    checkpoint = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(checkpoint)
    model.register_state_dict_pre_hook(interrupt_once_after_the_load)
    with pytest.raises(KeyboardInterrupt):
        run(guard, model, opt, batches(1))
    data = batches(2)
    data[1][0][0, 0] = float("nan")  # a rollback at the second step
    run(guard, model, opt, data)
    assert [r.action for r in guard.history][-1] == "rollback"
    assert guard.snapshot_step == 2  # the snapshot owed since the load, taken again
    # the rollback restored the loaded checkpoint, not the step-0 snapshot's weights
    assert all(bool((v == 0.5).all()) for v in model.state_dict().values())
    guard.close()


def test_accumulating_through_an_embedding_that_renormalises_in_place_is_no_error(tmp_path):
    # Embedding(max_norm=...) rescales its rows in place in the forward: the parameters
    # change between micro-batches while the loop accumulates, and that is fine.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8, max_norm=0.5), torch.nn.Flatten(),
                                torch.nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(16):
            x = torch.randint(0, 20, (16, 3), generator=g)
            y = torch.randint(0, 4, (16,), generator=g)
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y) / 4)
                if i % 4 == 3:
                    opt.step()
                    opt.zero_grad()
    assert [r.step for r in guard.history] == [0, 1, 2, 3] and not guard.events


def test_a_warm_up_that_clears_gradients_without_stepping_is_no_error(tmp_path):
    # Gathering gradient statistics for a few batches (zero_grad, backward, no step) on a
    # model whose forward changes a parameter in place (Embedding(max_norm=...)), then
    # training: no false alarm about an unhooked optimizer.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8, max_norm=0.5), torch.nn.Flatten(),
                                torch.nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
            for i in range(7):
                x = torch.randint(0, 20, (16, 3), generator=g)
                y = torch.randint(0, 4, (16,), generator=g)
                opt.zero_grad()
                with guard.step(x, targets=y):
                    guard.backward(F.cross_entropy(model(x), y))
                    if i >= 3:  # after the warm-up
                        opt.step()
    assert [r.step for r in guard.history] == [0, 1, 2, 3] and not guard.events


def test_a_one_step_lr_spike_before_a_due_snapshot_is_not_snapshotted(tmp_path):
    # The user's schedule sets lr=1e37 for one step: the update leaves finite weights of
    # ~1e36 just before the snapshot due at step 4, whose loss is still unknown. Taking it
    # would make every rollback land on those weights, and the run would abort.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = state_copy(model)
    with NanGuard(model, opt, dump_dir=str(tmp_path), snapshot_every=4) as guard:
        for i, (x, y) in enumerate(batches(14)):
            opt.param_groups[0]["lr"] = 1e37 if i == 3 else 0.05
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
            if i == 4:  # the rollback went to the snapshot from before the spike
                assert same_bits(state_copy(model), start)
    # At once: skipping cannot shrink weights an update blew up (it was three skips first).
    assert [r.action for r in guard.history][3:8] == [None, "rollback", None, None, None]
    assert guard.snapshot_step > 4 and weights_finite(model)  # healthy weights again
    assert float(max(p.abs().max() for p in model.parameters())) < 100
    assert "a rollback to a snapshot from before the growth undoes it" in guard.events[0].message


def test_a_dump_keeps_text_and_numpy_leaves_of_the_batch_and_names_the_rest(tmp_path):
    # A text classifier's batch carries the raw strings beside the tensors: the dump keeps
    # them (as a string array), numpy arrays as they are, and names what it cannot store.
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3)
    x[0, 0] = math.nan
    y = torch.tensor([0, 1])
    batch = {"text": ["a cat", "a dog"], "ids": np.array([3, 4]), "x": x, "meta": object()}
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard, guard.step(batch, targets=y):
        guard.backward(F.cross_entropy(model(batch["x"]), y))
        opt.step()
    dump = nanguard.load(guard.dumps[0])
    assert dump.event.cause == "input_nonfinite"
    assert dump.tensors["inputs.text"].tolist() == ["a cat", "a dog"]
    assert dump.tensors["inputs.ids"].tolist() == [3, 4]
    assert np.isnan(dump.tensors["inputs.x"][0, 0])
    assert dump.meta["left_out"] == ["tensors/inputs.meta"]


def corrupt_before_step_3(tmp_path, model, opt, tensor, value):
    """Six steps of a 4-in, 3-class model; ``tensor[0...]`` set to ``value`` before step 3
    (a manual edit, a corrupt checkpoint); the first event."""
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for i in range(6):
            if i == 3:
                with torch.no_grad():
                    tensor.view(-1)[0] = value
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
    return guard.events[0]


class FillsNaN(torch.nn.Module):
    """Replaces NaN activations by 0 (missing-value handling), keeping a NaN weight from the
    loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(torch.where(torch.isnan(h), torch.zeros_like(h), h)))


@pytest.mark.parametrize("opt_name", ["Adam", "SGD"])
def test_a_nan_weight_a_mask_keeps_from_the_loss_is_weights_nonfinite(tmp_path, opt_name):
    model = FillsNaN()
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=1e-3)
    event = corrupt_before_step_3(tmp_path, model, opt, model.a.weight, math.nan)
    assert (event.step, event.cause, event.where) == (3, "weights_nonfinite", "a.weight")
    assert "was there before the step" in event.message
    assert weights_finite(model)


class Saturates(torch.nn.Module):
    """A tanh layer: an Inf in its bias saturates the unit at 1, so the loss stays finite
    and that weight's gradient is 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(("opt_name", "kwargs"), [
    ("Adam", {}), ("AdamW", {"weight_decay": 0.01}), ("RMSprop", {"momentum": 0.9}),
    ("Adagrad", {}),
])
def test_an_inf_weight_a_saturated_tanh_keeps_from_the_loss_is_weights_nonfinite(
        tmp_path, opt_name, kwargs):
    # These optimizers move a weight by a bounded multiple of the LR: their update cannot
    # have made that Inf (it was "update_nonfinite, lower the LR").
    model = Saturates()
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=1e-3, **kwargs)
    event = corrupt_before_step_3(tmp_path, model, opt, model.a.bias, math.inf)
    assert (event.step, event.cause, event.where) == (3, "weights_nonfinite", "a.bias")
    assert "Inf was there before the step" in event.message
    assert weights_finite(model)


class RunningMax(torch.nn.Module):
    """Keeps a running max of input features 0-2 in a buffer that starts at -inf; feature 3
    is never tracked, so its entry stays -inf on purpose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("feat_max", torch.full((4,), -math.inf))

    def forward(self, x):
        with torch.no_grad():
            self.feat_max[:3] = torch.maximum(self.feat_max[:3], x[:, :3].amax(0))
        return self.fc(x)


def test_a_skip_keeps_a_buffer_whose_inf_is_intended(tmp_path):
    # The loss divides by zero at step 6: the forward and its buffer are fine. Only buffers
    # the step made non-finite are put back; this one's -inf was in the snapshot already.
    model = RunningMax()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with NanGuard(model, opt, dump_dir=str(tmp_path), snapshot_every=4) as guard:
        for i in range(8):
            x, y = torch.full((2, 4), float(i)), torch.tensor([0, 1])
            opt.zero_grad()
            with guard.step(x, targets=y):
                loss = F.cross_entropy(model(x), y)
                guard.backward(loss / torch.zeros(()) if i == 6 else loss)
                opt.step()
            if i == 6:
                assert model.feat_max.tolist() == [6.0, 6.0, 6.0, -math.inf]
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (6, "loss_nonfinite", "skip")
    assert "nonfinite_buffers" not in event.details
