"""The pretraining recipe end to end, at reduced sizes on a small committed corpus."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import xla_flag

from kmp import checkpoint
from kmp._keras import flatten_layers
from kmp.cli import main as cli_main
from kmp.diagnostics import parity_check
from kmp.gpt import load_model
from kmp.gpt.config import PRESETS
from kmp.layers import Softmax
from kmp.recipes import pretrain_gpt

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_tiny_loss.json"
BASE = ["--corpus", str(DATA / "corpus.txt"), "--vocab-size", "512", "--seq-len", "32",
        "--batch-size", "8", "--warmup-steps", "2", "--val-batches", "2", "--seed", "3"]
# A reduced tiny run: the shape and schedule the golden loss file was recorded with.
SMALL = [*BASE, "--num-layers", "2", "--num-heads", "2", "--hidden-dim", "32",
         "--intermediate-dim", "64"]


def run(tmp_path, *args, name="run", base=SMALL, recipe_xla=False):
    """Trains with `args` and `xla_flag()`, or with the recipe's own XLA choice for the
    policy (`recipe_xla`)."""
    out = tmp_path / name
    argv = [*base, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--samples", "0",
            *args, *([] if recipe_xla else [xla_flag()])]
    assert pretrain_gpt.main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text())


def train_losses(out):
    return [loss for _, loss in checkpoint.latest(out / "checkpoints")["extra"]["history"]["train"]]


def test_tiny_run_writes_every_output(tmp_path, fake_hardware):
    fake_hardware("cpu")  # no peak FLOP/s known: no MFU
    out, metrics = run(tmp_path, "--steps", "6", "--val-every", "3", "--precision", "float32",
                       "--samples", "2")
    assert list(metrics) == ["policy", "steps", "final_train_loss", "val_loss", "val_perplexity",
                             "tokens_per_sec", "mfu", "skipped_steps", "final_loss_scale",
                             "recoveries", "attention", "processes", "state_bytes_per_device",
                             "weights_sha256", "wall_seconds"]
    assert metrics["policy"] == "float32" and metrics["steps"] == 6 and metrics["processes"] == 1
    assert metrics["mfu"] is None and metrics["final_loss_scale"] is None  # no scaling
    assert metrics["recoveries"] == []
    assert metrics["attention"]["choice"] == "fused"  # float32: nothing to harden
    assert metrics["attention"]["source"] == "float32 policy"
    assert math.isclose(metrics["val_perplexity"], math.exp(metrics["val_loss"]), rel_tol=1e-6)
    for name in ("config.json", "loss.png", "samples.txt", "model.keras", "history.json"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["train"]] == [1, 2, 3, 4, 5, 6]
    assert history["loss_scale"] == [None] * 6 and [s for s, _ in history["val"]] == [3, 6]
    assert json.loads((out / "config.json").read_text())["steps"] == 6
    samples = (out / "samples.txt").read_text().split("\n\n-----\n\n")
    assert len(samples) == 2 and all(s.startswith("def") for s in samples)
    assert len(train_losses(out)) == 6
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    loaded = load_model(out / "model.keras")  # safe mode, islands back in
    assert loaded.generate("def", max_length=12).startswith("def")
    assert any(isinstance(layer, Softmax) for layer in flatten_layers(loaded))
    x = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8), "int32")}
    assert parity_check(loaded, x).flagged == []  # a keras-hub task with its preprocessor
    # The diagnosis commands take the finished run: its model and its config.
    assert cli_main(["parity", "--run", str(out), "--precision", "mixed_bfloat16"]) == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_at_reduced_size(tmp_path, name):
    # Keep each preset's head count, schedule and dropout; shrink depth, widths, vocabulary and
    # length to CPU-test size (the full GPT-2 shapes are checked in test_gpt_config.py).
    full = PRESETS[name]()
    out, metrics = run(tmp_path, "--preset", name, "--num-layers", "2", "--num-heads",
                       str(full.num_heads), "--hidden-dim", str(4 * full.num_heads),
                       "--intermediate-dim", str(8 * full.num_heads), "--steps", "2",
                       "--warmup-steps", "1", "--precision", "mixed_bfloat16", base=BASE)
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == name and config["learning_rate"] == full.learning_rate
    assert metrics["steps"] == 2 and math.isfinite(metrics["val_loss"])


def test_fixed_seed_run_matches_the_golden_losses(tmp_path):
    """Catches numeric drift: per-step training losses of a fixed-seed run, float32 and bf16."""
    golden = json.loads(GOLDEN.read_text())
    for policy, expected in golden["losses"].items():
        out, _ = run(tmp_path, *golden["args"], "--precision", policy, name=policy,
                     recipe_xla=True)
        got = train_losses(out)
        assert len(got) == len(expected)
        tol = golden["tolerance"][policy]
        worst = float(np.max(np.abs(np.subtract(got, expected))))
        assert worst <= tol, f"{policy}: worst per-step loss difference {worst:.2e} > {tol}"


def stop_after_first_checkpoint(monkeypatch):
    original = checkpoint.Checkpoint.on_epoch_end

    def stop_after_first(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt("simulated stop after the first checkpoint")

    monkeypatch.setattr(checkpoint.Checkpoint, "on_epoch_end", stop_after_first)
    return lambda: monkeypatch.setattr(checkpoint.Checkpoint, "on_epoch_end", original)


def test_resume_continues_the_same_run(tmp_path, monkeypatch):
    args = ("--steps", "8", "--val-every", "4", "--precision", "mixed_float16")
    ref, ref_metrics = run(tmp_path, *args, name="ref")

    undo = stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *args, name="resumed")
    undo()
    record = checkpoint.latest(tmp_path / "resumed" / "checkpoints")
    assert (record["step"], record["batches"], record["position"]) == (4, 4, 4)
    out, metrics = run(tmp_path, *args, "--resume", name="resumed")

    assert metrics["steps"] == ref_metrics["steps"] == 8
    assert metrics["final_loss_scale"] == ref_metrics["final_loss_scale"]
    np.testing.assert_allclose(train_losses(out), train_losses(ref), rtol=0, atol=1e-6)
    assert metrics["val_loss"] == pytest.approx(ref_metrics["val_loss"], abs=1e-6)


def test_resume_with_another_val_every_continues_from_the_data_position(tmp_path, monkeypatch):
    # The checkpoint stores where the run stands (batches read, optimizer step); resuming with
    # another validation interval must not recompute it from the new interval.
    args = ("--steps", "8", "--precision", "float32")
    ref, _ = run(tmp_path, *args, "--val-every", "4", name="ref")
    undo = stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *args, "--val-every", "4", name="resumed")
    undo()
    out, metrics = run(tmp_path, *args, "--val-every", "2", "--resume", name="resumed")
    assert metrics["steps"] == 8
    np.testing.assert_allclose(train_losses(out), train_losses(ref), rtol=0, atol=1e-6)
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["train"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [s for s, _ in history["val"]] == [4, 6, 8]  # every 2 steps after the resume
    # ... and with more steps: the same run, continued past its old end.
    out, metrics = run(tmp_path, *args, "--steps", "10", "--val-every", "2", "--warmup-steps",
                       "2", "--resume", name="resumed")
    assert metrics["steps"] == 10 and len(train_losses(out)) == 10


def test_resume_refuses_another_grad_accum_or_too_few_steps(tmp_path):
    run(tmp_path, "--steps", "4", "--val-every", "2", "--precision", "float32")
    with pytest.raises(ValueError, match=r"another gradient accumulation.*grad_accum 1 -> 2"):
        run(tmp_path, "--steps", "4", "--val-every", "2", "--grad-accum", "2", "--resume")
    with pytest.raises(ValueError, match="already trained 4 steps"):
        run(tmp_path, "--steps", "4", "--val-every", "2", "--resume")


@pytest.mark.backends
def test_gradient_accumulation_checkpoints_and_resumes_on_every_backend(tmp_path, monkeypatch):
    # Keras derives `iterations` under accumulation (a floor_divide: a jax.Array on JAX, no
    # .numpy()); the checkpoint, the metrics and the resume position must all read it.
    args = ("--steps", "4", "--val-every", "2", "--grad-accum", "2", "--precision",
            "mixed_float16")
    ref, ref_metrics = run(tmp_path, *args, name="ref")
    assert ref_metrics["steps"] == 4
    record = checkpoint.latest(ref / "checkpoints")
    assert (record["step"], record["batches"]) == (4, 8)
    undo = stop_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *args, name="resumed")
    undo()
    out, metrics = run(tmp_path, *args, "--resume", name="resumed")
    assert metrics["steps"] == 4
    np.testing.assert_allclose(train_losses(out), train_losses(ref), rtol=0, atol=1e-5)


def test_a_non_finite_loss_does_not_blind_the_rest_of_the_epoch(tmp_path):
    # inf sample weights on the rows of step 2 (this process's, worker 0): that step's loss is
    # non-finite and its float16 update is skipped; every other step keeps its own loss.
    out, metrics = run(tmp_path, "--steps", "6", "--val-every", "6", "--precision",
                       "mixed_float16", "--inject-fault", "inf@2:0", "--no-recover")
    losses = json.loads((out / "history.json").read_text())["train"]
    assert losses[2][1] is None  # strict JSON: null for the non-finite one
    assert all(math.isfinite(loss) for _, loss in losses[:2] + losses[3:]), losses
    assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["final_train_loss"])


def test_resume_refuses_another_shape_or_no_checkpoint(tmp_path):
    run(tmp_path, "--steps", "2", "--precision", "float32")
    with pytest.raises(ValueError, match=r"another model shape \(hidden_dim 32 -> 64\)"):
        run(tmp_path, "--steps", "2", "--hidden-dim", "64", "--resume")
    (tmp_path / "fresh").mkdir()  # a run's config without any checkpoint
    (tmp_path / "fresh" / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    with pytest.raises(ValueError, match="No checkpoint"):
        run(tmp_path, "--steps", "2", "--resume", name="fresh")


MIRRORED_SCRIPT = """
import os, sys
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from kmp.recipes import pretrain_gpt
sys.exit(pretrain_gpt.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_mirrored_strategy_trains_on_two_replicas(tmp_path, backend):
    # In a subprocess: two MirroredStrategy instances in one process clash on collective keys
    # (test_scaling.py has its own); on JAX, keras.distribution.DataParallel over 2 CPU devices.
    out = tmp_path / "run"
    argv = [*SMALL, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--samples", "0",
            "--steps", "2", "--strategy", "mirrored", xla_flag(backend), "--precision",
            "mixed_float16"]
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, *argv], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 replica(s)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["final_loss_scale"] > 0


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["pretrain", "--precision", "mixed_fp16"]) == 2
    assert "Unknown precision 'mixed_fp16'" in capsys.readouterr().err
    assert cli_main(["pretrain", "--corpus", str(tmp_path / "missing"), "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "names no file" in err and err.count("\n") == 1
