"""Training that heals itself (kmp.recovery): detection, the ladder, and the recipe's recovering
runs under injected faults. The recipe tests give docs/reliability.md its rows
(docs/reliability.py)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from _helpers import h5_arrays, xla_flag

from kmp import checkpoint
from kmp.errors import TrainingStopped
from kmp.recovery import Event, RecoveryPlan, ScaledSchedule, Watchdog, position

DATA = Path(__file__).parent / "data"
# A reduced tiny run: 60 steps, a checkpoint every 20, a spike window of 10, a skip budget of 5.
RUN = ["--corpus", str(DATA / "corpus.txt"), "--vocab-size", "512", "--seq-len", "32",
       "--batch-size", "8", "--warmup-steps", "2", "--val-batches", "2", "--seed", "3",
       "--num-layers", "2", "--num-heads", "2", "--hidden-dim", "32", "--intermediate-dim", "64",
       "--steps", "60", "--val-every", "20", "--samples", "0", "--max-skips", "5",
       "--spike-window", "10", "--recover-stretch", "20"]


def _argv(tmp_path, out, *extra):
    return [*RUN, xla_flag(), "--cache-dir", str(tmp_path.parent / "cache"), "--out", str(out),
            *extra]


def _pretrain(tmp_path, name, *extra):
    from kmp.recipes import pretrain_gpt

    out = tmp_path / name
    assert pretrain_gpt.main(_argv(tmp_path, out, *extra)) == 0
    return out, json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------- the parts, on their own
@pytest.mark.backends
def test_positions_leave_out_the_skipped_windows():
    assert [position(b, [(2, 3), (6, 6)]) for b in range(6)] == [0, 1, 4, 5, 7, 8]
    plan = RecoveryPlan()
    plan.skip = [(10, 14)]
    assert [plan.position(b) for b in (9, 10, 11)] == [9, 15, 16]


@pytest.mark.backends
def test_the_ladder_skips_then_halves_then_changes_precision_then_stops():
    plan = RecoveryPlan(attempts=4, stretch=50)
    actions = []
    for step in (124, 124, 121, 121):  # the same event, again and again
        record = plan.decide(Event("skip_budget", step, step, "storm"), rolled_back_to=100,
                             policy="mixed_float16", bf16=True, iteration=97)
        actions.append(record["action"])
    assert [r["attempt"] for r in plan.recoveries] == [1, 2, 3, 4]
    assert actions[0] == "roll back to step 100, skip data positions 100-124"
    # Each retry reads on past the windows already skipped: step 100 now reads position 125.
    assert plan.recoveries[1]["skipped_batches"] == [125, 149]
    assert plan.skip == [(100, 193)]  # 100-124, 125-149, 150-171, 172-193, merged
    assert "learning rate x0.5 for 50 steps" in actions[1]
    assert plan.lr_windows[0] == (97, 147, 0.5)  # from the optimizer's own step
    assert "learning rate x0.25 for 50 steps" in actions[2]  # halved again
    assert actions[2].endswith("mixed_float16 -> mixed_bfloat16")
    assert plan.policy == "mixed_bfloat16"
    assert actions[3].endswith("mixed_bfloat16 with a float32 residual stream")
    assert plan.float32_residual
    with pytest.raises(TrainingStopped, match="gave up at step 121 after 4 attempts.*Tried: roll"):
        plan.decide(Event("skip_budget", 121, 121, "storm"), 100, "mixed_bfloat16", True)
    # An event long after the last one starts the ladder again.
    again = plan.decide(Event("spike", 400, 400, "x"), 300, "mixed_bfloat16", True)
    assert again["attempt"] == 1
    # The plan survives a checkpoint (JSON) whole.
    copy = RecoveryPlan(4, 50, state=json.loads(json.dumps(plan.state())))
    assert copy.state() == plan.state()


@pytest.mark.backends
def test_without_native_bf16_the_precision_rung_is_the_float32_residual():
    plan = RecoveryPlan(attempts=3, stretch=50)
    for _ in range(3):
        record = plan.decide(Event("skip_budget", 110, 110, "storm"), 100, "mixed_float16",
                             bf16=False)
    assert record["action"].endswith("mixed_float16 with a float32 residual stream")
    assert plan.policy is None and plan.float32_residual


@pytest.mark.backends
def test_with_gradient_accumulation_the_learning_rate_windows_count_micro_batches():
    # Keras calls the schedule with its micro-batch counter (grad_accum per optimizer step).
    plan = RecoveryPlan(attempts=4, stretch=50)
    for _ in range(2):
        plan.decide(Event("spike", 120, 240, "x"), rolled_back_to=100, policy="float32",
                    batches_per_step=2, iteration=90)
    assert plan.lr_windows == [(180, 280, 0.5)]
    assert plan.recoveries[0]["skipped_batches"] == [200, 240]
    from kmp.gpt import build_model, make_optimizer, preset

    config = preset("tiny", grad_accum=4, warmup_steps=10, steps=100, num_layers=1,
                    hidden_dim=32, num_heads=2, intermediate_dim=64, vocab_size=128)
    schedule = make_optimizer(config, build_model(config))._learning_rate
    assert math.isclose(float(schedule(40)), config.learning_rate, rel_tol=1e-6)  # warm-up end
    assert float(schedule(20)) < config.learning_rate


@pytest.mark.backends
def test_a_spike_does_not_leak_into_the_epochs_validation():
    from kmp.faults import FaultInjector

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    losses = []
    for steps in ([], [3]):  # the epoch's last batch spiked, or none
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        faults = FaultInjector(steps=steps, kind="spike")
        model.compile(keras.optimizers.SGD(0.0), faults.wrap("mse"))
        history = model.fit(x, y, batch_size=16, validation_data=(x, y), callbacks=[faults],
                            verbose=0).history
        losses.append((history["loss"][0], history["val_loss"][0]))
    assert losses[1][0] > 10 * losses[0][0]  # the spike was there
    assert losses[1][1] == losses[0][1]  # and validation did not see it


@pytest.mark.backends
def test_scaled_schedule_halves_inside_its_window_and_round_trips():
    base = keras.optimizers.schedules.CosineDecay(1e-3, 100)
    lr = ScaledSchedule(base, [(10, 20, 0.5)])
    for step, factor in ((9, 1.0), (10, 0.5), (19, 0.5), (20, 1.0)):
        assert math.isclose(float(lr(step)), factor * float(base(step)), rel_tol=1e-6)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(lr))
    assert float(again(15)) == float(lr(15))


def _fit_watchdog(losses, **kwargs):
    """Runs a Watchdog over a fake fit whose batches have `losses`; returns the Event or None."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    dog = Watchdog(**kwargs)
    dog.set_model(model)
    dog.on_epoch_begin(0)
    total = 0.0
    try:
        for i, loss in enumerate(losses):
            total += loss
            dog.on_train_batch_end(i, {"loss": total / (i + 1)})  # Keras logs the running mean
        dog.on_epoch_end(0)
    except Event as event:
        return event
    return None


