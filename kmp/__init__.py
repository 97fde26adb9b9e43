"""kmp: a Keras 3 mixed-precision training kit.

One switch (`set_policy`), a loss-scaled optimizer that cannot collapse (`LossScaleOptimizer`),
FP32 islands (`kmp.layers`, `harden`), one call to prepare a model (`compile`), and runs that
recover from overflow storms and loss spikes (`kmp.recovery`), on every Keras backend
(TensorFlow, JAX, torch).

The names below are imported on first use, so `import kmp` loads neither Keras nor a backend
until one is needed (and `kmp --backend` can still choose Keras's backend).
"""

import importlib

__version__ = "0.1.0"

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


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kmp' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (importlib.import_module(f"kmp.{name}") if not module
             else getattr(importlib.import_module(module), name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
