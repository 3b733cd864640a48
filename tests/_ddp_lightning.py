"""Two-rank CPU DDP run of the Lightning callback, a NaN on rank 1 only.

Run as a script (``python tests/_ddp_lightning.py OUTDIR``): Lightning's ``strategy="ddp"``
starts rank 1 by running this script again. Each rank writes ``rank{r}.json`` and
``rank{r}.pt`` (its final weights) into OUTDIR.
"""

from __future__ import annotations

import json
import math
import sys

import lightning.pytorch as pl
import torch

from nanguard.lightning import NanGuard

NAN_STEPS = (3, 4)  # two bad steps in a row on rank 1: a skip, then a rollback


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        rank = self.global_rank
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        x = torch.randn(8 * 4, 8, generator=g)
        y = torch.randint(0, 4, (8 * 4,), generator=g)
        if rank == 1:
            for step in NAN_STEPS:
                x[step * 4, 2] = math.nan  # the first sample of rank 1's batch `step`
        ds = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def main(outdir: str) -> None:
    guard = NanGuard(dump_dir=f"{outdir}/dumps", max_skips=1, snapshot_every=2)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=outdir,
    )
    model = Model()
    trainer.fit(model)
    rank = trainer.global_rank
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
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
                # DDP calls the module with forward swapped for training_step: that call's
                # output (the loss) must not count as the logits.
                "ranges": [[r.loss, r.logits_min, r.logits_max] for r in guard.history],
            },
            fh,
        )
    # Lightning leaves the process group up; torn down at interpreter exit, gloo's threads
    # aborted the process now and then ("terminate called without an active exception",
    # pytorch#190489). Both ranks done, then destroyed here while Python is alive.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