@pytest.mark.backends
def test_watchdog_calls_a_spike_from_the_running_median_and_nothing_else():
    rng = np.random.default_rng(0)
    clean = list(5.0 - np.linspace(0, 1, 60) + 0.2 * rng.random(60))  # falling, noisy
    assert _fit_watchdog(clean, spike_factor=1.5, window=10) is None
    event = _fit_watchdog([*clean[:30], 9.0, *clean[31:]], spike_factor=1.5, window=10)
    assert event.cause == "spike" and event.step == 30 and "x the median" in event.detail
    # No call before the window is full, and a NaN loss without scaling is its own cause.
    assert _fit_watchdog([5.0, 50.0], spike_factor=1.5, window=10) is None
    event = _fit_watchdog([5.0, 4.9, float("nan")], window=10)
    assert (event.cause, event.step) == ("nonfinite_loss", 2)


@pytest.mark.backends
def test_the_skip_budget_is_in_optimizer_steps_under_gradient_accumulation():
    import kmp
    from kmp.errors import UserError

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    kmp.compile(model, kmp.LossScaleOptimizer(keras.optimizers.SGD()), "mse")
    model.optimizer.build(model.trainable_variables)
    dog = Watchdog(max_skips=2, batches_per_step=3)  # 2 steps of 3 micro-batches
    dog.set_model(model)
    dog.on_epoch_begin(0)
    for i in range(5):
        dog.on_train_batch_end(i, {"loss": 1.0, "consecutive_skips": i + 1})
    with pytest.raises(Event, match="6 consecutive skipped micro-batches"):
        dog.on_train_batch_end(5, {"loss": 1.0, "consecutive_skips": 6})
    with pytest.raises(UserError, match="max_skips must be None or an int >= 1"):
        Watchdog(max_skips=0)  # not "no budget given" through an `or`


