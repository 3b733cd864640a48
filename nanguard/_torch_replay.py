"""Name the first torch module that went non-finite, by replaying a bad step once.

Normal steps pay for one forward pre-hook and one forward hook on the model (a reference
to the call's arguments, the RNG state, and a tensor hook that keeps the gradient of the
model's output). Only when the core asks the probe about a bad step does :func:`replay_call`
register per-module forward hooks and full backward hooks, re-run the recorded call from
the same weights and RNG state, and remove every hook again.

Why the recorded output gradient: the loss function is unknown to the guard and the loss's
graph is freed by ``loss.backward()``. The gradient of the loss with respect to the model's
output is exactly what the user's loss fed into the model's backward, so replaying the
model's backward from it reproduces the real backward pass without knowing the loss (and
without ``retain_graph``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nanguard import detector
from nanguard._torch_engine import (
    GuardHook,
    clean_name,
    eager_module,
    first_float_tensor,
    named_modules,
)
from nanguard.dump import named_leaves

MAX_CALLS = 8  # model calls recorded per step (gradient accumulation inside one step)
# The gradients of the model output kept for a backward replay, per step, all calls together.
# Keeping one holds it from the backward to the end of the step (through later micro-batches
# with gradient accumulation): a language model's logits gradient can be gigabytes.
OUTPUT_GRAD_BUDGET = 64 * 2**20
LOCALIZED_BYTES = 4 * 2**20  # per tensor kept in the dump for the localized module
GRAD_BYTES = 16 * 2**20  # the recorded output gradient kept in the dump
LOSS = "<loss>"  # `where` when the loss's own backward produced the non-finite gradient


def float_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating tensor in a nested output, in a fixed order."""
    out: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                out.append(o)
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            logits = getattr(o, "logits", None)
            if isinstance(logits, torch.Tensor):
                walk(logits)

    walk(obj)
    return out


def _flags(tensors: Sequence[torch.Tensor]) -> tuple[bool, bool, bool]:
    """(any NaN, any +Inf, any -Inf) over the tensors."""
    nan = pos = neg = False
    for t in tensors:
        t = t.detach()
        nan = nan or bool(torch.isnan(t).any())
        pos = pos or bool(torch.isposinf(t).any())
        neg = neg or bool(torch.isneginf(t).any())
    return nan, pos, neg


def _nonfinite(tensors: Sequence[torch.Tensor | None]) -> bool:
    return any(t is not None and not bool(torch.isfinite(t.detach()).all()) for t in tensors)


