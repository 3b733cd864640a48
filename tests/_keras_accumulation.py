"""Gradient accumulation under nanguard.keras: real ``model.fit`` runs, the same scenarios
for every Keras backend (imported by the TensorFlow test in-process, and run with
``KERAS_BACKEND=torch`` in a subprocess: ``python tests/_keras_accumulation.py DIR eager``).

With an optimizer's ``gradient_accumulation_steps=k`` a guard step is one optimizer step (k
micro-batches); a bad micro-batch keeps its whole window from the weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from typing import Any

import keras
import numpy as np

import nanguard
from nanguard import NonFiniteTrainingError
from nanguard.keras import NanGuard

K = 2  # micro-batches per optimizer step
JIT: dict[str, Any] = {"on": "auto"}  # jit_compile of every model (run() sets it)
BATCH = 8


def _model(run_eagerly: bool, optimizer: Any = None, mixed: bool = False) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="hidden",
                           dtype="mixed_float16" if mixed else None),
        keras.layers.Dense(3, name="head", dtype="float32"),
    ])
    model.compile(optimizer or keras.optimizers.SGD(0.1, gradient_accumulation_steps=K),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly, jit_compile=JIT["on"])
    return model


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, n)


def _arrays(variables: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _state(model: Any) -> list[bytes]:
    """Model variables as bytes, then the optimizer's but the iteration count as bytes of
    their values (Keras's torch backend zeroes an accumulator by multiplying it by 0,
    nanguard by assigning zeros: -0.0 and 0.0)."""
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)
    slots = [v for v in opt.variables
             if v is not inner._iterations and "learning_rate" not in v.path]
    return ([a.tobytes() for a in _arrays(model.variables)]
            + [(a + 0).tobytes() for a in _arrays(slots)])


def _iterations(model: Any) -> int:
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)
    return int(keras.ops.convert_to_numpy(inner._iterations))


def _accumulators_zero(model: Any) -> bool:
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)
    return all((a == 0).all() for a in _arrays(inner._accumulated_gradients))


class _Rec(keras.callbacks.Callback):
    """After the guard: the state before and after every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[Any] = []
        self.after: list[Any] = []
        self.iterations: list[int] = []
        self.logs: list[dict[str, Any]] = []

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.before.append(_state(self.model))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.after.append(_state(self.model))
        self.iterations.append(_iterations(self.model))
        self.logs.append(dict(logs or {}))


def _events(guard: NanGuard) -> list[list[Any]]:
    return [[e.step, e.cause, e.action] for e in guard.events]


def _dumped(guard: NanGuard) -> list[Any]:
    """The first dump's event step and cause, its history's steps, and the NaN count of
    the batch it holds (the bad micro-batch's)."""
    dump = nanguard.load(guard.dumps[0])
    nan = sum(int(np.isnan(a).sum()) for name, a in dump.tensors.items()
              if name.startswith("inputs"))
    return [dump.event.step, dump.event.cause, [r.step for r in dump.history], nan]


def _fit(model: Any, x: Any, y: Any, guard: NanGuard | None, **kw: Any) -> _Rec:
    rec = _Rec()
    callbacks = [guard, rec] if guard is not None else [rec]
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=callbacks, **kw)
    return rec


