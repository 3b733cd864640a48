"""The Keras slow path: looks closely at a bad step (batch, weights, layer-by-layer replay).

Nothing here runs on a good step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from nanguard import detector
from nanguard._keras_state import (
    Snapshot,
    first_nonfinite_variable,
    inner_optimizer,
    nonfinite_variables,
    state_variables,
    to_numpy,
    weight_peaks,
)
from nanguard._keras_step import Head, float_tensors, sparse_classes
from nanguard.dump import named_leaves
from nanguard.events import StepRecord

ACTIVATION_DUMP_BYTES = 16 * 2**20  # per tensor of the localized layer in the dump
ACTIVATION_DUMP_TOTAL = 64 * 2**20  # all of them together


def named_arrays(obj: Any, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a nested batch as a host array, with a readable path."""
    for name, leaf in named_leaves(obj, prefix):
        yield name, to_numpy(leaf)


def describe_nonfinite(name: str, a: np.ndarray) -> str | None:
    if a.dtype.kind not in "fc":
        return None
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if nan or inf:
        return f"{name}: {nan} NaN, {inf} Inf of {a.size} values"
    return None


def makes_no_nan(optimizer: Any, dtype: str) -> bool:
    """Whether ``optimizer`` (unwrapped from a ``LossScaleOptimizer``) is a built-in whose
    update of finite numbers never makes a NaN (``detector.NAN_FREE_UPDATES``) in weights
    of ``dtype``: its ``epsilon`` is not 0 there."""
    optimizer = inner_optimizer(optimizer)
    cls = type(optimizer)
    eps = getattr(optimizer, "epsilon", 1.0)
    return (cls.__name__ in detector.NAN_FREE_UPDATES
            and cls.__module__.startswith("keras.") and isinstance(eps, (int, float))
            and eps > 0 and not detector.eps_vanishes(float(eps), dtype))


def vanishing_eps(optimizer: Any, model: Any) -> dict[str, Any] | None:
    """The optimizer's ``epsilon`` when it is 0 in a trainable variable's dtype
    (``detector.eps_vanishes``): ``{"eps": ..., "dtype": ...}``, or None."""
    return detector.vanishing_eps(getattr(inner_optimizer(optimizer), "epsilon", None),
                                  (str(v.dtype) for v in model.trainable_variables))


def bounded_step(optimizer: Any, lr: float) -> bool:
    """Whether ``optimizer`` (unwrapped from a ``LossScaleOptimizer``) is a built-in whose step
    of each weight is bounded by the learning rate ``lr`` it stepped with
    (``detector.bounded_step``)."""
    optimizer = inner_optimizer(optimizer)
    cls = type(optimizer)
    if not cls.__module__.startswith("keras."):
        return False

    def number(name: str, default: float = 0.0) -> float:
        value = getattr(optimizer, name, default)
        return float(value) if isinstance(value, (int, float)) else math.nan

    return detector.bounded_step(
        cls.__name__, lr=lr, eps=number("epsilon"), beta1=number("beta_1"),
        beta2=number("beta_2", number("rho")), momentum=number("momentum"),
        centered=bool(getattr(optimizer, "centered", False)),
        decay=0.0 if getattr(optimizer, "weight_decay", None) is None
        else number("weight_decay"))


def check_targets(heads: list[tuple[Head, np.ndarray, np.ndarray | None]]) -> str | None:
    """NaN/Inf in floating targets, or class ids outside ``[0, n_classes)`` (other than
    the loss's ``ignore_class``), for each output's targets against that output.

    Args:
        heads: ``(head, targets, output)`` per output with a loss, as Keras paired them;
            ``head`` says whether its loss is a sparse one and which id it ignores.
    """
    for head, t, output in heads:
        if t.dtype.kind == "f":
            found = describe_nonfinite(head.name, t)
            if found:
                return found
        if output is None or t.size == 0 or t.dtype.kind not in "iuf":
            continue
        if t.dtype.kind == "f" and not head.sparse:
            continue
        n = sparse_classes(t.shape, output.shape)
        if n is None:
            continue
        bad = (t < 0) | (t >= n)
        if head.ignore_class is not None:
            bad &= t != head.ignore_class
        if bad.any():
            return _describe_labels(head.name, t, bad, n)
    return None


