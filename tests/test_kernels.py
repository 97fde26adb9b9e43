"""The backends' own kernels (`kmp.backends.kernel`) against float64 references, and the
models that use them against the same models without them."""

import keras
import numpy as np
import pytest
from _helpers import value_and_grads

import kmp
from kmp import backends

# Largest error relative to the largest entry. The output: one rounding to the compute dtype
# (its epsilon, 2^-7 bfloat16, 2^-10 float16). The gradients: 2 epsilons (measured up to 0.9 on
# these inputs; the autodiff of the composed island: up to 0.6); float32 within 1e-5.
OUTPUT_TOL = {"float32": 1e-6, "bfloat16": 2.0**-7, "float16": 2.0**-10}
GRAD_TOL = {"float32": 1e-5, "bfloat16": 2 * 2.0**-7, "float16": 2 * 2.0**-10}


def _own(name):
    own = backends.kernel(name)
    if own is None:
        pytest.skip(f"no own {name} kernel on {keras.backend.backend()}: Keras's ops are used")
    return own


def _attention_reference(q, k, v, dout, mask, scale):
    """Float64 attention (batch, length, heads, width) and its gradients, written out."""
    s = np.einsum("bqhd,bkhd->bhqk", q * scale, k)
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return (out, np.einsum("bhqk,bkhd->bqhd", ds, k) * scale,
            np.einsum("bhqk,bqhd->bkhd", ds, q) * scale, np.einsum("bhqk,bqhd->bkhd", p, dout))


def _relative(a, b):
    return float(np.abs(np.asarray(a, "float64") - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_island_kernel_against_float64(dtype, seed):
    """Forward within one rounding to the compute dtype, query/key/value gradients within
    two, on a causal mask with one padded row, large scores (query x 2)."""
    own = _own("attention_island")
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    b, t, h, d = 2, 48, 2, 16
    q, k, v, dout = (keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(
        rng.normal(size=(b, t, h, d)) * s, dtype), "float32")).astype("float64")
        for s in (2, 1, 1, 1))
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :, 40:] = False  # padding after position 40 in the second sequence
    scale = d**-0.5
    inputs = [tf.constant(x, dtype) for x in (q, k, v)]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = own(*inputs, tf.constant(mask), scale)
    grads = tape.gradient(out, inputs, output_gradients=tf.constant(dout, dtype))
    ref = _attention_reference(q, k, v, dout, mask, scale)
    got = [tf.cast(x, tf.float64).numpy() for x in [out] + grads]
    assert out.dtype == dtype
    assert _relative(got[0], ref[0]) <= OUTPUT_TOL[dtype]
    for name, g, r in zip(("query", "key", "value"), got[1:], ref[1:]):
        assert _relative(g, r) <= GRAD_TOL[dtype], name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_kernel_against_float64(dtype):
    own = _own("layer_norm")
    import tensorflow as tf

    rng = np.random.default_rng(5)
    x = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(
        rng.normal(size=(3, 7, 64)) * 3 + 1, dtype), "float32")).astype("float64")
    gamma, beta, dy = rng.normal(size=64), rng.normal(size=64), rng.normal(size=(3, 7, 64))
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(var + 1e-5)
    g = dy * gamma
    ref = [normed * gamma + beta,
           (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
           / np.sqrt(var + 1e-5), (dy * normed).sum((0, 1)), dy.sum((0, 1))]
    inputs = [tf.constant(x, dtype), tf.constant(gamma, "float32"), tf.constant(beta, "float32")]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = own(*inputs, 1e-5)
    grads = tape.gradient(y, inputs, output_gradients=tf.constant(dy, "float32"))
    assert y.dtype == dtype
    tolerance = {"float32": 1e-5, "bfloat16": 2.0**-8}[dtype]  # one rounding to bfloat16
    assert _relative(tf.cast(y, tf.float64).numpy(), ref[0]) <= tolerance
    for name, got, r, tol in zip(("x", "gamma", "beta"), grads, ref[1:], (tolerance, 1e-5, 1e-5)):
        assert _relative(tf.cast(got, tf.float64).numpy(), r) <= tol, name  # x's: in x's dtype


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_hardened_gpt_with_and_without_the_kernels(policy, monkeypatch):
    """A hardened GPT-2 (attention island, layer norms, GELU, loss kernels where the backend
    has them) computes the loss and weight gradients the composed ops do."""
    if all(backends.kernel(n) is None for n in ("attention_island", "layer_norm")):
        pytest.skip(f"no own kernels on {keras.backend.backend()}: Keras's ops are used")
    from kmp.gpt.model import GPTBackbone

    own = backends.kernel
    shape = dict(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32,
                 intermediate_dim=64, max_sequence_length=16)
    ids = np.random.default_rng(3).integers(0, 64, size=(2, 16))
    padding = np.ones_like(ids)
    padding[1, 12:] = 0
    inputs = {"token_ids": ids, "padding_mask": padding}
    probe = np.random.default_rng(4).normal(size=(2, 16, 32)).astype("float32")
    results, used = [], set()

    def spied(name):
        used.add(name)
        return own(name)

    for kernels in (True, False):
        monkeypatch.setattr(backends, "kernel", spied if kernels else (lambda name: None))
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model = kmp.harden(GPTBackbone(**shape))
        results.append(value_and_grads(
            lambda _, m=model: keras.ops.sum(keras.ops.cast(m(inputs), "float32") * probe),
            np.zeros(1), layers=[model]))
    assert {n for n in ("attention_island", "layer_norm") if own(n)} <= used
    (value, grads), (ref_value, ref_grads) = results
    flat, ref_flat = (np.concatenate([g.ravel() for g in gs[1:]]) for gs in (grads, ref_grads))
    tolerance = 1e-5 if policy == "float32" else 2e-2  # bfloat16: a few roundings apart
    assert abs(value - ref_value) <= tolerance * abs(ref_value)
    assert _relative(flat, ref_flat) <= tolerance
