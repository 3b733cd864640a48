"""nanguard.keras with the TensorFlow backend: real model.fit runs with real faults."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import nanguard  # noqa: E402
from nanguard import cli  # noqa: E402
from nanguard.keras import LOG_NAMES, NanGuard  # noqa: E402

pytestmark = pytest.mark.keras
ops = keras.ops

if keras.backend.backend() != "tensorflow":  # pragma: no cover - conftest sets tensorflow
    pytest.skip("these tests run the TensorFlow backend", allow_module_level=True)

import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    keras.utils.set_random_seed(0)
    yield
    logging.getLogger("nanguard").setLevel(logging.NOTSET)


def classifier(n_in=8, n_classes=3, lr=0.05, run_eagerly=False, optimizer=None,
               jit_compile="auto"):
    model = keras.Sequential([
        keras.Input((n_in,)),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(n_classes, name="head"),
    ])
    model.compile(optimizer or keras.optimizers.SGD(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=run_eagerly, jit_compile=jit_compile)
    return model


def data(n=64, n_in=8, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype("float32"), rng.integers(0, n_classes, n)


def weights(model):
    return [np.array(v) for v in model.get_weights()]


def all_finite(model):
    return all(np.isfinite(w).all() for w in model.get_weights())


def optimizer_state(model):
    return [np.array(v.numpy()) for v in model.optimizer.variables
            if "learning_rate" not in v.path]


class Recorder(keras.callbacks.Callback):
    """Placed after the guard: what later callbacks see, and the state around each step."""

    def __init__(self):
        super().__init__()
        self.logs, self.before, self.after = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append((weights(self.model), optimizer_state(self.model)))

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs or {}))
        self.after.append((weights(self.model), optimizer_state(self.model)))


def same(a, b):
    pairs = zip(a, b, strict=True)
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in pairs)


def inspect_json(path, capsys):
    capsys.readouterr()
    assert cli.main(["inspect", "--json", path]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_skips": -1}, "max_skips"),
        ({"lr_factor": 1.5}, "lr_factor"),
        ({"actions": ("skip", "explode")}, "actions"),
        ({"dump_state": "sometimes"}, "dump_state"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ],
)
def test_invalid_options_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NanGuard(**kwargs)


def test_missing_keras_names_the_extra():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n import nanguard.keras\nexcept ImportError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "pip install 'nanguard[keras]'" in out


def test_keras_without_its_backend_says_so():
    # Keras installed, TensorFlow (its default backend) not: the error names the cause.
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "try:\n import nanguard.keras\nexcept ImportError as e: print(e)")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, env=env).stdout
    assert "pip install 'nanguard[keras]'" in out and "tensorflow" in out
    assert "KERAS_BACKEND" in out


def test_nan_batch_is_skipped_with_onednn_kernels(tmp_path):
    # TensorFlow's default oneDNN kernels on this host (conftest.py turns them off for the
    # rest): where the fused ReLU maps NaN to 0 the NaN batch's forward looks finite, and
    # the guard must still skip it on its NaN gradients and name the batch.
    code = f"""
import numpy as np
from tests.test_keras_guard import Recorder, all_finite, classifier, data, same
from nanguard.keras import NanGuard

x, y = data()
x[21, 3] = np.nan  # batch 1 of 16-sample batches
model = classifier()
guard, rec = NanGuard(dump_dir={str(tmp_path)!r}), Recorder()
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard, rec])
assert [(e.step, e.cause, e.action) for e in guard.events] == [
    (1, "input_nonfinite", "skip")], guard.events
assert all_finite(model)
assert same(rec.before[1][0], rec.after[1][0]) and same(rec.before[1][1], rec.after[1][1])
assert not same(rec.before[2][0], rec.after[2][0])
"""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]


def test_faults_a_fused_relu_hides_are_named_with_onednn_kernels(tmp_path):
    # With the default kernels (on this host the fused ReLU maps NaN to 0): a NaN kernel
    # loaded before fit is weights_nonfinite, not an update too large; a NaN made by a
    # hidden layer before such a ReLU is that layer's, not a backward fault of the next.
    code = f"""
import numpy as np, keras, nanguard
from keras import ops
from nanguard.keras import NanGuard

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 4)).astype("float32")
y = rng.integers(0, 3, 32)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hid"),
                          keras.layers.Dense(3, name="head")])
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
kernel = ops.convert_to_numpy(model.get_layer("hid").kernel).copy()
kernel[0, 0] = np.nan
model.get_layer("hid").kernel.assign(kernel)
try:
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[NanGuard(dump_dir={str(tmp_path / "a")!r})])
    raise AssertionError("no abort")
except nanguard.NonFiniteTrainingError as err:
    assert (err.event.step, err.event.cause) == (0, "weights_nonfinite"), err.event
    assert "hid/kernel" in err.event.where and "learning rate" not in err.event.message

x = np.abs(x) + 0.1
x[20] = -5.0  # log(-5) is NaN, in batch 2
inp = keras.Input((4,))
h = keras.layers.Lambda(lambda t: ops.log(t), name="logl")(inp)
h = keras.layers.Dense(8, activation="relu", name="hid")(h)
model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
guard = NanGuard(dump_dir={str(tmp_path / "b")!r})
model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
assert [(e.step, e.cause, e.where) for e in guard.events] == [
    (2, "activation_nonfinite", "logl")], guard.events
