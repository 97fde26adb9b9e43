"""Training-memory estimate for a GPT config, by policy, batch and sequence length.

Model states follow Keras's layout under every policy: float32 variables (mixed policies cast
them on the fly, they keep no half-precision copy), float32 gradients, and AdamW's two float32
moments: 16 bytes per parameter, the figure the ZeRO paper (Rajbhandari et al. 2020, section 3.1)
gives for mixed-precision Adam, split differently (there: 2 + 2 + 12). Gradient accumulation
adds a float32 accumulator per parameter.

Activations use Korthikanti et al. 2022 (eq. 2, no recomputation, no parallelism):
s·b·h·(34 + 5·a·s/h) bytes per layer with 16-bit activations, doubled for float32, plus the
vocabulary logits, which reach the loss in float32 (b·s·V·4 bytes, and as many again for the
softmax the loss keeps for the backward pass).

`state_bytes` counts a built model's resident bytes (its variables and its optimizer's) the way
the estimate's parameters + optimizer do; `kmp bench` uses it for a run's own GPU peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

import keras

from kmp.errors import UserError
from kmp.gpt.config import GPTConfig, add_arguments, from_args
from kmp.gpt.model import param_count
from kmp.policy import POLICIES


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory in bytes, by part."""

    policy: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def row(self) -> str:
        gib = 2**30
        return (f"| {self.policy} | {self.parameters / gib:.3f} | {self.gradients / gib:.3f} | "
                f"{self.optimizer / gib:.3f} | {self.activations / gib:.3f} | "
                f"{self.total / gib:.3f} |")


def estimate_memory(config: GPTConfig, policy: str = "mixed_bfloat16") -> MemoryEstimate:
    """Bytes for parameters, gradients, optimizer states and activations of one training step.

    Args:
        config: GPTConfig. Shape, `batch_size` (per device), `seq_len` and `grad_accum`.
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16".

    Raises:
        UserError: for an unknown policy.

    Example:
    >>> from kmp.gpt.config import preset
    >>> est = estimate_memory(preset("gpt2-124m"), "mixed_bfloat16")
    >>> round(est.parameters / 2**20)  # 124.5 M float32 parameters
    475
    """
    if policy not in POLICIES:
        raise UserError(f"Unknown policy {policy!r}. Use one of: {', '.join(POLICIES)}.")
    n = param_count(config)
    s, b, h = config.seq_len, config.batch_size, config.hidden_dim
    a, layers, vocab = config.num_heads, config.num_layers, config.vocab_size
    per_layer_16bit = s * b * h * 34 + 5 * a * s * s * b
    scale = 2 if policy == "float32" else 1
    activations = layers * per_layer_16bit * scale + 2 * b * s * vocab * 4
    accumulators = 4 * n if config.grad_accum > 1 else 0
    return MemoryEstimate(policy, 4 * n, 4 * n + accumulators, 8 * n, activations)


def memory_table(config: GPTConfig, measured: dict | None = None) -> str:
    """A Markdown table of `estimate_memory` for every policy, in GiB; with `measured` (policy
    -> bytes, e.g. GPU peaks from `kmp memory --measure`), the measured peak and the ratio."""
    head = "| policy | parameters | gradients | optimizer | activations | total (GiB) |"
    lines = [head + (" measured peak (GiB) | estimate / measured |" if measured else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if measured else "")]
    for policy in POLICIES:
        est = estimate_memory(config, policy)
        row = est.row()
        if measured:
            peak = measured.get(policy)
            row += (f" {peak / 2**30:.3f} | {est.total / peak:.2f} |" if peak else " - | - |")
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """`kmp memory`: parses its options from `argv` and prints the config's estimate by policy
    (with --measure, beside the GPU's measured peaks).

    Args:
        argv: list of str. The options after `kmp memory`.

    Returns:
        0.

    Raises:
        UserError: for --measure on a machine without a GPU, or a bad config option.
    """
    from kmp.gpt.config import RUN_ONLY

    parser = argparse.ArgumentParser(
        prog="kmp memory", description="Estimate training memory of a GPT preset by policy "
        "(Korthikanti et al. 2022 activations, 16 bytes/param model states).")
    add_arguments(parser, exclude={"precision", "steps", "warmup_steps", "learning_rate",
                                   "weight_decay", "grad_clip", "dropout", "out", "remat",
                                   *RUN_ONLY})
    parser.add_argument("--measure", action="store_true", help="also train a few steps under "
                        "each policy (XLA on) and print the GPU's measured peak beside the "
                        "estimate (needs a GPU)")
    opts = parser.parse_args(argv)
    config = from_args(opts)
    measured = None
    if opts.measure:
        from kmp import backends
        from kmp.gpt import bench

        if backends.gpu_memory() is None:
            raise UserError("kmp memory --measure reads the GPU's peak memory and this "
                            "machine has no GPU. Drop --measure for the estimate alone.")
        runs = bench.benchmark(config, POLICIES, xla=(True,), chunk=2, repeats=1, warmup=1)
        measured = {run.policy: run.peak_memory for run in runs}
    print(f"{config.preset}: {config.num_layers} layers x {config.hidden_dim}, vocabulary "
          f"{config.vocab_size}, batch {config.batch_size} x {config.seq_len} tokens per device"
          f"{f', gradient accumulation {config.grad_accum}' if config.grad_accum > 1 else ''}")
    print(memory_table(config, measured))
    return 0


def _itemsize(dtype) -> int:
    bits = re.search(r"\d+", keras.backend.standardize_dtype(dtype))
    return int(bits.group()) // 8 if bits else 1  # bool


def state_bytes(model) -> int:
    """Bytes of a model's variables and its optimizer's (what it keeps on the device between
    steps)."""
    seen, total = set(), 0
    for v in [*model.variables, *getattr(model.optimizer, "variables", [])]:
        if id(v) not in seen:
            seen.add(id(v))
            total += math.prod(v.shape) * _itemsize(v.dtype)
    return total