def stats(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, NaN/Inf counts and finite min/max of a whole tensor, JSON-ready."""
    t = t.detach()
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if not t.is_floating_point():
        return out
    fin = t[torch.isfinite(t)]
    out["nan"] = int(torch.isnan(t).sum())
    out["inf"] = int(torch.isinf(t).sum())
    out["min"] = float(fin.min()) if fin.numel() else None
    out["max"] = float(fin.max()) if fin.numel() else None
    return out


def _copy(t: torch.Tensor, limit: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A detached CPU copy cut along the first dimension to at most ``limit`` bytes; with
    ``rows = (batch, kept)`` (:func:`dump_rows`), a tensor of ``batch`` rows keeps ``kept``."""
    t = t.detach()
    if rows is not None and t.ndim and t.shape[0] == rows[0]:
        t = t[: rows[1]]
    if t.ndim and t.numel() * t.element_size() > limit:
        keep = max(1, limit // max(1, t[0].numel() * t.element_size()))
        t = t[:keep]
    return t.to("cpu", copy=True)


@dataclasses.dataclass
class RecordedCall:
    """How the model was called in a step: enough to run the same forward again.

    Attributes:
        args: The positional arguments (references, not copies).
        kwargs: The keyword arguments.
        rng_cpu: torch's CPU RNG state just before the call.
        rng_cuda: Every CUDA device's RNG state, when CUDA was initialized.
        autocast: ``(device_type, dtype)`` of each autocast context active at the call.
        grad_enabled: Whether autograd recorded the call.
        output_grads: Gradient of the loss with respect to the output's logits
            (:func:`first_float_tensor`), by its index into :func:`float_tensors` of the
            output, filled during backward.
        grads_over_budget: Output gradients not kept: past ``OUTPUT_GRAD_BUDGET``.

    Example:
        >>> call = RecordedCall((torch.ones(2),), {}, torch.get_rng_state(), None, [], True)
        >>> call.output_grads
        {}
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: list[torch.Tensor] | None
    autocast: list[tuple[str, torch.dtype]]
    grad_enabled: bool
    output_grads: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    grads_over_budget: bool = False


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [
        (dev, torch.get_autocast_dtype(dev))
        for dev in ("cpu", "cuda")
        if torch.is_autocast_enabled(dev)
    ]


def _keep_grad(call: RecordedCall, index: int, grad: torch.Tensor | None) -> None:
    if grad is None:  # an output of a compiled graph that also computed the loss
        return
    prev = call.output_grads.get(index)
    call.output_grads[index] = grad if prev is None else prev + grad


class CallRecorder:
    """Keeps how the model was called during the current step (the cheap part).

    Args:
        engine: The :class:`~nanguard._torch_engine.TorchEngine`; calls are recorded only
            while ``engine.in_step`` and forgotten when the step index changes.

    Example:
        >>> rec = CallRecorder(engine)  # doctest: +SKIP
        >>> rec.attach()  # doctest: +SKIP
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[RecordedCall] = []
        self.dropped = 0
        self.grad_bytes = 0  # output gradients promised to be kept this step
        self.paused = False
        self._step: int | None = None
        self._pending: RecordedCall | None = None
        self._open: list[bool] = []  # per model call still running: is it a redirect?
        # Set by an adapter whose framework calls the model to run something else through
        # its __call__ (the Lightning callback: DDP's forward redirection).
        self.is_redirect: Callable[[Any], bool] | None = None
        self._handles: list[Any] = []

    def attach(self, post_hook: bool = True) -> None:
        """Hook the model; ``post_hook=False`` when the engine's own output hook on the
        model calls :meth:`after` (one forward hook on the model instead of two)."""
        if self._handles:
            return
        model = self.engine.model
        self._handles = [
            model.register_forward_pre_hook(GuardHook(self, "_before"), with_kwargs=True)]
        if post_hook:
            self._handles.append(model.register_forward_hook(GuardHook(self, "_after")))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.calls = []
        self.dropped = 0
        self.grad_bytes = 0
        self._pending = None
        self._open = []  # a call that raised never popped its entry
        self._step = None

    def calls_for(self, step: int) -> list[RecordedCall]:
        """The calls recorded during step ``step`` (empty if none)."""
        return self.calls if self._step == step else []

    def _before(self, module: Any, args: Any, kwargs: Any) -> None:
        e = self.engine
        self._pending = None
        redirect = self.is_redirect is not None and self.is_redirect(module)
        self._open.append(redirect)
        if self.paused or not e.in_step or redirect:
            return
        step = e.session.step
        if step != self._step:
            self.calls, self.dropped, self.grad_bytes, self._step = [], 0, 0, step
        if len(self.calls) >= MAX_CALLS:
            self.dropped += 1
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        call = RecordedCall(
            tuple(args), dict(kwargs), torch.get_rng_state(), cuda, _autocast_state(),
            torch.is_grad_enabled(),
        )
        self.calls.append(call)
        self._pending = call

    def _after(self, module: Any, args: Any, output: Any) -> None:
        self.after(output)

    def after(self, output: Any) -> bool:
        """The model returned: keep the gradient that will reach its logits. Returns whether
        the call was a framework's redirect (``is_redirect``), not the model's own.

        Only the logits' (:func:`first_float_tensor`): the other outputs are mostly made
        from them or on their way (a loss computed inside ``forward``, hidden states), and
        the gradient reaching the logits already holds what flowed through those; replaying
        from both would count it twice.
        """
        redirect = self._open.pop() if self._open else False
        call, self._pending = self._pending, None
        if redirect or call is None or self.paused or not call.grad_enabled:
            return redirect
        logits = first_float_tensor(output)
        if logits is None or not logits.requires_grad:
            return False
        i = _index_of(logits, float_tensors(output))
        if i is None:
            return False
        size = logits.numel() * logits.element_size()
        if self.grad_bytes + size > OUTPUT_GRAD_BUDGET:
            call.grads_over_budget = True
            return False
        self.grad_bytes += size
        logits.register_hook(functools.partial(_keep_grad, call, i))
        return False


def _index_of(t: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> int | None:
    return next((i for i, o in enumerate(tensors) if o is t), None)


@dataclasses.dataclass
class Finding:
    """The first module where non-finite values appeared in a replay.

    Attributes:
        module: Qualified name (as in ``model.named_modules()``; ``LOSS`` for the loss's
            backward, the model's class name in angle brackets for the model itself).
        phase: ``"forward"`` (its output went non-finite from finite inputs) or
            ``"backward"`` (its input gradient, or its own parameters' gradient, went
            non-finite from a finite gradient at its output).
        hidden: The module's output is not the model's output (the logits).
        inputs: Its inputs (forward) or the gradients at its output (backward), CPU copies.
        outputs: Its outputs (forward) or the gradients it produced (backward), CPU copies.
        summary: Stats of the whole tensors (shape, dtype, NaN/Inf counts, min/max).
        note: One sentence for the details.

    Example:
        >>> f = Finding("encoder.1", "forward")
        >>> f.module
        'encoder.1'
    """

    module: str
    phase: str
    hidden: bool = True
    inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    attention: bool = False  # the module is an attention layer (by its class name)
    _out_ref: Any = dataclasses.field(default=None, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The kept tensors as numpy arrays, named for the dump."""
        out: dict[str, np.ndarray] = {}
        kinds = ("grad_output", "grad_input") if self.phase == "backward" else ("input", "output")
        for kind, group in zip(kinds, (self.inputs, self.outputs), strict=True):
            for key, t in group.items():
                if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                    t = t.float()
                out[f"localized.{self.module}.{kind}{key}"] = t.numpy()
        return out


def _kept(tensors: Sequence[torch.Tensor | None], prefix: str = "") -> dict[str, torch.Tensor]:
    present = [(i, t) for i, t in enumerate(tensors) if t is not None]
    if len(present) == 1:
        return {prefix: _copy(present[0][1], LOCALIZED_BYTES)}
    return {f"{prefix}.{i}": _copy(t, LOCALIZED_BYTES) for i, t in present}


def _summaries(tensors: Sequence[torch.Tensor | None]) -> list[dict[str, Any]]:
    return [stats(t) for t in tensors if t is not None]


class Localizer:
    """Per-module hooks that name the first module producing non-finite values.

    A context manager in the manner of fairseq's ``NanDetector``, but with full backward
    hooks, names kept in a dict on the manager (nothing is written onto the user's
    modules), and every hook removed on exit. ``-inf`` outputs of modules matching
    ``allow_neg_inf`` (exact names or ``fnmatch`` patterns) are intended (attention masks):
    they are not blamed, and ``-inf`` reaching later modules from them is not either.

    Args:
        model: The module to watch (its submodules included).
        forward: Register forward hooks (blame: finite inputs, non-finite output).
        backward: Register full backward hooks (blame: finite gradient at the output,
            non-finite gradient at the input or of the module's own parameters).
        allow_neg_inf: Names whose ``-inf`` outputs are intended.
        prefix: Put before every name (``"module."`` for a DDP-wrapped model).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with Localizer(model) as loc, torch.no_grad():
        ...     _ = model(torch.full((1, 2), float("nan")))
        >>> loc.finding is None  # the NaN came in with the input: no module is blamed
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        forward: bool = True,
        backward: bool = False,
        allow_neg_inf: Sequence[str] = (),
        prefix: str = "",
    ) -> None:
        self.model = model
        self.names: dict[torch.nn.Module, str] = {}
        for name, module in model.named_modules():
            name = clean_name(name)
            self.names.setdefault(module, prefix + name if name else prefix.rstrip("."))
        root = self.names[model]
        self.names[model] = root or f"<{type(model).__name__}>"
        self.do_forward = forward
        self.do_backward = backward
        self.blame = detector.Blame(allow_neg_inf)
        self.finding: Finding | None = None
        self.order: list[tuple[str, torch.nn.Module, bool, bool]] = []
        self._candidates: dict[int, Finding] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Localizer:
        for module, name in self.names.items():
            if self.do_forward:
                hook = functools.partial(self._forward, name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if self.do_backward:
                hook = functools.partial(self._backward, name)
                self._handles.append(module.register_full_backward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _forward(self, name: str, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if self.finding is not None:
            return
        ins = float_tensors((args, kwargs))
        outs = float_tensors(output)
        if self.blame.blames(name, _flags(outs), _flags(ins)):
            self.finding = Finding(
                name,
                "forward",
                inputs=_kept(ins),
                outputs=_kept(outs),
                summary={"input": _summaries(ins), "output": _summaries(outs)},
                note=f"'{name}' turned finite inputs into non-finite outputs in the replay.",
                attention="attention" in type(module).__name__.lower(),
                _out_ref=first_float_tensor(output),
            )

    def _backward(self, name: str, module: Any, grad_input: Any, grad_output: Any) -> None:
        go = [g for g in grad_output if g is not None]
        gi = [g for g in grad_input if g is not None]
        go_bad, gi_bad = _nonfinite(go), _nonfinite(gi)
        self.order.append((name, module, go_bad, gi_bad))
        if gi_bad and not go_bad:
            self._candidates[len(self.order) - 1] = Finding(
                name,
                "backward",
                inputs=_kept(go),
                outputs=_kept(gi),
                summary={"grad_output": _summaries(go), "grad_input": _summaries(gi)},
                note=(
                    f"the backward of '{name}' turned a finite gradient at its output into "
                    "a non-finite gradient at its input in the replay."
                ),
            )

    def conclude_backward(
        self, param_grads: Mapping[torch.Tensor, torch.Tensor | None]
    ) -> Finding | None:
        """After the backward: the first module, in the order the backward reached them,
        whose input gradient or own parameters' gradient went non-finite from a finite
        gradient at its output."""
        for pos, (name, module, go_bad, _gi_bad) in enumerate(self.order):
            if go_bad:
                continue
            if pos in self._candidates:
                self.finding = self._candidates[pos]
                return self.finding
            own = [(n, param_grads.get(p)) for n, p in module.named_parameters(recurse=False)]
            bad = [(n, g) for n, g in own if g is not None and _nonfinite([g])]
            if bad:
                pname, grad = bad[0]
                self.finding = Finding(
                    name,
                    "backward",
                    outputs={f".{pname}": _copy(grad, LOCALIZED_BYTES)},
                    summary={"param_grad": {pname: stats(grad)}},
                    note=(
                        f"the backward of '{name}' produced a non-finite gradient for its "
                        f"parameter '{pname}' from a finite gradient at its output."
                    ),
                )
                return self.finding
        first_bad = next((e for e in self.order if e[2]), None)
        if first_bad is not None:
            inner = first_bad[0]
            parent = inner.rsplit(".", 1)[0] if "." in inner else self.names[self.model]
            self.finding = Finding(
                parent,
                "backward",
                note=(
                    f"the gradient reaching the output of '{inner}' was already non-finite "
                    f"while no module before it went bad: an operation outside submodules in "
                    f"the forward of '{parent}' has an unstable backward."
                ),
            )
        return self.finding


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Restore train/eval modes, buffers (BatchNorm statistics), ``.grad`` and the RNG."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _set_rng(call: RecordedCall) -> None:
    torch.set_rng_state(call.rng_cpu)
    if call.rng_cuda is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(call.rng_cuda)


@contextlib.contextmanager
def _autocast(states: Sequence[tuple[str, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dev, dtype in states:
            stack.enter_context(torch.autocast(dev, dtype=dtype))
        yield


@dataclasses.dataclass
class ReplayResult:
    """What one replay found.

    Attributes:
        finding: The first bad module, or None.
        output_nonfinite: The replayed model output holds NaN/Inf.
        past_logits: The ``logits_module`` whose output was finite when the model's own
            forward, after it, made the model output non-finite; None otherwise.
        model_code: The model itself is to blame and none of its submodules: an operation
            in its own ``forward``, outside any submodule, made the output non-finite.
        other_output: The model's forward made an output other than its logits non-finite
            (a second head's ``end_logits``), its logits finite: that output's name as the
            dump names the output's parts (``output.1``, ``output.end_logits``).
        notes: Why a part of the replay could not run, in words.

    Example:
        >>> ReplayResult().finding is None
        True
    """

    finding: Finding | None = None
    output_nonfinite: bool = False
    past_logits: str | None = None
    model_code: bool = False
    other_output: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _eager() -> contextlib.AbstractContextManager[Any]:
    """A torch.compile'd submodule runs eagerly in the replay: its localizing hooks then
    fire without a recompile (dynamo printed a graph-break traceback for each, and the
    recompiles count against its cache limit)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or torch.compiler.is_compiling():
        # Inside a compiled training step dynamo traces the replay itself, and refuses to
        # trace set_stance (the replay then failed: no layer named).
        return contextlib.nullcontext()
    return set_stance("force_eager")


def replay_call(
    model: torch.nn.Module,
    call: RecordedCall,
    *,
    allow_neg_inf: Sequence[str] = (),
    logits_module: str | None = None,
    backward: bool = False,
    prefix: str = "",
) -> ReplayResult:
    """Re-run one recorded call under the localizing hooks; restore everything after.

    The forward is replayed first (without autograd); if it finds no bad module and
    ``backward`` is set, the forward runs again with full backward hooks and the model's
    backward is replayed from the recorded gradient of the loss with respect to the output.

    Args:
        model: The model, holding the weights the step started from.
        call: The recorded call.
        allow_neg_inf: Module names whose ``-inf`` outputs are intended.
        logits_module: Name of the submodule whose output is the logits (None: the output).
        backward: Also replay the backward pass.
        prefix: Put before every module name.

    Returns:
        The :class:`ReplayResult`.
    """
    result = ReplayResult()
    logits_ref: list[torch.Tensor] = []
    with preserved(model), warnings.catch_warnings(), _eager():
        warnings.simplefilter("ignore")
        _set_rng(call)
        with torch.no_grad(), _autocast(call.autocast), Localizer(
            model, allow_neg_inf=allow_neg_inf, prefix=prefix
        ) as loc, _capture(model, logits_module, logits_ref):
            out = model(*call.args, **call.kwargs)
        outs = float_tensors(out)
        result.output_nonfinite = _nonfinite(outs)
        if loc.finding is not None:
            f = loc.finding
            final = logits_ref[0] if logits_ref else first_float_tensor(out)
            f.hidden = not (
                f.module in (loc.names[model], (prefix + logits_module) if logits_module else None)
                or (final is not None and f._out_ref is not None and _same(f._out_ref, final))
            )
            if (logits_module and f.module == loc.names[model] and logits_ref
                    and not _nonfinite(logits_ref[:1])):
                result.past_logits = prefix + logits_module
            elif f.module == loc.names[model] and next(model.children(), None) is not None:
                result.model_code = True  # no submodule made it: the forward's own code
            if (not logits_module and f.module == loc.names[model] and final is not None
                    and not _nonfinite([final])):
                result.other_output = _other_nonfinite_output(out, final)
            result.finding = f
            return result
        logits_out = first_float_tensor(out)
        out_dtype = logits_out.dtype if logits_out is not None else None
        del out, outs, logits_out
        if not backward:
            return result
        if result.output_nonfinite:
            # Non-finite already in the forward, with no module to blame (the call's inputs
            # were non-finite): a backward from its gradient would only blame the loss.
            result.notes.append("backward not replayed: the forward's output is already "
                                "non-finite, and no module turned finite inputs into it")
            return result
        if not call.grad_enabled or not call.output_grads:
            result.notes.append(
                "backward not replayed: the gradient of the model output was not kept (past "
                f"the {OUTPUT_GRAD_BUDGET // 2**20} MiB of output gradients kept per step)"
                if call.grads_over_budget else
                "backward not replayed: no gradient of the model output was recorded "
                "(the step's forward ran without autograd, its output was not used, or a "
                "compiled graph computed the loss from it)"
            )
            return result
        grads = call.output_grads
        low = next((g.dtype for g in grads.values() if out_dtype is not None
                    and g.is_floating_point() and g.element_size() < out_dtype.itemsize), None)
        if low is not None and _nonfinite(list(grads.values())):
            # The step's output was lower precision than the replay's: its forward (under
            # autocast) may have overflowed where this one did not; the loss is not to blame.
            result.notes.append(
                f"backward not replayed: the recorded gradient of the model output is "
                f"{_dtype_name(low)} and non-finite, while the replayed output is "
                f"{_dtype_name(out_dtype)} and finite: the step ran in lower (mixed) "
                "precision, which this replay does not reproduce"
            )
            return result
        if _nonfinite(list(grads.values())):
            result.finding = Finding(
                LOSS,
                "backward",
                hidden=False,
                outputs=_kept(list(grads.values())),
                summary={"output_grad": _summaries(list(grads.values()))},
                note="the loss's own backward made the gradient of the model output non-finite.",
            )
            return result
        _set_rng(call)
        with torch.enable_grad(), _autocast(call.autocast), Localizer(
            model, forward=False, backward=True, allow_neg_inf=allow_neg_inf, prefix=prefix
        ) as loc:
            out = model(*call.args, **call.kwargs)
            outs = float_tensors(out)
            logits = _index_of(first_float_tensor(out), outs)
            if logits in grads:  # an older dump may hold every output's gradient
                grads = {logits: grads[logits]}
            pairs = [
                (outs[i], g.to(outs[i].device, outs[i].dtype))
                for i, g in sorted(grads.items())
                if i < len(outs) and outs[i].requires_grad and outs[i].shape == g.shape
            ]
            params = [p for p in model.parameters() if p.requires_grad]
            if not pairs or not params:
                result.notes.append(
                    "backward not replayed: the replayed output does not match the recorded "
                    "gradient, or the model has no trainable parameters"
                )
                return result
            got = torch.autograd.grad(
                [o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True
            )
            result.finding = loc.conclude_backward(dict(zip(params, got, strict=True)))
        if result.finding is not None:
            result.finding.hidden = True
        return result


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    try:
        return a.shape == b.shape and a.data_ptr() == b.data_ptr()
    except RuntimeError:  # tensors without storage
        return False


@contextlib.contextmanager
def _capture(
    model: torch.nn.Module, name: str | None, into: list[torch.Tensor]
) -> Iterator[None]:
    """Keep the logits module's output (first floating tensor) during the replay."""
    if name is None:
        yield
        return
    module = named_modules(model).get(name)
    if module is None:
        yield
        return

    def hook(mod: Any, args: Any, output: Any) -> None:
        found = first_float_tensor(output)
        if found is not None and not into:
            into.append(found)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module to replay and the prefix of its names. DDP replays its inner module, so
    that no collective runs on one rank alone; a ``torch.compile`` wrapper replays the eager
    module it wraps, whose per-module hooks fire as written."""
    from torch.nn.parallel import DistributedDataParallel

    model = eager_module(model)
    if isinstance(model, DistributedDataParallel):
        return eager_module(model.module), "module."
    return model, ""


def localize_step(
    engine: Any, record: Any, evidence: Any, *, run: bool, start: int = 0,
    rows: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """The probe's part: replay the bad step (when ``run``), fill ``evidence``, and return
    the arrays for the dump (the localized module's tensors, the recorded output gradient
    and CPU RNG state, and the call's arguments when they are not the step's inputs): those
    of call ``start`` when the replay does not run (the call whose arguments were bad).
    ``evidence.details["replay_call"]`` says how to rebuild that call from the dump (see
    :func:`_call_arrays`); ``rows`` is :func:`dump_rows`."""
    recorder: CallRecorder | None = getattr(engine, "calls", None)
    calls = recorder.calls_for(record.step) if recorder is not None else []
    arrays = _call_arrays(engine, calls, start, evidence, rows)
    if not run:
        return arrays
    if recorder is None or not calls:
        evidence.details["replay"] = (
            "not replayed: the model was not called inside the guarded step"
        )
        return arrays
    loss_ok = math.isfinite(record.loss)
    backward = loss_ok and not math.isfinite(record.grad_norm)
    model, prefix = unwrap(engine.model)
    in_step = engine.in_step
    recorder.paused, engine.in_step = True, False
    result = ReplayResult()
    index = 0
    try:
        for call in calls:
            result = replay_call(
                model,
                call,
                allow_neg_inf=engine.config.allow_neg_inf,
                logits_module=engine.config.logits_module,
                backward=backward,
                prefix=prefix,
            )
            if result.finding is not None:
                break
            index += 1
    except Exception as err:  # noqa: BLE001 - the replay must never break training
        evidence.details["replay"] = f"replay failed: {type(err).__name__}: {err}"
        return arrays
    finally:
        recorder.paused, engine.in_step = False, in_step
    info: dict[str, Any] = {"calls_recorded": len(calls) + recorder.dropped}
    if result.notes:
        info["notes"] = result.notes
    f = result.finding
    if f is None and backward:
        owner = _grad_norm_owner(engine, record)
        if owner is not None:
            evidence.grad_where = owner
            info["grad_norm_owner"] = owner
    if f is None:
        info["found"] = None
        if not result.output_nonfinite and not (
            math.isfinite(record.logits_min) and math.isfinite(record.logits_max)
        ):
            info["notes"] = [*info.get("notes", []), "the replay did not reproduce the "
                             "non-finite output (a non-deterministic operation?)"]
            evidence.details["replay_unreproduced"] = True
        evidence.details["replay"] = info
        return arrays
    if index:  # `nanguard replay` should rerun the call that went wrong
        arrays = _call_arrays(engine, calls, index, evidence, rows)
    info.update(found=f.module, phase=f.phase, hidden=f.hidden, call=index, note=f.note,
                **f.summary)
    evidence.details["replay"] = info
    if f.phase == "forward":
        evidence.where = f.module
        if f.hidden:
            evidence.activation = f.module
            ins, outs = f.summary.get("input") or [], f.summary.get("output") or []
            # Inputs with Inf passed the localizer only as an allowed -inf (a mask).
            detector.note_activation(
                evidence, [o.get("dtype") for o in outs],
                [abs(v) for i in ins for v in (i.get("min"), i.get("max"))
                 if isinstance(v, float)],
                masked=any(i.get("inf") for i in ins), attention=f.attention,
                out_inf=any(o.get("inf") for o in outs))
        evidence.output_past_logits = result.past_logits
        if result.model_code:
            evidence.details["made_in_model_code"] = True
        if result.other_output:
            evidence.details["nonfinite_output"] = result.other_output
    else:
        evidence.grad_where = f.module
    arrays.update(f.arrays())
    return arrays


def _other_nonfinite_output(out: Any, logits: torch.Tensor) -> str | None:
    """The first floating part of a model's output, other than its logits, holding NaN or
    Inf, by the name the dump gives it (``output.1``, ``output.end_logits``)."""
    for name, leaf in named_leaves(out, "output"):
        # Not a loss the model computed itself ({"loss", "logits"}, a (loss, logits) tuple:
        # 0-dim, or named so): a NaN there is the loss's, and loss_nonfinite says so.
        if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf is not logits
                and leaf.ndim > 0 and name.rpartition(".")[2] != "loss"
                and _nonfinite([leaf])):
            return name
    return None


def _grad_norm_owner(engine: Any, record: Any) -> str | None:
    """The module owning the first parameter (in backward order) whose gradient norm is
    non-finite: where the gradients overflowed when no module's gradient holds Inf/NaN
    (finite entries whose float32 L2 norm overflows)."""
    i = detector.last_nonfinite(record.layer_grad_norms)
    names = engine.session.extra_meta.get("param_names") or []
    if i is None or i >= len(names):
        return None
    owner = str(names[i]).rpartition(".")[0]
    return owner or f"<{type(engine.model).__name__}>"


ARG_BYTES = 64 * 2**20  # per argument of the model call kept in the dump
UPCAST = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)  # numpy lacks them


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _stored_itemsize(t: torch.Tensor) -> int:
    return 4 if t.dtype in UPCAST else t.element_size()


def dump_rows(engine: Any, calls: Sequence[RecordedCall]) -> tuple[int, int] | None:
    """``(batch, kept)``: the tensors of the step's batch are cut to ``kept`` of their
    ``batch`` rows, together, when one of them is over its dump limit, so that the inputs,
    the targets, the output, each call's arguments and recorded output gradient keep the
    same rows (a replay can pair them). ``batch`` is the first dimension of the first
    tensor over its limit; tensors with another first dimension are cut on their own."""
    from nanguard._torch_engine import MAX_DUMP_BYTES, named_tensors

    pairs = [(t, MAX_DUMP_BYTES) for obj, name in
             ((engine.inputs, "inputs"), (engine.targets, "targets"), (engine.output, "output"))
             for _, t in named_tensors(obj, name)]
    for call in calls:
        pairs += [(t, ARG_BYTES) for t in _tensors((call.args, call.kwargs))]
        pairs += [(g, GRAD_BYTES) for g in call.output_grads.values()]
    pairs = [(t, lim) for t, lim in pairs if t.ndim and t.shape[0]]
    over = [t for t, lim in pairs if t.numel() * _stored_itemsize(t) > lim]
    if not over:
        return None
    batch = int(over[0].shape[0])
    kept = min(
        max(1, lim // max(1, t.numel() // batch * _stored_itemsize(t)))
        for t, lim in pairs if t.shape[0] == batch
    )
    return batch, min(batch, kept)


def _call_arrays(
    engine: Any, calls: Sequence[RecordedCall], index: int, evidence: Any,
    rows: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """What ``nanguard replay`` needs besides the inputs, for call ``index`` of the step:
    its RNG state, its recorded output gradient, and its arguments
    (``replay.args.*``/``replay.kwargs.*``) unless the call was exactly the step's inputs as
    the dump rebuilds them (``model(inputs)``, ``model(*inputs.N)``, ``model(**inputs.K)``).

    ``evidence.details["replay_call"]`` gets how to rebuild the call: ``call`` (its index in
    the step), ``micro_batches``, ``args``/``kwargs`` (each a tensor's name in the dump with
    its dtype when the dump upcast it, a JSON value, a list/tuple/dict of those, a
    ``packed_sequence`` (an RNN's ``PackedSequence``, rebuilt as one), or
    ``unsupported`` with the type's name), ``autocast`` (``[device, dtype]`` pairs) and
    ``output_grads`` (the dtypes of upcast output gradients).
    """
    micro = max(1, int(getattr(engine, "micro_batches", 1) or 1))
    if index >= len(calls):
        if micro > 1:  # no call to replay: the micro-batches are not one call's arguments
            evidence.details["replay_call"] = {"micro_batches": micro}
        return {}
    call = calls[index]
    out: dict[str, np.ndarray] = {"replay.rng_cpu": call.rng_cpu.numpy().copy()}
    spec: dict[str, Any] = {"call": index, "micro_batches": micro}
    grad_dtypes = {}
    for i, g in sorted(call.output_grads.items()):
        out[f"replay.output_grad.{i}"] = _as_numpy(_copy(g, GRAD_BYTES, rows))
        if g.dtype in UPCAST:
            grad_dtypes[str(i)] = _dtype_name(g.dtype)
    if grad_dtypes:
        spec["output_grads"] = grad_dtypes
    if call.autocast:
        spec["autocast"] = [[dev, _dtype_name(dtype)] for dev, dtype in call.autocast]
    names = _input_names(engine, call) if micro == 1 else None
    spec["args"] = [_encode(a, f"replay.args.{i}", out, rows, names)
                    for i, a in enumerate(call.args)]
    spec["kwargs"] = {str(k): _encode(v, f"replay.kwargs.{k}", out, rows, names)
                      for k, v in call.kwargs.items()}
    evidence.details["replay_call"] = spec
    return out


def _input_names(engine: Any, call: RecordedCall) -> dict[int, str] | None:
    """The dump names of the step's inputs by tensor id, when :func:`_dumped_call` rebuilds
    exactly this call from them (same tensors, same positions or names); else None."""
    from nanguard._torch_engine import named_tensors

    named = list(named_tensors(engine.inputs, "inputs"))
    if not named:
        return None
    names = {id(t): name for name, t in named}
    if len(named) == 1 and named[0][0] == "inputs":
        ok = not call.kwargs and len(call.args) == 1 and call.args[0] is named[0][1]
        return names if ok else None
    parts = {name[len("inputs."):]: t for name, t in named}
    if all(k.isdigit() for k in parts):
        ordered = [parts[k] for k in sorted(parts, key=int)]
        ok = not call.kwargs and len(call.args) == len(ordered) and all(
            a is t for a, t in zip(call.args, ordered, strict=False))
    else:
        ok = not call.args and set(map(str, call.kwargs)) == set(parts) and all(
            v is parts[str(k)] for k, v in call.kwargs.items())
    return names if ok else None


def _encode(obj: Any, path: str, out: dict[str, np.ndarray], rows: tuple[int, int] | None,
            names: dict[int, str] | None) -> dict[str, Any]:
    """One argument of the model call as ``details["replay_call"]`` describes it; tensors go
    into ``out`` under ``path`` (or are named by the input they are, ``names``)."""
    if isinstance(obj, torch.Tensor):
        if names is not None and id(obj) in names:
            spec: dict[str, Any] = {"tensor": names[id(obj)]}
        else:
            out[path] = _as_numpy(_copy(obj, ARG_BYTES, rows))
            spec = {"tensor": path}
        if obj.dtype in UPCAST:
            spec["dtype"] = _dtype_name(obj.dtype)
        return spec
    if obj is None or isinstance(obj, (bool, int, str)) or (
            isinstance(obj, float) and math.isfinite(obj)):
        return {"value": obj}
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):  # an RNN's packed batch
        return {"packed_sequence": [_encode(v, f"{path}.{i}", out, None, names)
                                    for i, v in enumerate(obj)]}
    if type(obj) in (list, tuple):  # a namedtuple's own type would be lost
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_encode(v, f"{path}.{i}", out, rows, names) for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: _encode(v, f"{path}.{k}", out, rows, names) for k, v in obj.items()}}
    return {"unsupported": type(obj).__name__}


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return t.numpy()


class ReplayInputError(ValueError):
    """A dump or model that ``nanguard replay`` cannot use; the message is one line.

    Example:
        >>> str(ReplayInputError("the dump holds no model state"))
        'the dump holds no model state'
    """


def replay_dump(dump: Any, model: torch.nn.Module, *, train: bool = True) -> ReplayResult:
    """Load the dump's model state into ``model`` and replay the dumped batch on it.

    The call is ``replay.args.*``/``replay.kwargs.*`` when the dump recorded them, else
    ``model(inputs)``, ``model(*inputs.N)`` or ``model(**inputs.KEY)``. The CPU RNG state
    and the output gradient recorded in the step are used when present, so dropout and the
    backward replay the step's own.

    Raises:
        ReplayInputError: No model state, parameters that do not match, no inputs, or a
            model that raises on the dumped call.
    """
    if dump.meta.get("framework") == "keras":
        raise ReplayInputError(
            "the dump was written by the Keras adapter; replay re-runs PyTorch (plain or "
            "Lightning) steps only"
        )
    prefix = "model."
    state = {k[len(prefix):]: dump.state[k] for k in dump.state if k.startswith(prefix)}
    if not state:
        raise ReplayInputError(
            f"the dump holds no model state ({dump.path}); replay needs an abort dump or "
            "one written with dump_state='always'"
        )
    model = eager_module(model)  # a torch.compile wrapper: the dump holds eager names
    own = model.state_dict()
    wrapped = "module."
    if (set(state) != set(own) and all(k.startswith(wrapped) for k in state)
            and {k[len(wrapped):] for k in state} == set(own)):
        # A DDP (or DataParallel) run's dump, replayed on the plain model it wrapped.
        state = {k[len(wrapped):]: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        def first(names: list[str]) -> str:  # three, and how many more
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return ", ".join(names[:3]) + more

        parts = []
        if missing:
            parts.append(f"missing from the dump: {first(missing)}")
        if unexpected:
            parts.append(f"not in the model: {first(unexpected)}")
        if shapes:
            parts.append(f"shape (dump vs model): {first(shapes)}")
        raise ReplayInputError(
            f"the model's parameters do not match the dump's ({'; '.join(parts)})"
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(_tensor(state[k], f"the state's {k!r}").to(t.dtype))
    details = getattr(dump.event, "details", None) or {}
    spec = details.get("replay_call") if isinstance(details, Mapping) else None
    spec = spec if isinstance(spec, Mapping) else {}
    notes: list[str] = []
    if "args" in spec or "kwargs" in spec:
        args = tuple(_decode(a, dump.tensors, f"argument {i}")
                     for i, a in enumerate(spec.get("args") or []))
        kwargs = {k: _decode(v, dump.tensors, f"keyword argument '{k}'")
                  for k, v in (spec.get("kwargs") or {}).items()}
    elif int(spec.get("micro_batches") or 1) > 1:
        raise ReplayInputError(
            f"the step accumulated {spec['micro_batches']} micro-batches and no model call "
            "was recorded in it, so the dump does not say which micro-batch to replay"
        )
    else:
        args, kwargs = _dumped_call(dump.tensors)
    rng = dump.tensors.get("replay.rng_cpu")
    grad_dtypes = spec.get("output_grads") or {}
    grads = {
        int(k.rsplit(".", 1)[1]): _cast(_tensor(v, f"'{k}'"),
                                        grad_dtypes.get(k.rsplit(".", 1)[1]))
        for k, v in dump.tensors.items()
        if k.startswith("replay.output_grad.")
    }
    call = RecordedCall(
        args, kwargs,
        _tensor(rng, "'replay.rng_cpu'") if rng is not None else torch.get_rng_state(),
        None, _replay_autocast(spec.get("autocast"), model, notes), True, grads,
    )
    model.train(train)
    config = dump.meta.get("config", {})
    # As in the step: the backward is replayed only for a finite loss with non-finite
    # gradients. With the step's output (or loss) non-finite, its recorded gradient is
    # non-finite because of it, and a backward from it would blame the loss.
    record = next((r for r in reversed(dump.history) if r.step == dump.event.step), None)
    dumped = dump.tensors.get("output")
    output_bad = (dumped is not None and dumped.dtype.kind == "f"
                  and not bool(np.isfinite(dumped).all()))
    backward = bool(grads) and not output_bad and (
        record is None or (math.isfinite(record.loss) and not math.isfinite(record.grad_norm)))
    try:
        result = replay_call(
            model,
            call,
            allow_neg_inf=tuple(config.get("allow_neg_inf") or ()),
            logits_module=config.get("logits_module"),
            backward=backward,
        )
        result.notes[:0] = notes
        if result.finding is None and grads and not backward and result.output_nonfinite:
            result.notes.append("backward not replayed: the forward's output is already "
                                "non-finite, and no module turned finite inputs into it")
        if result.finding is None and output_bad and not result.output_nonfinite:
            result.notes.append("the dumped model output is non-finite but the replay's is "
                                "finite: the replay did not reproduce the step (a "
                                "non-deterministic operation, or state the forward changes?)")
        return result
    except Exception as err:  # noqa: BLE001 - the user's model on the dumped call
        raise ReplayInputError(
            f"calling the model on the dumped batch raised {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def _tensor(a: np.ndarray, what: str) -> torch.Tensor:
    """A dumped array as a tensor: numbers only (a dump edited to hold strings is refused,
    as a bad dump), in the machine's byte order (``.npy`` may store either)."""
    a = np.asarray(a)
    if a.dtype.kind not in "biufc":
        raise ReplayInputError(f"{what} holds {a.dtype} values, not numbers")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.array(a))
    except TypeError as err:  # a dtype torch has no tensor of
        raise ReplayInputError(f"{what}: {err}") from err


def _dumped_call(tensors: Mapping[str, np.ndarray]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def t(a: np.ndarray) -> torch.Tensor:
        return _tensor(a, "a dumped call's tensor")

    args = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items()
                  if k.startswith("replay.args."))
    kwargs = {k[len("replay.kwargs."):]: t(v) for k, v in tensors.items()
              if k.startswith("replay.kwargs.")}
    if args or kwargs:
        return tuple(t(v) for _, v in args), kwargs
    if "inputs" in tensors:
        return (t(tensors["inputs"]),), {}
    parts = {k[len("inputs."):]: v for k, v in tensors.items() if k.startswith("inputs.")}
    if parts and all(k.isdigit() for k in parts):
        return tuple(t(parts[k]) for k in sorted(parts, key=int)), {}
    if parts:
        return (), {k: t(v) for k, v in parts.items()}
    raise ReplayInputError("the dump holds no inputs to replay (no 'inputs' tensors)")


def _cast(t: torch.Tensor, dtype: Any) -> torch.Tensor:
    """Back to the dtype the step had (the dump stores bfloat16 and float8 as float32)."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return t.to(getattr(torch, dtype))
    return t


def _decode(spec: Any, tensors: Mapping[str, np.ndarray], where: str) -> Any:
    """One argument of the dumped call, from its ``details["replay_call"]`` description."""
    if not isinstance(spec, Mapping):
        raise ReplayInputError(f"the dump's description of the model call's {where} is "
                               f"not readable: {spec!r}")
    if "tensor" in spec:
        name = spec["tensor"]
        if name not in tensors:
            raise ReplayInputError(
                f"the dump lacks '{name}', the model call's {where} (left out when the dump "
                "was written?)"
            )
        return _cast(_tensor(tensors[name], f"'{name}'"), spec.get("dtype"))
    if "value" in spec:
        return spec["value"]
    if "list" in spec or "tuple" in spec:
        items = [_decode(v, tensors, f"{where}[{i}]")
                 for i, v in enumerate(spec.get("list", spec.get("tuple")) or [])]
        return items if "list" in spec else tuple(items)
    if "dict" in spec:
        return {k: _decode(v, tensors, f"{where}['{k}']") for k, v in spec["dict"].items()}
    if "packed_sequence" in spec:
        fields = [_decode(v, tensors, f"{where}[{i}]")
                  for i, v in enumerate(spec["packed_sequence"])]
        return torch.nn.utils.rnn.PackedSequence(*fields)
    raise ReplayInputError(
        f"the step's model call took its {where} as a {spec.get('unsupported', '?')}, which a "
        "dump cannot hold, so replay cannot rebuild the call"
    )


def _replay_autocast(
    recorded: Any, model: torch.nn.Module, notes: list[str]
) -> list[tuple[str, torch.dtype]]:
    """The step's autocast contexts for the replay, on the device the model is on: a step
    that ran under CUDA autocast replays under CPU autocast on a CPU model (a note says so:
    the two cast different operations)."""
    param = next(iter(model.parameters()), None)
    device = param.device.type if param is not None else "cpu"
    out: dict[str, torch.dtype] = {}
    for item in recorded or []:
        try:
            dev, name = str(item[0]), str(item[1])
        except (TypeError, IndexError):
            continue
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            continue
        if dev != device:
            notes.append(f"the step ran under {dev} autocast ({name}); replayed under "
                         f"{device} autocast, which casts other operations")
            dev = device
        out[dev] = dtype
    return list(out.items())