"""
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_nan_weight_a_mask_keeps_from_the_loss_is_weights_nonfinite(tmp_path):
    # A layer that drops NaN (as missing-value handling does) keeps a corrupted kernel from
    # the loss: the update from finite gradients cannot have made that NaN.
    x, y = data()

    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                kernel = self.model.get_layer("hidden").kernel
                value = keras.ops.convert_to_numpy(kernel).copy()
                value[0, 0] = np.nan
                kernel.assign(value)

    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        keras.layers.Lambda(lambda t: keras.ops.where(keras.ops.isnan(t), 0.0, t), name="fill"),
        keras.layers.Dense(3, name="head"),
    ])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Corrupt(), guard])
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (2, "weights_nonfinite", "rollback")
    assert "hidden/kernel" in event.where and "was there before the step" in event.message
    assert all_finite(model)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "lion"])
def test_an_inf_weight_a_saturated_tanh_keeps_from_the_loss_is_weights_nonfinite(
        tmp_path, optimizer):
    # An Inf bias saturates its tanh unit: the loss stays finite and that weight's gradient
    # is 0. These optimizers' steps are bounded by the LR: the update cannot have made it.
    x, y = data()

    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                bias = self.model.get_layer("hidden").bias
                value = keras.ops.convert_to_numpy(bias).copy()
                value[0] = np.inf
                bias.assign(value)

    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
        keras.layers.Dense(3, name="head"),
    ])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Corrupt(), guard])
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (2, "weights_nonfinite", "rollback")
    assert "hidden/bias" in event.where and "Inf was there before the step" in event.message
    assert all_finite(model)


@pytest.mark.parametrize(("validation", "bad_epoch"), [(False, 1), (True, 1), (False, 0)])
def test_an_epoch_with_every_batch_skipped_logs_an_inf_loss_not_zero(tmp_path, validation,
                                                                     bad_epoch):
    # Keras's mean of no batch reads 0.0: ModelCheckpoint(save_best_only) saved that epoch
    # as the best and EarlyStopping restored it. NaN (as the epoch reads without the guard)
    # did the same when it was the first epoch (a black-box tester): with no best yet the
    # monitors took NaN for it, and nothing compares better than NaN.
    x, y = data(48, 5)

    def batches():
        epoch = 0
        while True:
            for b in range(3):
                xb = x[b * 16:(b + 1) * 16].copy()
                if epoch == bad_epoch:  # the whole epoch from a corrupted shard
                    xb[0, 0] = np.nan
                yield xb, y[b * 16:(b + 1) * 16]
            epoch += 1

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    best = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="loss",
                                           save_best_only=True)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=2, restore_best_weights=True)
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=10)
    # With validation, evaluate() resets and refills the same loss means before the epoch's
    # end: an all-skipped epoch still read 0.0 there.
    extra = {"validation_data": (x[:16], y[:16])} if validation else {}
    history = model.fit(batches(), steps_per_epoch=3, epochs=3, verbose=0,
                        callbacks=[guard, best, stop], **extra).history
    loss = history["loss"]
    assert len(loss) == 3  # EarlyStopping did not stop on the bad epoch
    assert history["nanguard_bad_steps"] == [3.0 * (e >= bad_epoch) for e in range(3)]
    assert loss[bad_epoch] == math.inf
    assert all(math.isfinite(v) for i, v in enumerate(loss) if i != bad_epoch)
    trained = [v for v in loss if math.isfinite(v)]
    assert best.best == stop.best == min(trained)


class DividesInCall(keras.Model):
    """Divides its output layer's result by a temperature from the inputs in call(): 0 for
    an all-zero row."""

    def __init__(self):
        super().__init__(name="net")
        self.d1 = keras.layers.Dense(8, activation="relu", name="d1")
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x, training=False):
        return self.out(self.d1(x)) / keras.ops.mean(keras.ops.abs(x), axis=-1, keepdims=True)


def divides(kind):
    if kind == "subclassed":
        return DividesInCall()
    inputs = keras.Input((8,))
    t = keras.ops.mean(keras.ops.abs(inputs), axis=-1, keepdims=True)
    h = keras.layers.Dense(8, activation="relu", name="d1")(inputs)
    if kind == "functional_mid":
        h = h / t  # a raw op between two layers
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, out if kind == "functional_mid" else out / t)


@pytest.mark.parametrize(("kind", "cause", "where"), [
    ("subclassed", "logits_nonfinite", "net"),
    ("functional_end", "logits_nonfinite", "true_divide"),
    ("functional_mid", "activation_nonfinite", "true_divide"),
])
def test_a_raw_op_in_the_model_is_not_blamed_on_a_layer(tmp_path, kind, cause, where):
    # Before: the output layer 'out' was named (its inputs already NaN, or its output
    # finite), and the message said the replay had not reproduced the fault, which it had.
    x, y = data(96)
    x[36] = 0.0  # batch 2's temperature is 0
    keras.utils.set_random_seed(0)
    model = divides(kind)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    # An op's name is Keras's, made unique per process: true_divide, true_divide_1, ...
    assert (event.step, event.cause) == (2, cause) and event.where.startswith(where)
    assert not event.details.get("replay_unreproduced")
    if kind == "subclassed":
        assert "the model's own code" in event.message and event.details["made_in_model_code"]
    if kind == "functional_mid":
        assert event.details["replay_op"] and "operation (a raw op between layers)" in (
            event.message)
    assert all_finite(model)


def test_uncompiled_model_is_a_clear_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    guard = NanGuard()
    guard.set_model(model)
    with pytest.raises(ValueError, match="compile"):
        guard.on_train_begin()


# "xla": Keras turns jit_compile on by default for TensorFlow when a GPU is present.
@pytest.mark.parametrize("mode", ["graph", "eager", "xla"])
def test_nan_batch_is_skipped_inside_the_step(tmp_path, mode):
    x, y = data()
    x[21, 3] = np.nan  # batch 1 of 16-sample batches
    model = classifier(run_eagerly=mode == "eager", jit_compile=mode == "xla")
    assert model.jit_compile == (mode == "xla")
    guard, rec = NanGuard(dump_dir=str(tmp_path)), Recorder()
    hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                     callbacks=[guard, rec])
    assert [r.step for r in guard.history] == list(range(8))
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (1, "input_nonfinite", "skip"), (5, "input_nonfinite", "skip")]
    assert all_finite(model)
    # The skipped step changed nothing: weights and optimizer state (iterations) as before.
    assert same(rec.before[1][0], rec.after[1][0])
    assert same(rec.before[1][1], rec.after[1][1])
    assert not same(rec.before[2][0], rec.after[2][0])
    assert np.isfinite(hist.history["loss"]).all()  # Keras's running mean leaves it out
    for name in LOG_NAMES:
        assert name in rec.logs[0]
    assert rec.logs[1]["nanguard_bad"] == 1.0
    assert np.isnan(rec.logs[1]["nanguard_loss"])
    assert rec.logs[2]["nanguard_loss"] == pytest.approx(guard.history[2].loss)
    entry = guard.history[2]
    assert entry["grad_norm"] == entry.grad_norm > 0
    assert entry.lr == pytest.approx(0.05)
    dump = nanguard.load(guard.dumps[0])
    assert dump.event.cause == "input_nonfinite"
    assert dump.event.step == 1
    assert np.isnan(dump.tensors["inputs"]).sum() == 1
    assert dump.history[-1].step == 1
    assert dump.meta["framework"] == "keras"


def test_tf_data_input_and_per_batch_loss(tmp_path):
    x, y = data(n=48)
    x[40] = np.inf  # the third batch
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(ds, epochs=1, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause) for e in guard.events] == [(2, "input_nonfinite")]
    # The recorded loss is the batch's own: the first step's loss matches a fresh evaluation.
    keras.utils.set_random_seed(0)
    fresh = classifier()
    first = float(fresh.compute_loss(x[:16], y[:16], fresh(x[:16])))
    assert guard.history[0].loss == pytest.approx(first, rel=1e-5)
    assert all_finite(model)


def test_labels_out_of_range_become_a_target_invalid_event(tmp_path):
    x, y = data()
    y[37] = 7  # batch 2, index 5; TensorFlow on the CPU would raise inside the step
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "target_invalid", "skip")
    assert "the first is 7 (batch row 5)" in event.message
    assert "ignore_class" not in event.message  # a positive id is no padding
    assert "Step 2" in event.message
    assert len(guard.history) == 4
    assert all_finite(model)


def naive_softmax(z):
    e = ops.exp(z)
    return e / ops.sum(e, axis=-1, keepdims=True)


def functional_softmax_model():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, name="hidden")(inputs)
    h = keras.layers.Activation(naive_softmax, name="naive_softmax")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


class SoftmaxBlock(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(16, name="hidden")
        self.act = keras.layers.Activation(naive_softmax, name="naive_softmax")

    def call(self, x):
        return self.act(self.dense(x))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = SoftmaxBlock(name="block")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x, training=False):
        return self.head(self.block(x))


def backbone_in_sequential(functional):
    """A pretrained-style backbone (a model of its own) inside a Sequential classifier."""
    if functional:
        inputs = keras.Input((8,))
        h = keras.layers.Dense(16, name="hidden")(inputs)
        h = keras.layers.Activation(naive_softmax, name="naive_softmax")(h)
        backbone = keras.Model(inputs, h, name="backbone")
    else:
        backbone = keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
            keras.layers.Activation(naive_softmax, name="naive_softmax")], name="backbone")
    return keras.Sequential([keras.Input((8,)), backbone, keras.layers.Dense(3, name="head")])


# A functional model is cut at every layer's output. A subclassed one has no graph to cut:
# the replay records every layer's calls instead and names the innermost layer to blame
# (the activation inside the custom block, not the block). A nested model (a backbone) is
# replayed in turn, and the layer inside it is named (where used to stop at "backbone").
@pytest.mark.parametrize("build", [
    functional_softmax_model, Subclassed,
    functools.partial(backbone_in_sequential, True),
    functools.partial(backbone_in_sequential, False)])
def test_naive_softmax_layer_is_localized_by_replay(tmp_path, capsys, build):
    x, y = data()
    x[32:48] *= 1e4  # batch 2
    model = build()
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "activation_nonfinite", "naive_softmax")
    dump = nanguard.load(guard.dumps[0])
    assert np.isfinite(dump.tensors["activation.naive_softmax.input"]).all()
    assert np.isnan(dump.tensors["activation.naive_softmax.output"]).any()
    report = inspect_json(guard.dumps[0], capsys)
    assert (report["step"], report["cause"], report["where"]) == (
        2, "activation_nonfinite", "naive_softmax")
    assert report["tensors"]["activation.naive_softmax.output"]["nan"] > 0
    assert all("call" not in vars(layer) for layer in model._flatten_layers())  # unwrapped
    assert all_finite(model)


def test_naive_softmax_output_layer_is_a_logits_cause(tmp_path):
    x, y = data()
    x[:16] *= 1e4
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(3, activation=naive_softmax, name="probs")])
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (0, "logits_nonfinite", "probs")]


# A shared (siamese) layer called on two branches: Keras's `layer.output` is its first call's
# only, so the replay records every call instead and names the shared layer on the branch
# whose call went bad (not the layer after it).
def test_a_shared_layer_is_named_on_the_call_that_went_bad(tmp_path, capsys):
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(64, 8)).astype("float32")
    xb = rng.normal(size=(64, 8)).astype("float32")
    xb[16:32] *= 100.0  # batch 1: only branch b overflows the shared naive softmax
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    enc = keras.layers.Dense(16, name="shared_enc")
    sm = keras.layers.Activation(naive_softmax, name="shared_sm")
    h = keras.layers.Concatenate(name="concatenate")([sm(enc(a)), sm(enc(b))])
    model = keras.Model([a, b], keras.layers.Dense(3, name="head")(h))
    model.compile(keras.optimizers.Adam(),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit([xa, xb], rng.integers(0, 3, 64), batch_size=16, epochs=1, shuffle=False,
              verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (1, "activation_nonfinite", "shared_sm")]
    dump = nanguard.load(guard.dumps[0])
    assert np.isfinite(dump.tensors["activation.shared_sm.input"]).all()
    assert np.isnan(dump.tensors["activation.shared_sm.output"]).any()
    assert inspect_json(guard.dumps[0], capsys)["where"] == "shared_sm"
    assert all("call" not in vars(layer) for layer in model._flatten_layers())  # unwrapped
    assert all_finite(model)


# Every input of the blamed layer is in the dump (`.input.<i>` for several), not just the first.
def test_every_input_of_the_blamed_layer_is_dumped(tmp_path):
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(64, 8)).astype("float32")
    xb = rng.normal(size=(64, 8)).astype("float32")
    xb[16:32] *= 1e4
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    ha = keras.layers.Dense(4, name="da")(a)
    hb = keras.layers.Dense(4, name="db")(b)
    joint = keras.layers.Lambda(lambda t: naive_softmax(ops.concatenate(t, -1)),
                                name="joint_sm")([ha, hb])
    model = keras.Model([a, b], keras.layers.Dense(3, name="head")(joint))
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit([xa, xb], rng.integers(0, 3, 64), batch_size=16, epochs=1, shuffle=False,
              verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (1, "activation_nonfinite", "joint_sm")]
    tensors = nanguard.load(guard.dumps[0]).tensors
    names = sorted(n for n in tensors if n.startswith("activation."))
    assert names == ["activation.joint_sm.input.0", "activation.joint_sm.input.1",
                     "activation.joint_sm.output"]
    assert tensors["activation.joint_sm.input.0"].shape == (16, 4)
    assert np.abs(tensors["activation.joint_sm.input.1"]).max() > 100  # branch b's overflow
    assert np.isfinite(tensors["activation.joint_sm.input.1"]).all()
    assert np.isnan(tensors["activation.joint_sm.output"]).any()


def _masked(h):  # an attention mask: the last two positions are padding, -inf on purpose
    keep = ops.arange(ops.shape(h)[-1]) < ops.shape(h)[-1] - 2
    return ops.where(keep, h, -np.inf)


def masked_sequential():
    return keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(8, name="fd"),
        keras.layers.Lambda(_masked, name="attn_mask"),
        keras.layers.Activation(naive_softmax, name="naive_sm"),
        keras.layers.Dense(3, name="head")])


def masked_functional():
    inputs = keras.Input((8,))
    h = keras.layers.Lambda(_masked, name="attn_mask")(keras.layers.Dense(8, name="fd")(inputs))
    h = keras.layers.Activation(naive_softmax, name="naive_sm")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


class MaskedSubclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fd = keras.layers.Dense(8, name="fd")
        self.mask = keras.layers.Lambda(_masked, name="attn_mask")
        self.sm = keras.layers.Activation(naive_softmax, name="naive_sm")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.sm(self.mask(self.fd(x))))


# allow_neg_inf names layers whose -inf outputs are intended (names or fnmatch patterns): the
# replay passes over them and over the -inf flowing on from them, and names the layer that
# really overflowed (the naive softmax); without it the mask is blamed.
@pytest.mark.parametrize("build", [masked_sequential, masked_functional, MaskedSubclassed])
@pytest.mark.parametrize(("allow", "where"), [
    ((), "attn_mask"), (("attn_mask",), "naive_sm"), (("attn_*",), "naive_sm")])
def test_allow_neg_inf_layers_are_not_blamed_for_their_minus_inf(tmp_path, build, allow, where):
    x, y = data()
    x[16:32] *= 1e4  # batch 1: the naive softmax overflows (exp -> inf, inf / inf -> NaN)
    model = build()
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path), allow_neg_inf=allow)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (1, "activation_nonfinite", where)]
    tensors = nanguard.load(guard.dumps[0]).tensors
    if allow:  # the -inf came in from the mask: in the dumped input, not blamed
        assert np.isneginf(tensors["activation.naive_sm.input"]).any()
        assert np.isnan(tensors["activation.naive_sm.output"]).any()
    assert all_finite(model)


def test_custom_loss_dividing_by_relu_sum(tmp_path, capsys):
    def ratio_loss(y_true, y_pred):
        return ops.sum(ops.square(y_true - y_pred)) / ops.sum(y_pred)

    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(64, 4))).astype("float32")
    x[16:32] = 0.0  # batch 1: every ReLU output is 0
    y = rng.random((64, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        2, activation="relu", use_bias=False, kernel_initializer="ones", name="out")])
    model.compile(keras.optimizers.SGD(0.001), ratio_loss)
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause) == (1, "loss_nonfinite")
    assert inspect_json(guard.dumps[0], capsys)["cause"] == "loss_nonfinite"
    assert all_finite(model)


def test_unscaled_inputs_with_sgd_diverge_then_abort(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(256, 8)) * 1e4).astype("float32")
    y = (x.sum(1, keepdims=True) * 0.1).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-8), "mse")
    guard = NanGuard(dump_dir=str(tmp_path), lr_factor=0.9)
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        model.fit(x, y, batch_size=32, epochs=10, verbose=0, callbacks=[guard])
    first = guard.events[0]
    assert first.cause == "grad_explosion"
    assert first.step == next(r.step for r in guard.history if not np.isfinite(r.grad_norm))
    assert "grew from" in first.message
    assert info.value.event.cause in ("grad_explosion", "grad_nonfinite")
    assert all_finite(model)  # no bad update ever reached the weights
    lrs = [r.lr for r in guard.history if r.action == "rollback"]
    assert lrs == sorted(lrs, reverse=True)
    assert len(lrs) == 3


def test_rollback_is_bit_identical_and_lowers_a_float_lr(tmp_path):
    x, y = data(n=128)
    x[80:96, 0] = np.nan  # batch 5
    model = classifier(optimizer=keras.optimizers.Adam(0.01))
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=0, snapshot_every=2)
    rec = Recorder()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard, rec])
    assert [(e.step, e.action) for e in guard.events] == [(5, "rollback")]
    snap = guard.snapshot_step
    assert snap == 4
    # Model weights and Adam state (moments, iterations) after the rollback: exactly the
    # state before step 4.
    assert same(rec.after[5][0], rec.before[snap][0])
    assert same(rec.after[5][1], rec.before[snap][1])
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == np.float32(0.005)
    assert guard.history[6].lr == pytest.approx(0.005)
    assert guard.history[4].lr == pytest.approx(0.01)
    assert all_finite(model)


def test_lower_lr_scales_a_learning_rate_schedule(tmp_path):
    x, y = data()
    x[16:32] = np.nan  # batch 1
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.9)
    model = classifier(optimizer=keras.optimizers.SGD(schedule))
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [e.action for e in guard.events] == ["rollback"]
    h = guard.history
    # Step 2 runs at optimizer iteration 0 again (rolled back to the snapshot before step 0),
    # at half the schedule's rate; step 3 at iteration 1.
    assert h[0].lr == pytest.approx(0.1)
    assert h[2].lr == pytest.approx(0.05)
    assert h[3].lr == pytest.approx(0.1 * 0.9 * 0.5)
    assert model.optimizer._learning_rate is schedule  # the user's schedule is put back


def test_learning_rate_scheduler_cannot_undo_lower_lr(tmp_path):
    x, y = data()
    x[0] = np.nan  # the first batch of every epoch
    model = classifier(lr=0.1)
    sched = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1)
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=0)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[guard, sched])
    assert [e.action for e in guard.events] == ["rollback", "rollback"]
    assert guard.history[1].lr == pytest.approx(0.05)
    assert guard.history[5].lr == pytest.approx(0.025)  # kept through the scheduler's reset


def test_clip_grad_norm_bounds_the_update(tmp_path):
    x, y = data(n=16)
    x *= 50
    model = classifier(lr=0.1)
    before = weights(model)
    guard = NanGuard(dump_dir=str(tmp_path), clip_grad_norm=0.5)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard])
    norm = guard.history[0].grad_norm
    assert norm > 5  # recorded before clipping
    moved = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(weights(model), before, strict=False)))
    assert moved == pytest.approx(0.1 * 0.5, rel=1e-3)


def test_static_loss_scale_factor_reads_and_clips_the_true_gradients(tmp_path):
    # SGD(loss_scale_factor=1024): Keras scales the loss and divides the gradients back in
    # `apply`. The recorded norm and the clip are of the true gradients, not 1024x them.
    x, y = data(n=16)
    x *= 50
    norms, moved = [], []
    for factor in (None, 1024.0):
        keras.utils.set_random_seed(0)
        model = classifier(optimizer=keras.optimizers.SGD(0.1, loss_scale_factor=factor))
        before = weights(model)
        guard = NanGuard(dump_dir=str(tmp_path), clip_grad_norm=0.5)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard])
        norms.append(guard.history[0].grad_norm)
        moved.append(np.sqrt(sum(((a - b) ** 2).sum()
                                 for a, b in zip(weights(model), before, strict=True))))
    assert norms[1] == pytest.approx(norms[0], rel=1e-4) and norms[0] > 5
    assert moved[1] == pytest.approx(0.1 * 0.5, rel=1e-3)


def test_update_that_overflows_is_rolled_back_at_once(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = (rng.normal(size=(32, 1)) * 100).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, name="lin")])
    model.compile(keras.optimizers.SGD(3e38), "mse")
    before = weights(model)
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip", "rollback"), max_rollbacks=1)
    rec = Recorder()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard, rec])
    first = guard.events[0]
    assert (first.step, first.cause, first.action) == (0, "update_nonfinite", "rollback")
    assert "lin" in first.where
    assert same(rec.after[0][0], before)  # restored within the same step
    assert inspect_json(guard.dumps[0], capsys)["cause"] == "update_nonfinite"
    # Rollbacks used up and no abort in `actions`: the update reached the weights and only
    # the snapshot undoes it: the skip puts the non-finite variables (and their optimizer
    # slots) back from it, so the run does not train on from Inf weights (it was logged).
    assert guard.events[1].action == "skip" and "back from the last finite snapshot" in (
        guard.events[1].message)
    assert any(p.endswith("lin/kernel") for p in guard.events[1].details["repaired"])
    assert all(same(after[0], before) for after in rec.after[1:])
    assert all_finite(model)


def test_weights_corrupted_between_batches_are_dumped_by_name(tmp_path):
    # A callback (a manual edit, a bad checkpoint load) writes a NaN into a kernel: the
    # event names the variable and the dump holds it as it was, without dump_state asking
    # for the whole state.
    x, y = data()

    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                kernel = self.model.get_layer("head").kernel
                value = keras.ops.convert_to_numpy(kernel).copy()
                value[0, 0] = np.nan
                kernel.assign(value)

    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Corrupt(), guard])
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (2, "weights_nonfinite", "rollback")
    dump = nanguard.load(guard.dumps[0])
    kernel = dump.tensors[f"localized.{event.where}"]
    assert "kernel" in event.where and kernel.shape == (16, 3) and np.isnan(kernel[0, 0])
    assert dump.state == {}
    assert all_finite(model)


def test_optimizer_state_corrupted_between_batches_is_weights_nonfinite(tmp_path):
    # Adam's velocity holds a NaN before a step: the step's finite gradients carry it into
    # the weights. The cause is the state that was already non-finite, not an update that
    # was too large (which would say "lower the learning rate").
    x, y = data()

    class CorruptSlot(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                slot = next(v for v in self.model.optimizer.variables
                            if v.path.endswith("hidden_kernel_velocity"))
                value = keras.ops.convert_to_numpy(slot).copy()
                value[0, 0] = np.nan
                slot.assign(value)

    model = classifier(optimizer=keras.optimizers.Adam(1e-3))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[CorruptSlot(), guard])
    event = guard.events[0]
    assert (event.step, event.cause, event.action) == (2, "weights_nonfinite", "rollback")
    assert event.where.startswith("optimizer.") and event.where.endswith("velocity")
    assert "optimizer's state was non-finite" in event.message
    dump = nanguard.load(guard.dumps[0])
    slot = dump.tensors[f"localized.{event.where}"]
    assert slot.shape == (8, 16) and np.isnan(slot[0, 0])
    assert all_finite(model) and all(np.isfinite(a).all() for a in optimizer_state(model))


def test_weights_blown_up_but_finite_are_named_with_the_learning_rate(tmp_path):
    # A one-batch LR spike leaves the variables finite but ~1e35; the next batch's output
    # overflows. The message says the weights are huge (not "an unstable operation").
    x, y = data()

    class Spike(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate.assign(1e36 if batch == 2 else 0.01)

    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Spike(), guard])
    event = guard.events[0]
    assert (event.step, event.cause) == (3, "logits_nonfinite")
    assert "finite but huge" in event.message and "learning rate" in event.message
    peak = nanguard.load(guard.dumps[0]).event.details["weights_peak"]
    assert "kernel" in peak["name"] and 1e8 <= peak["value"] < 3.4e38
    assert all_finite(model)


def test_an_abort_on_an_overflowed_update_leaves_the_snapshot_in_the_model(tmp_path):
    # The update reached the variables before the check saw it; no rollback rung, so the
    # run aborts. The dump keeps the non-finite state; the model fit leaves behind is the
    # last finite snapshot's (step 0's, before any update), bit for bit.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = (rng.normal(size=(32, 1)) * 100).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, name="lin")])
    model.compile(keras.optimizers.SGD(3e38), "mse")
    before = weights(model)
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip", "abort"))
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    event = info.value.event
    assert (event.step, event.cause, event.action) == (0, "update_nonfinite", "abort")
    assert "back to the last finite snapshot" in event.message
    assert same(weights(model), before)
    dump = nanguard.load(info.value.dump_path)
    kernels = [v for k, v in dump.state.items() if k.startswith("model.")]
    assert kernels and not all(np.isfinite(v).all() for v in kernels)


def test_every_step_bad_aborts_out_of_fit_keeping_backups(tmp_path, capsys):
    x, y = data()
    x[:] = np.nan
    backup = tmp_path / "backup"
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=1, max_rollbacks=1)
    bar = keras.callbacks.BackupAndRestore(str(backup), save_freq=1)
    with pytest.raises(nanguard.NonFiniteTrainingError) as info:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard, bar])
    err = info.value
    assert [e.action for e in guard.events] == ["skip", "rollback", "skip", "abort"]
    assert err.event.step == 3
    assert err.event.cause == "input_nonfinite"
    dump = nanguard.load(err.dump_path)
    assert dump.event.step == 3
    assert [h.step for h in dump.history] == [0, 1, 2, 3]
    assert any(k.startswith("model.") for k in dump.state)  # an abort dumps the state
    report = inspect_json(err.dump_path, capsys)
    assert (report["step"], report["cause"]) == (3, "input_nonfinite")
    assert report["tensors"]["inputs"]["nan"] == 16 * 8
    assert backup.exists()
    assert any(backup.iterdir())
    assert all_finite(model)
    # The model is unpatched: it trains again without the guard.
    assert "train_step" not in vars(model)
    assert "apply" not in vars(model.optimizer)
    model.fit(*data(), batch_size=16, epochs=1, verbose=0)


def test_custom_train_step_falls_back_to_loss_only_with_a_warning(tmp_path):
    class Custom(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=False))
            self._loss_tracker.update_state(loss)
            return {"loss": self._loss_tracker.result()}

    inputs = keras.Input((8,))
    model = Custom(inputs, keras.layers.Dense(3)(inputs))
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    x[20] = np.nan
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=1)
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.fallback
    # The NaN update already landed (loss-only); the snapshot of that very step (taken
    # before it, snapshot_every=1) undoes just it: a skip, judged on the state before it.
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (1, "loss_nonfinite", "skip")]
    assert all_finite(model)


def test_guard_is_reusable_and_resets_on_train_begin(tmp_path):
    x, y = data()
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard])
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard])
    assert [r.step for r in guard.history] == [0, 1, 2, 3]
    assert not guard.events
    assert model.train_function is None or "nanguard" not in repr(model.train_function)


def test_import_nanguard_does_not_import_keras():
    code = "import sys, nanguard, nanguard.cli; print('keras' in sys.modules)"
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, env=env).stdout
    assert out.strip() == "False"


def test_shared_options_have_the_contract_names_and_defaults():
    from tests._options import assert_shared_options

    assert_shared_options(NanGuard)


class _HugeUnused(keras.layers.Layer):
    """Passes its input through; holds a trainable weight near float32's maximum."""

    def build(self, input_shape):
        self.huge = self.add_weight(shape=(4,), initializer=keras.initializers.Constant(3e38))

    def call(self, x):
        return x


