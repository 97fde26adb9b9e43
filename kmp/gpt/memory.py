"""Training memory of a GPT config per device, by part: a model checked against XLA's plan.

Model states follow Keras's layout under every policy: float32 variables (the mixed policies
cast them on the fly and keep no half-precision copy), float32 gradients and AdamW's two
float32 moments, 16 bytes per parameter (the figure the ZeRO paper, Rajbhandari et al. 2020,
section 3.1, gives for mixed-precision Adam, split differently there: 2 + 2 + 12). Gradient
accumulation adds a float32 accumulator per parameter to the optimizer's state.

Activations start from Korthikanti et al. 2022 (eq. 2: what each transformer layer keeps for
the backward pass) and were corrected against the plan XLA compiles for an H100
(`kmp memory --measure compile`, its buffer report read by shape; docs/memory.md):

- attention keeps two seq x seq arrays per head and layer, one in float32 (kmp's softmax
  island) and one in the compute dtype, a·s²·b·(4 + c) bytes, where Korthikanti's 16-bit
  count with dropout is 5·a·s²·b; with `attention="fused"` under a mixed policy, a flash
  kernel (cuDNN's, which Keras picks on a GPU) keeps only the softmax statistics, a·s·b
  float32 values, and recomputes the rest (Dao et al. 2022). "auto" is decided on the machine
  that trains (kmp.decisions), so a plan for another GPU counts the island;
- each token keeps (8·h + 2·i)·c bytes per layer (the block's inputs, Q, K, V, the attention
  output, the MLP's input and GELU's input; no dropout masks), plus 10·h bytes under a mixed
  policy (the layer-norm islands' float32 copies), measured, as the rest;
- the step peaks at one of three moments: the start of the backward pass (every layer's
  activations, the logits' gradient, b·s·V in the logits' dtype, the tied embedding's float32
  gradient and two embedding-sized temporaries), its end (every gradient, 3 bytes per
  parameter under a mixed policy where XLA keeps some in the compute dtype, and the first
  layer's activations) or, under loss scaling, the update (four float32 copies per
  parameter: scaled and unscaled gradients, and the updated weights and moments the skip
  decision picks from). Without rematerialization the first wins; with it, any may;
- on a mesh (`config.mesh`, `config.shard`, kmp.gpt.sharding), fsdp divides the weights, the
  gradients and the moments by the data axis and gathers one layer's weights at a time; tp
  divides the matrices, the heads, the MLP's intermediates and the logits by the model axis;
  across data-parallel devices XLA keeps the logits once more, in float32, while the
  gradients are reduced.

`state_bytes` counts a built model's resident bytes (its variables and its optimizer's) the way
the estimate's parameters + optimizer do; `kmp bench` uses it for a run's own GPU peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

import keras

from kmp.errors import UserError
from kmp.gpt.config import GPTConfig, add_arguments, from_args
from kmp.gpt.model import param_count
from kmp.policy import POLICIES

MIXED_EXTRA_PER_HIDDEN = 10  # bytes per token and hidden unit per layer under a mixed policy
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory of one device at the step's peak, in bytes, by part.

    `gradients` and `activations` are what is live at the peak (see the module docstring).
    """

    policy: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    remat: str = "none"

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def row(self) -> str:
        return (f"| {self.policy} | {self.parameters / GIB:.3f} | {self.gradients / GIB:.3f} | "
                f"{self.optimizer / GIB:.3f} | {self.activations / GIB:.3f} | "
                f"{self.total / GIB:.3f} |")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def _itemsize_of(policy: str) -> int:
    return 4 if policy == "float32" else 2


def _mesh(config: GPTConfig, devices: int) -> tuple[int, int, int]:
    """(data-parallel size, fsdp's split of the weights, tp's split) of `config.mesh` and
    `config.shard`, or plain data parallelism over `devices`."""
    from kmp.gpt.sharding import parse_mesh  # plain Python: Keras stays unloaded

    sizes = parse_mesh(config.mesh) or {"data": devices, "model": 1}
    fsdp, tp = config.shard in ("fsdp", "fsdp+tp"), config.shard in ("tp", "fsdp+tp")
    return sizes["data"], sizes["data"] if fsdp else 1, sizes["model"] if tp else 1