@pytest.mark.backends
def test_watchdog_catches_a_non_finite_weight_at_the_epoch_end():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="out")])
    model.compile("sgd", "mse")
    model.layers[0].kernel.assign(np.array([[np.nan], [1.0]], "float32"))
    dog = Watchdog()
    dog.set_model(model)
    with pytest.raises(Event, match="step 0: non-finite weights: in .*out/kernel"):
        dog.on_epoch_end(0)


# ---------------------------------------------------------------- the recipe, recovering
@pytest.fixture(scope="module")
def clean_fp16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean") / "run"
    tmp.mkdir()
    return _pretrain(tmp, "clean", "--precision", "mixed_float16")[1]


STORM = ["--precision", "mixed_float16", "--inject-fault", "nan@20x8"]


@pytest.fixture(scope="module")
def healed_fp16(tmp_path_factory):
    """The storm run with recovery: (its tmp directory, its --out, its metrics)."""
    tmp = tmp_path_factory.mktemp("healed") / "run"
    tmp.mkdir()
    return (tmp, *_pretrain(tmp, "healed", *STORM))


@pytest.mark.backends
def test_overflow_storm_rolls_back_skips_its_data_and_ends_like_a_clean_run(
        healed_fp16, clean_fp16, reliability):
    _, out, metrics = healed_fp16
    [rec] = metrics["recoveries"]
    assert (rec["cause"], rec["step"], rec["rolled_back_to"]) == ("skip_budget", 24, 20)
    assert rec["skipped_batches"] == [20, 24] and rec["attempt"] == 1
    assert "5 consecutive skipped steps; non-finite gradients in: all 36" in rec["detail"]
    # After the rollback, positions 25-27 were still poisoned: 3 skips, under the budget.
    assert metrics["skipped_steps"] == 3 and math.isfinite(metrics["val_loss"])
    change = metrics["val_loss"] / clean_fp16["val_loss"] - 1
    assert abs(change) < 0.02, change
    assert (out / "loss.png").stat().st_size > 0
    assert any((out / "tensorboard" / "recovery").glob("events.out.tfevents.*"))
    reliability("`--inject-fault nan@20x8` (mixed_float16, skip budget 5, checkpoints every 20, "
                "60 steps)", f"one recovery: back to step 20, batches 20-24 skipped, 3 more "
                f"skips absorbed by loss scaling; validation loss {change:+.2%} against a clean "
                "run")


def test_without_recovery_the_storm_stops_in_one_line_naming_the_variables(tmp_path, capsys,
                                                                           reliability):
    from kmp.cli import main

    argv = _argv(tmp_path, tmp_path / "run", *STORM, "--no-recover")
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmp: error: 5 consecutive steps had non-finite gradients")
    assert "all 36 trainable variables (token_embedding/embeddings" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    reliability("`--inject-fault nan@20x8 --no-recover`", f"exit 2: `{err.strip()[:150]}...`")


def test_a_loss_spike_under_bfloat16_is_caught_and_rolled_back(tmp_path, reliability):
    out, metrics = _pretrain(tmp_path, "spiked", "--precision", "mixed_bfloat16",
                             "--inject-fault", "spike@30")
    [rec] = metrics["recoveries"]
    assert (rec["cause"], rec["step"], rec["rolled_back_to"]) == ("spike", 30, 20)
    assert rec["skipped_batches"] == [20, 30] and "x the median" in rec["detail"]
    assert rec["abandoned_losses"][-1][1] > 10 * rec["abandoned_losses"][-2][1]  # the spike
    assert metrics["steps"] == 60 and math.isfinite(metrics["val_loss"])
    history = checkpoint.latest(out / "checkpoints")["extra"]["history"]["train"]
    assert max(loss for _, loss in history) < 10  # the spike is not in the kept history
    reliability("`--inject-fault spike@30` (mixed_bfloat16: the loss x100 on one step)",
                f"caught ({rec['detail']}), rolled back to step 20, batches 20-30 skipped")


