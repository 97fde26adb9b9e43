import keras
import numpy as np
import pytest

import kmp
from kmp.scaling import NonFiniteGradientsError

pytestmark = pytest.mark.backends
# jit_compile=True is XLA on TensorFlow and JAX, torch.compile on torch (about 10 s a model on
# 2 cores): under torch these run eagerly; test_scaling.py compiles with torch.
JIT = [False] if keras.backend.backend() == "torch" else [False, True]


def _model(dtype=None, inner_dtype=None):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, dtype=inner_dtype or dtype, name="hidden"),
        keras.layers.Dense(1, dtype=dtype, name="out"),
    ])


def _data(n=32, bad_rows=0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    x[:bad_rows] = 60000.0
    return x, x.sum(1, keepdims=True) * 0.1


@pytest.mark.parametrize(
    "setup, wraps",
    [
        (lambda: (kmp.set_policy("mixed_float16"), _model())[1], True),
        (lambda: _model(inner_dtype="float16"), True),  # pure float16 layer: keras misses it
        (lambda: _model(dtype=keras.dtype_policies.DTypePolicyMap(
            default_policy="mixed_float16")), True),
        (lambda: (kmp.set_policy("mixed_bfloat16"), _model())[1], False),
        (lambda: _model(), False),
    ],
    ids=["mixed_float16", "float16_layer", "policy_map", "mixed_bfloat16", "float32"],
)
def test_compile_wraps_exactly_when_a_layer_computes_in_float16(setup, wraps):
    model = setup()
    opt = kmp.compile(model, keras.optimizers.SGD(0.01), "mse")
    assert isinstance(opt, kmp.LossScaleOptimizer) == wraps
    assert model.optimizer is opt
    x, y = _data()
    hist = model.fit(x, y, batch_size=8, verbose=0)
    assert ("loss_scale" in hist.history) == wraps
    assert np.isfinite(hist.history["loss"]).all()


def test_compile_replaces_keras_loss_scale_optimizer_and_takes_knobs():
    kmp.set_policy("mixed_float16")
    inner = keras.optimizers.Adam()
    opt = kmp.compile(_model(), keras.optimizers.LossScaleOptimizer(inner), "mse",
                      loss_scale={"hysteresis": 2, "initial_scale": 256.0})
    assert type(opt) is kmp.LossScaleOptimizer and opt.inner_optimizer is inner
    assert (opt.hysteresis, opt.initial_scale) == (2, 256.0)


def test_compile_keeps_a_keras_loss_scale_optimizers_settings():
    kmp.set_policy("mixed_float16")
    given = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=64.0,
                                                dynamic_growth_steps=3)
    opt = kmp.compile(_model(), given, "mse")
    assert (opt.initial_scale, opt.growth_interval) == (64.0, 3)
    opt = kmp.compile(_model(), keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=64.0, dynamic_growth_steps=3), "mse",
        loss_scale={"dynamic_growth_steps": 5})
    assert (opt.initial_scale, opt.growth_interval) == (64.0, 5)


