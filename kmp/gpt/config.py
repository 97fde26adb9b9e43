"""The GPT recipe's config: a typed dataclass whose defaults are the small CPU run, and presets.

`tiny` (the default) was timed: 2 min 58 s for `kmp pretrain` on a 2-core AVX512_BF16 CPU with
an empty cache (docs/pretraining.md). `small` is sized for `kmp bench` on a CPU (about 1.1 s a
step there) and was not trained to the end; the GPT-2 presets follow Radford et al. 2019.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import warnings

from kmp.errors import UserError
from kmp.policy import CHOICES

STRATEGIES = ("default", "mirrored")
# Fields only a training run (`kmp pretrain`) reads: the measuring commands (bench, memory,
# the diagnoses) leave them out of their --help.
RUN_ONLY = ("jit", "strategy", "processes", "mesh", "shard", "prompt", "samples", "resume",
            "val_every", "val_batches", "recover", "max_skips", "spike_factor", "spike_window",
            "recover_attempts", "recover_stretch", "inject_fault", "float8")
# What a resumed run cannot change, and why (kmp.checkpoint.prepare_run).
RESUME_FIXED = {
    **{k: "model shape" for k in ("vocab_size", "num_layers", "num_heads", "hidden_dim",
                                  "intermediate_dim", "seq_len")},
    "grad_accum": "gradient accumulation, which the optimizer and its learning-rate schedule "
                  "count in micro-batches",
    "corpus": "corpus, whose text the data positions index",
    "seed": "seed, which orders the data",
    "float8": "weights layout, float8 adding scale variables",
}


def pad_vocab(size: int, multiple: int = 64) -> int:
    """Rounds a vocabulary size up to a multiple of 64, so the logits matmul suits Tensor Cores.

    Example:
    >>> pad_vocab(50257)
    50304
    """
    return -(-size // multiple) * multiple


@dataclasses.dataclass
class GPTConfig:
    """Everything a pretraining run needs; the defaults are the `tiny` CPU run.

    Args:
        preset: str. Name of the preset this config came from.
        vocab_size: int. BPE vocabulary size (padded up to a multiple of 64).
        num_layers: int. Transformer blocks.
        num_heads: int. Attention heads per block.
        hidden_dim: int. Model width (a multiple of num_heads).
        intermediate_dim: int. Width of each block's MLP.
        seq_len: int. Training window length in tokens (the model's maximum length).
        dropout: float. Dropout in the backbone.
        batch_size: int. Sequences per micro-batch, all replicas together (an optimizer step
            sees batch_size x grad_accum).
        grad_accum: int. Micro-steps per optimizer update (1 = none).
        steps: int. Optimizer steps to train.
        learning_rate: float. Peak AdamW learning rate.
        weight_decay: float. AdamW weight decay (not on norms, biases or embeddings).
        grad_clip: float. Global gradient-norm clip (0: none).
        warmup_steps: int. Linear warm-up before cosine decay (at most `steps`; a preset
            run for fewer steps than its own keeps its warm-up's share of them).
        val_every: int. Steps between validation evaluations (and checkpoints); lowered to
            the largest divisor of `steps` below it (an error if that is under half).
        val_batches: int. Batches of held-out windows per validation.
        precision: str. auto, float32, mixed_float16 or mixed_bfloat16.
        jit: bool or None. XLA; None takes the precision plan's recommendation.
        logits: str. Where the tied vocabulary projection multiplies: "compute" (the compute
            dtype: float16/bfloat16 Tensor Cores or AMX; the loss upcasts the logits to
            float32) or "float32" (keras-hub's default under mixed policies).
        remat: str. Rematerialization (gradient checkpointing, `keras.RematScope`): "none",
            "blocks" (each transformer block keeps only its input for the backward pass and
            recomputes the rest) or "full" (every layer). The same losses, more compute;
            the memory saved is the compiler's to realize (docs/pretraining.md).
        attention: str. The attention kernel under a mixed policy: "auto" (measured once on
            this machine and cached: Keras's fused kernel where its probabilities are as
            precise as kmp's float32 island, the island elsewhere; `kmp.harden`), "island"
            or "fused".
        strategy: str. "default" or "mirrored".
        processes: int. Worker processes training data-parallel on the JAX backend
            (`kmp.distributed`); 1: this process alone.
        mesh: str. Train on a device mesh, "data=D,model=M" (JAX backend,
            `kmp.gpt.sharding`): the batch split over D, and what `shard` says over both;
            the mesh spans every process's devices. Empty: no mesh.
        shard: str. What the mesh splits besides the batch: "fsdp" (every weight and its
            optimizer state over the data axis), "tp" (attention and MLP Megatron-style over
            the model axis), "fsdp+tp" (both). Empty: nothing (data parallelism).
        corpus: str. "stdlib", or a file, directory or glob of UTF-8 text.
        cache_dir: str. Where tokenizers and token caches are kept between runs.
        prompt: str. Prompt for the samples written at the end.
        samples: int. How many samples to write (0: none).
        out: str. Output directory.
        seed: int. Seed for data order and initialization.
        resume: bool. Continue from the checkpoint in `out`.
        recover: bool. When the run breaks (skip budget spent, loss spike, non-finite loss or
            weights), roll back to the last checkpoint, skip the data that led there and
            retry, lowering the learning rate and then precision if it recurs
            (`kmp.recovery`).
        max_skips: int. Consecutive skipped optimizer steps (loss scaling) that make an
            overflow storm: recovered from, or without `recover` the run stops. Under
            `grad_accum` the scaler skips micro-batches: the budget is max_skips x grad_accum
            consecutive skipped micro-batches.
        spike_factor: float. A step whose loss exceeds this times the median of the last
            `spike_window` steps is a spike.
        spike_window: int. Steps in that running median.
        recover_attempts: int. Recoveries from a recurring event before the run stops.
        recover_stretch: int. Steps within which an event counts as the previous one
            recurring, and for which a halved learning rate lasts.
        float8: bool. Train the dense layers in float8 (Keras's delayed-scaling
            quantize-dequantize, `model.quantize("float8")`) on top of the mixed policy. Only
            Hopper-class GPUs have float8 matmuls; elsewhere it is simulated (slower).
        inject_fault: str. Rehearse a failure: KIND@STEP[xCOUNT], comma-separated, KIND one
            of nan, inf (gradients) or spike (the loss times 100), STEP counted in the data
            stream's positions, e.g. nan@200x30 or spike@300; inf@5:1 puts the overflow in
            worker 1's rows only (--processes). Empty: none.
    """

    preset: str = "tiny"
    vocab_size: int = 2048
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 128
    intermediate_dim: int = 512
    seq_len: int = 128
    dropout: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 600
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 30
    val_every: int = 100
    val_batches: int = 16
    precision: str = "auto"
    jit: bool | None = None
    logits: str = "compute"
    remat: str = "none"
    attention: str = "auto"
    strategy: str = "default"
    processes: int = 1
    mesh: str = ""
    shard: str = ""
    corpus: str = "stdlib"
    cache_dir: str = "~/.cache/kmp"
    prompt: str = "def"
    samples: int = 3
    out: str = "runs/tiny"
    seed: int = 0
    resume: bool = False
    recover: bool = True
    max_skips: int = 20
    spike_factor: float = 1.5  # kmp.recovery.SPIKE_FACTOR (measured: docs/reliability.md)
    spike_window: int = 50  # kmp.recovery.SPIKE_WINDOW
    recover_attempts: int = 4
    recover_stretch: int = 100
    float8: bool = False
    inject_fault: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raises UserError, saying what was received, for any inconsistent field."""
        positive = ("vocab_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim",
                    "seq_len", "batch_size", "grad_accum", "steps", "val_every", "val_batches",
                    "max_skips", "spike_window", "recover_attempts", "recover_stretch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer. Received: {name}={value!r}",
                                field=name)
        if self.hidden_dim % self.num_heads:
            raise UserError(
                f"hidden_dim must be divisible by num_heads. Received: hidden_dim="
                f"{self.hidden_dim}, num_heads={self.num_heads}", field="num_heads")
        if self.precision not in CHOICES:
            raise UserError(
                f"Unknown precision {self.precision!r}. Use one of: {', '.join(CHOICES)}.",
                field="precision")
        if self.logits not in ("compute", "float32"):
            raise UserError(f"Unknown logits {self.logits!r}. Use one of: compute, float32.",
                            field="logits")
        if self.remat not in ("none", "blocks", "full"):
            raise UserError(f"Unknown remat {self.remat!r}. Use one of: none, blocks, full.",
                            field="remat")
        if self.attention not in ("auto", "island", "fused"):
            raise UserError(f"Unknown attention {self.attention!r}. Use one of: auto, island, "
                            "fused.", field="attention")
        if self.strategy not in STRATEGIES:
            raise UserError(
                f"Unknown strategy {self.strategy!r}. Use one of: {', '.join(STRATEGIES)}.",
                field="strategy")
        if self.processes < 1:
            raise UserError(f"processes must be >= 1. Received: {self.processes}",
                            field="processes")
        if self.batch_size % self.processes:
            raise UserError(f"batch_size {self.batch_size} (the global batch) does not split "
                            f"over {self.processes} processes. Use a multiple of "
                            f"{self.processes}.", field="batch_size")
        if self.processes > 1 and self.strategy == "mirrored":
            raise UserError("--strategy mirrored spreads one process over its local devices; "
                            "--processes already spreads the run over processes (one device "
                            "each). Drop one of them.", field="processes")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1). Received: dropout={self.dropout!r}",
                            field="dropout")
        self.vocab_size = pad_vocab(self.vocab_size)
        if self.vocab_size > 65536:
            raise UserError(f"vocab_size must be at most 65536 (tokens are stored as uint16). "
                            f"Received: vocab_size={self.vocab_size}", field="vocab_size")
        if self.mesh or self.shard:
            from kmp.gpt.sharding import check  # plain Python: Keras stays unloaded

            check(self)
        if self.samples < 0:
            raise UserError(f"samples must be >= 0. Received: {self.samples}", field="samples")
        if not self.spike_factor > 1:
            raise UserError(f"spike_factor must be > 1. Received: {self.spike_factor}",
                            field="spike_factor")
        if self.inject_fault:
            from kmp.faults import parse_faults  # loads Keras: only for a rehearsal

            parse_faults(self.inject_fault)
        for name, low in (("learning_rate", "> 0"), ("weight_decay", ">= 0"),
                          ("grad_clip", ">= 0 (0: no clipping)")):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0))
            if not ok:
                raise UserError(f"{name} must be a finite number {low}. Received: "
                                f"{name}={value!r}", field=name)
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise UserError(f"warmup_steps must be an integer from 0 to steps ({self.steps}). "
                            f"Received: warmup_steps={self.warmup_steps!r}. Give a shorter "
                            "warm-up with the steps.",
                            field="warmup_steps")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0. Received: seed={self.seed!r}",
                            field="seed")

    def intervals(self, done: int = 0) -> tuple[int, int]:
        """How the steps left after `done` split into validation intervals: (steps between
        validations, how many), the interval the largest divisor of the steps left not
        above `val_every`.

        Raises:
            UserError: when `done` reaches `steps`, or when no divisor is within half of
                `val_every` (the validations could not be evenly spaced).

        Example:
        >>> GPTConfig(steps=250, val_every=100).intervals()
        (50, 5)
        >>> GPTConfig(steps=250, val_every=100).intervals(done=100)
        (75, 2)
        """
        left = self.steps - done
        if left < 1:
            raise UserError(f"steps={self.steps}, but the run has already trained {done} "
                            "steps. Raise steps to train on.", field="steps")
        wanted = min(self.val_every, left)
        interval = wanted
        while left % interval:
            interval -= 1
        if interval * 2 < wanted:
            where = f"the {left} steps left after step {done}" if done else f"steps={left}"
            raise UserError(
                f"{where} has no divisor near val_every={self.val_every}, so the validations "
                "cannot be evenly spaced. Pick steps as a multiple of val_every.", field="steps")
        return interval, left // interval

    def to_json(self) -> str:
        """The whole config as indented JSON (what a run saves as config.json)."""
        return json.dumps(dataclasses.asdict(self), indent=2)


