import pathlib
import re

import keras
import keras_hub
import numpy as np
import pytest
from _helpers import value_and_grads

import kmp
from kmp import layers as L
from kmp._keras import recorded_outputs
from kmp.diagnostics import attention_precision

pytestmark = pytest.mark.backends

# Relative L2 error bounds against a float32 reference with identical weights and inputs.
# Half precision keeps 11 (float16) or 8 (bfloat16) significand bits: unit roundoff 4.9e-4 and
# 3.9e-3. Measured worst cases (docs/precision.md) are 6.6e-4 and 6.5e-3; the bounds leave ~3x.
TOL = {"mixed_float16": 2e-3, "mixed_bfloat16": 1.6e-2}
POLICIES = list(TOL)

LAYERS = {
    "softmax": (lambda **kw: L.Softmax(**kw), (4, 6, 33)),
    "layer_norm": (lambda **kw: L.LayerNorm(**kw), (4, 6, 32)),
    "rms_norm": (lambda **kw: L.RMSNorm(**kw), (4, 6, 32)),
    "attention": (lambda **kw: L.CausalSelfAttention(num_heads=4, **kw), (2, 7, 32)),
    "attention_dropout": (lambda **kw: L.CausalSelfAttention(4, dropout=0.3, **kw), (2, 7, 32)),
    "lm_head": (lambda **kw: L.LMHead(50, **kw), (2, 5, 32)),
    "lm_head_fp32": (lambda **kw: L.LMHead(50, projection="float32", **kw), (2, 5, 32)),
}


def rel(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _call(layer, x):
    return layer(x, training=False) if isinstance(layer, L.CausalSelfAttention) else layer(x)


def forward_backward(layer, x, weights_out):
    """The layer's output on x and the gradients of sum(output * weights_out) with respect to
    x and the layer's variables, on any backend."""
    def projected(x):
        return keras.ops.sum(keras.ops.multiply(keras.ops.cast(_call(layer, x), "float32"),
                                                weights_out))

    _, grads = value_and_grads(projected, x, [layer])
    return _call(layer, x), grads


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_float32_reference(name, policy):
    make, shape = LAYERS[name]
    rng = np.random.default_rng(sorted(LAYERS).index(name) * 10 + POLICIES.index(policy))
    x = rng.normal(size=shape).astype("float32")
    ref = make(dtype="float32")
    ref(x)
    if name.endswith("norm"):  # non-trivial scale and offset; the others keep their init
        ref.set_weights([rng.normal(size=w.shape).astype("float32") for w in ref.get_weights()])
    mixed = make(dtype=policy)
    mixed(x)
    mixed.set_weights(ref.get_weights())
    proj = rng.normal(size=ref.compute_output_shape(shape)).astype("float32")
    y_ref, g_ref = forward_backward(ref, x, proj)
    y_mix, g_mix = forward_backward(mixed, x, proj)

    expected_out = "float32" if isinstance(mixed, L.LMHead) else mixed.compute_dtype
    assert keras.backend.standardize_dtype(y_mix.dtype) == expected_out
    y_mix, y_ref = _f32(y_mix), _f32(y_ref)
    assert rel(y_mix, y_ref) < TOL[policy], f"output rel err {rel(y_mix, y_ref):.2e}"
    for i, (gm, gr) in enumerate(zip(g_mix, g_ref)):
        assert np.isfinite(gm).all()
        assert rel(gm, gr) < TOL[policy], f"grad {i} rel err {rel(gm, gr):.2e}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_config_and_keras_file_round_trip(name, tmp_path):
    make, shape = LAYERS[name]
    layer = make(dtype="mixed_bfloat16")
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, make(dtype="mixed_bfloat16")(inputs))
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_f32(loaded(x)), _f32(model(x)))
    assert loaded.layers[-1].dtype_policy.name == "mixed_bfloat16"


def _f32(t):
    return keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))