def test_huge_finite_weights_are_not_a_bad_update(tmp_path):
    # The in-step weight check sums each variable (4 x 3e38 overflows float32): the host
    # must confirm element-wise before calling the update bad.
    model = keras.Sequential([keras.Input((8,)), _HugeUnused(),
                              keras.layers.Dense(3, name="head")])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    guard = NanGuard(dump_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: no gradient for the unused weight
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[guard])
    assert guard.events == []
    assert [r.action for r in guard.history] == [None] * 8
    assert np.isfinite(model.layers[0].huge.numpy()).all()


class _CountingSequential(keras.Sequential):
    """Counts Python runs of compute_loss: in compiled `fit` these are traces of the step."""

    traces = 0

    def compute_loss(self, *args, **kwargs):
        type(self).traces += 1
        return super().compute_loss(*args, **kwargs)


def test_later_fits_reuse_the_instrumented_step_and_still_guard(tmp_path):
    model = _CountingSequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(3, name="head")], name="counting")
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    bad = x.copy()
    bad[20, 0] = np.nan  # batch 1 of 4
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    traces = _CountingSequential.traces
    assert traces >= 1 and guard.events == []

    model.fit(bad, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    assert _CountingSequential.traces == traces  # no retrace for a second fit
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (1, "input_nonfinite", "skip")
    assert all_finite(model)

    # A new compile changes the step: it is rebuilt, and still guarded.
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(bad, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    assert _CountingSequential.traces > traces
    (event,) = guard.events
    assert (event.step, event.cause) == (1, "input_nonfinite")
    assert all_finite(model)

    # Without the guard, fit is Keras's own again: the NaN batch reaches the weights.
    model.fit(bad, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert not all_finite(model)


def test_later_fit_with_a_schedule_lowers_the_rate_again(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1000, 0.9)
    model = classifier(optimizer=keras.optimizers.SGD(schedule))
    x, y = data()
    bad = x.copy()
    bad[:, 0] = np.nan  # every batch bad: the ladder climbs to a rollback with lower_lr
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=1, actions=("skip", "rollback",
                                                                     "lower_lr"))
    first_lr = 0.05
    for _ in range(2):
        # The schedule is left as it was: a new guard would train at its full rate again.
        with pytest.warns(RuntimeWarning, match="only a later fit with this same NanGuard "
                                                "keeps the lowering"):
            model.fit(bad, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                      callbacks=[guard])
        assert model.optimizer._learning_rate is schedule  # the user's schedule is back
        actions = [r.action for r in guard.history]
        assert actions == ["skip", "rollback", "skip", "rollback"]
        lrs = [r.lr for r in guard.history]
        # Lowered at each rollback, and the lowering carries into the next fit.
        assert lrs == pytest.approx([first_lr, first_lr, first_lr / 2, first_lr / 2], rel=1e-3)
        first_lr /= 4
        assert all_finite(model)


class _ZeroSqrt(keras.layers.Layer):
    """Forward 0; backward sqrt'(0) * 0 = Inf * 0 = NaN: a NaN made in the backward, at any
    loss scale."""

    def call(self, x):
        return keras.ops.sqrt(keras.ops.abs(x) * 0.0)


def test_loss_scale_optimizer_skips_end_below_a_scale_of_one(tmp_path):
    # Gradients non-finite at every scale were the LossScaleOptimizer's own skips forever
    # (its scale fell from 2**15 to 2e-7 with no event): below a scale of 1 they are events.
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, dtype="mixed_float16", name="hidden")(inp)
    h = keras.layers.Add(dtype="mixed_float16")([h, _ZeroSqrt(dtype="mixed_float16")(h)])
    model = keras.Model(inp, keras.layers.Dense(3, dtype="float32", name="head")(h))
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05),
                                              initial_scale=2.0**15)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",))
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[guard])
    assert guard.amp_skips == 16  # 2**15 halved to 0.5
    assert [r.cause for r in guard.history[:16]] == ["amp_scaler_skip"] * 16
    first = guard.events[0]
    assert (first.step, first.cause, first.action) == (16, "grad_nonfinite", "skip")
    assert first.details["amp_scale"] == 0.5
    assert "LossScaleOptimizer has lowered its scale to 0.5" in first.message
    assert len(guard.events) == len(guard.history) - 16  # every later step
    assert all_finite(model)


def test_a_float16_overflow_in_a_mixed_float16_layer_is_named_as_such(tmp_path):
    # A plain Dense computing in float16 overflows from finite inputs: the message pointed
    # at "an exp, log, pow or division" (as a black-box tester saw on torch's autocast).
    x, y = data(32)
    x[16:24] *= 1e5  # the third batch of 8
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, dtype="mixed_float16", name="hid16"),
                              keras.layers.Dense(3, dtype="float32", name="head")])
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (2, "activation_nonfinite", "hid16")
    assert event.details["activation_dtype"] == "float16"
    assert event.details["activation_input_peak"] == pytest.approx(float(np.abs(x[16:24]).max()))
    assert "in float16" in event.message and "exp, log, pow" not in event.message
    assert all_finite(model)


@pytest.mark.parametrize(("scale", "cause"), [(1e18, "grad_nonfinite"),
                                              (1e20, "loss_nonfinite")])
def test_huge_finite_inputs_are_named_in_the_message(tmp_path, scale, cause):
    # An L2 activity penalty on the activations of inputs of 1e18 to 1e20 overflows: the
    # messages said "inputs ... moderate ... divides by ~0" or "backward is unstable (sqrt,
    # pow or log at 0)" and never named the inputs (a black-box tester).
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, name="h", activity_regularizer=keras.regularizers.L2(1.0))(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="out", activation="tanh")(h))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(64)
    x[24:32] *= scale
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    event = guard.events[0]
    assert (event.step, event.cause) == (3, cause)
    assert event.details["inputs_peak"] == pytest.approx(float(np.abs(x[24:32]).max()))
    assert "scale or normalise the inputs" in event.message and all_finite(model)


