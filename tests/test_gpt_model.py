"""kmp.gpt's next-token loss against Keras's sparse crossentropy (the float32 reference)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmp.gpt import NextTokenCrossentropy, lm_loss

REFERENCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _value_and_grad(loss, labels, logits, **kwargs):
    logits = tf.convert_to_tensor(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(labels, logits, **kwargs)
    return value.numpy(), tape.gradient(value, logits).numpy()


def _relative(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])  # 3000: logits far past exp's range
def test_value_and_gradient_match_keras_in_float32(scale):
    rng = np.random.default_rng()
    logits = (rng.normal(size=(3, 7, 50)) * scale).astype("float32")
    labels = rng.integers(0, 50, size=(3, 7))
    weights = rng.uniform(size=(3, 7)).astype("float32")
    for kwargs in ({}, {"sample_weight": weights}):
        value, grad = _value_and_grad(NextTokenCrossentropy(), labels, logits, **kwargs)
        ref_value, ref_grad = _value_and_grad(REFERENCE, labels, logits, **kwargs)
        assert np.isfinite(value) and np.isfinite(grad).all()
        assert abs(value - ref_value) <= 1e-6 * abs(ref_value)
        assert _relative(grad, ref_grad) <= 1e-6
    per_token = NextTokenCrossentropy(reduction=None)(labels, logits)
    assert per_token.shape == (3, 7)
    assert _relative(per_token, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)(labels, logits)) <= 1e-6


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_are_upcast_like_keras(dtype):
    rng = np.random.default_rng()
    logits = tf.cast(rng.normal(size=(4, 9, 64)) * 5, dtype)
    labels = rng.integers(0, 64, size=(4, 9))
    value, grad = _value_and_grad(NextTokenCrossentropy(), labels, logits)
    ref_value, ref_grad = _value_and_grad(REFERENCE, labels, logits)
    assert value.dtype == np.float32 and grad.dtype == logits.dtype
    assert abs(value - ref_value) <= 1e-6 * abs(ref_value)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3  # the gradient is rounded back to `dtype`
    assert _relative(grad, ref_grad) <= tol


def test_same_under_xla_and_serializable():
    rng = np.random.default_rng()
    logits = tf.constant(rng.normal(size=(2, 5, 32)).astype("float32"))
    labels = tf.constant(rng.integers(0, 32, size=(2, 5)))
    loss = NextTokenCrossentropy()
    compiled = tf.function(lambda y, x: loss(y, x), jit_compile=True)
    assert abs(float(compiled(labels, logits)) - float(loss(labels, logits))) <= 1e-6
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss),
                                                    safe_mode=True)
    assert isinstance(restored, NextTokenCrossentropy) and restored.name == loss.name
    assert isinstance(lm_loss(), NextTokenCrossentropy)  # the tests run without a GPU
