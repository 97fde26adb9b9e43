import subprocess
import sys


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
