"""nanguard.keras with Keras's torch backend, in a subprocess (KERAS_BACKEND is read at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("keras")
pytest.importorskip("torch")

pytestmark = pytest.mark.keras

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np
    import keras
    from keras import ops
    import nanguard
    from nanguard.keras import NanGuard

    logging.getLogger("nanguard").setLevel(logging.ERROR)
    assert keras.backend.backend() == "torch", keras.backend.backend()
    dump_dir = sys.argv[1]
    out = {}
    rng = np.random.default_rng(0)

    def model_and_data(opt):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
        m.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = rng.normal(size=(64, 8)).astype("float32")
        return m, x, rng.integers(0, 3, 64)

    def state(m):
        return [np.array(v.numpy()).tobytes() for v in
                [*m.variables, *m.optimizer.variables] if "learning_rate" not in v.path]

    class Rec(keras.callbacks.Callback):
        def __init__(self):
            super().__init__(); self.before = []; self.after = []; self.logs = []
        def on_train_batch_begin(self, b, logs=None): self.before.append(state(self.model))
        def on_train_batch_end(self, b, logs=None):
            self.after.append(state(self.model)); self.logs.append(dict(logs))

    # 1. a NaN batch and an out-of-range label: skipped inside the step
    m, x, y = model_and_data(keras.optimizers.SGD(0.05))
    x[20] = np.nan
    y[50] = 9
    g, rec = NanGuard(dump_dir=dump_dir), Rec()
    m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[g, rec])
    out["skip_events"] = [(e.step, e.cause, e.action) for e in g.events]
    out["skip_unchanged"] = rec.before[1] == rec.after[1]
    out["good_changed"] = rec.before[2] != rec.after[2]
    out["label_message"] = g.events[-1].message
    out["logs_loss"] = rec.logs[2].get("nanguard_loss")
    out["history_loss"] = g.history[2].loss
    out["finite"] = all(np.isfinite(w).all() for w in m.get_weights())

    # 2. rollback to the snapshot, bit for bit, with Adam state, and the LR lowered
    m, x, y = model_and_data(keras.optimizers.Adam(0.01))
    x[48:64] = np.nan
    g, rec = NanGuard(dump_dir=dump_dir, max_skips=0, snapshot_every=2), Rec()
    m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[g, rec])
    out["rollback_events"] = [(e.step, e.action) for e in g.events]
    out["rollback_identical"] = rec.after[3] == rec.before[g.snapshot_step]
    out["lr_after"] = float(ops.convert_to_numpy(m.optimizer.learning_rate))

    # 3. every step bad: abort raised out of fit, dump readable
    m, x, y = model_and_data(keras.optimizers.SGD(0.05))
    x[:] = np.inf
    g = NanGuard(dump_dir=dump_dir, max_skips=1, max_rollbacks=1)
    try:
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[g])
        out["abort"] = None
    except nanguard.NonFiniteTrainingError as err:
        d = nanguard.load(err.dump_path)
        out["abort"] = [d.event.step, d.event.cause, [h.step for h in d.history]]

    # 4. naive softmax in a hidden layer: replay names it
    def naive_softmax(z):
        e = ops.exp(z)
        return e / ops.sum(e, axis=-1, keepdims=True)
    def softmax_events(build):
        keras.utils.set_random_seed(0)
        m = build()
        m.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = rng.normal(size=(32, 8)).astype("float32"); x[16:] *= 1e4
        g = NanGuard(dump_dir=dump_dir)
        m.fit(x, rng.integers(0, 3, 32), batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[g])
        return [(e.step, e.cause, e.where) for e in g.events]

    out["softmax"] = softmax_events(lambda: keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16),
        keras.layers.Activation(naive_softmax, name="naive_softmax"), keras.layers.Dense(3)]))

    # 5. a second fit with the same guard reuses the instrumented step and still guards
    m, x, y = model_and_data(keras.optimizers.SGD(0.05))
    bad = x.copy(); bad[20, 0] = np.nan
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[g])
    inner = g._inner
    m.fit(bad, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[g])
    out["refit"] = [g._inner is inner, [(e.step, e.cause, e.action) for e in g.events],
                    all(np.isfinite(w).all() for w in m.get_weights())]

    # 6. a LossScaleOptimizer whose scale is far too large: its own overflow skips are
    # counted, not acted on; a NaN batch is still an event; norms are the unscaled ones
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,)),
                          keras.layers.Dense(16, activation="relu", dtype="mixed_float16"),
                          keras.layers.Dense(3, dtype="float32")])
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05),
                                              initial_scale=2.0**24)
    m.compile(lso, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.normal(size=(64, 8)).astype("float32"); x[20, 0] = np.nan
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, rng.integers(0, 3, 64), batch_size=16, epochs=5, shuffle=False, verbose=0,
          callbacks=[g])
    skipped = [r for r in g.history if r.cause == "amp_scaler_skip"]
    out["lso"] = {
        "amp_skips": g.amp_skips, "skipped": len(skipped),
        "skipped_ok": all(r.action is None and np.isfinite(r.loss) for r in skipped),
        "events": [(e.step, e.cause, e.action) for e in g.events],
        "applied_norms": [r.grad_norm for r in g.history if r.cause is None],
        "scale": float(ops.convert_to_numpy(lso.dynamic_scale)),
        "finite": all(np.isfinite(w).all() for w in m.get_weights()),
    }

    # 7. a subclassed model: the replay records each layer's calls and names the layer
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16)
            self.act = keras.layers.Activation(naive_softmax, name="naive_softmax")
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.act(self.hidden(x)))

    out["subclassed"] = softmax_events(Net)

    # 8. a two-output model: each output's labels against its own classes (an id 3 in the
    # 3-class output would be an IndexError in torch's cross-entropy)
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    m = keras.Model(inp, {"a": keras.layers.Dense(3, name="a")(h),
                          "b": keras.layers.Dense(10, name="b")(h)})
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    m.compile(keras.optimizers.SGD(0.05), loss={"a": ce, "b": ce})
    x = rng.normal(size=(64, 8)).astype("float32")
    ya, yb = rng.integers(0, 3, 64), rng.integers(0, 10, 64)
    ya[40] = 3
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, {"a": ya, "b": yb}, batch_size=16, epochs=1, shuffle=False, verbose=0,
          callbacks=[g])
    out["multi_output"] = [[(e.step, e.cause, e.where) for e in g.events],
                           all(np.isfinite(w).all() for w in m.get_weights())]

    # 9. one lowering next to a scheduler that scales the current rate: applied once
    m, x, y = model_and_data(keras.optimizers.SGD(0.1))
    x[16] = np.nan  # batch 1 of the first epoch only (epoch 1 gets clean data below)
    def batches():
        for k in range(8):
            i = k % 4
            xb = x[i * 16:(i + 1) * 16]
            yield (np.nan_to_num(xb) if k >= 4 else xb), y[i * 16:(i + 1) * 16]
    g = NanGuard(dump_dir=dump_dir, max_skips=0)
    sched = keras.callbacks.LearningRateScheduler(lambda e, lr: lr * 0.9 if e else lr)
    m.fit(batches(), steps_per_epoch=4, epochs=2, verbose=0, callbacks=[g, sched])
    out["scheduler"] = [r.lr for r in g.history]

    # 10. a layer call() never uses has no gradient: norm 0.0, and a NaN gradient from a
    # row norm's sqrt at 0 is blamed on the layer it reaches, not on the unused one
    class RowNorm(keras.layers.Layer):
        def call(self, h):
            return ops.concatenate([h, ops.sqrt(ops.sum(ops.square(h), -1, keepdims=True))],
                                   -1)

    class WithUnusedHead(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras.layers.Dense(16, use_bias=False, name="d1")
            self.norm = RowNorm(name="norm")
            self.head = keras.layers.Dense(3, name="head")
            self.aux = keras.layers.Dense(1, name="aux_head")

        def call(self, x):
            return self.head(self.norm(self.d1(x)))

    keras.utils.set_random_seed(0)
    m = WithUnusedHead()
    z = np.zeros((2, 8), "float32")
    m(z); m.aux(m.d1(z))
    m.compile(keras.optimizers.SGD(0.05),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.normal(size=(64, 8)).astype("float32"); x[20] = 0.0
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, rng.integers(0, 3, 64), batch_size=16, epochs=1, shuffle=False, verbose=0,
          callbacks=[g])
    out["unused"] = [[(e.step, e.cause, e.where) for e in g.events],
                     g.history[0].layer_grad_norms[-2:]]

    # 11. loss-only fallback (a train_step of one's own), NaN in the epoch's last batch: the
    # metrics go back to before it, so TerminateOnNaN runs on and History gets the healthy
    # batches' loss and accuracy
    class Delegating(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    keras.utils.set_random_seed(0)
    m = Delegating([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                    keras.layers.Dense(3)])
    m.compile(keras.optimizers.SGD(0.05),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x = rng.normal(size=(64, 8)).astype("float32"); x[48, 0] = np.nan
    g, rec = NanGuard(dump_dir=dump_dir, snapshot_every=1), Rec()
    h = m.fit(x, rng.integers(0, 3, 64), batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[g, rec, keras.callbacks.TerminateOnNaN()])
    out["fallback"] = {
        "events": [(e.step, e.action) for e in g.events],
        "batch_logs": [[float(lg["loss"]), float(lg["accuracy"])] for lg in rec.logs],
        "history": [h.history["loss"], h.history["accuracy"]],
    }

    # 12. loss-only fallback, the Keras guide's torch train_step: its logs nest the compiled
    # metrics under "compile_metrics"; the NaN last batch's mae reaches no later callback
    import torch

    class Guide(keras.Sequential):
        def train_step(self, data):
            x, y = data
            self.zero_grad()
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
            loss.backward()
            tw = list(self.trainable_weights)
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in tw], tw)
            for mt in self.metrics:
                mt.update_state(loss) if mt.name == "loss" else mt.update_state(y, y_pred)
            return {mt.name: mt.result() for mt in self.metrics}

    keras.utils.set_random_seed(0)
    m = Guide([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
               keras.layers.Dense(1)])
    m.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])
    x = rng.normal(size=(64, 8)).astype("float32"); x[48, 0] = np.nan
    g, rec = NanGuard(dump_dir=dump_dir, snapshot_every=1), Rec()
    h = m.fit(x, rng.normal(size=(64, 1)).astype("float32"), batch_size=16, epochs=1,
              shuffle=False, verbose=0, callbacks=[g, rec, keras.callbacks.TerminateOnNaN()])
    out["guide"] = {
        "events": [(e.step, e.action) for e in g.events],
        "batch_logs": [[float(lg["loss"]), float(lg["mae"])] for lg in rec.logs],
        "history": [h.history["loss"][0], h.history["mae"][0]],
    }

    # 13. a skipped batch whose loss is finite (sqrt at 0: NaN gradients; a bad label in the
    # other head) is left out of `loss` and of the per-output loss means: each run's
    # epoch means against a run without that batch (lr 0, the weights never move)
    def sqrt_model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False),
                              keras.layers.Lambda(lambda z: ops.sqrt(ops.abs(z)))])
        m.compile(keras.optimizers.SGD(0.0), "mse")
        return m

    def two_heads():
        keras.utils.set_random_seed(0)
        a = keras.Input((8,), name="feat")
        h = keras.layers.Dense(16, activation="relu")(a)
        m = keras.Model(a, {"cls": keras.layers.Dense(5, name="cls")(h),
                            "reg": keras.layers.Dense(1, name="reg")(h)})
        m.compile(keras.optimizers.SGD(0.0), loss_weights={"cls": 1.0, "reg": 0.5}, loss={
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"})
        return m

    def means(build, x, y, guard=None):
        h = build().fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
                        callbacks=[guard] if guard else [])
        return {k: v[0] for k, v in h.history.items() if not k.startswith("nanguard")}

    keep = np.r_[0:64, 96:128]
    x = rng.normal(size=(128, 4)).astype("float32"); x[64:96] = 0.0
    y = (rng.normal(size=(128, 1)) * 100).astype("float32")
    g = NanGuard(dump_dir=dump_dir)
    tracked = {"sqrt": [means(sqrt_model, x, y, g), means(sqrt_model, x[keep], y[keep])],
               "sqrt_events": [(e.step, e.cause, e.details.get("grad_entries_finite"))
                               for e in g.events]}
    x = rng.normal(size=(128, 8)).astype("float32")
    y = {"cls": rng.integers(0, 5, 128), "reg": rng.normal(size=(128, 1)).astype("float32")}
    y["cls"][70] = 7
    g = NanGuard(dump_dir=dump_dir)
    tracked["heads"] = [means(two_heads, x, y, g),
                        means(two_heads, x[keep], {k: v[keep] for k, v in y.items()})]
    tracked["heads_events"] = [(e.step, e.cause, e.where) for e in g.events]
    out["tracked"] = tracked

    # 14. finite gradients (~1e20) whose float32 L2 norm overflows: still bad, but told apart
    # from non-finite ones
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="lin")])
    m.compile(keras.optimizers.SGD(1e-30), "mse")
    x = (rng.normal(size=(32, 4)) * 1e10).astype("float32")
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, x.sum(1, keepdims=True), batch_size=32, epochs=1, verbose=0, callbacks=[g])
    out["overflow"] = [(e.step, e.cause, e.details.get("grad_entries_finite"),
                        e.details.get("grad_norm_float64", 0.0) > 1e20,
                        "every gradient entry is finite" in e.message) for e in g.events]

    # 14b. the same with a weight regularizer, which reads its variable through the
    # recomputation's stateless scope
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)),
                          keras.layers.Dense(3, kernel_regularizer="l2", name="hidden"),
                          keras.layers.Dense(1, name="lin")])
    m.compile(keras.optimizers.SGD(1e-30), "mse")
    g = NanGuard(dump_dir=dump_dir)
    m.fit(x, x.sum(1, keepdims=True), batch_size=32, epochs=1, verbose=0, callbacks=[g])
    out["overflow_regularized"] = [(e.step, e.cause, e.details.get("grad_entries_finite"))
                                   for e in g.events][:1]

    # 15. (B, T) labels padded with -1: the first bad one by batch row and position
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((10,), dtype="int32"), keras.layers.Embedding(30, 8),
                          keras.layers.Dense(5)])
    m.compile(keras.optimizers.SGD(0.05),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = rng.integers(0, 5, (64, 10)); y[40, 7:] = -1
    g = NanGuard(dump_dir=dump_dir)
    m.fit(rng.integers(1, 30, (64, 10)), y, batch_size=32, epochs=1, shuffle=False, verbose=0,
          callbacks=[g])
    out["sequence_label"] = [(e.step, e.cause, e.message) for e in g.events]

    # 16. a shared (siamese) layer whose second call (branch b) overflows: named, not the
    # layer after it; every input of a multi-input blamed layer is dumped
    def activations(g):
        d = nanguard.load(g.dumps[0])
        return {k: [int(np.isnan(v).sum()), int(np.isinf(v).sum())]
                for k, v in d.tensors.items() if k.startswith("activation.")}

    def two_branches(xb_scale, shared):
        keras.utils.set_random_seed(0)
        xa = rng.normal(size=(64, 8)).astype("float32")
        xb = rng.normal(size=(64, 8)).astype("float32"); xb[16:32] *= xb_scale
        a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
        if shared:
            enc = keras.layers.Dense(16, name="shared_enc")
            sm = keras.layers.Activation(naive_softmax, name="shared_sm")
            h = keras.layers.Concatenate(name="concatenate")([sm(enc(a)), sm(enc(b))])
        else:
            h = keras.layers.Lambda(lambda t: naive_softmax(ops.concatenate(t, -1)),
                                    name="joint_sm")([keras.layers.Dense(4)(a),
                                                      keras.layers.Dense(4)(b)])
        m = keras.Model([a, b], keras.layers.Dense(3, name="head")(h))
        m.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        g = NanGuard(dump_dir=dump_dir)
        m.fit([xa, xb], rng.integers(0, 3, 64), batch_size=16, epochs=1, shuffle=False,
              verbose=0, callbacks=[g])
        return [[(e.step, e.cause, e.where) for e in g.events], activations(g)]

    out["shared"] = two_branches(100.0, shared=True)
    out["joint"] = two_branches(1e4, shared=False)

    # 17. allow_neg_inf: an intended -inf mask is not blamed, nor the -inf flowing from it;
    # the naive softmax after it that overflows is
    def masked(h):
        keep = ops.arange(ops.shape(h)[-1]) < ops.shape(h)[-1] - 2
        return ops.where(keep, h, -np.inf)

    def functional_masked():
        i = keras.Input((8,))
        h = keras.layers.Lambda(masked, name="attn_mask")(keras.layers.Dense(8)(i))
        h = keras.layers.Activation(naive_softmax, name="naive_sm")(h)
        return keras.Model(i, keras.layers.Dense(3)(h))

    class MaskedNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.fd = keras.layers.Dense(8)
            self.mask = keras.layers.Lambda(masked, name="attn_mask")
            self.sm = keras.layers.Activation(naive_softmax, name="naive_sm")
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.sm(self.mask(self.fd(x))))

    def masked_events(build, allow):
        keras.utils.set_random_seed(0)
        m = build()
        m.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = rng.normal(size=(32, 8)).astype("float32"); x[16:] *= 1e4
        g = NanGuard(dump_dir=dump_dir, allow_neg_inf=allow)
        m.fit(x, rng.integers(0, 3, 32), batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[g])
        return [[(e.step, e.cause, e.where) for e in g.events], activations(g)]

    out["neg_inf"] = {
        "not_allowed": masked_events(functional_masked, ())[0],
        "allowed": masked_events(functional_masked, ("attn_mask",)),
        "pattern_subclassed": masked_events(MaskedNet, ("attn_*",)),
    }
    print("RESULT " + json.dumps(out))
    """
)


