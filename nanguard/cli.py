"""The ``nanguard`` command line: read dumps after the fact."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from nanguard.dump import SUFFIX, Dump, DumpError, load, tensor_summary
from nanguard.events import StepRecord

HISTORY_ROWS = 12


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 unreadable input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args, sys.stdout))
    except DumpError as err:
        print(f"nanguard: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - `nanguard ls | head`
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanguard", description="Read the forensic dumps nanguard writes."
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("inspect", help="print what went wrong, where, and what to try")
    p.add_argument("path", help="a dump file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--rows", type=int, default=HISTORY_ROWS, help="history rows to show")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("ls", help="list the dumps in a directory, one line each")
    p.add_argument("dir", nargs="?", default="nanguard_dumps", help="default: nanguard_dumps")
    p.set_defaults(run=_ls)
    return parser


def dump_json(dump: Dump) -> dict[str, Any]:
    """The dump as one JSON-ready object (what ``inspect --json`` prints)."""
    ev = dump.event
    return {
        "path": dump.path,
        "step": ev.step,
        "cause": ev.cause,
        "where": ev.where,
        "message": ev.message,
        "action": ev.action,
        "rank": ev.rank,
        "details": ev.details,
        "history": [r.to_dict() for r in dump.history],
        "tensors": {name: tensor_summary(a) for name, a in dump.tensors.items()},
        "state_tensors": len(dump.state),
        "meta": dump.meta,
    }


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    dump = load(args.path)
    if args.json:
        json.dump(dump_json(dump), out, indent=1, default=str)
        out.write("\n")
        return 0
    out.write(render_report(dump, rows=args.rows))
    return 0


def render_report(dump: Dump, rows: int = HISTORY_ROWS) -> str:
    """The human report: cause, step, where, the fix, and the last steps' stats."""
    ev = dump.event
    meta = dump.meta
    lines = [
        f"nanguard dump {dump.path}",
        f"  cause   {ev.cause}  at step {ev.step}"
        + (f" (rank {ev.rank})" if meta.get("world_size", 1) > 1 else ""),
        f"  where   {ev.where or 'unknown'}",
        f"  action  {ev.action}",
        f"  what    {ev.message}",
        f"  run     {meta.get('framework', '?')}, "
        + ", ".join(f"{k} {v}" for k, v in meta.get("environment", {}).items() if k != "platform"),
        "",
        f"last {min(rows, len(dump.history))} steps (! marks a non-finite value):",
        _history_table(dump.history[-rows:]),
    ]
    if dump.tensors:
        lines += ["", "tensors:", _tensor_table(dump)]
    if dump.state:
        lines += ["", f"model state: {len(dump.state)} tensors (nanguard.load(path).state)"]
    return "\n".join(lines) + "\n"


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return f"{x}!"
        return f"{x:.4g}"
    return str(x)


def _history_table(history: Sequence[StepRecord]) -> str:
    head = ("step", "loss", "logits min", "logits max", "grad norm", "lr", "action")
    body = [
        (
            str(r.step),
            _num(r.loss),
            _num(r.logits_min),
            _num(r.logits_max),
            _num(r.grad_norm),
            _num(r.lr),
            r.action or "",
        )
        for r in history
    ]
    return _table(head, body)


def _tensor_table(dump: Dump) -> str:
    head = ("name", "shape", "dtype", "nan", "inf", "min", "max")
    body = []
    for name, array in dump.tensors.items():
        s = tensor_summary(array)
        body.append(
            (
                name,
                "x".join(str(d) for d in s["shape"]) or "scalar",
                s["dtype"],
                str(s["nan"]),
                str(s["inf"]),
                _num(s["min"]),
                _num(s["max"]),
            )
        )
    return _table(head, body)


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join("  " + fmt.format(*row) for row in [head, *body])


def _ls(args: argparse.Namespace, out: TextIO) -> int:
    folder = args.dir
    if not os.path.isdir(folder):
        raise DumpError(f"no such directory: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX))
    rows = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            ev = load(path).event
        except DumpError as err:
            print(f"nanguard: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        rows.append((str(ev.step), ev.cause, ev.where or "-", path))
    if rows:
        out.write(_table(("step", "cause", "where", "file"), rows) + "\n")
    else:
        out.write(f"no dumps in {folder}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
