"""Attention whose scores and softmax are float32 under any policy: kmp's own causal
self-attention layer, and the computation `kmp.harden` puts into Keras's MultiHeadAttention."""

from __future__ import annotations

import keras
from keras import ops

from kmp import backends
from kmp._keras import (
    mha_causal_mask,
    mha_dropout,
    mha_equations,
    mha_masked_softmax,
    mha_score_scale,
)
from kmp.errors import UserError
from kmp.layers.islands import Softmax

# MultiHeadAttention's einsums for (batch, length, heads, width) projections (Keras 3.15.1).
_HEADS_EQUATIONS = ("aecd,abcd->acbe", "acbe,aecd->abcd")


@keras.saving.register_keras_serializable(package="kmp")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention with a float32 score/softmax island.

    The Q/K/V and output projections run in the compute dtype (Tensor Cores); Q and K are cast
    to float32 for the scores, the causal and padding masks and the softmax are applied in
    float32, and the probabilities are rounded to the compute dtype only for the product with V.
    This holds with and without dropout (keras' MultiHeadAttention computes its softmax in the
    compute dtype whenever dropout > 0).

    Args:
        num_heads: int. Number of heads; must divide the input width.
        dropout: float. Dropout rate on the attention probabilities. Defaults to 0.0.
        use_bias: bool. Biases in the projections. Defaults to True.
        kernel_initializer: initializer for the projections. Defaults to "glorot_uniform".
        **kwargs: Base layer keyword arguments, e.g. `dtype` and `name`.

    Call args:
        inputs: (batch, seq, hidden) tensor.
        padding_mask: optional (batch, seq) tensor, 1/True for real tokens.
        training: bool. Enables dropout.

    Example:
    >>> import numpy as np
    >>> tuple(CausalSelfAttention(num_heads=2)(np.ones((1, 3, 4), "float32")).shape)
    (1, 3, 4)
    """

    def __init__(self, num_heads, dropout=0.0, use_bias=True,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.softmax = Softmax(dtype=self.dtype_policy, name="softmax")
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy, name="dropout")

    def build(self, input_shape):
        hidden = input_shape[-1]
        if hidden % self.num_heads:
            raise UserError(
                f"CausalSelfAttention: input width {hidden} is not divisible by "
                f"num_heads={self.num_heads}. Use a num_heads that divides {hidden}."
            )
        dense = dict(use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
                     dtype=self.dtype_policy)
        self.qkv = keras.layers.Dense(3 * hidden, name="qkv", **dense)
        self.qkv.build(input_shape)
        self.output_dense = keras.layers.Dense(hidden, name="output", **dense)
        self.output_dense.build(input_shape)

    def call(self, inputs, padding_mask=None, training=None):
        batch, seq, hidden = ops.shape(inputs)[0], ops.shape(inputs)[1], inputs.shape[-1]
        head_dim = hidden // self.num_heads
        qkv = ops.reshape(self.qkv(inputs), (batch, seq, 3, self.num_heads, head_dim))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = ops.einsum("bqhd,bkhd->bhqk", ops.cast(q, "float32"), ops.cast(k, "float32"))
        scores = scores * (float(head_dim) ** -0.5)
        positions = ops.arange(seq)
        mask = ops.expand_dims(positions, 1) >= ops.expand_dims(positions, 0)  # (q, k)
        mask = mask[None, None]
        if padding_mask is not None:
            keep = ops.cast(padding_mask, "bool")[:, None, None, :]
            mask = ops.logical_and(mask, keep)
        probs = self.dropout_layer(self.softmax(scores, mask=mask), training=training)
        out = ops.einsum("bhqk,bkhd->bqhd", ops.cast(probs, v.dtype), v)
        return self.output_dense(ops.reshape(out, (batch, seq, hidden)))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


def float32_attention(layer, query, key, value, attention_mask=None, training=None,
                      return_attention_scores=False, use_causal_mask=False):
    """A `keras.layers.MultiHeadAttention`'s attention computation with a float32 island.

    The scores are a float32 product of the projected query and key, the mask and softmax run
    in float32 in the layer's `kmp.layers.Softmax`, and only the probabilities are rounded to
    the compute dtype for the product with the values. `kmp.harden` binds it to each
    MultiHeadAttention, replacing Keras's path, which with dropout 0 calls the fused
    `ops.dot_product_attention` (where the scores are rounded to the compute dtype on the
    TensorFlow backend) and otherwise computes the softmax in the compute dtype. Same
    arguments and returns as Keras's method (Keras 3.15.1). Where the backend has its own
    kernel of this island (`kmp.backends.kernel("attention_island")`, TensorFlow: the same
    forward with a hand-written backward) and neither scores nor dropout are asked for, that
    kernel computes it and the scores returned are None, as Keras's own path returns them.
    """
    if use_causal_mask:  # Keras's call leaves the causal mask to the fused kernel
        causal = mha_causal_mask(layer, query, value)
        attention_mask = causal if attention_mask is None else ops.logical_and(
            ops.cast(attention_mask, "bool"), causal)
    scores_equation, combine_equation = mha_equations(layer)
    rate, dropout = mha_dropout(layer)
    own = backends.kernel("attention_island")
    if (own is not None and not return_attention_scores and (rate == 0 or not training)
            and (scores_equation, combine_equation) == _HEADS_EQUATIONS
            and (attention_mask is None or len(attention_mask.shape) == 3)):
        return own(query, key, value, attention_mask, mha_score_scale(layer)), None
    scaled = ops.cast(query, "float32") * mha_score_scale(layer)
    scores = ops.einsum(scores_equation, ops.cast(key, "float32"), scaled)
    probs = mha_masked_softmax(layer, scores, attention_mask)
    dropped = dropout(probs, training=training) if rate > 0 else probs
    output = ops.einsum(combine_equation, ops.cast(dropped, value.dtype), value)
    return output, probs
