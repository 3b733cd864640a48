"""Do the causes match the truth? Real failing trainings, one table.

Each scenario trains a small real model with the plain-PyTorch guard and injects one real
fault; the table shows the expected cause and ``where`` next to what the guard found (its
first event). Run: ``python benchmarks/diagnosis.py``. CPU only, about a minute.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from nanguard.torch import NanGuard

F = torch.nn.functional
nn = torch.nn


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


class TinyRNN(nn.Module):
    def __init__(self, nonlinearity: str = "relu") -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 16, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def naive_softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    steps: int = 20,
    before: Callable[[int], None] | None = None,
    **guard_kw: Any,
) -> NanGuard:
    guard = NanGuard(model, opt, dump_dir=tempfile.mkdtemp(), actions=("skip",), **guard_kw)
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


def classes(i: int, scale: float = 1.0, n_in: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, n_in, generator=g) * scale, torch.randint(0, 4, (16,), generator=g)


def nan_input() -> NanGuard:
    torch.manual_seed(0)
    m = Net()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = classes(i)
        if i == 5:
            x[3, 2] = math.nan
        return x, y

    return train(m, torch.optim.SGD(m.parameters(), lr=0.1), batch)


def invalid_labels() -> NanGuard:
    torch.manual_seed(0)
    m = Net()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = classes(i)
        if i == 5:
            y[0] = 7
        return x, y

    return train(m, torch.optim.SGD(m.parameters(), lr=0.1), batch)


def weights_corrupted() -> NanGuard:
    torch.manual_seed(0)
    m = Net()

    def corrupt(i: int) -> None:
        if i == 5:
            with torch.no_grad():
                m.fc2.weight[0, 0] = math.nan

    return train(m, torch.optim.SGD(m.parameters(), lr=0.1), classes, before=corrupt)


def hidden_overflow() -> NanGuard:
    torch.manual_seed(0)
    m = Net(Exp())
    return train(m, torch.optim.SGD(m.parameters(), lr=0.01),
                 lambda i: classes(i, 200.0 if i == 5 else 1.0))


def naive_softmax() -> NanGuard:
    torch.manual_seed(0)
    m = Net(nn.Identity())
    return train(m, torch.optim.SGD(m.parameters(), lr=0.01),
                 lambda i: classes(i, 500.0 if i == 5 else 1.0), loss_fn=naive_softmax_ce)


def loss_divides_by_zero() -> NanGuard:
    torch.manual_seed(0)
    m = Net()

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weight = (y != 0).float().sum()  # 0 when every label is 0
        return F.cross_entropy(out, y, reduction="sum") / weight

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = classes(i)
        return x, (torch.zeros_like(y) if i == 5 else y)

    return train(m, torch.optim.SGD(m.parameters(), lr=0.1), batch, loss_fn=loss)


def exploding_rnn() -> NanGuard:
    # h_t = tanh(3 h_{t-1} + ...) stays at 0 (zero inputs), so the loss is finite, but the
    # gradient through T steps is ~3**T: it grows with the sequence length until it overflows.
    torch.manual_seed(0)
    m = TinyRNN(nonlinearity="tanh")
    with torch.no_grad():
        m.rnn.weight_hh_l0.copy_(torch.eye(16) * 3.0)
        m.rnn.bias_hh_l0.zero_()
        m.rnn.bias_ih_l0.zero_()

    lengths = [10, 20, 30, 90]  # 3**90 overflows float32 in the gradient itself

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(4, lengths[i], 2), torch.ones(4, 1)

    return train(m, torch.optim.SGD(m.parameters(), lr=0.0), batch, loss_fn=F.mse_loss,
                 steps=len(lengths))


def too_high_lr() -> NanGuard:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 8, generator=g)
        return x, x.sum(1, keepdim=True)

    return train(m, torch.optim.SGD(m.parameters(), lr=0.5), batch, loss_fn=F.mse_loss,
                 steps=200)


def update_overflow() -> NanGuard:
    torch.manual_seed(0)
    m = Net()
    m.offset = nn.Parameter(torch.tensor(-3.4028e38))  # used at 1e-4 scale: forward finite
    base = m.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return base(x) + m.offset * 1e-4

    m.forward = forward  # type: ignore[method-assign]
    opt = torch.optim.SGD([
        {"params": [p for n, p in m.named_parameters() if n != "offset"], "lr": 1e-3},
        {"params": [m.offset], "lr": 1e38},  # grad 1e-4: -3.4028e38 - 1e34 = -inf
    ])

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) + out.mean()

    return train(m, opt, classes, loss_fn=loss, steps=3)


SCENARIOS: list[tuple[str, Callable[[], NanGuard], str, str | None]] = [
    ("NaN input", nan_input, "input_nonfinite", "inputs"),
    ("invalid labels", invalid_labels, "target_invalid", "targets"),
    ("weights corrupted", weights_corrupted, "weights_nonfinite", "fc2.weight"),
    ("hidden layer overflows", hidden_overflow, "activation_nonfinite", "act"),
    ("naive softmax overflow", naive_softmax, "logit_overflow", "output"),
    ("loss divides by zero", loss_divides_by_zero, "loss_nonfinite", None),
    ("exploding RNN", exploding_rnn, "grad_explosion", "rnn"),
    ("too-high learning rate", too_high_lr, "grad_explosion", None),
    ("update overflows", update_overflow, "update_nonfinite", "offset"),
]


def main() -> int:
    rows = [("scenario", "expected cause", "expected where", "found cause", "found where", "ok")]
    wrong = 0
    for name, fn, cause, where in SCENARIOS:
        try:
            guard = fn()
            ev = guard.events[0] if guard.events else None
            found = (ev.cause, ev.where) if ev else ("(no event)", None)
        except Exception as err:  # noqa: BLE001 - a crash is a row, not the end of the table
            found = (f"crash: {type(err).__name__}", str(err)[:40])
        ok = found == (cause, where)
        wrong += not ok
        rows.append((name, cause, str(where), found[0], str(found[1]), "yes" if ok else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\n{len(SCENARIOS) - wrong} of {len(SCENARIOS)} rows right (torch adapter)")
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
