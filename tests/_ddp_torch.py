"""Two-rank CPU DDP run of the plain-PyTorch guard, a NaN on rank 1 only.

``python tests/_ddp_torch.py OUTDIR`` spawns two ranks with ``torch.multiprocessing``
(gloo backend); each writes ``rank{r}.json`` and ``rank{r}.pt`` into OUTDIR.
"""

from __future__ import annotations

import json
import math
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
            },
            fh,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2, join=True)