def test_a_persistent_fault_walks_the_whole_ladder_then_stops_with_what_it_tried(
        tmp_path, capsys, fake_hardware, reliability):
    from kmp.cli import main

    fake_hardware("cpu:bf16")  # native bfloat16: the precision rung is float16 -> bfloat16
    out = tmp_path / "run"
    argv = _argv(tmp_path, out, "--precision", "mixed_float16", "--inject-fault", "nan@20x1000",
                 "--max-skips", "3")
    assert main(["pretrain", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("kmp: error: recovery gave up at step ") and err.count("\n") == 1
    assert "after 4 attempts" in err and "Tried: roll back to step 20" in err
    plan = checkpoint.latest(out / "checkpoints")["extra"]["recovery"]
    actions = [r["action"] for r in plan["recoveries"]]
    assert len(actions) == 4 and [r["attempt"] for r in plan["recoveries"]] == [1, 2, 3, 4]
    assert "learning rate x0.5" in actions[1]
    assert actions[2].endswith("mixed_float16 -> mixed_bfloat16")
    assert actions[3].endswith("mixed_bfloat16 with a float32 residual stream")
    # Under float16 the storm is skipped steps; under bfloat16 (no scaling) the NaN lands.
    assert [r["cause"] for r in plan["recoveries"]] == ["skip_budget"] * 3 + ["nonfinite_loss"]
    assert "non-finite loss" in err
    assert captured.out.count("recover: step") == 4
    reliability("`--inject-fault nan@20x1000` (a fault that never ends; mixed_float16)",
                "the whole ladder: skip; + learning rate x0.5; + mixed_bfloat16; + float32 "
                "residual stream; then exit 2: `" + err.strip()[:120] + "...`")


KILL_IN_RECOVERY = """
import os, signal, sys
from kmp.recipes import pretrain_gpt
restore = pretrain_gpt.restore
def dying_restore(*args, **kwargs):  # the rollback's restore: the plan is saved, no weights yet
    os.kill(os.getpid(), signal.SIGKILL)
if "--resume" not in sys.argv:
    pretrain_gpt.restore = dying_restore
sys.exit(pretrain_gpt.main(sys.argv[1:]))
"""


def test_sigkill_during_a_recovery_then_resume_ends_as_the_uninterrupted_run(
        tmp_path, healed_fp16, reliability):
    ref_tmp, ref, ref_metrics = healed_fp16  # the uninterrupted recovering run
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "killed"
    runs = [subprocess.run([sys.executable, "-c", KILL_IN_RECOVERY,
                            *_argv(ref_tmp, out, *STORM, *resume)],  # the same token cache
                           capture_output=True, text=True, timeout=600, env=env)
            for resume in ([], ["--resume"])]
    assert runs[0].returncode == -signal.SIGKILL and "recover: step 24" in runs[0].stdout
    assert runs[1].returncode == 0, runs[1].stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recoveries"] == ref_metrics["recoveries"]
    for key in ("steps", "skipped_steps", "final_loss_scale", "val_loss", "final_train_loss"):
        assert metrics[key] == ref_metrics[key], key
    a = checkpoint.latest(ref / "checkpoints")
    b = checkpoint.latest(out / "checkpoints")
    assert a["extra"] == b["extra"]  # the same losses and the same recovery plan
    ref_arrays, new_arrays = h5_arrays(ref / "checkpoints" / a["weights"]), h5_arrays(
        out / "checkpoints" / b["weights"])
    assert ref_arrays.keys() == new_arrays.keys() and len(ref_arrays) > 40
    for name in ref_arrays:
        np.testing.assert_array_equal(ref_arrays[name], new_arrays[name], err_msg=name)
    reliability("SIGKILL during a recovery (after the rollback is decided and saved, before the "
                "weights are restored), then `--resume`",
                f"ends as the uninterrupted recovering run: the same recovery, all "
                f"{len(ref_arrays)} arrays of the final checkpoint bit-identical")
