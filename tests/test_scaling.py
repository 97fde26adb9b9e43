import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from kmp import backends
from kmp.scaling import LossScaleOptimizer, NonFiniteGradientsError

pytestmark = pytest.mark.backends

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "gradscaler_golden.json").read_text())
# The stateful path (TensorFlow, torch) and JAX's stateless one (Keras's TensorFlow optimizer
# refuses stateless_apply: it runs under the jax and torch runs of this suite).
PATHS = ["apply"] + (["stateless_apply"] if keras.backend.backend() != "tensorflow" else [])


def _apply(opt, grads, variables, path="apply"):
    """One optimizer step through `path`; stateless_apply's results are written back."""
    grads = [keras.ops.convert_to_tensor(g) for g in grads]
    if path == "apply":
        opt.apply(grads, variables)
        return
    if not opt.built:
        opt.build(variables)
    if "_compiled_stateless" not in opt.__dict__:  # compiled, as inside Keras's JAX train step
        opt.__dict__["_compiled_stateless"] = backends.jit(opt.stateless_apply)
    new_weights, new_state = opt._compiled_stateless([v.value for v in opt.variables], grads,
                                                     [v.value for v in variables])
    for v, value in zip(variables, new_weights):
        v.assign(value)
    for v, value in zip(opt.variables, new_state):
        v.assign(value)


def _drive(opt, overflow, var=None, path="apply"):
    """Applies one gradient per entry of `overflow` (inf where True); returns scales after each."""
    var = var if var is not None else keras.Variable(np.ones(3, "float32"), name="w")
    scales = []
    for bad in overflow:
        g = np.ones(var.shape, "float32")
        g[0] = np.inf if bad else 1.0
        _apply(opt, [g], [var], path)
        scales.append(float(keras.ops.convert_to_numpy(opt.dynamic_scale)))
    return scales


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"seed{c['seed']}")
def test_hysteresis_1_equals_torch_gradscaler(case, path):
    opt = LossScaleOptimizer(
        keras.optimizers.SGD(1e-3),
        initial_scale=case["init_scale"],
        growth_factor=case["growth_factor"],
        backoff_factor=case["backoff_factor"],
        growth_interval=case["growth_interval"],
        min_scale=2.0**-100,
        max_scale=2.0**100,
        max_consecutive_skips=None,
    )
    assert _drive(opt, case["overflow"], path=path) == case["scales"]


def deepspeed_reference(overflow, init, factor, window, min_scale, delayed_shift):
    """DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis=False), re-expressed.

    Overflow: back off (not below min_scale) when the hysteresis budget is 1, otherwise spend one
    unit of it. Finite: grow every `window` steps since the last overflow, restoring the budget.
    """
    scale, cur_iter, last_overflow, hyst, out = init, 0, -1, delayed_shift, []
    for bad in overflow:
        if bad:
            if delayed_shift == 1 or hyst == 1:
                scale = max(scale / factor, min_scale)
            else:
                hyst -= 1
            last_overflow = cur_iter
        elif (cur_iter - last_overflow) % window == 0:
            hyst = delayed_shift
            scale *= factor
        cur_iter += 1
        out.append(scale)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hysteresis", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_hysteresis_n_follows_deepspeed(hysteresis, seed, path):
    rng = np.random.default_rng(seed)
    overflow = (rng.random(120) < 0.35).tolist()
    opt = LossScaleOptimizer(
        keras.optimizers.SGD(1e-3), initial_scale=2.0**12, growth_interval=4,
        hysteresis=hysteresis, min_scale=1.0, max_scale=2.0**60, max_consecutive_skips=None,
    )
    expected = deepspeed_reference(overflow, 2.0**12, 2.0, 4, 1.0, hysteresis)
    assert _drive(opt, overflow, path=path) == expected
    # The budget really delays: with these seeds some overflow is absorbed without a back-off.
    assert expected != deepspeed_reference(overflow, 2.0**12, 2.0, 4, 1.0, 1)


def _np(v):
    return keras.ops.convert_to_numpy(v)


