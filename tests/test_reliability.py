"""Reliability: overflow storms, kills mid-training and mid-checkpoint, precision changes on
resume, and bad input. Each test gives docs/reliability.md its rows (docs/reliability.py)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from _helpers import h5_arrays, xla_flag

import kmp
from kmp import backends
from kmp.callbacks import PrecisionMonitor
from kmp.faults import FaultInjector
from kmp.scaling import NonFiniteGradientsError

DATA = Path(__file__).parent / "data"


def _regression(seed=0, n=512):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype("float32")
    w = rng.normal(size=(16, 1)).astype("float32")
    return x, x @ w + 0.01 * rng.normal(size=(n, 1)).astype("float32")


def _storm_model(faults=None, min_scale=2.0**10, budget=100):
    kmp.set_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=200, alpha=0.1)
    loss = faults.wrap("mse") if faults else "mse"
    opt = kmp.compile(model, keras.optimizers.AdamW(schedule), loss,
                      loss_scale={"min_scale": min_scale, "max_consecutive_skips": budget})
    return model, opt


def _np(v):
    return keras.ops.convert_to_numpy(v)


class Watch(keras.callbacks.Callback):
    """After every batch: are the weights finite, and where is the loss scale."""

    def __init__(self):
        super().__init__()
        self.finite, self.scales = [], []

    def on_train_batch_end(self, batch, logs=None):
        backends.sync_state(self.model)  # JAX's fit holds the weights outside the variables
        self.finite.append(all(np.isfinite(_np(v)).all() for v in self.model.weights))
        self.scales.append(self.model.optimizer.loss_scale)


class Repeat(keras.utils.PyDataset):
    """`steps` batches of 32, cycling through (x, y)."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.x, self.y, self.steps = x, y, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        rows = slice((i * 32) % len(self.x), (i * 32) % len(self.x) + 32)
        return self.x[rows], self.y[rows]


@pytest.mark.backends
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_overflow_storm_is_skipped_and_training_recovers(kind, reliability):
    x, y = _regression()
    clean, clean_opt = _storm_model()
    clean.fit(Repeat(x, y, 128), verbose=0)
    natural = clean_opt.state()["skipped_steps"]  # early overflows while the scale settles
    storm_steps = list(range(20, 32))  # 12 consecutive poisoned steps
    faults = FaultInjector(storm_steps, kind=kind)
    model, opt = _storm_model(faults)
    watch = Watch()
    # 12 more steps than the clean run: the same number gets applied, on other batches.
    model.fit(Repeat(x, y, 140), verbose=0, callbacks=[faults, PrecisionMonitor(), watch])
    state = opt.state()
    assert faults.poisoned == storm_steps and state["skipped_steps"] == 12 + natural
    assert all(watch.finite)  # weights never non-finite
    assert min(watch.scales) == 2.0**10 and max(watch.scales) <= 2.0**24  # held at min_scale
    applied = int(_np(opt.iterations))
    assert applied == 140 - 12 - natural == int(_np(clean_opt.iterations))
    inner = opt.inner_optimizer  # the LR schedule advanced on applied steps only
    assert float(_np(inner.learning_rate)) == pytest.approx(
        float(inner._learning_rate(applied)), rel=1e-6)
    clean_loss = clean.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert abs(loss - clean_loss) < 0.1 * clean_loss + 1e-3, (loss, clean_loss)
    reliability(f"12 consecutive steps with {kind} gradients (fault injection, mixed_float16)",
                f"all 12 skipped, weights finite after every step, loss scale floored at "
                f"min_scale 2^10, LR schedule at the {applied} applied steps of 140; final "
                f"loss {loss:.4g} vs {clean_loss:.4g} in a clean run with as many applied steps")


@pytest.mark.backends
def test_endless_storm_stops_with_the_variables_named(reliability):
    faults = FaultInjector("all")
    model, opt = _storm_model(faults, budget=20)
    x, y = _regression()
    before = [_np(v).copy() for v in model.trainable_variables]
    with pytest.raises(NonFiniteGradientsError, match="20 consecutive steps") as err:
        model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[faults, PrecisionMonitor()])
    message = str(err.value)
    assert "sequential/dense/kernel" in message and "sequential/dense_1/bias" in message
    backends.sync_state(model)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(_np(v), b)
    reliability("every step's gradients non-finite (endless storm)",
                "after 20 skips (max_consecutive_skips) fit raises NonFiniteGradientsError "
                "naming all 4 variables; weights unchanged")


