"""`harden(model)`: give an existing model FP32 islands in place, keeping its weights; and
`attention="auto"`: keep each attention layer's fused kernel where it measures as precise."""

from __future__ import annotations

import dataclasses
import time
import weakref

import keras

from kmp._keras import (
    flatten_layers,
    mha_attention_override,
    mha_class_attention,
    mha_dropout,
    mha_softmax,
    set_mha_attention,
    set_mha_softmax,
    unset_mha_attention,
)
from kmp.errors import UserError
from kmp.layers.attention import float32_attention
from kmp.layers.islands import Softmax

ATTENTION = ("auto", "island", "fused")
_CHOSEN = weakref.WeakKeyDictionary()  # attention layer -> the AttentionChoice it follows


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """How `harden` set one class of attention layers, and the numbers it went by.

    Args:
        choice: str. "fused" (Keras's own path: its fused `dot_product_attention` when dropout
            is 0) or "island" (kmp's float32 scores and softmax).
        requested: str. "auto", "island" or "fused".
        source: str. "measured", "cached" (a measurement of an earlier run, `kmp.decisions`),
            "requested" (no measurement), "float32 policy" (nothing to harden) or "not built"
            (nothing to measure yet: the island).
        compute_dtype: str. The layers' compute dtype.
        shape: str. The shape class: layer class, heads, head width, dropout on or off.
        fused_ulps: float or None. The fused path's worst error in ulps of the compute dtype
            (`kmp.diagnostics.attention_precision`'s probe), when measured.
        island_ulps: float or None. The island's, when measured.
        tolerance_ulps: float. The most error the fused path may have to be kept
            (`kmp.diagnostics.attention.FLOAT32_ULPS`).
        seconds: float or None. How long the measurement took.
        layers: int. How many layers of the model follow it.
        note: str or None. Why the fused path has no measure (it failed to run here).
    """

    choice: str
    requested: str
    source: str
    compute_dtype: str
    shape: str
    fused_ulps: float | None = None
    island_ulps: float | None = None
    tolerance_ulps: float | None = None
    seconds: float | None = None
    layers: int = 0
    note: str | None = None

    def as_dict(self) -> dict:
        """The fields as a JSON-serializable dict (for metrics.json)."""
        return dataclasses.asdict(self)

    def __str__(self):
        head = f"{self.requested} -> {self.choice} ({self.layers} layer(s), {self.shape})"
        if self.source == "float32 policy":
            return (f"{head}: compute dtype float32, nothing to harden (Keras's path already "
                    "computes scores and softmax in float32)")
        if self.note is not None:
            return f"{head}: {self.note}; island {self.island_ulps:.2f} ulp ({self.source})"
        if self.fused_ulps is None:
            return f"{head}: {self.source}, not measured"
        how = ("measured" if self.source == "measured" else "cached measurement") + (
            f" in {self.seconds:.2f} s" if self.seconds is not None else "")
        return (f"{head}: fused {self.fused_ulps:.2f} ulp vs island {self.island_ulps:.2f} ulp "
                f"of {self.compute_dtype} (fused kept within {self.tolerance_ulps:g} ulp; "
                f"{how})")


def is_hardened(layer) -> bool:
    """True when `layer` is a MultiHeadAttention that computes its scores and softmax in
    float32 through `kmp.layers.attention.float32_attention` (what `harden` does)."""
    if not isinstance(layer, keras.layers.MultiHeadAttention):
        return False
    bound = mha_attention_override(layer)
    return (getattr(bound, "__func__", None) is float32_attention
            and isinstance(mha_softmax(layer), Softmax))


def attention_choices(model) -> list[AttentionChoice]:
    """Lists the attention choices `harden` made for a model's layers.

    Args:
        model: keras.Model or keras.layers.Layer. A model, backbone or layer `harden` went
            through (or not).

    Returns:
        A list of `AttentionChoice`, one per shape class of attention layers, in model
        order, each with `layers` set to how many layers follow it; an empty list before
        `harden`.

    Example:
    >>> import keras_hub
    >>> b = keras_hub.models.GPT2Backbone(64, 2, 2, 16, 32, max_sequence_length=8)
    >>> attention_choices(b)
    []
    >>> [(c.choice, c.layers) for c in attention_choices(harden(b, attention="island"))]
    [('island', 2)]
    """
    found = {}
    for layer in flatten_layers(model, include_self=True):
        choice = _CHOSEN.get(layer) if isinstance(layer, keras.layers.MultiHeadAttention) else None
        if choice is not None:
            found[choice] = found.get(choice, 0) + 1
    return [dataclasses.replace(c, layers=n) for c, n in found.items()]


