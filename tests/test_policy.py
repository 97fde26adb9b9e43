import warnings

import keras
import pytest

import kmp
from kmp import backends
from kmp.hardware import PEAK_TFLOPS, Hardware, detect, gpu_model, peak_flops

pytestmark = pytest.mark.backends
# The XLA setting the plan gives: the hardware's choice on TensorFlow, always on under JAX,
# off under torch (eager, Keras's default).
BACKEND_JIT = {"jax": True, "torch": False}.get(keras.backend.backend())

GPU80 = Hardware("gpu", "A100", (8, 0))
GPU90 = Hardware("gpu", "H100", (9, 0))
GPU70 = Hardware("gpu", "V100", (7, 0))
GPU61 = Hardware("gpu", "P100", (6, 1))
TPU = Hardware("tpu", "TPU")
CPU_BF16 = Hardware("cpu", "EPYC", count=2, cpu_flags=("avx512_bf16",))
CPU_AMX = Hardware("cpu", "Xeon", count=2, cpu_flags=("amx_bf16",))
CPU = Hardware("cpu", "old", count=2)


@pytest.fixture(autouse=True)
def _own_decisions_cache(tmp_path, monkeypatch):
    """No `kmp tune` measurement cached by whoever ran kmp on this machine decides here."""
    monkeypatch.setenv("KMP_CACHE_DIR", str(tmp_path / "kmp-cache"))


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
    assert (p.policy, p.jit_compile) == (policy, jit if BACKEND_JIT is None else BACKEND_JIT)
    assert p.loss_scaling == (policy == "mixed_float16")
    assert p.reason and p.warning is None and p.device == hw.describe()


@pytest.mark.parametrize("hw, flags", [
    (Hardware("cpu", "AMD EPYC 9R14", count=2, cpu_flags=("avx512_bf16",)), "AVX512_BF16"),
    (Hardware("cpu", "Intel Xeon", count=2, cpu_flags=("amx_bf16",)), "AMX_BF16"),
    (Hardware("cpu", "Intel Xeon", count=2, cpu_flags=("avx512_bf16", "amx_bf16")),
     "AVX512_BF16 and AMX_BF16"),
])
def test_cpu_reason_names_this_cpus_flags_and_where_figures_were_measured(hw, flags):
    """The reason names the bf16 flags this CPU has (no others), and the benchmark figures it
    quotes say which machines they were measured on."""
    reason = kmp.plan("auto", hw).reason
    own, _, cited = reason.partition(";")
    assert own == f"this CPU ({hw.name}) has {flags} (native bfloat16)"
    assert "measured on" in cited and "docs/benchmarks.md" in cited
    assert "measured on" in kmp.plan("mixed_float16", hw).warning


