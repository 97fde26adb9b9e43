"""`harden(model)`: give an existing model FP32 islands in place, keeping its weights."""

from __future__ import annotations

import keras

from kmp._keras import (
    flatten_layers,
    mha_attention_override,
    mha_softmax,
    set_mha_attention,
    set_mha_softmax,
)
from kmp.errors import UserError
from kmp.layers.attention import float32_attention
from kmp.layers.islands import Softmax


def is_hardened(layer) -> bool:
    """True when `layer` is a MultiHeadAttention that computes its scores and softmax in
    float32 through `kmp.layers.attention.float32_attention` (what `harden` does)."""
    if not isinstance(layer, keras.layers.MultiHeadAttention):
        return False
    bound = mha_attention_override(layer)
    return (getattr(bound, "__func__", None) is float32_attention
            and isinstance(mha_softmax(layer), Softmax))


def harden(model, float32_residual=False, attention=True):
    """Puts FP32 islands into an existing model, in place and without touching its weights.

    Every `keras.layers.MultiHeadAttention` (keras-hub's cached attention included) computes
    its attention scores and softmax in float32 (`kmp.layers.attention.float32_attention`
    with a `kmp.layers.Softmax`), on every backend and with or without dropout; Keras's own
    path takes a fused kernel when dropout is 0 and a compute-dtype softmax otherwise. Layer
    norms in keras already compute their statistics in float32 and keras-hub GPT-2's logits
    are float32, so both are left alone.

    With `float32_residual=True` (keras-hub GPT-2 style backbones: `transformer_layers`,
    `embeddings_add`, `layer_norm`), the residual stream is float32: the embedding sum, each
    decoder block's residual additions and the final norm run in float32, while the attention
    and feed-forward projections inside each block keep the mixed policy (Tensor Cores).

    The islands live in the layer objects, not in the saved config: call `harden` again after
    `keras.saving.load_model` (`kmp.gpt.load_model` does). The float32 residual stream of a
    `kmp.gpt` model is saved with it (its backbone records the option); on another model it is
    not, so pass `float32_residual=True` again after loading.

    Args:
        model: keras.Model. A model or backbone, built or not.
        float32_residual: bool. Make the residual stream float32. Defaults to False.
        attention: bool. Put the float32 attention islands in; False leaves attention as
            Keras computes it (for a float32 residual stream alone). Defaults to True.

    Returns:
        The same model, for chaining.

    Raises:
        UserError: if `float32_residual=True` and `model` has no GPT-2 style residual stream.

    Example:
    >>> import keras_hub
    >>> b = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> harden(b) is b
    True
    """
    backbone = getattr(model, "backbone", model)
    if float32_residual:
        stream = ("embeddings_add", "embeddings_dropout", "layer_norm")
        if not hasattr(backbone, "transformer_layers") or not all(
            hasattr(backbone, n) for n in stream
        ):
            raise UserError(
                "harden(float32_residual=True) needs a keras-hub GPT-2 style backbone (with "
                f"transformer_layers, {', '.join(stream)}). Received: {type(model).__name__}."
            )
    for layer in flatten_layers(model, include_self=True) if attention else ():
        if not isinstance(layer, keras.layers.MultiHeadAttention) or is_hardened(layer):
            continue
        old = mha_softmax(layer)
        if not isinstance(old, Softmax):
            set_mha_softmax(layer, Softmax(axis=old.axis, dtype=old.dtype_policy, name=old.name))
        set_mha_attention(layer, float32_attention)
    if float32_residual:
        set_float32_residual(backbone)
        if hasattr(backbone, "float32_residual"):  # a backbone that saves the option
            backbone.float32_residual = True
    return model


def set_float32_residual(backbone):
    """Makes a keras-hub GPT-2 style backbone's residual stream float32 (see `harden`)."""
    blocks = list(backbone.transformer_layers)
    # keras-hub adds residuals with a bare `x + residual`, so the dropouts that feed those
    # additions must also return float32.
    dropouts = [d for b in blocks for d in flatten_layers(b, recursive=False)
                if isinstance(d, keras.layers.Dropout)]
    stream = [backbone.embeddings_add, backbone.embeddings_dropout, backbone.layer_norm]
    for layer in stream + blocks + dropouts:
        layer.dtype_policy = "float32"
