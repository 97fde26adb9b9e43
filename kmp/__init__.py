"""kmp: a Keras 3 mixed-precision training kit.

One switch (`set_policy`), a loss-scaled optimizer that cannot collapse (`LossScaleOptimizer`),
FP32 islands (`kmp.layers`, `harden`), one call to prepare a model (`compile`), and runs that
recover from overflow storms and loss spikes (`kmp.recovery`), on every Keras backend
(TensorFlow, JAX, torch).

The names below are imported on first use, so `import kmp` loads neither Keras nor a backend
until one is needed (and `kmp --backend` can still choose Keras's backend).
"""

import importlib
import importlib.util
import os
import platform
import sys

__version__ = "0.1.0"


def _jax_on_cpu_without_driver():
    """With the JAX CUDA plugin installed (kmp[plan]) and no NVIDIA driver, JAX tries CUDA when
    it starts and logs a traceback; keep it on the CPU instead, unless JAX_PLATFORMS says
    otherwise. The plugin still compiles for GPUs (kmp.gpt.compiled)."""
    drivers = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg")  # dxg: WSL2
    if "JAX_PLATFORMS" in os.environ or any(os.path.exists(p) for p in drivers):
        return
    try:
        plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except (ImportError, ValueError):
        plugin = None
    if plugin is not None:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ[_JAX_CPU_BY_KMP] = "cpu"  # not the user's choice (kmp.distributed reads it)


def _jax_compile_cache():
    """Under JAX, keep XLA's compiled programs between runs: JAX's persistent compilation cache
    in `$KMP_CACHE_DIR/jax` (else `~/.cache/kmp/jax`), at most 1 GiB (least recently used
    first out), so a second run of the same model and settings skips the compiler. Left alone
    when JAX_COMPILATION_CACHE_DIR is set (JAX_ENABLE_COMPILATION_CACHE=false turns it off),
    and without `filelock` (kmp[jax]), whose lock lets a run's processes share the folder."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or importlib.util.find_spec("filelock") is None:
        return
    from kmp.decisions import cache_dir  # standard library only

    path = str(cache_dir() / "jax")
    size = int(os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30)))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    if "jax" in sys.modules:  # imported before kmp: env is read at import, so set it directly
        config = sys.modules["jax"].config
        if config.jax_compilation_cache_dir is None:
            config.update("jax_compilation_cache_dir", path)
            config.update("jax_compilation_cache_max_size", size)


def _tensorflow_onednn():
    """TensorFlow runs its CPU matmuls on oneDNN by default only on x86 CPUs with AVX512_VNNI,
    AVX512_BF16 or AMX; elsewhere (AMD Zen 3, older Intel) on Eigen's, which took 1.5x the time
    a `tiny` float32 step takes with oneDNN on a 2-core AMD EPYC (docs/benchmarks.md). Turn it on
    on every x86 CPU, unless TF_ENABLE_ONEDNN_OPTS says otherwise or TensorFlow was imported
    before kmp (it reads the variable when it starts). Read by TensorFlow only."""
    if ("TF_ENABLE_ONEDNN_OPTS" in os.environ or "tensorflow" in sys.modules
            or platform.machine().lower() not in ("x86_64", "amd64")):
        return
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    os.environ[_ONEDNN_BY_KMP] = "1"  # not the user's choice (kmp doctor says who set it)


_JAX_CPU_BY_KMP = "KMP_JAX_PLATFORMS_SET"
_ONEDNN_BY_KMP = "KMP_ONEDNN_SET"
_jax_on_cpu_without_driver()
_jax_compile_cache()
_tensorflow_onednn()

# public name -> the module that defines it ("" when the name is the module itself)
_EXPORTS = {
    "Hardware": "kmp.hardware",
    "LossScaleOptimizer": "kmp.scaling",
    "NonFiniteGradientsError": "kmp.scaling",
    "PrecisionMonitor": "kmp.callbacks",
    "PrecisionPlan": "kmp.policy",
    "TrainingStopped": "kmp.errors",
    "UserError": "kmp.errors",
    "callbacks": "",
    "compile": "kmp.training",
    "detect": "kmp.hardware",
    "diagnostics": "",
    "harden": "kmp.layers",
    "layers": "",
    "plan": "kmp.policy",
    "recovery": "",
    "set_policy": "kmp.policy",
}

__all__ = sorted(_EXPORTS)


def lazy_exports(namespace: dict, exports: dict):
    """PEP 562 `__getattr__` and `__dir__` for a package (its globals, `namespace`) whose
    public names load on first use: `exports` maps each name to the module that defines it,
    or to "" for the package's submodule of that name."""
    package = namespace["__name__"]

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = exports[name]
        value = (importlib.import_module(f"{package}.{name}") if not module
                 else getattr(importlib.import_module(module), name))
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