def test_torch_backend_end_to_end(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines, proc.stdout[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["skip_events"] == [[1, "input_nonfinite", "skip"], [3, "target_invalid", "skip"]]
    assert out["skip_unchanged"]
    assert out["good_changed"]
    assert "the first is 9" in out["label_message"]
    assert out["logs_loss"] == pytest.approx(out["history_loss"])
    assert out["finite"]
    assert out["rollback_events"] == [[3, "rollback"]]
    assert out["rollback_identical"]
    assert out["lr_after"] == pytest.approx(0.005)
    assert out["abort"] == [3, "input_nonfinite", [0, 1, 2, 3]]
    assert out["softmax"] == [[1, "activation_nonfinite", "naive_softmax"]]
    assert out["refit"] == [True, [[1, "input_nonfinite", "skip"]], True]
    lso = out["lso"]
    assert lso["amp_skips"] == lso["skipped"] >= 1
    assert lso["skipped_ok"]
    assert lso["events"] == [[s, "input_nonfinite", "skip"] for s in (1, 5, 9, 13, 17)]
    assert lso["applied_norms"] and all(0 < n < 100 for n in lso["applied_norms"])
    assert lso["scale"] < 2.0**24
    assert lso["finite"]
    assert out["subclassed"] == [[1, "activation_nonfinite", "naive_softmax"]]
    assert out["multi_output"] == [[[2, "target_invalid", "targets.a"]], True]
    assert out["unused"] == [[[1, "grad_nonfinite", "d1"]], [0.0, 0.0]]
    fallback = out["fallback"]
    assert fallback["events"] == [[3, "skip"], [7, "skip"]]
    logs = fallback["batch_logs"]
    assert len(logs) == 8 and np.isfinite(logs).all()
    assert logs[3] == pytest.approx(logs[2]) and logs[7] == pytest.approx(logs[6])
    assert np.allclose(fallback["history"], [[logs[2][0], logs[6][0]],
                                             [logs[2][1], logs[6][1]]])
    assert min(fallback["history"][0]) > 0.1
    guide = out["guide"]
    assert guide["events"] == [[3, "skip"]]
    logs = guide["batch_logs"]
    assert len(logs) == 4 and np.isfinite(logs).all()
    assert logs[3] == pytest.approx(logs[2]) and guide["history"] == pytest.approx(logs[2])
    assert out["scheduler"] == pytest.approx([0.1, 0.1] + [0.05] * 2 + [0.045] * 4, rel=1e-5)
    tracked = out["tracked"]
    assert tracked["sqrt_events"] == [[2, "grad_nonfinite", False]]
    assert tracked["sqrt"][0]["loss"] == pytest.approx(tracked["sqrt"][1]["loss"], rel=1e-6)
    assert tracked["heads_events"] == [[2, "target_invalid", "targets.cls"]]
    guarded, without = tracked["heads"]
    assert set(guarded) == set(without) == {"loss", "cls_loss", "reg_loss"}
    for name in guarded:
        assert guarded[name] == pytest.approx(without[name], rel=1e-6), name
    assert out["overflow"] == [[0, "grad_nonfinite", True, True, True]]
    assert out["overflow_regularized"] == [[0, "grad_nonfinite", True]]
    ((step, cause, message),) = out["sequence_label"]
    assert (step, cause) == (1, "target_invalid")
    assert "the first is -1 (batch row 8, position 7)" in message
    assert "SparseCategoricalCrossentropy(ignore_class=-1)" in message
    events, acts = out["shared"]
    assert events == [[1, "activation_nonfinite", "shared_sm"]]
    assert set(acts) == {"activation.shared_sm.input", "activation.shared_sm.output"}
    assert acts["activation.shared_sm.input"] == [0, 0] and acts["activation.shared_sm.output"][0]
    events, acts = out["joint"]
    assert events == [[1, "activation_nonfinite", "joint_sm"]]
    assert set(acts) == {"activation.joint_sm.input.0", "activation.joint_sm.input.1",
                         "activation.joint_sm.output"}
    neg_inf = out["neg_inf"]
    assert neg_inf["not_allowed"] == [[1, "activation_nonfinite", "attn_mask"]]
    for key in ("allowed", "pattern_subclassed"):
        events, acts = neg_inf[key]
        assert events == [[1, "activation_nonfinite", "naive_sm"]], key
        assert acts["activation.naive_sm.input"][1] > 0, key  # the mask's -inf came in
        assert acts["activation.naive_sm.output"][0] > 0, key  # the overflow's NaN
