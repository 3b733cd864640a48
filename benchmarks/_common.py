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


def summarize(name: str, n_params: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    """Median and mean step time of each mode, and its overhead over ``plain``."""
    plain_med = statistics.median(samples["plain"])
    plain_mean = statistics.fmean(samples["plain"])
    result: dict[str, Any] = {"model": name, "params": n_params,
                              "steps_per_mode": len(samples["plain"]), "modes": {}}
    for mode, times in samples.items():
        med, mean = statistics.median(times), statistics.fmean(times)
        result["modes"][mode] = {
            "median_ms": med * 1e3,
            "mean_ms": mean * 1e3,
            "overhead_median_pct": (med / plain_med - 1) * 100,
            "overhead_mean_pct": (mean / plain_mean - 1) * 100,
        }
    return result


def report(title: str, results: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    """Print the table and write the JSON."""
    print(title)
    print(f"{'model':<12} {'params':>9} {'mode':<8} {'median ms':>10} {'mean ms':>9} "
          f"{'overhead (median)':>18} {'overhead (mean)':>16}")
    for res in results:
        for mode, m in res["modes"].items():
            print(f"{res['model']:<12} {res['params']:>9,} {mode:<8} {m['median_ms']:>10.3f} "
                  f"{m['mean_ms']:>9.3f} {m['overhead_median_pct']:>17.1f}% "
                  f"{m['overhead_mean_pct']:>15.1f}%")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"wrote {out}")