MIRRORED_SCRIPT = """
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, kmp
from kmp.faults import FaultInjector
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
kmp.set_policy("mixed_float16")
faults = FaultInjector([2, 3], kind="nan", replicas=[1])
keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
    opt = kmp.compile(model, keras.optimizers.SGD(0.01), faults.wrap("mse"), jit_compile=False,
                      loss_scale={"initial_scale": 256})  # no natural overflow here
rng = np.random.default_rng(0)
x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
kernels = []
class Record(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        kernels.append(model.get_layer("d").kernel.numpy().tolist())
model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[faults, Record()])
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "state": opt.state(),
                  "kernels": kernels, "poisoned": faults.poisoned}))
"""


@pytest.mark.tensorflow
def test_fault_in_one_replica_skips_the_step_on_all(reliability):
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    k = np.array(out["kernels"])
    assert out["replicas"] == 2 and out["poisoned"] == [2, 3]
    assert out["state"]["skipped_steps"] == 2 and np.isfinite(k).all()
    np.testing.assert_array_equal(k[2], k[1])  # steps 2 and 3 changed nothing
    np.testing.assert_array_equal(k[3], k[1])
    assert not np.array_equal(k[4], k[3])  # and training went on
    reliability("NaN gradients in replica 1 of 2 only (MirroredStrategy, steps 2-3)",
                "both steps skipped on both replicas, weights unchanged and finite, "
                "training continues")


KILL_DRIVER = """
import os, signal, sys
from kmp import checkpoint
from kmp.recipes import pretrain_gpt
mode, at = sys.argv[1], int(sys.argv[2])
if mode == "train":  # SIGKILL right after training batch `at` of this process
    seen, counted = [0], checkpoint.Checkpoint.on_train_batch_end
    def on_train_batch_end(self, batch, logs=None):
        counted(self, batch, logs)
        seen[0] += 1
        if seen[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpoint.on_train_batch_end = on_train_batch_end
elif mode == "checkpoint":  # SIGKILL inside the `at`-th checkpoint write, half the file on disk
    fsync, saves = checkpoint._fsync_file, [0]
    def dying_fsync(path):
        if path.name.startswith("tmp-"):
            saves[0] += 1
            if saves[0] == at:
                with open(path, "r+b") as fh:
                    fh.truncate(path.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        fsync(path)
    checkpoint._fsync_file = dying_fsync
sys.exit(pretrain_gpt.main(sys.argv[3:]))
"""

RUN = ["--corpus", str(DATA / "corpus.txt"), "--vocab-size", "512", "--seq-len", "32",
       "--batch-size", "8", "--warmup-steps", "2", "--val-batches", "2", "--seed", "3",
       "--num-layers", "2", "--num-heads", "2", "--hidden-dim", "32", "--intermediate-dim", "64",
       "--steps", "12", "--val-every", "4", "--samples", "0", "--precision", "mixed_float16",
       "--no-jit"]


