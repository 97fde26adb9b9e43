"""kmp.gpt's model: the next-token loss against Keras's sparse crossentropy (the float32
reference), and saved models that compute what the trained ones did."""

import re

import keras
import numpy as np
import pytest
from _helpers import value_and_grads

import kmp
from kmp.gpt import NextTokenCrossentropy, build_model, lm_loss, load_model, preset
from kmp.gpt.model import use_float8

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


def _gelu_reference(x):
    """GPT-2's tanh GELU and its derivative in float64."""
    t = np.tanh(0.7978845608028654 * (x + 0.044715 * x**3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * 0.7978845608028654 * (
        1 + 3 * 0.044715 * x**2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_backends_own_gelu_computes_gpt2s_gelu(dtype):
    """kmp.backends.kernel("gelu_tanh") (TensorFlow) against float64: as close as Keras's own
    tanh GELU in float32, and no worse on average in bfloat16 (both round to bfloat16)."""
    own = kmp.backends.kernel("gelu_tanh")
    if own is None:
        pytest.skip(f"no own GELU kernel on {keras.backend.backend()}: Keras's is used")
    x = keras.ops.convert_to_numpy(
        keras.ops.cast(np.random.default_rng(7).normal(size=(64, 96)) * 3, dtype))
    exact = np.asarray(x, "float64")
    ref_y, ref_dy = _gelu_reference(exact)
    errors = {}
    for name, fn in (("own", own), ("keras", lambda v: keras.activations.gelu(v, True))):
        _, (dy,) = value_and_grads(
            lambda v, fn=fn: keras.ops.sum(keras.ops.cast(fn(v), "float32")), x)
        y = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(fn(x), "float32")), "float64")
        errors[name] = np.abs(y - ref_y), np.abs(np.asarray(dy, "float64") - ref_dy)
    if dtype == "float32":
        assert errors["own"][0].max() <= 1e-5 and errors["own"][1].max() <= 1e-5
    else:
        for i in (0, 1):  # value, gradient
            assert errors["own"][i].mean() <= 1.25 * errors["keras"][i].mean()


def test_gpt_backbone_computes_what_keras_hubs_does():
    """The backbone with the backend's own GELU (TensorFlow) against keras-hub's GPT-2 with the
    same weights: outputs and weight gradients, float32."""
    import keras_hub

    from kmp.gpt.model import GPTBackbone

    own = kmp.backends.kernel("gelu_tanh")
    if own is None:
        pytest.skip(f"no own GELU kernel on {keras.backend.backend()}: keras-hub's code runs")
    shape = dict(vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16,
                 intermediate_dim=32, max_sequence_length=8)
    ours, theirs = GPTBackbone(**shape), keras_hub.models.GPT2Backbone(**shape)
    theirs.set_weights(ours.get_weights())
    assert sum(getattr(layer, "activation", None) is own
               for layer in ours._flatten_layers()) == shape["num_layers"]
    ids = np.random.default_rng(3).integers(0, 64, size=(2, 8))
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    probe = np.random.default_rng(4).normal(size=(2, 8, 16)).astype("float32")
    results = [value_and_grads(lambda _, m=m: keras.ops.sum(m(inputs) * probe), np.zeros(1),
                               layers=[m]) for m in (ours, theirs)]
    (value, grads), (ref_value, ref_grads) = results
    assert abs(value - ref_value) <= 1e-5 * abs(ref_value)
    flat, ref_flat = (np.concatenate([g.ravel() for g in gs[1:]]) for gs in (grads, ref_grads))
    assert _relative(flat, ref_flat) <= 1e-5  # (a key bias's gradient is 0: rounding noise)


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


def _remat_model(remat, jit, dropout=0.0, float8=False):
    """A float32 micro GPT with `remat`, compiled for SGD, seeded: the same weights each time."""
    kmp.set_policy("float32")
    keras.utils.set_random_seed(0)
    config = preset("tiny", num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                    seq_len=16, vocab_size=128, remat=remat, dropout=dropout)
    model = build_model(config)
    if float8:
        use_float8(model)
    kmp.compile(model, keras.optimizers.SGD(0.1), lm_loss(), jit_compile=jit)
    return model


def _token_batches(count=3):
    rng = np.random.default_rng(1)
    tokens = [rng.integers(0, 128, (4, 16)).astype("int32") for _ in range(count)]
    return [({"token_ids": t, "padding_mask": np.ones_like(t)}, t) for t in tokens]


# XLA on and off; Keras's torch backend has no XLA (its jit_compile is torch.compile).
REMAT_JITS = [False] if keras.backend.backend() == "torch" else [False, True]


@pytest.mark.parametrize("jit", REMAT_JITS)
@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_remat_trains_to_the_same_losses(remat, jit):
    """Recomputing activations changes no number: the per-step losses of a few float32 SGD
    steps equal those without remat (measured equal to 1e-7 relative or exactly)."""
    batches = _token_batches()
    got, want = ([model.train_on_batch(x, y, return_dict=True)["loss"] for x, y in batches]
                 for model in (_remat_model(remat, jit), _remat_model("none", jit)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_remat_recomputes_the_blocks():
    """remat="blocks" is in the training step, not silently dropped: on JAX the step's jaxpr
    holds one remat (jax.checkpoint) per block; on TensorFlow and torch each block's call runs
    once more in a training step (the recomputation for the backward pass)."""
    (x, y), = _token_batches(1)
    counts = {}
    for remat in ("none", "blocks"):
        model = _remat_model(remat, jit=keras.backend.backend() == "jax")
        calls = []
        for block in model.backbone.transformer_layers:
            block.call = (lambda *a, _call=block.call, _calls=calls, **k:
                          _calls.append(1) or _call(*a, **k))
        model.train_on_batch(x, y)  # builds the model and traces the step once
        if keras.backend.backend() == "jax":
            import jax

            state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                         optimizer_variables=True, metrics_variables=True)
            jaxpr = jax.make_jaxpr(model.train_step)(state, (x, y, None))
            # jax.checkpoint's primitive: "remat2" in JAX 0.10, "checkpoint" in others
            counts[remat] = len(re.findall(r"= (?:remat\d*|checkpoint)\[", str(jaxpr)))
        else:
            counts[remat] = len(calls)
    if keras.backend.backend() == "jax":
        assert counts == {"none": 0, "blocks": 2}
    else:
        assert counts["blocks"] == counts["none"] + 2  # one recomputation per block


def test_remat_with_dropout_or_float8_is_refused_in_one_line():
    """Rematerialized dropout and float8 scales change the numbers in Keras 3.15.1 (the
    recomputation draws other masks, updates the scales again): both refused."""
    with pytest.raises(kmp.UserError, match=r"^remat='blocks' with dropout=0.1 is not "
                                            r"supported .* Use dropout=0 or remat='none'\.$"):
        _remat_model("blocks", False, dropout=0.1)
    with pytest.raises(kmp.UserError, match=r"^float8 training of a model built with remat is "
                                            r"not supported .* Use remat='none' or no float8\.$"):
        _remat_model("blocks", False, float8=True)
    _remat_model("none", False, dropout=0.1, float8=True)  # without remat: both allowed


def test_remat_is_not_saved(tmp_path):
    """A model trained with remat saves and loads like any other (remat is a training-time
    choice: the loaded model computes the same logits and rematerializes nothing)."""
    model = _remat_model("blocks", jit=False)
    (x, y), = _token_batches(1)
    model.train_on_batch(x, y)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert all(layer._remat_mode is None for layer in loaded._flatten_layers())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x, training=False)),
                               expected, rtol=0, atol=1e-6)


