"""The Lightning callback, trained for real with ``Trainer.fit`` and real faults."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import nanguard  # noqa: E402
from nanguard.lightning import NanGuard  # noqa: E402

pytestmark = pytest.mark.lightning

N_IN, N_CLASSES, BATCH = 8, 4, 8


def make_data(n_batches: int, nan_batches: tuple[int, ...] = (), scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * BATCH, N_IN, generator=g) * scale
    y = torch.randint(0, N_CLASSES, (n_batches * BATCH,), generator=g)
    for b in nan_batches:
        x[b * BATCH, 1] = math.nan
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def loader_of(batches):
    """A loader yielding these ready-made batches, in order."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-2, naive_softmax: bool = False, sched: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, N_CLASSES)
        )
        self.lr = lr
        self.naive_softmax = naive_softmax
        self.sched = sched
        self.step_losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.naive_softmax:  # exp(x) / sum(exp(x)): overflows for logits over ~88
            p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
            loss = -torch.log(p[torch.arange(len(y)), y]).mean()
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.sched:
            return opt
        # A scheduler that would put the base LR back every step unless nanguard scales it.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, guard, *, module=pl, **kwargs):
    opts = dict(
        max_epochs=1,
        callbacks=[guard, *kwargs.pop("extra_callbacks", [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )
    opts.update(kwargs)
    return module.Trainer(**opts)


def assert_finite(module):
    for name, p in module.named_parameters():
        assert torch.isfinite(p).all(), name


class SnapshotWatcher(pl.Callback):
    """Copies the weights whenever the guard takes a snapshot, and checks each rollback."""

    def __init__(self, guard: NanGuard):
        self.guard = guard
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.checked_rollbacks = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = self.guard.snapshot_step
        if step is not None and step not in self.saved:
            self.saved[step] = copy.deepcopy(pl_module.state_dict())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        last = self.guard.history[-1]
        if last.action == "rollback":
            expected = self.saved[self.guard.snapshot_step]
            for k, v in pl_module.state_dict().items():
                assert torch.equal(v, expected[k]), k  # bit for bit
            self.checked_rollbacks += 1


def test_nan_batch_is_skipped_and_dumped(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    t = trainer(tmp_path, guard)
    t.fit(model, make_data(8, nan_batches=(3,)))
    actions = [r.action for r in guard.history]
    assert actions == [None, None, None, "skip", None, None, None, None]
    # The counters reach callback_metrics through pl_module.log at the epoch's end.
    assert float(t.callback_metrics["nanguard/bad_steps"]) == 1.0
    assert float(t.callback_metrics["nanguard/rollbacks"]) == 0.0
    assert [r.step for r in guard.history] == list(range(8))
    assert_finite(model)
    (event,) = guard.events
    assert (event.step, event.cause, event.rank) == (3, "input_nonfinite", 0)
    dump = nanguard.load(guard.dumps[0])
    assert dump.event.cause == "input_nonfinite"
    assert dump.event.step == 3
    assert dump.meta["rank"] == 0
    assert dump.meta["framework"] == "lightning"
    assert "lightning" in dump.meta["environment"]
    assert math.isnan(dump.tensors["inputs"][0, 1])
    assert dump.tensors["targets"].shape == (BATCH,)
    assert [h["step"] for h in dump.history][-1] == 3


def test_naive_softmax_overflow(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    loader = make_data(4)
    big = make_data(1, scale=1e4)  # inputs ~1e4: logits far beyond exp's float32 range
    batches = list(loader)
    batches.insert(2, next(iter(big)))
    model = Classifier(naive_softmax=True)
    trainer(tmp_path, guard).fit(model, loader_of(batches))
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "logit_overflow", "skip")
    assert guard.history[2].logits_max > 88.8
    assert nanguard.load(guard.dumps[0]).event.cause == "logit_overflow"
    assert_finite(model)


def test_rollback_is_bit_for_bit_and_lowers_lr_despite_scheduler(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=1, snapshot_every=2)
    watcher = SnapshotWatcher(guard)
    model = Classifier(lr=1e-2, sched=True)
    t = trainer(tmp_path, guard, extra_callbacks=[watcher])
    t.fit(model, make_data(10, nan_batches=(5, 6)))
    actions = [r.action for r in guard.history]
    assert actions[5:7] == ["skip", "rollback"]
    assert watcher.checked_rollbacks == 1
    lrs = [r.lr for r in guard.history]
    assert lrs[:7] == [1e-2] * 7
    # the LambdaLR stepped after the rollback; the LR stays halved
    assert lrs[7:] == [pytest.approx(5e-3)] * 3
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-3)
    assert t.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(5e-3)
    assert_finite(model)


class Regression(pl.LightningModule):
    """Linear regression with a learning rate far too high: the loss grows to Inf."""

    def __init__(self, lr: float):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(N_IN, 1)
        self.lr = lr

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_learning_rate_that_blows_up_is_lowered(tmp_path):
    guard = NanGuard(
        dump_dir=str(tmp_path / "dumps"), max_skips=0, max_rollbacks=20, lr_factor=0.01,
        snapshot_every=1, actions=("skip", "rollback", "lower_lr"),
    )
    model = Regression(lr=1e3)
    batches = [(x * 30, y.float()) for x, y in make_data(40)]
    trainer(tmp_path, guard).fit(model, loader_of(batches))
    causes = {e.cause for e in guard.events}
    assert guard.events, "the learning rate should have blown the weights up"
    # The core calls an output beyond exp's range with an Inf loss "logit_overflow", even
    # for a regression; the later, slower divergence shows as grad_explosion.
    assert causes <= {"logit_overflow", "grad_explosion", "update_nonfinite", "loss_nonfinite"}
    assert guard.events[0].step == 3
    assert all(e.action == "rollback" for e in guard.events)
    final_lr = guard.history[-1].lr
    assert final_lr == pytest.approx(1e3 * 0.01 ** len(guard.events))
    assert_finite(model)
    assert all(r.action is None for r in guard.history[-5:])  # it recovered
    for path in guard.dumps:
        dump = nanguard.load(path)
        assert dump.event.cause in causes
        assert dump.meta["rank"] == 0


def test_fault_on_every_step_aborts(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=1, max_rollbacks=1)
    model = Classifier()
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        trainer(tmp_path, guard).fit(model, make_data(10, nan_batches=tuple(range(2, 10))))
    err = info.value
    assert err.event.cause == "input_nonfinite"
    actions = [r.action for r in guard.history]
    assert actions == [None, None, "skip", "rollback", "skip", "abort"]
    assert err.event.step == 5
    dump = nanguard.load(err.dump_path)
    assert dump.event.action == "abort"
    assert any(k.startswith("model.") for k in dump.tensors) or dump.meta.get("ladder")
    assert_finite(model)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    # 8 batches, 2 per optimizer step; the NaN is in the second micro-batch of step 1.
    trainer(tmp_path, guard, accumulate_grad_batches=2).fit(
        model, make_data(8, nan_batches=(3,))
    )
    assert [r.step for r in guard.history] == [0, 1, 2, 3]
    assert [r.action for r in guard.history] == [None, "skip", None, None]
    assert guard.events[0].cause == "input_nonfinite"
    # the recorded loss is the mean of the micro-batch losses
    losses = model.step_losses
    for i in (0, 2, 3):
        assert guard.history[i].loss == pytest.approx((losses[2 * i] + losses[2 * i + 1]) / 2)
    dump = nanguard.load(guard.dumps[0])
    assert set(dump.tensors) >= {"inputs.0", "inputs.1", "targets.0", "targets.1"}
    assert_finite(model)


def test_bf16_mixed_on_cpu(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    trainer(tmp_path, guard, precision="bf16-mixed").fit(model, make_data(6, nan_batches=(2,)))
    assert [r.action for r in guard.history] == [None, None, "skip", None, None, None]
    assert guard.events[0].cause == "input_nonfinite"
    assert all(math.isfinite(r.grad_norm) for r in guard.history if r.action is None)
    dump = nanguard.load(guard.dumps[0])
    assert dump.tensors["output"].dtype.name == "float32"  # bf16 output, stored as float32
    assert_finite(model)


def test_fp16_gradscaler_skips_are_the_scalers(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    # A scale far too large makes the fp16 backward overflow: the scaler skips those
    # steps and lowers its scale; nanguard must count them, not act on them.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-10)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    before = copy.deepcopy(model.state_dict())
    t = trainer(tmp_path, guard, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(model, make_data(8))
    assert guard.amp_skips >= 1
    assert guard.events == []
    skipped = [r for r in guard.history if r.cause == "amp_scaler_skip"]
    assert len(skipped) == guard.amp_skips
    assert all(r.action is None and not math.isfinite(r.grad_norm) for r in skipped)
    assert any(math.isfinite(r.grad_norm) for r in guard.history)
    assert not any(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_finite(model)


class SqrtAtZero(Classifier):
    """A finite loss whose backward is NaN at any scale: sqrt at 0."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return torch.nn.functional.cross_entropy(out, y) + torch.sqrt((out * 0).sum())


def test_gradients_non_finite_at_every_scale_are_not_the_scalers_skips(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    # The scaler would halve its scale silently to 0; below 1 these are nanguard events.
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), actions=("skip",))
    model = SqrtAtZero()
    t = trainer(tmp_path, guard, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(model, make_data(8))
    assert guard.amp_skips == 3  # at scales 4, 2 and 1
    assert [r.cause for r in guard.history][3:] == ["grad_nonfinite"] * 5
    assert guard.events[0].details["amp_scale"] == 0.5
    assert_finite(model)


def test_checkpoint_saves_and_restores_counters(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    t = trainer(tmp_path, guard)
    t.fit(model, make_data(6, nan_batches=(1, 4)))
    path = str(tmp_path / "run.ckpt")
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]["NanGuard"]
    assert saved["session"]["step"] == 6
    assert saved["session"]["ladder"]["total_bad"] == 2

    resumed = NanGuard(dump_dir=str(tmp_path / "dumps"))
    t2 = trainer(tmp_path, resumed, max_epochs=2)
    t2.fit(Classifier(), make_data(6, nan_batches=(2,)), ckpt_path=path)
    steps = [r.step for r in resumed.history]
    assert steps == list(range(12))  # history restored, then 6 more steps
    assert [r.action for r in resumed.history][6:] == [None, None, "skip", None, None, None]
    assert resumed.state_dict()["session"]["ladder"]["total_bad"] == 3
    # The events of the first run come back with its history, the new one after them.
    assert [(e.step, e.cause) for e in resumed.events] == [
        (1, "input_nonfinite"), (4, "input_nonfinite"), (8, "input_nonfinite")]
    assert resumed.events[0].message == guard.events[0].message


def logged_rows(logger, key="nanguard/grad_norm"):
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r.get(key)]


@pytest.mark.parametrize("log_every_n_steps", [1, 2])
def test_stats_go_through_pl_module_log_at_the_trainers_cadence(tmp_path, log_every_n_steps):
    from lightning.pytorch.loggers import CSVLogger

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    logger = CSVLogger(str(tmp_path), name="logs")
    t = trainer(tmp_path, guard, logger=logger, log_every_n_steps=log_every_n_steps)
    # Batch 5 is the epoch's last: with no monitor of these names, its NaN is logged too.
    t.fit(Classifier(), make_data(6, nan_batches=(3, 5)))
    rows = logged_rows(logger)
    steps = list(range(log_every_n_steps - 1, 6, log_every_n_steps))
    assert [int(r["step"]) for r in rows] == steps
    for name in ("loss", "grad_norm", "logits_min", "logits_max", "lr"):
        assert [float(r[f"nanguard/{name}"]) for r in rows] == pytest.approx(
            [guard.history[s][name] for s in steps], nan_ok=True
        )
    # pl_module.log also puts the last step's values into callback_metrics.
    assert float(t.callback_metrics["nanguard/grad_norm"]) == pytest.approx(
        guard.history[-1].grad_norm, nan_ok=True
    )
    # The counters are logged once per epoch, at its end.
    (counters,) = logged_rows(logger, "nanguard/bad_steps")
    assert (float(counters["nanguard/bad_steps"]), float(counters["nanguard/rollbacks"])) == (2, 0)


def test_log_every_thins_the_logged_steps(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), log_every=2)
    logger = CSVLogger(str(tmp_path), name="logs")
    t = trainer(tmp_path, guard, logger=logger, log_every_n_steps=1)
    t.fit(Classifier(), make_data(6))
    rows = logged_rows(logger)
    # Logged at steps 1, 3, 5 (Lightning's (step + 1) counting); a flush in between writes
    # the last logged value again.
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    logged = [float(r["nanguard/grad_norm"]) for r in rows]
    assert logged == pytest.approx([guard.history[s].grad_norm for s in (1, 1, 3, 3, 5)])


def test_stats_are_logged_only_on_the_steps_the_loggers_receive(tmp_path):
    # pl_module.log costs 0.4 to 1 ms per key and call: with Lightning's default cadence the
    # guard logs on steps 49, 99, ... only, and the loggers get the same lines.
    logged_at = []

    class Spy(NanGuard):
        def _log(self, pl_module, rec):
            logged_at.append(rec.step)
            super()._log(pl_module, rec)

    t = trainer(tmp_path, Spy(dump_dir=str(tmp_path / "dumps")), log_every_n_steps=5)
    t.fit(Classifier(), make_data(12))
    assert logged_at == [4, 9, 11]  # and the epoch's last batch, for monitors


class SometimesNone(Classifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            return None  # Lightning's convention for "skip this batch"
        return super().training_step(batch, batch_idx)


def test_training_step_returning_none_is_not_an_event(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = SometimesNone()
    trainer(tmp_path, guard).fit(model, make_data(5))
    assert guard.events == []
    assert guard.step_count == 5
    assert [r.step for r in guard.history] == [0, 1, 3, 4]
    assert not (tmp_path / "dumps").exists()


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="automatic optimization only"):
        trainer(tmp_path, NanGuard()).fit(Manual(), make_data(2))


class WithLBFGS(Classifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


class EvaluatesTwice(torch.optim.SGD):
    """SAM-like: evaluates the closure, then SGD.step evaluates it again and updates."""

    def step(self, closure=None):
        with torch.enable_grad():
            closure()
        return super().step(closure)


class WithTwoEvaluations(Classifier):
    def configure_optimizers(self):
        return EvaluatesTwice(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("module", "name"), [(WithLBFGS, "LBFGS"),
                                               (WithTwoEvaluations, "EvaluatesTwice")])
def test_an_optimizer_that_evaluates_the_closure_again_is_a_clear_error(tmp_path, module, name):
    # Lightning steps the optimizer with a closure (training_step and backward): LBFGS
    # evaluates it several times per step, moving the weights between evaluations, and the
    # guard judged only the first, so a NaN in a later one reached the weights. LBFGS is
    # refused at fit start; any other optimizer at the first backward after the check.
    model = module()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=f"cannot guard {name}: it evaluates the training"):
        trainer(tmp_path, NanGuard()).fit(model, make_data(2))
    if module is WithLBFGS:  # refused before any step
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_logits_module_and_invalid_options(tmp_path):
    with pytest.raises(ValueError, match="max_skips"):
        NanGuard(max_skips=-1)
    with pytest.raises(ValueError, match="lr_factor"):
        NanGuard(lr_factor=1.5)
    with pytest.raises(ValueError, match="actions"):
        NanGuard(actions=("skip", "explode"))
    with pytest.raises(ValueError, match="ignore_index=1.5"):
        NanGuard(ignore_index=1.5)
    with pytest.raises(ValueError, match="logits_module"):
        trainer(tmp_path, NanGuard(logits_module="nope")).fit(Classifier(), make_data(1))
    guard = NanGuard(logits_module="net.0", dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard).fit(Classifier(), make_data(2))
    # the first Linear's output, not the model's: 16 features, ReLU not applied yet
    assert guard.history[0].logits_min < 0


def test_a_compiled_lightning_module(tmp_path):
    # trainer.fit(torch.compile(module)): Lightning compiles the module's call, hooks and
    # all; the guard's hooks run outside the graph (they once crashed dynamo's tracing).
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    t = trainer(tmp_path, guard)
    t.fit(torch.compile(model, backend="eager"), make_data(6, nan_batches=(3,)))
    assert [r.action for r in guard.history] == [None, None, None, "skip", None, None]
    assert all(math.isfinite(r.logits_min) for i, r in enumerate(guard.history) if i != 3)
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "input_nonfinite")
    assert "output" in nanguard.load(guard.dumps[0]).tensors
    assert_finite(model)


class LossInForward(Classifier):
    """Computes its loss in forward (Hugging Face style): compiled by AOTAutograd, the
    logits' gradient hook receives None."""

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self(x, labels=y)["loss"]


def test_a_compiled_module_computing_its_loss_in_forward(tmp_path):
    # backend="aot_eager": AOTAutograd, as the default inductor, without a C compiler. The
    # bad step raised AttributeError out of trainer.fit before the fix.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = LossInForward()
    trainer(tmp_path, guard).fit(torch.compile(model, backend="aot_eager"),
                                 make_data(6, nan_batches=(3,)))
    assert [r.action for r in guard.history] == [None, None, None, "skip", None, None]
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "input_nonfinite")
    assert nanguard.load(guard.dumps[0]).event.step == 3
    assert_finite(model)


def test_standalone_pytorch_lightning_package(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")

    class PTLClassifier(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(N_IN, N_CLASSES)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    assert isinstance(guard, ptl.Callback)
    assert isinstance(guard, pl.Callback)
    model = PTLClassifier()
    trainer(tmp_path, guard, module=ptl).fit(model, make_data(5, nan_batches=(1,)))
    assert [r.action for r in guard.history] == [None, "skip", None, None, None]
    assert nanguard.load(guard.dumps[0]).event.cause == "input_nonfinite"
    assert_finite(model)


def test_shared_options_have_the_contract_names_and_defaults():
    from tests._options import assert_shared_options

    assert_shared_options(NanGuard)


class WithBatchNorm(Classifier):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(N_IN, 16), torch.nn.BatchNorm1d(16),
                                       torch.nn.ReLU(), torch.nn.Linear(16, N_CLASSES))


def test_nan_batch_leaves_batchnorm_statistics_finite(tmp_path):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = WithBatchNorm()
    trainer(tmp_path, guard).fit(model, make_data(6, nan_batches=(3,)))
    assert [(e.step, e.cause, e.action) for e in guard.events] == [(3, "input_nonfinite", "skip")]
    bn = model.net[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert nanguard.load(guard.dumps[0]).event.details["nonfinite_buffers"] == [
        "net.1.running_mean", "net.1.running_var"]
    model.eval()
    assert torch.isfinite(model(torch.randn(4, N_IN))).all()


class LrSpike(Classifier):
    """SGD whose scheduler gives one step a learning rate that takes the weights past
    float32 range while the gradients stay finite."""

    def __init__(self, spike_at: int):
        super().__init__()
        self.spike_at = spike_at

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 100.0

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 3e38 if k == self.spike_at else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("spike_at", [5, 11])  # the last step of epoch 0, of the fit
def test_the_last_update_of_an_epoch_is_checked_before_checkpoints_see_it(tmp_path, spike_at):
    from lightning.pytorch.callbacks import ModelCheckpoint

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)
    model = LrSpike(spike_at)
    t = trainer(tmp_path, guard, max_epochs=2, extra_callbacks=[ckpt], enable_checkpointing=True,
                num_sanity_val_steps=0)
    t.fit(model, make_data(6), make_data(1))
    assert_finite(model)
    for path in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (spike_at, "update_nonfinite", "rollback")
    assert "it was 3e+37" in event.message or "it was 3e+38" in event.message
    assert guard.history[spike_at].action == "rollback"
    dump = nanguard.load(guard.dumps[0])  # that step's batch and history, no output
    assert dump.history[-1].step == spike_at and "output" not in dump.tensors
    b = spike_at % 6
    x = make_data(6).dataset.tensors[0][b * BATCH:(b + 1) * BATCH]
    assert np.array_equal(dump.tensors["inputs"], x.numpy())


def test_on_the_cpu_an_overflowed_update_is_undone_at_its_own_step(tmp_path):
    # Mid-epoch: the update's check is read right after the update (on the CPU it costs no
    # wait), so no callback, before the guard in the list or after it (a weight average,
    # ModelCheckpoint), sees the Inf weights, and the row of the step that overflowed
    # takes the rollback.
    from lightning.pytorch.callbacks import Callback

    seen = {"before": [], "after": []}

    class Watch(Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[self.key].append(all(torch.isfinite(p).all() for p in pl_module.parameters()))

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = LrSpike(2)
    t = trainer(tmp_path, guard, max_epochs=1,
                callbacks=[Watch("before"), guard, Watch("after")])
    t.fit(model, make_data(6))
    assert seen == {"before": [True] * 6, "after": [True] * 6}
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "update_nonfinite", "rollback")
    assert event.details["detected_at_step"] == 2
    assert [r.action for r in guard.history] == [None, None, "rollback", None, None, None]
    assert_finite(model)


def test_an_abort_on_an_overflowed_update_leaves_the_snapshot_in_the_model(tmp_path):
    # No rollback rung: the overflowed update of step 3, found at step 4, aborts the fit.
    # The dump keeps the non-finite weights; the module is left at the step-3 snapshot.
    seen = {}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 3:
                seen["state"] = {k: v.clone() for k, v in module.state_dict().items()}

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), actions=("skip", "abort"),
                     snapshot_every=3)
    model = LrSpike(3)
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        trainer(tmp_path, guard, extra_callbacks=[Keep()]).fit(model, make_data(6))
    event = info.value.event
    assert (event.step, event.cause, event.action) == (3, "update_nonfinite", "abort")
    assert "back to the last finite snapshot" in event.message
    assert_finite(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in seen["state"].items())
    dump = nanguard.load(info.value.dump_path)
    weights = [v for k, v in dump.state.items() if k.startswith("model.")]
    assert weights and not all(np.isfinite(v).all() for v in weights)


class ValInTheWindow(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_validation_inside_an_accumulation_window_is_not_part_of_the_step(tmp_path):
    # accumulate_grad_batches=2 and a validation after batch 3: inside optimizer step 1.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    plain = NanGuard(dump_dir=str(tmp_path / "dumps2"))
    val = make_data(1, nan_batches=(0,), scale=1000.0)  # huge and NaN: would show in the range
    trainer(tmp_path, guard, accumulate_grad_batches=2, val_check_interval=3,
            num_sanity_val_steps=0).fit(ValInTheWindow(), make_data(8), val)
    trainer(tmp_path, plain, accumulate_grad_batches=2,
            num_sanity_val_steps=0).fit(ValInTheWindow(), make_data(8))
    assert guard.events == [] and len(guard.history) == len(plain.history) == 4
    for with_val, without in zip(guard.history, plain.history, strict=True):
        assert (with_val.logits_min, with_val.logits_max) == (without.logits_min,
                                                              without.logits_max)


class StopsEpochEarly(Classifier):
    def on_train_batch_start(self, batch, batch_idx):
        if self.current_epoch == 0 and batch_idx == 3:
            return -1  # Lightning: skip the rest of this epoch
        return None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if (self.current_epoch, batch_idx) == (1, 0) else loss


def test_an_epoch_cut_short_leaves_no_step_open(tmp_path):
    # Batch 3 holds a NaN. Epoch 0 stops before training on it; it must not be merged into
    # epoch 1's first step (3), whose loss is NaN from finite data: loss_nonfinite.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard, max_epochs=2).fit(StopsEpochEarly(), make_data(6, nan_batches=(3,)))
    assert [(e.step, e.cause) for e in guard.events] == [
        (3, "loss_nonfinite"), (6, "input_nonfinite")]  # epoch 1 trains on batch 3 at step 6
    tensors = nanguard.load(guard.dumps[0]).tensors
    assert "inputs" in tensors and "inputs.0" not in tensors  # one batch, not two
    assert [r.step for r in guard.history] == list(range(3 + 6))


def test_resuming_a_checkpoint_written_without_the_guard_counts_on_from_its_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    unguarded = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer(tmp_path, unguarded, enable_checkpointing=True).fit(Classifier(), make_data(6))
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard, max_epochs=2).fit(
        Classifier(), make_data(6, nan_batches=(2,)), ckpt_path=str(path))
    (event,) = guard.events
    assert event.step == 6 + 2  # trainer.global_step of the bad batch
    assert [r.step for r in guard.history] == list(range(6, 12))


def test_resuming_the_checkpoint_of_an_abort_retries_its_step_under_its_own_index(tmp_path):
    # OnExceptionCheckpoint saved the guard one step ahead of trainer.global_step (the guard
    # had counted the aborted step, Lightning had not), and the resumed run's history was
    # one off from Lightning's step for the rest of the run (a black-box tester).
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), actions=("skip", "abort"), max_skips=1)
    saver = OnExceptionCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="exc")
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        trainer(tmp_path, guard, extra_callbacks=[saver], enable_checkpointing=True).fit(
            Classifier(), make_data(6, nan_batches=(2, 3)))
    assert (info.value.event.step, info.value.event.action) == (3, "abort")
    ckpt = tmp_path / "ckpt" / "exc.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3

    seen: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.global_step)

    again = NanGuard(dump_dir=str(tmp_path / "dumps2"))
    trainer(tmp_path, again, extra_callbacks=[Steps()], max_epochs=2).fit(
        Classifier(), make_data(6), ckpt_path=str(ckpt))
    assert [r.step for r in again.history] == list(range(12))  # step 3 once: the retry's
    assert seen == list(range(3, 12))
    assert [(e.step, e.action) for e in again.events][-1] == (3, "abort")  # kept


def test_anomaly_mode_is_said_to_pre_empt_the_guard(tmp_path):
    # Trainer(detect_anomaly=True) raised in the backward of the first bad step, before the
    # guard could act, with no word from the guard (a black-box tester).
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    with pytest.warns(RuntimeWarning, match="anomaly mode is on"), \
            pytest.raises(RuntimeError, match="returned nan values"):
        trainer(tmp_path, guard, detect_anomaly=True).fit(
            Classifier(), make_data(4, nan_batches=(2,)))
    assert [r.step for r in guard.history] == [0, 1] and not guard.events


class Embedder(pl.LightningModule):
    """Outputs 16-wide embeddings; the loss owns the weights of 50 identities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(N_IN, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 16))
        self.ids = torch.nn.Parameter(torch.randn(50, 16) * 0.1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        cos = torch.nn.functional.normalize(self(x)) @ torch.nn.functional.normalize(
            self.ids).t()
        return torch.nn.functional.cross_entropy(cos * 10.0, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_an_embedding_model_trains_on_after_the_first_step(tmp_path):
    # Lightning cannot turn a loss's IndexError into a skip, so with no evidence yet the
    # first step's ids past the output's width are defused (one false alarm, documented);
    # its gradient shows the output is no class scores, and no later step is touched.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * BATCH, N_IN, generator=g)
    y = torch.randint(0, 50, (8 * BATCH,), generator=g)
    given = y.clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard, max_epochs=2).fit(Embedder(), loader)
    assert [(e.step, e.cause) for e in guard.events] == [(0, "target_invalid")]
    assert [r.action for r in guard.history][1:] == [None] * 15
    assert torch.equal(y, given)


class FeaturesAndLogits(pl.LightningModule):
    """forward returns (features, logits): 3 features, 6 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(N_IN, 3), torch.nn.ReLU())
        self.head = torch.nn.Linear(3, 6)
        self.labels_seen: list[torch.Tensor] = []

    def forward(self, x):
        h = self.body(x)
        return h, self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.labels_seen.append(y.clone())
        return torch.nn.functional.cross_entropy(self(x)[1], y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_features_then_logits_tuple_counts_classes_by_the_logits(tmp_path):
    # The contract's logits source is the first floating tensor (the features here), but
    # their width is no class count: ids 3..5 are valid and must not be touched; an id 6
    # at step 2 is out of [0, 6) and is.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5 * BATCH, N_IN, generator=g)
    y = torch.arange(5 * BATCH) % 6
    y[2 * BATCH + 1] = 6
    given = y.clone()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = FeaturesAndLogits()
    trainer(tmp_path, guard).fit(model, loader)
    assert [r.action for r in guard.history] == [None, None, "skip", None, None]
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    assert "[0, 6)" in event.message
    assert all(torch.equal(seen, given[i * BATCH:(i + 1) * BATCH])
               for i, seen in enumerate(model.labels_seen) if i != 2)
    assert torch.equal(y, given)


def test_a_checkpoint_between_steps_never_holds_an_overflowed_update(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    every_step = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1,
                                 save_top_k=-1, filename="{step}")
    model = LrSpike(spike_at=3)
    trainer(tmp_path, guard, extra_callbacks=[every_step], enable_checkpointing=True).fit(
        model, make_data(6))
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 6
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()), path.name
    (event,) = guard.events
    assert (event.step, event.cause) == (3, "update_nonfinite")


