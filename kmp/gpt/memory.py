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
- each token keeps (4·h + 4·h/t + i/t)·c + 4·i/t bytes per layer, t the tp split (the
  residual stream and the layer norms' outputs, Q, K, V, the attention output, GELU's input
  in the compute dtype and once more in float32; no dropout masks), measured, as the rest;
- the step peaks at one of three moments: the start of the backward pass (every layer's
  activations, the logits' gradient, b·s·V in the logits' dtype, the tied embedding's float32
  gradient and two embedding-sized temporaries), its end (every gradient, 3 bytes per
  parameter under a mixed policy where XLA keeps some in the compute dtype, and the first
  layer's activations) or, under loss scaling, the update (four float32 copies per
  parameter: scaled and unscaled gradients, and the updated weights and moments the skip
  decision picks from). Without rematerialization the first wins; with it, any may;
- on a mesh (`config.mesh`, `config.shard`, kmp.gpt.sharding), fsdp divides the weights, the
  gradients and the moments by the data axis; tp divides the matrices, the heads, the MLP's
  intermediates and the logits by the model axis; across data-parallel devices XLA keeps the
  logits once more, in float32, while the gradients are reduced. What XLA's plans for 8
  H100s keep beyond that (buffer reports read by shape and by op, docs/memory.md): without
  remat, every layer's all-gathered weights, in the compute dtype, from the forward pass to
  the backward one; with remat, at the end of the backward pass, the whole (unscattered)
  gradients of the first half of the layers, whose reduce-scatters XLA's scheduler puts
  after the backward pass, and the layer being differentiated twice over (its recomputed
  activations and their gradients).

`state_bytes` counts a built model's resident bytes (its variables and its optimizer's) the way
the estimate's parameters + optimizer do; `kmp bench` uses it for a run's own GPU peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re

