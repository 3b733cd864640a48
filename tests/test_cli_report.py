"""nanguard report / plot / replay on dumps from real torch runs."""

from __future__ import annotations

import io
import json
import math
import sys
import textwrap
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import nanguard  # noqa: E402
from nanguard.cli import load_factory, main  # noqa: E402
from nanguard.config import GuardConfig  # noqa: E402
from nanguard.events import StepRecord  # noqa: E402
from nanguard.session import GuardSession  # noqa: E402
from nanguard.torch import NanGuard  # noqa: E402
from tests.test_torch_guard import float16_step  # noqa: E402

pytestmark = pytest.mark.torch
F = torch.nn.functional

FACTORY = textwrap.dedent(
    """
    import torch


    class Exp(torch.nn.Module):
        def forward(self, x):
            return torch.exp(x)


    class SqrtAbs(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x.abs())


    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), Exp(), torch.nn.Linear(8, 2))


    def build_sqrt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), SqrtAbs(), torch.nn.Linear(8, 2))
        with torch.no_grad():
            model[0].weight[:3].zero_()
            model[0].bias[:3].zero_()
        return model


    def build_other():
        return torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Linear(9, 2))


    def build_wide():
        return torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])


    def not_a_model():
        return 42


    class NeedsTwo(torch.nn.Sequential):
        def forward(self, x, y):
            return super().forward(x)


    def build_needs_two():
        return NeedsTwo(torch.nn.Linear(4, 8), Exp(), torch.nn.Linear(8, 2))


    class Scaled(torch.nn.Sequential):
        def forward(self, x, scale=1.0):
            return super().forward(x * getattr(scale, "v", scale))


    def build_scaled():
        torch.manual_seed(0)
        return Scaled(torch.nn.Linear(4, 8), Exp(), torch.nn.Linear(8, 2))


    def build_bf16():
        return build().to(torch.bfloat16)


    def build_compiled():
        return torch.compile(build(), backend="eager")


    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = torch.nn.Linear(1024, 2), Exp(), torch.nn.Linear(2, 2)

        def forward(self, x, mask):
            return self.fc2((self.act(self.fc1(x)) * mask).sum(1))


    def build_masked():
        torch.manual_seed(0)
        return Masked()


    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(4, 8, batch_first=True)
            self.fc, self.act, self.head = torch.nn.Linear(8, 8), Exp(), torch.nn.Linear(8, 3)

        def forward(self, packed, gain=1.0):
            _, (h, _) = self.rnn(packed)
            return self.head(self.act(self.fc(h[-1]) * gain))


    def build_packed():
        torch.manual_seed(0)
        return Packed()


    class Counting(torch.nn.Module):
        # Overflows at its fourth training call only (a schedule kept in a buffer).

        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = torch.nn.Linear(4, 8), Exp(), torch.nn.Linear(8, 2)
            self.register_buffer("t", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            gain = 1e3 if int(self.t) == 3 else 1.0
            if self.training:
                self.t += 1
            return self.head(self.act(self.fc(x) * gain))


    def build_counting():
        torch.manual_seed(0)
        return Counting()
    """
)


@pytest.fixture
def factory(tmp_path, monkeypatch):
    name = f"ng_factory_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield name
    sys.modules.pop(name, None)