def from_json(data: dict, log=None) -> GPTConfig:
    """A config from a saved config.json's fields: unknown fields (from another kmp version)
    are left out with a warning naming them (through `log` when given, else `warnings`),
    missing ones take the defaults.

    Example:
    >>> from_json({"steps": 20, "val_every": 10, "warmup_steps": 2}).steps
    20
    """
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        message = (f"config.json: ignoring field(s) this kmp does not know: "
                   f"{', '.join(unknown)}")
        if log is None:
            warnings.warn(message, stacklevel=2)
        else:
            log(f"warning: {message}")
    return GPTConfig(**{k: v for k, v in data.items() if k in fields})


def _tiny():
    return GPTConfig()


def _small():
    return GPTConfig(preset="small", vocab_size=8192, num_layers=4, num_heads=8, hidden_dim=256,
                     intermediate_dim=1024, seq_len=256, batch_size=16, steps=2000,
                     learning_rate=1e-3, warmup_steps=100, val_every=200, out="runs/small")


def _gpt2(name, layers, hidden, heads):
    return GPTConfig(preset=name, vocab_size=50257, num_layers=layers, num_heads=heads,
                     hidden_dim=hidden, intermediate_dim=4 * hidden, seq_len=1024, dropout=0.0,
                     batch_size=16, grad_accum=1, steps=20000, learning_rate=6e-4,
                     warmup_steps=700, val_every=500, out=f"runs/{name}")


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "gpt2-124m": lambda: _gpt2("gpt2-124m", 12, 768, 12),  # GPT-2 small
    "gpt2-355m": lambda: _gpt2("gpt2-355m", 24, 1024, 16),  # GPT-2 medium
    "gpt2-774m": lambda: _gpt2("gpt2-774m", 36, 1280, 20),  # GPT-2 large
    "gpt2-1.5b": lambda: _gpt2("gpt2-1.5b", 48, 1600, 25),  # GPT-2 XL
    # GPT-3 6.7B's shape (Brown et al. 2020, table 2.1) in GPT-2's architecture, for planning.
    "gpt-6.7b": lambda: _gpt2("gpt-6.7b", 32, 4096, 32),
}


