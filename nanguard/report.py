"""Draw a dump's history (``nanguard plot``) and write a one-page HTML report (``nanguard report``).

matplotlib is the optional extra ``nanguard[report]``; it is imported only when a plot is
drawn, with the Agg backend, so ``import nanguard.cli`` stays light.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from nanguard.dump import Dump, tensor_summary
from nanguard.events import StepRecord

INSTALL_HINT = "pip install 'nanguard[report]'"
TOP_LAYERS = 6
HTML_ROWS = 40


class MissingExtra(ImportError):
    """matplotlib is not installed: the message says how to install it.

    Example:
        >>> str(MissingExtra())
        "nanguard report and plot need matplotlib: pip install 'nanguard[report]'"
    """

    def __init__(self) -> None:
        super().__init__(f"nanguard report and plot need matplotlib: {INSTALL_HINT}")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise MissingExtra() from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(history: Sequence[StepRecord], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in history:
        v = r[key]
        steps.append(r.step)
        values.append(float(v) if isinstance(v, (int, float)) and v is not None else math.nan)
    return steps, values


def _plot_line(ax: Any, steps: list[int], values: list[float], label: str, **kw: Any) -> None:
    """A line through the finite values; non-finite ones as red crosses on the top edge."""
    finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if finite:
        ax.plot([s for s, _ in finite], [v for _, v in finite], label=label, **kw)
    bad = [s for s, v in zip(steps, values, strict=True) if not math.isfinite(v)]
    if bad:
        labelled = "non-finite" in ax.get_legend_handles_labels()[1]
        ax.plot(bad, [1.0] * len(bad), "x", color="red", markersize=8, clip_on=False,
                transform=ax.get_xaxis_transform(),
                label="_nolegend_" if labelled else "non-finite")


def top_layers(dump: Dump, k: int = TOP_LAYERS) -> list[tuple[int, str]]:
    """The ``k`` parameters with the largest finite gradient norm in the history, plus the
    one that grew first (``layer_growth``), as ``(index, name)``."""
    names = list(dump.meta.get("param_names") or [])
    peak: dict[int, float] = {}
    for r in dump.history:
        for i, v in enumerate(r.layer_grad_norms or ()):
            if v is not None and math.isfinite(v):
                peak[i] = max(peak.get(i, 0.0), v)
    chosen = sorted(peak, key=lambda i: -peak[i])[:k]
    first = (dump.event.details or {}).get("layer_growth", {}).get("first")
    if first in names and names.index(first) not in chosen:
        chosen.append(names.index(first))
    return [(i, names[i] if i < len(names) else f"param {i}") for i in chosen]


def history_figure(dump: Dump) -> Any:
    """One matplotlib figure: loss, logits min/max, gradient norms (global and per layer),
    learning rate; guard actions as dashed lines, the event's step as a red line."""
    plt = _pyplot()
    hist = dump.history
    fig, axes = plt.subplots(5, 1, figsize=(9, 12), sharex=True)
    ax_loss, ax_logits, ax_grad, ax_layer, ax_lr = axes
    _plot_line(ax_loss, *_series(hist, "loss"), "loss")
    steps, lo = _series(hist, "logits_min")
    _plot_line(ax_logits, steps, lo, "logits min")
    _plot_line(ax_logits, *_series(hist, "logits_max"), "logits max")
    _plot_line(ax_grad, *_series(hist, "grad_norm"), "global grad norm")
    for i, name in top_layers(dump):
        values = [
            (r.layer_grad_norms[i] if r.layer_grad_norms and i < len(r.layer_grad_norms)
             else math.nan)
            for r in hist
        ]
        _plot_line(ax_layer, [r.step for r in hist], [float(v) for v in values], name)
    _plot_line(ax_lr, *_series(hist, "lr"), "learning rate")
    titles = ("loss", "model output (logits) min / max", "gradient norm (global)",
              "gradient norm per parameter", "learning rate")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10, loc="left")
        _log_if_wide(ax)
        for r in hist:
            if r.action is not None:
                ax.axvline(r.step, color="orange", linestyle="--", linewidth=1)
        ax.axvline(dump.event.step, color="red", linewidth=1.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    ev = dump.event
    fig.suptitle(f"{ev.cause} at step {ev.step}" + (f" in '{ev.where}'" if ev.where else ""))
    ax_lr.set_xlabel("step (dashed: guard action, red: the event)")
    fig.tight_layout()
    return fig


def _log_if_wide(ax: Any) -> None:
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    positive = [y for y in ys if y > 0]
    if positive and len(positive) == len(ys) and max(positive) / min(positive) > 1e3:
        ax.set_yscale("log")


def plot_png(dump: Dump) -> bytes:
    """The history figure as PNG bytes."""
    plt = _pyplot()
    fig = history_figure(dump)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_plot(dump: Dump, path: str) -> str:
    """Write the history figure to ``path`` (PNG) and return the path."""
    data = plot_png(dump)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else f'<b class="bad">{x}</b>'
    return html.escape(str(x))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(dump: Dump) -> str:
    """The self-contained report page (the plot embedded as a base64 PNG)."""
    ev = dump.event
    png = base64.b64encode(plot_png(dump)).decode("ascii")
    e = html.escape
    facts = [
        ("cause", f"<b>{e(ev.cause)}</b>"),
        ("step", e(str(ev.step))),
        ("where", e(ev.where or "unknown")),
        ("action", e(str(ev.action))),
        ("framework", e(str(dump.meta.get("framework", "?")))),
        ("dump", e(dump.path)),
    ]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>nanguard: {e(ev.cause)} at step {ev.step}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}.bad{color:#c00}.fix{background:#f4f8ff;"
        "padding:1em;border-left:4px solid #36c}</style></head><body>",
        f"<h1>nanguard: {e(ev.cause)} at step {ev.step}</h1>",
        _table(("", ""), [(k, v) for k, v in facts]),
        f"<h2>What happened and what to try</h2><p class='fix'>{e(ev.message)}</p>",
    ]
    growth = (ev.details or {}).get("layer_growth")
    if growth:
        parts.append(
            f"<h2>Gradient growth</h2><p>The first gradient to grow was "
            f"<b>{e(str(growth['first']))}</b>: from {_num(growth['from'])} to "
            f"{_num(growth['to'])} (x{_num(growth['ratio'])}), first over the threshold at "
            f"step {e(str(growth['step']))}.</p>"
            + _table(("parameter", "grew at step", "ratio"),
                     [(e(str(t["name"])), e(str(t["step"])), _num(t["ratio"]))
                      for t in growth.get("top", [])])
        )
    replay = (ev.details or {}).get("replay")
    if replay:
        parts.append("<h2>Replay</h2><pre>" + e(json.dumps(replay, indent=1, default=str))
                     + "</pre>")
    parts.append(f"<h2>History</h2><img alt='history' src='data:image/png;base64,{png}'>")
    rows = [
        (e(str(r.step)), _num(r.loss), _num(r.logits_min), _num(r.logits_max),
         _num(r.grad_norm), _num(r.lr), e(r.action or ""))
        for r in dump.history[-HTML_ROWS:]
    ]
    parts.append(f"<h3>Last {len(rows)} steps</h3>" + _table(
        ("step", "loss", "logits min", "logits max", "grad norm", "lr", "action"), rows))
    if dump.tensors:
        trows = []
        for name, array in dump.tensors.items():
            s = tensor_summary(array)
            trows.append((e(name), e("x".join(map(str, s["shape"])) or "scalar"),
                          e(s["dtype"]), _num(s["nan"]), _num(s["inf"]), _num(s["min"]),
                          _num(s["max"])))
        parts.append("<h2>Tensors</h2>" + _table(
            ("name", "shape", "dtype", "NaN", "Inf", "min", "max"), trows))
    other = {k: v for k, v in (ev.details or {}).items() if k not in ("replay", "layer_growth")}
    parts.append("<h2>Details</h2><pre>" + e(json.dumps(other, indent=1, default=str))
                 + "</pre>")
    env = dump.meta.get("environment", {})
    parts.append("<p><small>" + e(", ".join(f"{k} {v}" for k, v in env.items())) + "</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(dump: Dump, path: str) -> str:
    """Write the HTML report to ``path`` and return the path."""
    page = render_html(dump)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