def test_compile_honours_loss_scale_on_kmps_own_optimizer():
    kmp.set_policy("mixed_float16")
    given = kmp.LossScaleOptimizer(keras.optimizers.SGD(0.01), hysteresis=3)
    opt = kmp.compile(_model(), given, "mse",
                      loss_scale={"initial_scale": 256.0, "dynamic_growth_steps": 4})
    assert opt is given
    assert (opt.initial_scale, opt.growth_interval, opt.hysteresis) == (256.0, 4, 3)
    model = _model()
    kmp.compile(model, opt, "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, verbose=0)
    assert opt.state()["hysteresis_left"] == 3
    # Built: its scale and counters exist, so a change is refused, saying which and why.
    with pytest.raises(ValueError, match=r"initial_scale cannot change once the optimizer is "
                                         r"built.*Received: initial_scale=8.0"):
        kmp.compile(_model(), opt, "mse", loss_scale={"initial_scale": 8.0})
    assert kmp.compile(_model(), opt, "mse", loss_scale={"initial_scale": 256.0}) is opt
    with pytest.raises(ValueError, match="unknown setting 'hystersis'"):
        kmp.compile(_model(), kmp.LossScaleOptimizer(keras.optimizers.SGD()), "mse",
                    loss_scale={"hystersis": 2})
    with pytest.raises(ValueError, match="Received: backoff_factor=2"):
        kmp.compile(_model(), kmp.LossScaleOptimizer(keras.optimizers.SGD()), "mse",
                    loss_scale={"backoff_factor": 2})


def test_compile_float32_residual_without_attention_islands():
    import keras_hub

    from kmp._keras import flatten_layers
    from kmp.layers.harden import is_hardened

    kmp.set_policy("mixed_bfloat16")
    backbone = keras_hub.models.GPT2Backbone(96, 1, 2, 32, 64, max_sequence_length=8)
    kmp.compile(backbone, "sgd", islands=False, float32_residual=True)
    attention = [layer for layer in flatten_layers(backbone)
                 if isinstance(layer, keras.layers.MultiHeadAttention)]
    assert attention and not any(is_hardened(layer) for layer in attention)
    assert backbone.transformer_layers[0].compute_dtype == "float32"
    assert backbone.layer_norm.compute_dtype == "float32"
    kmp.compile(backbone, "sgd", islands=True)
    assert all(is_hardened(layer) for layer in attention)


def test_compile_rejects_loss_scale_without_float16():
    with pytest.raises(ValueError, match="no layer computes in float16"):
        kmp.compile(_model(), "sgd", "mse", loss_scale={"hysteresis": 2})


def test_compile_takes_jit_from_the_plan():
    plan = kmp.set_policy("mixed_bfloat16")
    model = _model()
    kmp.compile(model, "sgd", "mse")
    assert model.jit_compile == plan.jit_compile
    kmp.compile(model, "sgd", "mse", jit_compile=not plan.jit_compile)
    assert model.jit_compile == (not plan.jit_compile)


def test_plain_path_set_policy_then_keras_compile_still_works():
    kmp.set_policy("mixed_float16")
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = _data()
    assert np.isfinite(model.fit(x, y, batch_size=8, verbose=0).history["loss"]).all()


@pytest.mark.parametrize("jit", JIT)
def test_monitor_records_overflows_in_logs_and_events(jit, tmp_path):
    kmp.set_policy("mixed_float16")
    keras.utils.set_random_seed(0)  # some inits overflow once more on their own
    model = _model()
    kmp.compile(model, keras.optimizers.SGD(0.01), "mse", jit_compile=jit)
    x, y = _data(bad_rows=8)
    monitor = kmp.PrecisionMonitor(log_dir=str(tmp_path / "tb"), every=1)
    hist = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    assert hist.history["skipped_steps"] == [1.0, 2.0]
    assert hist.history["loss_scale"] == [2.0**14, 2.0**13]
    assert [step for step, _ in monitor.events] == [1, 5]
    assert monitor.events[0][1] == ["sequential/hidden/kernel", "sequential/hidden/bias",
                                    "sequential/out/kernel", "sequential/out/bias"]
    assert np.isfinite(model.get_layer("out").kernel.numpy()).all()
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("jit", JIT)
def test_monitor_enforces_skip_budget_in_fit(jit):
    kmp.set_policy("mixed_float16")
    model = _model()
    kmp.compile(model, keras.optimizers.SGD(0.01), "mse", jit_compile=jit,
                loss_scale={"max_consecutive_skips": 3})
    x, y = _data(bad_rows=32)  # every step overflows
    with pytest.raises(NonFiniteGradientsError, match="3 consecutive steps.*sequential/out/"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[kmp.PrecisionMonitor()])


def test_monitor_stops_on_non_finite_loss_without_scaling():
    model = _model()
    kmp.compile(model, keras.optimizers.SGD(1e30), "mse")
    x, y = _data()
    monitor = kmp.PrecisionMonitor()
    hist = model.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=[monitor])
    assert "without loss scaling" in monitor.stopped_reason
    assert len(hist.history["loss"]) < 5
