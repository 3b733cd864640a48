"""The ``nanguard`` command line: read, draw and replay dumps after the fact."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from nanguard.dump import SUFFIX, Dump, DumpError, load, tensor_summary
from nanguard.events import Event, StepRecord
from nanguard.report import MissingExtra

HISTORY_ROWS = 12


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 replay found nothing,
    2 bad input: an unreadable dump, a missing extra, a factory or model that does not fit).
    """
    with _escaping_output():
        return _main(argv)


@contextlib.contextmanager
def _escaping_output() -> Iterator[None]:
    """Text from a dump or a file name may not encode (a lone surrogate, a non-UTF-8 byte
    under a strict UTF-8 locale): stdout and stderr escape it rather than fail mid-report,
    and are put back as they were afterwards (``main`` may run inside a user's program)."""
    saved = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        reconfigure = getattr(stream, "reconfigure", None)
        if errors is not None and callable(reconfigure):
            reconfigure(errors="backslashreplace")
            saved.append((reconfigure, errors))
    try:
        yield
    finally:
        for reconfigure, errors in saved:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                reconfigure(errors=errors)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        print("nanguard: error: no command given (inspect, ls, report, plot or replay; "
              "see nanguard --help)", file=sys.stderr)
        return 2
    try:
        return int(args.run(args, sys.stdout))
    except BrokenPipeError:  # pragma: no cover - `nanguard ls | head`
        return 0
    except (DumpError, UsageError, MissingExtra, OSError) as err:
        print(f"nanguard: error: {err}", file=sys.stderr)
        return 2


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, received {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from nanguard import __version__

    parser = argparse.ArgumentParser(
        prog="nanguard", description="Read the forensic dumps nanguard writes."
    )
    parser.add_argument("--version", action="version", version=f"nanguard {__version__}")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("inspect", help="print what went wrong, where, and what to try")
    p.add_argument("path", help="a dump file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--rows", type=_count, default=HISTORY_ROWS,
                   help="history rows to show (0: none)")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("ls", help="list the dumps in a directory, one line each")
    p.add_argument("dir", nargs="?", default="nanguard_dumps", help="default: nanguard_dumps")
    p.set_defaults(run=_ls)
    p = sub.add_parser("report", help="write a self-contained HTML report (needs matplotlib)")
    p.add_argument("path", help="a dump file")
    p.add_argument("-o", "--output", help="the HTML file (default: the dump's name + .html)")
    p.set_defaults(run=_report)
    p = sub.add_parser("plot", help="draw the history as one PNG (needs matplotlib)")
    p.add_argument("path", help="a dump file")
    p.add_argument("-o", "--output", help="the PNG file (default: the dump's name + .png)")
    p.set_defaults(run=_plot)
    p = sub.add_parser(
        "replay", help="PyTorch: rebuild the model, load the dumped state, replay the batch"
    )
    p.add_argument("path", help="a dump that holds the model state")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="a function returning the model, e.g. mypkg.models:build")
    p.add_argument("--eval", action="store_true", help="replay in eval mode (default: train)")
    p.set_defaults(run=_replay)
    return parser


class UsageError(Exception):
    """Bad input to a command: printed as one line, exit 2."""


def _default_output(path: str, ext: str) -> str:
    base = os.path.basename(path)
    base = base[: -len(SUFFIX)] if base.endswith(SUFFIX) else os.path.splitext(base)[0]
    return base + ext


def _report(args: argparse.Namespace, out: TextIO) -> int:
    from nanguard import report

    dump = load(args.path)
    path = report.write_report(dump, args.output or _default_output(args.path, ".html"))
    out.write(f"wrote {path}\n")
    return 0


def _plot(args: argparse.Namespace, out: TextIO) -> int:
    from nanguard import report

    dump = load(args.path)
    path = report.write_plot(dump, args.output or _default_output(args.path, ".png"))
    out.write(f"wrote {path}\n")
    return 0


