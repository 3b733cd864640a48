"""Per-step cost of nanguard.torch.NanGuard, against no guard and against anomaly mode.

Runs, interleaved in one process, blocks of training steps on two models: an MLP of about
1.5M parameters and a small transformer encoder (4 layers, d=256). Each block is one of:
  plain    the bare loop
  guard    NanGuard at default options; a block is `snapshot_every` (100) steps, so the
           snapshot before its first step is counted in, as it is once per 100 steps in a run
  anomaly  the bare loop under torch.autograd.detect_anomaly()
Prints a table and writes JSON to benchmarks/results/overhead_torch.json.
Target: guard overhead <= 3% of the plain step time on both models.

Run: python benchmarks/overhead_torch.py [--rounds 5] [--steps 100]
"""

from __future__ import annotations

import argparse
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


def run_block(model, opt, batch, mode: str, steps: int, dump_dir: str) -> list[float]:
    x, y = batch
    times = []
    if mode == "guard":
        guard = NanGuard(model, opt, dump_dir=dump_dir)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            with guard.step(x, targets=y):
                guard.backward(F.cross_entropy(model(x), y))
                opt.step()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        guard.close()
        return times
    ctx = torch.autograd.detect_anomaly if mode == "anomaly" else None
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        if ctx is None:
            F.cross_entropy(model(x), y).backward()
        else:
            with ctx():
                F.cross_entropy(model(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    return times


def bench(name: str, factory, rounds: int, steps: int, modes: list[str]) -> dict:
    torch.manual_seed(0)
    model, batch = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    run_block(model, opt, batch, "plain", 10, "/tmp")  # warm-up
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            samples[mode] += run_block(model, opt, batch, mode, steps, f"/tmp/ng_bench_{name}")
    return summarize(name, n_params, samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per block")
    parser.add_argument("--no-anomaly", action="store_true")
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated")
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results", "overhead_torch.json")
    )
    args = parser.parse_args()
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    modes = ["plain", "guard"] + ([] if args.no_anomaly else ["anomaly"])
    chosen = args.models.split(",")
    results = [bench(n, f, args.rounds, args.steps, modes)
               for n, f in (("mlp", mlp), ("transformer", transformer)) if n in chosen]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.platform(), "target_guard_overhead_pct": 3.0}
    report(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"{args.rounds} rounds x {args.steps} steps per mode, interleaved",
           results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
