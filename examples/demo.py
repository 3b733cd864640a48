"""nanguard demo: a real PyTorch run that dies from bad numbers, and the same run guarded.

The data set holds two bad batches, as real ones do: one with a corrupted record (NaN) and
one that was never normalised (values x1000), fed to a model whose loss uses a naive
softmax. Unguarded, the first bad batch turns every weight into NaN and the run is lost.
Guarded, both bad steps are skipped, the run finishes, and the dumps say what went wrong.

Run: python examples/demo.py [--dump-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil

import torch

from nanguard.cli import main as nanguard_cli
from nanguard.torch import NanGuard

STEPS, BATCH, FEATURES, CLASSES = 200, 64, 20, 5


def make_data(seed: int = 0, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(seed + 1)
    data = []
    for _ in range(steps):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        x = centers[y] + torch.randn(BATCH, FEATURES, generator=g)
        data.append((x, y))
    if seed == 0:
        data[60][0][17, 3] = float("nan")  # a corrupted record
        data[120] = (data[120][0] * 1000.0, data[120][1])  # a batch that skipped normalisation
    return data


def naive_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    probs = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)  # overflows > 88
    return -torch.log(probs[torch.arange(len(y)), y]).mean()


def train(guarded: bool, dump_dir: str) -> tuple[float, float, NanGuard | None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = NanGuard(model, optimizer, snapshot_every=50, dump_dir=dump_dir) if guarded else None
    data = make_data()
    for x, y in data:
        optimizer.zero_grad()
        if guard is None:
            loss = naive_cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        else:
            with guard.step(x, targets=y):
                loss = naive_cross_entropy(model(x), y)
                guard.backward(loss)
                optimizer.step()
    with torch.no_grad():
        clean = make_data(seed=1, steps=10)
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in clean)
        accuracy = correct / (10 * BATCH)
    if guard is not None:
        guard.close()
    return loss.item(), accuracy, guard


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-dir", default="nanguard_dumps/demo")
    args = parser.parse_args()
    shutil.rmtree(args.dump_dir, ignore_errors=True)

    print("1) Without nanguard")
    loss, acc, _ = train(guarded=False, dump_dir=args.dump_dir)
    print(f"   final loss {loss}, accuracy {acc:.1%}: the run is lost")

    print("\n2) With nanguard.torch.NanGuard")
    loss, acc, guard = train(guarded=True, dump_dir=args.dump_dir)
    assert guard is not None
    print(f"   final loss {loss:.4f}, accuracy {acc:.1%}")
    for event in guard.events:
        print(f"   step {event.step}: {event.cause} -> {event.action}")
    print(f"   dumps: {', '.join(guard.dumps)}")

    print("\n3) After the fact: nanguard inspect", guard.dumps[-1], "\n")
    nanguard_cli(["inspect", guard.dumps[-1], "--rows", "6"])
    ok = math.isfinite(loss) and acc > 0.8 and len(guard.events) == 2
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