def _describe_labels(name: str, t: np.ndarray, bad: np.ndarray, n: int) -> str:
    """The bad class ids of one output's targets (:func:`detector.describe_ids`). A
    negative id is usually padding: the loss can be told to ignore it."""
    at = np.argwhere(bad)[0]
    first = t[tuple(at)].item()
    text = detector.describe_ids(name, int(bad.sum()), first, at, t.shape,
                                 f"outside [0, {n})")
    if first < 0 and float(first).is_integer():
        text += (f"; if {first:g} marks positions your loss ignores (padding), compile with "
                 f"keras.losses.SparseCategoricalCrossentropy(ignore_class={first:g})")
    return text


Localized = tuple[str, bool, list[np.ndarray], list[np.ndarray]]


def _flags(arrays: Sequence[np.ndarray]) -> tuple[bool, bool, bool]:
    """(any NaN, any +Inf, any -Inf) over the floating arrays."""
    nan = pos = neg = False
    for a in arrays:
        if a.dtype.kind == "c":
            nan = nan or not bool(np.isfinite(a).all())
        elif a.dtype.kind == "f":
            nan = nan or bool(np.isnan(a).any())
            pos = pos or bool(np.isposinf(a).any())
            neg = neg or bool(np.isneginf(a).any())
    return nan, pos, neg


def _host_arrays(structure: Any) -> list[np.ndarray]:
    """The numeric tensors of a nested structure as host arrays, in order."""
    out = []
    for t in keras.tree.flatten(structure):
        if t is None or not hasattr(t, "dtype"):
            continue
        try:
            a = to_numpy(t, 2**62)
        except Exception:  # noqa: BLE001 - not a tensor the host can read: left out
            continue
        if a.dtype.kind in "biufc":
            out.append(a)
    return out