def preset(name: str = "tiny", **overrides) -> GPTConfig:
    """Returns the named preset with `overrides` applied (and validated).

    Args:
        name: str. One of `PRESETS`. Defaults to "tiny".
        **overrides: Any `GPTConfig` field.

    Raises:
        UserError: for an unknown preset or field, or an invalid value.

    Example:
    >>> preset("gpt2-124m").vocab_size
    50304
    """
    if name not in PRESETS:
        raise UserError(f"Unknown preset {name!r}. Use one of: {', '.join(PRESETS)}.",
                        field="preset")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"Unknown config field(s): {', '.join(unknown)}. Use fields of "
                        "GPTConfig.")
    base = PRESETS[name]()
    if "steps" in overrides and "warmup_steps" not in overrides:  # the preset's share of steps
        steps = overrides["steps"]
        if isinstance(steps, int) and 0 < steps < base.steps:
            overrides["warmup_steps"] = round(base.warmup_steps * steps / base.steps)
    return dataclasses.replace(base, **overrides)


def _field_help() -> dict:
    """Each field's description, from the Args section of GPTConfig's docstring."""
    helps, names = {}, []
    for line in GPTConfig.__doc__.split("Args:")[1].splitlines():
        head, sep, text = line.strip().partition(": ")
        if sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            for name in names:
                helps[name] = text
        elif line.strip() and names:
            for name in names:
                helps[name] += " " + line.strip()
    return helps


def add_arguments(parser: argparse.ArgumentParser, exclude=()) -> None:
    """Adds `--preset` and one `--field-name` option per config field (default: the preset's),
    except the fields in `exclude` (those a command does not use)."""
    parser.add_argument("--preset", default="tiny", help="named config to start from: "
                        f"{', '.join(PRESETS)} (default: tiny)")
    helps = _field_help()
    for f in dataclasses.fields(GPTConfig):
        if f.name == "preset" or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))
        text = helps.get(f.name, "").replace("%", "%%") + " (default: the preset's)"
        if kind is None:  # bool and bool | None
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


def from_args(args: argparse.Namespace) -> GPTConfig:
    """The preset named by `args.preset`, with every option the user gave applied."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig)
             if f.name != "preset" and getattr(args, f.name, None) is not None}
    return preset(args.preset, **given)