def _float16_classifier(initial_scale, **compile_kw):
    """A float16 hidden layer under a LossScaleOptimizer starting at ``initial_scale``."""
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", dtype="mixed_float16"),
        keras.layers.Dense(3, dtype="float32", name="head"),
    ])
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05),
                                              initial_scale=initial_scale)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **compile_kw)
    return model, opt


def test_loss_scale_optimizer_skips_are_its_own(tmp_path):
    # float16 layers and a loss scale far too large: the scaled gradients overflow, the
    # LossScaleOptimizer skips those steps and halves its scale. nanguard counts them and
    # does not act; a NaN batch is still an event. The recorded norms are the unscaled ones.
    model, opt = _float16_classifier(2.0**24)
    x, y = data()
    x[20, 0] = np.nan  # batch 1 of every epoch
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False, callbacks=[guard])
    skipped = [r for r in guard.history if r.cause == "amp_scaler_skip"]
    assert guard.amp_skips == len(skipped) >= 1
    assert all(r.action is None and math.isfinite(r.loss) for r in skipped)
    assert {(e.cause, e.action) for e in guard.events} == {("input_nonfinite", "skip")}
    assert [e.step for e in guard.events] == [1, 5, 9, 13, 17]
    applied = [r for r in guard.history if r.cause is None]
    assert applied and all(0 < r.grad_norm < 100 for r in applied)  # unscaled
    assert float(opt.dynamic_scale.numpy()) < 2.0**24
    assert all_finite(model)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_steps_per_execution_names_a_bad_batch_inside_an_execution(tmp_path, mode):
    # With steps_per_execution > 1 Keras hands the host only each execution's last logs:
    # the step keeps the first bad batch of the execution (stats and tensors) for the
    # guard, and a step is a batch, as Keras counts them.
    x, y = data(n=128)  # 8 batches of 16: two executions of 4
    x[21, 3] = np.nan  # batch 1, not the last step of its execution
    model = classifier(run_eagerly=mode == "eager")
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4, run_eagerly=mode == "eager")
    guard, rec = NanGuard(dump_dir=str(tmp_path)), Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing left to warn about
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    assert all_finite(model)  # the NaN batch's update never reached the weights
    assert [(r.step, r.action) for r in guard.history] == [
        (1, "skip"), (3, None), (7, None), (9, "skip"), (11, None), (15, None)]
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (1, "input_nonfinite", "inputs"), (9, "input_nonfinite", "inputs")]
    dump = nanguard.load(guard.dumps[0])
    np.testing.assert_array_equal(dump.tensors["inputs"], x[16:32])  # the bad batch's
    np.testing.assert_array_equal(dump.tensors["targets"], y[16:32])
    assert dump.tensors["output"].shape == (16, 3)
    assert dump.event.details["bad_batches_in_execution"] == 1
    assert len(rec.logs) == 4 and all("nanguard_grad_norm" in logs for logs in rec.logs)
    assert [logs["nanguard_bad"] for logs in rec.logs] == [1.0, 0.0, 1.0, 0.0]
    assert not guard._batch_logs  # every execution's stats were handed to Keras's logs


def test_steps_per_execution_healthy_run_matches_an_unguarded_one(tmp_path):
    x, y = data(n=128)
    out = []
    for guarded in (False, True):
        keras.utils.set_random_seed(0)
        model = classifier()
        model.compile(keras.optimizers.Adam(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      steps_per_execution=3)  # 8 batches: executions of 3, 3 and 2
        guard = NanGuard(dump_dir=str(tmp_path))
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                  callbacks=[guard] if guarded else [])
        out.append(weights(model))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r.step for r in guard.history] == [2, 5, 7, 10, 13, 15]
    assert not guard.events


def _spe_fit(tmp_path, spe, bad_batches, n=128, **guard_kw):
    x, y = data(n=n)
    for b in bad_batches:
        x[16 * b + 1, 0] = np.nan
    keras.utils.set_random_seed(0)
    model = classifier()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=spe)
    guard, rec = NanGuard(dump_dir=str(tmp_path / f"spe{spe}"), **guard_kw), Recorder()
    hist = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                     callbacks=[guard, rec])
    return model, guard, rec, hist


def test_steps_per_execution_climbs_the_ladder_as_one_batch_at_a_time(tmp_path):
    # Healthy batches between bad ones inside an execution end the run of skips, as they
    # do one batch at a time (they did not: 3 "consecutive" skips, a rollback undoing the
    # good batches, the rate halved).
    runs = {spe: _spe_fit(tmp_path, spe, [1, 3, 5, 7], max_skips=1) for spe in (1, 4)}
    for spe, (_, guard, _, _) in runs.items():
        assert [(e.step, e.action) for e in guard.events] == [
            (1, "skip"), (3, "skip"), (5, "skip"), (7, "skip")], spe
        assert all(e.details["reason"] == "skip 1 of 1" for e in guard.events), spe
    for a, b in zip(weights(runs[1][0]), weights(runs[4][0]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3], [1, 2, 3, 5, 6]])
def test_steps_per_execution_counts_the_bad_batches_it_does_not_record(tmp_path, bad):
    # Bad batches between an execution's first and last bad one are not recorded, but the
    # ladder counts them (they counted toward neither max_skips nor total_bad: four NaN
    # batches in a row never rolled back).
    runs = {spe: _spe_fit(tmp_path, spe, bad, snapshot_every=1) for spe in (1, 4)}
    one, four = (runs[spe][1] for spe in (1, 4))
    assert four.session.ladder == one.session.ladder
    recorded = {r.step: r.action for r in one.history}
    assert all(recorded[e.step] == e.action for e in four.events)


def test_steps_per_execution_epoch_logs_and_log_every(tmp_path):
    # The epoch's loss mean leaves out just the bad batch (it read NaN when an execution's
    # last batch was bad); log_every=2 puts the stats in every execution's logs that
    # covers a multiple of 2 (none did: only the last batch's step was tested).
    _, _, _, one = _spe_fit(tmp_path, 1, [3], n=64)
    _, guard, rec, four = _spe_fit(tmp_path, 4, [3], n=64, log_every=2)
    assert four.history["loss"] == pytest.approx(one.history["loss"], rel=1e-6)
    assert math.isfinite(four.history["loss"][0])
    _, guard, rec, _ = _spe_fit(tmp_path, 4, [], log_every=2)
    assert [("nanguard_grad_norm" in logs) for logs in rec.logs] == [True] * 2


def test_steps_per_execution_log_only_lets_the_update_through(tmp_path):
    # actions=(): as with one batch per call, a bad update reaches the weights and the step
    # reads "log" (inside an execution it was kept out, yet read "log").
    for spe in (1, 4):
        model, guard, _, _ = _spe_fit(tmp_path, spe, [1], n=64, actions=())
        assert guard.events[0].step == 1 and guard.events[0].action == "log", spe
        assert not all_finite(model), spe


def test_steps_per_execution_keeps_64_bit_ids_exactly(tmp_path):
    # The kept batch travels as float64: 64-bit integers as their bits (2**60 + k all read
    # 2**60 as values).
    n = 64
    f, y = data(n=n)
    ids = (2**60 + np.arange(n, dtype=np.int64) * 7 + 1).reshape(n, 1)
    f[21, 3] = np.nan  # batch 1
    fi, ii = keras.Input((8,), name="f"), keras.Input((1,), dtype="int64", name="id")
    z = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") * 0.0)(ii)
    h = keras.layers.Concatenate()([keras.layers.Dense(4)(fi), z])
    model = keras.Model({"f": fi, "id": ii}, keras.layers.Dense(3)(h))
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit({"f": f, "id": ids}, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard])
    (event,) = guard.events
    assert event.step == 1
    tensors = nanguard.load(guard.dumps[0]).tensors
    np.testing.assert_array_equal(tensors["inputs.id"], ids[16:32])
    np.testing.assert_array_equal(tensors["targets"], y[16:32])


def test_steps_per_execution_a_scalers_skip_does_not_hide_a_bad_batch(tmp_path):
    # A LossScaleOptimizer's own skips (a loss scale far too large) at the execution's first
    # batches are no event; the NaN batch after them in the same execution is one (the
    # memo kept the first skip as the execution's "first bad batch").
    model, opt = _float16_classifier(2.0**40, steps_per_execution=8)
    x, y = data(n=128)
    x[16 * 6, 0] = np.nan  # batch 6 of the one execution
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    skips = round(math.log2(2.0**40 / float(opt.dynamic_scale.numpy())))
    assert skips >= 1 and guard.amp_skips == skips  # its own, counted inside the execution
    assert [(e.step, e.cause) for e in guard.events] == [(6, "input_nonfinite")]
    assert all_finite(model)


def test_steps_per_execution_with_xla_keeps_the_stats_and_the_steps_checks(tmp_path):
    # XLA cannot keep tensors of a changing shape: the first bad batch's stats, and the
    # batch checks made inside the step, name it; its dump has no batch.
    x, y = data(n=192)  # 12 batches: three executions of 4
    x[21, 3] = np.nan  # batch 1
    weights_in = np.ones(192, "float32")
    weights_in[85] = np.inf  # batch 5: a sample weight (it was named as the inputs)
    y[150] = 7  # batch 9: a label outside [0, 3)
    model = classifier(jit_compile=True)
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4, jit_compile=True)
    guard = NanGuard(dump_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="XLA"):
        model.fit(x, y, sample_weight=weights_in, batch_size=16, epochs=1, shuffle=False,
                  verbose=0, callbacks=[guard])
    assert all_finite(model)
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (1, "input_nonfinite", "inputs"), (5, "input_nonfinite", "sample_weight"),
        (9, "target_invalid", "targets")]
    assert all("checked inside the step" in e.message for e in guard.events)
    assert [r.step for r in guard.history] == [1, 3, 5, 7, 9, 11]
    assert "inputs" not in nanguard.load(guard.dumps[0]).tensors


@pytest.mark.parametrize("jit", [False, True])
def test_steps_per_execution_hidden_nan_is_not_blamed_on_the_output_layer(tmp_path, jit):
    # Under XLA the execution keeps a bad batch's stats, not the batch: no layer is replayed.
    # The event named the output layer ('out') for a hidden sqrt's NaN, as "the model
    # output" (a black-box tester). Without XLA the replay names the hidden layer.
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, name="h")(inp)
    h = keras.layers.Lambda(lambda t: keras.ops.sqrt(t + 3.0), name="sq")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4, jit_compile=jit)
    x = rng.normal(size=(96, 8)).astype("float32") * 0.3
    x[10 * 8 + 3] = 40.0  # batch 10: the third of its execution
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=1)
    model.fit(x, rng.integers(0, 3, 96), batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[guard])
    first = guard.events[0]
    assert first.step == 10 and all_finite(model)
    if jit:
        assert (first.cause, first.where) == ("logits_nonfinite", None)
        assert "Which layer started it is unknown" in first.message
    else:
        assert (first.cause, first.where) == ("activation_nonfinite", "sq")


def test_steps_per_execution_bad_update_inside_an_execution(tmp_path):
    # An update from finite gradients that overflows the weights, at an execution's first
    # batch: that batch is named (update_nonfinite), not the NaN batches after it.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = (rng.normal(size=(128, 1)) * 100).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, name="lin")])
    model.compile(keras.optimizers.SGD(1e-3), "mse", steps_per_execution=4)

    class Spike(keras.callbacks.Callback):  # a rate that overflows, for the 2nd execution
        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate.assign(3e38 if batch == 4 else 1e-3)

    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip", "rollback"))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Spike(), guard])
    first = guard.events[0]
    assert (first.step, first.cause, first.action) == (4, "update_nonfinite", "rollback")
    assert "lin" in first.where
    # The execution's last batch ran on those weights: recorded, not a second event (it
    # was one, logits_nonfinite "while its weights are finite", and a skip counted).
    assert len(guard.events) == 1
    assert guard.session.ladder.total_bad == 1
    assert all_finite(model)


def test_epoch_logs_reach_csv_logger_and_history(tmp_path):
    import csv

    x, y = data()
    x[21, 3] = np.nan  # batch 1 of every epoch
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    csv_path = tmp_path / "log.csv"
    hist = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                     callbacks=[guard, keras.callbacks.CSVLogger(str(csv_path))])
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["nanguard_bad_steps"]) for r in rows] == [1.0, 2.0]  # so far in the fit
    assert [float(r["nanguard_rollbacks"]) for r in rows] == [0.0, 0.0]
    for epoch, row in enumerate(rows):
        norms = [h.grad_norm for h in guard.history[4 * epoch: 4 * epoch + 4]]
        expected = max(n for n in norms if math.isfinite(n))
        assert float(row["nanguard_grad_norm_max"]) == pytest.approx(expected)
        assert float(row["nanguard_lr"]) == pytest.approx(0.05)
    assert hist.history["nanguard_bad_steps"] == [1.0, 2.0]


