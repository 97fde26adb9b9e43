"""Diagnostics that make precision visible on any Keras model: the precision audit, fp32
parity, non-finite tracing, gradient histograms against the float16 range, and where attention
probabilities are really computed. (The GPT training-memory estimate is `kmp.gpt.memory`.)"""

from kmp.diagnostics.attention import AttentionPrecision, attention_precision
from kmp.diagnostics.audit import Audit, audit
from kmp.diagnostics.gradients import GradientReport, gradient_histogram
from kmp.diagnostics.parity import Parity, parity_check
from kmp.diagnostics.tracing import Trace, trace_nonfinite

__all__ = [
    "AttentionPrecision", "Audit", "GradientReport", "Parity", "Trace", "attention_precision",
    "audit", "gradient_histogram", "parity_check", "trace_nonfinite",
]
