"""Two-rank CPU DDP runs of the plain-PyTorch guard, a NaN on rank 1 only.

``python tests/_ddp_torch.py OUTDIR`` spawns two ranks with ``torch.multiprocessing``
(gloo backend); each writes ``rank{r}.json`` and ``rank{r}.pt`` into OUTDIR. After the main
run, two gradient-accumulation runs (``model.no_sync()`` micro-batches, without and with a
GradScaler) put their results under ``"accumulation"`` in the same JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NAN_STEPS = (3, 4)  # two bad steps in a row on rank 1: a skip, then a rollback


def worker(rank: int, outdir: str) -> None:
    from nanguard.torch import NanGuard

    dist.init_process_group("gloo", init_method=f"file://{outdir}/pg", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = NanGuard(model, opt, dump_dir=f"{outdir}/dumps", max_skips=1, snapshot_every=2)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(8):
        x = torch.randn(4, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        if rank == 1 and step in NAN_STEPS:
            x[0, 2] = math.nan
        opt.zero_grad()
        with guard.step(x, targets=y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            guard.backward(loss)
            opt.step()
    guard.close()
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(weights, f"{outdir}/rank{rank}.pt")
    with open(f"{outdir}/rank{rank}.json", "w") as fh:
        json.dump(
            {
                "rank": rank,
                "actions": [r.action for r in guard.history],
                "steps": [r.step for r in guard.history],
                "events": [
                    {"step": e.step, "cause": e.cause, "rank": e.rank, "action": e.action}
                    for e in guard.events
                ],
                "dumps": guard.dumps,
                "lr": [r.lr for r in guard.history],
                "accumulation": {
                    kind: accumulate(rank, outdir, kind == "scaler") for kind in ("plain", "scaler")
                },
                "label_at_step_0": short_run(rank, outdir, "label"),
                "collective_in_forward": short_run(rank, outdir, "collective"),
                "optimizer_state": short_run(rank, outdir, "state"),
            },
            fh,
        )
    # One run in about a dozen aborted after this point, in C++ teardown ("terminate called
    # without an active exception", gloo's threads; pytorch#190489), with a barrier and
    # destroy_process_group before exit too. The results are on disk by now: the rank leaves
    # without running destructors, so that torch crash is not counted as the guard's.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def accumulate(rank: int, outdir: str, use_scaler: bool) -> dict:
    """k=2 micro-batches per optimizer step, the first under ``no_sync``; rank 1's batch 4
    (the first micro-batch of step 2) holds a NaN."""
    from nanguard.torch import NanGuard

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu") if use_scaler else None
    guard = NanGuard(model, opt, scaler=scaler, dump_dir=f"{outdir}/dumps_accum")
    g = torch.Generator().manual_seed(200 + rank)
    for i in range(12):
        x = torch.randn(4, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        if rank == 1 and i == 4:
            x[1, 3] = math.nan
        last = i % 2 == 1
        with guard.step(x, targets=y), contextlib.nullcontext() if last else model.no_sync():
            guard.backward(torch.nn.functional.cross_entropy(model(x), y) / 2)
            if last:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
    guard.close()
    return {
        "steps": [r.step for r in guard.history],
        "actions": [r.action for r in guard.history],
        "events": [[e.step, e.cause] for e in guard.events],
        "weights": [p.detach().flatten().tolist() for p in net.parameters()],
    }


class SyncedNorm(torch.nn.Module):
    """Normalises by statistics all-reduced over the ranks (as SyncBatchNorm does on GPUs):
    a collective inside the model's forward."""

    def forward(self, x):
        stats = torch.stack([x.mean(), (x * x).mean()])
        dist.all_reduce(stats)
        mean, sq = stats / dist.get_world_size()
        return (x - mean) / torch.sqrt(sq - mean * mean + 1e-5)


def short_run(rank: int, outdir: str, fault: str) -> dict:
    """Rank 1 alone goes bad: ``label``, a class id out of range at the very first step
    (before any gradient told the guard the output scores classes); ``collective``, a NaN
    input at step 2 of a model whose forward runs an all-reduce (a replay on one rank only
    would wait forever for the other); ``state``, an Inf written into rank 1's Adam state
    before step 3, which the snapshot due at step 4 finds on rank 1 only (rank 0's snapshot
    there must not stand: the rollback goes to the same step on both)."""
    from nanguard.torch import NanGuard

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)]
    if fault == "collective":
        layers.insert(1, SyncedNorm())
    net = torch.nn.Sequential(*layers)
    model = torch.nn.parallel.DistributedDataParallel(net)
    if fault == "state":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = NanGuard(model, opt, dump_dir=f"{outdir}/dumps_{fault}", snapshot_every=2)
    g = torch.Generator().manual_seed(300 + rank)
    for step in range(6):
        x = torch.randn(4, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        if rank == 1 and fault == "label" and step == 0:
            y[2] = 10
        if rank == 1 and fault == "collective" and step == 2:
            x[1, 1] = math.nan
        if rank == 1 and fault == "state" and step == 3:
            opt.state[net[0].weight]["exp_avg_sq"][0, 0] = math.inf
        opt.zero_grad()
        with guard.step(x, targets=y):
            guard.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
    guard.close()
    return {
        "actions": [r.action for r in guard.history],
        "events": [[e.step, e.cause] for e in guard.events],
        "rank_causes": [e.details.get("rank_causes") for e in guard.events],
        "weights": [p.detach().flatten().tolist() for p in net.parameters()],
    }


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
