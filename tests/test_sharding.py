"""Sharded training (kmp.gpt.sharding, `kmp pretrain --mesh ... --shard ...`): GPT-2's layouts
cover the model kmp builds, sharded runs on 4 simulated devices train like one device (float32,
1e-4 relative), an overflow in one shard's rows skips the global step, fsdp holds about 1/D of
the state per device, a resume on another mesh continues alike, and the one-line errors.

The 4-device runs happen in one JAX subprocess (its XLA_FLAGS must be set before JAX loads),
shared by the tests that read its results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from kmp.cli import main
from kmp.errors import UserError
from kmp.gpt import sharding
from kmp.gpt.config import GPTConfig, preset
from kmp.gpt.model import param_count

DATA = Path(__file__).parent / "data"
# The tiny preset's weights; a short window and batch so each run takes seconds. tp trains
# only steps 3-4, resuming the fsdp run (a run fewer).
RUN = ["--corpus", str(DATA / "corpus.txt"), "--seq-len", "32", "--batch-size", "8",
       "--val-batches", "1", "--steps", "4", "--val-every", "2", "--warmup-steps", "1",
       "--samples", "0", "--precision", "float32", "--seed", "1"]
MESHES = {"one": [], "fsdp": ["--mesh", "data=4", "--shard", "fsdp"],
          "fsdp+tp": ["--mesh", "data=2,model=2", "--shard", "fsdp+tp"],
          "tp": ["--mesh", "model=4", "--shard", "tp"]}

# Runs in a fresh JAX process with 4 CPU devices: the recipe on one device and two meshes; a
# resume of the fsdp run from its step-2 checkpoint on another mesh (tp: every weight laid
# out anew); an overflow in one data shard's rows.
SCRIPT = r"""
import contextlib, io, json, shutil, sys
from pathlib import Path
import numpy as np
import keras
import kmp
from kmp import checkpoint
from kmp.recipes import pretrain_gpt
from kmp.gpt import sharding
from kmp.gpt.config import preset
from kmp.gpt.model import build_model, lm_loss

root, run, meshes = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
names = sys.argv[4].split()
cache = ["--cache-dir", str(root / "cache")]
save = checkpoint.Checkpoint.save

def save_and_keep_record(self, batches=None):  # each checkpoint's record, to resume from
    record = save(self, batches)
    shutil.copy(self.directory / "latest.json", self.directory / f"latest-{self.batches}.json")
    return record

checkpoint.Checkpoint.save = save_and_keep_record
results = {}
for name in names:
    assert pretrain_gpt.main([*run, *cache, *meshes[name], "--out", str(root / name)]) == 0
if names == ["one"]:
    sys.exit(0)
for source, target in (("fsdp", "tp"),):
    out = root / f"{source}-on-{target}"
    shutil.copytree(root / source, out)
    ckpt = out / "checkpoints"
    shutil.copy(ckpt / "latest-2.json", ckpt / "latest.json")
    (out / "metrics.json").unlink()
    with contextlib.redirect_stdout(io.StringIO()) as log:
        assert pretrain_gpt.main([*run, *cache, *meshes[target], "--out", str(out),
                                  "--resume"]) == 0
    (out / "resumed.log").write_text(log.getvalue())

# An inf in data shard 1's rows (of 4) under mixed_float16: the global step is skipped.
keras.config.set_dtype_policy("mixed_float16")
config = preset("tiny", seq_len=16, batch_size=8)
keras.distribution.set_distribution(sharding.distribution("data=4", "fsdp", config=config))
keras.utils.set_random_seed(0)
model = build_model(config)
kmp.compile(model, keras.optimizers.AdamW(1e-3), loss=lm_loss())
x = np.random.default_rng(0).integers(0, config.vocab_size, (16, 17))
weights = np.ones((16, 16), "float32")
weights[2:4] = np.inf  # the first batch's rows on device 1
before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
inputs = {"token_ids": x[:, :-1], "padding_mask": np.ones((16, 16), bool)}
model.fit(inputs, x[:, 1:], sample_weight=weights, batch_size=8, epochs=1, shuffle=False,
          verbose=0)
