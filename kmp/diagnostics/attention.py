"""Where attention probabilities are really computed: a measurement, not a reading of flags.

A MultiHeadAttention may take Keras's fused `ops.dot_product_attention` (dropout 0: each
backend's kernel decides the precision of scores and softmax), Keras's explicit path (softmax
in the compute dtype), or kmp's float32 island (`kmp.harden`). `attention_precision` calls each
attention layer's own attention computation with a query and key drawn at random and with
values that are one-hot over the key positions, so the layer's output is exactly its
probability matrix, rounded to the compute dtype. Against a float64 softmax of the same
(half-precision) query and key, probabilities computed in float32 are off by at most half a
unit in the last place (ulp) of the compute dtype, the rounding of the result itself; scores
or a softmax rounded to the compute dtype on the way show as errors of several ulps.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kmp._keras import layer_paths, mha_compute_attention, mha_dropout, mha_score_scale, walk
from kmp.layers.harden import is_hardened

# Probabilities from float32 scores and a float32 softmax, rounded once to the compute dtype
# (kmp's island), are off by at most 0.5 ulp, plus float32 error (2^-24 relative: nothing in
# half-precision ulps). Fused kernels that keep scores and softmax in float32 round more than
# once: flash attention's layout rounds the unnormalized probabilities to the compute dtype for
# their product with the values, then the output (about 1.5 ulp: 1.41 and 1.43 in a float64
# simulation of this probe, float16 and bfloat16); torch's CPU kernel measures 1.39 (bf16) and
# 1.67 (fp16). Three roundings give at most 2.5. Scores rounded to the compute dtype cost 11
# to 15 ulps at this probe's logits (up to about 14): TensorFlow's path measures 14.5 (bf16)
# and 15.6 (fp16). 3 ulps keeps every float32-accumulating kernel and none that rounds scores.
FLOAT32_ULPS = 3.0
_MANTISSA = {"float16": 10, "bfloat16": 7, "float32": 23}


@dataclasses.dataclass(frozen=True)
class AttentionPrecision:
    """One attention layer: the path it takes and the measured error of its probabilities."""

    path: str
    compute_dtype: str
    route: str  # "kmp float32 island", "Keras fused dot_product_attention", "Keras softmax"
    max_ulps: float  # worst error in ulps of the compute dtype
    median_ulps: float

    @property
    def float32(self) -> bool:
        """True when the probabilities are computed in float32 (within `FLOAT32_ULPS`, or the
        compute dtype is float32)."""
        return self.compute_dtype == "float32" or self.max_ulps <= FLOAT32_ULPS

    def __str__(self):
        if self.compute_dtype == "float32":
            return (f"{self.path}: {self.route}, float32 compute dtype: scores and softmax in "
                    f"float32 (max {self.max_ulps:.2f} float32 ulp: summation order)")
        verdict = ("float32 scores and softmax" if self.float32 else
                   f"not float32: rounded to {self.compute_dtype} before or inside the softmax")
        return (f"{self.path}: {self.route}, {self.compute_dtype}: max {self.max_ulps:.2f} ulp, "
                f"median {self.median_ulps:.2f} ulp -> {verdict}")


def _route(layer) -> str:
    if is_hardened(layer):
        return "kmp float32 island"
    return "Keras softmax" if mha_dropout(layer)[0] > 0 else "Keras fused dot_product_attention"


def _probe(layer, seq_len: int, rng, compute=mha_compute_attention) -> tuple[float, float]:
    dtype = layer.compute_dtype
    heads, width = layer.num_heads, layer.key_dim
    seq_len = -(-seq_len // width) * width
    # Scores with a spread of about 3 over long rows: many probabilities of similar size.
    q = (rng.normal(size=(1, seq_len, heads, width)) * 3.0).astype("float32")
    k = rng.normal(size=(1, seq_len, heads, width)).astype("float32")
    q, k = (keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(t, dtype), "float32"))
            for t in (q, k))
    causal = np.tril(np.ones((seq_len, seq_len), bool))[None]
    mask = keras.ops.convert_to_tensor(causal)
    probs = np.zeros((heads, seq_len, seq_len))
    # Values one-hot over `width` key positions at a time (fused kernels want the values as
    # wide as the keys): each call returns that block of columns of the probability matrix.
    for start in range(0, seq_len, width):
        v = np.zeros((1, seq_len, heads, width), "float32")
        v[0, start + np.arange(width), :, np.arange(width)] = 1.0
        out, _ = compute(layer, *(keras.ops.cast(t, dtype) for t in (q, k, v)),
                         attention_mask=mask, training=False)
        block = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))[0]  # (T, N, w)
        probs[:, :, start:start + width] = block.transpose(1, 0, 2)
    scores = np.einsum("tnh,snh->nts", q[0].astype(np.float64), k[0].astype(np.float64))
    scores = np.where(causal, scores * mha_score_scale(layer), -np.inf)
    exact = np.exp(scores - scores.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    tiny = np.finfo(np.float16).tiny if dtype == "float16" else 2.0**-126
    keep = exact >= tiny  # normal numbers of the compute dtype
    ulp = 2.0 ** (np.floor(np.log2(exact[keep])) - _MANTISSA[dtype])
    ulps = np.abs(probs[keep] - exact[keep]) / ulp
    return float(ulps.max()), float(np.median(ulps))


def measure_ulps(layer, attention=None, seq_len: int = 256, seed: int = 0,
                 compiled: bool = False) -> tuple[float, float]:
    """(max, median) error in ulps of the compute dtype of the attention probabilities one
    MultiHeadAttention computes, against a float64 softmax (the probe `attention_precision`
    runs on each layer).

    Args:
        layer: keras.layers.MultiHeadAttention, built.
        attention: callable or None. What to measure: `fn(layer, query, key, value,
            attention_mask=None, training=None) -> (output, scores)`, e.g.
            `kmp._keras.mha_class_attention` (Keras's own path even when an island is bound).
            Defaults to None: the layer's own attention, override included.
        seq_len: int. Query and key length (rounded up to a multiple of the head width).
            Defaults to 256.
        seed: int. Seed of the random query and key. Defaults to 0.
        compiled: bool. Run the attention compiled as a training step runs it
            (`kmp.backends.jit`: jax.jit on JAX, where a kernel may lower differently from
            its eager call; as is elsewhere). Defaults to False.

    Returns:
        (max ulps, median ulps).

    Raises:
        Whatever the attention raises where the backend cannot run it (e.g. JAX 0.10's fused
        float16 attention under jit on a CPU: ValueError).
    """
    fn = attention or mha_compute_attention
    if compiled:
        from kmp import backends

        run = backends.jit(lambda q, k, v, mask: fn(layer, q, k, v, attention_mask=mask,
                                                    training=False))

        def compute(layer, q, k, v, attention_mask=None, training=None):
            return run(q, k, v, attention_mask)
    else:
        compute = fn
    return _probe(layer, seq_len, np.random.default_rng(seed), compute)


def attention_precision(model, seq_len: int = 256, seed: int = 0) -> list[AttentionPrecision]:
    """Measures, for every MultiHeadAttention in `model`, how precisely its own attention
    computation (fused kernel, explicit softmax or kmp island) produces probabilities.

    Args:
        model: keras.Model or layer, built, holding MultiHeadAttention layers (keras-hub's
            cached attention included).
        seq_len: int. Query and key length of the probe (a causal mask is applied).
            Defaults to 256.
        seed: int. Seed of the random query and key. Defaults to 0.

    Returns:
        One `AttentionPrecision` per attention layer, in model order.

    Example:
    >>> import kmp
    >>> mha = keras.layers.MultiHeadAttention(2, 8, dtype="mixed_float16")
    >>> x = np.ones((1, 4, 16), "float32")
    >>> _ = mha(x, x)
    >>> attention_precision(kmp.harden(mha), seq_len=64)[0].float32
    True
    """
    rng = np.random.default_rng(seed)
    found = [(p, layer) for p, layer in walk(model)]
    if isinstance(model, keras.layers.MultiHeadAttention):
        found.insert(0, (model.name, model))
    paths = layer_paths(model)
    rows = []
    for path, layer in found:
        if not isinstance(layer, keras.layers.MultiHeadAttention) or not layer.built:
            continue
        worst, median = _probe(layer, seq_len, rng)
        rows.append(AttentionPrecision(paths.get(id(layer), path), layer.compute_dtype,
                                       _route(layer), worst, median))
    return rows
