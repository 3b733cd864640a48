"""PyTorch machinery shared by the plain-PyTorch guard and the Lightning callback.

It turns torch objects into numbers for the core (one device-to-host transfer per step)
and carries out the core's verdicts (skip, snapshot, rollback, lower the learning rate).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from nanguard import detector
from nanguard.config import GuardConfig
from nanguard.dump import environment, named_leaves
from nanguard.events import StepRecord
from nanguard.session import GuardSession, Verdict

MAX_DUMP_BYTES = 64 * 2**20  # per tensor; larger batches are cut along the first dimension
IGNORE_INDEX = -100  # torch's cross-entropy default: such labels are padding, not invalid


def eager_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile`` wrapper runs: its names are the user's own (``head``,
    not ``_orig_mod.head``), and hooks on it work without recompiling."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def clean_name(name: str) -> str:
    """A module or parameter name as the user wrote the model: without the ``_orig_mod``
    level that a ``torch.compile``d submodule adds (``net.1``, not ``net._orig_mod.1``)."""
    return name.replace("._orig_mod.", ".").removeprefix("_orig_mod.").removesuffix("._orig_mod")


def named_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Submodules by name: the user's names (:func:`clean_name`) and the raw ones; a raw
    name wins, so ``"body"`` is the compiled wrapper (its hooks run outside the graph)."""
    raw = dict(model.named_modules())
    return {**{clean_name(n): m for n, m in raw.items()}, **raw}


def first_float_tensor(obj: Any) -> torch.Tensor | None:
    """The tensor that counts as the logits in a module's output: ``.logits`` or a dict's
    ``"logits"``, else the first floating tensor with at least one dimension; a 0-dim one
    (a loss returned as ``(loss, logits)``) only when there is no other."""
    found = _first_float(obj, scalars=False)
    return found if found is not None else _first_float(obj, scalars=True)


def _first_float(obj: Any, *, scalars: bool) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() and (scalars or obj.ndim > 0) else None
    logits = getattr(obj, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        return logits
    if isinstance(obj, Mapping):
        logits = obj.get("logits")  # {"loss": ..., "logits": ...}: the loss is not the output
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            return logits
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_float(item, scalars=scalars)
            if found is not None:
                return found
    return None


def inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a guard's hook becomes in a copy of the model (``copy.deepcopy``,
    ``AveragedModel``) or in a model saved whole (``torch.save(model)``): nothing."""


def _inert() -> Callable[..., None]:
    # Models saved whole while guarded name this function: keep its name and module.
    return inert_hook


class GuardHook:
    """A hook the guard registers on a user's module: it calls ``owner.<method>`` while the
    owner lives, holding it weakly. Pickled or deep-copied with the module it becomes
    :func:`inert_hook`, so a saved or copied model carries no guard (no engine, optimizer or
    snapshot in the file) and a copy's forward does nothing guard-related.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> class Seen:
        ...     def on_output(self, module, args, output):
        ...         print("seen")
        >>> seen = Seen()
        >>> handle = model.register_forward_hook(GuardHook(seen, "on_output"))
        >>> _ = model(torch.ones(1, 2))
        seen
        >>> import copy
        >>> _ = copy.deepcopy(model)(torch.ones(1, 2))  # the copy's hook does nothing
        >>> handle.remove()
    """

    __slots__ = ("_method", "_owner")

    def __init__(self, owner: Any, method: str) -> None:
        self._owner = weakref.ref(owner)
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # dynamo tracing a compiled module's hooks
            return _eager(self, *args, **kwargs)
        owner = self._owner()
        return None if owner is None else getattr(owner, self._method)(*args, **kwargs)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[()]]:
        return _inert, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return inert_hook


@torch.compiler.disable
def _eager(hook: GuardHook, *args: Any, **kwargs: Any) -> Any:
    """A hook never traced by torch.compile (RNG state reads, bookkeeping on the guard):
    dynamo breaks the graph and runs it eagerly. Only then: the wrapper costs a few µs."""
    owner = hook._owner()
    return None if owner is None else getattr(owner, hook._method)(*args, **kwargs)


def named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested batch, with a readable path (``inputs.0``, ``inputs.x``)."""
    for name, leaf in named_leaves(obj, prefix):
        if isinstance(leaf, torch.Tensor):
            yield name, leaf