after_first = model.optimizer.state()
results["overflow"] = {
    "skipped_steps": after_first["skipped_steps"],
    "iterations": int(model.optimizer.iterations.numpy()),
    "changed": any(not np.array_equal(b, keras.ops.convert_to_numpy(w))
                   for b, w in zip(before, model.trainable_weights)),
    "shard_devices": len({s.device for s in model.trainable_weights[0].value.addressable_shards}),
}
(root / "results.json").write_text(json.dumps(results))
"""


# The runs on 4 simulated devices take a few minutes of CPU: run with --runslow. The default
# suite runs sharded steps, and an overflow in one shard, on the two devices conftest.py gives
# JAX (test_two_device_sharded_steps_equal_one_device, test_an_overflow_in_one_of_two_shards_
# skips_the_global_step).
SIMULATED = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The subprocess's directory: runs one, fsdp, fsdp+tp and fsdp-on-tp (the fsdp run
    resumed at step 2 under tp), and results.json (the overflow)."""
    from kmp.cli import device_environment

    root = tmp_path_factory.mktemp("sharded")
    # What `kmp --devices 4` sets: 4 CPU devices, and 8 threads for JAX's CPU client, which
    # deadlocked at a collective with fewer (kmp.cli.simulate_devices); but XLA gives up on a
    # collective after 2 minutes, not 10, should one hang anyway.
    simulated = device_environment(4, {"XLA_FLAGS": "--xla_cpu_collective_call_terminate"
                                                    "_timeout_seconds=120"})
    env = {**os.environ, **simulated, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    for names in ("one", "fsdp fsdp+tp"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(root), json.dumps(RUN),
                               json.dumps(MESHES), names], env=env, capture_output=True,
                              text=True, timeout=900)
        fatal = [line for line in done.stderr.splitlines()
                 if line[:1] == "F" and line[1:5].isdigit()]
        assert done.returncode == 0, "\n".join([done.stdout[-2000:], done.stderr[-3000:],
                                                *fatal])
    return root


def _train(out):
    return json.loads((Path(out) / "history.json").read_text())


def _close(a, b, tol=1e-4):
    return abs(b / a - 1) < tol


@SIMULATED
@pytest.mark.parametrize("mesh", ["fsdp", "fsdp+tp", "fsdp-on-tp"])
def test_sharded_runs_train_like_one_device(sharded, mesh):
    one, other = _train(sharded / "one"), _train(sharded / mesh)
    assert [s for s, _ in other["train"]] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(one["train"], other["train"]):
        assert _close(x, y), (mesh, step, x, y)
    for (_, x), (_, y) in zip(one["val"], other["val"]):
        assert _close(x, y), (mesh, x, y)


@SIMULATED
def test_fsdp_holds_a_quarter_of_the_state_on_each_of_4_devices(sharded):
    bytes_ = {m: json.loads((sharded / m / "metrics.json").read_text())["state_bytes_per_device"]
              for m in ("one", "fsdp", "fsdp+tp")}
    bytes_["tp"] = json.loads((sharded / "fsdp-on-tp" / "metrics.json").read_text())[
        "state_bytes_per_device"]
    params = param_count(preset("tiny", seq_len=32))
    assert 1 <= bytes_["one"] / (3 * 4 * params) < 1.02  # float32 weights + 2 Adam moments
    assert 0.24 < bytes_["fsdp"] / bytes_["one"] < 0.26, bytes_
    assert 0.24 < bytes_["fsdp+tp"] / bytes_["one"] < 0.26, bytes_
    assert 0.25 < bytes_["tp"] / bytes_["one"] < 0.35, bytes_  # norms, biases stay whole