def train(model, dump_dir, scales, dump_state="always"):
    """A few real steps; a large input scale makes the hidden exp overflow."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = NanGuard(model, opt, dump_dir=str(dump_dir), dump_state=dump_state)
    g = torch.Generator().manual_seed(0)
    for scale in scales:
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        with guard.step(x * scale, targets=y):
            loss = F.cross_entropy(model(x * scale), y)
            guard.backward(loss)
            opt.step()
    guard.close()
    return guard


def build_from(factory_name, fn="build"):
    return load_factory(f"{factory_name}:{fn}")()


@pytest.fixture
def overflow_dump(factory, tmp_path):
    guard = train(build_from(factory), tmp_path / "dumps", [1.0] * 6 + [300.0])
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    return guard.dumps[-1]


def test_dump_state_always_puts_the_model_in_a_skip_dump(overflow_dump):
    dump = nanguard.load(overflow_dump)
    assert dump.event.action == "skip"
    assert {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"} <= set(dump.state)


def test_report_is_one_self_contained_page_with_the_cause(overflow_dump, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", overflow_dump, "-o", str(out)]) == 0
    page = out.read_text()
    assert "activation_nonfinite" in page
    assert "turned finite inputs into non-finite outputs" in page  # the fix text
    assert page.count("data:image/png;base64,") == 1
    assert "localized.1.output" in page
    assert "localized.1.input" in page
    for external in ("src='http", 'src="http', "<link", "<script"):
        assert external not in page
    assert str(out) in capsys.readouterr().out


def test_plot_writes_a_png(overflow_dump, tmp_path):
    out = tmp_path / "history.png"
    assert main(["plot", overflow_dump, "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_report_without_matplotlib_says_how_to_install(overflow_dump, tmp_path, monkeypatch,
                                                       capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for command in ("report", "plot"):
        assert main([command, overflow_dump, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "pip install 'nanguard[report]'" in err
    assert not (tmp_path / "x").exists()


def test_replay_names_the_first_bad_module(overflow_dump, factory, capsys):
    assert main(["replay", overflow_dump, "--model", f"{factory}:build"]) == 0
    out = capsys.readouterr().out
    assert "first bad module: 1 (forward)" in out
    assert "NaN 0  Inf 0" in out  # its input was finite


def test_replay_of_a_backward_fault_uses_the_recorded_output_gradient(factory, tmp_path,
                                                                      capsys):
    guard = train(build_from(factory, "build_sqrt"), tmp_path / "d2", [1.0])
    assert guard.events[-1].cause == "grad_nonfinite"
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build_sqrt"]) == 0
    assert "first bad module: 1 (backward)" in capsys.readouterr().out


def test_replay_of_an_accumulated_step_reruns_the_micro_batch_that_went_wrong(
        factory, tmp_path, capsys):
    model = build_from(factory)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path / "acc"), dump_state="always") as guard:
        for i in range(8):  # 4 micro-batches per step; the third of step 1 overflows
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            with guard.step(x * (300.0 if i == 6 else 1.0), targets=y):
                guard.backward(F.cross_entropy(model(x * (300.0 if i == 6 else 1.0)), y) / 4)
                if i % 4 == 3:
                    opt.step()
                    opt.zero_grad()
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (1, "activation_nonfinite", "1")
    assert event.details["replay"]["call"] == 2
    dump = nanguard.load(guard.dumps[0])
    assert abs(dump.tensors["replay.args.0"]).max() > 100  # the third micro-batch's input
    assert main(["replay", guard.dumps[0], "--model", f"{factory}:build"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out


class Wrapped(torch.nn.Module):
    """Holds the model as `.module`, as DistributedDataParallel does: its dump's state is
    named `module.0.weight`, ..."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_replay_of_a_ddp_dump_on_the_plain_model(factory, tmp_path, capsys):
    # It exited 2: "parameters do not match (not in the model: module.0.bias, ...)".
    guard = train(Wrapped(build_from(factory)), tmp_path / "ddp", [1.0] * 3 + [300.0])
    assert nanguard.load(guard.dumps[-1]).state.keys() >= {"model.module.0.weight"}
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out


def _edit_array(src, dst, member, array):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == member:
                buf = io.BytesIO()
                np.save(buf, array, allow_pickle=False)
                data = buf.getvalue()
            zout.writestr(name, data)


