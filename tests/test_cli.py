import subprocess
import sys
from pathlib import Path

from kmp.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "kmp.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_doctor_prints_hardware_plans_and_recommendation():
    out = run("doctor")
    assert out.returncode == 0, out.stderr
    for needle in ("hardware: CPU", "float32", "mixed_float16", "mixed_bfloat16",
                   "recommendation:"):
        assert needle in out.stdout


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
        assert r["median_step_ms"] > 0 and r["tokens_per_sec"] > 0 and r["final_loss"] > 0
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
