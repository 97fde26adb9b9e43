"""kmp: a Keras 3 mixed-precision training kit.

One switch (`set_policy`), a loss-scaled optimizer that cannot collapse (`LossScaleOptimizer`),
FP32 islands (`kmp.layers`, `harden`), and one call to prepare a model (`compile`).
"""

from kmp import callbacks, layers
from kmp.callbacks import PrecisionMonitor
from kmp.hardware import Hardware, detect
from kmp.layers import harden
from kmp.policy import PrecisionPlan, plan, set_policy
from kmp.scaling import LossScaleOptimizer, NonFiniteGradientsError
from kmp.training import compile

__version__ = "0.1.0"

__all__ = [
    "Hardware",
    "LossScaleOptimizer",
    "NonFiniteGradientsError",
    "PrecisionMonitor",
    "PrecisionPlan",
    "callbacks",
    "compile",
    "detect",
    "harden",
    "layers",
    "plan",
    "set_policy",
]
