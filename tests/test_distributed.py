"""Distributed agreement, for real: two CPU ranks over gloo, a NaN on rank 1 only.

Both runs are helper scripts started as subprocesses (Lightning's ``strategy="ddp"``
re-executes its script for rank 1, and ``torch.multiprocessing`` spawns the plain guard's
ranks), so this test process is never forked, and a hang is caught by the timeout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import nanguard  # noqa: E402
from nanguard.cli import render_report  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

HERE = Path(__file__).parent
TIMEOUT = 150


def run_ranks(script: str, outdir: Path) -> list[dict]:
    """Run a two-rank helper script; fail (and kill every rank) if it hangs."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), str(outdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} hung for {TIMEOUT}s (ranks disagreed?):\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_agreement(results: list[dict], outdir: Path) -> None:
    r0, r1 = results
    # the same action on the same step on both ranks, though only rank 1 saw the NaN
    assert r0["actions"] == r1["actions"]
    assert r0["actions"][3:5] == ["skip", "rollback"]
    assert r0["actions"].count(None) == len(r0["actions"]) - 2
    assert r0["lr"] == r1["lr"]
    assert r0["lr"][-1] == pytest.approx(r0["lr"][0] * 0.5)
    # the same cause everywhere: rank 1's, the earliest in CAUSES
    for r in results:
        assert [(e["step"], e["cause"]) for e in r["events"]] == [
            (3, "input_nonfinite"), (4, "input_nonfinite")
        ]
        assert {e["rank"] for e in r["events"]} == {r["rank"]}
    # each rank writes its own dump, named and labelled with its rank
    for rank, r in enumerate(results):
        for path in r["dumps"]:
            assert f"_rank{rank}_" in os.path.basename(path)
            dump = nanguard.load(path)
            assert dump.event.rank == rank
            assert dump.meta["rank"] == rank
            assert dump.meta["world_size"] == 2
            assert dump.event.details["cause_rank"] == 1
            # Rank 0's own batch is finite: its message and report say whose the fault was.
            said = "on rank 1 (this rank, 0, takes the same action"
            assert (said in dump.event.message) == (rank == 0)
            assert ("found on rank 1" in render_report(dump)) == (rank == 0)
    # bit-identical weights on both ranks at the end
    w0 = torch.load(outdir / "rank0.pt")
    w1 = torch.load(outdir / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.isfinite(w0[k]).all(), k
        assert torch.equal(w0[k], w1[k]), k


def test_plain_torch_guard_ranks_agree(tmp_path):
    results = run_ranks("_ddp_torch.py", tmp_path)
    check_agreement(results, tmp_path)
    # Gradient accumulation (no_sync micro-batches), a NaN in rank 1's micro-batch 4 only.
    # Step 2 (micro-batches 4-5) is one bad step, judged at its end: at optimizer.step()
    # without a scaler, when scaler.step() kept the optimizer from stepping with one (the
    # bad micro-batch was concluded at once there before, and micro-batch 5 opened a step
    # of its own: 7 steps). Both ranks branch alike.
    for kind, expected_steps in (("plain", 6), ("scaler", 6)):
        r0, r1 = (r["accumulation"][kind] for r in results)
        assert r0["steps"] == r1["steps"] == list(range(expected_steps)), kind
        assert r0["actions"] == r1["actions"], kind
        assert r0["actions"][2] == "skip" and r0["actions"].count("skip") == 1, kind
        assert r0["events"] == r1["events"] == [[2, "input_nonfinite"]], kind
    # A bad class id on rank 1 at step 0, and a NaN on rank 1 in a model whose forward runs
    # an all-reduce: both ranks skip that step together, and finish with the same weights.
    for kind, step, cause in (("label_at_step_0", 0, "target_invalid"),
                              ("collective_in_forward", 2, "input_nonfinite")):
        r0, r1 = (r[kind] for r in results)
        assert r0["actions"] == r1["actions"], kind
        assert r0["actions"][step] == "skip" and r0["actions"].count("skip") == 1, kind
        assert r1["events"] == [[step, cause]], kind
        assert r0["weights"] == r1["weights"], kind  # bit-identical replicas
        assert all(math.isfinite(w) for p in r0["weights"] for w in p), kind
    # Each rank's own verdict: rank 0's step was sound (the defused label left every
    # gradient finite): None, not a cause its numbers do not show (it read update_nonfinite).
    for r in results:
        assert r["label_at_step_0"]["rank_causes"] == [[None, "target_invalid"]]
    # Rank 1's optimizer state alone went Inf: the snapshot due at step 4 is refused there
    # only; both ranks conclude step 4 as weights_nonfinite, roll back to the step-2
    # snapshot, and end with the same weights.
    r0, r1 = (r["optimizer_state"] for r in results)
    assert r0["actions"] == r1["actions"] == [None] * 4 + ["rollback", None]
    assert r0["events"] == r1["events"] == [[4, "weights_nonfinite"]]
    assert r0["weights"] == r1["weights"]


@pytest.mark.lightning
def test_lightning_ddp_ranks_agree(tmp_path):
    pytest.importorskip("lightning")
    results = run_ranks("_ddp_lightning.py", tmp_path)
    check_agreement(results, tmp_path)
    # The logits are the model's output (4 classes), not the loss training_step returns
    # through Lightning's forward redirection, and the replay calls the model on the batch.
    for r in results:
        for step, (loss, lo, hi) in enumerate(r["ranges"]):
            if r["actions"][step] is None:
                assert math.isfinite(lo) and math.isfinite(hi) and hi != loss, (step, r["ranges"])
        for path in r["dumps"]:
            dump = nanguard.load(path)
            assert dump.tensors["output"].shape == (4, 4)
            assert "replay failed" not in str(dump.event.details.get("replay", ""))