def layer_activations(config: GPTConfig, policy: str, rows: int | None = None,
                      tp: int = 1) -> int:
    """Bytes one transformer layer keeps for the backward pass on one device, for `rows`
    sequences (default `config.batch_size`), its heads and MLP split `tp` ways."""
    c = _itemsize_of(policy)
    s, h, i = config.seq_len, config.hidden_dim, config.intermediate_dim
    b = config.batch_size if rows is None else rows
    heads = config.num_heads // tp
    if config.attention == "fused" and c == 2:  # flash attention keeps softmax statistics only
        attention = heads * s * b * 4
    else:  # kmp's island (and "auto", which a GPU decides only when it runs: counted as one)
        attention = heads * s * s * b * (4 + c)
    # the block's and the MLP's inputs and outputs whole; Q, K, V, the attention output and the
    # MLP's intermediates split over tp
    per_token = (4 * h + 4 * h // tp + 2 * i // tp) * c
    per_token += MIXED_EXTRA_PER_HIDDEN * h if c == 2 else 0
    return attention + s * b * per_token


def estimate_memory(config: GPTConfig, policy: str = "mixed_bfloat16",
                    devices: int = 1) -> MemoryEstimate:
    """Bytes of parameters, gradients, optimizer state and activations on one device at the
    step's peak.

    Args:
        config: GPTConfig. Shape, `batch_size` (the global batch: split over the data-parallel
            devices), `seq_len`, `grad_accum`, `remat`, `logits`, and `mesh` and `shard` (see
            `kmp.gpt.sharding`: fsdp splits every weight, its gradient and its moments over
            the data axis; tp splits heads, MLP and vocabulary over the model axis).
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16".
        devices: int. Data-parallel devices when `config.mesh` is empty. Defaults to 1.

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
    data, fsdp, tp = _mesh(config, devices)
    c = _itemsize_of(policy)
    s, h, i, vocab = config.seq_len, config.hidden_dim, config.intermediate_dim, config.vocab_size
    layers, rows = config.num_layers, max(1, config.batch_size // data)
    tokens = s * rows
    # Per device: the position embedding, norms and biases split by fsdp alone, the rest by both.
    n_whole = s * h + layers * (9 * h + i) + 2 * h
    n = param_count(config) - n_whole
    n = n // (fsdp * tp) + n_whole // fsdp
    logits = tokens * vocab // tp * (c if config.logits == "compute" else 4)
    embedding = vocab * h * 4 // (fsdp * tp)  # its gradient, and two temporaries of its size
    layer = layer_activations(config, policy, rows, tp)
    # fsdp: one layer's weights gathered whole, and its gradient before it is scattered
    gathered = 2 * (4 * h * h + 2 * h * i) // tp * 4 if fsdp > 1 else 0
    optimizer = 8 * n + (4 * n if config.grad_accum > 1 else 0)
    # What the layers keep: everything, or (rematerialized) each layer's input alone.
    kept = layers * layer if config.remat == "none" else layers * tokens * h * c
    # Across data-parallel devices XLA keeps the logits once more, in float32, while the
    # gradients' all-reduce (or reduce-scatter) overlaps the backward pass (measured).
    reduced = tokens * vocab // tp * 4 if data > 1 else 0
    grads = (4 if c == 4 else 3) * n
    phases = {  # (gradients, activations) live at three moments of the step
        # the backward pass begins: the logits' and the embedding's gradients
        "begin": (embedding, kept + logits + 2 * embedding + reduced + gathered),
        # it ends: every gradient (under a mixed policy XLA keeps some in the compute dtype
        # until the update casts them: 3 bytes per parameter, measured), the first layer's
        # activations (recomputed, with remat)
        "end": (grads, layer + gathered
                + max(0, (kept if config.remat != "none" else 0) - grads)),
        # the update: the gradients, and under loss scaling the unscaled copies and the
        # updated weights and moments the skip decision chooses between (four of each)
        "update": (16 * n if policy == "mixed_float16" else 4 * n, 0),
    }
    gradients, activations = max(phases.values(), key=sum)
    return MemoryEstimate(policy, 4 * n, gradients, optimizer, activations, config.remat)


def memory_table(config: GPTConfig, measured: dict | None = None, policies=POLICIES) -> str:
    """A Markdown table of `estimate_memory` for each policy, in GiB; with `measured` (policy
    -> bytes, e.g. GPU peaks from `kmp memory --measure`), the measured peak and the ratio."""
    head = "| policy | parameters | gradients | optimizer | activations | total (GiB) |"
    lines = [head + (" measured peak (GiB) | estimate / measured |" if measured else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if measured else "")]
    for policy in policies:
        est = estimate_memory(config, policy)
        row = est.row()
        if measured:
            peak = measured.get(policy)
            row += (f" {peak / 2**30:.3f} | {est.total / peak:.2f} |" if peak else " - | - |")
        lines.append(row)
    return "\n".join(lines)


def compiled_table(rows: list[dict]) -> str:
    """A Markdown table of estimates beside XLA's plans (rows from `compare`), in GiB: per
    device, the state (weights + optimizer), gradients + activations, and the total."""
    lines = ["| policy | remat | | weights | optimizer | gradients + activations | total "
             "(GiB) | estimate / XLA |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        est = row["estimate"]
        lines.append(f"| {row['policy']} | {row['remat']} | estimate | "
                     f"{est['parameters'] / GIB:.2f} | {est['optimizer'] / GIB:.2f} | "
                     f"{(est['gradients'] + est['activations']) / GIB:.2f} | "
                     f"{est['total'] / GIB:.2f} | |")
        for gemm, plan in row["compiled"].items():
            rest = plan["total"] - plan["weights"] - plan["optimizer"]
            lines.append(f"| | | XLA {plan['target']}, {gemm} | {plan['weights'] / GIB:.2f} | "
                         f"{plan['optimizer'] / GIB:.2f} | {rest / GIB:.2f} | "
                         f"{plan['total'] / GIB:.2f} | {est['total'] / plan['total']:.2f} |")
    return "\n".join(lines)


def compare(config: GPTConfig, policies, target: str = "h100", gpus: int = 1,
            gemms=("triton", "cublas"), progress=None) -> list[dict]:
    """Estimates and XLA's compiled plans side by side, per policy (see `kmp.gpt.compiled`).

    Args:
        config: GPTConfig. The model, global batch, sequence length, remat, mesh and shard.
        policies: list of str. The precision policies.
        target: str. A GPU of `kmp.gpt.gpus`, or "cpu". Defaults to "h100".
        gpus: int. Data-parallel devices (or the mesh's). Defaults to 1.
        gemms: tuple of str. The matmul kernels to plan with. Defaults to both.
        progress: callable or None. Called with a line before each compilation.

    Returns:
        One dict per policy: policy, remat, estimate (parts), compiled (gemm -> plan),
        estimate_total_bytes and compiled_total_bytes (the first gemm's plan).
    """
    from kmp.gpt import compiled

    rows = []
    for policy in policies:
        est = estimate_memory(config, policy, gpus).to_json()
        plans = {}
        for gemm in gemms if target != "cpu" else ("cpu",):
            if progress:
                progress(f"compiling the {policy} step for {target} ({gemm} matmuls)")
            plans[gemm] = compiled.compiled_plan(config, policy, target, gpus, config.mesh,
                                           config.shard, "triton" if gemm == "cpu" else gemm
                                           ).to_json()
        first = next(iter(plans.values()))
        rows.append({"policy": policy, "remat": config.remat, "estimate": est,
                     "compiled": plans, "estimate_total_bytes": est["total"],
                     "compiled_total_bytes": first["total"]})
    return rows


def main(argv: list[str]) -> int:
    """`kmp memory`: parses its options from `argv` and prints the config's estimate by policy,
    beside the GPU's measured peaks (--measure gpu) or XLA's compiled plan for a GPU
    (--measure compile).

    Args:
        argv: list of str. The options after `kmp memory`.

    Returns:
        0.

    Raises:
        UserError: for --measure gpu on a machine without a GPU, or a bad option.
    """
    from kmp.gpt.config import RUN_ONLY

    parser = argparse.ArgumentParser(
        prog="kmp memory", description="Training memory of a GPT preset per device, by "
        "policy and part: kmp's estimate, checked against XLA's plan for a GPU (--measure "
        "compile) or a GPU's measured peak (--measure gpu).")
    add_arguments(parser, exclude={"steps", "warmup_steps", "learning_rate", "weight_decay",
                                   "grad_clip", "dropout", "out",
                                   *(f for f in RUN_ONLY if f not in ("mesh", "shard"))})
    parser.add_argument("--measure", nargs="?", const="gpu", choices=("gpu", "compile"),
                        help="gpu: train a few steps under each policy (XLA on) and read the "
                        "GPU's peak (needs a GPU); compile: compile the step for --target "
                        "without running it (JAX CUDA plugin: pip install 'kmp[plan]')")
    parser.add_argument("--target", default="h100", help="with --measure compile: the GPU "
                        "(h100, h200, a100, l4, or any of kmp plan --device's) or cpu")
    parser.add_argument("--gpus", type=int, default=1, help="with --measure compile: devices "
                        "(data-parallel; with --mesh, the mesh's size by default)")
    parser.add_argument("--gemm", choices=("triton", "cublas", "both"), default="both",
                        help="with --measure compile: the matmul kernels XLA plans with "
                        "(without a GPU it cannot autotune between them)")
    parser.add_argument("--json", help="write the figures (bytes) to this JSON file")
    opts = parser.parse_args(argv)
    if opts.measure != "compile" and (opts.gpus != 1 or opts.target != "h100"):
        raise UserError("--target and --gpus choose the GPU XLA compiles for: add --measure "
                        "compile.")
    if opts.gpus < 1:
        raise UserError(f"--gpus must be >= 1. Received: {opts.gpus}")
    config = from_args(opts)
    if config.mesh:  # the mesh says how many
        from kmp.gpt.sharding import parse_mesh

        size = math.prod(parse_mesh(config.mesh).values())
        if opts.gpus not in (1, size):
            raise UserError(f"--gpus {opts.gpus} and --mesh {config.mesh} ({size} devices) "
                            "disagree. Drop --gpus: the mesh says how many.")
        opts.gpus = size
    policies = POLICIES if config.precision == "auto" else (config.precision,)
    data = _mesh(config, opts.gpus)[0]
    print(f"{config.preset}: {config.num_layers} layers x {config.hidden_dim}, vocabulary "
          f"{config.vocab_size}, batch {config.batch_size} x {config.seq_len} tokens"
          f"{f' ({config.batch_size // data} per data-parallel device)' if data > 1 else ''}"
          f"{f', gradient accumulation {config.grad_accum}' if config.grad_accum > 1 else ''}"
          f", remat {config.remat}{f', mesh {config.mesh} {config.shard}' if config.mesh else ''}")
    result = {"config": json.loads(config.to_json())}
    if opts.measure == "compile":
        gemms = ("triton", "cublas") if opts.gemm == "both" else (opts.gemm,)
        rows = compare(config, policies, opts.target, opts.gpus, gemms,
                       progress=lambda line: print(f"  {line} ...", flush=True))
        print(compiled_table(rows))
        result.update(rows[0] if len(rows) == 1 else {}, rows=rows)
    else:
        measured = None
        if opts.measure == "gpu":
            from kmp import backends
            from kmp.gpt import bench

            if backends.gpu_memory() is None:
                raise UserError("kmp memory --measure gpu reads the GPU's peak memory and "
                                "this machine has no GPU. Use --measure compile for XLA's "
                                "plan of a GPU, or drop --measure for the estimate alone.")
            runs = bench.benchmark(config, policies, xla=(True,), chunk=2, repeats=1, warmup=1)
            measured = {run.policy: run.peak_memory for run in runs}
            result["measured_peak_bytes"] = measured
        print(memory_table(config, measured, policies))
        result["estimates"] = [estimate_memory(config, p).to_json() for p in policies]
    if opts.json:
        from pathlib import Path

        Path(opts.json).expanduser().write_text(json.dumps(result, indent=2) + "\n")
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