def localize(model: Any, x: Any, allow_neg_inf: Sequence[str] = ()) -> Localized | None:
    """Replay a batch layer by layer; the first layer that turned finite inputs into a
    non-finite output.

    ``Sequential`` and functional models run their ``layers`` in order; a subclassed model,
    and a functional one with a layer called more than once (a shared, siamese layer: its
    ``layer.output`` is its first call's only), runs once with every layer's calls recorded
    (:func:`_localize_by_calls`). Always with ``training=False``, so the replay changes no
    state. ``-inf`` outputs of the layers ``allow_neg_inf`` names are intended
    (:class:`nanguard.detector.Blame`). Returns ``(layer name, is the output layer, its inputs, its
    outputs)`` (the numeric ones, as host arrays), or None when no layer is to blame.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        return None
    blame = detector.Blame(allow_neg_inf)
    if isinstance(model, keras.Sequential):
        h, h_arrays = x, _host_arrays(x)
        for i, layer in enumerate(layers):
            out = layer(h, training=False)
            arrays = _host_arrays(out)
            if blame.blames(layer.name, _flags(arrays), _flags(h_arrays)):
                last = i == len(layers) - 1
                return (_inside(layer, h, last, allow_neg_inf)
                        or (layer.name, last, _cut_all(h_arrays), _cut_all(arrays)))
            h, h_arrays = out, arrays
        return None
    if any(len(getattr(layer, "_inbound_nodes", ())) > 1 for layer in layers):
        return _localize_by_calls(model, x, blame)
    # A functional model's raw ops (`h / t` between layers) are operations, not layers:
    # replayed too, so that an op's NaN is not blamed on the layer it feeds.
    operations = getattr(model, "operations", None)
    if isinstance(operations, list):
        layers = [op for op in operations if not isinstance(op, keras.layers.InputLayer)]
        # Their names are Keras's, made unique per process (`add_1`): one cannot list them
        # in allow_neg_inf, so a raw op's -inf (a mask added to scores) counts as intended;
        # its NaN or +inf is blamed.
        raw = [op.name for op in layers if not isinstance(op, keras.layers.Layer)]
        blame = detector.Blame((*allow_neg_inf, *raw))
    try:
        outputs = [layer.output for layer in layers]
        replay = keras.Model(model.inputs, outputs)
    except Exception:  # noqa: BLE001 - subclassed: no graph to cut
        return _localize_by_calls(model, x, blame)
    results = replay(x, training=False)
    # The NaN/+Inf/-Inf flags of every layer's outputs, by their symbolic tensor: the next
    # layers' inputs (flags only: a host copy of every activation would add up). The model's
    # own inputs are not among them: the probe replays only a batch whose inputs are finite.
    flags: dict[int, detector.Flags] = {}
    for layer, out in zip(layers, results, strict=False):
        symbolic = keras.tree.flatten(layer.output)
        arrays = []
        for s, t in zip(symbolic, keras.tree.flatten(out), strict=False):
            found = _host_arrays(t)
            if found:
                flags[id(s)] = _flags(found)
                arrays.append(found[0])
        known = [flags[id(s)] for s in keras.tree.flatten(layer.input) if id(s) in flags]
        if not blame.blames(layer.name, _flags(arrays), (
                any(f[0] for f in known), any(f[1] for f in known), any(f[2] for f in known))):
            continue
        try:
            inp = keras.Model(model.inputs, layer.input)(x, training=False)
            ins = _host_arrays(inp)
        except Exception:  # noqa: BLE001 - the inputs are optional forensic detail
            inp, ins = None, []
        output_ids = {id(t) for t in keras.tree.flatten(model.outputs)}
        last = bool(layer is layers[-1] or any(id(t) in output_ids for t in symbolic))
        inner = _inside(layer, inp, last, allow_neg_inf) if inp is not None else None
        return inner or (layer.name, last, _cut_all(ins), _cut_all(arrays))
    return None


def nonfinite_added_loss(model: Any, x: Any) -> dict[str, Any] | None:
    """The first layer whose own ``add_loss`` term is non-finite when the batch is replayed
    (``training=False``, so no state changes): ``{"layer": name, "value": float}``, or None.
    A finite forward with a non-finite loss may be such a term's, not the compiled loss's."""
    try:
        model(x, training=False)
        for layer in model._flatten_layers(include_self=True):
            for term in layer._get_own_losses():
                flat = np.asarray(to_numpy(term, 2**62)).ravel()
                if flat.dtype.kind == "f" and not np.isfinite(flat).all():
                    return {"layer": layer.name, "value": float(flat[~np.isfinite(flat)][0])}
    except Exception:  # noqa: BLE001 - forensic detail only
        return None
    finally:
        model._clear_losses()  # the replay's terms, not left on the layers
    return None


def _inside(layer: Any, inputs: Any, last: bool,
            allow_neg_inf: Sequence[str]) -> Localized | None:
    """A nested model (a ``backbone`` inside the model) to blame: the layer inside it, by
    replaying it on the inputs it got (named by its own name, as the call-by-call replay
    names it). It is the output layer when the nested model is and it is the nested
    model's last."""
    if not isinstance(layer, keras.Model):
        return None
    try:
        found = localize(layer, inputs, allow_neg_inf)
    except Exception:  # noqa: BLE001 - the nested model's name is still an answer
        return None
    if found is None:
        return None
    name, inner_last, ins, outs = found
    return name, last and inner_last, ins, outs