def test_nan_batch_leaves_batchnorm_moving_statistics_finite(tmp_path):
    # The forward of the skipped step already wrote the moving statistics: without a repair
    # they stay NaN and every later predict() is NaN. A skip, not a rollback: the learning
    # rate is not lowered.
    x, y = data(n=96)
    x[50, 0] = np.nan  # batch 3
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                              keras.layers.Dense(3)], name="net")
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.action) for e in guard.events] == [(3, "input_nonfinite", "skip")]
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    details = nanguard.load(guard.dumps[0]).event.details
    assert sorted(details["nonfinite_buffers"]) == [
        "net/bn/moving_mean", "net/bn/moving_variance"]
    assert all(np.isfinite(v.numpy()).all() for v in model.non_trainable_variables)
    assert np.isfinite(model.predict(np.nan_to_num(x), verbose=0)).all()


def test_labels_the_loss_ignores_are_not_invalid(tmp_path):
    x, y = data()
    y[::5] = -1  # ignored by the loss in every batch
    y[40] = 7  # batch 2: a real fault
    model = classifier()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "target_invalid")
    assert "the first is 7" in event.message
    assert all_finite(model)


def test_a_bad_sequence_label_is_named_by_its_batch_row_and_position(tmp_path):
    # Tagging (B, T) labels padded with -1: the first bad id is named by its row in the batch
    # and its position in that row (not a flat index into B * T), with the loss option that
    # ignores it.
    rng = np.random.default_rng(0)
    x, y = rng.integers(1, 30, (64, 10)), rng.integers(0, 5, (64, 10))
    y[40, 7:] = -1  # row 8 of batch 1
    model = keras.Sequential([keras.Input((10,), dtype="int32"), keras.layers.Embedding(30, 8),
                              keras.layers.Dense(5, name="tag")])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (1, "target_invalid", "targets")
    assert "3 class id(s) outside [0, 5), the first is -1 (batch row 8, position 7)" in (
        event.message)
    assert "SparseCategoricalCrossentropy(ignore_class=-1)" in event.message


# -- Keras's running means leave a skipped batch out ------------------------------------------

def _fit_loss_logs(build, x, y, mode, guard=None):
    model = build()
    model.compile(**model.compile_args, run_eagerly=mode == "eager",
                  jit_compile=mode == "xla")
    hist = model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                     callbacks=[guard] if guard else [])
    return model, {k: v[0] for k, v in hist.history.items() if not k.startswith("nanguard")}


def _sqrt_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False),
                              keras.layers.Lambda(lambda z: ops.sqrt(ops.abs(z)))])
    # lr 0: the weights never move, so the batches of two runs are comparable
    model.compile_args = {"optimizer": keras.optimizers.SGD(0.0), "loss": "mse"}
    return model


def _two_heads_model():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((8,), name="feat"), keras.Input((4,), name="aux")
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"feat": a, "aux": b}, {"cls": keras.layers.Dense(5, name="cls")(h),
                                                "reg": keras.layers.Dense(1, name="reg")(h)})
    model.compile_args = {
        "optimizer": keras.optimizers.SGD(0.0),
        "loss": {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 "reg": "mse"},
        "loss_weights": {"cls": 1.0, "reg": 0.5}, "metrics": {"cls": ["accuracy"]}}
    return model


@pytest.mark.parametrize("mode", ["graph", "eager", "xla"])
def test_a_skipped_batch_with_a_finite_loss_is_left_out_of_the_loss_means(tmp_path, mode):
    rng = np.random.default_rng(0)
    keep = np.r_[0:64, 96:128]  # batch 2 left out
    # Finite loss, NaN gradients (sqrt at 0): skipped, so its loss must not be in `loss`.
    x = rng.normal(size=(128, 4)).astype("float32")
    x[64:96] = 0.0
    y = (rng.normal(size=(128, 1)) * 100).astype("float32")
    guard = NanGuard(dump_dir=str(tmp_path))
    _, guarded = _fit_loss_logs(_sqrt_model, x, y, mode, guard)
    _, without = _fit_loss_logs(_sqrt_model, x[keep], y[keep], mode)
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "grad_nonfinite", "skip")
    assert np.isfinite(guard.history[2].loss)
    assert guarded["loss"] == pytest.approx(without["loss"], rel=1e-6)
    assert event.details["grad_entries_finite"] is False  # the sqrt's NaN, not an overflow
    assert "backward is unstable" in event.message

    # A bad label in one head: the total loss is NaN, the other head's loss is finite and
    # must be left out of `reg_loss` too.
    xa, xb = rng.normal(size=(128, 8)).astype("float32"), rng.normal(size=(128, 4)).astype(
        "float32")
    yc, yr = rng.integers(0, 5, 128), rng.normal(size=(128, 1)).astype("float32")
    yc[70] = 7
    guard = NanGuard(dump_dir=str(tmp_path))
    model, guarded = _fit_loss_logs(_two_heads_model, {"feat": xa, "aux": xb},
                                    {"cls": yc, "reg": yr}, mode, guard)
    _, without = _fit_loss_logs(_two_heads_model, {"feat": xa[keep], "aux": xb[keep]},
                                {"cls": yc[keep], "reg": yr[keep]}, mode)
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (2, "target_invalid", "targets.cls")]
    for name in ("loss", "cls_loss", "reg_loss"):
        assert guarded[name] == pytest.approx(without[name], rel=1e-6), name
    # Compiled metrics still count the skipped batch (docs/keras.md): its bad label is a miss.
    pred = np.argmax(model.predict({"feat": xa, "aux": xb}, verbose=0)["cls"], -1)
    assert guarded["cls_accuracy"] == pytest.approx(np.mean(pred == yc), abs=1e-6)


def test_finite_gradients_whose_norm_overflows_are_told_apart(tmp_path):
    # Raw inputs ~1e10: every gradient entry is finite (~1e20) but their float32 L2 norm
    # overflows. Still a bad step (as torch's clip_grad_norm_ would see it), but the event
    # says the entries are finite instead of blaming an unstable backward.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 4)) * 1e10).astype("float32")
    y = x.sum(1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="lin")])
    model.compile(keras.optimizers.SGD(1e-30), "mse")
    before = weights(model)
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause, e.where) for e in guard.events] == [
        (0, "grad_nonfinite", "lin"), (1, "grad_nonfinite", "lin")]
    first = guard.events[0]
    assert first.details["grad_entries_finite"] is True
    assert "every gradient entry is finite" in first.message
    assert "unstable" not in first.message
    # the norm of the step's gradients, recomputed in float64 (about 4.9e20)
    xb, yb = x[:32].astype("float64"), y[:32].astype("float64")
    residual = xb @ before[0].astype("float64") + before[1] - yb
    kernel, bias = 2 * xb.T @ residual / 32, 2 * residual.mean()
    expected = math.sqrt(float(np.square(kernel).sum()) + bias**2)
    assert first.details["grad_norm_float64"] == pytest.approx(expected, rel=1e-3)
    assert nanguard.load(guard.dumps[0]).event.details["grad_entries_finite"] is True
    assert same(before, weights(model))


def test_the_overflow_check_works_with_a_weight_regularizer(tmp_path):
    # A regularizer reads its weight through the replay's stateless scope: every variable
    # must be mapped there, or the recomputation fails and the message blames the backward.
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 4)) * 1e10).astype("float32")
    y = x.sum(1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, kernel_regularizer="l2", name="hidden"),
                              keras.layers.Dense(1, name="lin")])
    model.compile(keras.optimizers.SGD(1e-30), "mse")
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    first = guard.events[0]
    assert first.cause == "grad_nonfinite"
    assert first.details["grad_entries_finite"] is True
    assert "every gradient entry is finite" in first.message


# -- learning rate: schedules in checkpoints, schedulers next to the guard -------------------

LOAD_AND_TRAIN = """
import json, sys
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1])
lr = model.optimizer._learning_rate
rng = np.random.default_rng(1)
model.fit(rng.normal(size=(32, 8)).astype("float32"), rng.integers(0, 3, 32), batch_size=16,
          epochs=1, verbose=0)
print("RESULT " + json.dumps({
    "nanguard_imported": any(m.startswith("nanguard") for m in sys.modules),
    "schedule": type(lr).__name__, "config": lr.get_config(),
    "finite": all(np.isfinite(w).all() for w in model.get_weights()),
}))
"""


def test_checkpoint_written_during_fit_loads_and_trains_without_nanguard(tmp_path):
    # The guard lowers the rate of a schedule without putting anything of its own into the
    # optimizer: ModelCheckpoint's file is the user's model, loadable where nanguard is not.
    import zipfile

    x, y = data()
    x[16:32] = np.nan  # batch 1: a rollback lowers the rate before the checkpoint
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=100, decay_rate=0.9)
    model = classifier(optimizer=keras.optimizers.Adam(schedule))
    path = tmp_path / "ckpt.keras"
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"), max_skips=0)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[guard, keras.callbacks.ModelCheckpoint(str(path))])
    assert [e.action for e in guard.events] == ["rollback", "rollback"]
    assert guard.history[2].lr == pytest.approx(0.005)  # lowered inside the step
    with zipfile.ZipFile(path) as zf:
        assert "nanguard" not in zf.read("config.json").decode()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_TRAIN, str(path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines()
                          if ln.startswith("RESULT "))[len("RESULT "):])
    assert not out["nanguard_imported"]
    assert out["schedule"] == "ExponentialDecay"
    assert out["config"]["initial_learning_rate"] == pytest.approx(0.01)
    assert out["finite"]


def _nan_once_batches(x, y, bad_batch, n_batches):
    """Batches of 16 forever; only the first pass holds a NaN (in ``bad_batch``)."""
    k = 0
    while True:
        i = k % n_batches
        xb = x[i * 16:(i + 1) * 16].copy()
        if k == bad_batch:
            xb[0, 0] = np.nan
        k += 1
        yield xb, y[i * 16:(i + 1) * 16]


@pytest.mark.parametrize(
    ("scheduler", "epoch_lr", "after_fit"),
    [
        # relative to the current rate: the guard's lowering must not compound per epoch
        (lambda: keras.callbacks.LearningRateScheduler(lambda e, lr: lr * 0.9 if e else lr),
         lambda e: 0.1 * 0.9**e, 0.1 * 0.9**3),
        # absolute: must not undo the lowering
        (lambda: keras.callbacks.LearningRateScheduler(lambda e: 0.1 * 0.9**e),
         lambda e: 0.1 * 0.9**e, 0.1 * 0.9**3),
        # relative, at the end of every epoch from the second on (no improvement of 1e9)
        (lambda: keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                                   min_delta=1e9),
         lambda e: 0.1 * 0.5 ** max(0, e - 1), 0.1 * 0.5**3),
    ],
    ids=["lr_times", "absolute", "reduce_on_plateau"],
)
def test_one_lowering_holds_once_next_to_a_scheduler(tmp_path, scheduler, epoch_lr,
                                                      after_fit):
    x, y = data()
    model = classifier(lr=0.1)
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=0)  # one rollback, at step 1
    hist = model.fit(_nan_once_batches(x, y, bad_batch=1, n_batches=4), steps_per_epoch=4,
                     epochs=4, verbose=0, callbacks=[guard, scheduler()])
    assert [(e.step, e.action) for e in guard.events] == [(1, "rollback")]
    lrs = [r.lr for r in guard.history]
    assert lrs[:2] == pytest.approx([0.1, 0.1])
    expected = [epoch_lr(0) * 0.5] * 2 + [epoch_lr(e) * 0.5 for e in (1, 2, 3) for _ in range(4)]
    assert lrs[2:] == pytest.approx(expected, rel=1e-5)
    assert hist.history["nanguard_lr"][1:] == pytest.approx([epoch_lr(e) * 0.5 for e in (1, 2, 3)],
                                                            rel=1e-5)
    # After fit a float rate keeps the lowering (your rate times the guard's factor).
    now = float(ops.convert_to_numpy(model.optimizer.learning_rate))
    assert now == pytest.approx(after_fit * 0.5, rel=1e-5)


# -- multi-output models ----------------------------------------------------------------------

def two_heads(hidden_act="relu", b_act=None):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, name="hidden")(inputs)
    h = keras.layers.Activation(hidden_act, name="act")(h)
    return keras.Model(inputs, {
        "a": keras.layers.Dense(3, name="a")(h),  # 3 classes
        "b": keras.layers.Dense(10, activation=b_act, name="b")(h),  # 10 classes
        "reg": keras.layers.Dense(1, name="reg")(h),
    })


def two_heads_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, {"a": rng.integers(0, 3, n), "b": rng.integers(0, 10, n).astype("float32"),
               "reg": rng.normal(size=(n, 1)).astype("float32")}


