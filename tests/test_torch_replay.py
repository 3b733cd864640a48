"""Localization on replay: real small torch models with real faults name the bad module."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402

import nanguard  # noqa: E402
from nanguard._torch_replay import RecordedCall, replay_call  # noqa: E402
from nanguard.torch import NanGuard  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional
nn = torch.nn


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class Square(nn.Module):
    def forward(self, x):
        return x * x


class SqrtAbs(nn.Module):
    """Finite forward at 0, but d/dx sqrt(|x|) at 0 is inf * 0 = NaN: a backward-only fault."""

    def forward(self, x):
        return torch.sqrt(x.abs())


class HookCounter(nn.Module):
    """Records how many hooks it carries each time it runs (to prove when hooks exist)."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(
            len(self._forward_hooks) + len(self._forward_pre_hooks) + len(self._backward_hooks)
        )
        return x


class MaskFill(nn.Module):
    """An attention-style mask: masked positions become -inf on purpose."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mask", torch.arange(n) % 2 == 1)

    def forward(self, x):
        return x.masked_fill(self.mask, float("-inf"))


class Attentionish(nn.Module):
    def __init__(self, blow_scale):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)
        self.mask = MaskFill(4)
        self.softmax = nn.Softmax(dim=-1)
        self.up = nn.Linear(4, 4)
        self.blow = Exp()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.up.weight.fill_(blow_scale)

    def forward(self, x):
        return self.head(self.blow(self.up(self.softmax(self.mask(self.proj(x))))))


def one_step(model, x, y, tmp_path, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path), **kw)
    opt.zero_grad()
    with guard.step(x, targets=y):
        loss = F.cross_entropy(model(x), y)
        guard.backward(loss)
        opt.step()
    return guard


def batch(seed=0, n=8, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_hidden_exp_overflow_is_named_with_its_tensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Exp(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(200.0)
    x, y = batch()
    guard = one_step(model, x, y, tmp_path)
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("activation_nonfinite", "1")
    dump = nanguard.load(guard.dumps[-1])
    inp, out = dump.tensors["localized.1.input"], dump.tensors["localized.1.output"]
    assert np.isfinite(inp).all()
    assert np.isinf(out).any()
    info = dump.event.details["replay"]
    assert info["found"] == "1"
    assert info["phase"] == "forward"
    assert info["input"][0]["nan"] == 0
    assert info["input"][0]["inf"] == 0
    assert info["output"][0]["inf"] == int(np.isinf(out).sum()) > 0
    assert info["input"][0]["max"] == pytest.approx(float(inp.max()))
    guard.close()


def test_linear_with_huge_weights_then_square_blames_the_square(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Square(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e20)  # 1e20 is finite in float32, its square is not
    x, y = batch(1)
    guard = one_step(model, x, y, tmp_path)
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("activation_nonfinite", "1")
    assert "'1'" in ev.message
    guard.close()


def test_last_layer_overflow_is_logits_nonfinite_at_that_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), Exp())
    with torch.no_grad():
        model[2].weight.fill_(100.0)
    x, y = batch(2)
    guard = one_step(model, x, y, tmp_path)
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("logits_nonfinite", "3")
    guard.close()


def test_dropout_replays_the_same_mask_and_rng_stream_is_untouched(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 16), Exp(),
                          nn.Linear(16, 2))
    with torch.no_grad():
        model[2].weight.mul_(300.0)
    seen, masks = [], []
    model[3].register_forward_hook(lambda m, a, o: seen.append(a[0].detach().clone()))
    model[1].register_forward_hook(lambda m, a, o: masks.append(o.detach() == 0))
    x, y = batch(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    opt.zero_grad()
    with guard.step(x, targets=y):
        loss = F.cross_entropy(model(x), y)
        after_forward = torch.get_rng_state()
        guard.backward(loss)
        opt.step()
    assert torch.equal(torch.get_rng_state(), after_forward)  # the replay restored the RNG
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("activation_nonfinite", "3")
    # the user's hook saw the real forward and the replay: the same dropout mask both times
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1])
    kept = nanguard.load(guard.dumps[-1]).tensors["localized.3.input"]
    assert np.array_equal(kept, seen[0].numpy())
    assert len(masks) == 2
    assert torch.equal(masks[0], masks[1])
    assert masks[0].any()  # dropout really dropped something
    guard.close()


def test_allowed_neg_inf_mask_is_not_blamed(tmp_path):
    x, y = batch(4)
    guard = one_step(Attentionish(1e3), x, y, tmp_path / "a", allow_neg_inf=("mask",))
    assert (guard.events[-1].cause, guard.events[-1].where) == ("activation_nonfinite", "blow")
    guard.close()
    # without the option the mask's -inf is the first non-finite value, and is blamed
    guard = one_step(Attentionish(1e3), x, y, tmp_path / "b")
    assert guard.events[-1].where == "mask"
    guard.close()
    # patterns work too, and a healthy masked model is a good step
    guard = one_step(Attentionish(0.1), x, y, tmp_path / "c", allow_neg_inf=("m*",))
    assert guard.events == []
    guard.close()


def test_backward_only_fault_is_named_from_backward_hooks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), SqrtAbs(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[:3].zero_()  # units 0..2 output exactly 0: sqrt's backward is NaN there
        model[0].bias[:3].zero_()
    x, y = batch(5)
    guard = one_step(model, x, y, tmp_path)
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("grad_nonfinite", "1")
    assert "'1'" in ev.message
    dump = nanguard.load(guard.dumps[-1])
    assert np.isfinite(dump.tensors["localized.1.grad_output"]).all()
    assert np.isnan(dump.tensors["localized.1.grad_input"]).any()
    assert "replay.output_grad.0" in dump.tensors
    guard.close()


def _hook_counts(model):
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
               len(m._backward_pre_hooks))
        for name, m in model.named_modules()
    }


def test_hooks_exist_only_during_the_replay(tmp_path):
    torch.manual_seed(0)
    counter = HookCounter()
    model = nn.Sequential(nn.Linear(4, 8), counter, Exp(), nn.Linear(8, 2))
    before = _hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    with_guard = _hook_counts(model)
    x, y = batch(6)
    for scale in (1.0, 1.0, 500.0, 1.0):
        opt.zero_grad()
        with guard.step(x * scale, targets=y):
            loss = F.cross_entropy(model(x * scale), y)
            guard.backward(loss)
            opt.step()
        assert _hook_counts(model) == with_guard
    # normal steps: no hook on the submodule; the bad step's replay added its forward hook
    # (the fault shows in the forward, so no backward replay was needed)
    assert counter.seen == [0, 0, 0, 1, 0]
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    # the guard's own hooks sit on the model root only
    assert {k: v for k, v in with_guard.items() if k} == {k: v for k, v in before.items() if k}
    guard.close()
    assert _hook_counts(model) == before


def test_replay_restores_grads_modes_buffers_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), SqrtAbs(),
                          nn.Linear(8, 2))
    model.train()
    model[2].eval()  # a mixed mode that must survive the replay
    with torch.no_grad():
        model[0].weight[:2].zero_()
        model[0].bias[:2].zero_()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    grads = [p.grad for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(8, 4)
    out_grad = torch.ones(8, 2) / 8
    call = RecordedCall((x,), {}, torch.get_rng_state(), None, [], True, {0: out_grad})
    rng = torch.get_rng_state()
    result = replay_call(model, call, backward=True)
    assert result.finding is not None
    assert result.finding.module == "3"
    assert result.finding.phase == "backward"
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    assert [m.training for m in model] == [True, True, False, True, True]
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, buffers[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_loss_backward_itself_is_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, _ = batch(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NanGuard(model, opt, dump_dir=str(tmp_path))
    opt.zero_grad()
    with guard.step(x):
        out = model(x)
        loss = torch.sqrt((out - out.detach()).abs()).sum()  # value 0, backward NaN
        guard.backward(loss)
        opt.step()
    ev = guard.events[-1]
    assert (ev.cause, ev.where) == ("grad_nonfinite", "<loss>")
    guard.close()


def test_a_lower_precision_non_finite_output_gradient_does_not_blame_the_loss():
    """A float16 (autocast) step replayed in float32: its NaN output gradient came from a
    forward that overflowed in float16, which the float32 replay does not reproduce."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    grad = torch.full((8, 2), float("nan"), dtype=torch.float16)
    call = RecordedCall((torch.randn(8, 4),), {}, torch.get_rng_state(), None, [], True,
                        {0: grad})
    result = replay_call(model, call, backward=True)
    assert result.finding is None
    assert any("float16" in n and "mixed" in n for n in result.notes), result.notes
    # The same gradient in the output's own precision is the loss's doing.
    call.output_grads = {0: grad.float()}
    assert replay_call(model, call, backward=True).finding.module == "<loss>"


