import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmp.scaling import LossScaleOptimizer, NonFiniteGradientsError

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "gradscaler_golden.json").read_text())


def _drive(opt, overflow, var=None):
    """Applies one gradient per entry of `overflow` (inf where True); returns scales after each."""
    var = var if var is not None else keras.Variable(np.ones(3, "float32"), name="w")
    scales = []
    for bad in overflow:
        g = np.ones(var.shape, "float32")
        g[0] = np.inf if bad else 1.0
        g = tf.constant(g)
        opt.apply([g], [var])
        scales.append(float(opt.dynamic_scale.numpy()))
    return scales


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"seed{c['seed']}")
def test_hysteresis_1_equals_torch_gradscaler(case):
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
    assert _drive(opt, case["overflow"]) == case["scales"]


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


@pytest.mark.parametrize("hysteresis", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_hysteresis_n_follows_deepspeed(hysteresis, seed):
    rng = np.random.default_rng(seed)
    overflow = (rng.random(120) < 0.35).tolist()
    opt = LossScaleOptimizer(
        keras.optimizers.SGD(1e-3), initial_scale=2.0**12, growth_interval=4,
        hysteresis=hysteresis, min_scale=1.0, max_scale=2.0**60, max_consecutive_skips=None,
    )
    expected = deepspeed_reference(overflow, 2.0**12, 2.0, 4, 1.0, hysteresis)
    assert _drive(opt, overflow) == expected
    # The budget really delays: with these seeds some overflow is absorbed without a back-off.
    assert expected != deepspeed_reference(overflow, 2.0**12, 2.0, 4, 1.0, 1)


def test_scale_stays_in_bounds_and_weights_stay_finite():
    w = keras.Variable(np.ones(3, "float32"), name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1), max_consecutive_skips=None)
    scales = _drive(opt, [True] * 200, w)
    assert min(scales) == 1.0  # keras' own optimizer reaches 0.0 here
    before = w.numpy().copy()
    np.testing.assert_array_equal(before, np.ones(3))  # 200 skipped steps changed nothing
    _drive(opt, [False], w)
    assert np.isfinite(w.numpy()).all() and not np.array_equal(w.numpy(), before)

    up = LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=2.0**20, growth_interval=1,
                            growth_factor=16.0, max_scale=2.0**24)
    assert _drive(up, [False] * 40)[-1] == 2.0**24  # keras' own reaches inf here


def test_skipped_step_changes_no_weight_slot_or_iteration():
    w = keras.Variable(np.ones(4, "float32"), name="w")
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    opt = LossScaleOptimizer(keras.optimizers.Adam(sched), max_consecutive_skips=None)
    _drive(opt, [False, False], w)
    snapshot = [v.numpy().copy() for v in opt.inner_optimizer.variables]
    w_before = w.numpy().copy()
    lr_before = float(opt.inner_optimizer.learning_rate.numpy())
    _drive(opt, [True, True, True], w)
    np.testing.assert_array_equal(w.numpy(), w_before)
    for v, s in zip(opt.inner_optimizer.variables, snapshot):
        np.testing.assert_array_equal(v.numpy(), s)
    assert int(opt.iterations.numpy()) == 2
    assert float(opt.inner_optimizer.learning_rate.numpy()) == lr_before
    state = opt.state()
    assert state["skipped_steps"] == 3 and state["consecutive_skips"] == 3
    assert opt.overflow_variables == ["w"]
    _drive(opt, [False], w)
    assert opt.state()["consecutive_skips"] == 0 and int(opt.iterations.numpy()) == 3


def test_overflow_attribution_names_only_the_bad_variable():
    a = keras.Variable(np.ones(2, "float32"), name="a")
    b = keras.Variable(np.ones(2, "float32"), name="b")
    opt = LossScaleOptimizer(keras.optimizers.SGD(0.1))
    opt.apply([tf.constant([1.0, 1.0]), tf.constant([np.nan, 1.0])], [a, b])
    assert opt.overflow_variables == ["b"]
    np.testing.assert_array_equal(a.numpy(), [1.0, 1.0])  # a's finite gradient is not applied


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


def _step_with_grad(opt, w, g):
    before = w.numpy().copy()
    opt.apply([tf.constant(g)], [w])
    return w.numpy() - before


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm"])
def test_clipping_sees_unscaled_gradients(clip):
    w = keras.Variable(np.zeros(2, "float32"), name="w")
    opt = LossScaleOptimizer(keras.optimizers.SGD(1.0, **{clip: 1.0}), initial_scale=1024.0)
    # True gradient (0.3, 0.4): norm 0.5 < 1, so no clipping; scaled it would be clipped.
    step = _step_with_grad(opt, w, np.array([0.3, 0.4], "float32") * 1024.0)
    np.testing.assert_allclose(step, [-0.3, -0.4], rtol=1e-6)
    # True gradient (3, 4): norm 5, clipped to norm 1.
    step = _step_with_grad(opt, w, np.array([3.0, 4.0], "float32") * 1024.0)
    np.testing.assert_allclose(step, [-0.6, -0.8], rtol=1e-6)


def test_gradient_accumulation_skips_whole_micro_steps():
    w = keras.Variable(np.zeros(2, "float32"), name="w")
    inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=2)
    opt = LossScaleOptimizer(inner, initial_scale=4.0, max_consecutive_skips=None)
    g = np.array([4.0, 8.0], "float32")  # unscaled (1, 2)
    assert np.all(_step_with_grad(opt, w, g) == 0)  # first micro-step: accumulate only
    opt.apply([tf.constant([np.inf, 1.0])], [w])  # skipped: the accumulator must not see it
    np.testing.assert_array_equal(w.numpy(), [0.0, 0.0])
    # the scale backed off to 2, so the same unscaled gradient is now g / 2
    step = _step_with_grad(opt, w, g / 2)
    np.testing.assert_allclose(step, [-1.0, -2.0])  # mean of two unscaled (1, 2) micro-steps
    assert int(inner.iterations.numpy()) == 1  # two applied micro-steps = one update


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
    kernel = model.get_layer("d").kernel.numpy()
    assert np.isfinite(kernel).all()
    assert opt.state()["skipped_steps"] == 1 and int(opt.iterations.numpy()) == 1
    assert opt.loss_scale == 2.0**14


def test_overflow_in_second_replica_is_skipped():
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
x = np.random.default_rng().normal(size=(4, 4)).astype("float32")
x[2:] = 60000.0
before = model.get_layer("d").kernel.numpy().copy()
model.fit(x, np.zeros((4, 1)), batch_size=4, shuffle=False, verbose=0)
after = model.get_layer("d").kernel.numpy()
print(json.dumps({"replicas": strategy.num_replicas_in_sync,
                  "unchanged": bool(np.array_equal(after, before)),
                  "state": opt.state(), "overflow": opt.overflow_variables}))
"""


def test_multi_worker_mirrored_overflow_in_second_replica_is_skipped(tmp_path):
    # Its own process: two collective strategies in one process clash on collective keys.
    import subprocess
    import sys

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
    np.testing.assert_array_equal(lopt.nonfinite_counts.numpy(), [1, 1])
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
        data = tf.data.Dataset.from_tensor_slices((bad, np.zeros((8, 1)))).batch(4)
        try:
            model.fit(data, epochs=epochs, callbacks=callbacks, verbose=0)
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


def test_stateless_apply_refuses_instead_of_running_keras_rule():
    opt = LossScaleOptimizer(keras.optimizers.SGD())
    with pytest.raises(NotImplementedError, match="stateless_apply is not supported"):
        opt.stateless_apply([], [], [])
