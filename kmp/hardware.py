"""What this machine can do for mixed precision: GPU compute capability, TPU, CPU bf16 flags."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import re

from kmp.errors import UserError

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

    @property
    def bf16(self) -> bool:
        """True when the accelerator computes bfloat16 natively: TPUs, NVIDIA GPUs of compute
        capability 8.0 or later (Ampere on), CPUs with AVX512_BF16 or AMX."""
        if self.kind == "gpu":
            return (self.compute_capability or (0, 0)) >= (8, 0)
        return self.kind == "tpu" or self.cpu_bf16

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


def cpu_ticks(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) CPU time of the whole machine since boot, in clock ticks, from Linux's
    /proc/stat; None where there is none. Steal is the time a hypervisor ran something else
    while this virtual machine had work: on a shared host it slows every thread that needs the
    taken core, so speed measured during it is not the machine's (docs/benchmarks.md).

    Example:
    >>> ticks = cpu_ticks()  # None off Linux
    >>> ticks is None or 0 <= ticks[0] <= ticks[1]
    True
    """
    try:
        with open(stat, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user and nice)
    ticks = [int(v) for v in fields[1:9]]
    return ticks[7], sum(ticks)


# The steal share from which kmp bench and kmp tune warn that their speeds are not the machine's
# (docs/benchmarks.md: 21-22% steal doubled a step's time on a 2-core virtual machine).
STEAL_WARNING = 0.10


def ticks_between(before, after) -> tuple[int, int]:
    """(steal, total) ticks from one `cpu_ticks()` reading to a later one; (0, 0) where
    either is None."""
    if before is None or after is None:
        return 0, 0
    return after[0] - before[0], after[1] - before[1]


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """Probes the machine once and returns what training would run on.

    Order: NVIDIA GPU, then TPU, then CPU, as the active Keras backend sees them (TensorFlow's
    device list, jax.devices() or torch.cuda). `KMP_FAKE_HARDWARE` (e.g. "gpu:8.0", "gpu:7.0",
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
    from kmp import backends  # Keras, loaded when a probe needs it

    found = backends.accelerator()
    if found is not None:
        return Hardware(found["kind"], found["name"], found["compute_capability"],
                        found["count"], cpu_flags)
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
    raise UserError(
        f"Unknown KMP_FAKE_HARDWARE={spec!r}. Use gpu:MAJOR.MINOR, tpu, cpu or cpu:bf16."
    )


# Dense (no sparsity) peaks per GPU model and form factor in TFLOP/s: (16-bit Tensor Cores,
# TF32 Tensor Cores or None where there are none, plain FP32), from NVIDIA's datasheets
# (H100/H200 SXM, PCIe and NVL; GH200; A100; L4; L40S; A10; V100; T4). The sparse figures there
# are twice these. V100 and T4 have no bfloat16 or TF32 Tensor Cores. The A10G (AWS) has no
# NVIDIA datasheet, so its peak is unknown rather than guessed.
PEAK_TFLOPS = {
    "H100": {"SXM": (989.0, 495.0, 67.0), "PCIE": (756.0, 378.0, 51.0),
             "NVL": (835.0, 418.0, 60.0)},
    "H200": {"SXM": (989.0, 495.0, 67.0), "NVL": (835.0, 418.0, 60.0)},
    "GH200": {"SXM": (989.0, 495.0, 67.0)},
    "A100": {"SXM": (312.0, 156.0, 19.5), "PCIE": (312.0, 156.0, 19.5)},
    "L40S": {"SXM": (362.0, 183.0, 91.6)},
    "L4": {"SXM": (121.0, 60.0, 30.3)},
    "A10": {"SXM": (125.0, 62.5, 31.2)},
    "V100": {"SXM": (125.0, None, 15.7), "PCIE": (112.0, None, 14.0)},
    "T4": {"SXM": (65.0, None, 8.1)},
}
_NO_BF16 = ("V100", "T4")


def gpu_model(name: str) -> tuple[str | None, str]:
    """(model, form factor) read from a GPU's name: whole words only, so "NVIDIA L40S" is an
    L40S and not an L4; the form factor is "PCIE", "NVL" or "SXM" (the default).

    Example:
    >>> gpu_model("NVIDIA A100-PCIE-40GB")
    ('A100', 'PCIE')
    """
    words = re.split(r"[\s\-_]+", name.upper())
    model = next((w for w in words if w in PEAK_TFLOPS), None)
    form = next((w for w in ("PCIE", "NVL") if w in words), "SXM")
    return model, form


def peak_flops(hw: Hardware, compute_dtype: str, tf32: bool | None = None) -> float | None:
    """One device's peak FLOP/s for matmuls in `compute_dtype`, or None where it is unknown.

    Known for the NVIDIA GPUs in `PEAK_TFLOPS`. For float32 it is the TF32 Tensor Core peak
    only where the GPU has TF32 (Ampere and newer) and the backend runs float32 matmuls in
    TF32 (TensorFlow and JAX do by default, torch only when asked: see
    `kmp.backends.float32_matmuls_use_tf32`); otherwise the plain FP32 peak, 7x (A100) to 15x
    (H100) lower. CPUs and TPUs return None.

    Args:
        hw: Hardware. The device, e.g. from `detect()`.
        compute_dtype: str. "float32", "float16" or "bfloat16".
        tf32: bool or None. Whether float32 matmuls use TF32. Defaults to None: ask the
            active Keras backend.

    Returns:
        FLOP/s as a float, or None.

    Example:
    >>> peak_flops(Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0)), "bfloat16")
    989000000000000.0
    >>> peak_flops(Hardware("gpu", "NVIDIA H100 80GB HBM3", (9, 0)), "float32", tf32=False)
    67000000000000.0
    """
    if hw.kind != "gpu":
        return None
    model, form = gpu_model(hw.name)
    peaks = PEAK_TFLOPS.get(model, {})
    half, tensor_float32, single = peaks.get(form) or peaks.get("SXM") or (None, None, None)
    if half is None or (compute_dtype == "bfloat16" and model in _NO_BF16):
        return None
    if compute_dtype != "float32":
        return half * 1e12
    if tensor_float32 is not None and (hw.compute_capability or (0, 0)) >= (8, 0):
        if tf32 is None:
            from kmp import backends

            tf32 = backends.float32_matmuls_use_tf32()
        if tf32:
            return tensor_float32 * 1e12
    return single * 1e12
