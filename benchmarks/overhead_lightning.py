"""Per-step cost of nanguard.lightning.NanGuard in Trainer.fit, against no callback and
against Trainer(detect_anomaly=True).

Runs, interleaved in one process, blocks of `Trainer.fit` on two models: an MLP of about
1.5M parameters and a small transformer encoder (4 layers, d=256). Each block is one fit of
`--steps` optimizer steps in one of these modes:
  plain    no callback
  guard    NanGuard at default options (log_every=1: its stats go through pl_module.log on
           the steps the Trainer writes to its loggers, every log_every_n_steps=50 here, as
           by default; snapshot_every=100, so the snapshot before the first step falls in a
           block of 100 steps, as it does once per 100 steps in a run)
  anomaly  Trainer(detect_anomaly=True), no callback
A step's time is the wall time between two consecutive `on_train_batch_start` calls of a
timing callback placed first (the last step ends at `on_train_end`), so it holds
everything Lightning does for the step: data loading, the training step, every callback,
logging; step 0 (the guard's first snapshot, every mode's warm-up) included. Trainer
set-up is not counted. The headline overhead is the median over rounds of a block's mean
step time over the plain block's of the same round (see benchmarks/_common.py).
Prints a table and writes JSON to benchmarks/results/overhead_lightning.json.
Target: guard overhead <= 3% of the plain step time on both models.

Run: python benchmarks/overhead_lightning.py [--rounds 6] [--steps 100] [--models mlp]
     [--accelerator gpu]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
import warnings

import lightning
import lightning.pytorch as pl
import torch
from _common import (  # benchmarks/ is on sys.path when run as a script
    mlp,
    report,
    summarize,
    transformer,
)

from nanguard.lightning import NanGuard

F = torch.nn.functional


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class Timer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # the last step waits for all the block's GPU work
        self.starts.append(time.perf_counter())


def run_block(
    module: Module, batch, mode: str, steps: int, root: str, accelerator: str = "cpu"
) -> list[float]:
    timer = Timer()
    callbacks: list[pl.Callback] = [timer]
    if mode == "guard":
        callbacks.append(NanGuard(dump_dir=os.path.join(root, "dumps")))
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        detect_anomaly=mode == "anomaly",
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer.fit(module, loader)
    s = timer.starts
    return [b - a for a, b in zip(s, s[1:], strict=False)]


def bench(
    name: str, factory, rounds: int, steps: int, modes: list[str], root: str, accelerator: str
) -> dict:
    torch.manual_seed(0)
    net, batch = factory()
    module = Module(net)
    n_params = sum(p.numel() for p in module.parameters())
    run_block(module, batch, "plain", 10, root, accelerator)  # warm-up
    samples: dict[str, list[float]] = {m: [] for m in modes}
    blocks: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            times = run_block(module, batch, mode, steps, root, accelerator)
            samples[mode] += times
            blocks[mode].append(sum(times) / len(times))
    return summarize(name, n_params, samples, blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="steps per block")
    parser.add_argument("--no-anomaly", action="store_true")
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu",
                        help="cpu or gpu (default: gpu when available)")
    parser.add_argument(
        "--out", default=os.path.join("benchmarks", "results", "overhead_lightning.json")
    )
    args = parser.parse_args()
    for name in ("nanguard", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    modes = ["plain", "guard"] + ([] if args.no_anomaly else ["anomaly"])
    with tempfile.TemporaryDirectory() as root:
        results = [bench(n, f, args.rounds, args.steps, modes, root, args.accelerator)
                   for n, f in (("mlp", mlp), ("transformer", transformer))
                   if n in args.models.split(",")]
    meta = {"lightning": lightning.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.platform(),
            "accelerator": args.accelerator,
            "target_guard_overhead_pct": 3.0}
    report(f"lightning {lightning.__version__}, torch {torch.__version__} on {args.accelerator}, "
           f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps per "
           "mode, interleaved", results, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