class ClipsItsOwn(Classifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="value")


@pytest.mark.parametrize("how", ["trainer_value", "trainer_norm", "module_value"])
def test_lightning_clipping_is_not_run_on_a_skipped_step(tmp_path, how):
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = ClipsItsOwn() if how == "module_value" else Classifier()
    clip = {} if how == "module_value" else dict(
        gradient_clip_val=0.5, gradient_clip_algorithm=how.split("_")[1])
    t = trainer(tmp_path, guard, **clip)
    t.fit(model, make_data(6, nan_batches=(2,)))
    assert [r.action for r in guard.history] == [None, None, "skip", None, None, None]
    assert_finite(model)
    # The module's own hook is back for the steps after the skipped one.
    assert "configure_gradient_clipping" not in model.__dict__


def test_stats_can_be_monitored_in_an_epoch_shorter_than_the_logging_cadence(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    stop = EarlyStopping(monitor="nanguard/loss", check_on_train_epoch_end=True, patience=10)
    t = trainer(tmp_path, guard, max_epochs=2, extra_callbacks=[stop])  # log_every_n_steps=50
    t.fit(Classifier(), make_data(6))
    assert t.current_epoch == 2
    assert float(t.callback_metrics["nanguard/loss"]) == pytest.approx(guard.history[-1].loss)


class BigRegression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_precision_64_true_is_judged_in_float64(tmp_path):
    # Targets in the 1e40s: loss and gradients finite in float64, past float32's range.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, generator=g, dtype=torch.float64) * 1e40
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard, precision="64-true").fit(BigRegression(), loader)
    assert [r.action for r in guard.history] == [None] * 4
    assert all(1e70 < r.loss < 1e90 and 1e39 < r.grad_norm < 1e42 for r in guard.history)