def _localize_by_calls(model: Any, x: Any,
                       blame: detector.Blame | None = None) -> Localized | None:
    """A subclassed model has no graph to cut (and a shared layer's calls have no single
    output to cut at): run it once with every layer's ``call`` wrapped (instance attributes,
    removed afterwards, as fairseq's NaN detector hooks modules) and name the first layer
    call to return a non-finite output from finite inputs
    (:class:`nanguard.detector.Blame`). Calls are seen as they finish, so a custom block is
    named only when none of its own layers is to blame."""
    blame = blame or detector.Blame()
    flatten = getattr(model, "_flatten_layers", None)
    layers = (list(flatten(include_self=False, recursive=True)) if callable(flatten)
              else list(model.layers))
    found: list[tuple[Any, list[np.ndarray], list[np.ndarray], list[Any]]] = []

    def wrap(layer: Any, orig: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            if not found:
                outs = [to_numpy(t, 2**62) for t in float_tensors(out)]
                if blame.blames(layer.name, _flags(outs), lambda: _flags([
                        to_numpy(t, 2**62) for t in float_tensors((args, kwargs))])):
                    found.append((layer, _host_arrays((args, kwargs)), _host_arrays(out),
                                  float_tensors(out)))
            return out
        return call

    patched = []
    try:
        for layer in layers:
            vars(layer)["call"] = wrap(layer, layer.call)
            patched.append(layer)
        result = model(x, training=False)
    except Exception:  # noqa: BLE001 - the replay must never break training
        return None
    finally:
        for layer in patched:
            vars(layer).pop("call", None)
    if not found:
        outs = [to_numpy(t, 2**62) for t in float_tensors(result)]
        nan, pos, neg = _flags(outs)
        if nan or pos or (neg and not blame.neg_inf_seen):
            # No layer to blame: the model's own call() made it (an allowed layer's -inf
            # reaching the output is intended).
            return model.name, True, _cut_all(_host_arrays(x)), _cut_all(outs)
        return None
    layer, ins, outs, tensors = found[0]
    last = any(t is o for t in tensors for o in float_tensors(result))
    return layer.name, last, _cut_all(ins), _cut_all(outs)


def nan_state_of(model: Any, name: str) -> tuple[str, str, np.ndarray] | None:
    """The first non-trainable variable of layer ``name`` that holds NaN, as
    :func:`first_nonfinite_variable` describes one, unless the layer's forward writes its
    non-trainable variables itself (``BatchNormalization``'s moving statistics: a bad
    step's own forward may have made them NaN)."""
    flatten = getattr(model, "_flatten_layers", None)
    layers = list(flatten(include_self=True, recursive=True)) if callable(flatten) else []
    layer = next((la for la in layers if la.name == name), None)
    if layer is None or isinstance(layer, keras.layers.BatchNormalization):
        return None
    for v in layer.non_trainable_variables:
        a = to_numpy(v, 2**62)
        if a.dtype.kind == "f" and np.isnan(a).any():
            what = ("a frozen weight" if v.name in ("kernel", "bias", "embeddings")
                    else "a layer's state, such as Normalization's adapted mean and variance")
            return (f"{v.path}: {int(np.isnan(a).sum())} NaN of {a.size} values, {what}, "
                    "which no update touches; restore or re-compute it", v.path, a)
    return None


def _peak(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def _cut(a: Any) -> np.ndarray:
    """At most ``ACTIVATION_DUMP_BYTES``: the first rows, or, when one row is larger than
    that, a flat prefix of the first row."""
    if not isinstance(a, np.ndarray):
        a = to_numpy(a, 2**62)
    if a.ndim and a.nbytes > ACTIVATION_DUMP_BYTES:
        a = a[: max(1, ACTIVATION_DUMP_BYTES // max(1, a[0].nbytes))]
    if a.nbytes > ACTIVATION_DUMP_BYTES:
        a = a.reshape(-1)[: ACTIVATION_DUMP_BYTES // a.itemsize]
    return a


def _cut_all(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [_cut(a) for a in arrays]


def _numbered(prefix: str, arrays: Sequence[np.ndarray], budget: int) -> dict[str, np.ndarray]:
    """``prefix`` for one array, ``prefix.<i>`` for several (as the torch replay names
    them), as many as fit in ``budget`` bytes in order; the rest are left out."""
    if len(arrays) == 1:
        return {prefix: arrays[0]} if arrays[0].nbytes <= budget else {}
    out = {}
    for i, a in enumerate(arrays):
        if a.nbytes <= budget:
            out[f"{prefix}.{i}"] = a
            budget -= a.nbytes
    return out


def clean_loss_bad_grads(record: StepRecord) -> bool:
    return detector.finite(record.loss) and not detector.finite(record.grad_norm)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def step_gradients(model: Any, batch: Mapping[str, Any]) -> list[Any] | None:
    """The gradients of the batch's loss, computed again on the host's request (slow path).

    Forward in training mode, as the step ran it, inside a ``keras.StatelessScope`` so that
    nothing the replay writes (BatchNormalization's moving statistics, the compiled loss's
    per-output loss means, a dropout seed) reaches the variables. None when the backend has
    no gradient here or the replay fails (it must never break training).
    """
    x = batch.get("x")
    if x is None:
        return None
    y, sample_weight = batch.get("y"), batch.get("sample_weight")
    variables = list(model.trainable_variables)
    trained = {id(v) for v in variables}
    others = [v for v in model.variables if id(v) not in trained]
    kwargs = {"training": True} if getattr(model, "_call_has_training_arg", True) else {}
    backend = keras.backend.backend()
    grads: list[Any]
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            values = [tf.convert_to_tensor(v.value) for v in variables]
        elif backend == "torch":
            values = [v.value for v in variables]
        else:
            return None
        # Every variable mapped: a weight regularizer reads its variable through the scope's
        # mapping (Layer._get_regularization_losses), and an unmapped one reads None.
        mapping = [*zip(variables, values, strict=True), *((v, v.value) for v in others)]
        if backend == "tensorflow":
            with tf.GradientTape() as tape:
                tape.watch(values)
                with keras.StatelessScope(state_mapping=mapping):
                    y_pred = model(x, **kwargs)
                    loss = model.compute_loss(x=x, y=y, y_pred=y_pred,
                                              sample_weight=sample_weight)
            # An Embedding's IndexedSlices made dense, as the norm the step took.
            grads = [None if g is None else tf.convert_to_tensor(g)
                     for g in tape.gradient(loss, values)]
        else:
            import torch

            with torch.enable_grad(), keras.StatelessScope(state_mapping=mapping):
                y_pred = model(x, **kwargs)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred,
                                          sample_weight=sample_weight)
                grads = list(torch.autograd.grad(loss, values, allow_unused=True))
    except Exception:  # noqa: BLE001 - optional forensic detail
        return None
    return [g for g in grads if g is not None]


def overflowing_norm(model: Any, batch: Mapping[str, Any]) -> dict[str, object]:
    """Whether a finite loss's non-finite gradient norm comes from non-finite gradients or
    from finite ones too large for a float32 L2 norm (entries beyond ~1.8e19 overflow their
    squares: the guard calls that non-finite, as torch's ``clip_grad_norm_`` does).

    Returns ``details`` for the event: ``grad_entries_finite`` (True: every entry of the
    recomputed gradients is finite and their float32 norm overflows; False: some entry is
    NaN/Inf) and ``grad_norm_float64`` (their norm in float64) when True; empty when the
    gradients could not be recomputed or their norm came out finite this time.
    """
    grads = step_gradients(model, batch)
    if not grads:
        return {}
    squares = []
    try:
        for g in grads:  # on the device: a few numbers per gradient come to the host
            g = ops.cast(g, "float32")
            if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(g)))):
                return {"grad_entries_finite": False}
            # max(|g|)**2 * sum((g / max(|g|))**2): the squares without overflowing float32.
            peak = float(ops.convert_to_numpy(ops.max(ops.abs(g)))) if ops.size(g) else 0.0
            if peak > 0:
                scaled = float(ops.convert_to_numpy(ops.sum(ops.square(g / peak))))
                squares.append(peak * peak * scaled)
    except Exception:  # noqa: BLE001 - optional forensic detail
        return {}
    total = math.fsum(squares)
    # The step sums the squares in float32 (TensorFlow's l2_loss halves them first).
    if total <= FLOAT32_MAX / 2:
        return {}
    return {"grad_entries_finite": True, "grad_norm_float64": math.sqrt(total)}


def grad_norm_owner(model: Any, record: StepRecord) -> str | None:
    """The layer owning the first variable (in backward order) whose gradient norm is
    non-finite: where the gradients overflowed. ``layer_grad_norms`` follow
    ``model.trainable_variables``; Keras has no backward replay, the norms stand in."""
    i = detector.last_nonfinite(record.layer_grad_norms)
    variables = list(model.trainable_variables)
    if i is None or i >= len(variables):
        return None
    target = id(variables[i])
    for layer in getattr(model, "layers", []):
        if any(id(v) == target for v in layer.trainable_variables):
            return str(layer.name)
    return None


class KerasProbe:
    """Answers the core's questions about one bad step.

    Args:
        model: The model being trained.
        batch: ``{"x", "y", "sample_weight", "y_pred", "heads"}`` tensors of the step (any
            may be missing; empty in the loss-only fallback). ``heads`` holds
            ``{"y", "y_pred"}`` per output with a loss (keyed ``"0"``, ``"1"``, ...), as Keras
            paired them.
        heads: What each entry of ``batch["heads"]`` is (its name, sparse loss or not,
            ignored class).
        replay: Whether to replay the batch layer by layer.
        allow_neg_inf: Layer names (or ``fnmatch`` patterns) whose ``-inf`` outputs are
            intended: the replay blames neither them nor the ``-inf`` flowing from them.
        update_nonfinite: The step's update, made from finite gradients, left the weights
            non-finite.
        snapshot: The last snapshot: a non-trainable variable whose Inf it holds at the same
            place is not reported as left non-finite.
        details: Facts the adapter knows about the step, added to the evidence's details
            (with gradient accumulation: which micro-batch ``batch`` is).
    """

    def __init__(self, model: Any, batch: Mapping[str, Any], *, heads: list[Head] | None = None,
                 replay: bool = True, allow_neg_inf: Sequence[str] = (),
                 update_nonfinite: bool = False, snapshot: Snapshot | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.details = dict(details or {})
        self.update_nonfinite = update_nonfinite
        self.snapshot = snapshot
        self.batch = batch
        self.heads = list(heads or [])
        self.replay = replay
        self.allow_neg_inf = tuple(allow_neg_inf)
        self._tensors: dict[str, np.ndarray] | None = None
        self.localized: Localized | None = None
        # The non-finite variable the evidence names, for the dump.
        self.found_state: tuple[str, np.ndarray] | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            out: dict[str, np.ndarray] = {}
            out.update(named_arrays(self.batch.get("x"), "inputs"))
            out.update(named_arrays(self.batch.get("y"), "targets"))
            out.update(named_arrays(self.batch.get("sample_weight"), "sample_weight"))
            out.update(named_arrays(self.batch.get("y_pred"), "output"))
            self._tensors = out
        out = dict(self._tensors)
        if self.localized is not None:
            # Every input and output of the layer: `.input` / `.output` for one,
            # `.input.<i>` / `.output.<i>` for several; the outputs first within the budget.
            name, _, ins, outs = self.localized
            kept = _numbered(f"activation.{name}.output", outs, ACTIVATION_DUMP_TOTAL)
            left = ACTIVATION_DUMP_TOTAL - sum(a.nbytes for a in kept.values())
            out.update(_numbered(f"activation.{name}.input", ins, left))
            out.update(kept)
        if self.found_state is not None:
            name, a = self.found_state
            out[f"localized.{name}"] = _cut(a)
        return out

    def paired_targets(self) -> list[tuple[Head, np.ndarray, np.ndarray | None]]:
        """Each output's targets and output as the step's loss saw them."""
        pairs = self.batch.get("heads") or {}
        found = []
        for i, head in enumerate(self.heads):
            pair = pairs.get(str(i))
            if pair is not None:
                output = pair.get("y_pred")
                found.append((head, to_numpy(pair["y"]),
                              None if output is None else to_numpy(output)))
        return found

    def evidence(self, record: StepRecord) -> detector.Evidence:
        ev = detector.Evidence()
        ev.details.update(self.details)
        arrays = self.tensors()
        outputs = [a for n, a in arrays.items() if n.startswith("output") and a.dtype.kind == "f"]
        if outputs:  # the output whose magnitude is largest sets the exp-overflow limit
            ev.logits_dtype = str(max(outputs, key=_peak).dtype)
        ev.logits_seen = bool(outputs)  # the loss-only fallback records no output
        ev.batch_seen = bool(self.batch)  # ... and no batch
        layers = getattr(self.model, "layers", [])
        ev.where = layers[-1].name if layers else None
        for name, a in arrays.items():
            if name.startswith(("inputs", "sample_weight")):
                ev.input_nonfinite = describe_nonfinite(name, a)
                if ev.input_nonfinite:
                    break
        if not ev.input_nonfinite:
            detector.note_inputs_peak(ev, [
                float(np.abs(a).max()) for name, a in arrays.items()
                if name.startswith("inputs") and a.dtype.kind == "f" and a.size])
        pairs = self.paired_targets()
        ev.target_invalid = check_targets(pairs)
        checks = self.details.get("in_step_checks")
        if checks is not None and not self.batch:
            # steps_per_execution > 1 with XLA keeps the stats of a bad batch inside the
            # execution, not its tensors: the step checked the batch itself.
            ev.batch_seen = ev.logits_seen = True
            kept = "checked inside the step; with XLA the batch itself is not kept"
            # Nor is any layer replayed: the output layer is where the NaN was seen, not
            # where it started (a black-box tester's hidden sqrt was blamed on the output).
            ev.where = None
            ev.details["replay_unavailable"] = (
                "with XLA and steps_per_execution > 1 the batch is not kept, so no layer was "
                "replayed")
            if not checks["inputs_finite"]:
                ev.input_nonfinite = f"inputs: NaN/Inf ({kept})"
            elif not checks.get("sample_weight_finite", True):
                ev.input_nonfinite = f"sample_weight: NaN/Inf ({kept})"
            if not checks["targets_finite"]:
                ev.target_invalid = f"targets: NaN/Inf ({kept})"
            elif not checks["labels_valid"]:
                ev.target_invalid = f"targets: class ids outside [0, n_classes) ({kept})"
        if not ev.target_invalid and not math.isfinite(record.loss):
            peaks = [float(np.abs(y).max()) for _, y, _ in pairs
                     if y.dtype.kind == "f" and y.size]
            if peaks:  # huge finite targets (a missing-value sentinel) overflow a loss
                ev.details["targets_peak"] = max(peaks)
        found = first_nonfinite_variable(self.model)
        ev.weights_nonfinite = None if found is None else found[0]
        if self.update_nonfinite:
            vanishing = vanishing_eps(self.model.optimizer, self.model)
            if vanishing is not None:
                ev.details["eps_vanishes"] = vanishing
            # Finite gradients keep a float32 optimizer state finite: such state that is
            # not was so before the update, which only spread it into the weights.
            state = first_nonfinite_variable(self.model, optimizer_wide_only=True)
            if state is not None:
                ev.details["optimizer_state_nonfinite"] = state[0]
                found = state
            elif (found is not None and np.isnan(found[2]).any() and math.isfinite(record.lr)
                  and makes_no_nan(self.model.optimizer, found[2].dtype.name)):
                ev.details["nan_before_update"] = True
            elif (found is not None and found[2].dtype.itemsize >= 4 and np.isinf(found[2]).any()
                  and math.isfinite(record.lr) and bounded_step(self.model.optimizer, record.lr)):
                ev.details["inf_before_update"] = True
        self.found_state = None if found is None else found[1:]
        buffers = list(self.model.non_trainable_variables)
        buffers = ([v for v, _ in self.snapshot.left_nonfinite(buffers)]
                   if self.snapshot is not None else nonfinite_variables(buffers))
        if buffers:  # restored from the snapshot when the step is skipped
            ev.details["nonfinite_buffers"] = [v.path for v in buffers[:20]]
        logits_bad = not (detector.finite(record.logits_min) and detector.finite(record.logits_max))
        clean = not (ev.input_nonfinite or ev.target_invalid or ev.weights_nonfinite)
        grads_only = clean_loss_bad_grads(record)
        if grads_only:
            ev.grad_where = grad_norm_owner(self.model, record)
            if clean and self.replay:
                ev.details.update(overflowing_norm(self.model, self.batch))
        if (self.replay and clean and (logits_bad or grads_only)
                and self.batch.get("x") is not None):
            # With a finite loss too: a hidden NaN that a later layer dropped in the compiled
            # step (TensorFlow's fused oneDNN ReLU maps NaN to 0) leaves only NaN gradients;
            # the replay, op by op, shows the layer that made it.
            self.localized = localize(self.model, self.batch["x"], self.allow_neg_inf)
            found_state = (None if self.localized is None
                           else nan_state_of(self.model, self.localized[0]))
            if found_state is not None:
                # The layer the replay blames holds NaN in a variable its forward does not
                # write (a frozen kernel, Normalization's adapted mean): that is the fault.
                ev.weights_nonfinite, path, a = found_state
                self.found_state, self.localized = (path, a), None
            if self.localized is not None:
                name, is_output, _, _ = self.localized
                if logits_bad or not is_output:
                    ev.where = name
                    ev.details["replay_layer"] = name
                if any(op.name == name and not isinstance(op, keras.layers.Layer)
                       for op in getattr(self.model, "operations", None) or []):
                    ev.details["replay_op"] = True
                if not is_output:
                    ev.activation = name
                    _, _, ins, outs = self.localized
                    detector.note_activation(
                        ev, [str(a.dtype) for a in outs],
                        [float(np.abs(a[np.isfinite(a)]).max()) for a in ins
                         if a.dtype.kind == "f" and np.isfinite(a).any()],
                        masked=any(a.dtype.kind == "f" and bool(np.isneginf(a).any())
                                   for a in ins),
                        out_inf=any(a.dtype.kind == "f" and bool(np.isinf(a).any())
                                    for a in outs))
                elif name == self.model.name:  # no layer: the model's own call() made it
                    ev.details["made_in_model_code"] = True
            elif logits_bad and not self.allow_neg_inf:  # (an allowed -inf is no fault)
                ev.details["replay_unreproduced"] = True
        if (self.replay and clean and not logits_bad and not math.isfinite(record.loss)
                and self.batch.get("x") is not None):
            added = nonfinite_added_loss(self.model, self.batch["x"])
            if added is not None:
                ev.details["added_loss"] = added
        if clean and (logits_bad or not math.isfinite(record.loss)
                      or ev.details.get("grad_entries_finite")):
            # Only these messages use it (huge finite weights point at the learning rate).
            detector.note_weights_peak(ev, weight_peaks(self.model))
        return ev

    def state(self) -> dict[str, Callable[[], np.ndarray]]:
        # Each array made when the dump writes it: one in host memory at a time.
        return {name: functools.partial(to_numpy, v, 2**62)
                for name, v in state_variables(self.model)}

    def to_repair(self) -> list[str]:
        """The paths of what a skip's repair puts back (``Snapshot.broken_weights``)."""
        if self.snapshot is None:
            return []
        return [v.path for v, _ in self.snapshot.broken_weights(self.model)]