class TemperatureLM(nn.Module):
    """Divides its head's logits by a temperature buffer, after the head."""

    def __init__(self, vocab=20):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, ids):
        return {"logits": self.head(self.emb(ids)) / self.temperature}


def test_a_fault_after_the_logits_module_blames_the_models_forward(tmp_path):
    # logits_module="head" is finite; the model divides it by a temperature that is 0 at
    # step 2. The event is the model output's, not the loss's (which read the inf logits).
    model = TemperatureLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path), logits_module="head") as guard:
        for i in range(4):
            ids = torch.randint(0, 20, (4, 9), generator=g)
            model.temperature.fill_(0.0 if i == 2 else 1.0)
            opt.zero_grad()
            with guard.step(ids, targets=ids):
                logits = model(ids)["logits"]
                guard.backward(F.cross_entropy(logits.reshape(-1, 20), ids.reshape(-1)))
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "logits_nonfinite", "<TemperatureLM>")
    assert "'head' (logits_module) was finite" in event.message
    dump = nanguard.load(guard.dumps[0])
    assert np.isinf(dump.tensors["localized.<TemperatureLM>.output"]).any()
    assert np.isfinite(dump.tensors["output"]).all()  # the logits source, as recorded


class Flaky(nn.Module):
    """Overflows on its third call only: a replay of that call comes out finite."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out * float("inf") if self.calls == 3 else out


def test_a_fault_the_replay_does_not_reproduce_says_so_in_the_message(tmp_path):
    model = Flaky()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path)) as guard:
        for _ in range(4):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "logits_nonfinite")
    assert "Replaying the step gave a finite output" in event.message
    assert "non-deterministic" in event.message
    assert nanguard.load(guard.dumps[0]).event.details["replay"]["found"] is None