def test_softmax_mask_and_float32_compute():
    x = np.random.default_rng(2).normal(size=(2, 5)).astype("float32")
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
    y = _f32(L.Softmax(dtype="mixed_float16")(x, mask=mask))
    assert (y[~mask] == 0).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=2e-3)
    # A row whose float16 sum of exponentials would overflow (60000 terms of about 1.0):
    # computed in float32 every probability is ~1/60000, finite and non-zero.
    wide = np.zeros((1, 60000), "float32")
    p = _f32(L.Softmax(dtype="mixed_float16")(wide))
    # 1/60000 is subnormal in float16 (spacing 2**-24): relative rounding up to 3.6e-3
    np.testing.assert_allclose(p, 1 / 60000, rtol=4e-3)


def test_attention_is_causal_and_respects_padding():
    rng = np.random.default_rng(3)
    layer = L.CausalSelfAttention(num_heads=2, dtype="mixed_float16")
    x = rng.normal(size=(1, 6, 8)).astype("float32")
    y = _f32(layer(x))
    x2 = x.copy()
    x2[:, 4:] = rng.normal(size=(1, 2, 8))  # change only the future
    y2 = _f32(layer(x2))
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])
    pad = np.array([[1, 1, 1, 0, 1, 1]])
    x3 = x.copy()
    x3[:, 3] = 100.0  # a padded token must not influence any other position
    others = [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(_f32(layer(x, padding_mask=pad))[:, others],
                                  _f32(layer(x3, padding_mask=pad))[:, others])


def test_attention_rejects_indivisible_width():
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        L.CausalSelfAttention(num_heads=3)(np.ones((1, 2, 8), "float32"))


def test_lm_head_rejects_unknown_projection():
    with pytest.raises(ValueError, match="unknown projection 'half'"):
        L.LMHead(10, projection="half")


# ---------------------------------------------------------------------------- harden
def _gpt2(policy, seed=0):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=96, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        dropout=0.1, max_sequence_length=16,
    )


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    return {"token_ids": rng.integers(0, 96, (2, 16)).astype("int32"),
            "padding_mask": np.ones((2, 16), "int32")}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("residual", [False, True])
def test_harden_gpt2_keeps_weights_and_matches_float32(policy, residual):
    ref = _gpt2("float32")
    model = _gpt2(policy)
    model.set_weights(ref.get_weights())
    before = [w.copy() for w in model.get_weights()]
    L.harden(model, float32_residual=residual)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    attns = [b._self_attention_layer for b in model.transformer_layers]
    assert all(isinstance(a._softmax, L.Softmax) for a in attns)
    x = _tokens()
    y, y_ref = model(x, training=False), ref(x, training=False)
    dtype = keras.backend.standardize_dtype(y.dtype)
    assert dtype == ("float32" if residual else model.compute_dtype)
    assert rel(_f32(y), _f32(y_ref)) < 2 * TOL[policy]
    if residual:
        block_out = model.transformer_layers[0](keras.ops.ones((1, 4, 32)))
        assert keras.backend.standardize_dtype(block_out.dtype) == "float32"
        assert attns[0]._query_dense.compute_dtype == model.compute_dtype  # still Tensor Cores


def test_hardened_gpt2_trains_under_float16():
    from kmp.scaling import LossScaleOptimizer

    backbone = L.harden(_gpt2("mixed_float16"), float32_residual=True)
    inputs = backbone.input
    logits = L.LMHead(96)(backbone(inputs))
    model = keras.Model(inputs, logits)
    opt = LossScaleOptimizer(keras.optimizers.Adam(1e-3))
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = _tokens(0)
    hist = model.fit(x, x["token_ids"], epochs=3, verbose=0)
    assert opt.state()["skipped_steps"] < 3
    assert np.isfinite(hist.history["loss"]).all()
    assert hist.history["loss"][-1] < hist.history["loss"][0]


def test_harden_residual_needs_gpt2_backbone():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert L.harden(model) is model  # no attention: nothing to do
    with pytest.raises(ValueError, match="GPT-2 style backbone"):
        L.harden(model, float32_residual=True)