def test_a_monitor_does_not_stop_a_run_the_guard_saved_on_an_epochs_last_batch(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    stop = EarlyStopping(monitor="nanguard/loss", check_on_train_epoch_end=True, patience=3)
    t = trainer(tmp_path, guard, max_epochs=3, extra_callbacks=[stop])
    t.fit(Classifier(), make_data(6, nan_batches=(5,)))  # the NaN in each epoch's last batch
    assert t.current_epoch == 3 and not stop.stopped_epoch
    assert [r.action for r in guard.history].count("skip") == 3
    # The monitor read the last good step's loss, and the history keeps the truth.
    assert math.isnan(guard.history[-1].loss)
    assert float(t.callback_metrics["nanguard/loss"]) == pytest.approx(guard.history[-2].loss)


class PlateauOnStep(Classifier):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": sched, "monitor": "nanguard/loss", "interval": "step"}}


@pytest.mark.parametrize("how", ["early_stop_at_max_steps", "plateau_per_step",
                                 "checkpoint_every_n_steps"])
def test_a_monitor_of_a_step_name_finds_it_on_any_step(tmp_path, how):
    # Monitors read callback_metrics on steps outside the logging cadence (default 50): at
    # the end of a run cut by max_steps, on every step (a plateau schedule per step), every
    # n steps (checkpoints). Each must find the name, with that step's value.
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model: Classifier = Classifier()
    extra: list[pl.Callback] = []
    kwargs: dict = {"max_steps": 5}
    if how == "early_stop_at_max_steps":
        extra = [EarlyStopping(monitor="nanguard/loss")]
    elif how == "plateau_per_step":
        model, kwargs = PlateauOnStep(), {}
    else:
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="nanguard/loss",
                               every_n_train_steps=2, save_top_k=-1)
        extra, kwargs = [ckpt], {"max_steps": 5, "enable_checkpointing": True}
    t = trainer(tmp_path, guard, extra_callbacks=extra, **kwargs)
    t.fit(model, make_data(6))
    assert float(t.callback_metrics["nanguard/loss"]) == pytest.approx(guard.history[-1].loss)
    if how == "checkpoint_every_n_steps":  # after steps 1 and 3, ranked by their own losses
        scores = sorted(float(v) for v in ckpt.best_k_models.values())
        assert scores == pytest.approx(sorted(guard.history[i].loss for i in (1, 3)))


class ValidatingClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


class ReadsBeforeValidation(pl.Callback):
    """A callback of the user's that reads the stats when validation starts."""

    def __init__(self):
        self.seen: list[tuple[int, float | None]] = []

    def on_validation_start(self, trainer, pl_module):
        value = trainer.callback_metrics.get("nanguard/loss")
        self.seen.append((trainer.global_step, None if value is None else float(value)))


def test_validation_counted_across_epochs_sees_the_last_good_step(tmp_path):
    # check_val_every_n_epoch=None: validation every 5 batches counted over the run (after
    # run batches 4, 9, 14), so batch 9 is epoch 1's batch 1. A NaN there is a skipped step,
    # and what the validation reads is the last good step's loss, not a NaN nor a stale one.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    reader = ReadsBeforeValidation()
    t = trainer(tmp_path, guard, max_epochs=2, extra_callbacks=[reader], num_sanity_val_steps=0,
                val_check_interval=5, check_val_every_n_epoch=None)
    t.fit(ValidatingClassifier(), make_data(8, nan_batches=(1,)), make_data(2))
    history = guard.history
    assert [r.action for r in history].count("skip") == 2  # batch 1 of each epoch
    assert [step for step, _ in reader.seen] == [5, 10, 15]
    expected = [history[4].loss, history[8].loss, history[14].loss]  # 9 was skipped
    assert [value for _, value in reader.seen] == pytest.approx(expected)