@pytest.mark.parametrize("path", PATHS)
def test_scale_stays_in_bounds_and_weights_stay_finite(path):
    w = keras.Variable(np.ones(3, "float32"), name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=None)
    scales = _drive(opt, [True] * 200, w, path)
    assert min(scales) == 1.0  # keras' own optimizer reaches 0.0 here
    before = _np(w).copy()
    np.testing.assert_array_equal(before, np.ones(3))  # 200 skipped steps changed nothing
    _drive(opt, [False], w, path)
    assert np.isfinite(_np(w)).all() and not np.array_equal(_np(w), before)

    up = LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0**20, growth_interval=1,
                            growth_factor=16.0, max_scale=2.0**24)
    assert _drive(up, [False] * 40, path=path)[-1] == 2.0**24  # keras' own reaches inf here


@pytest.mark.parametrize("path", PATHS)
def test_skipped_step_changes_no_weight_slot_or_iteration(path):
    w = keras.Variable(np.ones(4, "float32"), name="w")
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    opt = LossScaleOptimizer(keras.optimizers.Adam(sched), max_consecutive_skips=None)
    _drive(opt, [False, False], w, path)
    snapshot = [_np(v).copy() for v in opt.inner_optimizer.variables]
    w_before = _np(w).copy()
    lr_before = float(_np(opt.inner_optimizer.learning_rate))
    _drive(opt, [True, True, True], w, path)
    np.testing.assert_array_equal(_np(w), w_before)
    for v, s in zip(opt.inner_optimizer.variables, snapshot):
        np.testing.assert_array_equal(_np(v), s)
    assert int(_np(opt.iterations)) == 2
    assert float(_np(opt.inner_optimizer.learning_rate)) == lr_before
    state = opt.state()
    assert state["skipped_steps"] == 3 and state["consecutive_skips"] == 3
    assert opt.overflow_variables == ["w"]
    _drive(opt, [False], w, path)
    assert opt.state()["consecutive_skips"] == 0 and int(_np(opt.iterations)) == 3


@pytest.mark.parametrize("path", PATHS)
def test_overflow_attribution_names_only_the_bad_variable(path):
    a = keras.Variable(np.ones(2, "float32"), name="a")
    b = keras.Variable(np.ones(2, "float32"), name="b")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1))
    _apply(opt, [np.array([1.0, 1.0], "float32"), np.array([np.nan, 1.0], "float32")], [a, b],
           path)
    assert opt.overflow_variables == ["b"]
    np.testing.assert_array_equal(_np(a), [1.0, 1.0])  # a's finite gradient is not applied


