"""Real failing ``model.fit`` runs for the Keras guard, one fault each (diagnosis suite).

The same faults as ``tests/_diagnosis_torch.py``, built with Keras layers. Shared by
``benchmarks/diagnosis.py`` and ``tests/test_keras_diagnosis.py``. Import it after choosing
the backend (``KERAS_BACKEND``); the suite is meant for TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from nanguard.keras import NanGuard
from tests._diagnosis_cases import RNN_LENGTHS, Case

BATCH = 16
STEPS = 8


def classes(steps: int = STEPS, n: int = BATCH, scale: float = 1.0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(steps * n, 8)) * scale).astype("float32")
    return x, rng.integers(0, 4, steps * n).astype("int32")


def rows(step: int, n: int = BATCH) -> slice:
    return slice(step * n, (step + 1) * n)


def net(act: str | Any = "tanh", n_out: int = 4, *extra: Any) -> keras.Sequential:
    return keras.Sequential(name="net", layers=[
        keras.Input((8,)),
        keras.layers.Dense(16, name="fc1"),
        keras.layers.Activation(act, name="act"),
        keras.layers.Dense(n_out, name="fc2"),
        *extra,
    ])


def sparse_ce() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def naive_softmax_ce(y: Any, logits: Any) -> Any:
    p = ops.exp(logits) / ops.sum(ops.exp(logits), axis=1, keepdims=True)
    picked = ops.take_along_axis(p, ops.expand_dims(ops.cast(y, "int32"), 1), axis=1)
    return -ops.mean(ops.log(picked))


def ce_over_nonzero_labels(y: Any, logits: Any) -> Any:
    y = ops.cast(y, "int32")
    ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return ops.sum(ce) / ops.sum(ops.cast(ops.not_equal(y, 0), "float32"))


def ce_plus_mean(y: Any, logits: Any) -> Any:
    ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return ops.mean(ce) + ops.mean(logits)  # gives `offset` a gradient of 1e-4


class Offset(keras.layers.Layer):
    """A weight near float32's limit, used at a 1e-4 scale (the forward stays finite)."""

    def build(self, input_shape: Any) -> None:
        self.offset = self.add_weight(shape=(), name="offset",
                                      initializer=keras.initializers.Constant(-3.4028e38))

    def call(self, x: Any) -> Any:
        return x + self.offset * 1e-4


class Corrupt(keras.callbacks.Callback):
    """Writes a NaN into a weight before a given batch (outside the training step)."""

    def __init__(self, at: int, layer: str) -> None:
        super().__init__()
        self.at, self.layer = at, layer

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if batch == self.at:
            kernel = self.model.get_layer(self.layer).kernel
            value = ops.convert_to_numpy(kernel).copy()
            value[0, 0] = np.nan
            kernel.assign(value)


def fit(model: keras.Model, loss: Any, lr: float, x: Any, y: Any, dump_dir: str,
        callbacks: tuple[Any, ...] = (), **kw: Any) -> NanGuard:
    model.compile(keras.optimizers.SGD(lr), loss)
    guard = NanGuard(dump_dir=dump_dir, actions=("skip",))
    model.fit(x, y, callbacks=[guard, *callbacks], verbose=0, **kw)
    return guard


def arrays_fit(model: keras.Model, loss: Any, lr: float, x: np.ndarray, y: np.ndarray,
               dump_dir: str, **kw: Any) -> NanGuard:
    return fit(model, loss, lr, x, y, dump_dir, batch_size=len(x) // kw.pop("steps", STEPS),
               shuffle=False, epochs=1, **kw)