@SIMULATED
def test_resume_on_another_mesh_continues_with_the_same_losses(sharded):
    one, resumed = _train(sharded / "one"), _train(sharded / "fsdp-on-tp")
    log = (sharded / "fsdp-on-tp" / "resumed.log").read_text()
    assert "resume: from step 2 of 4" in log
    assert [s for s, _ in resumed["train"]] == [1, 2, 3, 4]
    for (step, x), (_, y) in zip(one["train"][2:], resumed["train"][2:]):
        assert _close(x, y), (step, x, y)
    assert _close(one["val"][-1][1], resumed["val"][-1][1])


@SIMULATED
def test_an_overflow_in_one_shards_rows_skips_the_global_step(sharded):
    result = json.loads((sharded / "results.json").read_text())["overflow"]
    assert result["shard_devices"] == 4  # the weights really are split 4 ways
    assert result["skipped_steps"] == 1 and result["changed"], result  # step 2 applied
    assert result["iterations"] == 1  # the optimizer counts applied steps


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX only")
def test_every_weight_and_its_adam_moments_take_the_rules_layouts():
    import re

    import jax

    from kmp.gpt.model import build_model, make_optimizer

    config = preset("tiny", num_layers=1, seq_len=16)
    for shard, mesh in (("fsdp", "data=2"), ("tp", "model=2"), ("fsdp+tp", "data=1,model=2")):
        keras.utils.clear_session()  # before: it would clear the distribution too
        keras.distribution.set_distribution(sharding.distribution(mesh, shard, jax.devices()[:2],
                                                                  config=config))
        try:
            model = build_model(config)
            model.build((None, 16))
            optimizer = make_optimizer(config, model)
            optimizer.build(model.trainable_variables)
        finally:
            keras.distribution.set_distribution(None)
        left = sharding.unmatched(model.weights, shard)
        if shard != "tp":
            assert left == []  # every weight
        else:  # tp leaves norms, output biases and the position embedding whole
            assert left and all(p.endswith(("gamma", "beta", "attention_output/bias",
                                            "output_dense/bias", "position_embedding/embeddings"))
                                for p in left), left
        rules = [(re.compile(f"(.*/)?{p}"), a) for p, a in sharding.axes(shard)]
        for v in model.weights:
            wanted = next(a for r, a in rules + [(re.compile(".*"), ())] if r.fullmatch(v.path))
            spec = tuple(v.value.sharding.spec)
            assert spec + (None,) * (len(v.shape) - len(spec)) == (
                wanted + (None,) * (len(v.shape) - len(wanted))), (shard, v.path, spec)
            moments = [m for m in optimizer.variables
                       if m.path.split("/")[-1] == v.path.replace("/", "_") + "_momentum"]
            assert len(moments) == 1 and moments[0].value.sharding.is_equivalent_to(
                v.value.sharding, len(v.shape)), (shard, v.path)


def test_the_tp_table_splits_attention_and_mlp_megatron_style():
    split = dict(sharding.axes("tp"))
    assert split["self_attention/(query|key|value)/kernel"] == (None, "model", None)  # columns
    assert split["self_attention/attention_output/kernel"] == ("model", None, None)  # rows
    assert split["feedforward_intermediate_dense/kernel"] == (None, "model")
    assert split["feedforward_output_dense/kernel"] == ("model", None)
    assert split["token_embedding/embeddings"] == ("model", None)  # by vocabulary
    assert all(a in (("data",), ("data", None), (None, "data"), ("data", None, None),
                     (None, None, "data")) for _, a in sharding.axes("fsdp"))


@pytest.mark.backends
def test_parse_mesh():
    assert sharding.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert sharding.parse_mesh("model=2") == {"data": 1, "model": 2}
    assert sharding.parse_mesh("") == {}
    for bad in ("data=0", "data=2,data=2", "rows=2", "data:2"):
        with pytest.raises(UserError, match="Cannot read the mesh"):
            sharding.parse_mesh(bad)