def test_skip_budget_raises_naming_the_variables():
    w = keras.Variable(np.ones(3, "float32"), name="exploding_kernel")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=3)
    _drive(opt, [True, True], w)
    with pytest.raises(NonFiniteGradientsError, match="exploding_kernel"):
        _drive(opt, [True], w)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(initial_scale=0.5),
        dict(initial_scale=float("inf")),
        dict(min_scale=0.0),
        dict(max_scale=0.5),
        dict(growth_interval=0),
        dict(growth_interval=2.5),
        dict(growth_factor=1.0),
        dict(backoff_factor=1.0),
        dict(backoff_factor=0.0),
        dict(hysteresis=0),
        dict(max_consecutive_skips=0),
    ],
)
def test_invalid_knobs_raise_with_what_was_received(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Received: {name}="):
        LossScaleOptimizer(keras.optimizers.SGD(), **kwargs)


def test_inner_must_be_a_plain_optimizer():
    with pytest.raises(ValueError, match="already a LossScaleOptimizer"):
        LossScaleOptimizer(LossScaleOptimizer(keras.optimizers.SGD()))


def _step_with_grad(opt, w, g, path="apply"):
    before = _np(w).copy()
    _apply(opt, [g], [w], path)
    return _np(w) - before


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_clipping_sees_unscaled_gradients(clip, path):
    w = keras.Variable(np.zeros(2, "float32"), name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(1.0, **{clip: 1.0}), initial_scale=1024.0)
    # True gradient (0.3, 0.4): norm 0.5 < 1, so no clipping; scaled it would be clipped.
    step = _step_with_grad(opt, w, np.array([0.3, 0.4], "float32") * 1024.0, path)
    np.testing.assert_allclose(step, [-0.3, -0.4], rtol=1e-6)
    # True gradient (3, 4): norm 5, clipped to norm 1.
    step = _step_with_grad(opt, w, np.array([3.0, 4.0], "float32") * 1024.0, path)
    np.testing.assert_allclose(step, [-0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_gradient_accumulation_skips_whole_micro_steps(path):
    w = keras.Variable(np.zeros(2, "float32"), name="w")
    inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=2)
    opt = LossScaleOptimizer(inner, initial_scale=4.0, max_consecutive_skips=None)
    g = np.array([4.0, 8.0], "float32")  # unscaled (1, 2)
    assert np.all(_step_with_grad(opt, w, g, path) == 0)  # first micro-step: accumulate only
    # skipped: the accumulator must not see it
    _apply(opt, [np.array([np.inf, 1.0], "float32")], [w], path)
    np.testing.assert_array_equal(_np(w), [0.0, 0.0])
    # the scale backed off to 2, so the same unscaled gradient is now g / 2
    step = _step_with_grad(opt, w, g / 2, path)
    np.testing.assert_allclose(step, [-1.0, -2.0])  # mean of two unscaled (1, 2) micro-steps
    assert int(_np(inner.iterations)) == 1  # two applied micro-steps = one update


# ------------------------------------------------------------- a drop-in for Keras's class
def test_keras_argument_dynamic_growth_steps_is_honoured():
    def run(cls, **kwargs):
        w = keras.Variable(np.ones(2, "float32"), name="w")
        opt = cls(keras.optimizers.SGD(0.5), initial_scale=2.0, **kwargs)
        # Keras's own class steps by stateless_apply on JAX (its apply leaks tracers there).
        path = "stateless_apply" if keras.backend.backend() == "jax" else "apply"
        for _ in range(8):
            _apply(opt, [np.ones(2, "float32")], [w], path)
        return float(_np(opt.dynamic_scale))

    ours = run(LossScaleOptimizer, dynamic_growth_steps=2)
    assert ours == run(keras.optimizers.LossScaleOptimizer, dynamic_growth_steps=2) == 32.0
    assert run(LossScaleOptimizer, growth_interval=2, dynamic_growth_steps=2) == 32.0
    with pytest.raises(ValueError, match="growth_interval=3, dynamic_growth_steps=2"):
        LossScaleOptimizer(keras.optimizers.SGD(), growth_interval=3, dynamic_growth_steps=2)


@pytest.mark.parametrize("path", PATHS)
def test_keras_behaviours_hold(path):
    """Keras's own LossScaleOptimizer tests, on kmp's class: a finite step divides by the
    scale before the inner update, a non-finite step changes nothing, four overflows from 400
    give 25, and the config round-trips."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4,)).astype("float32")
    g = rng.normal(size=(4,)).astype("float32")
    w = keras.Variable(w0, name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=400.0)
    _apply(opt, [g * 400.0], [w], path)
    np.testing.assert_allclose(_np(w), w0 - 0.5 * g, rtol=1e-5, atol=1e-6)
    before = _np(w).copy()
    for _ in range(4):
        _apply(opt, [np.full(4, np.inf, "float32")], [w], path)
    np.testing.assert_array_equal(_np(w), before)
    assert float(_np(opt.dynamic_scale)) == 25.0
    clone = LossScaleOptimizer.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()



def test_config_has_keras_keys_and_round_trips_through_keras_serialization(tmp_path):
    """Keras's LossScaleOptimizer config keys are all there (code written against Keras's
    class reads them), kmp's settings beside them; serialize/deserialize and a .keras file
    round-trip every setting."""
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.25), initial_scale=512.0,
                             growth_interval=7, growth_factor=4.0, backoff_factor=0.25,
                             hysteresis=3, min_scale=2.0, max_scale=2.0**20,
                             max_consecutive_skips=None, name="scaler")
    cfg = opt.get_config()
    keras_cfg = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()).get_config()
    assert set(keras_cfg) <= set(cfg)
    assert cfg["dynamic_growth_steps"] == 7 and cfg["hysteresis"] == 3
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(clone) is LossScaleOptimizer and clone.get_config() == cfg
    assert clone.growth_interval == 7 and clone.inner_optimizer.get_config() == (
        opt.inner_optimizer.get_config())
    # A config written before dynamic_growth_steps was in it still loads.
    old = {k: v for k, v in cfg.items() if k != "dynamic_growth_steps"}
    assert LossScaleOptimizer.from_config({**old, "growth_interval": 7}).get_config() == cfg

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(opt, "mse")
    model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras").optimizer
    assert type(loaded) is LossScaleOptimizer and loaded.get_config() == cfg


def test_growth_interval_and_dynamic_growth_steps_are_one_setting():
    opt = LossScaleOptimizer(keras.optimizers.SGD(), growth_interval=5)
    opt.growth_interval = 3
    assert opt.dynamic_growth_steps == 3 and opt.get_config()["dynamic_growth_steps"] == 3
    with pytest.raises(ValueError, match="growth_interval=0"):
        opt.growth_interval = 0


@pytest.mark.parametrize("path", PATHS)
def test_take_step_state_hands_over_each_step_once(path):
    w = keras.Variable(np.ones(2, "float32"), name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=8.0)
    assert opt.take_step_state() is None
    _apply(opt, [np.full(2, np.inf, "float32")], [w], path)
    if path == "stateless_apply":  # the tensors of a compiled step do not outlive it
        assert opt.take_step_state() is not None
        return
    state = opt.take_step_state()
    assert set(state) == set(opt.state())
    assert {k: _np(v).item() for k, v in state.items()} == opt.state()
    assert opt.state()["loss_scale"] == 4.0 and opt.state()["skipped_steps"] == 1
    assert opt.take_step_state() is None


def _overflow_model(policy, jit):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.01))
    model.compile(opt, "mse", jit_compile=jit)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    return model, opt, x


@pytest.mark.parametrize("jit", [False, True])
def test_fit_skips_float16_overflow_and_recovers(jit):
    model, opt, x = _overflow_model("mixed_float16", jit)
    bad = x.copy()
    bad[:4] = 60000.0  # the first batch overflows in float16
    model.fit(bad, np.zeros((8, 1)), batch_size=4, shuffle=False, verbose=0)
    kernel = _np(model.get_layer("d").kernel)
    assert np.isfinite(kernel).all()
    assert opt.state()["skipped_steps"] == 1 and int(_np(opt.iterations)) == 1
    assert opt.loss_scale == 2.0**14


DATA_PARALLEL_SCRIPT = """
import json, os
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, keras, numpy as np
import kmp
devices = jax.devices("cpu")
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
keras.config.set_dtype_policy("mixed_float16")
keras.utils.set_random_seed(1)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
opt = kmp.compile(model, keras.optimizers.SGD(0.01), "mse", jit_compile=True)
x = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
x[2:] = 60000.0  # only the second device's half of the batch overflows
before = keras.ops.convert_to_numpy(model.get_layer("d").kernel).copy()
hist = model.fit(x, np.zeros((4, 1)), batch_size=4, shuffle=False, verbose=0)
after = keras.ops.convert_to_numpy(model.get_layer("d").kernel)
print(json.dumps({"devices": len(devices), "unchanged": bool(np.array_equal(after, before)),
                  "finite": bool(np.isfinite(after).all()), "state": opt.state(),
                  "logs": {k: v[-1] for k, v in hist.history.items()},
                  "overflow": opt.overflow_variables}))
"""


def test_jax_data_parallel_overflow_in_second_device_is_skipped(tmp_path):
    """keras.distribution.DataParallel over 2 CPU devices (JAX, in its own process)."""
    script = tmp_path / "dp.py"
    script.write_text(DATA_PARALLEL_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["unchanged"] and result["finite"]
    assert result["state"]["skipped_steps"] == 1 and result["state"]["loss_scale"] == 2.0**14
    assert result["logs"]["skipped_steps"] == 1.0 and result["logs"]["loss_scale"] == 2.0**14
    assert result["overflow"] == ["sequential/d/kernel", "sequential/d/bias"]


@pytest.mark.tensorflow
def test_overflow_in_second_replica_is_skipped():
    import tensorflow as tf

    """Case 3 of the issue: keras' own LossScaleOptimizer writes -inf into the kernel here."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.config.set_dtype_policy("mixed_float16")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
        opt = LossScaleOptimizer(keras.optimizers.SGD(0.01))
        model.compile(opt, "mse", jit_compile=False)
    x = np.random.default_rng(1).normal(size=(4, 4)).astype("float32")
    x[2:] = 60000.0  # only the second replica's half of the batch overflows
    before = model.get_layer("d").kernel.numpy().copy()
    model.fit(x, np.zeros((4, 1)), batch_size=4, shuffle=False, verbose=0)
    after = model.get_layer("d").kernel.numpy()
    np.testing.assert_array_equal(after, before)
    assert opt.state()["skipped_steps"] == 1 and opt.loss_scale == 2.0**14
    assert opt.overflow_variables == ["sequential/d/kernel", "sequential/d/bias"]
    # A clean step afterwards is applied on both replicas.
    model.fit(x[:2].repeat(2, 0), np.zeros((4, 1)), batch_size=4, verbose=0)
    assert np.isfinite(model.get_layer("d").kernel.numpy()).all()
    assert int(opt.iterations.numpy()) == 1


MWMS_SCRIPT = """
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tensorflow.python.distribute import collective_all_reduce_strategy as cars
import kmp
# One worker, two local devices: MultiWorkerMirroredStrategy's collective all-reduce.
strategy = cars.CollectiveAllReduceStrategy._from_local_devices(["/cpu:0", "/cpu:1"])
keras.config.set_dtype_policy("mixed_float16")
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
    opt = kmp.LossScaleOptimizer(keras.optimizers.SGD(0.01))
    model.compile(opt, "mse", jit_compile=False)
x = np.random.default_rng(2).normal(size=(4, 4)).astype("float32")
x[2:] = 60000.0
before = model.get_layer("d").kernel.numpy().copy()
model.fit(x, np.zeros((4, 1)), batch_size=4, shuffle=False, verbose=0)
after = model.get_layer("d").kernel.numpy()
print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                  "unchanged": bool(np.array_equal(after, before)),
                  "state": opt.state(), "overflow": opt.overflow_variables}))
"""


@pytest.mark.tensorflow
def test_multi_worker_mirrored_overflow_in_second_replica_is_skipped(tmp_path):
    # Its own process: two collective strategies in one process clash on collective keys.
    script = tmp_path / "mwms.py"
    script.write_text(MWMS_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["unchanged"]
    assert result["state"]["skipped_steps"] == 1 and result["state"]["loss_scale"] == 2.0**14
    assert result["overflow"] == ["sequential/d/kernel", "sequential/d/bias"]


def test_keras_saving_round_trips_state(tmp_path):
    model, opt, x = _overflow_model("mixed_float16", False)
    opt_cfg = opt.get_config()
    bad = x.copy()
    bad[:4] = 60000.0
    model.fit(bad, np.zeros((8, 1)), batch_size=4, shuffle=False, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    lopt = loaded.optimizer
    assert type(lopt) is LossScaleOptimizer
    assert lopt.get_config() == opt_cfg
    assert lopt.state() == opt.state()
    np.testing.assert_array_equal(_np(lopt.nonfinite_counts), [1, 1])
    # keras builds loaded variables under another name scope: compare the layer-relative names
    assert [p.split("/", 1)[-1] if p.count("/") > 1 else p for p in opt.overflow_variables] == (
        lopt.overflow_variables
    )


def test_backup_and_restore_keeps_scaler_state(tmp_path):
    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    def run(callbacks, epochs):
        model, opt, x = _overflow_model("mixed_float16", False)
        opt.growth_interval = 3
        bad = x.copy()
        bad[:4] = 60000.0
        try:
            model.fit(bad, np.zeros((8, 1)), batch_size=4, epochs=epochs, shuffle=False,
                      callbacks=callbacks, verbose=0)
        except RuntimeError:
            pass
        return opt

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = run([backup, StopAt()], 4)
    assert interrupted.state()["skipped_steps"] == 2
    resumed = run([keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))], 4)
    straight = run([], 4)
    assert resumed.state() == straight.state()
    assert resumed.state()["skipped_steps"] == 4


def test_fit_logs_are_current_every_step():
    """The scale and skips in fit's per-batch logs are the state after that very step (on JAX
    fit holds the optimizer state outside the variables until it syncs)."""
    import kmp

    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
    kmp.compile(model, keras.optimizers.SGD(0.01), "mse", jit_compile=True,
                loss_scale={"growth_interval": 2})
    # Small inputs: no clean step overflows at 2^15 (half-precision gradients on every backend).
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32") * 0.01
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append((float(logs["loss_scale"]), float(logs["skipped_steps"])))

    bad = np.concatenate([x, x])
    bad[4:8] = 60000.0  # the second of four batches overflows
    model.fit(bad, np.zeros((16, 1)), batch_size=4, shuffle=False, verbose=0,
              callbacks=[Record()])
    assert seen == [(2.0**15, 0.0), (2.0**14, 1.0), (2.0**14, 1.0), (2.0**15, 1.0)]