class TwoLoaders(Classifier):
    def training_step(self, batch, batch_idx):
        return sum(super(TwoLoaders, self).training_step(b, batch_idx) for b in batch)


def test_a_list_of_training_loaders_is_one_batch_per_loader(tmp_path):
    # Lightning hands the step [(xa, ya), (xb, yb)]: loader 1's NaN is the batch's own, in
    # inputs.1, not a NaN "made by the step's code" in what the guard took as targets.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    t = trainer(tmp_path, guard)
    t.fit(TwoLoaders(), [make_data(4), make_data(4, nan_batches=(2,))])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "input_nonfinite", "inputs.1")
    assert "made them" not in event.message
    dump = nanguard.load(guard.dumps[0])
    assert {"inputs.0", "inputs.1", "targets.0", "targets.1"} <= set(dump.tensors)
    assert np.isnan(dump.tensors["inputs.1"]).sum() == 1
    assert not np.isnan(dump.tensors["inputs.0"]).any()


class SkipsBatch4(LrSpike):
    def training_step(self, batch, batch_idx):
        if batch_idx == 4:
            return None  # Lightning's own way to skip a batch
        return super().training_step(batch, batch_idx)


def test_an_overflowed_update_is_named_across_a_step_that_returned_none(tmp_path):
    # Step 3's update overflows; step 4's training_step returns None (Lightning still steps
    # the optimizer, with no gradients); step 5 finds the update. The event is step 3's
    # update_nonfinite with step 3's batch, not a weights_nonfinite blamed on outside code.
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = SkipsBatch4(spike_at=3)
    trainer(tmp_path, guard, num_sanity_val_steps=0).fit(model, make_data(8))
    assert_finite(model)
    event = guard.events[0]
    assert (event.step, event.cause) == (3, "update_nonfinite")
    dump = nanguard.load(guard.dumps[0])
    x3 = make_data(8).dataset.tensors[0][3 * BATCH:4 * BATCH]
    assert np.array_equal(dump.tensors["inputs"], x3.numpy())