@pytest.mark.backends
@pytest.mark.parametrize("fields, message", [
    ({"shard": "fsdp"}, "shard='fsdp' needs a mesh"),
    ({"mesh": "model=8", "shard": "tp"}, "model=8 does not divide num_heads=4"),
    ({"mesh": "data=3", "shard": "fsdp"}, "data=3 does not divide hidden_dim=128"),
    ({"mesh": "data=2", "strategy": "mirrored"}, "--strategy mirrored does too"),
    ({"mesh": "data=2,model=2", "shard": "fsdp"}, "only tp splits over"),
    ({"mesh": "data=32", "shard": "fsdp"}, "batch_size 16"),
    ({"mesh": "data=16", "batch_size": 32}, None),
    ({"mesh": "data=2", "processes": 4, "batch_size": 16}, "does not split over 4 processes"),
    ({"mesh": "data=4", "shard": "fsdp", "processes": 2}, None),  # tests/test_distributed.py
    ({"mesh": "data=4", "processes": 2}, None),
    ({"mesh": "model=2", "shard": "zero"}, "Unknown shard 'zero'"),
])
def test_config_errors_are_one_line(fields, message):
    if message is None:
        GPTConfig(**fields)
        return
    with pytest.raises(UserError, match=message) as e:
        GPTConfig(**fields)
    assert "\n" not in str(e.value) and e.value.field in ("mesh", "shard", "batch_size")


@pytest.mark.backends
def test_a_vocabulary_the_model_axis_does_not_divide_is_refused():
    config = GPTConfig(vocab_size=64, num_heads=4, hidden_dim=96, mesh="model=2", shard="tp")
    with pytest.raises(UserError, match="model=3 does not divide vocab_size=64"):
        sharding.check(config, {"data": 1, "model": 3})


@pytest.mark.backends
def test_more_devices_than_exist_and_another_backend_are_one_line():
    with pytest.raises(UserError, match="needs 8 devices; there are 2. Use a smaller mesh"):
        sharding.distribution("data=8", "fsdp", devices=["cpu:0", "cpu:1"])
    if keras.backend.backend() != "jax":
        with pytest.raises(UserError, match="runs on the jax backend"):
            with sharding.distribute(GPTConfig(mesh="data=2")):
                pass


