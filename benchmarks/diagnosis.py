"""Do the causes match the truth? Real failing trainings in every adapter, one table.

Each scenario trains a small real model and injects one real fault, in the plain-PyTorch
guard, the Lightning callback (a real ``Trainer.fit``) and the Keras callback (a real
``model.fit``, TensorFlow backend). The table shows the expected cause and ``where`` next
to what the guard found (its first event). The scenarios live in ``tests/_diagnosis_*.py``,
which the tests share. Run from anywhere: ``python benchmarks/diagnosis.py``; CPU only,
under a minute. Writes ``benchmarks/results/diagnosis.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scenarios are in tests/

ADAPTERS = ("torch", "lightning", "keras")


def suite(adapter: str) -> list[Any]:
    if adapter == "torch":
        from tests import _diagnosis_torch as mod
    elif adapter == "lightning":
        from tests import _diagnosis_lightning as mod  # type: ignore[no-redef]
    else:
        from tests import _diagnosis_keras as mod  # type: ignore[no-redef]
    return mod.CASES


def run_case(case: Any) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard = case.run(tempfile.mkdtemp(prefix="nanguard_diag_"))
        ev = guard.events[0] if guard.events else None
        found = (ev.cause, ev.step, ev.where) if ev else ("(no event)", None, None)
    except Exception as err:  # noqa: BLE001 - a crash is a row, not the end of the table
        found = (f"crash: {type(err).__name__}", None, str(err)[:40])
    return {
        "scenario": case.title,
        "expected": {"cause": case.cause, "step": case.step, "where": case.where},
        "found": {"cause": found[0], "step": found[1], "where": found[2]},
        "ok": found == (case.cause, case.step, case.where),
    }


def main() -> int:
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = {adapter: [run_case(c) for c in suite(adapter)] for adapter in ADAPTERS}
    head = ("adapter", "scenario", "expected cause", "expected where", "found cause",
            "found where", "step exp/found", "ok")
    rows = [head]
    for adapter, found in results.items():
        for r in found:
            e, f = r["expected"], r["found"]
            rows.append((adapter, r["scenario"], e["cause"], str(e["where"]), f["cause"],
                         str(f["where"]), f"{e['step']}/{f['step']}", "yes" if r["ok"] else "NO"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    total = sum(len(v) for v in results.values())
    right = sum(r["ok"] for v in results.values() for r in v)
    print(f"\n{right} of {total} rows right")
    out = ROOT / "benchmarks" / "results" / "diagnosis.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if right == total else 1


if __name__ == "__main__":
    sys.exit(main())