def test_unknown_remat_is_one_line():
    with pytest.raises(kmp.UserError, match=r"^Unknown remat 'layers'\. Use one of: none, "
                                            r"blocks, full\.$"):
        preset("tiny", remat="layers")


class _Counted(keras.optimizers.schedules.LearningRateSchedule):
    """A warm-up schedule that counts its evaluations."""

    def __init__(self):
        self.calls = 0

    def __call__(self, step):
        self.calls += 1
        return 1e-2 * keras.ops.minimum(1.0, (keras.ops.cast(step, "float32") + 1.0) / 4.0)


@pytest.mark.backends("jax")  # torch: Keras's own AdamW (make_optimizer), a foreach update
@pytest.mark.parametrize("accumulation", [None, 2])
def test_adamw_evaluates_the_schedule_once_per_step_and_updates_as_keras_does(accumulation):
    from kmp.gpt.model import AdamW

    rng = np.random.default_rng(7)
    shapes = [(5, 3), (3,), (3, 4), (4,)]
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    steps = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(4)]
    results = {}
    for cls in (keras.optimizers.AdamW, AdamW):
        variables = [keras.Variable(v) for v in start]
        schedule = _Counted()
        opt = cls(schedule, weight_decay=0.1, global_clipnorm=1.0,
                  gradient_accumulation_steps=accumulation)
        opt.build(variables)
        calls = []
        for grads in steps:  # eager: each apply evaluates what it needs
            before = schedule.calls
            opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
            calls.append(schedule.calls - before)
        results[cls] = [keras.ops.convert_to_numpy(v) for v in variables], calls
    (theirs, their_calls), (ours, our_calls) = results.values()
    for a, b in zip(theirs, ours):
        np.testing.assert_array_equal(a, b)  # the same update, bit for bit
    assert our_calls == [1] * 4 and max(their_calls) > 1  # 1 + each decayed variable in Keras's


def test_weight_decay_shrinks_the_kernels_and_nothing_else():
    from kmp.gpt.model import make_optimizer

    config = preset("tiny", num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
                    vocab_size=64, seq_len=8, warmup_steps=0)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    rng = np.random.default_rng(3)
    for v in model.trainable_variables:  # no zeros: a decayed zero would not move
        v.assign(rng.normal(size=v.shape).astype(v.dtype))
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    # Zero gradients: Adam's own step is 0, so only the weight decay moves a variable.
    make_optimizer(config, model).apply(
        [keras.ops.zeros(v.shape, v.dtype) for v in model.trainable_variables],
        model.trainable_variables)
    moved = [v.path for v, old in zip(model.trainable_variables, before)
             if not np.array_equal(old, keras.ops.convert_to_numpy(v))]
    kernels = [v.path for v in model.trainable_variables if v.name == "kernel"]
    assert moved == kernels and len(kernels) == 6  # q, k, v, output, and the two feed-forward
