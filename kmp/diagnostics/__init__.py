"""Diagnostics that make precision visible (so far: the training-memory estimate)."""

from kmp.diagnostics.memory import MemoryEstimate, estimate_memory, memory_table

__all__ = ["MemoryEstimate", "estimate_memory", "memory_table"]
