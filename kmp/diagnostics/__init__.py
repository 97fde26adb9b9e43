"""Diagnostics that make precision visible (so far: memory estimate, non-finite tracing)."""

from kmp.diagnostics.memory import MemoryEstimate, estimate_memory, memory_table
from kmp.diagnostics.tracing import Trace, trace_nonfinite

__all__ = ["MemoryEstimate", "Trace", "estimate_memory", "memory_table", "trace_nonfinite"]