def run(dump_dir: str, eager: bool, xla: bool = False) -> dict[str, Any]:
    """Every scenario; ``xla``: the models compiled with ``jit_compile=True`` (Keras's
    "auto" leaves XLA off on a CPU-only machine)."""
    JIT["on"] = True if xla else "auto"
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    out: dict[str, Any] = {}
    x, y = _data()

    # 1. Healthy: the same weights as without the guard, one step per optimizer step, the
    # norm of the mean gradient (SGD: the update is -lr * that mean) and the mean loss.
    plain = _model(eager)
    w0 = _arrays(plain.trainable_variables)
    losses = [float(plain.evaluate(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH],
                                   verbose=0)) for i in range(K)]
    _fit(plain, x[:BATCH * K], y[:BATCH * K], None)
    w1 = _arrays(plain.trainable_variables)
    plain = _model(eager)
    _fit(plain, x, y, None, epochs=2)
    guarded = _model(eager)
    guard = NanGuard(dump_dir=dump_dir)
    rec = _fit(guarded, x, y, guard, epochs=2)
    update = np.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(w0, w1, strict=True)))
    out["healthy"] = {
        "identical": _state(plain) == _state(guarded),
        "steps": [r.step for r in guard.history],
        "step_count": guard.step_count,
        "norm": guard.history[0].grad_norm, "norm_expected": update / 0.1,
        "loss": guard.history[0].loss, "loss_expected": float(np.mean(losses)),
        "logged_on": [i for i, logs in enumerate(rec.logs) if "nanguard_grad_norm" in logs],
    }

    # 2. A bad micro-batch, first or last of window 2 (batches 4 and 5): the whole window is
    # kept from the weights and from the optimizer state, the count moves on by K.
    for name, row in (("first", 4 * BATCH + 2), ("last", 5 * BATCH + 2)):
        xb = x.copy()
        xb[row, 3] = np.nan
        model = _model(eager)
        guard = NanGuard(dump_dir=dump_dir)
        rec = _fit(model, xb, y, guard)
        out[name] = {
            "events": _events(guard),
            "actions": [r.action for r in guard.history],
            "window_unchanged": rec.before[4] == rec.after[5],
            "next_trains": rec.after[6] != rec.before[6],
            "iterations": rec.iterations,
            "norm_finite": [bool(np.isfinite(r.grad_norm)) for r in guard.history],
            "micro_batch": [guard.events[0].details.get(key) for key in ("micro_batch",
                                                                         "micro_batches")],
            "dump": _dumped(guard),
            "message": guard.events[0].message,
        }

    # 3. An out-of-range label in a window's first micro-batch: its gradients are finite
    # (the label is replaced for the loss), the window is still kept out.
    yb = y.copy()
    yb[2 * BATCH + 1] = 7
    model = _model(eager)
    guard = NanGuard(dump_dir=dump_dir)
    rec = _fit(model, x, yb, guard)
    out["label"] = {"events": _events(guard), "window_unchanged": rec.before[2] == rec.after[3],
                    "message": guard.events[0].message if guard.events else "",
                    # the bad micro-batch's own (finite) norms, not the poisoned mean's
                    "norms": [guard.history[1].grad_norm, *guard.history[1].layer_grad_norms]}

    # 4. clip_grad_norm clips the mean gradient, as Keras's global_clipnorm does.
    clipped = _model(eager, keras.optimizers.SGD(0.1, gradient_accumulation_steps=K,
                                                 global_clipnorm=0.05))
    _fit(clipped, x, y, None)
    model = _model(eager)
    guard = NanGuard(dump_dir=dump_dir, clip_grad_norm=0.05)
    _fit(model, x, y, guard)
    out["clip"] = {
        "close": all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(
            _arrays(clipped.trainable_variables), _arrays(model.trainable_variables),
            strict=True)),
        "moved": any(not np.array_equal(a, b) for a, b in zip(
            w0, _arrays(model.trainable_variables), strict=True)),
        "norms": [r.grad_norm for r in guard.history],
    }

    # 5. Every window bad from window 1: skips, then rollbacks (to the snapshot before
    # step 0, the count included), then the abort.
    xb = x.copy()
    xb[2 * BATCH:, 0] = np.nan
    model = _model(eager)
    guard = NanGuard(dump_dir=dump_dir, max_skips=1, max_rollbacks=1)
    rec = _Rec()
    try:
        model.fit(xb, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
        raised = False
    except NonFiniteTrainingError:
        raised = True
    out["ladder"] = {"raised": raised, "events": _events(guard),
                     "rolled_back_to_start": rec.after[5] == rec.before[0],
                     "iterations": rec.iterations, "dumps": len(guard.dumps)}

    # 6. fit ends inside a window: a bad one is concluded then (its micro-batches dropped,
    # the count at the window's end); a healthy one stays in Keras's accumulators.
    xb = x[:5 * BATCH].copy()
    xb[4 * BATCH, 0] = np.nan
    model = _model(eager)
    guard = NanGuard(dump_dir=dump_dir)
    _fit(model, xb, y[:5 * BATCH], guard)
    out["open_bad"] = {"events": _events(guard), "steps": len(guard.history),
                       "iterations": _iterations(model), "zero": _accumulators_zero(model)}
    model = _model(eager)
    guard = NanGuard(dump_dir=dump_dir)
    _fit(model, x[:5 * BATCH], y[:5 * BATCH], guard)
    out["open_good"] = {"events": _events(guard), "steps": len(guard.history),
                        "iterations": _iterations(model), "zero": _accumulators_zero(model)}

    # 7. A LossScaleOptimizer over the accumulating optimizer, its scale far too large for
    # float16: the micro-batches it drops itself (its scaled gradients overflow) are its own
    # business, counted in amp_skips and in no step; a NaN micro-batch still skips its window.
    def lso() -> Any:
        inner = keras.optimizers.SGD(0.05, gradient_accumulation_steps=K)
        return _model(eager, keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**24),
                      mixed=True)

    plain = lso()
    _fit(plain, x, y, None, epochs=2)
    model = lso()
    guard = NanGuard(dump_dir=dump_dir)
    _fit(model, x, y, guard, epochs=2)
    identical = _state(plain) == _state(model)
    xb = x.copy()
    xb[4 * BATCH + 2, 3] = np.nan
    model = lso()
    bad_guard = NanGuard(dump_dir=dump_dir)
    _fit(model, xb, y, bad_guard, epochs=2)
    out["lso"] = {
        "identical": identical, "amp_skips": guard.amp_skips, "steps": len(guard.history),
        "iterations": _iterations(plain),
        "amp_in_history": sum(r.cause == "amp_scaler_skip" for r in guard.history),
        "bad_events": [list(p) for p in sorted({(e.cause, e.action) for e in bad_guard.events})],
        "bad_skipped": sum(r.action == "skip" for r in bad_guard.history),
        "bad_counts": [bad_guard.amp_skips, len(bad_guard.history), _iterations(model)],
        "finite": all(np.isfinite(a).all() for a in _arrays(model.variables)),
    }

    # 8. The scaler's overflow on a window's last micro-batch, with clip_grad_norm: the
    # window's accumulated gradients stay (a clip far above every norm changes nothing).
    def overflow_run(guard: NanGuard | None) -> list[bytes]:
        inner = keras.optimizers.SGD(0.01, gradient_accumulation_steps=K)
        model = _model(eager, keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10),
                       mixed=True)
        xo = x.copy()
        xo[3 * BATCH:4 * BATCH] *= 3000.0  # batch 3, window 1's last: float16 overflows
        _fit(model, xo, y, guard)
        return _state(model)

    clip_guard = NanGuard(dump_dir=dump_dir, clip_grad_norm=1e6)
    out["overflow_clip"] = {"identical": overflow_run(None) == overflow_run(clip_guard),
                            "amp_skips": clip_guard.amp_skips, "events": _events(clip_guard)}

    # 10. A subclassed model, built in its first step (its optimizer with it): the same
    # weights as without the guard, and a NaN batch still skips its window.
    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.head = keras.layers.Dense(3)

        def call(self, inputs: Any) -> Any:
            return self.head(self.hidden(inputs))

    def lazy() -> Any:
        keras.utils.set_random_seed(0)
        net = Net()
        net.compile(keras.optimizers.Adam(0.01, gradient_accumulation_steps=K),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    run_eagerly=eager, jit_compile=JIT["on"])
        return net

    plain = lazy()
    _fit(plain, x, y, None)
    model = lazy()
    _fit(model, x, y, NanGuard(dump_dir=dump_dir))
    xb = x.copy()
    xb[5 * BATCH, 1] = np.nan
    bad_model = lazy()
    guard = NanGuard(dump_dir=dump_dir)
    _fit(bad_model, xb, y, guard)
    out["lazy"] = {"identical": _state(plain) == _state(model), "events": _events(guard)}

    # 11. A fit interrupted inside a bad window (no on_train_end) leaves the guard's NaN
    # marker in the accumulators: the next fit drops that window, with a warning, instead
    # of blaming a layer's backward for it.
    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 4:
                raise KeyboardInterrupt

    xb = x.copy()
    xb[4 * BATCH, 0] = np.nan
    model = _model(eager)
    with contextlib.suppress(KeyboardInterrupt):
        model.fit(xb, y, batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[NanGuard(dump_dir=dump_dir), Stop()])
    marked = not _accumulators_zero(model)
    guard = NanGuard(dump_dir=dump_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, x, y, guard)
    out["resumed"] = {
        "marked": marked, "events": _events(guard),
        "warned": any("accumulators hold NaN/Inf" in str(w.message) for w in caught),
        "iterations": _iterations(model),
        "finite": all(np.isfinite(a).all() for a in _arrays(model.variables)),
    }

    # 12. The same through a BackupAndRestore checkpoint written inside the bad window (at
    # epoch 0's end: the window spans it), the guard placed before BackupAndRestore, whose
    # on_train_begin restores the marker after the guard's.
    class StopAtEpoch1(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if epoch == 1:
                raise KeyboardInterrupt

    def backup_model() -> Any:
        return _model(eager, keras.optimizers.Adam(0.01, gradient_accumulation_steps=3))

    backup = f"{dump_dir}/backup"
    xb = x[:5 * BATCH].copy()
    xb[4 * BATCH, 0] = np.nan  # window 1: batches 3 and 4 of epoch 0, batch 0 of epoch 1
    with contextlib.suppress(KeyboardInterrupt):
        backup_model().fit(xb, y[:5 * BATCH], batch_size=BATCH, epochs=3, shuffle=False,
                           verbose=0, callbacks=[NanGuard(dump_dir=dump_dir),
                                                 keras.callbacks.BackupAndRestore(backup),
                                                 StopAtEpoch1()])
    model = backup_model()
    guard = NanGuard(dump_dir=dump_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x[:5 * BATCH], y[:5 * BATCH], batch_size=BATCH, epochs=3, shuffle=False,
                  verbose=0, callbacks=[guard, keras.callbacks.BackupAndRestore(backup)])
    out["backup"] = {
        "events": _events(guard),
        "warned": any("accumulators hold NaN/Inf" in str(w.message) for w in caught),
        "finite": all(np.isfinite(a).all() for a in _arrays(model.variables)),
    }

    # 9. steps_per_execution=2 with k=3: windows end inside executions; a NaN in batch 3 is
    # a skip of its window, not a rollback (the guard concludes only at a window's end).
    # Keras's torch backend has no steps_per_execution > 1.
    out["spe"] = None
    if keras.backend.backend() != "tensorflow":
        return out
    model = _model(eager, keras.optimizers.SGD(0.1, gradient_accumulation_steps=3))
    model.compile(model.optimizer, model.loss, steps_per_execution=2, run_eagerly=eager,
                  jit_compile=JIT["on"])
    xb = x.copy()
    xb[3 * BATCH, 0] = np.nan
    guard = NanGuard(dump_dir=dump_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented spe > 1 warning
        _fit(model, xb, y, guard)
    out["spe"] = {"actions": sorted({r.action or "" for r in guard.history}),
                  "events": [[e.cause, e.action] for e in guard.events],
                  "lr": [r.lr for r in guard.history],
                  "finite": all(np.isfinite(a).all() for a in _arrays(model.variables))}
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(sys.argv[1], sys.argv[2] == "eager")))