def harden(model, float32_residual=False, attention=True):
    """Puts FP32 islands into an existing model, in place and without touching its weights.

    Every `keras.layers.MultiHeadAttention` (keras-hub's cached attention included) computes
    its attention scores and softmax in float32 (`kmp.layers.attention.float32_attention`
    with a `kmp.layers.Softmax`), on every backend and with or without dropout; Keras's own
    path takes a fused kernel when dropout is 0 and a compute-dtype softmax otherwise. Layer
    norms in keras already compute their statistics in float32 and keras-hub GPT-2's logits
    are float32, so both are left alone.

    `attention="auto"` decides by measurement instead: for each shape class of attention
    layers (class, heads, head width, dropout) it measures the probabilities of Keras's path
    and of the island against a float64 softmax on seeded queries and keys with large logits
    (`kmp.diagnostics.attention.measure_ulps`), keeps Keras's path (its fused kernel) where its
    worst error is within `kmp.diagnostics.attention.FLOAT32_ULPS` (3 ulps of the compute
    dtype: a float32 softmax rounded up to three times, as fused kernels do) and puts the island in
    elsewhere. Each measurement is made once per backend, device, compute dtype and shape
    class and kept on disk (`kmp.decisions`; a new Keras or backend version measures again).
    Under a float32 compute dtype there is nothing to harden: Keras's path is kept unmeasured.
    `attention_choices(model)` returns what was chosen and why.

    With `float32_residual=True` (keras-hub GPT-2 style backbones: `transformer_layers`,
    `embeddings_add`, `layer_norm`), the residual stream is float32: the embedding sum, each
    decoder block's residual additions and the final norm run in float32, while the attention
    and feed-forward projections inside each block keep the mixed policy (Tensor Cores).

    The islands live in the layer objects, not in the saved config: call `harden` again after
    `keras.saving.load_model` (`kmp.gpt.load_model` does). The float32 residual stream of a
    `kmp.gpt` model is saved with it (its backbone records the option); on another model it is
    not, so pass `float32_residual=True` again after loading.

    Args:
        model: keras.Model. A model or backbone, built or not (only built attention layers
            can be measured: an unbuilt one under "auto" gets the island).
        float32_residual: bool. Make the residual stream float32. Defaults to False.
        attention: str or bool. "island" (True): float32 islands in every attention layer;
            "fused" (False): Keras's own path (an island `harden` put in is taken out);
            "auto": measured, as above. Defaults to True.

    Returns:
        The same model, for chaining.

    Raises:
        UserError: if `float32_residual=True` and `model` has no GPT-2 style residual stream,
            or `attention` is not one of the choices.

    Example:
    >>> import keras_hub
    >>> b = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> harden(b) is b
    True
    >>> attention_choices(b)[0].choice
    'island'
    """
    mode = _mode(attention)
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
    chosen = {}  # (shape class, compute dtype) -> AttentionChoice, within this call
    for layer in flatten_layers(model, include_self=True):
        if not isinstance(layer, keras.layers.MultiHeadAttention):
            continue
        before = mha_softmax(layer)
        shape = _shape(layer)
        klass = (shape, layer.compute_dtype)
        if klass not in chosen:
            chosen[klass] = _choose(layer, mode, shape)  # may measure on this layer
        if chosen[klass].choice == "island":
            _to_island(layer)
        else:
            unset_mha_attention(layer)
            if mha_softmax(layer) is not before:  # swapped in by the measurement
                set_mha_softmax(layer, before)
        _CHOSEN[layer] = chosen[klass]
    if float32_residual:
        set_float32_residual(backbone)
        if hasattr(backbone, "float32_residual"):  # a backbone that saves the option
            backbone.float32_residual = True
    return model


def _mode(attention) -> str:
    if attention is True or attention is False:
        return "island" if attention else "fused"
    if attention not in ATTENTION:
        raise UserError(f"Unknown attention {attention!r}. Use one of: "
                        f"{', '.join(ATTENTION)}.", field="attention")
    return attention


def _shape(layer) -> str:
    kind = type(layer)
    rate, _ = mha_dropout(layer)
    return (f"{kind.__qualname__}, heads={layer.num_heads}, "
            f"head_dim={layer.key_dim}, dropout={'on' if rate > 0 else 'off'}")


def _to_island(layer):
    if is_hardened(layer):
        return
    old = mha_softmax(layer)
    if not isinstance(old, Softmax):
        set_mha_softmax(layer, Softmax(axis=old.axis, dtype=old.dtype_policy, name=old.name))
    set_mha_attention(layer, float32_attention)


def _choose(layer, mode: str, shape: str) -> AttentionChoice:
    """The choice for `layer`'s shape class: requested, float32, cached or measured on `layer`
    (which the measurement leaves with the island bound)."""
    dtype = layer.compute_dtype
    if mode != "auto":
        return AttentionChoice(mode, mode, "requested", dtype, shape)
    if dtype not in ("float16", "bfloat16"):
        return AttentionChoice("fused", mode, "float32 policy", dtype, shape)
    if not layer.built:
        return AttentionChoice("island", mode, "not built", dtype, shape)
    from kmp import decisions
    from kmp.diagnostics.attention import FLOAT32_ULPS, measure_ulps

    key = decisions.key("attention", compute_dtype=dtype, shape=shape)
    cached = decisions.lookup(key)
    fields = ("choice", "fused_ulps", "island_ulps", "tolerance_ulps", "seconds")
    if cached is not None and all(f in cached for f in fields):
        fused = cached["fused_ulps"]  # judged by this kmp's tolerance, not the recorded one
        keep = fused is not None and fused <= FLOAT32_ULPS
        return AttentionChoice("fused" if keep else "island", mode, "cached", dtype, shape,
                               fused, cached["island_ulps"], FLOAT32_ULPS, cached["seconds"],
                               note=cached.get("note"))
    start = time.perf_counter()
    try:  # compiled, as the training step runs it
        fused, _ = measure_ulps(layer, mha_class_attention, compiled=True)
    except (ValueError, RuntimeError, NotImplementedError) as e:  # no such kernel here
        fused, note = None, f"Keras's path fails here: {str(e).splitlines()[0][:120]}"
    else:
        note = None
    _to_island(layer)
    island, _ = measure_ulps(layer, compiled=True)
    seconds = time.perf_counter() - start
    choice = "fused" if fused is not None and fused <= FLOAT32_ULPS else "island"
    measured = AttentionChoice(choice, mode, "measured", dtype, shape, fused, island,
                               FLOAT32_ULPS, seconds, note=note)
    decisions.record(key, {f: getattr(measured, f) for f in fields + ("note",)})
    return measured


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
