"""Epoch time of Keras ``fit``: no callback, ``TerminateOnNaN()``, and ``NanGuard()``.

MLP 512-1024-1024-10, batch 256, runs interleaved (A B C, then C B A, ...) so drift hits
every variant alike; the first epoch of each run (tracing) is left out. The headline
overhead is the median over rounds of a variant's mean epoch over no callback's in the same
round. Prints a table and writes JSON to ``benchmarks/results/``.

    python benchmarks/overhead_keras.py [--rounds 5] [--steps 40] [--backend tensorflow]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs per variant")
    parser.add_argument("--steps", type=int, default=40, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import keras
    import numpy as np

    from nanguard.keras import NanGuard

    rng = np.random.default_rng(0)
    n = 256 * args.steps
    x = rng.normal(size=(n, 512)).astype("float32")
    y = rng.integers(0, 10, n)

    class EpochTimer(keras.callbacks.Callback):
        # Only epoch hooks: Keras keeps its asynchronous batch-end dispatch for this one.
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t0)

    def run(variant: str) -> list[float]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((512,)),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(1024, activation="relu"),
            keras.layers.Dense(10),
        ])
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        timer = EpochTimer()
        timer.times = []
        extra = {"none": [], "TerminateOnNaN": [keras.callbacks.TerminateOnNaN()],
                 "NanGuard": [NanGuard(dump_dir="benchmarks/results/dumps")]}[variant]
        model.fit(x, y, batch_size=256, epochs=args.epochs + 1, verbose=0,
                  callbacks=[*extra, timer])
        return timer.times[1:]

    variants = ["none", "TerminateOnNaN", "NanGuard"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            times[v].extend(run(v))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    base = statistics.median(times["none"])
    per_run = args.epochs  # epochs timed per run: a round's runs sit next to each other

    def paired(v: str) -> float:
        """Median over rounds of the variant's mean epoch over no callback's, same round."""
        ratios = []
        for r in range(args.rounds):
            mine = times[v][r * per_run:(r + 1) * per_run]
            none = times["none"][r * per_run:(r + 1) * per_run]
            ratios.append(statistics.fmean(mine) / statistics.fmean(none))
        return statistics.median(ratios) - 1

    rows = []
    print(f"\nKeras {keras.__version__}, backend {keras.backend.backend()}, {args.steps} "
          f"steps/epoch, batch 256, MLP 512-1024-1024-10, {args.rounds} interleaved runs")
    print(f"{'variant':<16}{'median s/epoch':>16}{'min':>10}{'overhead (paired)':>19}"
          f"{'(of medians)':>14}")
    for v in variants:
        med = statistics.median(times[v])
        rows.append({"variant": v, "median_s": med, "min_s": min(times[v]),
                     "overhead_paired": paired(v), "overhead": med / base - 1,
                     "epochs": times[v]})
        print(f"{v:<16}{med:>16.4f}{min(times[v]):>10.4f}{paired(v):>+19.1%}"
              f"{med / base - 1:>+14.1%}")
    os.makedirs("benchmarks/results", exist_ok=True)
    path = f"benchmarks/results/overhead_keras_{keras.backend.backend()}.json"
    with open(path, "w") as fh:
        json.dump({"keras": keras.__version__, "backend": keras.backend.backend(),
                   "python": platform.python_version(), "machine": platform.machine(),
                   "cpus": os.cpu_count(), "steps": args.steps, "rows": rows}, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