def test_the_cli_says_it_in_one_line(capsys, tmp_path):
    assert main(["pretrain", "--shard", "tp", "--out", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("kmp: error: --shard: shard='tp' needs a mesh") and "\n" not in line
    assert main(["--devices", "0", "doctor"]) == 2
    assert "--devices must be >= 1" in capsys.readouterr().err


def test_devices_appends_to_xla_flags_and_sizes_the_client_before_jax_loads(monkeypatch):
    from kmp import cli

    given = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
             " --xla_cpu_collective_call_terminate_timeout_seconds=60"}
    wanted = {"XLA_FLAGS": "--xla_dump_to=/tmp/x "
              "--xla_cpu_collective_call_terminate_timeout_seconds=60 "
              "--xla_force_host_platform_device_count=8 "
              "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
              "--xla_cpu_multi_thread_eigen=false",
              "PJRT_NPROC": "16"}  # 2 threads per device: fewer deadlocked (simulate_devices)
    assert cli.device_environment(8, given) == wanted
    assert cli.device_environment(8, {**given, "PJRT_NPROC": "32"})["PJRT_NPROC"] == "32"
    assert cli.device_environment(8, {**given, "PJRT_NPROC": "4"})["PJRT_NPROC"] == "16"
    monkeypatch.setenv("XLA_FLAGS", given["XLA_FLAGS"])
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    if "jax" in sys.modules:  # too late in this process: said in one line
        with pytest.raises(UserError, match="JAX is already loaded"):
            cli.simulate_devices(8)
        return
    cli.simulate_devices(8)
    assert {k: os.environ[k] for k in wanted} == wanted


def test_state_bytes_count_each_variable_once():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.Adam(), "mse")
    model.optimizer.build(model.trainable_variables)
    scalars = sum(4 if "float32" in str(v.dtype) or "int32" in str(v.dtype) else 8
                  for v in model.optimizer.variables if len(v.shape) == 0)
    # 3 x 2 + 2 float32 weights and their two Adam moments, and the optimizer's counters
    assert sharding.state_bytes_per_device(model) == 3 * 32 + scalars


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX only")
@pytest.mark.parametrize("mesh, shard", [("data=2", "fsdp"), ("model=2", "tp")])
def test_two_device_sharded_steps_equal_one_device(mesh, shard):
    """On the two CPU devices conftest.py gives JAX: three AdamW steps of a float32 GPT sharded
    (fsdp, tp) take the losses of one device within 1e-4 relative."""
    import jax
    import numpy as np

    import kmp
    from kmp.gpt.model import build_model, lm_loss, make_optimizer

    config = preset("tiny", num_layers=1, seq_len=16, batch_size=4)
    x = np.random.default_rng(0).integers(0, config.vocab_size, (12, 17)).astype("int32")
    inputs = {"token_ids": x[:, :-1], "padding_mask": np.ones((12, 16), "int32")}

    def losses(distribution):
        keras.utils.clear_session()
        keras.distribution.set_distribution(distribution)
        seen = []
        try:
            keras.utils.set_random_seed(0)
            model = build_model(config)
            kmp.compile(model, make_optimizer(config, model), loss=lm_loss(), islands="island")
            record = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: seen.append(float(logs["batch_loss"])))
            model.fit(inputs, x[:, 1:], batch_size=4, epochs=1, shuffle=False, verbose=0,
                      callbacks=[record])
            split = {s.data.shape for s in model.trainable_weights[0].value.addressable_shards}
        finally:
            keras.distribution.set_distribution(None)
        return seen, split

    one, whole = losses(None)
    sharded, halves = losses(sharding.distribution(mesh, shard, jax.devices()[:2],
                                                   config=config))
    assert len(halves) == 1 and np.prod(next(iter(halves))) * 2 == np.prod(next(iter(whole)))
    assert len(one) == 3 and len(sharded) == 3
    for a, b in zip(one, sharded):
        assert _close(a, b), (shard, one, sharded)


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution: JAX only")
def test_an_overflow_in_one_of_two_shards_skips_the_global_step():
    """On the two CPU devices conftest.py gives JAX, fsdp over data=2 under mixed_float16: an
    inf in the first batch's rows of data shard 1 only skips the whole step (no weight moves,
    on either device), and the next step applies."""
    import jax
    import numpy as np

    import kmp
    from kmp.gpt.model import build_model, lm_loss

    keras.config.set_dtype_policy("mixed_float16")
    config = preset("tiny", num_layers=1, seq_len=16, batch_size=4)
    x = np.random.default_rng(0).integers(0, config.vocab_size, (8, 17)).astype("int32")
    inputs = {"token_ids": x[:, :-1], "padding_mask": np.ones((8, 16), "int32")}
    weights = np.ones((8, 16), "float32")
    weights[2:4] = np.inf  # batch 1 is rows 0-3: rows 2-3 are device 1's
    keras.distribution.set_distribution(sharding.distribution("data=2", "fsdp", jax.devices()[:2],
                                                              config=config))
    try:
        keras.utils.set_random_seed(0)
        model = build_model(config)
        kmp.compile(model, keras.optimizers.AdamW(1e-3), loss=lm_loss(), islands="island")

        def values():
            return [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]

        seen = [values()]
        for rows in (slice(0, 4), slice(4, 8)):  # one step each: the weights after each
            model.fit({k: v[rows] for k, v in inputs.items()}, x[rows, 1:],
                      sample_weight=weights[rows], batch_size=4, epochs=1, verbose=0)
            seen.append(values())
        split = {len(w.value.addressable_shards) for w in model.trainable_weights}
        state = model.optimizer.state()
        iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    finally:
        keras.distribution.set_distribution(None)
    assert split == {2}  # every weight really is split over both devices
    assert all(np.array_equal(a, b) for a, b in zip(seen[0], seen[1]))  # step 1: skipped
    assert any(not np.array_equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 2: applied
    assert state["skipped_steps"] == 1 and iterations == 1, (state, iterations)
