"""Shared by the torch and Lightning overhead benchmarks: the two models, and the summary
table and JSON they both print and write."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch


def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    return model, (torch.randn(128, 1024), torch.randint(0, 10, (128,)))


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 256)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def transformer() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return Encoder(), (torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,)))


def summarize(
    name: str, n_params: int, samples: dict[str, list[float]], blocks: dict[str, list[float]]
) -> dict[str, Any]:
    """Step times of each mode and its overhead over ``plain``.

    ``samples`` holds every step's time; ``blocks`` the mean step time of each block, in
    round order. The headline overhead is the median over rounds of a block's time over the
    ``plain`` block of the same round: blocks of one round run back to back, so drift of a
    shared machine (which moves the plain step by 10-20% between minutes here) mostly
    cancels, and the snapshots and other once-in-a-while costs are in the block means.
    """
    plain_med = statistics.median(samples["plain"])
    plain_mean = statistics.fmean(samples["plain"])
    result: dict[str, Any] = {"model": name, "params": n_params,
                              "steps_per_mode": len(samples["plain"]),
                              "rounds": len(blocks["plain"]), "modes": {}}
    for mode, times in samples.items():
        med, mean = statistics.median(times), statistics.fmean(times)
        paired = [b / p for b, p in zip(blocks[mode], blocks["plain"], strict=True)]
        result["modes"][mode] = {
            "median_ms": med * 1e3,
            "mean_ms": mean * 1e3,
            "overhead_paired_pct": (statistics.median(paired) - 1) * 100,
            "overhead_median_pct": (med / plain_med - 1) * 100,
            "overhead_mean_pct": (mean / plain_mean - 1) * 100,
        }
    return result


def report(title: str, results: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    """Print the table and write the JSON."""
    print(title)
    print(f"{'model':<12} {'params':>9} {'mode':<8} {'median ms':>10} {'mean ms':>9} "
          f"{'overhead (paired)':>18} {'(of medians)':>13} {'(of means)':>11}")
    for res in results:
        for mode, m in res["modes"].items():
            print(f"{res['model']:<12} {res['params']:>9,} {mode:<8} {m['median_ms']:>10.3f} "
                  f"{m['mean_ms']:>9.3f} {m['overhead_paired_pct']:>17.1f}% "
                  f"{m['overhead_median_pct']:>12.1f}% {m['overhead_mean_pct']:>10.1f}%")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"wrote {out}")
