"""Shared test set-up. Framework imports stay in each adapter's own test file."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# TensorFlow's oneDNN kernels fuse Dense's MatMul+BiasAdd+ReLU, and on AVX-512 hosts the fused
# ReLU maps NaN to 0: a NaN batch's forward then looks finite (loss, logits) while its
# gradients are NaN. Tests that assert the forward's numbers would pass or fail with the CI
# host's CPU, so they run on TensorFlow's portable kernels; what the guard does on either
# kind of host is tested with oneDNN on in a subprocess
# (test_keras_guard.py::test_nan_batch_is_skipped_with_onednn_kernels).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