def _pretrain(tmp_path, out, mode="none", at=0, *extra, backend="tensorflow"):
    argv = [*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    argv[argv.index("--no-jit")] = xla_flag(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", KILL_DRIVER, mode, str(at), *argv],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_sigkill_mid_training_and_mid_checkpoint_then_resume_equals_one_run(tmp_path, reliability,
                                                                            backend):
    from kmp import checkpoint

    ref = _pretrain(tmp_path, tmp_path / "ref", backend=backend)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    # in epoch 2 of 3, after checkpoint 1
    first = _pretrain(tmp_path, out, "train", 6, backend=backend)
    assert first.returncode == -signal.SIGKILL
    assert checkpoint.latest(out / "checkpoints")["batches"] == 4
    if backend == "tensorflow":  # dies writing checkpoint 2 (kmp's own file code: any backend)
        second = _pretrain(tmp_path, out, "checkpoint", 1, "--resume", backend=backend)
        assert second.returncode == -signal.SIGKILL and "resume: from step" in second.stdout
        record = checkpoint.latest(out / "checkpoints")
        assert record["batches"] == 4  # latest.json still names the whole checkpoint
        assert list((out / "checkpoints").glob("tmp-*"))  # the half-written file is only a tmp
    third = _pretrain(tmp_path, out, "none", 0, "--resume", backend=backend)
    assert third.returncode == 0, third.stderr[-2000:]

    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    for key in ("steps", "final_loss_scale", "skipped_steps", "val_loss", "final_train_loss"):
        assert a[key] == b[key], key
    ref_ckpt = checkpoint.latest(tmp_path / "ref" / "checkpoints")
    new_ckpt = checkpoint.latest(out / "checkpoints")
    assert ref_ckpt["extra"]["history"] == new_ckpt["extra"]["history"]  # same data, same losses
    ref_arrays = h5_arrays(tmp_path / "ref" / "checkpoints" / ref_ckpt["weights"])
    new_arrays = h5_arrays(out / "checkpoints" / new_ckpt["weights"])
    assert ref_arrays.keys() == new_arrays.keys() and len(ref_arrays) > 40
    for name in ref_arrays:  # weights, AdamW moments, iterations, loss scale and its counters
        np.testing.assert_array_equal(ref_arrays[name], new_arrays[name], err_msg=name)
    if backend == "tensorflow":
        reliability("SIGKILL in the middle of training (step 6 of 12, checkpoints every 4)",
                    "--resume continues from the step-4 checkpoint")
        reliability("SIGKILL while a checkpoint file is being written (half of it on disk)",
                    "latest.json still names the previous whole checkpoint; the partial file "
                    "is a tmp- file that resume ignores and the next save removes")
    kills = "both kills" if backend == "tensorflow" else "the kill in training"
    reliability(f"{kills}, then --resume to the end (mixed_float16, CPU, {backend})",
                f"bit-identical to an uninterrupted run: all {len(ref_arrays)} arrays of the "
                "final checkpoint (weights, AdamW moments, iterations, loss scale and counters), "
                "per-step losses, step count, loss scale, val loss")


def _in_process(tmp_path, out, *extra):
    from kmp.recipes import pretrain_gpt

    argv = [*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    assert pretrain_gpt.main(argv) == 0
    return json.loads((Path(out) / "metrics.json").read_text())


def test_resume_under_another_precision_warns_and_continues(tmp_path, capsys, reliability):
    from kmp import checkpoint

    out = tmp_path / "run"
    before = _in_process(tmp_path, out, "--precision", "float32", "--steps", "8")
    record = checkpoint.latest(out / "checkpoints")
    assert record["precision"]["policy"] == "float32" and not record["precision"]["loss_scaling"]
    assert set(record["precision"]["versions"]) == {"kmp", "keras", keras.backend.backend()}
    capsys.readouterr()
    up = _in_process(tmp_path, out, "--precision", "mixed_float16", "--steps", "12", "--resume")
    printed = capsys.readouterr().out
    assert "trained under float32 and resumes under mixed_float16" in printed
    assert "loss scale starts fresh" in printed
    assert up["steps"] + up["skipped_steps"] == 12 and up["final_loss_scale"] is not None
    back = _in_process(tmp_path, out, "--precision", "float32", "--steps", "16", "--resume")
    printed = capsys.readouterr().out
    assert "trained under mixed_float16 and resumes under float32" in printed
    assert back["steps"] + up["skipped_steps"] == 16 and back["final_loss_scale"] is None
    losses = [v for _, v in checkpoint.latest(out / "checkpoints")["extra"]["history"]["val"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < before["val_loss"] + 0.05  # no blow-up across the two switches
    reliability("resume a float32 run under mixed_float16, then back under float32",
                "a warning names both policies and says the loss scale starts fresh (or is "
                "dropped); weights and AdamW moments carry over; validation loss "
                + " -> ".join(f"{v:.3f}" for v in losses))


def _bad_corpus(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 64 + b"\x00")
    else:  # smaller than one window
        path.write_text("def f():\n    return 1\n" * 3)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    _in_process(tmp, tmp / "run", "--precision", "float32", "--steps", "4")
    return tmp


BAD_INPUTS = [  # (what, argv builder, expected message)
    ("unknown preset", lambda t, r: ["--preset", "gpt5"], "Unknown preset 'gpt5'"),
    ("unknown precision", lambda t, r: ["--precision", "fp8"], "Unknown precision 'fp8'"),
    ("missing corpus", lambda t, r: ["--corpus", str(t / "nope.txt")], "names no file"),
    ("empty corpus", lambda t, r: ["--corpus", _bad_corpus(t, "empty")], "has no UTF-8 text"),
    ("binary corpus", lambda t, r: ["--corpus", _bad_corpus(t, "binary")], "has no UTF-8 text"),
    ("corpus smaller than one training window",
     lambda t, r: ["--corpus", _bad_corpus(t, "small"), "--vocab-size", "300", "--seq-len", "128"],
     "too small"),
    ("zero steps", lambda t, r: ["--steps", "0"], "steps must be a positive integer"),
    ("negative batch size", lambda t, r: ["--batch-size", "-4"],
     "batch_size must be a positive integer"),
    ("zero sequence length", lambda t, r: ["--seq-len", "0"], "seq_len must be a positive"),
    ("another sequence length (resume)",
     lambda t, r: ["--out", str(r / "run"), "--resume", "--seq-len", "64"],
     "another model shape (seq_len 32 -> 64)"),
    ("negative learning rate", lambda t, r: ["--learning-rate", "-0.1"],
     "learning_rate must be a finite number > 0"),
    ("warm-up longer than the run", lambda t, r: ["--warmup-steps", "20"],
     "warmup_steps must be an integer from 0 to steps (12)"),
    ("negative seed", lambda t, r: ["--seed", "-1"], "seed must be an integer >= 0"),
    ("steps with no divisor near --val-every", lambda t, r: ["--steps", "13"],
     "has no divisor near val_every=4"),
    ("--resume with another gradient accumulation",
     lambda t, r: ["--out", str(r / "run"), "--resume", "--grad-accum", "2"],
     "another gradient accumulation"),
    ("--out not writable (a path under a file)",
     lambda t, r: ["--out", str(DATA / "corpus.txt" / "out")], "is not writable"),
    ("--resume at a directory that is not a kmp run",
     lambda t, r: ["--out", str(t), "--resume"], "is not a kmp pretrain run"),
    ("--resume with another model shape",
     lambda t, r: ["--out", str(r / "run"), "--resume", "--num-layers", "3"],
     "another model shape (num_layers 2 -> 3)"),
]


@pytest.mark.parametrize("what,argv,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(what, argv, message, tmp_path, finished_run, capsys,
                                          reliability):
    from kmp.cli import main

    args = [*RUN, "--cache-dir", str(finished_run / "cache"), "--out", str(tmp_path / "out"),
            *argv(tmp_path, finished_run)]
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    reliability(what, f"exit 2: `{err.strip()}`")


@pytest.mark.parametrize("damage", ["truncated", "garbage record"])
def test_damaged_checkpoint_is_refused_in_one_line(damage, tmp_path, capsys, reliability):
    import shutil

    from kmp import checkpoint
    from kmp.cli import main

    out = tmp_path / "run"
    _in_process(tmp_path, out, "--precision", "float32", "--steps", "4")
    ckpt = out / "checkpoints"
    if damage == "truncated":
        path = ckpt / checkpoint.latest(ckpt)["weights"]
        backup = path.read_bytes()
        path.write_bytes(backup[: len(backup) // 2])
    else:
        (ckpt / "latest.json").write_text("{not json")
    keep = tmp_path / "before"
    shutil.copytree(out, keep)
    args = [*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--resume",
            "--steps", "8"]
    assert main(["pretrain", *args]) == 2
    err = capsys.readouterr().err
    expected = "is missing or damaged" if damage == "truncated" else "not a kmp checkpoint"
    assert expected in err and err.count("\n") == 1, err
    for f in keep.rglob("*"):  # nothing on disk was touched
        if f.is_file():
            assert (out / f.relative_to(keep)).read_bytes() == f.read_bytes(), f
    reliability(f"--resume from a {damage} checkpoint",
                f"exit 2 before training, run directory untouched: `{err.strip()}`")


def test_loading_runs_no_code_from_files(tmp_path, reliability):
    from kmp.gpt import load_model

    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda t: t * 2)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        load_model(tmp_path / "lambda.keras")
    sources = [p for d in ("kmp", "recipes") for p in (Path(__file__).parents[1] / d).rglob("*.py")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, path
    reliability("a .keras file holding a Lambda layer (arbitrary Python)",
                "kmp.gpt.load_model refuses it: Keras safe mode; checkpoints are HDF5 arrays "
                "and no kmp module uses pickle")
