"""Diagnostics that make precision visible: the precision audit, fp32 parity, non-finite
tracing, gradient histograms against the float16 range, and the training-memory estimate."""

from kmp.diagnostics.audit import Audit, audit
from kmp.diagnostics.gradients import GradientReport, gradient_histogram
from kmp.diagnostics.memory import MemoryEstimate, estimate_memory, memory_table
from kmp.diagnostics.parity import Parity, parity_check
from kmp.diagnostics.tracing import Trace, trace_nonfinite

__all__ = [
    "Audit", "GradientReport", "MemoryEstimate", "Parity", "Trace", "audit", "estimate_memory",
    "gradient_histogram", "memory_table", "parity_check", "trace_nonfinite",
]
