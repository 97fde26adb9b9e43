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