class NamedLoaders(Classifier):
    def training_step(self, batch, batch_idx):
        return sum(super(NamedLoaders, self).training_step(b, batch_idx)
                   for b in batch.values())


def test_a_dict_of_training_loaders_is_split_per_loader(tmp_path):
    # {"a": loader, "b": loader}: each loader's (x, y) is split into inputs.<name> and
    # targets.<name> (they used to be all "inputs", labels included).
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard).fit(NamedLoaders(), {"a": make_data(4),
                                                  "b": make_data(4, nan_batches=(2,))})
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "input_nonfinite", "inputs.b")
    dump = nanguard.load(guard.dumps[0])
    assert {"inputs.a", "inputs.b", "targets.a", "targets.b"} == {
        k for k in dump.tensors if k.startswith(("inputs", "targets"))}
    assert dump.tensors["targets.b"].dtype == np.int64


class Validates(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_a_fit_after_evaluating_a_checkpoint_starts_afresh(tmp_path):
    # Lightning hands callbacks their checkpointed state for validate/test/predict too: only
    # a fit that resumes from the checkpoint takes it.
    first = NanGuard(dump_dir=str(tmp_path / "dumps"))
    t = trainer(tmp_path, first)
    t.fit(Validates(), make_data(6, nan_batches=(1, 4)))
    path = str(tmp_path / "run.ckpt")
    t.save_checkpoint(path)

    guard = NanGuard(dump_dir=str(tmp_path / "dumps2"))
    model = Validates()
    t2 = trainer(tmp_path, guard)
    t2.validate(model, make_data(2), ckpt_path=path)
    t2.fit(model, make_data(6, nan_batches=(3,)))
    assert [r.step for r in guard.history] == list(range(6))
    assert [e.step for e in guard.events] == [3]
    assert guard.state_dict()["session"]["ladder"]["total_bad"] == 1


def test_nothing_is_logged_when_the_trainer_logs_no_steps(tmp_path):
    logged = []

    class Spy(NanGuard):
        def _log(self, pl_module, rec):
            logged.append(rec.step)
            super()._log(pl_module, rec)

    # log_every_n_steps=0: only the epoch's last step, which monitors read at its end.
    trainer(tmp_path, Spy(dump_dir=str(tmp_path / "dumps")), log_every_n_steps=0).fit(
        Classifier(), make_data(12))
    assert logged == [11]

    logged.clear()
    guard = Spy(dump_dir=str(tmp_path / "dumps"))
    t = pl.Trainer(barebones=True, max_epochs=1, callbacks=[guard], accelerator="cpu",
                   devices=1, default_root_dir=tmp_path)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t.fit(Classifier(), make_data(6, nan_batches=(2,)))
    assert logged == []
    assert not [w for w in seen if "self.log()" in str(w.message)]
    assert [r.action for r in guard.history] == [None, None, "skip", None, None, None]


def test_a_rollback_after_lightnings_pruning_renamed_the_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelPruning

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    model = Classifier()
    pruning = ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False)
    t = trainer(tmp_path, guard, max_epochs=2, extra_callbacks=[pruning])
    # Epoch 1 runs on `net.0.weight_orig` (+ mask); the snapshot named it `net.0.weight`.
    t.fit(model, make_data(6, nan_batches=(1, 2, 3, 4)))
    actions = [r.action for r in guard.history]
    assert actions[6:] == [None, "skip", "skip", "skip", "rollback", None]
    assert "net.0.weight_orig" in dict(model.named_parameters())
    assert_finite(model)


