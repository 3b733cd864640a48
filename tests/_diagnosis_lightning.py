"""Real failing ``Trainer.fit`` runs for the Lightning guard, one fault each (diagnosis suite).

The models, batches and losses of ``tests/_diagnosis_torch.py`` inside a LightningModule
(``self.net``, so names carry a ``net.`` prefix). Shared by ``benchmarks/diagnosis.py`` and
``tests/test_lightning_diagnosis.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from nanguard.lightning import NanGuard
from tests import _diagnosis_torch as T
from tests._diagnosis_cases import Case

F = torch.nn.functional


class Lit(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, loss_fn: T.LossFn,
                 optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.make_optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.net)


class Corrupt(pl.Callback):
    """Writes a NaN into ``net.fc2.weight`` before a given batch (outside the step)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.at:
            with torch.no_grad():
                pl_module.net.fc2.weight[0, 0] = math.nan


def fit(net: torch.nn.Module, batch: Callable[[int], T.Batch], dump_dir: str, *,
        lr: float = 0.1, loss_fn: T.LossFn = F.cross_entropy, steps: int = 8,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        callbacks: tuple[pl.Callback, ...] = ()) -> NanGuard:
    guard = NanGuard(dump_dir=dump_dir, actions=("skip",))
    model = Lit(net, loss_fn, optimizer or (lambda m: T.sgd(m, lr)))
    batches = [batch(i) for i in range(steps)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[guard, *callbacks], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        default_root_dir=dump_dir,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers, tiny batches: not what is tested
        trainer.fit(model, loader)
    return guard


def nan_input(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(), T.nan_input_batch, d)


def invalid_labels(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(), T.bad_label_batch, d)


def weights_corrupted(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(), T.classes, d, callbacks=(Corrupt(5),))


def hidden_overflow(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(T.Exp()), T.hidden_overflow_batch, d, lr=0.01)


def naive_softmax(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(torch.nn.Identity()), T.naive_softmax_batch, d, lr=0.01,
               loss_fn=T.naive_softmax_ce)


def loss_divides_by_zero(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.Net(), T.zero_label_batch, d, loss_fn=T.ce_over_nonzero_labels)


def exploding_rnn(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.TinyRNN(), T.rnn_batch, d, lr=0.0, loss_fn=F.mse_loss,
               steps=len(T.RNN_LENGTHS))


def lr_classifier(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.mlp(4), T.big_inputs_batch, d, lr=1.0, steps=14)


def lr_regression(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.mlp(1), T.regression_batch, d, lr=0.5, loss_fn=F.mse_loss, steps=8)


def update_overflow(d: str) -> NanGuard:
    torch.manual_seed(0)
    return fit(T.OffsetNet(), T.classes, d, loss_fn=T.ce_plus_mean, steps=3,
               optimizer=T.offset_sgd)


CASES: list[Case] = [
    Case("nan_input", "NaN input", nan_input, "input_nonfinite", 5, "inputs"),
    Case("invalid_labels", "invalid labels", invalid_labels, "target_invalid", 5, "targets"),
    Case("weights", "weights corrupted", weights_corrupted, "weights_nonfinite", 5,
         "net.fc2.weight"),
    Case("hidden", "hidden layer overflows", hidden_overflow, "activation_nonfinite", 5,
         "net.act"),
    Case("softmax", "naive softmax overflow", naive_softmax, "logit_overflow", 5, "output"),
    Case("div0", "loss divides by zero", loss_divides_by_zero, "loss_nonfinite", 5, None),
    Case("rnn", "exploding RNN", exploding_rnn, "grad_explosion", 3, "net.rnn"),
    Case("lr_ce", "too-high LR, classifier (stable CE)", lr_classifier, "grad_explosion",
         12, "net.fc1"),
    Case("lr_mse", "too-high LR, regression (MSE)", lr_regression, "logit_overflow", 6,
         "output"),
    Case("update", "update overflows", update_overflow, "update_nonfinite", 0, "net.offset"),
]