# ------------------------------------------------------ FP32 islands that provably run
@pytest.mark.parametrize("policy", POLICIES)
def test_hardened_attention_runs_its_float32_island(policy):
    """The kmp softmax executes in every attention layer of a GPT-2 without dropout (where
    Keras takes its fused kernel), and the probabilities it produces are float32-exact."""
    model = _gpt2(policy)
    for block in model.transformer_layers:  # dropout 0, as in every recipe preset
        block._self_attention_layer._dropout = 0.0
    before = attention_precision(model, seq_len=128)
    assert {r.route for r in before} == {"Keras fused dot_product_attention"}
    L.harden(model)
    with recorded_outputs(model) as outputs:
        model(_tokens(), training=False)
    softmaxes = [(layer, t) for layer, t in outputs if isinstance(layer, L.Softmax)]
    # One island call per layer, or none where the backend's own kernel computes the island
    # (TensorFlow; tests/test_kernels.py): the probe below measures either.
    own = kmp.backends.kernel("attention_island")
    assert len(softmaxes) == (0 if own else len(model.transformer_layers))
    compute = keras.config.dtype_policy().compute_dtype
    assert all(keras.backend.standardize_dtype(t.dtype) == compute for _, t in softmaxes)
    after = attention_precision(model, seq_len=128)
    assert [r.route for r in after] == ["kmp float32 island"] * 2
    assert all(r.float32 and r.max_ulps <= 0.51 for r in after), [str(r) for r in after]


def test_attention_precision_tells_half_precision_softmax_apart():
    """The measurement can fail: a softmax computed in float16 (Keras's explicit path with
    dropout, its softmax left in the compute dtype) is many ulps off."""
    mha = keras.layers.MultiHeadAttention(2, 16, dropout=0.1, dtype="mixed_float16")
    x = np.ones((1, 4, 32), "float32")
    mha(x, x)
    (row,) = attention_precision(mha, seq_len=256)
    assert row.route == "Keras softmax" and not row.float32 and row.max_ulps > 2, str(row)
    L.harden(mha)
    (row,) = attention_precision(mha, seq_len=256)
    assert row.route == "kmp float32 island" and row.float32, str(row)


def test_hardened_attention_with_dropout_matches_float32_at_inference():
    ref, model = _gpt2("float32"), _gpt2("mixed_bfloat16")
    model.set_weights(ref.get_weights())
    L.harden(model)
    L.harden(ref)
    x = _tokens(4)
    assert rel(_f32(model(x, training=False)), _f32(ref(x, training=False))) < 2 * TOL[
        "mixed_bfloat16"]


# Keras 3.15.1 internals kmp uses; kmp/_keras.py is the one module that may touch them.
_PRIVATE = re.compile(
    r"keras\.src|__internal__|\.(_tracker|_layers|_flatten_layers|_trainable_variables|"
    r"_non_trainable_variables|_variables|_get_variable_index|_overwrite_variable_with_gradient|"
    r"_softmax|_compute_attention|_inverse_sqrt_key_dim|_dot_product_equation|"
    r"_combine_equation|_masked_softmax|_dropout_layer|_dropout|_compute_causal_mask)\b")
_BACKEND_CHECK = re.compile(r"keras\.backend\.backend\(\)|backends\.name\(\)\s*(==|!=|in\b)|"
                            r"(==|!=)\s*[\"'](tensorflow|jax|torch)[\"']")


def test_keras_internals_and_backend_checks_stay_in_their_one_place():
    """Private Keras/TensorFlow internals only in kmp/_keras.py, backend checks only in
    kmp/backends, for the islands, diagnostics, scaler, compile, policy and hardware code."""
    root = pathlib.Path(L.__file__).parents[1]
    files = [root / "scaling.py", root / "training.py", root / "policy.py",
             root / "hardware.py", root / "decisions.py", *(root / "layers").glob("*.py"),
             *(root / "diagnostics").glob("*.py"), *(root / "backends").glob("*.py")]
    found = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if _PRIVATE.search(code) or (
                    _BACKEND_CHECK.search(code) and path.parent.name != "backends"):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
