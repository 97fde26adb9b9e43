"""Diagnostics that make precision visible (so far: gradient histograms, non-finite
tracing, memory estimate)."""

from kmp.diagnostics.gradients import GradientReport, gradient_histogram
from kmp.diagnostics.memory import MemoryEstimate, estimate_memory, memory_table
from kmp.diagnostics.tracing import Trace, trace_nonfinite

__all__ = [
    "GradientReport", "MemoryEstimate", "Trace", "estimate_memory", "gradient_histogram",
    "memory_table", "trace_nonfinite",
]
