"""Quantization-aware training: weights fake-quantized in the forward pass, full-precision
gradients through them.

Keras 3.15 quantizes after training only (`Model.quantize`). Here the layers Keras would
quantize to int4 (Dense, EinsumDense, Embedding and the tied ReversibleEmbedding) read their
weights as the int4 grid Keras will store: groups of `block_size` inputs, each with a scale and
a zero point from its min and max (`keras.quantizers.abs_max_quantize_grouped_with_zero_point`),
rounded and dequantized. The rounding has no useful gradient, so the gradient passes straight
through it to the float32 weights (the straight-through estimator, Bengio et al. 2013,
arXiv:1308.3432). The model trains to weights that lose little when Keras rounds them for real.

The layers are switched by giving each one a subclass whose weight property returns the
fake-quantized value; `disable` (or leaving the `fake_quantized` context) gives them back
their own class, so the model saves and quantizes as a plain Keras model.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from kmp._keras import flatten_layers
from kmp.errors import UserError

MODES = ("int4",)
BLOCK_SIZE = 128  # Keras's default int4 group (Int4QuantizationConfig.block_size)
_EPSILON = keras.config.epsilon()  # as Keras's quantizer adds to each group's range
_SUBCLASSES: dict = {}


def fake_quantize_int4(w, block_size: int = BLOCK_SIZE):
    """The values a 2-D weight takes once stored as grouped int4 and read back.

    Groups of `block_size` rows (zero-padded at the end, as Keras pads) get a scale
    `(max - min) / 15` and a zero point; each weight rounds to one of the 16 levels. The
    gradient is the identity (straight-through).

    Args:
        w: tensor (rows, columns). Rows are the reduced (input) axis.
        block_size: int. Rows per group.

    Returns:
        A tensor like `w`.

    Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
    >>> q = keras.ops.convert_to_numpy(fake_quantize_int4(w))
    >>> int(max(len(np.unique(q[:128, j])) for j in range(8))) <= 16
    True
    """
    w = ops.convert_to_tensor(w)
    w32 = ops.cast(w, "float32")
    rows, columns = w32.shape
    groups = -(-rows // block_size)
    padded = ops.pad(w32, [[0, groups * block_size - rows], [0, 0]])
    blocks = ops.reshape(padded, (groups, block_size, columns))
    low = ops.min(blocks, axis=1, keepdims=True)
    high = ops.max(blocks, axis=1, keepdims=True)
    scale = (high - low + _EPSILON) / 15.0
    zero = ops.clip(ops.round(-low / scale) - 8.0, -8.0, 7.0)
    q = ops.clip(ops.round(blocks / scale) + zero, -8.0, 7.0)
    dequantized = ops.reshape((q - zero) * scale, (groups * block_size, columns))[:rows]
    return ops.cast(w32 + ops.stop_gradient(dequantized - w32), w.dtype)


def _einsum_fake_quantize(kernel, equation: str, block_size: int):
    """Fake-quantizes an EinsumDense kernel flattened as Keras flattens it: the axes summed
    over (absent from the output) first, as rows."""
    spec, output = equation.split("->")
    kernel_axes = spec.split(",")[1]
    shape = tuple(kernel.shape)
    rows = 1
    for letter, size in zip(kernel_axes, shape):
        if letter not in output:
            rows *= size
    flat = ops.reshape(kernel, (rows, -1))
    return ops.reshape(fake_quantize_int4(flat, block_size), shape)


def _fake_value(layer, value):
    block = layer._kmp_qat_block
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_fake_quantize(value, layer.equation, block)
    if isinstance(layer, keras.layers.Embedding):  # groups run along each token's vector
        return ops.transpose(fake_quantize_int4(ops.transpose(value), block))
    return fake_quantize_int4(value, block)


def _attribute(layer):
    """The weight property `layer` computes with, or None when Keras would not quantize it."""
    kind = type(layer)
    if kind in (keras.layers.Dense, keras.layers.EinsumDense):
        return "kernel"
    if kind is keras.layers.Embedding or isinstance(layer, keras.layers.ReversibleEmbedding):
        if isinstance(layer, keras.layers.ReversibleEmbedding) and not layer.tie_weights:
            raise UserError(f"QAT supports tied ReversibleEmbedding only; {layer.name} has "
                            "its own reverse_embeddings.")
        return "embeddings"
    return None


def _subclass(kind, attribute: str):
    if kind not in _SUBCLASSES:
        def read(self):
            return _fake_value(self, getattr(super(subclass, self), attribute))
        subclass = type(f"FakeQuant{kind.__name__}", (kind,), {
            attribute: property(read), "_kmp_qat_original": kind})
        _SUBCLASSES[kind] = subclass
    return _SUBCLASSES[kind]


def enable(model, mode: str = "int4", block_size: int = BLOCK_SIZE) -> list:
    """Makes every layer of `model` that `model.quantize(mode)` would quantize compute with
    fake-quantized weights (straight-through gradients). Undo with `disable`.

    Args:
        model: a built Keras model, not quantized yet.
        mode: str. "int4" (the only mode: int8 rounding costs almost nothing to begin with).
        block_size: int. Weights per group, as Keras's `Int4QuantizationConfig`.

    Returns:
        The layers switched.

    Raises:
        UserError: for another mode, or a model already quantized.
    """
    if mode not in MODES:
        raise UserError(f"Unknown QAT mode {mode!r}. Use one of: {', '.join(MODES)}.",
                        field="qat")
    switched = []
    for layer in flatten_layers(model, include_self=True):
        if getattr(layer, "quantization_mode", None):
            raise UserError(f"{layer.name} is already quantized "
                            f"({layer.quantization_mode}); QAT starts from a float model.")
        if hasattr(type(layer), "_kmp_qat_original"):
            continue
        attribute = _attribute(layer)
        if attribute is None:
            continue
        layer._kmp_qat_block = block_size
        layer.__class__ = _subclass(type(layer), attribute)
        switched.append(layer)
    return switched


def disable(model) -> None:
    """Gives every layer `enable` switched its own class back."""
    for layer in flatten_layers(model, include_self=True):
        original = getattr(type(layer), "_kmp_qat_original", None)
        if original is not None:
            layer.__class__ = original


@contextlib.contextmanager
def fake_quantized(model, mode: str = "int4", block_size: int = BLOCK_SIZE):
    """`enable` for the body of a `with` block, `disable` after it.

    Example:
    >>> m = keras.Sequential([keras.Input((256,)), keras.layers.Dense(4)])
    >>> with fake_quantized(m):
    ...     type(m.layers[0]).__name__
    'FakeQuantDense'
    >>> type(m.layers[0]).__name__
    'Dense'
    """
    enable(model, mode, block_size)
    try:
        yield model
    finally:
        disable(model)