def nan_input(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    x[rows(5)][3, 2] = np.nan
    return arrays_fit(net(), sparse_ce(), 0.1, x, y, d)


def invalid_labels(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    y[rows(5).start] = 7
    return arrays_fit(net(), sparse_ce(), 0.1, x, y, d)


def weights_corrupted(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    return arrays_fit(net(), sparse_ce(), 0.1, x, y, d, callbacks=(Corrupt(5, "fc2"),))


def hidden_overflow(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    x[rows(5)] *= 200.0  # exp(200 * ...) overflows in `act`
    return arrays_fit(net("exponential"), sparse_ce(), 0.01, x, y, d)


def naive_softmax(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    x[rows(5)] *= 500.0  # logits ~500: exp overflows in the loss
    return arrays_fit(net("linear"), naive_softmax_ce, 0.01, x, y, d)


def loss_divides_by_zero(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes()
    y[rows(5)] = 0
    return arrays_fit(net(), ce_over_nonzero_labels, 0.1, x, y, d)


def rnn_batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for length in RNN_LENGTHS:
        yield np.zeros((4, length, 2), "float32"), np.ones((4, 1), "float32")


def exploding_rnn(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(name="net", layers=[
        keras.Input((None, 2)),
        keras.layers.SimpleRNN(16, activation="tanh", name="rnn",
                               recurrent_initializer=keras.initializers.Identity(3.0),
                               bias_initializer="zeros"),
        keras.layers.Dense(1, name="head"),
    ])
    return fit(model, "mse", 0.0, rnn_batches(), None, d, epochs=1,
               steps_per_epoch=len(RNN_LENGTHS), shuffle=False)


def lr_classifier(d: str) -> NanGuard:
    # Weights grow ~100x a step; which limit the last jump crosses first (the float32 L2
    # norm of the gradients at ~1.8e19, the loss or the logits at ~3.4e38) depends on the
    # seed. With this one the gradient norm overflows while loss and logits are finite.
    keras.utils.set_random_seed(1)
    x, y = classes(steps=14, n=32, scale=100.0, seed=1)
    model = keras.Sequential(name="net", layers=[
        keras.Input((8,)), keras.layers.Dense(32, "relu", name="fc1"),
        keras.layers.Dense(4, name="head")])
    return arrays_fit(model, sparse_ce(), 1.0, x, y, d, steps=14)


def lr_regression(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, _ = classes(steps=8, n=32)
    model = keras.Sequential(name="net", layers=[
        keras.Input((8,)), keras.layers.Dense(32, "relu", name="fc1"),
        keras.layers.Dense(1, name="head")])
    return arrays_fit(model, "mse", 0.5, x, x.sum(1, keepdims=True), d, steps=8)


def update_overflow(d: str) -> NanGuard:
    keras.utils.set_random_seed(0)
    x, y = classes(steps=3)
    # lr 1e38: the offset's gradient 1e-4 moves it by 1e34, past float32's max; the
    # other weights move by ~1e37 and stay finite.
    return arrays_fit(net("tanh", 4, Offset(name="offset")), ce_plus_mean, 1e38, x, y, d,
                      steps=3)


CASES: list[Case] = [
    Case("nan_input", "NaN input", nan_input, "input_nonfinite", 5, "inputs"),
    Case("invalid_labels", "invalid labels", invalid_labels, "target_invalid", 5, "targets"),
    Case("weights", "weights corrupted", weights_corrupted, "weights_nonfinite", 5,
         "net/fc2/kernel"),
    Case("hidden", "hidden layer overflows", hidden_overflow, "activation_nonfinite", 5, "act"),
    Case("softmax", "naive softmax overflow", naive_softmax, "logit_overflow", 5, "fc2"),
    Case("div0", "loss divides by zero", loss_divides_by_zero, "loss_nonfinite", 5, None),
    Case("rnn", "exploding RNN", exploding_rnn, "grad_explosion", 3, "rnn"),
    # Both kernels' gradient norms overflow at the bad step; the head's is reached first.
    Case("lr_ce", "too-high LR, classifier (stable CE)", lr_classifier, "grad_explosion",
         12, "head"),
    Case("lr_mse", "too-high LR, regression (MSE)", lr_regression, "logit_overflow", 6,
         "head"),
    Case("update", "update overflows", update_overflow, "update_nonfinite", 0,
         "net/offset/offset"),
]
