"""Quantization-aware training (kmp.qat): the fake-quantized forward is the int4 model Keras
builds, the gradient passes straight through, and layers get their own class back."""

import keras
import numpy as np
import pytest
from _helpers import value_and_grads

import kmp
from kmp import qat

pytestmark = pytest.mark.backends


def _layers():
    """One of each layer Keras quantizes, with shapes that need padding (200 = 3 groups of
    64, the last one short) and seeded random weights."""
    rng = np.random.default_rng(11)
    made = [
        (keras.layers.Dense(24), (3, 200)),
        (keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 4, 6)), (2, 5, 200)),
        (keras.layers.EinsumDense("abcd,cde->abe", output_shape=(None, 40)), (2, 5, 4, 50)),
        (keras.layers.Embedding(30, 200), None),
        (keras.layers.ReversibleEmbedding(30, 200), None),
    ]
    for layer, shape in made:
        layer.build(shape or (2, 7))
        for v in layer.weights:
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    return made


def _inputs(shape, rng):
    if shape is None:
        return rng.integers(0, 30, (2, 7)).astype("int32")
    return rng.normal(size=shape).astype("float32")


def _out(layer, x, reverse=False):
    y = layer(x, reverse=True) if reverse else layer(x)
    return keras.ops.convert_to_numpy(y)


@pytest.mark.parametrize("index", range(5))
def test_fake_quantized_forward_is_the_model_keras_quantizes(index):
    layer, shape = _layers()[index]
    twin, _ = _layers()[index]  # the same seeded weights
    rng = np.random.default_rng(3)
    x = _inputs(shape, rng)
    plain = _out(layer, x)
    twin.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=64))
    with qat.fake_quantized(layer, block_size=64):
        np.testing.assert_allclose(_out(layer, x), _out(twin, x), rtol=0, atol=1e-5)
        assert np.abs(_out(layer, x) - plain).max() > 1e-3  # it does round
        if isinstance(layer, keras.layers.ReversibleEmbedding):  # the tied output projection
            h = rng.normal(size=(2, 7, 200)).astype("float32")
            np.testing.assert_allclose(_out(layer, h, True), _out(twin, h, True), atol=1e-5)
    np.testing.assert_array_equal(_out(layer, x), plain)  # its own weights again


def test_the_gradient_passes_straight_through_the_rounding():
    layer, _ = _layers()[0]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 200)).astype("float32")
    r = rng.normal(size=(3, 24)).astype("float32")
    with qat.fake_quantized(layer, block_size=64):
        quantized = keras.ops.convert_to_numpy(keras.ops.stop_gradient(layer.kernel))
        _, (gx, gk, _) = value_and_grads(
            lambda t: keras.ops.sum(keras.ops.multiply(layer(t), r)), x, [layer])
    # The straight-through gradient is the float layer's gradient at the rounded weights:
    # d/dW = x^T r, d/dx = r W_q^T (through the rounding itself it would be zero or the
    # gradient of the group scales instead).
    np.testing.assert_allclose(gk, x.T @ r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, r @ quantized.T, rtol=1e-5, atol=1e-5)


def test_layers_get_their_own_class_back_and_save_as_plain_keras(tmp_path):
    model = keras.Sequential([keras.Input((200,)), keras.layers.Dense(8),
                              keras.layers.LayerNormalization()])
    switched = qat.enable(model, block_size=64)
    assert [type(layer).__name__ for layer in switched] == ["FakeQuantDense"]
    assert qat.enable(model) == []  # already switched: nothing twice
    qat.disable(model)
    assert type(model.layers[0]) is keras.layers.Dense
    model.save(tmp_path / "m.keras")
    assert type(keras.saving.load_model(tmp_path / "m.keras").layers[0]) is keras.layers.Dense


def test_bad_requests_are_one_line_user_errors():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    with pytest.raises(kmp.UserError, match="Unknown QAT mode 'int2'"):
        qat.enable(model, "int2")
    model.quantize("int8")
    with pytest.raises(kmp.UserError, match="already quantized.*int8"):
        qat.enable(model)
