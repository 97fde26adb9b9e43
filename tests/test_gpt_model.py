"""kmp.gpt's model: the next-token loss against Keras's sparse crossentropy (the float32
reference), and saved models that compute what the trained ones did."""

import keras
import numpy as np
import pytest
from _helpers import value_and_grads

import kmp
from kmp.gpt import NextTokenCrossentropy, build_model, lm_loss, load_model, preset

pytestmark = pytest.mark.backends
REFERENCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _value_and_grad(loss, labels, logits, **kwargs):
    value, (grad,) = value_and_grads(lambda x: loss(labels, x, **kwargs), logits)
    return value, grad


def _relative(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])  # 3000: logits far past exp's range
def test_value_and_gradient_match_keras_in_float32(scale):
    rng = np.random.default_rng(int(scale))
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
    rng = np.random.default_rng(5)
    logits = keras.ops.convert_to_numpy(keras.ops.cast(rng.normal(size=(4, 9, 64)) * 5, dtype))
    labels = rng.integers(0, 64, size=(4, 9))
    value, grad = _value_and_grad(NextTokenCrossentropy(), labels, logits)
    ref_value, ref_grad = _value_and_grad(REFERENCE, labels, logits)
    assert value.dtype == np.float32 and grad.dtype == logits.dtype
    assert abs(value - ref_value) <= 1e-6 * abs(ref_value)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3  # the gradient is rounded back to `dtype`
    assert _relative(grad, ref_grad) <= tol


def test_same_under_xla_and_serializable():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 5, 32)).astype("float32")
    labels = rng.integers(0, 32, size=(2, 5))
    loss = NextTokenCrossentropy()
    # Compiled inside a model's step (XLA on TensorFlow and JAX), against the eager value.
    model = keras.Sequential([keras.Input((5, 32)), keras.layers.Identity()])
    model.compile(loss=loss, jit_compile=keras.backend.backend() != "torch")
    assert abs(model.evaluate(logits, labels, verbose=0) - float(loss(labels, logits))) <= 1e-6
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss),
                                                    safe_mode=True)
    assert isinstance(restored, NextTokenCrossentropy) and restored.name == loss.name



@pytest.mark.parametrize("kind, loss_type", [
    ("cpu", NextTokenCrossentropy), ("gpu:9.0", keras.losses.SparseCategoricalCrossentropy)])
def test_lm_loss_picks_by_hardware(fake_hardware, kind, loss_type):
    fake_hardware(kind)
    assert isinstance(lm_loss(), loss_type)


def _dtypes_of_every_layer(model, x):
    from kmp._keras import recorded_outputs

    with recorded_outputs(model) as outputs:
        logits = model(x, training=False)
    return [(type(layer).__name__, keras.backend.standardize_dtype(t.dtype))
            for layer, t in outputs], keras.ops.convert_to_numpy(logits)


@pytest.mark.parametrize("policy, logits, residual", [
    ("mixed_bfloat16", "compute", False), ("mixed_bfloat16", "float32", False),
    ("mixed_bfloat16", "compute", True), ("mixed_float16", "float32", True),
])
def test_saved_model_computes_what_the_trained_one_did(tmp_path, policy, logits, residual):
    """Every option that changes dtypes (policy, where the logits multiply, a float32 residual
    stream) survives model.keras: every layer's output dtype and the logits are the same."""
    kmp.set_policy(policy)
    keras.utils.set_random_seed(0)
    config = preset("tiny", num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                    seq_len=16, vocab_size=128, logits=logits)
    model = build_model(config)
    kmp.compile(model, "adam", lm_loss(), float32_residual=residual)
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(0, 128, (2, 16)).astype("int32"),
         "padding_mask": np.ones((2, 16), "int32")}
    model.fit(x, x["token_ids"], epochs=1, verbose=0)  # trained weights, not the init
    dtypes, expected = _dtypes_of_every_layer(model, x)
    model.save(tmp_path / "model.keras")
    keras.config.set_dtype_policy("float32")  # the loader must not depend on the global policy
    loaded = load_model(tmp_path / "model.keras")
    loaded_dtypes, got = _dtypes_of_every_layer(loaded, x)
    assert loaded_dtypes == dtypes
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert loaded.backbone.logits_dtype == model.backbone.logits_dtype
    assert loaded.backbone.float32_residual == residual