def test_a_resumed_runs_first_bad_step_shows_monitors_the_last_good_one(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    clean = list(make_data(4))
    bad = [(x.clone(), y) for x, y in clean]
    bad[0][0][0, 0] = math.nan

    def run(max_epochs, batches, ckpt=None):
        guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
        stop = EarlyStopping(monitor="nanguard/loss", patience=1000,
                             check_on_train_epoch_end=False)
        t = trainer(tmp_path, guard, max_epochs=max_epochs, extra_callbacks=[stop],
                    val_check_interval=1)
        t.fit(Validates(), loader_of(batches), make_data(1), ckpt_path=ckpt)
        return t, guard

    t, _ = run(1, clean)
    path = str(tmp_path / "epoch0.ckpt")
    t.save_checkpoint(path)
    t, guard = run(2, bad, path)  # epoch 1 opens with a NaN batch
    assert [r.action for r in guard.history] == [None] * 4 + ["skip", None, None, None]
    assert not t.should_stop
    assert float(t.callback_metrics["nanguard/loss"]) == pytest.approx(guard.history[-1].loss)


def test_a_second_fit_does_not_show_monitors_the_first_fits_values(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard).fit(Classifier(lr=0.5), make_data(4))
    # A fresh fit of another model with the same callback; its first step is bad.
    stop = EarlyStopping(monitor="nanguard/loss", patience=100, check_finite=False)
    t = trainer(tmp_path, guard, max_steps=1, extra_callbacks=[stop])
    t.fit(Classifier(lr=0.1), make_data(4, nan_batches=(0,)))
    assert [r.action for r in guard.history] == ["skip"]
    assert float(t.callback_metrics["nanguard/lr"]) == pytest.approx(0.1)  # not fit 1's 0.5
    assert math.isnan(float(t.callback_metrics["nanguard/loss"]))


class TextBatches(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_dump_keeps_the_text_of_a_batch(tmp_path):
    # The default collate turns a dataset of dicts into {"text": [str, ...], "x": ..., "y": ...}.
    g = torch.Generator().manual_seed(0)
    rows = [{"text": f"doc {i}", "x": torch.randn(3, generator=g), "y": i % 2} for i in range(8)]
    rows[4]["x"][0] = math.nan
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    trainer(tmp_path, guard).fit(TextBatches(), torch.utils.data.DataLoader(rows, batch_size=2))
    dump = nanguard.load(guard.dumps[0])
    assert (dump.event.step, dump.event.cause) == (2, "input_nonfinite")
    assert dump.tensors["inputs.text"].tolist() == ["doc 4", "doc 5"]


class NormalisesGradients(Classifier):
    """LARS-style: divides each gradient by its norm in on_before_optimizer_step, which runs
    after the guard measured them; the gate's gradient is 0 at step 3 (0/0 is NaN)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        use = 0.0 if self.trainer.global_step == 3 else 1.0
        return super().training_step(batch, batch_idx) + use * 1e-3 * self.gate ** 2

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            if p.grad is not None:
                p.grad.div_(p.grad.norm())


def test_gradients_changed_after_the_guard_measured_them_are_not_called_finite(tmp_path):
    # Adam's state goes NaN from the NaN gradients the user's hook made: not "a state that
    # was non-finite before the step" (a corrupt checkpoint).
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), snapshot_every=2)
    model = NormalisesGradients()
    trainer(tmp_path, guard, max_steps=6).fit(model, make_data(6))
    event = guard.events[0]
    assert (event.step, event.cause) == (3, "update_nonfinite")
    assert "on_before_optimizer_step" in event.message
    assert "corrupt" not in event.message
    assert_finite(model)
