"""Per-step cost of nanguard.torch.NanGuard, against no guard and against anomaly mode.

Two models: an MLP of about 1.5M parameters and a small transformer encoder (4 layers,
d=256). Each mode trains its own copy of the model (same initial weights), with its own
Adam, in one process:
  plain    the bare loop
  guard    the same loop under one NanGuard at default options for the whole run, so its
           snapshot every 100 steps (and the one before the first step) is counted in
  anomaly  the bare loop under torch.autograd.detect_anomaly()
  passes   the bare loop plus only the two reads the contract needs every step, with no
           hooks and no logic: each gradient read once for the global norm (read to the
           host before optimizer.step(), as a skip needs) and each updated weight read once
           after it (its NaN/Inf check, read with the next step's numbers), with the
           kernels the guard uses on the CPU (a BLAS dot product, a sum) and one
           transfer. Whatever a guard does on top, it cannot cost less than this: the
           floor of the target on this machine (--passes)
The modes take turns in short blocks (`--steps` steps), `--rounds` times, the order
alternating. The headline overhead is the median over rounds of the guard block's time over
the plain block's of the same round (see benchmarks/_common.py). Prints a table and writes
JSON to benchmarks/results/overhead_torch.json.
Target: guard overhead <= 3% of the plain step time on both models.

On CUDA each block ends with a synchronize, so the block times hold all of its GPU work.

Run: python benchmarks/overhead_torch.py [--rounds 60] [--steps 5] [--models mlp]
     [--device cuda] [--no-anomaly] [--passes]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import time
import warnings

import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    mlp,
    report,
    summarize,
    transformer,
)

from nanguard.torch import NanGuard

F = torch.nn.functional


class Runner:
    """One mode: its own model copy, optimizer and (for ``guard``) a long-lived guard."""

    def __init__(self, mode: str, model, batch, dump_dir: str, device: str) -> None:
        self.mode = mode
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x, self.y = (t.to(self.device) for t in batch)
        self.guard = NanGuard(self.model, self.opt, dump_dir=dump_dir) if mode == "guard" else None
        self.params = list(self.model.parameters())
        self.checked: list[torch.Tensor] = []  # the last update's weight sums, unread

    def block(self, steps: int) -> list[float]:
        model, opt, x, y, guard = self.model, self.opt, self.x, self.y, self.guard
        times = []
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            if guard is not None:
                with guard.step(x, targets=y):
                    guard.backward(F.cross_entropy(model(x), y))
                    opt.step()
            elif self.mode == "anomaly":
                with torch.autograd.detect_anomaly():
                    F.cross_entropy(model(x), y).backward()
                opt.step()
            elif self.mode == "passes":
                F.cross_entropy(model(x), y).backward()
                squares = [_squared_norm(p.grad) for p in self.params]
                torch.stack(squares + self.checked).tolist()
                opt.step()
                with torch.no_grad():
                    self.checked = [p.sum() for p in self.params]
            else:
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if self.device.type == "cuda" and len(times) == steps - 1:
                torch.cuda.synchronize()  # the block's last step waits for all its work
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return times


def _squared_norm(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat) if t.device.type == "cpu" else torch.sum(flat * flat)


def bench(name: str, factory, rounds: int, steps: int, modes: list[str], device: str) -> dict:
    torch.manual_seed(0)
    model, batch = factory()
    n_params = sum(p.numel() for p in model.parameters())
    runners = {m: Runner(m, model, batch, f"/tmp/ng_bench_{name}", device) for m in modes}
    for runner in runners.values():
        runner.block(3)  # warm-up (Adam state, allocator); the guard's first snapshot too
    samples: dict[str, list[float]] = {m: [] for m in modes}
    blocks: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            times = runners[mode].block(steps)
            samples[mode] += times
            blocks[mode].append(sum(times) / len(times))
    if runners.get("guard") is not None:
        assert runners["guard"].guard is not None
        runners["guard"].guard.close()
    return summarize(name, n_params, samples, blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    parser.add_argument("--no-anomaly", action="store_true")
    parser.add_argument("--passes", action="store_true",
                        help="also time the bare loop plus the contract's two reads (the floor)")
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results", "overhead_torch.json")
    )
    args = parser.parse_args()
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    modes = (["plain", "guard"] + (["passes"] if args.passes else [])
             + ([] if args.no_anomaly else ["anomaly"]))
    chosen = args.models.split(",")
    results = [bench(n, f, args.rounds, args.steps, modes, args.device)
               for n, f in (("mlp", mlp), ("transformer", transformer)) if n in chosen]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "machine": platform.platform(), "target_guard_overhead_pct": 3.0}
    report(f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads, "
           f"{args.rounds} rounds x {args.steps}-step blocks per mode, interleaved",
           results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