def test_multi_output_labels_are_checked_per_output(tmp_path):
    # Each output's labels against its own class count and its own loss: "b" holds ids up
    # to 9 (valid for its 10 classes, as floats its sparse loss takes), "a" ignores -1, and
    # one id 3 in "a" (3 classes) would crash TensorFlow's kernel on the CPU.
    x, y = two_heads_data()
    y["a"][::7] = -1
    y["a"][21] = 3  # batch 1, index 5
    model = two_heads()
    model.compile(keras.optimizers.SGD(0.05), loss={
        "a": keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1),
        "b": "sparse_categorical_crossentropy", "reg": "mse"})
    guard = NanGuard(dump_dir=str(tmp_path))
    hist = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where, event.action) == (
        1, "target_invalid", "targets.a", "skip")
    assert "the first is 3 (batch row 5)" in event.message
    assert all_finite(model)
    for name in ("loss", "a_loss", "b_loss", "reg_loss"):  # the skipped batch is left out
        assert np.isfinite(hist.history[name]).all()


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_a_list_of_outputs_trains_and_is_checked_per_output(tmp_path, run_eagerly):
    # keras.Model(inputs, [a, b, reg]) with a list of losses: TensorFlow packs a list the
    # step returns into one tensor, so the guard's step must not return the model's lists.
    x, y = two_heads_data()
    y["b"][20] = 12  # batch 1: outside "b"'s 10 classes, valid for nothing else either
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(h), keras.layers.Dense(10)(h),
                                 keras.layers.Dense(1)(h)])
    model.compile(keras.optimizers.SGD(0.05), run_eagerly=run_eagerly, loss=[
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"])
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, [y["a"], y["b"].astype("int64"), y["reg"]], batch_size=16, epochs=1,
              shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (1, "target_invalid", "targets.1")
    assert all_finite(model)
    dump = nanguard.load(guard.dumps[0])
    assert {"output.0", "output.1", "output.2", "targets.0", "targets.1"} <= set(dump.tensors)


# A NaN made inside the model of a multi-output model is found where it is, whatever the
# labels of the other outputs (before: "b"'s ids were checked against "a"'s 3 classes).
@pytest.mark.parametrize(
    ("build", "cause", "where"),
    [
        (lambda: two_heads(hidden_act=naive_softmax), "activation_nonfinite", "act"),
        (lambda: two_heads(b_act=naive_softmax), "logits_nonfinite", "b"),
    ],
    ids=["hidden", "second_output"],
)
def test_multi_output_fault_is_diagnosed_where_it_is(tmp_path, build, cause, where):
    x, y = two_heads_data()
    x[16:32] *= 1e4  # batch 1
    model = build()
    model.compile(keras.optimizers.SGD(0.01), loss={
        "a": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "b": keras.losses.SparseCategoricalCrossentropy(), "reg": "mse"})
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (1, cause, where)
    assert math.isnan(guard.history[1].logits_max)  # over every output, "b" included
    dump = nanguard.load(guard.dumps[0])
    assert {"output.a", "output.b", "output.reg", "targets.a", "targets.b"} <= set(dump.tensors)
    assert np.isnan(dump.tensors["output.b"]).any()
    assert all_finite(model)


class RowNorm(keras.layers.Layer):
    """Appends each row's L2 norm: its gradient is NaN for an all-zero row (sqrt at 0)."""

    def call(self, h):
        return ops.concatenate([h, ops.sqrt(ops.sum(ops.square(h), -1, keepdims=True))], -1)


class WithUnusedHead(keras.Model):
    """``aux_head`` is built but ``call`` never uses it: its variables get no gradient."""

    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(16, use_bias=False, name="d1")
        self.norm = RowNorm(name="norm")
        self.head = keras.layers.Dense(3, name="head")
        self.aux = keras.layers.Dense(1, name="aux_head")

    def call(self, x):
        return self.head(self.norm(self.d1(x)))


def unused_head_model():
    model = WithUnusedHead()
    model(np.zeros((2, 8), "float32"))
    model.aux(model.d1(np.zeros((2, 8), "float32")))
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def output_without_loss_model():
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, use_bias=False, name="d1")(inputs)
    model = keras.Model(inputs, {"a": keras.layers.Dense(3, name="head")(RowNorm(name="norm")(h)),
                                 "aux": keras.layers.Dense(1, name="aux_head")(h)})
    model.compile(keras.optimizers.SGD(0.05), loss={
        "a": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "aux": None})
    return model


# A variable the loss never reaches has no gradient (Keras's optimizer skips it): its norm is
# 0.0, so a real non-finite gradient is blamed where it is (before: on the unused "aux_head",
# whose missing gradient counted as NaN on every step).
@pytest.mark.parametrize("build", [unused_head_model, output_without_loss_model],
                         ids=["unused_layer", "output_without_loss"])
def test_a_variable_without_gradient_is_zero_not_blamed(tmp_path, build):
    x, y = data(n=64)
    x[20] = 0.0  # batch 1: d1's output row is 0, the row norm's backward is NaN
    model = build()
    y_fit = y if isinstance(model, WithUnusedHead) else {"a": y}
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y_fit, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where, event.action) == (
        1, "grad_nonfinite", "d1", "skip")
    names = [v.path for v in model.trainable_variables]
    aux = [i for i, name in enumerate(names) if name.startswith("aux_head/")]
    assert len(aux) == 2
    for record in (guard.history[0], guard.history[2]):
        assert all(math.isfinite(n) for n in record.layer_grad_norms)
        assert [record.layer_grad_norms[i] for i in aux] == [0.0, 0.0]
    assert all_finite(model)


# -- snapshots hold the optimizer's slots from step 0 --------------------------------------------

class PlainSubclassed(keras.Model):
    """No variables until its first call: they appear inside the first training step."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def compiled(model, optimizer):
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


# TensorFlow builds the optimizer inside the first step: the guard builds it before its first
# snapshot. A subclassed model has no variables before its first call: the snapshot is
# taken again, complete, after the first step.
@pytest.mark.parametrize(("build", "snap"), [
    (lambda: classifier(optimizer=keras.optimizers.Adam(0.01)), 0),
    (lambda: compiled(PlainSubclassed(), keras.optimizers.Adam(0.01)), 1),
], ids=["sequential", "subclassed"])
def test_rollback_to_the_first_snapshot_restores_adam_moments(tmp_path, build, snap):
    x, y = data(n=96)
    x[32:64, 0] = np.nan  # batches 2 and 3: a skip, then a rollback to the first snapshot
    model = build()
    assert not model.optimizer.built
    guard, rec = NanGuard(dump_dir=str(tmp_path), max_skips=1), Recorder()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard, rec])
    assert [(e.step, e.action) for e in guard.events] == [(2, "skip"), (3, "rollback")]
    assert guard.snapshot_step == snap
    slots = rec.before[snap][1]
    assert len(slots) == 1 + 2 * 4  # iteration, then two moments per variable: built
    assert same(rec.after[3][0], rec.before[snap][0])
    assert same(rec.after[3][1], slots)  # Adam's moments as they were, bit for bit
    assert not same(rec.before[3][1], slots)  # the steps in between had moved them


# A model built lazily (no keras.Input, or subclassed) has no variables when fit starts: the
# dump still names them (meta["param_names"], in layer_grad_norms' order), whether the first
# step or a later one goes bad.
@pytest.mark.parametrize("bad_step", [0, 2])
@pytest.mark.parametrize("build", [
    lambda: keras.Sequential([keras.layers.Dense(16, activation="relu", name="hidden"),
                              keras.layers.Dense(3, name="head")], name="lazy"),
    PlainSubclassed,
], ids=["lazy_sequential", "subclassed"])
def test_a_lazily_built_model_names_its_variables_in_dumps(tmp_path, build, bad_step):
    x, y = data()
    x[bad_step * 16 + 3, 0] = np.nan
    model = compiled(build(), keras.optimizers.SGD(0.05))
    assert not model.trainable_variables
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert [(e.step, e.cause) for e in guard.events] == [(bad_step, "input_nonfinite")]
    dump = nanguard.load(guard.dumps[0])
    names = [v.path for v in model.trainable_variables]
    assert len(names) == 4
    assert dump.meta["param_names"] == names
    assert len(dump.history[-1].layer_grad_norms) == len(names)


class CustomStep(keras.Sequential):
    """A train_step of one's own (loss-only fallback). ``guarded``: it keeps a non-finite
    update out itself (zero gradients), so the variables stay finite."""

    guarded = False

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        if self.guarded:
            ok = tf.math.is_finite(loss)
            grads = [tf.where(ok, g, tf.zeros_like(g)) for g in grads]
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


def custom_step_model(optimizer, guarded=False, batchnorm=False):
    model = CustomStep([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                         *([keras.layers.BatchNormalization(name="bn")] if batchnorm else []),
                         keras.layers.Dense(3)])
    model.guarded = guarded
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_fallback_rollback_restores_adam_moments_and_training_recovers(tmp_path):
    x, y = data(n=96)
    x[32:48, 0] = np.nan  # batch 2: its NaN update lands (loss-only), Adam's moments too
    model = custom_step_model(keras.optimizers.Adam(0.01))
    guard, rec = NanGuard(dump_dir=str(tmp_path)), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    assert [(e.step, e.cause, e.action) for e in guard.events] == [
        (2, "weights_nonfinite", "rollback")]  # once: no NaN moment survives the rollback
    assert same(rec.after[2][0], rec.before[0][0])
    assert same(rec.after[2][1], rec.before[0][1])
    assert all(np.isfinite(a).all() for a in optimizer_state(model))
    assert all_finite(model)


# -- what a "skip" is with loss-only checks ----------------------------------------------------

@pytest.mark.parametrize(("snapshot_every", "action", "restored_from"),
                         [(1, "skip", 3), (100, "rollback", 0)])
def test_fallback_calls_a_restore_a_skip_only_when_it_undoes_just_that_step(
        tmp_path, snapshot_every, action, restored_from):
    # The train_step keeps the bad update out itself; nanguard cannot know, and restores a
    # snapshot: the one taken right before the step is a skip, an older one a rollback
    # (counted, and the learning rate lowered), never a "skip" that loses good steps.
    x, y = data(n=96)
    x[48:64, 0] = np.nan  # batch 3
    model = custom_step_model(keras.optimizers.SGD(0.05), guarded=True)
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=snapshot_every)
    rec = Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    assert [(e.step, e.action) for e in guard.events] == [(3, action)]
    assert same(rec.after[3][0], rec.before[restored_from][0])
    lowered = 0.025 if action == "rollback" else 0.05
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(lowered)


def test_fallback_skips_a_nan_update_it_can_undo_exactly(tmp_path):
    # The user's train_step applies the NaN update; with snapshot_every=1 the snapshot of that
    # very step undoes just it: a skip each time (judged on the state the step started
    # from, not on the NaN weights its update left), the rate untouched, no abort.
    x, y = data(n=160)
    for b in (2, 4, 6, 8):  # four isolated NaN batches, more than max_rollbacks
        x[16 * b, 0] = np.nan
    model = custom_step_model(keras.optimizers.SGD(0.05))
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=1), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    assert [(e.step, e.action, e.cause) for e in guard.events] == [
        (b, "skip", "loss_nonfinite") for b in (2, 4, 6, 8)]
    assert "check the batch for NaN/Inf first" in guard.events[0].message
    for b in (2, 4, 6, 8):
        assert same(rec.after[b][0], rec.before[b][0])
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.05)
    assert all_finite(model)


class Delegating(keras.Sequential):
    """Its own train_step (so the loss-only fallback) that runs Keras's, metrics and all.
    ``extra``: it also returns a value of its own, ``raw``, not one of the model's metrics."""

    extra = False

    def train_step(self, data):
        logs = super().train_step(data)
        return {**logs, "raw": logs["loss"] * 1.0} if self.extra else logs


