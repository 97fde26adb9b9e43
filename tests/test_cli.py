import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kmp import cli
from kmp.cli import main


def run(*args, env=None):
    # The command's own default or --backend decides, not this machine's ~/.keras/keras.json.
    env = {**os.environ, "KERAS_HOME": tempfile.mkdtemp(), **(env or {})}
    env.pop("KERAS_BACKEND", None)
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


def test_without_backend_option_kmp_follows_keras_own_setting(tmp_path, monkeypatch):
    """$KERAS_BACKEND, else keras.json's "backend" ($KERAS_HOME, else ~/.keras), else
    tensorflow: what Keras itself would pick."""
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    (home / ".keras" / "keras.json").write_text('{"backend": "torch"}')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert cli.backend_setting() == ("torch", str(home / ".keras" / "keras.json"))
    (tmp_path / "keras.json").write_text('{"backend": "jax", "floatx": "float32"}')
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert cli.backend_setting() == ("jax", str(tmp_path / "keras.json"))
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert cli.backend_setting() == ("torch", "$KERAS_BACKEND")
    assert cli.backend_setting("tensorflow") == ("tensorflow", "--backend")
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    assert cli.backend_setting() == ("tensorflow", "the default")

    out = run("doctor", env={"KERAS_HOME": str(tmp_path)})  # keras.json says jax
    assert out.returncode == 0, out.stderr
    assert "backend jax" in out.stdout


def test_a_backend_kmp_cannot_run_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "keras.json").write_text('{"backend": "numpy"}')
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.delitem(sys.modules, "keras")  # as in a fresh process: nothing chosen yet
    with pytest.raises(cli.UserError, match=r"Unknown Keras backend 'numpy' \(from .*keras"
                       r"\.json\)\. kmp runs on tensorflow, jax, torch"):
        cli._set_backend(["memory"])


@pytest.mark.parametrize("backend, says", [("jax", 'needs JAX: pip install "kmp[jax]"'),
                                           ("torch", 'needs PyTorch: pip install "kmp[torch]"')])
def test_a_backend_that_is_not_installed_says_how_to_install_it(backend, says, monkeypatch,
                                                                capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == backend else real(name, *a))
    assert main(["--backend", backend, "doctor"]) == 2
    assert capsys.readouterr().err == f"kmp: error: the {backend} backend {says}\n"


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