@pytest.mark.parametrize(
    "name, hw, needle",
    [
        ("mixed_float16", CPU_BF16, "no faster than float32"),
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


def test_detect_agrees_with_the_backend_and_cpuinfo():
    """Whatever this machine is: detect() reports what the active backend sees, and the CPU's
    bf16 flags as /proc/cpuinfo lists them."""
    detect.cache_clear()
    hw = detect()
    found = backends.accelerator()
    assert hw.kind == (found["kind"] if found else "cpu") and hw.count >= 1
    assert hw.describe().startswith({"cpu": "CPU:", "gpu": "GPU:", "tpu": "TPU:"}[hw.kind])
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert hw.cpu_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("spec, kind, cc, bf16", [
    ("gpu:7.5", "gpu", (7, 5), False), ("tpu", "tpu", None, False),
    ("cpu:bf16", "cpu", None, True), ("cpu", "cpu", None, False),
])
def test_fake_hardware_override(fake_hardware, spec, kind, cc, bf16):
    hw = fake_hardware(spec)
    assert (hw.kind, hw.compute_capability, hw.cpu_bf16) == (kind, cc, bf16)


def test_bad_fake_hardware_is_a_clear_error(fake_hardware):
    with pytest.raises(ValueError, match="Unknown KMP_FAKE_HARDWARE='fpga'"):
        fake_hardware("fpga")


# Names as the drivers report them (nvidia-smi / cudaGetDeviceProperties), with the dense
# 16-bit peak each must get (TFLOP/s; None: unknown, never another GPU's figure).
GPU_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", 125.0),
    ("Tesla V100-PCIE-32GB", 112.0), ("Tesla T4", 65.0), ("NVIDIA GeForce RTX 4090", None),
]


@pytest.mark.parametrize("name, half", GPU_NAMES)
def test_peak_flops_matches_whole_model_names(name, half):
    got = peak_flops(Hardware("gpu", name, (9, 0)), "float16")
    assert got == (half * 1e12 if half else None)
    model, _ = gpu_model(name)
    assert model is None or model in name.upper().replace("-", " ").split()


def test_peak_flops_float32_and_bfloat16():
    h100 = Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    assert peak_flops(h100, "float32", tf32=True) == 495e12
    assert peak_flops(h100, "bfloat16") == 989e12
    assert peak_flops(Hardware("gpu", "Tesla V100-SXM2-16GB", (7, 0)), "bfloat16") is None
    assert peak_flops(Hardware("cpu", "Xeon"), "bfloat16") is None
    assert set(PEAK_TFLOPS) >= {"H100", "H200", "GH200", "A100", "L4", "L40S", "A10", "V100",
                                "T4"}



def test_float32_peak_is_tf32_only_where_float32_matmuls_use_it():
    h100 = Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    a100 = Hardware("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert peak_flops(h100, "float32", tf32=True) == 495e12
    assert peak_flops(h100, "float32", tf32=False) == 67e12
    assert peak_flops(a100, "float32", tf32=False) == 19.5e12
    # No TF32 before Ampere, whatever the backend would allow.
    v100 = Hardware("gpu", "Tesla V100-SXM2-16GB", (7, 0))
    assert peak_flops(v100, "float32", tf32=True) == 15.7e12
    assert peak_flops(h100, "bfloat16", tf32=False) == 989e12


@pytest.fixture
def tf32_switch():
    """Sets the active backend's float32-matmul TF32 setting (True/False) and restores it."""
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        get = tf.config.experimental.tensor_float_32_execution_enabled
        put = tf.config.experimental.enable_tensor_float_32_execution
    elif name == "jax":
        import jax

        def get():
            return jax.config.jax_default_matmul_precision

        def put(on):
            value = on if on is None or isinstance(on, str) else (None if on else "highest")
            jax.config.update("jax_default_matmul_precision", value)
    else:
        import torch

        def get():
            return torch.get_float32_matmul_precision()

        def put(on):
            value = on if isinstance(on, str) else ("high" if on else "highest")
            torch.set_float32_matmul_precision(value)
    before = get()
    yield put
    put(before)


def test_float32_peak_follows_the_backends_tf32_setting(tf32_switch):
    """TensorFlow and JAX use TF32 for float32 matmuls by default, torch does not (its
    default matmul precision is "highest"); the float32 peak follows each backend's switch."""
    h100 = Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    by_default = keras.backend.backend() != "torch"
    assert backends.float32_matmuls_use_tf32() is by_default
    assert peak_flops(h100, "float32") == (495e12 if by_default else 67e12)
    tf32_switch(not by_default)
    assert backends.float32_matmuls_use_tf32() is (not by_default)
    assert peak_flops(h100, "float32") == (67e12 if by_default else 495e12)


@pytest.mark.gpu
def test_auto_trains_on_this_gpu():
    """On an NVIDIA GPU: auto picks a mixed policy and a small model trains there."""
    import numpy as np

    detect.cache_clear()
    plan = kmp.set_policy("auto")
    assert plan.policy in ("mixed_float16", "mixed_bfloat16") and detect().kind == "gpu"
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64), keras.layers.Dense(1)])
    kmp.compile(model, "adam", "mse")
    x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    loss = model.fit(x, x[:, :1], batch_size=64, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]


def test_auto_says_whether_the_rule_table_or_a_measurement_decided():
    from kmp import decisions

    assert kmp.plan("auto", CPU_AMX).decided_by == "rule table"
    assert kmp.plan("mixed_bfloat16", CPU_AMX).decided_by == "request"
    tuned = {"policy": "float32", "jit_compile": True, "attention": "island",
             "reason": "float32 was fastest (kmp tune)", "table": "", "seconds": 1.0}
    decisions.record(decisions.key("precision", CPU_AMX, model="any"), tuned)
    p = kmp.plan("auto", CPU_AMX)
    assert (p.policy, p.jit_compile, p.attention) == ("float32", True, "island")
    assert p.decided_by == "cached measurement" and "by cached measurement" in str(p)
    assert kmp.plan("auto", CPU_BF16).decided_by == "rule table"  # another machine
    assert kmp.plan("mixed_bfloat16", CPU_AMX).policy == "mixed_bfloat16"  # requests win


def test_auto_with_a_tuning_result_uses_it_and_measure_and_data_must_fit():
    class Result:
        policy, jit_compile, attention, source = "mixed_float16", False, "fused", "measured"
        reason = "fp16 fastest"

    p = kmp.set_policy("auto", CPU_AMX, measure=Result())
    assert (p.policy, p.loss_scaling, p.decided_by) == ("mixed_float16", True, "measurement")
    assert keras.config.dtype_policy().name == "mixed_float16"
    # A function returning a result, as before data= (a model function without data: an error).
    assert kmp.plan("auto", CPU_AMX, measure=lambda: Result()).policy == "mixed_float16"
    with pytest.raises(kmp.UserError, match=r"needs data=\(x, y\)"):
        kmp.plan("auto", CPU_AMX, measure=lambda: None)
    with pytest.raises(kmp.UserError, match="data= goes with measure=model_fn"):
        kmp.plan("auto", CPU_AMX, measure=Result(), data=([0], [0]))
    with pytest.raises(kmp.UserError, match="measure= takes a function"):
        kmp.plan("auto", CPU_AMX, measure="small")


def test_pointless_candidates_follow_the_rules():
    from kmp.policy import pointless

    assert "float16" in pointless("mixed_float16", False, CPU_AMX)  # emulated or no faster
    assert "emulated" in pointless("mixed_bfloat16", False, CPU)
    assert pointless("mixed_bfloat16", False, CPU_AMX) is None
    assert pointless("mixed_float16", True, GPU80) is None  # a GPU: measure everything
    xla_bf16 = pointless("mixed_bfloat16", True, CPU_AMX)  # only TensorFlow's XLA
    assert (xla_bf16 is not None) == (backends.name() == "tensorflow")
