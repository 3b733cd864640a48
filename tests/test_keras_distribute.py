"""nanguard.keras under tf.distribute.MirroredStrategy: two replicas on two logical CPUs, in a
subprocess (the logical devices must be configured before TensorFlow starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

pytestmark = pytest.mark.keras

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from nanguard.keras import NanGuard

    logging.getLogger("nanguard").setLevel(logging.ERROR)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3)])
        model.compile(keras.optimizers.SGD(0.05),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = rng.integers(0, 3, 128)
    x[40, 0] = np.nan  # batch 1, in the half of it that one replica trains on

    class Rec(keras.callbacks.Callback):
        def __init__(self):
            super().__init__(); self.before = []; self.after = []
        def on_train_batch_begin(self, b, logs=None):
            self.before.append([w.copy() for w in self.model.get_weights()])
        def on_train_batch_end(self, b, logs=None):
            self.after.append([w.copy() for w in self.model.get_weights()])

    guard, rec = NanGuard(dump_dir=sys.argv[1]), Rec()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[guard, rec])
    replicas = [v.value.values for v in model.trainable_variables]
    # A rollback lowers the rate every replica's update uses (each traces in its own thread).
    lowering = NanGuard(dump_dir=sys.argv[1], max_skips=0)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[lowering])
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "events": [(e.step, e.cause, e.action) for e in guard.events],
        "skip_unchanged": all(np.array_equal(a, b) for a, b in zip(rec.before[1], rec.after[1])),
        "good_changed": not all(np.array_equal(a, b) for a, b in zip(rec.before[2], rec.after[2])),
        "replicas_identical": all(np.array_equal(c.numpy(), cs[0].numpy())
                                  for cs in replicas for c in cs),
        "finite": all(np.isfinite(w).all() for w in model.get_weights()),
        "lowered": [(r.lr, r.action) for r in lowering.history],
    }))
    """
)


def test_mirrored_strategy_replicas_skip_together(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["replicas"] == 2
    assert out["events"] == [[1, "input_nonfinite", "skip"]]
    assert out["skip_unchanged"] and out["good_changed"]
    assert out["replicas_identical"]
    assert out["finite"]
    assert out["lowered"] == [[pytest.approx(0.05), None], [pytest.approx(0.05), "rollback"],
                              [pytest.approx(0.025), None], [pytest.approx(0.025), None]]