def test_replay_of_edited_arrays(overflow_dump, factory, tmp_path, capsys):
    # A big-endian .npy (numpy writes either) replays; a string array, where a tensor or a
    # parameter should be, exits 2 with one line (they were tracebacks).
    dump = nanguard.load(overflow_dump)
    x = dump.tensors["replay.args.0"]  # the model call's input
    big = str(tmp_path / "big.nanguard.zip")
    _edit_array(overflow_dump, big, "tensors/replay.args.0.npy",
                x.astype(x.dtype.newbyteorder(">")))
    assert main(["replay", big, "--model", f"{factory}:build"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out
    for member, shape in (("tensors/replay.args.0.npy", x.shape),
                          ("state/model.0.weight.npy", dump.state["model.0.weight"].shape)):
        bad = str(tmp_path / "text.nanguard.zip")
        _edit_array(overflow_dump, bad, member, np.full(shape, "a"))
        assert main(["replay", bad, "--model", f"{factory}:build"]) == 2
        assert "not numbers" in _one_line_error(capsys)


def test_replay_escapes_text_from_the_dump(overflow_dump, factory, tmp_path, capsys):
    # A `where` holding a newline and a terminal escape went out raw (a reviewer's repro).
    dst = str(tmp_path / "odd.nanguard.zip")
    with zipfile.ZipFile(overflow_dump) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "event.json":
                event = json.loads(data)
                event["where"] = "1\n\x1b[31mFORGED line"
                data = json.dumps(event).encode()
            zout.writestr(name, data)
    assert main(["replay", dst, "--model", f"{factory}:build"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "in '1\\n\\x1b[31mFORGED line'" in out
    assert not any(line.startswith("FORGED") for line in out.splitlines())


def _one_line_error(capsys):
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("nanguard: error: ")
    assert captured.err.count("\n") == 1
    return captured.err


def test_replay_bad_inputs_exit_2_with_one_line(overflow_dump, factory, tmp_path, capsys):
    no_state = train(build_from(factory), tmp_path / "d3", [300.0], dump_state="never")
    assert main(["replay", no_state.dumps[-1], "--model", f"{factory}:build"]) == 2
    assert "no model state" in _one_line_error(capsys)
    assert main(["replay", overflow_dump, "--model", "no_such_module_xyz:build"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in _one_line_error(capsys)
    assert main(["replay", overflow_dump, "--model", f"{factory}:missing"]) == 2
    assert "has no attribute 'missing'" in _one_line_error(capsys)
    assert main(["replay", overflow_dump, "--model", f"{factory}"]) == 2
    assert "package.module:factory" in _one_line_error(capsys)
    assert main(["replay", overflow_dump, "--model", f"{factory}:build_other"]) == 2
    err = _one_line_error(capsys)
    assert "do not match" in err
    assert "0.weight" in err
    # Names past the third were dropped with no sign of them (a first-time user).
    assert main(["replay", overflow_dump, "--model", f"{factory}:build_wide"]) == 2
    err = _one_line_error(capsys)
    assert "missing from the dump: 1.bias, 1.weight, 3.bias and 1 more;" in err
    assert "2.bias (2,) vs (4,) and 1 more)" in err
    assert main(["replay", overflow_dump, "--model", f"{factory}:not_a_model"]) == 2
    assert "not a torch.nn.Module" in _one_line_error(capsys)
    assert main(["replay", str(tmp_path / "nope.nanguard.zip"), "--model", "a:b"]) == 2
    assert "no such dump" in _one_line_error(capsys)
    # A model whose call does not fit the dumped batch: one line, not a traceback.
    assert main(["replay", overflow_dump, "--model", f"{factory}:build_needs_two"]) == 2
    assert "calling the model on the dumped batch raised TypeError" in _one_line_error(capsys)
    # A Keras dump (its meta says so): not a torch model's step to re-run.
    keras_dump = str(tmp_path / "keras.nanguard.zip")
    with zipfile.ZipFile(overflow_dump) as zin, zipfile.ZipFile(keras_dump, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "meta.json":
                data = json.dumps({**json.loads(data), "framework": "keras"}).encode()
            zout.writestr(name, data)
    assert main(["replay", keras_dump, "--model", f"{factory}:build"]) == 2
    assert "written by the Keras adapter" in _one_line_error(capsys)


def test_layer_growth_names_the_gradient_that_grew_first(tmp_path, capsys):
    session = GuardSession(GuardConfig(dump_dir=str(tmp_path)), framework="test")
    session.extra_meta["param_names"] = ["embed.weight", "rnn.weight_hh", "head.weight"]
    for step in range(12):
        rnn = 1.0 if step < 6 else 1.0 * 3.0 ** (step - 5)  # grows from step 6
        head = 1.0 if step < 9 else 10.0  # grows later
        norms = [0.5, rnn, head]
        rec = StepRecord(step=step, loss=1.0, grad_norm=math.hypot(*norms), lr=0.1,
                         logits_min=-1.0, logits_max=1.0, layer_grad_norms=norms)
        session.conclude(rec, probe=None)
    bad = StepRecord(step=12, loss=1.0, grad_norm=math.inf, lr=0.1, logits_min=-1.0,
                     logits_max=1.0, layer_grad_norms=[0.5, math.inf, math.inf])
    verdict = session.conclude(bad, probe=None)
    ev = verdict.event
    assert ev.cause == "grad_explosion"
    growth = ev.details["layer_growth"]
    assert (growth["first"], growth["step"]) == ("rnn.weight_hh", 7)
    assert "rnn.weight_hh" in ev.message
    out = tmp_path / "r.html"
    assert main(["report", verdict.dump_path, "-o", str(out)]) == 0
    assert "The first gradient to grow was <b>rnn.weight_hh</b>" in out.read_text()


def test_replay_of_a_non_finite_input_does_not_blame_the_loss(factory, tmp_path, capsys):
    guard = train(build_from(factory), tmp_path / "d", [1.0] * 3 + [math.nan])
    assert [e.cause for e in guard.events] == ["input_nonfinite"]
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build"]) == 1
    out = capsys.readouterr().out
    assert "backward not replayed: the forward's output is already non-finite" in out
    assert "<loss>" not in out and "the model output is non-finite" in out


def test_replay_of_a_model_called_on_part_of_a_dict_batch(factory, tmp_path, capsys):
    model = build_from(factory)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path / "d"), dump_state="always") as guard:
        for scale in (1.0, 300.0):
            batch = {"x": torch.randn(8, 4, generator=g) * scale,
                     "attention_mask": torch.ones(8, 4), "labels": torch.randint(0, 2, (8,))}
            opt.zero_grad()
            with guard.step(batch, targets=batch["labels"]):
                guard.backward(F.cross_entropy(model(batch["x"]), batch["labels"]))
                opt.step()
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    dump = nanguard.load(guard.dumps[-1])
    assert dump.event.details["replay_call"]["args"] == [{"tensor": "replay.args.0"}]
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out


def _accumulate(model, dump_dir, scale_arg):
    """Two micro-batches per step, the model called with a non-tensor argument; the
    second micro-batch of step 1 overflows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(dump_dir), dump_state="always") as guard:
        for i in range(4):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            x = x * (600.0 if i == 3 else 1.0)
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x, scale=scale_arg), y) / 2)
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
    return guard


def test_replay_of_an_accumulated_step_with_a_non_tensor_argument(factory, tmp_path, capsys):
    guard = _accumulate(build_from(factory, "build_scaled"), tmp_path / "d", 0.5)
    (event,) = guard.events
    assert (event.step, event.cause) == (1, "activation_nonfinite")
    dump = nanguard.load(guard.dumps[0])
    spec = dump.event.details["replay_call"]
    assert (spec["call"], spec["micro_batches"]) == (1, 2)
    assert spec["kwargs"] == {"scale": {"value": 0.5}}
    assert abs(dump.tensors["replay.args.0"]).max() > 100  # the second micro-batch alone
    assert main(["replay", guard.dumps[0], "--model", f"{factory}:build_scaled"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out


def test_replay_of_a_call_with_an_argument_a_dump_cannot_hold_says_so(factory, tmp_path,
                                                                     capsys):
    import types

    guard = _accumulate(build_from(factory, "build_scaled"), tmp_path / "d",
                        types.SimpleNamespace(v=0.5))
    assert main(["replay", guard.dumps[0], "--model", f"{factory}:build_scaled"]) == 2
    err = _one_line_error(capsys)
    assert "keyword argument 'scale' as a SimpleNamespace" in err
    assert "cannot rebuild the call" in err


def test_replay_of_a_bfloat16_model_feeds_it_bfloat16(factory, tmp_path, capsys):
    model = build_from(factory, "build_bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path / "d"), dump_state="always") as guard:
        for scale in (1.0, 300.0):
            x = (torch.randn(8, 4, generator=g) * scale).to(torch.bfloat16)
            y = torch.randint(0, 2, (8,), generator=g)
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x).float(), y))
                opt.step()
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    dump = nanguard.load(guard.dumps[-1])
    assert dump.tensors["inputs"].dtype.name == "float32"  # numpy has no bfloat16
    assert dump.event.details["replay_call"]["args"] == [
        {"tensor": "inputs", "dtype": "bfloat16"}]
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build_bf16"]) == 0
    out = capsys.readouterr().out
    assert "first bad module: 1 (forward)" in out
    assert "bfloat16" in out


def test_replay_of_an_autocast_step_runs_under_the_same_autocast(factory, tmp_path, capsys):
    model = build_from(factory)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path / "d"), dump_state="always") as guard:
        for scale in (1.0, 1e5):  # 1e5 overflows float16 (65504) in the first Linear
            x, y = torch.randn(8, 4, generator=g) * scale, torch.randint(0, 2, (8,), generator=g)
            float16_step(guard, model, opt, x, y)
    assert [(e.cause, e.where) for e in guard.events] == [("activation_nonfinite", "0")]
    dump = nanguard.load(guard.dumps[-1])
    assert dump.event.details["replay_call"]["autocast"] == [["cpu", "float16"]]
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build"]) == 0
    out = capsys.readouterr().out
    assert "first bad module: 0 (forward)" in out  # float32 would overflow later, in the exp
    assert "<loss>" not in out


def test_replay_of_a_torch_compiled_model(factory, tmp_path, capsys):
    guard = train(build_from(factory, "build_compiled"), tmp_path / "d", [1.0, 300.0])
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build_compiled"]) == 0
    assert "first bad module: 1 (forward)" in capsys.readouterr().out


def test_replay_of_a_batch_over_the_dump_limit_keeps_the_same_rows_everywhere(
        factory, tmp_path, capsys):
    model = build_from(factory, "build_masked")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(260, 64, 1024, generator=torch.Generator().manual_seed(0))  # 65 MiB
    x[0] *= 1000.0
    y = torch.randint(0, 2, (260,))
    guard = NanGuard(model, opt, dump_dir=str(tmp_path / "d"), dump_state="always")
    with guard.step(x, targets=y):
        mask = (x.abs().mean(-1, keepdim=True) < 1e9).float()  # made in the step
        guard.backward(F.cross_entropy(model(x, mask), y))
        opt.step()
    guard.close()
    del x, mask
    assert [e.cause for e in guard.events] == ["activation_nonfinite"]
    dump = nanguard.load(guard.dumps[-1])
    rows = {k: v.shape[0] for k, v in dump.tensors.items()
            if k.startswith(("inputs", "targets", "output", "replay.args", "replay.output_grad"))}
    assert set(rows.values()) == {256}, rows  # 64 MiB of 256 KiB rows
    assert main(["replay", guard.dumps[-1], "--model", f"{factory}:build_masked"]) == 0
    assert "first bad module: act (forward)" in capsys.readouterr().out


def test_replay_rebuilds_a_packed_sequence_argument(factory, tmp_path, capsys):
    from torch.nn.utils.rnn import pack_padded_sequence

    model = build_from(factory, "build_packed")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with NanGuard(model, opt, dump_dir=str(tmp_path / "d"), dump_state="always") as guard:
        for i in range(3):
            x, y = torch.randn(5, 6, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
            packed = pack_padded_sequence(x, torch.tensor([6, 5, 4, 3, 2]), batch_first=True)
            opt.zero_grad()
            with guard.step(packed, targets=y):
                guard.backward(F.cross_entropy(model(packed, gain=1e4 if i == 2 else 1.0), y))
                opt.step()
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (2, "activation_nonfinite", "act")]
    assert main(["replay", guard.dumps[0], "--model", f"{factory}:build_packed"]) == 0
    assert "first bad module: act (forward)" in capsys.readouterr().out


def test_replay_that_does_not_reproduce_a_non_finite_output_does_not_blame_the_loss(
        factory, tmp_path, capsys):
    # The dumped output is non-finite; a replay of the same call is finite (the model's
    # forward depends on a buffer it updates). Its recorded gradient is non-finite because
    # the output was: a backward from it would blame the loss.
    guard = train(build_from(factory, "build_counting"), tmp_path / "d", [1.0] * 5)
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "logits_nonfinite")
    assert event.details["replay_unreproduced"] is True
    assert main(["replay", guard.dumps[0], "--model", f"{factory}:build_counting"]) == 1
    out = capsys.readouterr().out
    assert "<loss>" not in out and "the replay did not reproduce the step" in out