def delegating_model(extra=False):
    model = Delegating([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                        keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.extra = extra
    return model


@pytest.mark.parametrize(("snapshot_every", "actions", "extra"), [
    (1, ["skip", "skip"], False), (100, ["skip", "rollback"], False),
    (1, ["skip", "skip"], True)])
def test_fallback_puts_the_metrics_back_and_later_callbacks_see_no_nan(
        tmp_path, snapshot_every, actions, extra):
    # A NaN in the first epoch's first batch, then in the second epoch's last: the guard
    # recovers each step, so a TerminateOnNaN after it must not stop fit, and an epoch's loss
    # and accuracy are those of its healthy batches (before: the NaN logs went on, and the
    # metrics were reset, so a bad last batch gave History an epoch loss of 0.0).
    x, y = data(n=64)

    def batches():
        for k in range(8):
            i = k % 4
            xb = x[i * 16:(i + 1) * 16].copy()
            if k in (0, 7):
                xb[0, 0] = np.nan
            yield xb, y[i * 16:(i + 1) * 16]

    model = delegating_model(extra)
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=snapshot_every), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        hist = model.fit(batches(), steps_per_epoch=4, epochs=2, verbose=0,
                         callbacks=[guard, rec, keras.callbacks.TerminateOnNaN()])
    assert [(e.step, e.action) for e in guard.events] == list(zip((0, 7), actions,
                                                                  strict=True))
    assert len(rec.logs) == 8  # every batch of both epochs ran
    for logs in rec.logs:
        assert np.isfinite([logs["loss"], logs["accuracy"]]).all()
    # The bad first batch: the metrics are back to the epoch's start, as Keras reset them.
    assert (rec.logs[0]["loss"], rec.logs[0]["accuracy"]) == (0.0, 0.0)
    assert hist.history["loss"][0] == pytest.approx(rec.logs[3]["loss"])
    # The bad last batch: its logs, and History's epoch, are those after the batch before.
    for name in ("loss", "accuracy"):
        assert rec.logs[7][name] == pytest.approx(rec.logs[6][name])
        assert hist.history[name][1] == pytest.approx(rec.logs[6][name])
    assert hist.history["loss"][1] > 0.1
    if extra:  # the step's own NaN: the last healthy step's value, or none before one
        assert "raw" not in rec.logs[0]
        assert rec.logs[7]["raw"] == rec.logs[6]["raw"]
    assert all_finite(model)


class GuideStep(keras.Sequential):
    """The train_step of Keras's "Customizing what happens in fit()" guide: its logs are
    ``{m.name: m.result() for m in self.metrics}``, so the compiled metrics come nested
    under ``compile_metrics``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                             self.trainable_variables)
        for m in self.metrics:
            m.update_state(loss) if m.name == "loss" else m.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def test_fallback_recovers_nested_compile_metrics_of_the_guide_step(tmp_path):
    # The NaN batch is the epoch's last: its NaN mae (nested under "compile_metrics") must
    # reach neither a later callback nor History (before: both got nan).
    x, y = data()
    y = np.random.default_rng(1).normal(size=(64, 1)).astype("float32")
    x[48, 0] = np.nan  # batch 3
    model = GuideStep([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                       keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=1), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        hist = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                         callbacks=[guard, rec, keras.callbacks.TerminateOnNaN()])
    assert [(e.step, e.action) for e in guard.events] == [(3, "skip")]
    assert len(rec.logs) == 4 and "compile_metrics" not in rec.logs[3]
    for name in ("loss", "mae"):
        assert np.isfinite(rec.logs[3][name])
        assert rec.logs[3][name] == pytest.approx(rec.logs[2][name])
        assert hist.history[name][0] == pytest.approx(rec.logs[2][name])
    assert all_finite(model)


class NoLossKey(keras.Sequential):
    """A train_step whose logs have no "loss": ``keys`` name its values, each a multiple of
    the batch's loss (a GAN's ``d_loss``/``g_loss``, a ``total_loss``, an ``error``)."""

    keys: tuple[str, ...] = ()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self(x, training=True))
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                             self.trainable_variables)
        return {key: loss * (i + 1) for i, key in enumerate(self.keys)}


@pytest.mark.parametrize(("keys", "recorded"), [
    (("d_loss", "g_loss"), "logs['d_loss'] + logs['g_loss']"),
    (("total_loss",), "logs['total_loss']"),
    (("error", "zeta"), "logs['error']")])
def test_fallback_without_a_loss_key_is_still_guarded(tmp_path, keys, recorded):
    # Before: no "loss" key, no check at all: NaN recorded every step, no event, NaN weights.
    x, y = data(n=96)
    x[37, 0] = np.nan  # batch 2
    model = NoLossKey([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                       keras.layers.Dense(3)])
    model.keys = keys
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=1), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec, keras.callbacks.TerminateOnNaN()])
    said = [str(w.message) for w in caught if "no 'loss'" in str(w.message)]
    assert len(said) == 1 and recorded in said[0]  # once, naming what it reads
    assert all(repr(k) in said[0] for k in keys)
    assert [(e.step, e.action) for e in guard.events] == [(2, "skip")]
    expected = sum(rec.logs[0][k] for k in keys if k.endswith("loss")) or rec.logs[0][keys[0]]
    assert guard.history[0].loss == pytest.approx(expected)
    assert all(math.isfinite(r.loss) for i, r in enumerate(guard.history) if i != 2)
    assert len(rec.logs) == 6 and np.isfinite([lg[k] for lg in rec.logs for k in keys]).all()
    assert all_finite(model)


class VectorLoss(keras.Sequential):
    """A train_step that returns the unreduced per-sample loss."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.losses.sparse_categorical_crossentropy(
                y, self(x, training=True), from_logits=True)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                             self.trainable_variables)
        return {"loss": loss}


def test_fallback_reads_an_unreduced_loss(tmp_path):
    # Before: float() of the vector raised a TypeError out of fit.
    x, y = data(n=96)
    x[37, 0] = np.nan  # batch 2: one sample's loss is NaN
    model = VectorLoss([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                        keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=1), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    assert [(e.step, e.action) for e in guard.events] == [(2, "skip")]
    assert np.shape(rec.logs[0]["loss"]) == (16,)
    assert guard.history[0].loss == pytest.approx(float(np.mean(rec.logs[0]["loss"])))
    assert all_finite(model)


def test_fallback_with_steps_per_execution_calls_its_restore_a_rollback(tmp_path):
    # The snapshot before an execution of 4 batches predates its 3 good ones: restoring it is
    # a rollback, and the warning says so (before: a "skip", and the instrumented step's
    # warning that bad updates are still kept out inside the step).
    x, y = data(n=128)
    x[16, 0] = np.nan  # batch 1 of the first execution (batches 0-3)
    model = delegating_model()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=4)
    before = weights(model)
    guard, rec = NanGuard(dump_dir=str(tmp_path), snapshot_every=1), Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    said = " ".join(str(w.message) for w in caught if "steps_per_execution" in str(w.message))
    assert "loss-only fallback" in said and "rollback" in said
    assert "still skips" not in said
    assert [(e.step, e.action) for e in guard.events] == [(0, "rollback")]
    assert same(rec.after[0][0], before)  # the whole first execution was undone
    assert all_finite(model)


def test_fallback_without_a_snapshot_aborts_instead_of_a_skip_that_does_nothing(tmp_path):
    # BatchNormalization's moving variance is NaN before fit: no snapshot is ever finite.
    x, y = data(n=64)
    x[32:48, 0] = np.nan  # batch 2
    model = custom_step_model(keras.optimizers.SGD(0.05), guarded=True, batchnorm=True)
    bn = model.get_layer("bn")
    bn.moving_variance.assign(np.full(16, np.nan, "float32"))
    guard = NanGuard(dump_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="loss-only"), \
            pytest.raises(nanguard.NonFiniteTrainingError) as info:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.snapshot_step is None
    assert (info.value.event.step, info.value.event.action) == (2, "abort")
    assert "no finite snapshot" in info.value.event.message
    assert [r.action for r in guard.history] == [None, None, "abort"]



def accumulating_fallback_fit(tmp_path, x, y, **guard_kwargs):
    """A custom train_step (loss-only fallback) whose SGD accumulates 2 batches of 16."""
    model = custom_step_model(keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
                              guarded=True)
    guard, rec = NanGuard(dump_dir=str(tmp_path), **guard_kwargs), Recorder()
    with pytest.warns(RuntimeWarning, match="loss-only"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, rec])
    return model, guard, rec


def test_fallback_with_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # The contract: with gradient accumulation one step is one optimizer step, in the
    # loss-only fallback too (it counted batches: 8 steps here, not 4).
    x, y = data(n=128)
    model, guard, _ = accumulating_fallback_fit(tmp_path, x, y)
    assert [r.step for r in guard.history] == [0, 1, 2, 3]
    assert not guard.events
    assert int(model.optimizer.iterations) == 4


@pytest.mark.parametrize("bad_batch", [2, 3])
def test_fallback_skips_the_window_of_a_bad_batch_and_names_the_batch(tmp_path, bad_batch):
    # Batches 2 and 3 are step 1's window; a NaN in either ends it at once: the snapshot
    # taken at the window's start undoes the window (its accumulators and iteration count
    # too), a skip of step 1, and the next batch begins a new window.
    x, y = data(n=128)
    x[16 * bad_batch, 0] = np.nan
    model, guard, rec = accumulating_fallback_fit(tmp_path, x, y, snapshot_every=1)
    (event,) = guard.events
    assert (event.step, event.action, event.cause) == (1, "skip", "loss_nonfinite")
    place = bad_batch - 2
    assert event.message.startswith(f"Step 1 (batch {place + 1} of the 2 it accumulates):")
    assert nanguard.load(guard.dumps[0]).event.step == 1
    assert same(rec.after[bad_batch][0], rec.before[2][0])
    assert same(rec.after[bad_batch][1], rec.before[2][1])  # accumulators, iterations
    # The 8 batches left after the bad one's window make whole windows again.
    steps = [r.step for r in guard.history]
    assert steps == list(range(len(steps))) and steps[1] == 1
    assert len(steps) == 2 + (8 - bad_batch - 1) // 2
    assert all_finite(model)



def test_an_epsilon_that_is_zero_in_float16_is_named(tmp_path):
    # float16 variables with Adam's epsilon=1e-8, which is 0 in float16: the update divides
    # 0 by 0. The message said to lower the learning rate, which cannot help.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,), dtype="float16"),
                              keras.layers.Dense(16, activation="relu", dtype="float16"),
                              keras.layers.Dense(4, dtype="float16")])
    model.compile(keras.optimizers.Adam(1e-3, epsilon=1e-8),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(n=40)
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip", "rollback"))
    model.fit(x.astype("float16"), y, batch_size=5, epochs=1, verbose=0, callbacks=[guard])
    assert guard.events
    for event in guard.events:
        assert event.cause == "update_nonfinite"
        assert "eps=1e-08 is 0 in float16" in event.message
    assert all_finite(model)



class LogOfMean(keras.layers.Layer):
    """Adds a VAE-style log term: NaN once the batch mean of its input goes negative."""

    def call(self, t):
        self.add_loss(0.01 * ops.log(ops.mean(t)))
        return t


def test_a_non_finite_add_loss_term_names_its_layer(tmp_path):
    # The compiled loss is a built-in; a layer's add_loss term goes NaN. The event said
    # "the loss function divides by ~0 ... or use a built-in loss", with no where.
    x, y = data(n=64, n_in=4)
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    h = LogOfMean(name="logreg")(keras.layers.Dense(8, name="d1")(inp))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.events
    event = guard.events[0]
    assert (event.cause, event.where) == ("loss_nonfinite", "logreg")
    assert "the term layer 'logreg' adds to it (add_loss" in event.message
    assert "built-in loss" not in event.message
    assert nanguard.load(guard.dumps[0]).event.where == "logreg"
    assert all_finite(model)


# -- sample weights, mixed-precision counters ------------------------------------------------

def test_non_finite_sample_weight_is_named_and_dumped(tmp_path, capsys):
    x, y = data()
    sw = np.ones(64, "float32")
    sw[37] = np.inf  # a weight computed as 1 / count of an empty group; batch 2
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, sample_weight=sw, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where, event.action) == (
        2, "input_nonfinite", "sample_weight", "skip")
    assert "sample_weight: 0 NaN, 1 Inf of 16 values" in event.message
    report = inspect_json(guard.dumps[0], capsys)
    assert report["tensors"]["sample_weight"]["inf"] == 1
    assert all_finite(model)


def test_a_huge_finite_target_overflowing_the_loss_is_said_so(tmp_path):
    x, _ = data()
    y = np.random.default_rng(1).normal(size=(64, 1)).astype("float32")
    y[37] = 1e30  # a missing value's sentinel; batch 2
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile("adam", "mse")
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause) == (2, "loss_nonfinite")
    assert "the targets reach 1e+30" in event.message
    assert all_finite(model)


def test_an_intended_minus_inf_of_a_raw_op_is_not_blamed(tmp_path):
    # A mask added to scores by a raw op (named add, add_1, ... by Keras: no name to list
    # in allow_neg_inf) was blamed for its -inf instead of the layer that made the NaN.
    x, y = data()
    mask = np.zeros((1, 8), "float32")
    mask[0, 0] = -np.inf
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    scores = keras.layers.Dense(8, name="d1")(inputs) + mask
    h = keras.layers.Dense(3, name="out")(keras.layers.Softmax(name="attn")(scores))
    out = keras.layers.Lambda(lambda z: keras.ops.log(z - 10.0), name="culprit")(h)
    model = keras.Model(inputs, out)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",), max_dumps=1)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert (guard.events[0].cause, guard.events[0].where) == ("logits_nonfinite", "culprit")


class Scaled(keras.layers.Layer):
    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], 2), name="w")
        self.w_scale = self.add_weight(shape=(2,), name="w_scale", initializer="ones")

    def call(self, x):
        return (x @ self.w) * self.w_scale


def test_a_repaired_variable_comes_back_with_its_own_slots_only(tmp_path):
    # Slots are matched by name: w_scale's momentum starts with w's prefix too.
    from nanguard._keras_state import Snapshot

    model = keras.Sequential([keras.Input((3,)), Scaled(name="s")])
    model.compile(keras.optimizers.Adam(0.1), "mse")
    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    snapshot = Snapshot(0, model)
    model.fit(x, y, epochs=1, verbose=0)
    model.layers[0].w_scale.assign(np.array([np.inf, 1.0], "float32"))
    restored = snapshot.restore_nonfinite_weights(model)
    scale = model.layers[0].w_scale.path  # Keras numbers names per process: sequential_2/...
    assert sorted(p.split("/", 1)[-1] for p in restored) == sorted([
        scale.split("/", 1)[-1], *(f"{scale.replace('/', '_')}_{slot}"
                                   for slot in ("momentum", "velocity"))])
    assert np.isfinite(keras.ops.convert_to_numpy(model.layers[0].w_scale)).all()


