import warnings

import keras
import pytest

import kmp
from kmp.hardware import Hardware, detect

GPU80 = Hardware("gpu", "A100", (8, 0))
GPU90 = Hardware("gpu", "H100", (9, 0))
GPU70 = Hardware("gpu", "V100", (7, 0))
GPU61 = Hardware("gpu", "P100", (6, 1))
TPU = Hardware("tpu", "TPU")
CPU_BF16 = Hardware("cpu", "EPYC", count=2, cpu_flags=("avx512_bf16",))
CPU_AMX = Hardware("cpu", "Xeon", count=2, cpu_flags=("amx_bf16",))
CPU = Hardware("cpu", "old", count=2)


@pytest.mark.parametrize(
    "hw, policy, jit",
    [
        (GPU90, "mixed_bfloat16", True),
        (GPU80, "mixed_bfloat16", True),
        (GPU70, "mixed_float16", True),
        (GPU61, "float32", True),
        (TPU, "mixed_bfloat16", True),
        (CPU_BF16, "mixed_bfloat16", False),
        (CPU_AMX, "mixed_bfloat16", False),
        (CPU, "float32", True),
    ],
)
def test_auto_decides_from_hardware(hw, policy, jit):
    p = kmp.plan("auto", hw)
    assert (p.policy, p.jit_compile) == (policy, jit)
    assert p.loss_scaling == (policy == "mixed_float16")
    assert p.reason and p.warning is None and p.device == hw.describe()


@pytest.mark.parametrize(
    "name, hw, needle",
    [
        ("mixed_float16", CPU_BF16, "barely faster than float32"),
        ("mixed_bfloat16", GPU70, "no bfloat16 Tensor Cores"),
        ("mixed_bfloat16", CPU, "no AVX512_BF16 or AMX"),
        ("mixed_float16", GPU61, "no Tensor Cores"),
        ("mixed_float16", TPU, "no float16 units"),
    ],
)
def test_slow_explicit_choice_is_honoured_with_a_warning(name, hw, needle):
    with pytest.warns(UserWarning, match=needle):
        p = kmp.set_policy(name, hw)
    assert p.policy == name and keras.config.dtype_policy().name == name


def test_fitting_explicit_choice_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kmp.set_policy("mixed_float16", GPU70).loss_scaling
        assert not kmp.set_policy("mixed_bfloat16", GPU80).loss_scaling
        assert not kmp.set_policy("float32", CPU).loss_scaling


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown precision 'mixed_fp16'. Use one of: auto, "
                                         "float32, mixed_float16, mixed_bfloat16."):
        kmp.set_policy("mixed_fp16")


def test_set_policy_auto_on_this_machine_sets_keras_policy():
    p = kmp.set_policy("auto")
    assert keras.config.dtype_policy().name == p.policy
    assert p.compute_dtype == keras.config.dtype_policy().compute_dtype
    assert p.policy in str(p) and p.reason in str(p)


def test_detect_reads_this_machine(monkeypatch):
    hw = detect()
    assert hw.kind == "cpu" and hw.count >= 1 and hw.describe().startswith("CPU:")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert hw.cpu_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("spec, kind, cc, bf16", [
    ("gpu:7.5", "gpu", (7, 5), False), ("tpu", "tpu", None, False),
    ("cpu:bf16", "cpu", None, True), ("cpu", "cpu", None, False),
])
def test_fake_hardware_override(monkeypatch, spec, kind, cc, bf16):
    monkeypatch.setenv("KMP_FAKE_HARDWARE", spec)
    detect.cache_clear()
    try:
        hw = detect()
        assert (hw.kind, hw.compute_capability, hw.cpu_bf16) == (kind, cc, bf16)
    finally:
        monkeypatch.delenv("KMP_FAKE_HARDWARE")
        detect.cache_clear()


def test_bad_fake_hardware_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KMP_FAKE_HARDWARE", "fpga")
    detect.cache_clear()
    try:
        with pytest.raises(ValueError, match="Unknown KMP_FAKE_HARDWARE='fpga'"):
            detect()
    finally:
        monkeypatch.delenv("KMP_FAKE_HARDWARE")
        detect.cache_clear()