from kmp.errors import UserError
from kmp.gpt.config import GPTConfig, add_arguments, from_args
from kmp.policy import POLICIES

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory of one device at the step's peak, in bytes, by part.

    `gradients` and `activations` are what is live at the peak (see the module docstring).

    Example:
    >>> est = MemoryEstimate("mixed_bfloat16", 4 * 2**30, 2**30, 8 * 2**30, 2**30)
    >>> est.total / 2**30
    14.0
    >>> est.row()
    '| mixed_bfloat16 | 4.000 | 1.000 | 8.000 | 1.000 | 14.000 |'
    """

    policy: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    remat: str = "none"

    @property
    def total(self) -> int:
        """Bytes of all four parts."""
        return self.parameters + self.gradients + self.optimizer + self.activations

    def row(self) -> str:
        """A Markdown row of `memory_table`: policy and the parts in GiB."""
        return (f"| {self.policy} | {self.parameters / GIB:.3f} | {self.gradients / GIB:.3f} | "
                f"{self.optimizer / GIB:.3f} | {self.activations / GIB:.3f} | "
                f"{self.total / GIB:.3f} |")

    def to_json(self) -> dict:
        """The fields and the total, in bytes."""
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


def param_count(config: GPTConfig, position_embeddings: bool = True) -> int:
    """Parameters of the GPT that `kmp.gpt.model.build_model(config)` builds, in closed form
    (tied embeddings), without building it or loading Keras, keras-hub or TensorFlow (`kmp plan`
    and `kmp memory` count with it; a test checks it against the built model).

    Args:
        config: GPTConfig. The shape: `vocab_size`, `num_layers`, `hidden_dim`,
            `intermediate_dim`, `seq_len`.
        position_embeddings: bool. Count the learned position embedding. Defaults to True.

    Returns:
        int. The number of parameters.

    Example:
    >>> from kmp.gpt.config import preset
    >>> round(param_count(preset("gpt2-124m")) / 1e6, 1)
    124.5
    """
    h, layers = config.hidden_dim, config.num_layers
    total = config.vocab_size * h + layers * _layer_params(config) + 2 * h  # + final norm
    return total + (config.seq_len * h if position_embeddings else 0)


def _layer_params(config: GPTConfig, tp: int = 1) -> int:
    """One transformer layer's parameters on one device, its matrices split `tp` ways: the
    query, key, value and output projections and the MLP with their biases, two layer norms."""
    h, i = config.hidden_dim, config.intermediate_dim
    split = 4 * h * h + 3 * h + 2 * h * i + i  # what tp splits (Q, K, V by head, the MLP)
    return split // tp + h + h + 4 * h  # the output biases and the norms stay whole


def layer_activations(config: GPTConfig, policy: str, rows: int | None = None,
                      tp: int = 1) -> int:
    """Bytes one transformer layer keeps for the backward pass on one device.

    Args:
        config: GPTConfig. The shape, `seq_len`, `batch_size` and `attention`.
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16".
        rows: int or None. Sequences on the device. Defaults to None: `config.batch_size`.
        tp: int. The model axis that splits the heads and the MLP. Defaults to 1.

    Returns:
        int. Bytes: the attention's seq x seq arrays (or a flash kernel's statistics) and
        the per-token tensors (see the module docstring).

    Example:
    >>> from kmp.gpt.config import preset
    >>> layer_activations(preset("tiny"), "float32") == 4 * 128**2 * 16 * 8 + 128 * 16 * (
    ...     8 * 128 + 2 * 512) * 4
    True
    """
    c = _itemsize_of(policy)
    s, h, i = config.seq_len, config.hidden_dim, config.intermediate_dim
    b = config.batch_size if rows is None else rows
    # the residual stream and the layer norms' outputs whole; Q, K, V, the attention output
    # and the MLP's intermediate split over tp; GELU's input once more, in float32 (XLA's H100
    # plan read by op, 6.7B fsdp+tp: the MLP kept one bf16 and one float32 copy of it)
    per_token = (4 * h + 4 * h // tp + i // tp) * c + 4 * i // tp
    return _attention(config, c, b, tp) + s * b * per_token


def _attention(config: GPTConfig, c: int, rows: int, tp: int = 1) -> int:
    """Bytes of one layer's attention arrays on one device: two seq x seq arrays per head (one
    float32, one in the compute dtype), or a flash kernel's softmax statistics."""
    s, heads = config.seq_len, config.num_heads // tp
    if config.attention == "fused" and c == 2:  # flash attention keeps softmax statistics only
        return heads * s * rows * 4
    # kmp's island (and "auto", which a GPU decides only when it runs: counted as one)
    return heads * s * s * rows * (4 + c)


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

    Returns:
        A `MemoryEstimate`: the bytes per device, by part.

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
    s, h, vocab = config.seq_len, config.hidden_dim, config.vocab_size
    layers, rows = config.num_layers, max(1, config.batch_size // data)
    tokens = s * rows
    # Per device: the position embedding, norms and biases split by fsdp alone, the rest by both.
    n_whole = s * h + layers * (9 * h + config.intermediate_dim) + 2 * h
    n = param_count(config) - n_whole
    n = n // (fsdp * tp) + n_whole // fsdp
    logits = tokens * vocab // tp * (c if config.logits == "compute" else 4)
    embedding = vocab * h * 4 // (fsdp * tp)  # its gradient, and two temporaries of its size
    layer = layer_activations(config, policy, rows, tp)
    optimizer = 8 * n + (4 * n if config.grad_accum > 1 else 0)
    # What the layers keep: everything, or (rematerialized) each layer's input alone.
    kept = layers * layer if config.remat == "none" else layers * tokens * h * c
    if fsdp > 1 and config.remat == "none":  # each layer's gathered weights, for its backward
        kept += layers * _layer_params(config, tp) * c  # (6.7B fsdp+tp plan: 31 of 32 kept)
    # Across data-parallel devices XLA keeps the logits once more, in float32, while the
    # gradients' all-reduce (or reduce-scatter) overlaps the backward pass (measured).
    reduced = tokens * vocab // tp * 4 if data > 1 else 0
    # The gradients when the backward pass ends: under a mixed policy XLA keeps some in the
    # compute dtype until the update casts them: 3 bytes per parameter, measured on one GPU.
    grads = (4 if c == 4 else 3) * n
    # with remat, the layers' inputs not yet released (one GPU: XLA's order, measured)
    working = layer + max(0, (kept if config.remat != "none" else 0) - grads)
    # fsdp: one layer's weights gathered whole, and its gradient before it is scattered
    gathered = 2 * (4 * h * h + 2 * h * config.intermediate_dim) // tp * 4 if fsdp > 1 else 0
    if fsdp > 1:
        # fsdp (XLA's H100 plans for 8 GPUs, buffer reports read by shape and op; GPT-2 1.5B
        # and the 6.7B shape with remat blocks, docs/memory.md). Each layer's weights are
        # all-gathered in the compute dtype (in the forward pass, and again in the backward
        # one) and its weight gradients come out whole, in the compute dtype, before a
        # reduce-scatter leaves 1/D of them. XLA's GPU scheduler runs one collective at a
        # time and the backward pass's all-gathers come first: the reduce-scatters of the
        # last half of the layers (the first half of the backward pass) overlap it, those of
        # the first half wait until it ends. At its end (the peak with remat), XLA held the
        # whole gradients of 22 of 48 layers (1.5B) and 13 of 32 (6.7B), the scattered ones
        # of the rest, one layer's gathered weights, and the layer being differentiated
        # twice over: its (recomputed) activations and their gradients, the seq x seq
        # arrays included; the inputs of the layers still to differentiate are few by then.
        full = _layer_params(config, tp)
        waiting = max(0, layers // 2 - 2)  # layers 0 and 1: not differentiated yet
        grads = c * (waiting * full + (layers - waiting) * full // fsdp) + embedding
        working = layer + _attention(config, c, rows, tp) + c * full
    phases = {  # (gradients, activations) live at three moments of the step
        # the backward pass begins: the logits' and the embedding's gradients
        "begin": (embedding, kept + logits + 2 * embedding + reduced + gathered),
        # it ends: every gradient, the first layer's activations (recomputed, with remat)
        "end": (grads, working),
        # the update: the gradients, and under loss scaling the unscaled copies and the
        # updated weights and moments the skip decision chooses between (four of each)
        "update": (16 * n if policy == "mixed_float16" else 4 * n, 0),
    }
    gradients, activations = max(phases.values(), key=sum)
    return MemoryEstimate(policy, 4 * n, gradients, optimizer, activations, config.remat)


def memory_table(config: GPTConfig, measured: dict | None = None, policies=POLICIES) -> str:
    """A Markdown table of `estimate_memory` for each policy, in GiB; with `measured`, the
    measured peak and the ratio.

    Args:
        config: GPTConfig. The model and batch.
        measured: dict or None. Policy -> bytes (e.g. GPU peaks from `kmp memory --measure
            gpu`). Defaults to None.
        policies: iterable of str. The rows. Defaults to every policy.

    Returns:
        str. The table.

    Example:
    >>> from kmp.gpt.config import preset
    >>> memory_table(preset("gpt2-124m"), policies=["float32"]).splitlines()[2].startswith(
    ...     "| float32 | 0.464 | 0.144 | 0.927 |")
    True
    """
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
        from kmp.gpt.compiled import compare, compiled_table

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
    import keras

    bits = re.search(r"\d+", keras.backend.standardize_dtype(dtype))
    return int(bits.group()) // 8 if bits else 1  # bool


def state_bytes(model) -> int:
    """Bytes of a model's variables and its optimizer's (what it keeps on the device between
    steps).

    Args:
        model: keras.Model. Built; its optimizer (if compiled) built too.

    Returns:
        int. Bytes, each variable counted once.

    Example:
    >>> import keras
    >>> state_bytes(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    32
    """
    seen, total = set(), 0
    optimizer = getattr(model, "optimizer", None)  # None before compile
    for v in [*model.variables, *getattr(optimizer, "variables", [])]:
        if id(v) not in seen:
            seen.add(id(v))
            total += math.prod(v.shape) * _itemsize(v.dtype)
    return total
