import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmp import cli
from kmp.cli import main


def run(*args, env=None):
    env = {**os.environ, **(env or {})}
    env.pop("KERAS_BACKEND", None)  # the command's own default or --backend decides
    return subprocess.run([sys.executable, "-m", "kmp.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_doctor_prints_hardware_plans_and_recommendation():
    out = run("doctor", env={"KMP_FAKE_HARDWARE": "cpu:bf16"})
    assert out.returncode == 0, out.stderr
    for needle in ("hardware: CPU: fake CPU", "float32", "mixed_float16", "mixed_bfloat16",
                   "recommendation: mixed_bfloat16", "backend tensorflow"):
        assert needle in out.stdout
    assert out.stderr == ""  # TensorFlow's start-up lines are kept out of a user's way


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_option_picks_the_keras_backend(backend):
    out = run("--backend", backend, "doctor")
    assert out.returncode == 0, out.stderr
    assert f"backend {backend}" in out.stdout and f"{backend} " in out.stdout


NO_TENSORFLOW = """
import sys
import numpy as np
import kmp, keras
kmp.set_policy("mixed_float16")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
kmp.compile(model, "sgd", "mse")
x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
model.fit(x, x[:, :1], batch_size=8, verbose=0, callbacks=[kmp.PrecisionMonitor()])
print("tensorflow" in sys.modules, keras.backend.backend())
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_kmp_does_not_import_tensorflow_on_other_backends(backend):
    out = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "KERAS_BACKEND": backend})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", backend]


# A Python where `import tensorflow` fails, as in an environment without it (the GPU machine).
WITHOUT_TENSORFLOW = """
import runpy, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = ["kmp", *sys.argv[1:]]
runpy.run_module("kmp.cli", run_name="__main__")
"""


def test_pretrain_runs_on_jax_without_tensorflow_installed(tmp_path):
    data = Path(__file__).parent / "data"
    args = ["--backend", "jax", "pretrain", "--corpus", str(data / "corpus.txt"),
            "--vocab-size", "512", "--seq-len", "32", "--batch-size", "8", "--num-layers", "1",
            "--num-heads", "2", "--hidden-dim", "32", "--intermediate-dim", "64", "--steps",
            "4", "--val-every", "2", "--val-batches", "1", "--samples", "1", "--precision",
            "mixed_float16", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["final_loss_scale"] > 0
    assert "backend jax" in out.stdout
    assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "samples.txt").read_text().startswith("def")


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    assert main(["pretrain", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "kmp: error: --steps: steps must be a positive integer. Received: steps=0\n"

    def broken(args, rest):
        raise ValueError("an internal mistake, not the user's")

    monkeypatch.setattr(cli, "_memory", broken)
    with pytest.raises(ValueError, match="internal mistake"):
        main(["memory"])
    assert "this is a bug in kmp" in capsys.readouterr().err


def _help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_each_command_offers_only_the_options_it_uses(capsys):
    bench = _help("bench", capsys)
    assert "--policies" in bench and "--hidden-dim" in bench and "--backends" in bench
    for unused in ("--prompt", "--samples", "--resume", "--val-every", "--strategy"):
        assert unused not in bench, unused
    memory = _help("memory", capsys)
    assert "--measure" in memory and "--learning-rate" not in memory
    pretrain = _help("pretrain", capsys)
    assert "--resume" in pretrain and "--prompt" in pretrain


def test_unknown_command_exits_2():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


BENCH = ["--corpus", str(Path(__file__).parent / "data" / "corpus.txt"), "--vocab-size", "512",
         "--seq-len", "16", "--batch-size", "4", "--num-layers", "1", "--num-heads", "2",
         "--hidden-dim", "16", "--intermediate-dim", "32", "--chunk", "2", "--repeats", "2",
         "--warmup", "1"]


def test_bench_runs_every_policy_and_writes_reports(tmp_path, capsys):
    import json

    rc = main(["bench", *BENCH, "--policies", "float32,mixed_bfloat16,auto", "--xla", "off",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"float32, XLA off", "mixed_bfloat16, XLA off"} | {
        name for name in runs if name.startswith("auto = ")}
    assert runs["float32, XLA off"]["ratio"] == 1.0
    for r in runs.values():
        assert r["median_step_ms"] > 0 and r["tokens_per_sec"] > 0
        assert 0 < r["final_loss"] < r["first_loss"]  # real training steps
    assert "| run | median step (ms) |" in (tmp_path / "bench.md").read_text()
    assert main(["bench", "--xla", "maybe"]) == 2
    assert "Unknown --xla setting 'maybe'" in capsys.readouterr().err


def test_bench_overhead_compares_plain_keras_with_the_kmp_path(tmp_path):
    import json

    rc = main(["bench", *BENCH, "--overhead", "mixed_float16", "--cache-dir",
               str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "overhead.json").read_text())["runs"]
    assert [r["run"].split(":")[0] for r in runs] == ["plain Keras", "kmp"]
    assert runs[0]["ratio"] == 1.0 and runs[1]["ratio"] > 0
    assert "vs plain Keras" in (tmp_path / "overhead.md").read_text()


def test_bench_takes_turns_between_backends(tmp_path, capsys):
    """--backends runs one setting per Keras backend, each in its own process, and compares."""
    args = ["bench", *BENCH, "--backends", "jax:float32:on,torch:float32:off", "--rounds", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "backends.json").read_text())
    assert [r["backend"] for r in rows] == ["jax", "torch"] and rows[0]["ratio"] == 1.0
    assert all(len(r["tokens_per_sec"]) == 1 and r["median_tokens_per_sec"] > 0 for r in rows)
    assert "| jax: float32, XLA on |" in capsys.readouterr().out
    assert main(["bench", "--backends", "numpy"]) == 2
    assert "Unknown backend run 'numpy'" in capsys.readouterr().err