def test_a_repaired_variable_of_a_same_named_nested_layer_gets_its_own_slots(tmp_path):
    # Two nested blocks each with a layer named "dense": both kernels' paths, and so their
    # slots' names, are alike; slots go by Keras's slot lists, aligned with the variables.
    from nanguard._keras_state import Snapshot, slot_owners

    def block(name):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="dense")],
                                name=name)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(
        block("blk_b")(block("blk_a")(inputs))))
    model.compile(keras.optimizers.Adam(0.1), "mse")
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    snapshot = Snapshot(0, model)
    model.fit(x, y, epochs=1, verbose=0)
    second = model.get_layer("blk_b").layers[-1].kernel
    owners = slot_owners(model.optimizer)
    own = [s for s in model.optimizer.variables if owners.get(id(s)) is second]
    assert len(own) == 2  # its momentum and velocity
    second.assign(np.full(second.shape, np.nan, "float32"))
    restored = snapshot.restore_nonfinite_weights(model)
    assert sorted(restored) == sorted([second.path, *(s.path for s in own)])
    for v, a in snapshot.saved:
        if any(v is s for s in own):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), a)


def test_an_lr_spike_overflowing_sgd_momentum_is_update_nonfinite(tmp_path):
    # Keras's SGD momentum holds the rate times the gradients: a huge rate overflows it from
    # finite gradients, which was blamed on a corrupt optimizer checkpoint.
    x, _ = data()
    y = np.random.default_rng(0).normal(size=(64, 1)).astype("float32") * 10

    class Spike(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate.assign(1e38 if batch == 2 else 0.01)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[Spike(), guard])
    (event,) = guard.events  # the skip's repair lets training go on: no later bad step
    assert (event.step, event.cause, event.action) == (2, "update_nonfinite", "skip")
    assert "corrupt" not in event.message and all_finite(model)


def test_a_normalization_adapted_on_nan_data_is_weights_nonfinite(tmp_path):
    # Its mean is NaN from the start: it was "layer 'norm' overflowed, clamp its input".
    x, _ = data(32, 4)
    y = np.random.default_rng(0).normal(size=(32, 1)).astype("float32")
    with_nan = x.copy()
    with_nan[3, 1] = np.nan
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(with_nan)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(4, name="h"),
                              keras.layers.Dense(1, name="out")])
    model.compile("adam", "mse")
    guard = NanGuard(dump_dir=str(tmp_path))
    with pytest.raises(nanguard.NonFiniteTrainingError) as err:  # no finite snapshot ever
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[guard])
    event = err.value.event
    assert (event.step, event.cause, event.where) == (0, "weights_nonfinite", "norm/mean")
    assert "Normalization" in event.message


def test_a_nan_in_a_frozen_layers_kernel_is_weights_nonfinite(tmp_path):
    x, y = data()

    class Corrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                kernel = self.model.get_layer("base").kernel
                value = keras.ops.convert_to_numpy(kernel).copy()
                value[0, 0] = np.nan
                kernel.assign(value)

    keras.utils.set_random_seed(0)
    base = keras.layers.Dense(16, name="base")
    base.trainable = False
    model = keras.Sequential([keras.Input((8,)), base, keras.layers.Dense(3, name="head")])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Corrupt(), guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "weights_nonfinite", "rollback")
    assert event.where.endswith("base/kernel") and "frozen weight" in event.message
    assert all_finite(model)


def test_an_inf_class_weight_names_class_weight_as_a_suspect(tmp_path):
    # Keras turns class_weight into the batch's sample weights: the message said "Fix the
    # data: check the loader" and named only a sample_weight the user never passed.
    x, y = data()
    model = classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit(x, y, class_weight={0: 1.0, 1: np.inf, 2: 1.0}, batch_size=16, epochs=1,
              shuffle=False, verbose=0, callbacks=[guard])
    event = guard.events[0]
    assert (event.step, event.cause, event.where) == (0, "input_nonfinite", "sample_weight")
    assert "class_weight" in event.message and "loader" not in event.message
    assert all_finite(model)


def test_amp_skips_are_in_every_epoch_log_with_a_loss_scale_optimizer(tmp_path):
    import csv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")

    def batches():  # the scaled float16 gradients overflow in epoch 1, batch 1 only
        k = 0
        while True:
            i = k % 3
            yb = y[i * 16:(i + 1) * 16] * (3000.0 if k == 4 else 1.0)
            k += 1
            yield x[i * 16:(i + 1) * 16], yb

    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="relu", dtype="mixed_float16"),
                              keras.layers.Dense(1, dtype="float32")])
    model.compile(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)), "mse")
    guard = NanGuard(dump_dir=str(tmp_path / "dumps"))
    csv_path = tmp_path / "log.csv"
    hist = model.fit(batches(), steps_per_epoch=3, epochs=3, verbose=0,
                     callbacks=[guard, keras.callbacks.CSVLogger(str(csv_path))])
    assert guard.amp_skips == 1
    assert hist.history["nanguard_amp_skips"] == [0.0, 1.0, 1.0]
    with open(csv_path) as fh:
        assert [float(r["nanguard_amp_skips"]) for r in csv.DictReader(fh)] == [0.0, 1.0, 1.0]
    # Without a LossScaleOptimizer there is no such column.
    plain = classifier()
    hist = plain.fit(*data(), batch_size=16, epochs=1, verbose=0,
                     callbacks=[NanGuard(dump_dir=str(tmp_path / "dumps"))])
    assert "nanguard_amp_skips" not in hist.history


class FailsAtEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise RuntimeError("a callback failed")


def test_a_guard_moved_to_another_model_after_an_interrupted_fit_unpatches_the_first(
        tmp_path):
    # A notebook: model A's guarded fit is interrupted, the user builds model B and fits it
    # with the same guard, then goes back to A: A trains plainly (it used to recurse
    # forever in its leftover make_train_function).
    x, y = data(n=64)
    a, b = classifier(), classifier()
    guard = NanGuard(dump_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="a callback failed"):
        a.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard, FailsAtEpochEnd()])
    b.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[guard])
    assert "make_train_function" not in vars(a) and "make_train_function" not in vars(b)
    before = guard.step_count
    hist = a.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert math.isfinite(hist.history["loss"][0]) and guard.step_count == before
    a.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[NanGuard(dump_dir=str(tmp_path))])


def test_a_fit_that_raises_outside_the_step_leaves_no_guard_behind(tmp_path):
    # No on_train_end runs; the next fit, without the guard, must train unguarded.
    x, y = data(n=64)
    x[16:32, 0] = np.nan  # batch 1: the guard skips it in the first fit
    model = classifier(lr=0.1)
    guard = NanGuard(dump_dir=str(tmp_path), max_skips=0)  # a rollback: the LR is halved
    with pytest.raises(RuntimeError, match="a callback failed"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[guard, FailsAtEpochEnd()])
    assert guard.step_count == 4 and len(guard.events) == 1
    clean = np.nan_to_num(x)
    model.fit(clean, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert guard.step_count == 4  # the guard's step did not run again
    for obj in (model, model.optimizer):
        assert not {"train_step", "compute_loss", "apply", "make_train_function",
                    "_get_current_learning_rate"} & set(vars(obj))
    assert float(ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.05)


class SoftmaxArgmax(keras.layers.Layer):
    """A naive softmax and the predicted class (an int32 second output)."""

    def call(self, z):
        e = ops.exp(z)
        return e / ops.sum(e, axis=-1, keepdims=True), ops.cast(ops.argmax(z, axis=-1), "int32")


def _siamese_with_softmax_argmax(width=6, hidden=8):
    a, b = keras.Input((width,), name="a"), keras.Input((width,), name="b")
    enc = keras.layers.Dense(hidden, name="enc")  # shared: the model is replayed call by call
    p, _ = SoftmaxArgmax(name="sa")(enc(b))
    out = keras.layers.Dense(3, name="out")(keras.layers.Concatenate(name="cat")([enc(a), p]))
    model = keras.Model([a, b], out)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_every_numeric_output_of_a_layer_replayed_call_by_call_is_dumped(tmp_path):
    keras.utils.set_random_seed(0)
    model = _siamese_with_softmax_argmax()
    x, y = data(n=64, n_in=6)
    xb = x.copy()
    xb[24:32] *= 1e4  # batch 3 overflows the naive softmax
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit([x, xb], y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    (event,) = guard.events
    assert (event.step, event.cause, event.where) == (3, "activation_nonfinite", "sa")
    tensors = nanguard.load(guard.dumps[0]).tensors
    assert tensors["activation.sa.output.1"].dtype == np.int32  # the argmax, not dropped
    assert np.isnan(tensors["activation.sa.output.0"]).any()


def test_a_blamed_layer_with_rows_over_the_dump_limit_is_cut_not_dropped(tmp_path,
                                                                          monkeypatch):
    # One row of the layer's output is larger than the per-tensor limit (a long sequence's
    # pairwise scores): the dump keeps a flat prefix of it, within the limits.
    from nanguard import _keras_probe

    monkeypatch.setattr(_keras_probe, "ACTIVATION_DUMP_BYTES", 1024)
    monkeypatch.setattr(_keras_probe, "ACTIVATION_DUMP_TOTAL", 4096)
    keras.utils.set_random_seed(0)
    model = _siamese_with_softmax_argmax(hidden=400)  # rows of 400 floats: 1600 bytes
    x, y = data(n=64, n_in=6)
    xb = x.copy()
    xb[24:32] *= 1e4
    guard = NanGuard(dump_dir=str(tmp_path))
    model.fit([x, xb], y, batch_size=8, epochs=1, verbose=0, shuffle=False, callbacks=[guard])
    tensors = nanguard.load(guard.dumps[0]).tensors
    kept = {k: v for k, v in tensors.items() if k.startswith("activation.sa.")}
    assert set(kept) == {"activation.sa.input", "activation.sa.output.0",
                         "activation.sa.output.1"}
    assert all(v.nbytes <= 1024 for v in kept.values())
    assert kept["activation.sa.input"].shape == (1024 // 4,)  # a flat prefix of row 0
    assert kept["activation.sa.output.1"].shape == (8,)


def test_a_one_step_lr_spike_before_a_due_snapshot_is_not_snapshotted(tmp_path):
    # As for torch: one batch at lr=1e37 leaves finite weights of ~1e36 right before the
    # snapshot due at step 4; the rollback must land before the spike.
    x, y = data(n=16 * 14)

    class Spike(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch in (3, 4):
                self.model.optimizer.learning_rate.assign(1e37 if batch == 3 else 0.05)

    model = classifier(lr=0.05)
    start = weights(model)
    recorder = Recorder()
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=4)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Spike(), guard, recorder])
    actions = [r.action for r in guard.history]
    # At once: skipping cannot shrink weights an update blew up (it was three skips first).
    assert actions[3:8] == [None, "rollback", None, None, None]
    assert same(recorder.after[4][0], start)
    assert guard.snapshot_step > 4 and all_finite(model)  # healthy weights again
    assert max(float(np.abs(w).max()) for w in weights(model)) < 100


class _OverflowsInTraining(keras.layers.Layer):
    def call(self, x, training=None):
        return x * float("inf") if training else x


def test_a_fault_the_inference_replay_does_not_reproduce_says_so(tmp_path):
    # The replay runs with training=False: a layer that overflows only in training comes out
    # finite there, and the message must not pretend to know where it started.
    x, y = data()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, name="head"),
                              _OverflowsInTraining(name="odd")])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard = NanGuard(dump_dir=str(tmp_path), actions=("skip",))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    event = guard.events[0]
    assert (event.step, event.cause) == (0, "logits_nonfinite")
    assert "Replaying the step gave a finite output" in event.message
    assert "training=False" in event.message
    assert all_finite(model)


def test_a_step_with_an_action_is_in_the_batch_logs_whatever_log_every(tmp_path):
    x, y = data()
    x[2 * 16 + 1, 0] = np.nan  # batch 2
    recorder = Recorder()
    guard = NanGuard(dump_dir=str(tmp_path), log_every=4)
    classifier().fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                     callbacks=[guard, recorder])
    assert ["nanguard_bad" in logs for logs in recorder.logs] == [True, False, True, False]
    assert recorder.logs[2]["nanguard_bad"] == 1.0 and recorder.logs[0]["nanguard_bad"] == 0.0


class _RunningMax(keras.layers.Layer):
    """Keeps the running max of features 0-2 in a non-trainable variable starting at -inf;
    feature 3 is never tracked, so its -inf is intended."""

    def build(self, input_shape):
        self.running = self.add_weight(shape=(4,), initializer=keras.initializers.Constant(
            -np.inf), trainable=False, name="running")

    def call(self, x, training=None):
        if training:
            top = keras.ops.max(x[:, :3], axis=0)
            self.running.assign(keras.ops.concatenate(
                [keras.ops.maximum(self.running[:3], top), self.running[3:]]))
        return x


def test_a_skip_keeps_a_non_trainable_variable_whose_inf_is_intended(tmp_path):
    x, y = data()
    y[2 * 16 + 3] = 9  # batch 2: a label out of range, a skip
    model = keras.Sequential([keras.Input((8,)), _RunningMax(name="rmax"),
                              keras.layers.Dense(3, name="head")])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    recorder = Recorder()
    guard = NanGuard(dump_dir=str(tmp_path), snapshot_every=1)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard, recorder])
    (event,) = guard.events
    assert (event.step, event.cause, event.action) == (2, "target_invalid", "skip")
    assert "nonfinite_buffers" not in event.details
    assert guard.snapshot_step == 2  # snapshots are taken with that -inf in them
    running = keras.ops.convert_to_numpy(model.get_layer("rmax").running)
    assert np.isneginf(running[3]) and running[:3].tolist() == x[:, :3].max(0).tolist()
