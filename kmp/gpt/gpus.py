"""The GPUs kmp plans memory for, from their datasheets, and XLA's description of each.

XLA compiles for a GPU it cannot see from a `GpuTargetConfig` (a protocol buffer in text
form; the format is XLA's, xla/stream_executor/device_description.proto). kmp writes its own
from the facts below: streaming multiprocessors, memory, bandwidth, clock and L2 from NVIDIA's
datasheets, per-SM limits from the CUDA C++ Programming Guide's table of compute
capabilities, and the memory size as `nvidia-smi` reports it (what a process can have). The
plan of a training step depends on the compute capability (which kernels exist: Triton,
cuBLAS, cuDNN's attention) and little on the clock or bandwidth, which only steer XLA's cost
model.
"""

from __future__ import annotations

import dataclasses

from kmp.errors import UserError

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model, as XLA needs to know it and as `kmp plan` reports it.

    Args:
        name: str. The product name.
        memory: int. Device memory in bytes (nvidia-smi's total).
        sms: int. Streaming multiprocessors.
        capability: tuple of int. CUDA compute capability (major, minor).
        clock_ghz: float. Boost clock.
        bandwidth: float. Memory bandwidth in bytes/s.
        l2: int. L2 cache in bytes.
        shared_per_sm: int. Shared memory per SM in bytes.
        threads_per_sm: int. Resident threads per SM.
        fp32_per_sm: int. FP32 lanes per SM.
    """

    name: str
    memory: int
    sms: int
    capability: tuple
    clock_ghz: float
    bandwidth: float
    l2: int
    shared_per_sm: int
    threads_per_sm: int = 2048
    fp32_per_sm: int = 128

    def target_config(self) -> str:
        """XLA's GpuTargetConfig for this GPU, in text form (what
        `jax.experimental.topologies.get_topology_desc(target_config=...)` takes).

        Returns:
            str. The text proto: the device's facts, the CUDA platform and cuDNN's version.

        Example:
        >>> "core_count: 132" in gpu("h100").target_config()
        True
        """
        major, minor = self.capability
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",  # without opting in: 48 KiB on every CUDA GPU
            f"  shared_memory_per_core: {self.shared_per_sm}",
            f"  shared_memory_per_block_optin: {self.shared_per_sm - 1024}",  # 1 KiB reserved
            f"  threads_per_core_limit: {self.threads_per_sm}",
            f"  core_count: {self.sms}",
            f"  fpus_per_core: {self.fp32_per_sm}",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {int(self.bandwidth)}",
            f"  l2_cache_size: {self.l2}",
            f"  clock_rate_ghz: {self.clock_ghz}",
            f"  device_memory_size: {self.memory}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 1 }",
            f'device_description_str: "{self.name}"',
            "",
        ])


GPUS = {
    "h100-80gb": Gpu("NVIDIA H100 80GB HBM3", 81559 * MIB, 132, (9, 0), 1.98, 3.35e12,
                     50 * MIB, 228 * 1024),
    "h200-141gb": Gpu("NVIDIA H200", 143771 * MIB, 132, (9, 0), 1.98, 4.8e12, 50 * MIB,
                      228 * 1024),
    "a100-80gb": Gpu("NVIDIA A100-SXM4-80GB", 81920 * MIB, 108, (8, 0), 1.41, 2.039e12,
                     40 * MIB, 164 * 1024, fp32_per_sm=64),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", 40960 * MIB, 108, (8, 0), 1.41, 1.555e12,
                     40 * MIB, 164 * 1024, fp32_per_sm=64),
    "l4-24gb": Gpu("NVIDIA L4", 23034 * MIB, 58, (8, 9), 2.04, 3.0e11, 48 * MIB, 100 * 1024,
                   threads_per_sm=1536),
    "rtx4090-24gb": Gpu("NVIDIA GeForce RTX 4090", 24564 * MIB, 128, (8, 9), 2.52, 1.008e12,
                        72 * MIB, 100 * 1024, threads_per_sm=1536),
    "rtx4070-8gb": Gpu("NVIDIA GeForce RTX 4070 Laptop GPU", 8188 * MIB, 36, (8, 9), 2.175,
                       2.56e11, 32 * MIB, 100 * 1024, threads_per_sm=1536),
}
# `kmp memory --target` names: the GPU families of the issue that asked for them.
ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb", "l4": "l4-24gb"}


def gpu(name: str) -> Gpu:
    """The GPU called `name` (a key of `GPUS`, or an alias such as "h100").

    Args:
        name: str. A key of `GPUS` ("h100-80gb", "rtx4070-8gb", ...) or of `ALIASES`
            (case-insensitive).

    Returns:
        A `Gpu`.

    Raises:
        UserError: for a name kmp has no datasheet for.

    Example:
    >>> gpu("h100").sms
    132
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise UserError(f"Unknown GPU {name!r}. Use one of: {', '.join([*ALIASES, *GPUS])}.",
                        field="target")
    return GPUS[key]


def topology(gpu_name: str, count: int, memory: int | None = None):
    """`count` compile-only devices of the GPU `gpu_name` (a name `gpu` knows), or of this CPU
    for "cpu": what `kmp.gpt.compiled.compile_step` compiles for.

    Args:
        gpu_name: str. A GPU of `GPUS` or `ALIASES` ("h100", "a100-40gb", ...) or "cpu".
        count: int. How many devices.
        memory: int or None. The device memory XLA is told, in bytes. Defaults to None: the
            GPU's own.

    Returns:
        list. JAX devices (compile-only for a GPU: nothing runs on them).

    Raises:
        UserError: when the JAX CUDA plugin is not installed, or for more CPU devices than
            this process has.

    Example:
    >>> len(topology("cpu", 1))
    1
    """
    import jax

    if gpu_name == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise UserError(f"{count} CPU devices asked for and this process has "
                            f"{len(devices)}. Start kmp with --devices {count}.", field="gpus")
        return devices[:count]
    from jax.experimental import topologies

    facts = gpu(gpu_name)
    if memory:  # XLA rematerializes what does not fit in the device's memory: lift the limit
        facts = dataclasses.replace(facts, memory=memory)
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=facts.target_config(),
                                            topology=f"1x1x{count}")
    except Exception as error:  # jax raises bare RuntimeError/ValueError without the plugin
        if "cuda" not in str(error).lower() and "platform" not in str(error).lower():
            raise
        import importlib.util

        if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
            raise UserError("JAX's CUDA plugin failed to start (no NVIDIA driver here), so it "
                            "cannot compile for a GPU in this process. Set JAX_PLATFORMS=cpu "
                            "before JAX starts (import kmp before keras or jax does it).",
                            field="target") from None
        raise UserError("Compiling for a GPU without one needs the JAX CUDA plugin: pip "
                        "install 'kmp[plan]' (jax-cuda12-plugin and jax-cuda12-pjrt of "
                        f"jaxlib's version). JAX said: {str(error).splitlines()[0]}",
                        field="target") from None
    return list(desc.devices)