ONEDNN = """
import kmp, kmp.cli, tensorflow
from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own answer (private API)
print(_pywrap_util_port.IsMklEnabled())
kmp.cli.main(["doctor"])
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="TensorFlow's oneDNN default is a question of x86 CPUs")
@pytest.mark.parametrize("setting", [None, "0"])
def test_tensorflow_runs_its_onednn_kernels_unless_told_not_to(setting):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_ENABLE_ONEDNN_OPTS", "KMP_ONEDNN_SET")}  # as a fresh shell has it
    out = subprocess.run([sys.executable, "-c", ONEDNN], capture_output=True, text=True,
                         timeout=300, env={**env, "KERAS_BACKEND": "tensorflow",
                                           **({"TF_ENABLE_ONEDNN_OPTS": setting} if setting
                                              else {})})
    assert out.returncode == 0, out.stderr[-3000:]
    enabled, doctor = out.stdout.split("\n", 1)
    assert enabled == ("False" if setting == "0" else "True")
    assert ("oneDNN kernels: off (TF_ENABLE_ONEDNN_OPTS=0)" if setting
            else "oneDNN kernels: on (set by kmp: ") in doctor


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_kmp_does_not_import_tensorflow_on_other_backends(backend):
    out = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "KERAS_BACKEND": backend})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["False", backend]


JAX_PROGRAM = """
import kmp, jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.arange(64.0).reshape(8, 8)).sum()))
"""


def test_jax_programs_compile_once_across_processes(tmp_path):
    pytest.importorskip("jax")
    env = {**os.environ, "KMP_CACHE_DIR": str(tmp_path), "JAX_LOG_COMPILES": "1",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # kept however quick to compile
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own, set by its `import kmp`

    def child(**extra):
        out = subprocess.run([sys.executable, "-c", JAX_PROGRAM], capture_output=True,
                             text=True, timeout=300, env={**env, **extra})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip(), "compilation cache hit for 'jit__lambda'" in out.stderr

    first, hit = child()
    assert not hit and list((tmp_path / "jax").glob("jit_*-cache"))  # compiled and kept
    assert child() == (first, True)  # the next process loads it: the same result
    assert child(JAX_ENABLE_COMPILATION_CACHE="false") == (first, False)  # the user's off switch


PLAN_WITHOUT_A_BACKEND = """
import sys
from kmp.cli import main
assert main(["plan", "--params", "1b", "--device", "rtx4070-8gb", "--check", "none"]) == 1  # no fit
assert main(["memory", "--preset", "small"]) == 0
print(sorted(m for m in ("tensorflow", "keras_hub", "keras", "jax", "torch") if m in sys.modules))
"""


def test_plan_and_the_memory_estimate_load_no_backend():
    """Arithmetic on a config: no TensorFlow (the default backend), keras-hub or keras."""
    out = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_A_BACKEND], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "does not fit" in out.stdout and "| float32 |" in out.stdout
    assert out.stdout.splitlines()[-1] == "[]"
    assert not cli._estimate_only("memory", ["--preset", "tiny", "--measure", "gpu"])
    assert not cli._estimate_only("memory", ["--measure=gpu"])
    assert cli._estimate_only("memory", ["--measure", "compile"])


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

    def broken(argv):
        raise ValueError("an internal mistake, not the user's")

    monkeypatch.setattr("kmp.gpt.memory.main", broken)
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

    from kmp import backends
    from kmp.hardware import cpu_ticks

    rc = main(["bench", *BENCH, "--policies", "float32,mixed_bfloat16,auto", "--xla", "off",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"float32, XLA off", "mixed_bfloat16, XLA off"} | {
        name for name in runs if name.startswith("auto = ")}
    tokens = report["config"]["batch_size"] * report["config"]["seq_len"]
    for r in runs.values():
        # Each figure follows from the per-chunk step times recorded beside it.
        assert len(r["step_ms"]) == 2  # --repeats
        assert r["median_step_ms"] == pytest.approx(statistics.median(r["step_ms"]))
        assert r["tokens_per_sec"] == pytest.approx(tokens * 1000 / r["median_step_ms"])
        # float32 with the same XLA setting (auto's own run, where auto chose float32 with
        # XLA on, as on a CPU without bf16: 1.00x itself)
        base = next((b for b in runs.values() if b["policy"] == "float32"
                     and b["xla"] == r["xla"]), None)
        if base is None:  # auto chose bf16 with XLA on: no float32 run to compare with
            assert r["ratio"] is None
        else:
            assert r["ratio"] == pytest.approx(base["median_step_ms"] / r["median_step_ms"])
        assert 0 < r["final_loss"] < r["first_loss"]  # real training steps
        # the hypervisor's share of the machine's CPU time during the run's timed steps
        assert r["cpu_steal"] is None if cpu_ticks() is None else 0 <= r["cpu_steal"] <= 1
        if backends.gpu_memory() is None:  # a CPU has no per-run peak to give: none is shown
            assert r["peak_memory_mib"] is None
            assert r["memory_kind"].startswith("not measured on CPU")
    md = (tmp_path / "bench.md").read_text()
    assert "| run | median step (ms) |" in md
    assert "final losses agree with float32's within 2%" in md
    assert ("Hypervisor steal during the timed steps" in md or "warning: the hypervisor took" in md
            or cpu_ticks() is None)
    assert main(["bench", "--xla", "maybe"]) == 2
    assert "Unknown --xla setting 'maybe'" in capsys.readouterr().err


def test_bench_overhead_compares_plain_keras_with_the_kmp_path(tmp_path):
    import json

    rc = main(["bench", *BENCH, "--overhead", "mixed_float16", "--cache-dir",
               str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert rc == 0
    runs = json.loads((tmp_path / "overhead.json").read_text())["runs"]
    assert [r["run"].split(":")[0] for r in runs] == ["plain Keras", "kmp"]
    keras_ms, kmp_ms = (statistics.median(r["step_ms"]) for r in runs)
    assert runs[1]["ratio"] == pytest.approx(keras_ms / kmp_ms)  # kmp's tokens/s over Keras's
    md = (tmp_path / "overhead.md").read_text()
    assert "vs plain Keras" in md
    # No float32 run here: the losses are checked against plain Keras's, and it says so.
    assert "final losses agree with plain Keras's within 2%" in md and "float32" not in md


def test_bench_takes_turns_between_backends(tmp_path, capsys):
    """--backends runs one setting per Keras backend, each in its own process, and compares."""
    args = ["bench", *BENCH, "--backends", "jax:float32:on,torch:float32:off", "--rounds", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "backends.json").read_text())
    assert [r["backend"] for r in rows] == ["jax", "torch"]
    for row in rows:  # each figure is the turn's own bench.json, and the ratio its median's
        turn = json.loads((tmp_path / f"turn-0-{row['backend']}" / "bench.json").read_text())
        assert row["tokens_per_sec"] == [turn["runs"][0]["tokens_per_sec"]]
        assert row["median_tokens_per_sec"] == statistics.median(row["tokens_per_sec"])
        assert row["ratio"] == pytest.approx(row["median_tokens_per_sec"]
                                             / rows[0]["median_tokens_per_sec"])
    assert "| jax: float32, XLA on |" in capsys.readouterr().out
    assert main(["bench", "--backends", "numpy"]) == 2
    assert "Unknown backend run 'numpy'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["chunk", "repeats", "warmup", "rounds"])
def test_bench_counts_must_be_positive(name, tmp_path, capsys):
    assert main(["bench", f"--{name}", "0", "--backends", "jax", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"kmp: error: --{name}: {name} must be a positive "
                                       f"integer. Received: {name}=0\n")


def test_bench_loss_line_says_what_it_compared_with():
    from kmp.gpt.bench import Run, loss_summary

    def ran(policy, final, path="kmp"):
        return Run(f"{policy} ({path})", policy, False, path=path, first_loss=5.0,
                   final_loss=final)

    alone = loss_summary([ran("mixed_bfloat16", 4.0), ran("mixed_float16", 4.01)])
    assert "float32's" not in alone and "no float32 or plain Keras run" in alone
    assert "agree with float32's within 2%" in loss_summary([ran("float32", 4.0),
                                                              ran("mixed_bfloat16", 4.05)])
    off = loss_summary([ran("float32", 4.0), ran("mixed_bfloat16", 4.5), ran("float32", 3.0,
                                                                             "torch")])
    assert off == ("warning: mixed_bfloat16 (kmp): final loss 4.5000 is 12.5% from float32's "
                   "4.0000 (tolerance 2%)")  # the peer is not a reference


def test_bench_warns_when_the_hypervisor_took_the_cpu(tmp_path):
    from kmp.gpt.bench import Run, steal_summary
    from kmp.hardware import cpu_ticks

    runs = [Run("quiet", "float32", False, steal=0.03), Run("noisy", "float32", True, steal=0.21)]
    assert steal_summary(runs).startswith("warning: the hypervisor took 21% of the CPU time "
                                          "during the timed steps of noisy")
    assert steal_summary(runs[:1]) == ("Hypervisor steal during the timed steps: at most 3.0% "
                                       "of the CPU time in any run.")
    assert steal_summary([Run("elsewhere", "float32", False)]) == ""  # not known: no line
    # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  600 5 100 2000 7 0 3 85 40 0\ncpu0 300 2 50 1000 3 0 1 40 20 0\n")
    assert cpu_ticks(str(stat)) == (85, 2800)  # guest time is counted inside user already
    stat.write_text("intr 1 2 3\n")
    assert cpu_ticks(str(stat)) is None
    assert cpu_ticks(str(tmp_path / "absent")) is None


def test_diagnosis_of_a_trained_run(micro_run, capsys):
    """A run is diagnosed under the policy it trained with, or the --precision asked for."""
    assert main(["audit", "--run", str(micro_run)]) == 0
    assert f"kmp audit: {micro_run} (trained), mixed_bfloat16, 2 layers" in capsys.readouterr().out
    assert main(["audit", "--run", str(micro_run), "--precision", "mixed_float16"]) == 0
    out = capsys.readouterr().out
    assert f"kmp audit: {micro_run} (trained), mixed_float16, 2 layers" in out
    assert main(["audit", "--run", str(micro_run), "--seq-len", "100000"]) == 2
    assert capsys.readouterr().err.startswith("kmp: error: --seq-len: 100000 is longer than "
                                              "the model's maximum")