def named_extras(obj: Any, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """The leaves of a nested batch that are not tensors, for the dump: numpy arrays, text
    (a list of strings is one string array) and numbers as they are; anything else as a
    0-d object array, which the dump leaves out and names in ``meta["left_out"]``."""
    for name, leaf in named_leaves(obj, prefix):
        if isinstance(leaf, torch.Tensor):
            continue
        if isinstance(leaf, (np.ndarray, list, tuple, str, bytes, int, float, complex,
                             np.generic)):
            yield name, np.asarray(leaf, dtype=object if isinstance(leaf, list | tuple)
                                   else None)
        else:
            box = np.empty((), dtype=object)
            box[()] = leaf
            yield name, box


def _rows_of(a: Any, rows: tuple[int, int] | None) -> Any:
    """A tensor or array of ``rows[0]`` rows cut to its first ``rows[1]`` (see dump_rows)."""
    if rows is not None and a.ndim and a.shape[0] == rows[0]:
        return a[: rows[1]]
    return a


def to_numpy(
    t: torch.Tensor, limit: int = MAX_DUMP_BYTES, rows: tuple[int, int] | None = None
) -> np.ndarray:
    """A CPU numpy copy cut along the first dimension to ``limit`` bytes (bfloat16 and
    float8 upcast to float32); ``rows = (batch, kept)``: a tensor of ``batch`` rows keeps its
    first ``kept`` (the rows every tensor of the step keeps, see ``dump_rows``)."""
    t = t.detach()
    if t.layout != torch.strided:  # sparse targets or inputs: their dense values, cut first
        t = t.to_sparse() if t.layout != torch.sparse_coo else t
        if rows is not None and t.ndim and t.shape[0] == rows[0]:
            t = t.narrow_copy(0, 0, rows[1])
        keep = _rows_within(t, limit)
        t = (t if keep is None else t.narrow_copy(0, 0, keep)).to_dense()
    t = _rows_of(t, rows)
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    keep = _rows_within(t, limit)
    if keep is not None:
        t = t[:keep]
    return t.cpu().numpy().copy()


def _rows_within(t: torch.Tensor, limit: int) -> int | None:
    """How many of ``t``'s first-dimension rows fit in ``limit`` bytes; None: all of it."""
    if t.ndim and t.numel() * t.element_size() > limit:
        return max(1, limit // max(1, t[0].numel() * t.element_size()))
    return None


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    if not t.is_floating_point():
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _describe_nonfinite(name: str, t: torch.Tensor) -> str | None:
    nan, inf = nonfinite_counts(t)
    if nan or inf:
        return f"{name}: {nan} NaN, {inf} Inf of {t.numel()} values"
    return None


def check_targets(
    targets: Any, output: torch.Tensor | None, ignore_index: int = IGNORE_INDEX,
    *, classes: bool = True,
) -> str | None:
    """NaN/Inf in floating targets, or class ids outside ``[0, n_classes)`` (other than
    ``ignore_index``); ``classes=False``: the output is known not to score classes."""
    for name, t in named_tensors(targets, "targets"):
        if t.is_floating_point():
            found = _describe_nonfinite(name, t)
            if found:
                return found
            continue
        if not classes or t.dtype == torch.bool or output is None or t.numel() == 0:
            continue
        n_classes = _n_classes(t, output)
        found = (None if n_classes is None
                 else _describe_labels(name, t, n_classes, ignore_index))
        if found:
            return found
    return None


def unseen_by_autograd(t: torch.Tensor) -> Any:
    """An in-place write to the user's class ids that autograd does not count.

    The ids are often a view sharing storage, and so a version counter, with tensors the
    step's forward saved for backward: a language model's ``y = block[:, 1:]`` beside
    ``x = block[:, :-1]``, which its embedding saved. A counted write would make that
    backward raise. Nothing the backward reads changes when every id was valid (a GPU
    defuses on every step, without looking); when one was not, the step is bad and its
    gradients are dropped.
    """
    if _PRESERVE_VERSION is None or t.is_inference():  # an older torch; no counter
        return contextlib.nullcontext()
    return _PRESERVE_VERSION(t)


_PRESERVE_VERSION = getattr(torch.autograd.grad_mode, "_unsafe_preserve_version_counter", None)


def check_ignore_index(value: Any) -> int:
    """The ``ignore_index`` option, validated (both torch adapters, at construction)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"`ignore_index` must be an int (the class id your loss ignores). Received: "
            f"ignore_index={value!r}"
        )
    return value


def _bad_labels(t: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    return ((t < 0) | (t >= n_classes)) & (t != ignore_index)


def _describe_labels(
    name: str, t: torch.Tensor, n_classes: int, ignore_index: int = IGNORE_INDEX
) -> str | None:
    return _describe_ids(name, t, _bad_labels(t, n_classes, ignore_index),
                         f"outside [0, {n_classes})")


def _describe_ids(name: str, t: torch.Tensor, bad: torch.Tensor, what: str,
                  why: str | None = None) -> str | None:
    if not bool(bad.any()):
        return None
    at = torch.nonzero(bad)[0].tolist()
    first = int(t[tuple(at)])
    head = detector.describe_ids(name, int(bad.sum()), first, at, t.shape, what)
    if why is not None:
        return f"{head}; {why}"
    return (f"{head}; if {first} marks positions your loss ignores, pass ignore_index={first} "
            "to NanGuard")


_OUT_OF_BOUNDS = re.compile(r"Target (-?\d+) is out of bounds")


def rejected_labels(
    targets: Any, error: BaseException, ignore_index: int, *, output_seen: bool = False
) -> str | None:
    """The class ids that a loss's ``IndexError`` proves out of range, described as
    :func:`check_targets` does: for when the output does not tell the class count (the
    model computes its loss inside ``forward``, which raised before returning, or a head
    other than the one the guard sees).

    PyTorch's class-id losses raise ``IndexError("Target 14 is out of bounds.")`` on the
    CPU. The id named is invalid, and so is every id at least as large when it is not
    negative (the class count is at most it), and every negative id but ``ignore_index``.
    When several target tensors hold the id named (multi-task labels), which one the loss
    read is unknown: the event names ``targets`` and lists them.
    """
    match = _OUT_OF_BOUNDS.search(str(error)) if isinstance(error, IndexError) else None
    if match is None:
        return None
    rejected = int(match.group(1))
    holding = [
        (name, t) for name, t in named_tensors(targets, "targets")
        if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        and t.numel() and bool((t == rejected).any())
    ]
    said = f"the loss raised IndexError ({match.group(0)}.)"
    if len(holding) > 1:
        return (f"targets: {said}, and {', '.join(n for n, _ in holding)} all hold the id "
                f"{rejected}: nanguard cannot tell which of them the loss read")
    if not holding:
        return None
    name, t = holding[0]
    bad = (t < 0) | (t >= rejected) if rejected >= 0 else t < 0
    bad = (bad & (t != ignore_index)) | (t == rejected)
    advice = ("" if output_seen else " before nanguard saw the logits, so their class count "
              "is unknown; set logits_module='<the head's name>' and nanguard checks the "
              "labels before the loss")
    return _describe_ids(name, t, bad, "out of range", said + advice)


def _n_classes(t: torch.Tensor, output: torch.Tensor) -> int | None:
    """Classes the output scores, when its shape says it scores classes for these targets."""
    dim = _class_dim(t, output)
    return None if dim is None else int(output.shape[dim])


def _class_dim(t: torch.Tensor, output: torch.Tensor) -> int | None:
    """The output's class dimension for these targets: the last (``(N, C)`` for ``(N,)``,
    ``(N, T, V)`` for ``(N, T)``) or the second (``(N, C, H, W)`` for ``(N, H, W)``).

    A single output column is a regression or a binary logit, not a one-class classifier.
    """
    if output.ndim == t.ndim + 1 and output.shape[-1] > 1:
        if tuple(t.shape) == tuple(output.shape[:-1]):
            return output.ndim - 1
        if tuple(t.shape) == (output.shape[0], *output.shape[2:]):
            return 1
    return None


def _class_scores(targets: Any, logits: torch.Tensor, output: Any) -> torch.Tensor:
    """The output tensor whose class dimension the targets' ids index.

    The logits (the first floating tensor) unless the output holds several floating
    tensors and none is named ``logits``: a ``(features, logits)`` tuple has the features
    first, and their width is no class count. Then the widest that fits a class-id target
    (:func:`_class_dim`): an id below it is valid for at least that output.
    """
    if isinstance(output, torch.Tensor) or isinstance(
            getattr(output, "logits", None), torch.Tensor) or (
            isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor)):
        return logits
    from nanguard._torch_replay import float_tensors

    best, width = logits, -1
    labels = [t for _, t in named_tensors(targets, "targets")
              if not (t.is_floating_point() or t.dtype == torch.bool)]
    for o in float_tensors(output):
        for t in labels:
            dim = _class_dim(t, o)
            if dim is not None and o.shape[dim] > width:
                best, width = o.detach(), int(o.shape[dim])
    return best


def scores_classes(grad: torch.Tensor | None, dim: int, n_classes: int) -> torch.Tensor | None:
    """Whether a loss read the output as class scores, from the gradient it sent into it.

    A loss computed from ``softmax``/``log_softmax`` of the output (cross-entropy, NLL,
    label smoothing, focal loss, a naive ``exp(z) / sum(exp(z))``) does not change when a
    constant is added to a row of scores, so each row of its gradient sums to zero. A loss on
    an embedding (ArcFace, triplet, contrastive) does not do that, and its integer targets
    are not indices into the output. A device boolean (no transfer); ``None``: no evidence.
    Non-finite rows say nothing, so they count as class scores.
    """
    if grad is None or grad.ndim <= dim or grad.shape[dim] != n_classes:
        return None
    # Rounding alone: float32 sums to ~1e-7 of the row, bfloat16's entries carry ~4e-3.
    tol = max(1e-4, 2 * torch.finfo(grad.dtype).eps)
    g = grad.detach().float()
    row, size = g.sum(dim).abs(), g.abs().sum(dim)
    return ((row <= tol * size) | ~torch.isfinite(row)).all()


class Snapshot:
    """A finite copy of model and optimizer state, restored bit for bit.

    Copies live on the CPU so a snapshot never doubles the accelerator's memory.
    """

    def __init__(self, step: int, model: torch.nn.Module, optimizers: list[Any]) -> None:
        self.step = step
        # Buffers left out of state_dict (persistent=False) are state the forward writes too.
        live = _live_state(model)
        self.model = {k: v.detach().to("cpu", copy=True) for k, v in live.items()}
        # The live tensors too: a name can change while the tensor stays (pruning renames
        # `weight` to `weight_orig`, Lightning's ModelPruning at an epoch's end).
        self.refs = live
        in_model = {id(v) for v in live.values()}
        # Parameters only an optimizer holds (a learnable loss weight), by their place.
        self.outside: dict[tuple[int, int], torch.Tensor] = {}
        # Optimizer state by parameter index: (CPU copy, device it lives on) per key.
        self.optim: list[dict[int, dict[str, tuple[Any, Any]]]] = []
        for k, opt in enumerate(optimizers):
            saved: dict[int, dict[str, tuple[Any, Any]]] = {}
            for i, p in enumerate(_opt_params(opt)):
                if id(p) not in in_model:
                    self.outside[(k, i)] = p.detach().to("cpu", copy=True)
                if p in opt.state and opt.state[p]:
                    saved[i] = {key: (_copy(v, "cpu"), getattr(v, "device", None))
                                for key, v in opt.state[p].items()}
            self.optim.append(saved)

    def restore_buffers(self, model: torch.nn.Module, names: list[str]) -> None:
        """Copy back only these buffers (``state_dict`` keys), as they were in the snapshot,
        with the integer buffers of the same modules: BatchNorm's ``num_batches_tracked``
        goes back with its running statistics (with ``momentum=None`` it weighs them)."""
        if not names:
            return
        live = _live_state(model)
        owners = {name.rpartition(".")[0] for name in names}
        wanted = {id(live[name]) for name in names if name in live}
        wanted |= {id(t) for key, t in live.items()
                   if key.rpartition(".")[0] in owners and not t.is_floating_point()}
        with torch.no_grad():
            for name, target in self._targets(live).items():
                if id(target) in wanted:
                    target.data.copy_(self.model[name])

    def restore_params(self, model: torch.nn.Module, optimizers: list[Any],
                       params: list[torch.Tensor]) -> None:
        """Copy back only these parameters, each with its optimizer state, as they were in
        the snapshot (a skip's repair of weights an applied update made non-finite)."""
        self.restore(model, optimizers, only={id(p) for p in params})

    def blown_up(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's finite floating tensors whose largest ``|w|`` is huge and grew
        ``detector.BLOW_UP``-fold since this snapshot (slow path only)."""
        found = []
        for name, target in self._targets(_live_state(model)).items():
            was = self.model[name]
            if target.is_floating_point() and target.numel() and was.numel():
                with torch.no_grad():
                    peak = float(target.detach().abs().max())
                if math.isfinite(peak) and detector.blew_up(peak, float(was.abs().max())):
                    found.append(target)
        return found

    def _targets(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Where each saved tensor goes back to: the model's tensor of the same name (also
        a buffer reassigned or swapped since), else, for a name gone from the model, the
        same tensor under its new name (pruning's `weight_orig`). A tensor the model no
        longer holds is left out; one added since keeps its value. ``live``: the model's
        tensors now (:func:`_live_state`)."""
        held = {id(v) for v in live.values()}
        targets = {}
        for name, ref in self.refs.items():
            if name in live and live[name].shape == self.model[name].shape:
                targets[name] = live[name]
            elif name not in live and id(ref) in held:
                targets[name] = ref
        return targets

    def restore(self, model: torch.nn.Module, optimizers: list[Any],
                only: set[int] | None = None) -> None:
        """Everything back bit for bit; ``only``: just the tensors with these ids (and the
        optimizer state of those that are parameters)."""
        with torch.no_grad():
            for name, target in self._targets(_live_state(model)).items():
                if only is None or id(target) in only:
                    target.data.copy_(self.model[name])
        for k, (opt, saved) in enumerate(zip(optimizers, self.optim, strict=True)):
            for i, p in enumerate(_opt_params(opt)):
                if only is not None and id(p) not in only:
                    continue
                if (k, i) in self.outside:
                    with torch.no_grad():
                        p.copy_(self.outside[(k, i)])
                if i in saved:
                    # Each tensor back where it lived (Adam's `step` stays on the CPU unless
                    # the optimizer is capturable or fused).
                    opt.state[p] = {key: _copy(v, device) for key, (v, device) in saved[i].items()}
                else:
                    opt.state.pop(p, None)


def _live_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name: ``state_dict`` plus non-persistent buffers."""
    live = dict(model.state_dict(keep_vars=True))
    live.update((k, v) for k, v in model.named_buffers() if k not in live)
    return live


def _copy(v: Any, device: torch.device | str) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device, copy=True)
    return v


def _group_sizes(optimizers: list[Any]) -> list[int]:
    return [len(g["params"]) for opt in optimizers for g in opt.param_groups]


def _opt_params(opt: Any) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _schedulers_of(opt: Any) -> list[Any]:
    """LR schedulers attached to an optimizer (found once per rollback, never per step)."""
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    found = []
    for ref in gc.get_referrers(opt):
        owner = ref
        if isinstance(ref, dict):
            owners = [o for o in gc.get_referrers(ref) if getattr(o, "__dict__", None) is ref]
            owner = owners[0] if owners else None
        if isinstance(owner, (LRScheduler, ReduceLROnPlateau)) and owner.optimizer is opt:
            found.append(owner)
    return found


class TorchEngine:
    """Measures torch steps for the core and carries out its verdicts.

    Args:
        config: Validated options.
        model: The model whose output (or ``config.logits_module``) counts as the logits.
        optimizers: The optimizers stepping the model's parameters.
        framework: Adapter name for dumps.
        rank: Distributed rank.
        world_size: Number of ranks.
        extra_versions: Framework versions for the dumps' environment.
        ignore_index: The class id the loss ignores (torch's default -100): never invalid.
    """

    # False: class ids on the CPU are defused as on an accelerator, without looking first
    # (every step, with a device flag); the tests run that branch where there is no GPU.
    look_first_on_cpu = True

    def __init__(
        self,
        config: GuardConfig,
        model: torch.nn.Module,
        optimizers: list[Any],
        *,
        framework: str,
        rank: int = 0,
        world_size: int = 1,
        extra_versions: Mapping[str, str] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"nanguard needs a torch.nn.Module. Received: model={model!r}")
        self.config = config
        self.model = model
        self.ignore_index = check_ignore_index(ignore_index)
        self.names: dict[torch.Tensor, str] = {
            p: clean_name(n) for n, p in eager_module(model).named_parameters()
        }
        self.model_params = {id(p): p for p in self.names}
        if not self.names:
            raise ValueError(
                f"The model has no parameters, so there is nothing to guard. Received: "
                f"model={type(model).__name__}"
            )
        self.optimizers: list[Any] = []
        self.params: list[torch.Tensor] = []
        self.set_optimizers(optimizers)
        self.session = GuardSession(
            config,
            framework=framework,
            environment=environment(torch=torch.__version__, **(extra_versions or {})),
            rank=rank,
            world_size=world_size,
        )
        self.session.extra_meta["param_names"] = [self.names[p] for p in self.params]
        self.session.extra_meta["ignore_index"] = self.ignore_index  # not a shared option
        self.snapshot: Snapshot | None = None
        self.prior_snapshot: Snapshot | None = None  # the one before, for DDP (see measure)
        self.logits_name = config.logits_module or "output"
        self._hook: Any = None
        self._load_hooks: list[Any] = []
        self.snapshot_owed = False  # a load_state_dict or a new param group: snapshot next
        self.calls: Any = None  # a _torch_replay.CallRecorder once attached
        self.reset_step()
        # The last update's weight check (after_update), read at the next step.
        self.pending_update: list[torch.Tensor] | None = None
        self.update_was_bad = False
        # Every group's LR as the last measure saw it (floats or tensors, not read: a tensor
        # LR on a GPU would cost a transfer per group), and the same for the step whose
        # update was last applied; read only when an update_nonfinite event names one.
        self.measured_lrs: list[Any] = []
        self.update_lrs: list[Any] = []
        self.amp_scale: float | None = None  # a GradScaler's scale below 1 at a bad step
        # (inputs, targets) of the last step whose update went in, held (references only)
        # until that update is found finite: an update_nonfinite event, caught a step late,
        # dumps the batch of the step it is about.
        self.last_batch: tuple[Any, Any] | None = None
        self.last_versions: dict[int, int] = {}  # id -> ._version of its tensors then
        self.distributed = False
        self.any_rank_bad: bool | None = None
        self.any_rank_loss_bad: bool | None = None
        self.warned_no_output = False
        self.anomaly_warned = False  # add_loss warns once that anomaly mode pre-empts it
        self.refusal_reported = False  # since the last snapshot taken (see take_snapshot)
        self.accumulates = False  # a step has spanned several contexts (plain torch)
        # Whether the loop changes the gradients between guard.backward and optimizer.step
        # (its own clip_grad_norm_, scaler.unscale_): then they are measured right after the
        # backward, before the change. None until the first step shows it.
        self.measure_at_backward: bool | None = None
        # Code after the measurement may change the gradients before the optimizer reads
        # them (Lightning: a module's on_before_optimizer_step, a later callback's).
        self.grads_may_change_after_measure = False
        # The gradient the loss sent into the logits at the last step (when the logits are
        # the model's output): evidence whether the output scores classes (scores_classes).
        self.last_output_grad: torch.Tensor | None = None
        self.output_scores_classes = True  # False once a gradient showed it does not
        # The plain guard's step context turns a loss's out-of-range error into a skip; in
        # Lightning it would end the fit, on a GPU it is a device-side assert, and under DDP
        # the other ranks would wait in backward's all-reduce for this one.
        self.loss_errors_caught = framework == "torch"

    # -- set-up -------------------------------------------------------------------------
    def set_optimizers(self, optimizers: Iterable[Any]) -> None:
        """The optimizers to guard. The guarded parameters are theirs (a learnable loss
        weight outside the model included) and every trainable parameter of the model (one
        another optimizer steps, or one not yet added with ``add_param_group``): a bad step's
        gradients are dropped, and the update checked, for all of them."""
        opts = list(optimizers)
        params: list[torch.Tensor] = []
        seen: set[int] = set()
        for k, opt in enumerate(opts):
            for g, group in enumerate(opt.param_groups):
                for i, p in enumerate(group["params"]):
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
                    if p not in self.names:  # not the model's: named by its place
                        where = f"optimizer{k}." if len(opts) > 1 else "optimizer."
                        self.names[p] = f"{where}param_groups.{g}.params.{i}"
        if not opts or not any(id(p) in self.model_params for p in params):
            raise ValueError(
                "The optimizer holds none of the model's parameters: pass the optimizer that "
                f"trains this model. Received: optimizers={[type(o).__name__ for o in opts]}"
            )
        params += [p for p in self.model_params.values() if p.requires_grad and id(p) not in seen]
        self.optimizers = opts
        self.params = params
        self.groups_seen = _group_sizes(opts)

    def attach(self) -> None:
        """Register the forward hook that records the logits' min and max."""
        if self._hook is not None:
            return
        self.refresh_distributed()
        module = self.model
        if self.config.logits_module is not None:
            # The user's names ("head", "net.1") and torch.compile's ("_orig_mod.head").
            modules = {**named_modules(self.model), **named_modules(eager_module(self.model))}
            if self.config.logits_module not in modules:
                raise ValueError(
                    f"`logits_module` names no submodule of the model. Received: "
                    f"logits_module={self.config.logits_module!r}; submodules are "
                    f"{[n for n in modules if n][:20]}"
                )
            module = modules[self.config.logits_module]
        self._hook = module.register_forward_hook(GuardHook(self, "_on_output"))
        # The user loading a checkpoint mid-run (the best weights so far): a rollback must
        # not go back past it to an older snapshot. The next step takes a fresh one.
        loaded = GuardHook(self, "_state_loaded")
        self._load_hooks = [self.model.register_load_state_dict_post_hook(loaded)]
        for opt in self.optimizers:  # torch >= 2.2
            register = getattr(opt, "register_load_state_dict_post_hook", None)
            if register is not None:
                self._load_hooks.append(register(loaded))
        from nanguard._torch_replay import CallRecorder

        self.calls = CallRecorder(self)
        self.calls.attach(post_hook=module is not self.model)

    def refresh_distributed(self) -> None:
        """Notice a process group created after :meth:`attach` (cheap: called every step)."""
        import torch.distributed as dist

        if self.distributed or not (dist.is_available() and dist.is_initialized()):
            return
        self.distributed = dist.get_world_size() > 1
        self.session.rank = dist.get_rank()
        self.session.world_size = dist.get_world_size()

    def detach(self) -> None:
        self.last_batch = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []
        if self.calls is not None:
            self.calls.detach()

    def _state_loaded(self, *args: Any) -> None:
        self.snapshot_owed = True

    # -- per step -----------------------------------------------------------------------
    def reset_step(self) -> None:
        self.in_step = False
        self.micro_batches = 0  # of the open step: begun, not yet concluded
        self.inputs: Any = None
        self.targets: Any = None
        self.batch_targets: Any = None  # the latest micro-batch's targets
        self.output: torch.Tensor | None = None
        # The output tensor whose width is the class count: the logits, or with several
        # floating outputs and none named logits, the widest that fits the targets.
        self.class_output: torch.Tensor | None = None
        self.lmin: torch.Tensor | None = None
        self.lmax: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.labels_bad: torch.Tensor | None = None
        self.labels_rejected: str | None = None  # ids a loss's IndexError proved bad
        # id of a targets tensor whose bad class ids were zeroed -> (that tensor, a copy of
        # it as the loader gave it, n_classes); the ids are written back when the step ends
        self.original_labels: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.labels_given_back: set[int] = set()  # keys of original_labels written back
        self.early: EarlyStats | None = None  # the gradients' statistics at the last backward
        self.norm_stale = False  # the loop changed the gradients after their measurement
        self.backward_grads: list[tuple[torch.Tensor, int]] | None = None  # (grad, version)
        self.scored: torch.Tensor | None = None  # this step's scores_classes, when computed
        # With logits_module: the gradient the loss sent into that module's output (the
        # recorder keeps the model output's only), for scores_classes at the next step.
        self.logits_grad: torch.Tensor | None = None
        self.verdict: Verdict | None = None
        self.stepped: set[int] = set()  # ids of the optimizers that stepped in this step
        self.state_corrupt = False  # a snapshot due now found weights or state non-finite
        self.refused_now = False  # a snapshot due at this step's start was refused
        self.snapshot_new = False  # one was taken at this step's start (prior_snapshot before)
        self.updated = False  # this step's own update went into the weights (after_update)

    def begin_step(self, inputs: Any = None, targets: Any = None) -> None:
        self.reset_step()
        if _group_sizes(self.optimizers) != self.groups_seen:  # add_param_group since
            self.set_optimizers(self.optimizers)
            self.session.extra_meta["param_names"] = [self.names[p] for p in self.params]
            # The last snapshot predates the new group: a rollback to it would mix states.
            self.snapshot_owed = True
        self.in_step = True
        self.micro_batches = 1
        self.inputs = inputs
        self.targets = self.batch_targets = targets
        self.refresh_distributed()
        last = None if self.snapshot is None else self.snapshot.step
        if self.snapshot_owed or self.session.snapshot_due(last):
            self.take_snapshot(self.session.step, scheduled=not self.snapshot_owed)
            self.snapshot_owed = False  # after the copy: an interrupted one is owed still

    @property
    def open(self) -> bool:
        """A step begun and not yet concluded (it spans micro-batches)."""
        return self.micro_batches > 0

    def continue_step(self, inputs: Any = None, targets: Any = None) -> None:
        """Another micro-batch of the open step (gradient accumulation): its loss adds to
        the step's, its logits widen the step's min/max, and the step's batch becomes the
        list of its micro-batches (``inputs.0``, ``inputs.1``, ... in dumps)."""
        if self.micro_batches == 1:
            self.inputs, self.targets = [self.inputs], [self.targets]
        self.inputs.append(inputs)
        self.targets.append(targets)
        self.batch_targets = targets
        self.micro_batches += 1
        self.in_step = True

    def _on_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.calls is not None and module is self.model and self.calls.after(output):
            return  # a strategy's redirect: its output is the training step's, not the model's
        if not self.in_step:
            return
        out = first_float_tensor(output)
        if out is None:
            return
        if (self.batch_targets is not None and self.config.logits_module is not None
                and out.requires_grad and self.logits_grad is None
                and self.output_scores_classes and self.micro_batches <= 1):
            out.register_hook(self._keep_logits_grad)
        out = out.detach()
        self.output = out
        if self.batch_targets is not None:
            self.class_output = _class_scores(self.batch_targets, out, output)
            self._defuse_labels(self.class_output)
        lo, hi = torch.aminmax(out) if out.numel() else (out.new_tensor(0), out.new_tensor(0))
        self.lmin = lo if self.lmin is None else torch.minimum(self.lmin, lo)
        self.lmax = hi if self.lmax is None else torch.maximum(self.lmax, hi)

    def _keep_logits_grad(self, grad: torch.Tensor | None) -> None:
        if self.logits_grad is None and grad is not None:
            self.logits_grad = grad.detach()

    def _defuse_labels(self, out: torch.Tensor) -> None:
        """Out-of-range class ids, found and made harmless before the user's loss sees them.

        An out-of-range label makes the loss raise on the CPU and fire a device-side assert
        on CUDA, before any hook could act. So, without a transfer: the bad ids are set to 0
        in place, the step is marked bad (its loss becomes NaN in :meth:`measure`) and the
        original ids are kept for the slow path and the dump. Ranks agree on skipping it.
        Only when the batch holds one class-id tensor: with several (multi-task targets, or a
        Lightning batch of several loaders' pairs) which output scores which is unknown, and
        a valid id of another task must not be changed.
        """
        labels = [t for _, t in named_tensors(self.batch_targets, "targets")
                  if not (t.is_floating_point() or t.dtype == torch.bool or not t.numel())]
        if len(labels) != 1:
            return
        (t,) = labels
        dim = _class_dim(t, out)
        if (dim is None or not self.output_scores_classes or t.device != out.device
                or id(t) in self.original_labels):
            return
        n_classes = int(out.shape[dim])
        on_cpu = t.device.type == "cpu" and self.look_first_on_cpu
        if on_cpu:
            # No device to synchronise with on the CPU: look first, act only if bad.
            lo, hi = torch.aminmax(t)
            if int(lo) >= 0 and int(hi) < n_classes:
                return
        bad = _bad_labels(t, n_classes, self.ignore_index)
        self.scored = scored = scores_classes(self.last_output_grad, dim, n_classes)
        if scored is None and on_cpu and self.loss_errors_caught and not self.distributed:
            # No evidence yet (the first step): let the loss decide. A class-id loss raises
            # on the CPU, and the step context makes that a target_invalid skip.
            return
        if scored is not None:
            if on_cpu and not bool(scored):
                # An embedding: its width is no class count (see scores_classes).
                self.output_scores_classes = False
                return
            bad &= scored  # on a GPU, without a transfer
        if on_cpu and not bool(bad.any()):
            return  # only ignored ids out of range (a segmentation mask's 255)
        self.original_labels[id(t)] = (t, t.clone(), n_classes)
        with unseen_by_autograd(t):
            t.masked_fill_(bad, 0)
        flag = bad.any()
        self.labels_bad = flag if self.labels_bad is None else self.labels_bad | flag

    def give_back_labels(self) -> None:
        """Write the original ids back into the targets defused in place (maybe a view of a
        dataset, or of the same token block as the inputs), once the step's losses have read
        them: at the step's verdict, before any dump is written, and when the step ends."""
        for key, (t, original, _) in self.original_labels.items():
            if key not in self.labels_given_back:
                with unseen_by_autograd(t):
                    t.copy_(original)
                self.labels_given_back.add(key)

    def ids_index_the_output(self) -> None:
        """The loss raised on this step's out-of-range ids: they do index the output, whatever
        its gradient suggested (:func:`scores_classes`)."""
        self.output_scores_classes = True
        self.scored = None

    def labels_rejected_by(self, error: BaseException) -> str | None:
        """The step's class ids that ``error``, raised by the loss, proves out of range
        (:func:`rejected_labels`); kept for the slow path."""
        self.labels_rejected = rejected_labels(self.targets, error, self.ignore_index,
                                               output_seen=self.output is not None)
        return self.labels_rejected

    def describe_label_faults(self) -> str | None:
        if self.labels_rejected is not None:
            return self.labels_rejected
        if not self.original_labels or (self.scored is not None and not bool(self.scored)):
            return None  # nothing defused, or (on a GPU) an embedding's ids, left alone
        for name, t in named_tensors(self.targets, "targets"):
            saved = self.original_labels.get(id(t))
            found = (None if saved is None
                     else _describe_labels(name, saved[1], saved[2], self.ignore_index))
            if found:
                return found
        return None

    def after_backward(self, scale: torch.Tensor | None = None) -> None:
        """Right after the step's backward (``guard.backward``): note each gradient's
        version, and, when the loop is known (or not yet known) to change the gradients
        before ``optimizer.step()`` (its own ``clip_grad_norm_``, ``scaler.unscale_``),
        reduce them now, so the recorded norms are the ones before that change (the
        contract's "before clipping"). ``scale``: the GradScaler's scale the loss was
        multiplied by (a device tensor, read with the step's other numbers)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        self.backward_grads = [(g, g._version) for g in grads]
        if self.measure_at_backward is False:
            self.early = None
            return
        with torch.no_grad():
            red = reduce_each(grads, _cpu_sq) if grads else Reduced([], [])
        self.early = EarlyStats([p.grad is not None for p in self.params], red, scale)

    def _grads_changed_since_backward(self, grads: list[torch.Tensor]) -> bool:
        seen, self.backward_grads = self.backward_grads, None
        changed = seen is not None and (len(seen) != len(grads) or any(
            g is not t or g._version != v for g, (t, v) in zip(grads, seen, strict=True)))
        if seen is not None and not self.measure_at_backward:
            self.measure_at_backward = changed
        return changed

    def add_loss(self, loss: torch.Tensor, gradient: Any = None) -> None:
        """Add a backward's loss to the step's; ``gradient``: the weights that backward was
        given for a non-scalar loss (``loss.backward(gradient=w)`` backpropagates the sum of
        ``w * loss``, and that sum is the loss recorded)."""
        if (not self.anomaly_warned and torch.is_anomaly_enabled()
                and getattr(torch, "is_anomaly_check_nan_enabled", lambda: True)()):
            self.anomaly_warned = True
            warnings.warn(
                "nanguard: autograd's anomaly mode is on (torch.autograd.detect_anomaly, or "
                "Trainer(detect_anomaly=True)). It raises inside the backward on the first "
                "NaN, before nanguard can check the step: a bad step then ends the run with "
                "its RuntimeError, unskipped, with no rollback and no dump. nanguard names "
                "the first bad layer itself (cause and where in its dump): turn anomaly "
                "mode off.",
                RuntimeWarning,
                stacklevel=3,
            )
        loss = loss.detach()
        if isinstance(gradient, torch.Tensor) and gradient.shape == loss.shape:
            # In the wide dtype: a float16 product can overflow where backward's does not.
            wide = _wide(loss.dtype)
            loss = loss.to(wide) * gradient.detach().to(loss.device, wide)
        if loss.ndim or loss.dtype != _wide(loss.dtype):
            loss = loss.to(_wide(loss.dtype)).reshape(-1).sum()
        self.loss = loss if self.loss is None else self.loss + loss

    def measure(self) -> StepRecord:
        """The hot path: every number the core needs, in one device-to-host transfer.

        One stack holds the loss, the logits' range, a statistic per gradient (its squared
        L2 norm, or its norm) and the previous update's weight check (:meth:`after_update`);
        norms, the global norm and the check's verdict are read from it on the host.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        dev = grads[0].device if grads else self.params[0].device
        nan = _nan(dev)
        early, self.early = self.early, None
        changed = self._grads_changed_since_backward(grads)
        # The recorded norm is the one before the loop's change (its own clip_grad_norm_):
        # the guard's clip must read the gradients as the optimizer will.
        self.norm_stale = early is not None and changed
        if early is not None:  # measured at the backward, before the loop changed them
            red, present, scale = early.red, early.present, early.scale
        else:
            red = reduce_each(grads, _cpu_sq) if grads else Reduced([], [])
            present, scale = [p.grad is not None for p in self.params], None
        loss = self.loss if self.loss is not None else nan
        if self.labels_bad is not None:
            loss = torch.where(self.labels_bad.to(loss.device), nan.to(loss.device), loss)
        pending = self.pending_update or []
        stats = stack_on([
            loss,
            self.lmin if self.lmin is not None else nan,
            self.lmax if self.lmax is not None else nan,
            *red.values,
            *pending,
            *([] if scale is None else [scale]),
        ], dev)
        n = len(red.values)
        if self.distributed:
            stats = torch.cat([stats, self._agree(stats, red.squared, len(pending))])
        values = stats.tolist()
        found = values[3:3 + n]
        if scale is not None:  # statistics of the scaled gradients: unscale them
            s = values[3 + n + len(pending)]
            found = [v / (s * s) if sq else v / s for v, sq in zip(found, red.squared,
                                                                  strict=True)]
        wide = any(v.dtype == torch.float64 for v in red.values)
        layer = norms_of(found, red.squared)
        total = total_norm(found, red.squared, wide=wide) if any(present) else math.nan
        if self.distributed:
            flags = values[-4:]
            self.update_was_bad = flags[2] == 1.0
            self.any_rank_bad, self.any_rank_loss_bad = bool(flags[0]), bool(flags[1])
            if flags[3] and self.snapshot_new:
                # Another rank refused the snapshot this one took: every rank keeps the one
                # before, so that a rollback lands on the same step everywhere.
                self.snapshot = self.prior_snapshot
        else:
            self.update_was_bad = not all(map(math.isfinite, values[3 + n:3 + n + len(pending)]))
            if self.update_was_bad:
                # The fast check can be a false alarm (a sum past float range): confirm.
                self.update_was_bad = not all_finite(self.trained_params())
            self.any_rank_bad = self.any_rank_loss_bad = None
        self.pending_update = None
        if not self.update_was_bad:
            self.last_batch = None  # its update is finite: the batch is not needed
        self.prior_snapshot, self.snapshot_new = None, False
        self.measured_lrs = lrs = [g.get("lr", math.nan)
                                   for opt in self.optimizers for g in opt.param_groups]
        return StepRecord(
            step=self.session.step,
            loss=values[0],
            logits_min=values[1],
            logits_max=values[2],
            grad_norm=total,
            lr=_float(lrs[0]) if lrs else math.nan,
            layer_grad_norms=_layer_norms(present, layer),
        )

    def _agree(self, stats: torch.Tensor, squared: list[bool], n_pending: int) -> torch.Tensor:
        """Under DDP every rank must take the same action: four flags all-reduced (MAX) in
        the step's transfer: any rank bad, any rank's loss non-finite, any rank's last update
        bad, any rank's snapshot refused at this step's start (a rank-local fault: the
        evidence is exchanged on the slow path)."""
        import torch.distributed as dist

        n = len(squared)
        loss_bad = ~stats[0].isfinite()
        grads = stats[3:3 + n]
        if n:
            sq = torch.tensor(squared, device=stats.device)
            grads_bad = ~torch.where(sq, grads, grads * grads).sum().isfinite()
        else:
            grads_bad = torch.ones_like(loss_bad)  # no gradient: a NaN norm, as on one rank
        update_bad = (~stats[3 + n:3 + n + n_pending].isfinite()).any()
        local_bad = loss_bad | grads_bad | update_bad
        if self.state_corrupt:
            local_bad = torch.ones_like(local_bad)
        refused = torch.full_like(local_bad, self.refused_now)
        flags = torch.stack([local_bad, loss_bad, update_bad, refused]).to(stats.dtype)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def warn_if_no_output(self, message: str) -> None:
        """Once per engine: a step ended without the logits source's output being seen, so
        its range is not recorded (and causes that depend on it cannot be told apart)."""
        if self.output is not None or self.warned_no_output:
            return
        self.warned_no_output = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def decide(self, *, bad: bool | None = None, record: StepRecord | None = None) -> Verdict:
        """Measure (unless ``record`` was measured already), let the core decide, and carry
        the verdict out (except raising)."""
        self.give_back_labels()  # the loss has read them; the dump and callbacks see the batch
        if record is None:
            record = self.measure()
        if bad is None and self.any_rank_bad is not None:
            bad = self.any_rank_bad or None
        verdict = self.session.conclude(
            record, TorchProbe(self), bad=bad, update_nonfinite=self.update_was_bad,
            corrupt=self.state_corrupt, has_snapshot=self.snapshot is not None,
        )
        self.carry_out(verdict)
        self.verdict = verdict
        return verdict

    def loss_bad(self, record: StepRecord) -> bool:
        """Whether the step's loss is non-finite: on any rank, under DDP (as agreed in
        :meth:`measure`), so that every rank branches the same way."""
        if self.distributed:
            return bool(self.any_rank_loss_bad)
        return not math.isfinite(record.loss)

    def scaler_skipped(self, record: StepRecord, used_scale: Callable[[], float]) -> bool:
        """Finite loss, non-finite gradients under a GradScaler: the scaler's own skip.

        The scaler found the Inf/NaN when it unscaled the gradients, skips (or skipped)
        ``optimizer.step()`` and lowers its scale; that is AMP working, not a nanguard event.
        Such a step is kept in the history with ``cause="amp_scaler_skip"`` and no action.
        Not once the scale is below 1: gradients still non-finite then are so unscaled (a
        NaN from the backward, not a float16 overflow the scaler can fix), which would
        otherwise be skipped silently for the rest of the run while the scale falls to 0.
        ``used_scale``: the scale this step's gradients were computed at (read on this slow
        path only).
        """
        if self.loss_bad(record) or math.isfinite(record.grad_norm) or self.update_was_bad:
            return False
        scale = used_scale()
        if scale < 1.0:
            self.amp_scale = scale
            return False
        self.session.skipped_by_scaler(record)
        self.verdict = None
        return True

    def carry_out(self, verdict: Verdict) -> None:
        decision = verdict.decision
        if decision.blocks_update:
            self.drop_grads()
        if verdict.restores and self.snapshot is not None:
            self.snapshot.restore(self.model, self.optimizers)
            self.refusal_reported = False  # finite again: a new fault is a new event
        elif decision.blocks_update and self.snapshot is not None:
            # The bad step's forward already ran: a NaN batch leaves BatchNorm's running
            # statistics NaN (training goes on on batch statistics, evaluation would not).
            self.snapshot.restore_buffers(self.model, self.nonfinite_buffers())
            if decision.repair:
                self.snapshot.restore_params(self.model, self.optimizers, self.params_to_repair())
        if decision.lower_lr:
            self.lower_lr(self.config.lr_factor)
        if decision.action is None and self.config.clip_grad_norm is not None:
            self.clip(verdict.record.grad_norm)

    def clip(self, total: float) -> None:
        max_norm = self.config.clip_grad_norm
        assert max_norm is not None
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.norm_stale and grads:
            # The loop changed the gradients after their measurement (its own
            # clip_grad_norm_, or a GradScaler's unscale_): scale by their norm now, on the
            # device (one more pass, no sync), as the optimizer will read them.
            with torch.no_grad():
                red = reduce_each(grads, _cpu_sq)
                values = stack_on(red.values, grads[0].device)
                squared = torch.tensor(red.squared, device=values.device)
                norms = torch.where(squared, values.sqrt(), values)
                # Scaled by the largest first: a float32 sum of squares overflows for a
                # global norm past ~1.8e19, where the host's (float64) does not.
                top = norms.max()
                top = torch.where(top > 0, top, torch.ones_like(top))
                now = top * ((norms / top) ** 2).sum().sqrt()
                self._scale_grads(grads, (max_norm / (now + 1e-6)).clamp(max=1.0))
        elif total > max_norm:
            self._scale_grads(grads, max_norm / (total + 1e-6))

    @staticmethod
    def _scale_grads(grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            if g.layout == torch.strided:
                by_device.setdefault(g.device, []).append(g)
            else:  # sparse: no fused kernel
                g.mul_(factor.to(g.device) if isinstance(factor, torch.Tensor) else factor)
        for device, dense in by_device.items():
            torch._foreach_mul_(dense, factor.to(device) if isinstance(factor, torch.Tensor)
                                else factor)

    def drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def after_update(self) -> None:
        """After an applied update: one statistic per updated weight (non-finite when the
        weight is), read with the next step's numbers, without a transfer now (on the CPU
        without a process group, right after: :meth:`check_update_now`)."""
        if self.verdict is not None and self.verdict.action is not None:
            return
        touched = [p for p in self.params if p.grad is not None]
        if not touched:  # nothing moved (a Lightning step whose training_step returned None)
            return
        with torch.no_grad():  # the parameters the update touched: those with a gradient
            values = reduce_each(touched, _cpu_sum).values
        # An earlier update's check of this step (another optimizer's), still unread.
        self.pending_update = (self.pending_update or []) + values
        self.updated = True
        self.update_lrs = self.measured_lrs

    def check_update_now(self) -> Verdict | None:
        """Right after an update (the optimizer's post-step hook), when its check reads
        without a wait (:meth:`update_readable_now`): :meth:`check_last_update` now, with
        this step's batch for the event."""
        if not self.update_readable_now():
            return None
        self._keep_batch()
        return self.check_last_update()

    def _keep_batch(self) -> None:
        """Hold the step's batch until its update is found finite (the event's batch)."""
        self.last_batch = (self.inputs, self.targets)
        self.last_versions = {id(t): t._version for obj in self.last_batch
                              for _, t in named_tensors(obj, "")}

    def update_readable_now(self) -> bool:
        """Whether the last update's check is waiting and reads without a device sync
        (CPU tensors, no process group to agree with): then it is read right after the
        update."""
        pending = self.pending_update or []
        return (bool(pending) and not self.distributed
                and all(v.device.type == "cpu" for v in pending))

    def check_last_update(self) -> Verdict | None:
        """Read the last update's check now instead of at the next step (one transfer):
        before an evaluation, a checkpoint or the end of training, which must not see
        weights that update made non-finite. On a bad update: the event, and the rollback."""
        pending, self.pending_update = self.pending_update, None
        bad = pending is not None and not all(
            map(math.isfinite, stack_on(pending, pending[0].device).tolist()))
        if self.distributed:  # every rank calls this at the same point; agree
            import torch.distributed as dist

            agreed = torch.tensor([float(bad)], device=self.params[0].device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            bad = bool(agreed.item())
        elif bad:  # the fast check can be a false alarm (a sum past float range)
            bad = not all_finite(self.trained_params())
        if not bad or not self.session.history:
            self.last_batch = None
            return None
        self.update_was_bad = True
        try:
            verdict = self.session.conclude_late_update(
                TorchProbe(self), has_snapshot=self.snapshot is not None)
        finally:
            self.update_was_bad = False
        self.carry_out(verdict)
        return verdict

    def keep_open(self) -> None:
        """A step's context ended with a loss and no hooked ``optimizer.step()``: gradient
        accumulation, the step goes on in the next context. A step open for ``OPEN_WARN``
        contexts is more likely an optimizer the guard does not hook (created again in a
        notebook cell, under the old guard): its updates go unguarded, and the open step
        keeps every batch. Warned once."""
        self.accumulates = True
        if self.micro_batches == OPEN_WARN:
            warnings.warn(
                f"A guard.step() has gone on for {OPEN_WARN} contexts with no "
                "optimizer.step() this guard hooks, keeping every batch. If an optimizer "
                "the guard does not watch is stepping the model (was the optimizer created "
                "again?), its updates go unguarded: create NanGuard(model, optimizer) with "
                "it, and close the old guard.",
                RuntimeWarning,
                stacklevel=4,
            )

    def end_step(self, *, keep_open: bool = False) -> None:
        """Leave the step's context; ``keep_open``: the step goes on in the next one
        (gradient accumulation), its loss, logits range and batch kept."""
        self.in_step = False
        if keep_open:
            return
        self.micro_batches = 0
        self.give_back_labels()
        if self.updated and self.pending_update is not None:
            self._keep_batch()  # this step's update, to be checked: its batch until then
        elif self.pending_update is None:  # no update left unchecked (an earlier
            self.last_batch = None            # one stays with its own batch)
        self.inputs = self.targets = self.batch_targets = self.output = None
        self.class_output = None
        self.original_labels, self.labels_given_back = {}, set()
        self.labels_rejected = None
        if self.logits_grad is not None:
            self.last_output_grad, self.logits_grad = self.logits_grad, None
        if self.calls is not None:
            calls = self.calls.calls
            grads = calls[0].output_grads if calls and self.config.logits_module is None else {}
            # At most one: the logits' (CallRecorder.after).
            self.last_output_grad = next(iter(grads.values()), self.last_output_grad)
            self.calls.clear()

    # -- state --------------------------------------------------------------------------
    def trained_params(self) -> list[torch.Tensor]:
        """The guarded parameters autograd trains (those an update can touch), detached."""
        return [p.detach() for p in self.params if p.requires_grad]

    def frozen_params(self) -> list[torch.Tensor]:
        """The model's and optimizers' floating parameters autograd does not train
        (``requires_grad=False``: a frozen backbone, a mask kept as a parameter). No update
        touches them, so the per-step update check leaves them out; a snapshot holds them and
        a rollback restores them, so the snapshot check and the slow path look at them, for
        NaN only: an Inf in one may be intended (a causal mask of ``-inf``)."""
        seen: set[int] = set()
        out = []
        for p in [*self.params, *self.model_params.values()]:
            if not p.requires_grad and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def weights_finite(self) -> bool:
        """Whether a snapshot taken now would be finite: the trained parameters and the
        optimizers' state hold no NaN/Inf, and frozen parameters no NaN. Buffers are left
        out: one may hold ``-inf`` on purpose (an attention mask), and a bad step's forward
        writes them (they are repaired after it)."""
        tensors = self.trained_params()
        for opt in self.optimizers:
            for st in opt.state.values():
                tensors += [
                    v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
                ]
        frozen = self.frozen_params()
        if frozen and bool(torch.stack([p.detach().isnan().any() for p in frozen]).any()):
            return False
        return bool(maybe_finite(tensors)) or all_finite(tensors)

    def params_to_repair(self) -> list[torch.Tensor]:
        """The parameters a skip's repair puts back (slow path only): those holding NaN/Inf
        (frozen ones: NaN), or whose optimizer state does, and those the bad update blew up
        while leaving them finite (``detector.blew_up`` against the snapshot's copy: the
        same update that took one weight to Inf takes others to 1e38, which would keep every
        later step bad)."""
        found = [p for p in self.params if p.requires_grad and not all_finite([p.detach()])]
        if self.snapshot is not None:
            found += [p for p in self.snapshot.blown_up(self.model)
                      if p.requires_grad and all(p is not q for q in found)]
        found += [p for p in self.frozen_params() if bool(p.detach().isnan().any())]
        for opt in self.optimizers:
            for p, st in opt.state.items():
                tensors = [v for v in st.values()
                           if isinstance(v, torch.Tensor) and v.is_floating_point()]
                if tensors and not all_finite(tensors) and all(p is not q for q in found):
                    found.append(p)
        return found

    def weight_peaks(self) -> list[tuple[str, float]]:
        """Each trained parameter's name and largest ``|w|`` (one transfer)."""
        params = [p for p in self.params
                  if p.requires_grad and p.numel() and p.layout == torch.strided]
        if not params:
            return []
        with torch.no_grad():
            peaks = stack_on([p.detach().abs().max() for p in params], params[0].device)
        return [(self.names.get(p, "?"), v)
                for p, v in zip(params, peaks.tolist(), strict=True)]

    def nonfinite_buffers(self) -> list[str]:
        """Floating buffers the step left non-finite (slow path only), by ``state_dict`` key:
        those holding NaN, or an Inf where the snapshot's copy is finite. An Inf that the
        snapshot holds at the same place is intended (a ``-inf`` mask, a running max that
        starts at ``-inf``): such a buffer is neither repaired nor reported."""
        saved = self.snapshot.model if self.snapshot is not None else {}
        found = []
        for name, buf in self.model.named_buffers():
            if not buf.is_floating_point() or bool(torch.isfinite(buf).all()):
                continue
            was = saved.get(name)
            if not detector.inf_as_before(to_numpy(buf, 2**62),
                                          None if was is None else to_numpy(was, 2**62)):
                found.append(name)
        return found

    def take_snapshot(self, step: int, *, scheduled: bool = True) -> bool:
        """A snapshot, if the state is finite. If not, nothing else would notice: the per-step
        checks read the gradients and the updated weights, not the optimizer state (Adam's
        second moment overflowing float16, a corrupt optimizer checkpoint) nor frozen
        parameters; so the step is concluded as bad (``corrupt``), once until a snapshot is
        taken again. Finite weights that one update blew up are not taken either
        (:meth:`GuardSession.admit_snapshot`)."""
        if not self.weights_finite():
            self.refused_now = True
            if not self.refusal_reported:
                self.refusal_reported = self.state_corrupt = True
            return False
        self.refusal_reported = False
        peaks = [v for _, v in self.weight_peaks()]
        if not self.session.admit_snapshot(max(peaks, default=0.0), scheduled=scheduled):
            return False
        if self.distributed:  # kept until this step's measure: another rank may refuse
            self.prior_snapshot, self.snapshot_new = self.snapshot, True
        self.snapshot = Snapshot(step, self.model, self.optimizers)
        return True

    def lr_of(self, name: str | None) -> float | None:
        """Learning rate of the group holding the parameter called ``name``, as it was for
        the last applied update (a scheduler may have moved it since)."""
        groups = [g for opt in self.optimizers for g in opt.param_groups]
        lrs = self.update_lrs or [g.get("lr", math.nan) for g in groups]
        for group, lr in zip(groups, lrs, strict=False):
            if any(self.names.get(p) == name for p in group["params"]):
                return _float(lr)
        return None

    def lower_lr(self, factor: float) -> None:
        """Multiply every group's learning rate, and the schedulers' bases, by ``factor``."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr"):
                    if key in group:
                        group[key] = _scaled(group[key], factor)
            scaled: set[int] = set()  # SequentialLR's children hold the optimizer too
            for sched in _schedulers_of(opt):
                for child in [sched, *getattr(sched, "_schedulers", [])]:
                    if id(child) in scaled:
                        continue
                    scaled.add(id(child))
                    for attr in ("base_lrs", "max_lrs", "_last_lr", "min_lrs"):
                        values = getattr(child, attr, None)
                        if isinstance(values, list):
                            setattr(child, attr, [_scaled(v, factor) for v in values])
                    # The floor a cosine schedule anneals toward (it would climb back to it).
                    if isinstance(getattr(child, "eta_min", None), (int, float)):
                        child.eta_min = _scaled(child.eta_min, factor)

    def state_arrays(self) -> dict[str, Callable[[], np.ndarray]]:
        """The model's and optimizer's state for a dump, each array made when it is
        written (a GPU model's state is never all in host memory at once)."""
        state = eager_module(self.model).state_dict()
        out: dict[str, Callable[[], np.ndarray]] = {
            f"model.{k}": functools.partial(to_numpy, v, 2**62) for k, v in state.items()}
        for i, opt in enumerate(self.optimizers):
            prefix = "optimizer." if len(self.optimizers) == 1 else f"optimizer{i}."
            for p in _opt_params(opt):
                for key, value in opt.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        name = self.names.get(p) or str(id(p))
                        out[f"{prefix}{name}.{key}"] = functools.partial(to_numpy, value, 2**62)
        return out


OPEN_WARN = 1024  # contexts of one open step before keep_open warns


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _scaled(value: Any, factor: float) -> Any:
    return value * factor  # a float, or a tensor LR kept a tensor


_BLAS_DTYPES = (torch.float32, torch.float64)
# A CPU tensor gets a BLAS kernel of its own (a dot product, a sum) when it is large, or when
# the list holds at most this many small ones: one kernel call costs a few microseconds,
# ``_foreach_norm``'s CPU loop tens, and reads a large tensor at about half speed.
_FEW = 8
_BIG = 1 << 16  # elements: a CPU tensor this large always gets a kernel of its own

_NANS: dict[torch.device, torch.Tensor] = {}


def _nan(device: torch.device) -> torch.Tensor:
    """A cached NaN scalar per device (read only: never written in place)."""
    if device not in _NANS:
        _NANS[device] = torch.full((), math.nan, device=device)
    return _NANS[device]


def _cpu_sq(t: torch.Tensor) -> torch.Tensor:
    """The squared L2 norm (sum of squares, accumulated in the tensor's dtype: it overflows
    to Inf as ``clip_grad_norm_``'s float32 norm does)."""
    flat = t.view(-1)
    return torch.dot(flat, flat)


def _cpu_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum()


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a statistic of a ``dtype`` tensor is kept in: float64 for float64 (a
    finite float64 loss or norm past 3.4e38 is not Inf), float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Reduced(NamedTuple):
    """One 0-d statistic per tensor, in order, not yet stacked (the hot path stacks them
    with the step's other numbers, for one transfer): non-finite when the tensor is.

    ``squared[i]``: ``values[i]`` is a squared L2 norm (a BLAS dot product; its square root
    is taken on the host), else a norm or, for a weight check, a sum.
    """

    values: list[torch.Tensor]
    squared: list[bool]


class EarlyStats(NamedTuple):
    """The gradients' statistics taken right after the backward (``after_backward``).

    ``present[i]``: parameter ``i`` had a gradient then; ``scale``: the GradScaler's scale
    the gradients carry (divided out on the host), or None.
    """

    present: list[bool]
    red: Reduced
    scale: torch.Tensor | None


def reduce_each(
    tensors: list[torch.Tensor], big_cpu: Callable[[torch.Tensor], torch.Tensor]
) -> Reduced:
    """One number per tensor that is non-finite when the tensor is (float32; float64 for a
    float64 tensor), each in its tensor's dtype family and on its device.

    Dense CPU float32/float64 tensors get ``big_cpu`` each (a BLAS dot product or a sum,
    which read memory at full speed), when large or when there are few of them; the rest
    go through one fused ``_foreach_norm`` per (device, dtype) group: the fewest launches
    on an accelerator, and one call for a model's many small biases and norms on the CPU.
    The MLP of ``benchmarks/overhead_torch.py`` is memory-bound on the CPU, and these
    passes, with the calls around them, are most of the guard's cost there. A sparse
    gradient (``Embedding(sparse=True)``) makes the kernels raise; then the sparse tensors
    are replaced by their values and the reduction runs again, so dense models pay nothing
    for the check.
    """
    try:
        return _reduce_strided(tensors, big_cpu)
    except (RuntimeError, NotImplementedError):
        if all(t.layout == torch.strided for t in tensors):
            raise
    dense = [t if t.layout == torch.strided else _sparse_values(t) for t in tensors]
    return _reduce_strided(dense, big_cpu)


def _reduce_strided(
    tensors: list[torch.Tensor], big_cpu: Callable[[torch.Tensor], torch.Tensor]
) -> Reduced:
    blas = [t.is_cpu and t.dtype in _BLAS_DTYPES and t.is_contiguous() for t in tensors]
    few = sum(blas) <= _FEW
    out: list[torch.Tensor | None] = [None] * len(tensors)
    squared = [False] * len(tensors)
    sq = big_cpu is _cpu_sq
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if blas[i] and (few or t.numel() >= _BIG):
            out[i] = big_cpu(t)
            squared[i] = sq
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for (_, dtype), idx in groups.items():
        # 16-bit tensors get a float32 norm: a float16 one is Inf past 65504, with every
        # entry finite.
        acc = torch.float32 if dtype.itemsize < 4 else None
        norms = torch._foreach_norm([tensors[i] for i in idx], 2.0, dtype=acc)
        for i, n in zip(idx, norms, strict=True):
            out[i] = n
    return Reduced([n for n in out if n is not None], squared)


def stack_on(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``torch.stack`` of 0-d statistics, promoted to one dtype (float32, or float64 when
    one is float64); those on another device (a model spread over GPUs) are moved first."""
    try:
        return torch.stack(values)
    except RuntimeError:
        dtype = max((_wide(v.dtype) for v in values), key=lambda d: d.itemsize)
        return torch.stack([v.to(device, dtype) for v in values])


def norms_of(values: list[float], squared: list[bool]) -> list[float]:
    """Host-side L2 norms from :class:`Reduced` values read back (square roots taken)."""
    return [math.sqrt(v) if sq else v for v, sq in zip(values, squared, strict=True)]


def total_norm(values: list[float], squared: list[bool], *, wide: bool) -> float:
    """The global L2 norm from per-tensor values read back. Not ``wide`` (float32 norms): a
    total past float32's range is Inf, as the float32 norm ``clip_grad_norm_`` computes."""
    total = math.sqrt(sum(v if sq else v * v for v, sq in zip(values, squared, strict=True)))
    return total if wide or math.isnan(total) or total <= _F32_MAX else math.inf


_F32_MAX = float(torch.finfo(torch.float32).max)


def _sparse_values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse gradient (``Embedding(sparse=True)``), duplicates
    summed first so that their norm is the gradient's."""
    return t.coalesce().values() if t.is_sparse else t.values()


def grad_norms(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The L2 norm of each gradient, as one float32 (float64) tensor on ``device``."""
    red = reduce_each(grads, _cpu_sq)
    values = [v.sqrt() if sq else v for v, sq in zip(red.values, red.squared, strict=True)]
    return stack_on(values, device).to(device)


def maybe_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device-side flag, no sync: True means every tensor is finite.

    Sums and L2 norms propagate NaN and Inf and run vectorised (the inf-norm is ~15x slower
    on the CPU). False can also mean a sum or norm past float32's range with finite
    entries: confirm with :func:`all_finite` before acting.
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    values = reduce_each(tensors, _cpu_sum).values
    return stack_on(values, values[0].device).isfinite().all()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Exact check, element by element (slow path only)."""
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


def _layer_norms(present: list[bool], norms: list[float]) -> list[float]:
    if all(present):
        return norms
    it = iter(norms)
    # A parameter the loss did not reach has no gradient: 0.0, not a non-finite norm that
    # `where` would blame, or that would make every step look unhealthy to layer_growth.
    return [next(it) if has else 0.0 for has in present]


def _makes_no_nan(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a built-in ``torch.optim`` one whose update of finite numbers
    never makes a NaN (``detector.NAN_FREE_UPDATES``; every group's ``eps`` > 0 and its
    numeric settings finite: an infinite rate times a zero gradient is NaN)."""
    cls = type(optimizer)
    if not (cls.__name__ in detector.NAN_FREE_UPDATES
            and cls.__module__.startswith("torch.optim")):
        return False
    for group in optimizer.param_groups:
        numbers = [_float(v) for k, v in group.items() if k != "params"
                   and (isinstance(v, (int, float)) and not isinstance(v, bool)
                        or isinstance(v, torch.Tensor) and v.numel() == 1)]
        numbers += [b for v in group.values() if isinstance(v, tuple)
                    for b in v if isinstance(b, float)]  # betas
        if not all(map(math.isfinite, numbers)) or _float(group.get("eps", 1.0)) <= 0:
            return False
    return _vanishing_eps(optimizer) is None


def _vanishing_eps(optimizer: Any) -> dict[str, Any] | None:
    """A group's ``eps`` that is 0 in its parameters' dtype (``detector.eps_vanishes``):
    ``{"eps": ..., "dtype": ...}``, or None."""
    for group in optimizer.param_groups:
        found = detector.vanishing_eps(
            group.get("eps"), (str(p.dtype).removeprefix("torch.") for p in group["params"]))
        if found is not None:
            return found
    return None


def _bounded_step(optimizer: Any, lrs: list[float]) -> bool:
    """Whether ``optimizer`` is a built-in ``torch.optim`` one whose step of each weight is
    bounded by its learning rate (``detector.bounded_step``) in every group, at the rates
    ``lrs`` it stepped with (one per group)."""
    cls = type(optimizer)
    if not cls.__module__.startswith("torch.optim") or len(lrs) != len(optimizer.param_groups):
        return False
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        betas = group.get("betas", (0.0, group.get("alpha", 0.0)))
        decoupled = cls.__name__ == "AdamW" or group.get("decoupled_weight_decay", False)
        if not detector.bounded_step(
                cls.__name__, lr=_float(lr), eps=_float(group.get("eps", 0.0)),
                beta1=_float(betas[0]), beta2=_float(betas[1]),
                momentum=_float(group.get("momentum", 0.0)),
                centered=bool(group.get("centered", False)),
                decay=_float(group.get("weight_decay", 0.0)) if decoupled else 0.0):
            return False
    return True


class TorchProbe:
    """The slow path: looks closely at a bad step (batch, weights, optimizer state)."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.replayed: dict[str, np.ndarray] = {}
        # The non-finite weight or optimizer state the evidence names, for the dump.
        self.found_state: tuple[str, torch.Tensor] | None = None
        self.bad_call = 0  # the model call whose arguments were non-finite
        self.rows: tuple[int, int] | None = None  # rows every batch tensor keeps in the dump

    def evidence(self, record: StepRecord) -> detector.Evidence:
        e = self.engine
        ev = detector.Evidence()
        buffers = e.nonfinite_buffers()
        if buffers:  # restored from the snapshot when the step is skipped (carry_out)
            ev.details["nonfinite_buffers"] = [clean_name(b) for b in buffers[:20]]
        if e.amp_scale is not None:
            ev.details["amp_scale"], e.amp_scale = e.amp_scale, None
        if e.output is not None:
            ev.logits_dtype = str(e.output.dtype).replace("torch.", "")
        ev.logits_seen = e.lmin is not None
        ev.where = e.logits_name
        if e.scored is not None and not bool(e.scored):  # on a GPU, known only now
            e.output_scores_classes = False
        ev.target_invalid = e.describe_label_faults() or check_targets(
            e.targets, e.class_output if e.class_output is not None else e.output,
            e.ignore_index, classes=e.output_scores_classes)
        if not ev.target_invalid and not math.isfinite(record.loss):
            peaks = [float(t.detach().abs().max()) for _, t in named_tensors(e.targets, "")
                     if t.is_floating_point() and t.numel() and t.layout == torch.strided]
            if peaks:  # huge finite targets (a missing-value sentinel) overflow a loss
                ev.details["targets_peak"] = max(peaks)
        if e.update_was_bad:
            ev.update_nonfinite = True
            ev.weights_nonfinite = self._first_nonfinite_state()
            # Finite gradients keep a float32 optimizer state finite (their float32 norm
            # overflows first): such state that is not was so before the update, which only
            # spread it. A 16-bit state can overflow in the update itself: not concluded.
            # Nor when the loop changes the gradients after they were measured (its own
            # clipping, a division): the optimizer may have used non-finite ones.
            weight = self.found_state
            measured = not (e.measure_at_backward or e.grads_may_change_after_measure)
            if not measured:
                ev.details["grads_changed_after_measure"] = True
            vanishing = next(filter(None, map(_vanishing_eps, e.optimizers)), None)
            if vanishing is not None:
                ev.details["eps_vanishes"] = vanishing
            state = self._first_nonfinite_optimizer_state(wide_only=True) if measured else None
            if state:
                ev.details["optimizer_state_nonfinite"] = state
            elif (weight is not None and measured
                  and bool(weight[1].detach().isnan().any())
                  and all(map(_makes_no_nan, e.optimizers))
                  and all(math.isfinite(_float(lr)) for lr in e.update_lrs or [math.nan])):
                ev.details["nan_before_update"] = True
                self.found_state = weight
            elif (weight is not None and measured and e.update_lrs
                  and weight[1].dtype in (torch.float32, torch.float64, torch.bfloat16)
                  and bool(weight[1].detach().isinf().any())
                  and self._bounded_steps(e.update_lrs)):
                ev.details["inf_before_update"] = True
                self.found_state = weight
            lr = e.lr_of(ev.weights_nonfinite.split(":")[0] if ev.weights_nonfinite else None)
            if lr is not None:
                ev.details["lr_of_where"] = lr
        else:
            ev.weights_nonfinite = self._first_nonfinite_state()
        self.bad_call = 0
        calls = e.calls.calls_for(record.step) if e.calls is not None else []
        for name, t in named_tensors(e.inputs, "inputs"):
            found = _describe_nonfinite(name, t)
            if found:
                ev.input_nonfinite = found
                # The dump's call to replay: the micro-batch's whose arguments hold it.
                self.bad_call = next((k for k, call in enumerate(calls) if any(
                    _describe_nonfinite("", t) for _, t in named_tensors(
                        (call.args, call.kwargs), ""))), 0)
                break
        else:
            ev.input_nonfinite = self._nonfinite_model_args(record.step)
        if not ev.input_nonfinite:
            detector.note_inputs_peak(ev, [
                float(t.detach().abs().max()) for _, t in named_tensors(e.inputs, "inputs")
                if t.is_floating_point() and t.numel() and t.layout == torch.strided])
        from nanguard._torch_replay import dump_rows, localize_step

        self.rows = dump_rows(e, calls)

        earlier = ev.input_nonfinite or ev.target_invalid or ev.weights_nonfinite
        run = not (earlier or ev.update_nonfinite)
        if e.distributed:  # all ranks replay or none: the model may run collectives
            import torch.distributed as dist

            flag = torch.tensor([float(run)], device=e.params[0].device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            run = bool(flag.item())
        self.replayed = localize_step(e, record, ev, run=run, start=self.bad_call,
                                      rows=self.rows)
        if run and (ev.activation or not math.isfinite(record.loss)
                    or not (detector.finite(record.logits_min)
                            and detector.finite(record.logits_max))):
            # Only these messages use it (huge finite weights point at the learning rate).
            detector.note_weights_peak(ev, e.weight_peaks())
        if math.isfinite(record.loss) and not math.isfinite(record.grad_norm):
            grads = [p.grad for p in e.params if p.grad is not None]
            if grads and all_finite([_sparse_values(g) if g.layout != torch.strided else g
                                     for g in grads]):
                ev.details["grad_entries_finite"] = True  # only their float32 norm overflowed
                if "weights_peak" not in ev.details:  # weights a spike blew up, maybe
                    detector.note_weights_peak(ev, e.weight_peaks())
        if e.distributed:
            ev = agree_across_ranks(e, record, ev)
        return ev

    def to_repair(self) -> list[str]:
        """The names of what a skip's repair puts back (``TorchEngine.params_to_repair``)."""
        e = self.engine
        return [e.names.get(p, "?") for p in e.params_to_repair()]

    def _bounded_steps(self, lrs: list[float]) -> bool:
        """Whether every optimizer's step was bounded by its rates ``lrs`` (the groups' in
        order, as :meth:`TorchEngine.measure` reads them)."""
        for opt in self.engine.optimizers:
            n = len(opt.param_groups)
            if not _bounded_step(opt, lrs[:n]):
                return False
            lrs = lrs[n:]
        return True

    def _nonfinite_model_args(self, step: int) -> str | None:
        """NaN/Inf in what the model was called with while the batch given to the guard is
        finite: code inside the step (a per-batch normalisation by a zero std) made them."""
        e = self.engine
        calls = e.calls.calls_for(step) if e.calls is not None else []
        if e.inputs is None:
            origin = "no batch was given to the guard"
        elif any(_describe_nonfinite(n, t) for n, t in named_tensors(e.targets, "targets")):
            origin = ("the inputs given to the guard are finite but its targets are not: the "
                      "model is called with data the guard was given as targets")
        else:
            origin = ("the batch given to the guard is finite, so the code in the step before "
                      "the model call made them")
        for k, call in enumerate(calls):
            # Named as the dump stores that call's arguments (see localize_step's `start`).
            named = [(f"replay.args.{i}", a) for i, a in enumerate(call.args)]
            named += [(f"replay.kwargs.{key}", v) for key, v in call.kwargs.items()]
            which = f" of the step's model call {k}" if k else ""
            if k and e.micro_batches > 1:
                which += f" (micro-batch {k})"
            for path, arg in named:
                for name, t in named_tensors(arg, path):
                    found = _describe_nonfinite(name, t)
                    if found:
                        self.bad_call = k
                        return f"{found}, in the model's arguments{which}; {origin}"
        return None

    def _first_nonfinite_state(self) -> str | None:
        e = self.engine
        for p in e.params:
            found = p.requires_grad and _describe_nonfinite(e.names.get(p, "?"), p.detach())
            if found:
                self.found_state = (e.names.get(p, "?"), p)
                return found
        frozen = e.frozen_params()
        if frozen and not bool(torch.stack([p.detach().isnan().any() for p in frozen]).any()):
            frozen = []  # one sync: a backbone is large
        for p in frozen:
            if bool(p.detach().isnan().any()):
                found = _describe_nonfinite(e.names.get(p, "?"), p.detach())
                self.found_state = (e.names.get(p, "?"), p)
                return f"{found}, a frozen parameter no optimizer steps; load a finite one"
        return self._first_nonfinite_optimizer_state()

    def _first_nonfinite_optimizer_state(self, *, wide_only: bool = False) -> str | None:
        """The first non-finite optimizer state tensor; ``wide_only``: float32 or wider."""
        e = self.engine
        for opt in e.optimizers:
            for p, st in opt.state.items():
                for key, value in st.items():
                    if (isinstance(value, torch.Tensor) and value.is_floating_point()
                            and (not wide_only or value.dtype.itemsize >= 4)):
                        name = f"optimizer.{e.names.get(p, '?')}.{key}"
                        found = _describe_nonfinite(name, value)
                        if found:
                            self.found_state = (name, value)
                            return found
        return None

    def tensors(self) -> dict[str, np.ndarray]:
        e = self.engine
        out: dict[str, np.ndarray] = {}
        if e.update_was_bad:
            # The event is the previous step's update, found now: its batch, not this
            # step's (whose output the broken weights made). None when the loop refilled
            # the same tensors in place (a static input buffer): they hold this step's data.
            inputs, targets = e.last_batch or (None, None)
            for obj, prefix in ((inputs, "inputs"), (targets, "targets")):
                for name, t in named_tensors(obj, prefix):
                    if t._version == e.last_versions.get(id(t)):  # not written since
                        out[name] = to_numpy(t)
                out.update(named_extras(obj, prefix))
            return {**out, **self._found_state()}
        for name, t in named_tensors(e.inputs, "inputs"):
            out[name] = to_numpy(t, rows=self.rows)
        for name, t in named_tensors(e.targets, "targets"):
            # as the loader gave them
            out[name] = to_numpy(e.original_labels.get(id(t), (t, t, 0))[1], rows=self.rows)
        for obj, prefix in ((e.inputs, "inputs"), (e.targets, "targets")):
            out.update((name, _rows_of(a, self.rows)) for name, a in named_extras(obj, prefix))
        if e.output is not None:
            out["output"] = to_numpy(e.output, rows=self.rows)
        out.update(self.replayed)
        out.update(self._found_state())
        return out

    def _found_state(self) -> dict[str, np.ndarray]:
        """The non-finite weight or optimizer state the event names, as ``localized.<name>``
        (its first rows, as the replay's localized tensors)."""
        if self.found_state is None:
            return {}
        from nanguard._torch_replay import LOCALIZED_BYTES

        name, t = self.found_state
        return {f"localized.{name}": to_numpy(t, LOCALIZED_BYTES)}

    def state(self) -> dict[str, Callable[[], np.ndarray]]:
        return self.engine.state_arrays()


def agree_across_ranks(
    engine: TorchEngine, record: StepRecord, ev: detector.Evidence
) -> detector.Evidence:
    """Make every rank report the same cause: the earliest in ``CAUSES`` over all ranks.

    Each rank classifies its own evidence, the ranks exchange it (slow path only, every rank
    is here because the "bad" flag was agreed in :meth:`TorchEngine.measure`), and all adopt
    the evidence and the loss/logits/grad-norm numbers of the rank whose cause comes first
    (ties: the lowest rank). Non-finite weights and a bad last update found on any rank count
    on every rank, so the ladder sees the same ``corrupt`` flag everywhere.
    """
    import dataclasses

    import torch.distributed as dist

    from nanguard.events import CAUSES

    # A rank whose own step is sound (finite numbers, no evidence: a label another rank
    # got wrong, whose defused loss left every gradient finite) has no cause of its own:
    # ranked after every cause, None in rank_causes (classify would fall through to one).
    sound = not detector.is_bad(record) and not (
        ev.input_nonfinite or ev.target_invalid or ev.weights_nonfinite
        or ev.update_nonfinite or ev.activation or ev.grad_where)
    cause = None if sound else detector.classify(record, ev, list(engine.session.history))[0]
    numbers = (record.loss, record.logits_min, record.logits_max, record.grad_norm)
    mine = (len(CAUSES) if cause is None else CAUSES.index(cause), engine.session.rank,
            dataclasses.asdict(ev), numbers)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    gathered.sort(key=lambda g: g[1])
    _, rank, fields, best = min(gathered, key=lambda g: (g[0], g[1]))
    agreed = detector.Evidence(**fields)
    agreed.weights_nonfinite = agreed.weights_nonfinite or next(
        (g[2]["weights_nonfinite"] for g in gathered if g[2]["weights_nonfinite"]), None
    )
    agreed.update_nonfinite = any(g[2]["update_nonfinite"] for g in gathered)
    agreed.details = {
        **agreed.details,
        "cause_rank": rank,
        "rank_causes": [CAUSES[g[0]] if g[0] < len(CAUSES) else None for g in gathered],
    }
    if rank != engine.session.rank:
        agreed.details["local_numbers"] = dict(
            zip(("loss", "logits_min", "logits_max", "grad_norm"), numbers, strict=True)
        )
        record.loss, record.logits_min, record.logits_max, record.grad_norm = best
    return agreed


Hook = Callable[..., Any]