def load_factory(spec: str) -> Any:
    """The callable named by ``"package.module:factory"`` (the current directory is searched
    first, as ``python -m`` would)."""
    import importlib

    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"--model must look like package.module:factory. Received: {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's input
        raise UsageError(
            f"cannot import module {mod_name!r} for --model: {type(err).__name__}: {err}"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r} (--model {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {spec} is not callable")
    return obj


def _replay(args: argparse.Namespace, out: TextIO) -> int:
    dump = load(args.path)
    if not any(k.startswith("model.") for k in dump.state):
        raise UsageError(
            f"the dump holds no model state: {args.path} (replay needs an abort dump or one "
            "written with dump_state='always')"
        )
    factory = load_factory(args.model)
    try:
        from nanguard._torch_replay import ReplayInputError, replay_dump
    except ImportError as err:
        raise UsageError(
            f"nanguard replay needs PyTorch: pip install 'nanguard[torch]' ({err})"
        ) from err
    import torch

    try:
        model = factory()
    except Exception as err:  # noqa: BLE001 - the user's factory failed
        raise UsageError(f"--model {args.model} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"--model {args.model} returned {type(model).__name__}, not a torch.nn.Module"
        )
    try:
        result = replay_dump(dump, model, train=not args.eval)
    except ReplayInputError as err:
        raise UsageError(str(err)) from err
    mode = "eval" if args.eval else "train"
    p = _printable  # text from the dump (and the model's names): one line each, escaped
    out.write(p(
        f"replayed step {dump.event.step} of {args.path} on "
        f"{type(getattr(model, '_orig_mod', model)).__name__} "
        f"({mode} mode; the dump says: {dump.event.cause}"
        + (f" in '{dump.event.where}'" if dump.event.where else "") + ")") + "\n"
    )
    for note in result.notes:
        out.write(p(f"  note: {note}") + "\n")
    f = result.finding
    if f is None:
        out.write(
            "  no module produced a non-finite value in the replay"
            + (" (the model output is non-finite)" if result.output_nonfinite else "")
            + "\n"
        )
        return 1
    out.write(p(f"first bad module: {f.module} ({f.phase})") + "\n" + p(f"  {f.note}") + "\n")
    for kind, items in f.summary.items():
        entries = items.items() if isinstance(items, dict) else enumerate(items)
        for key, s in entries:
            label = kind if isinstance(items, list) and len(items) == 1 else f"{kind} {key}"
            out.write(p(
                f"  {label:<12} {'x'.join(map(str, s.get('shape', []))) or 'scalar'} "
                f"{s.get('dtype', '')}  min {_num(s.get('min'))}  max {_num(s.get('max'))}  "
                f"NaN {s.get('nan', 0)}  Inf {s.get('inf', 0)}") + "\n"
            )
    return 0


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


def _rank_note(ev: Event, meta: dict[str, Any]) -> str:
    if meta.get("world_size", 1) <= 1:
        return ""
    found = ev.details.get("cause_rank")
    if isinstance(found, int) and found != ev.rank:
        return (f" (found on rank {found}; this dump is rank {ev.rank}'s, whose own batch "
                "may be finite)")
    return f" (rank {ev.rank})"


def render_report(dump: Dump, rows: int = HISTORY_ROWS) -> str:
    """The human report: cause, step, where, the fix, and the last steps' stats. Text
    from the dump is printed one line per field, its control characters escaped (a
    module named with a newline or a terminal escape cannot break or recolour it)."""
    ev = dump.event
    meta = dump.meta
    p = _printable
    env = meta.get("environment", {})
    lines = [
        f"nanguard dump {p(dump.path)}",
        p(f"  cause   {ev.cause}  at step {ev.step}" + _rank_note(ev, meta)),
        p(f"  where   {ev.where or 'unknown'}"),
        p(f"  action  {ev.action}"),
        p(f"  what    {ev.message}"),
        p(f"  run     {meta.get('framework', '?')}, "
          + ", ".join(f"{k} {v}" for k, v in (env.items() if isinstance(env, dict) else ())
                      if k != "platform")),
    ]
    if rows:
        shown = dump.history[-rows:]
        lines += ["", f"last {len(shown)} steps (! marks a non-finite value):",
                  _history_table(shown)]
        found = ev.details.get("detected_at_step")
        if isinstance(found, int) and not isinstance(found, bool) and found > ev.step:
            # On a GPU or under DDP an update's check is read with the next step's numbers:
            # the row of that step holds the action.
            lines.append(f"  (step {ev.step}'s update was found non-finite at step {found}, "
                         f"where the action was taken: {p(str(ev.action))})")
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
            _printable(r.action or ("(amp skip)" if r.cause == "amp_scaler_skip" else "")),
        )
        for r in history
    ]
    return _table(head, body)


# What `replay` needs to re-run a step exactly (RNG state, the loss's gradient at the
# output): kept in the dump and in --json, left out of the human table.
REPLAY_MATERIAL = ("replay.rng", "replay.output_grad")


def _tensor_table(dump: Dump) -> str:
    head = ("name", "shape", "dtype", "nan", "inf", "min", "max")
    body = []
    hidden = [n for n in dump.tensors if n.startswith(REPLAY_MATERIAL)]
    for name, array in dump.tensors.items():
        if name in hidden:
            continue
        s = tensor_summary(array)
        body.append(
            (
                _printable(name),
                "x".join(str(d) for d in s["shape"]) or "scalar",
                s["dtype"],
                str(s["nan"]),
                str(s["inf"]),
                _num(s["min"]),
                _num(s["max"]),
            )
        )
    note = f"\n  (+{len(hidden)} replay tensors, listed by --json)" if hidden else ""
    return _table(head, body) + note


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join("  " + fmt.format(*row) for row in [head, *body])


def _ls(args: argparse.Namespace, out: TextIO) -> int:
    folder = args.dir
    if not os.path.isdir(folder):
        what = "not a directory" if os.path.exists(folder) else "no such directory"
        raise DumpError(f"{what}: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(SUFFIX))
    rows = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            ev = load(path, arrays=False).event
        except DumpError as err:
            print(f"nanguard: skipping unreadable {_printable(path)}: {err}", file=sys.stderr)
            continue
        rows.append((str(ev.step), _printable(ev.cause), _printable(ev.where or "-"),
                     _printable(path)))
    if rows:
        out.write(_table(("step", "cause", "where", "file"), rows) + "\n")
    else:
        # `ls` does not descend into folders; say where dumps are one level down (the demo
        # writes to nanguard_dumps/demo, and `nanguard ls` after it listed nothing).
        inside = sorted(
            entry.path for entry in os.scandir(folder)
            if entry.is_dir() and any(n.endswith(SUFFIX) for n in _names_in(entry.path)))
        hint = (f"; {'these folders hold' if len(inside) > 1 else 'its folder holds'} "
                f"some: {', '.join(_printable(d) for d in inside)} (nanguard ls "
                f"{_printable(inside[0])})" if inside else "")
        out.write(f"no dumps in {_printable(folder)}{hint}\n")
    return 0


def _names_in(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:  # unreadable: not listed
        return []


def _printable(text: str) -> str:
    """A file name (or a name from a dump) as one line any terminal can print: bytes that
    are not UTF-8 (kept by Python as surrogates) written as ``\\xNN``, control characters
    (a newline in a file name would forge a row) escaped."""
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate: escaped below
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
