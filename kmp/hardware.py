"""What this machine can do for mixed precision: GPU compute capability, TPU, CPU bf16 flags."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

# CPU flags (as /proc/cpuinfo spells them) that give native bfloat16 arithmetic.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What `detect()` found.

    Args:
        kind: str. "gpu", "tpu" or "cpu": the accelerator training would run on.
        name: str. Human-readable device name, e.g. "NVIDIA H100 80GB HBM3" or the CPU model.
        compute_capability: tuple or None. (major, minor) of the first NVIDIA GPU.
        count: int. Number of devices of `kind` (CPU: logical cores).
        cpu_flags: tuple of str. The bf16-related CPU flags present (see `CPU_BF16_FLAGS`).
    """

    kind: str
    name: str
    compute_capability: tuple | None = None
    count: int = 1
    cpu_flags: tuple = ()

    @property
    def cpu_bf16(self) -> bool:
        """True when the CPU has native bfloat16 instructions (AVX512_BF16 or AMX)."""
        return bool(self.cpu_flags)

    def describe(self) -> str:
        """One line such as 'GPU: NVIDIA A100 (compute capability 8.0) x1'."""
        if self.kind == "gpu":
            cc = self.compute_capability
            cc_text = f" (compute capability {cc[0]}.{cc[1]})" if cc else ""
            return f"GPU: {self.name}{cc_text} x{self.count}"
        if self.kind == "tpu":
            return f"TPU: {self.name} x{self.count}"
        flags = ", ".join(self.cpu_flags) if self.cpu_flags else "no native bf16"
        return f"CPU: {self.name}, {self.count} cores ({flags})"


def _cpu_info() -> tuple[str, tuple]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return name, tuple(f for f in CPU_BF16_FLAGS if f in flags)


def _gpu_info():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return Hardware(
        kind="gpu",
        name=details.get("device_name", gpus[0].name),
        compute_capability=details.get("compute_capability"),
        count=len(gpus),
    )


def _tpu_info():
    import tensorflow as tf

    tpus = tf.config.list_logical_devices("TPU")
    return Hardware(kind="tpu", name="TPU", count=len(tpus)) if tpus else None


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """Probes the machine once and returns what training would run on.

    Order: NVIDIA GPU, then TPU, then CPU. `KMP_FAKE_HARDWARE` (e.g. "gpu:8.0", "gpu:7.0",
    "tpu", "cpu", "cpu:bf16") overrides the probe, for tests and for planning another machine.

    Returns:
        A `Hardware`.

    Example:
    >>> hw = detect()
    >>> hw.kind in ("cpu", "gpu", "tpu")
    True
    """
    fake = os.environ.get("KMP_FAKE_HARDWARE")
    if fake:
        return _fake(fake)
    cpu_name, cpu_flags = _cpu_info()
    for probe in (_gpu_info, _tpu_info):
        found = probe()
        if found is not None:
            return dataclasses.replace(found, cpu_flags=cpu_flags)
    return Hardware(kind="cpu", name=cpu_name, count=os.cpu_count() or 1, cpu_flags=cpu_flags)


def _fake(spec: str) -> Hardware:
    kind, _, arg = spec.partition(":")
    if kind == "gpu":
        major, _, minor = (arg or "8.0").partition(".")
        return Hardware("gpu", f"fake GPU sm_{major}{minor or 0}", (int(major), int(minor or 0)))
    if kind == "tpu":
        return Hardware("tpu", "fake TPU")
    if kind == "cpu":
        flags = ("avx512_bf16",) if arg == "bf16" else ()
        return Hardware("cpu", "fake CPU", count=2, cpu_flags=flags)
    raise ValueError(
        f"Unknown KMP_FAKE_HARDWARE={spec!r}. Use gpu:MAJOR.MINOR, tpu, cpu or cpu:bf16."
    )


# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s: (16-bit, float32 via TF32 or plain
# FP32 where there is no TF32). From NVIDIA's H100/H200, A100, L4, A10, V100 and T4 datasheets.
# First match wins, so "H100 PCIe" precedes "H100". V100 and T4 have no bfloat16 tensor cores.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 495.0),
    ("H200", 989.0, 495.0),
    ("A100", 312.0, 156.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
)


def peak_flops(hw: Hardware, compute_dtype: str) -> float | None:
    """One device's peak FLOP/s for matmuls in `compute_dtype`, or None where it is unknown.

    Known for the NVIDIA GPUs in `PEAK_TFLOPS` (float32 means TF32 on Ampere and newer, which
    TensorFlow enables by default). CPUs and TPUs return None.

    Example:
    >>> peak_flops(Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0)), "bfloat16")
    989000000000000.0
    """
    if hw.kind != "gpu":
        return None
    for key, half, single in PEAK_TFLOPS:
        if key in hw.name:
            if compute_dtype == "bfloat16" and key in ("V100", "T4"):
                return None
            return (single if compute_dtype == "float32" else half) * 1e12
    return None
