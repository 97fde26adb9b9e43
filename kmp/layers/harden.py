"""`harden(model)`: give an existing model FP32 islands in place, keeping its weights."""

from __future__ import annotations

import contextlib

import keras

from kmp.layers.islands import Softmax


@contextlib.contextmanager
def tracking_unlocked(layer):
    """Lets a built layer take a new sublayer or metric (keras locks built layers' tracking)."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield layer
    finally:
        if locked:
            layer._tracker.lock()


def harden(model, float32_residual=False):
    """Puts FP32 islands into an existing model, in place and without touching its weights.

    Every `keras.layers.MultiHeadAttention` (keras-hub's cached attention included) gets a
    float32 `kmp.layers.Softmax`, so its softmax is float32 also when attention dropout > 0
    (keras computes it in the compute dtype then). Layer norms in keras already compute their
    statistics in float32 and keras-hub GPT-2's logits are float32, so both are left alone.

    With `float32_residual=True` (keras-hub GPT-2 style backbones: `transformer_layers`,
    `embeddings_add`, `layer_norm`), the residual stream is float32: the embedding sum, each
    decoder block's residual additions and the final norm run in float32, while the attention
    and feed-forward projections inside each block keep the mixed policy (Tensor Cores).

    The islands live in the layer objects, not in the saved config: call `harden` again after
    `keras.saving.load_model` (the float32 residual policies are saved with the model).

    Args:
        model: keras.Model. A model or backbone, built or not.
        float32_residual: bool. Make the residual stream float32. Defaults to False.

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: if `float32_residual=True` and `model` has no GPT-2 style residual stream.

    Example:
    >>> import keras_hub
    >>> b = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> harden(b) is b
    True
    """
    backbone = getattr(model, "backbone", model)
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.MultiHeadAttention) and not isinstance(
            layer._softmax, Softmax
        ):
            old = layer._softmax
            with tracking_unlocked(layer):
                layer._softmax = Softmax(axis=old.axis, dtype=old.dtype_policy, name=old.name)
            if old in layer._layers:  # untrack the replaced softmax (no weights)
                layer._layers.remove(old)
    if float32_residual:
        stream = ("embeddings_add", "embeddings_dropout", "layer_norm")
        if not hasattr(backbone, "transformer_layers") or not all(
            hasattr(backbone, n) for n in stream
        ):
            raise ValueError(
                "harden(float32_residual=True) needs a keras-hub GPT-2 style backbone (with "
                f"transformer_layers, {', '.join(stream)}). Received: {type(model).__name__}."
            )
        blocks = list(backbone.transformer_layers)
        # keras-hub adds residuals with a bare `x + residual`, so the dropouts that feed those
        # additions must also return float32.
        dropouts = [d for b in blocks for d in b._layers if isinstance(d, keras.layers.Dropout)]
        for layer in [getattr(backbone, n) for n in stream] + blocks + dropouts:
            layer.dtype_policy = "float32"
    return model
