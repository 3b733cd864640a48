"""Real failing trainings for the plain-PyTorch guard, one fault each (diagnosis suite).

Shared by ``benchmarks/diagnosis.py`` and ``tests/test_torch_diagnosis.py``; the models,
batches and losses are reused by the Lightning suite. Each scenario returns the guard after
a short real training run with ``actions=("skip",)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch

from nanguard.torch import NanGuard
from tests._diagnosis_cases import RNN_LENGTHS, Case

F = torch.nn.functional
nn = torch.nn
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# -- models -------------------------------------------------------------------------------
class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


class Net(nn.Module):
    def __init__(self, act: nn.Module | None = None, n_in: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, 16)
        self.act = act if act is not None else nn.Tanh()
        self.fc2 = nn.Linear(16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OffsetNet(Net):
    """A net with a parameter near float32's limit, used at a 1e-4 scale (forward finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(-3.4028e38))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.offset * 1e-4


class TinyRNN(nn.Module):
    """h_t = tanh(3 h_{t-1} + W x_t): with zero inputs h stays 0 (loss finite), but the
    gradient through T steps is ~3**T, so it grows with the sequence length and overflows."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 16, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(16) * 3.0)
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def mlp(n_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 32), relu=nn.ReLU(),
                                     head=nn.Linear(32, n_out)))


# -- losses -------------------------------------------------------------------------------
def naive_softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def ce_over_nonzero_labels(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight = (y != 0).float().sum()  # 0 when every label is 0
    return F.cross_entropy(out, y, reduction="sum") / weight


def ce_plus_mean(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) + out.mean()  # gives `offset` a gradient of 1e-4


# -- batches: step i -> (x, y) ------------------------------------------------------------
def classes(i: int, scale: float = 1.0) -> Batch:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 8, generator=g) * scale, torch.randint(0, 4, (16,), generator=g)


def nan_input_batch(i: int) -> Batch:
    x, y = classes(i)
    if i == 5:
        x[3, 2] = math.nan
    return x, y


def bad_label_batch(i: int) -> Batch:
    x, y = classes(i)
    if i == 5:
        y[0] = 7
    return x, y


def hidden_overflow_batch(i: int) -> Batch:
    return classes(i, 200.0 if i == 5 else 1.0)  # exp(200 * ...) overflows in `act`


def naive_softmax_batch(i: int) -> Batch:
    return classes(i, 500.0 if i == 5 else 1.0)  # logits ~500: exp overflows in the loss


def zero_label_batch(i: int) -> Batch:
    x, y = classes(i)
    return x, (torch.zeros_like(y) if i == 5 else y)


def rnn_batch(i: int) -> Batch:
    return torch.zeros(4, RNN_LENGTHS[i], 2), torch.ones(4, 1)


def big_inputs_batch(i: int) -> Batch:
    """Unnormalised features (std 100): at lr=1 the classifier diverges."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(32, 8, generator=g) * 100, torch.randint(0, 4, (32,), generator=g)


def regression_batch(i: int) -> Batch:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(1, keepdim=True)


# -- the plain-torch runs -----------------------------------------------------------------
def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], Batch],
    dump_dir: str,
    loss_fn: LossFn = F.cross_entropy,
    steps: int = 8,
    before: Callable[[int], None] | None = None,
) -> NanGuard:
    guard = NanGuard(model, opt, dump_dir=dump_dir, actions=("skip",))
    for i in range(steps):
        if before is not None:
            before(i)
        x, y = batch(i)
        opt.zero_grad()
        with guard.step(x, targets=y):
            loss = loss_fn(model(x), y)
            guard.backward(loss)
            opt.step()
        if guard.events:
            break
    guard.close()
    return guard


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr)


def offset_sgd(model: OffsetNet) -> torch.optim.SGD:
    """lr 1e38 on `offset` only: its gradient 1e-4 moves it by 1e34, past float32's max."""
    rest = [p for n, p in model.named_parameters() if n != "offset"]
    return torch.optim.SGD([{"params": rest, "lr": 1e-3},
                            {"params": [model.offset], "lr": 1e38}])


def nan_input(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net()
    return train(m, sgd(m, 0.1), nan_input_batch, d)


def invalid_labels(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net()
    return train(m, sgd(m, 0.1), bad_label_batch, d)


def weights_corrupted(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net()

    def corrupt(i: int) -> None:
        if i == 5:
            with torch.no_grad():
                m.fc2.weight[0, 0] = math.nan

    return train(m, sgd(m, 0.1), classes, d, before=corrupt)


def hidden_overflow(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net(Exp())
    return train(m, sgd(m, 0.01), hidden_overflow_batch, d)


def naive_softmax(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net(nn.Identity())
    return train(m, sgd(m, 0.01), naive_softmax_batch, d, loss_fn=naive_softmax_ce)


def loss_divides_by_zero(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = Net()
    return train(m, sgd(m, 0.1), zero_label_batch, d, loss_fn=ce_over_nonzero_labels)


def exploding_rnn(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = TinyRNN()
    return train(m, sgd(m, 0.0), rnn_batch, d, loss_fn=F.mse_loss, steps=len(RNN_LENGTHS))


def lr_classifier(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = mlp(4)
    return train(m, sgd(m, 1.0), big_inputs_batch, d, steps=14)


def lr_regression(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = mlp(1)
    return train(m, sgd(m, 0.5), regression_batch, d, loss_fn=F.mse_loss, steps=8)


def update_overflow(d: str) -> NanGuard:
    torch.manual_seed(0)
    m = OffsetNet()
    return train(m, offset_sgd(m), classes, d, loss_fn=ce_plus_mean, steps=3)


CASES: list[Case] = [
    Case("nan_input", "NaN input", nan_input, "input_nonfinite", 5, "inputs"),
    Case("invalid_labels", "invalid labels", invalid_labels, "target_invalid", 5, "targets"),
    Case("weights", "weights corrupted", weights_corrupted, "weights_nonfinite", 5,
         "fc2.weight"),
    Case("hidden", "hidden layer overflows", hidden_overflow, "activation_nonfinite", 5, "act"),
    Case("softmax", "naive softmax overflow", naive_softmax, "logit_overflow", 5, "output"),
    Case("div0", "loss divides by zero", loss_divides_by_zero, "loss_nonfinite", 5, None),
    Case("rnn", "exploding RNN", exploding_rnn, "grad_explosion", 3, "rnn"),
    # Only fc1.weight's gradient norm overflows (entries ~3e19, finite; the float32 L2 norm
    # is not); loss and logits are finite.
    Case("lr_ce", "too-high LR, classifier (stable CE)", lr_classifier, "grad_explosion",
         12, "fc1"),
    # Outputs finite and > 88.7, squared loss inf: the contract's rule says logit_overflow.
    Case("lr_mse", "too-high LR, regression (MSE)", lr_regression, "logit_overflow", 6,
         "output"),
    Case("update", "update overflows", update_overflow, "update_nonfinite", 0, "offset"),
]
