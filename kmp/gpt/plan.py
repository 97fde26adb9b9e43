"""`kmp plan`: what fits? A model size, a GPU and a device count in; for every precision,
rematerialization and sharding, the bytes per device, the largest micro-batch that fits and
the gradient accumulation that reaches the global batch out, cheapest first.

The bytes are `kmp.gpt.memory.estimate_memory`'s (the model of memory that docs/memory.md
checks against XLA's plan for an H100); the chosen setting is then compiled for the GPU itself
(`kmp.gpt.compiled`, no GPU needed) and XLA's plan printed beside it. Where nothing fits, the
plan says why and what would.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

from kmp.errors import UserError
from kmp.gpt.config import GPTConfig, preset
from kmp.gpt.memory import GIB, estimate_memory, param_count

USABLE = 0.9  # of a GPU's memory: the rest goes to the CUDA context, workspaces, fragmentation
REMATS = ("none", "blocks")
VOCAB, SEQ = 50304, 1024  # GPT-2's (padded) vocabulary and context for --params shapes


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to train the model on the devices, and what it costs per device."""

    precision: str
    remat: str
    shard: str  # "" (data-parallel, replicated), "fsdp", "tp" or "fsdp+tp"
    mesh: str  # "" on one device, else "data=D,model=M"
    micro_batch: int  # sequences per data-parallel replica per micro-step; 0: none fits
    grad_accum: int
    bytes: int  # per device, at the micro-batch (at 1 where none fits)
    fits: bool


def parse_params(text: str) -> int:
    """A parameter count from "1b", "350m", "1.3B", "7e9".

    Args:
        text: str. A number with an optional k, m, b or t suffix (case-insensitive).

    Returns:
        int. The count.

    Raises:
        UserError: for text that is not such a count, or a count under a million.

    Example:
    >>> parse_params("1.5b")
    1500000000
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise UserError(f"Cannot read --params {text!r}. Give a count such as 350m, 1b or 1.3b.",
                        field="params")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[
        match.group(2)]
    if value < 1e6:
        raise UserError(f"--params {text!r} is under a million parameters. Give a count such "
                        "as 350m or 1b.", field="params")
    return int(value)


def shape_for_params(n: int) -> GPTConfig:
    """A GPT-2-architecture config of about `n` parameters: width a multiple of 128, 64- or
    128-wide heads, width/depth between 48 and 128 as in GPT-3's family (Brown et al. 2020,
    table 2.1), GPT-2's vocabulary and 1024-token context.

    Args:
        n: int. The parameter count to come near.

    Returns:
        GPTConfig. The shape (depth, width, heads) whose `param_count` is nearest `n`.

    Raises:
        UserError: when no shape within those bounds exists (under about 10 million, or
            beyond a trillion parameters).

    Example:
    >>> c = shape_for_params(10**9)
    >>> (c.num_layers, c.hidden_dim, round(param_count(c) / 1e9, 2))
    (18, 2048, 1.01)
    """
    best = None
    for layers in range(2, 129, 2):
        # 12·L·h² + (V + S)·h ≈ n, for h
        a, b = 12 * layers, VOCAB + SEQ
        h = 128 * max(1, round((-b + math.sqrt(b * b + 4 * a * n)) / (2 * a) / 128))
        if not 48 <= h / layers <= 128:
            continue
        heads = h // (128 if h >= 2048 else 64)
        config = GPTConfig(preset=f"gpt-{_label(n)}", vocab_size=VOCAB, num_layers=layers,
                           num_heads=heads, hidden_dim=h, intermediate_dim=4 * h, seq_len=SEQ)
        error = abs(param_count(config) - n) / n
        if best is None or error < best[0] - 1e-9:
            best = (error, config)
    if best is None:
        raise UserError(f"No GPT shape of about {n:,} parameters. Give --params between 10m "
                        "and 1t, or a --preset.", field="params")
    return best[1]


def _label(n: int) -> str:
    """3 significant digits: "1.5b", "464m"."""
    return f"{n / 1e9:.3g}b" if n >= 1e9 else f"{n / 1e6:.3g}m"


def _precisions(capability: tuple) -> list[str]:
    """Cheapest first: 16-bit compute where Tensor Cores run it, bfloat16 (no loss scaling)
    from compute capability 8.0 on (Ampere)."""
    if capability >= (8, 0):
        return ["mixed_bfloat16", "mixed_float16", "float32"]
    return ["mixed_float16", "float32"]


def _meshes(config: GPTConfig, devices: int) -> list[tuple[str, str]]:
    """(shard, mesh) for `devices`: replicated, fsdp, tp and fsdp+tp where they divide."""
    from kmp.gpt import sharding

    if devices == 1:
        return [("", "")]
    found = [("", f"data={devices}")]
    candidates = [("fsdp", {"data": devices, "model": 1}), ("tp", {"data": 1, "model": devices})]
    for m in (2, 4, 8):
        if m < devices and devices % m == 0:
            candidates.append(("fsdp+tp", {"data": devices // m, "model": m}))
    for shard, sizes in candidates:
        try:  # the shapes only: a batch of one row per data-parallel device
            sharding.check(dataclasses.replace(config, batch_size=sizes["data"]), sizes, shard)
        except UserError:
            continue
        found.append((shard, f"data={sizes['data']},model={sizes['model']}"))
    return found


def _data_axis(mesh: str) -> int:
    """The data axis of a "data=D,model=M" mesh (1 without one)."""
    from kmp.gpt.sharding import parse_mesh

    return parse_mesh(mesh).get("data", 1)


def what_fits(config: GPTConfig, memory: int, devices: int = 1, global_batch: int = 256,
         capability: tuple = (9, 0)) -> list[Setting]:
    """Every setting of precision, remat and sharding, each at its largest micro-batch that
    fits in `memory` per device (`USABLE` of it), cheapest first: no recomputation before
    recomputation, 16-bit before float32, no sharding before fsdp before tp, fewer
    accumulation steps first; those that do not fit last.

    Args:
        config: GPTConfig. The model and sequence length.
        memory: int. Bytes of one device.
        devices: int. Devices. Defaults to 1.
        global_batch: int. Sequences per optimizer step. Defaults to 256.
        capability: tuple. The GPU's compute capability. Defaults to (9, 0).

    Returns:
        A list of `Setting`, one per precision, remat and sharding, fitting ones first.

    Example:
    >>> settings = what_fits(preset("gpt2-124m"), 8 * 2**30, global_batch=64,
    ...                      capability=(8, 9))
    >>> s = settings[0]
    >>> (s.precision, s.remat, s.fits, s.micro_batch * s.grad_accum >= 64)
    ('mixed_bfloat16', 'none', True, True)
    """
    usable = int(memory * USABLE)
    settings = []
    for precision in _precisions(capability):
        for remat in REMATS:
            for shard, mesh in _meshes(config, devices):
                data = _data_axis(mesh)
                best, size, accum, b = 0, None, 0, 1
                while b <= max(1, global_batch // data):  # micro-batches of 1, 2, 4, ...
                    steps = math.ceil(global_batch / (b * data))
                    shaped = dataclasses.replace(config, batch_size=b * data, remat=remat,
                                                 mesh=mesh, shard=shard, grad_accum=steps)
                    need = estimate_memory(shaped, precision).total
                    if need > usable:
                        size = size or need
                        break
                    best, size, accum = b, need, steps
                    b *= 2
                settings.append(Setting(precision, remat, shard, mesh, best, accum, size,
                                        best > 0))
    rank = {p: i for i, p in enumerate(_precisions(capability))}
    shards = {"": 0, "fsdp": 1, "tp": 2, "fsdp+tp": 3}
    settings.sort(key=lambda s: (not s.fits, s.remat != "none", rank[s.precision],
                                 shards[s.shard], s.grad_accum))
    return settings


def why_not(config: GPTConfig, memory: int, devices: int, capability: tuple) -> str:
    """Why nothing fits, and what would: more devices with fsdp, or a smaller model.

    Args:
        config: GPTConfig. The model.
        memory: int. Bytes of one device.
        devices: int. Devices.
        capability: tuple. The GPU's compute capability.

    Returns:
        str. Lines: the state's bytes against the devices', the device count that fits, the
        largest model that fits on one device, and fine-tuning as the alternative.

    Example:
    >>> why_not(preset("gpt2-1.5b"), 8 * 2**30, 1, (8, 9)).startswith("does not fit")
    True
    """
    n = param_count(config)
    usable = memory * USABLE
    lines = [f"does not fit: the float32 weights, gradients and AdamW's two moments alone "
             f"need {16 * n / GIB:.1f} GiB (16 bytes per parameter under every policy: Keras "
             f"keeps float32 master weights), and {devices} device(s) of {usable / GIB:.1f} GiB "
             f"usable hold {devices * usable / GIB:.1f} GiB"
             f"{'' if devices > 1 else ' (sharding needs more than one)'}."]
    for more in (2, 4, 8, 16, 32, 64):
        settings = what_fits(config, memory, more, more, capability) if more > devices else []
        fitting = [s for s in settings if s.fits]
        if fitting:
            how = fitting[0]
            lines.append(f"  it fits on {more} such GPUs: {how.precision}, remat {how.remat}, "
                         f"--mesh {how.mesh}{f' --shard {how.shard}' if how.shard else ''}.")
            break
    lo, hi = 10**7, n
    while hi - lo > max(lo // 50, 10**6):  # the largest model that fits on one device
        mid = (lo + hi) // 2
        fits = any(s.fits for s in what_fits(shape_for_params(mid), memory, 1, 1, capability))
        lo, hi = (mid, hi) if fits else (lo, mid)
    lines.append(f"  on one such GPU, a GPT of about {_label(lo)} parameters fits "
                 f"(kmp plan --params {_label(lo)}).")
    lines.append("  fine-tuning rather than pretraining trains far fewer parameters: LoRA "
                 "adapters on a frozen (or int8/int4) base (kmp finetune --preset DIR --lora 8).")
    return "\n".join(lines)


def table(settings: list[Setting]) -> str:
    """A Markdown table of `settings`, one row each, in GiB per device.

    Args:
        settings: list of `Setting`. From `what_fits`.

    Returns:
        str. The table.

    Example:
    >>> print(table([Setting("float32", "none", "", "", 2, 4, 2**31, True)]).splitlines()[2])
    | float32 | none | - | 2 | 4 | 2.00 | yes |
    """
    lines = ["| precision | remat | sharding | micro-batch | grad. accumulation | GiB per "
             "device | fits |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        where = f"{s.shard or 'replicated'} ({s.mesh})" if s.mesh else "-"
        lines.append(f"| {s.precision} | {s.remat} | {where} | {s.micro_batch or '-'} | "
                     f"{s.grad_accum or '-'} | {s.bytes / GIB:.2f} | "
                     f"{'yes' if s.fits else 'no'} |")
    return "\n".join(lines)


def nearest_check(config: GPTConfig, precision: str, remat: str, shard: str = "") -> str | None:
    """How close the estimate was to XLA's H100 plan on the nearest measured GPT-2 size.

    Args:
        config: GPTConfig. The model (its parameter count picks the nearest measured size).
        precision: str. The policy.
        remat: str. "none" or "blocks".
        shard: str. The sharding ("" for one GPU or replicated): a measured row sharded the
            same way is cited where there is one, else the one-GPU rows. Defaults to "".

    Returns:
        str or None. One sentence citing `kmp.gpt.memory_checks`; None where no row of that
        policy and remat was measured.

    Example:
    >>> nearest_check(preset("gpt2-124m"), "mixed_bfloat16", "none").startswith("the estimate")
    True
    """
    from kmp.gpt.memory_checks import CHECKS

    rows = [c for c in CHECKS if c["policy"] == precision and c["remat"] == remat]
    same = [c for c in rows if c["shard"] == shard and (shard or c["devices"] == 1)]
    rows = same or [c for c in rows if c["devices"] == 1]
    if not rows:
        return None
    n = param_count(config)
    row = min(rows, key=lambda c: abs(math.log(c["params"] / n)))
    where = f" on {row['devices']} GPUs ({row['shard']})" if row["devices"] > 1 else ""
    return (f"the estimate was {row['ratio']:.3f}x XLA's H100 plan for {row['preset']}{where} "
            f"under {precision}, remat {remat} (the nearest measured size; docs/memory.md)")


def main(argv: list[str]) -> int:
    """`kmp plan`: what fits on a GPU (see the module docstring).

    Args:
        argv: list of str. The options after `kmp plan`.

    Returns:
        0 when a setting fits, 1 when none does.

    Raises:
        UserError: for an unknown preset, GPU or parameter count.
    """
    from kmp.gpt.gpus import GPUS, gpu

    parser = argparse.ArgumentParser(prog="kmp plan", description="What fits on a GPU: per "
                                     "precision, remat and sharding, the bytes per device, the "
                                     "largest micro-batch and the accumulation it needs.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--preset", help="a kmp preset (gpt2-124m ... gpt-6.7b)")
    size.add_argument("--params", help="a model size: 350m, 1b, 1.3b, 7b (a GPT-2-shaped model)")
    parser.add_argument("--device", default="h100-80gb", help=f"the GPU: {', '.join(GPUS)}")
    parser.add_argument("--devices", type=int, default=1, help="how many of them")
    parser.add_argument("--global-batch", type=int, default=256,
                        help="sequences per optimizer step (default 256)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the "
                        "preset's, 1024 for --params)")
    parser.add_argument("--attention", choices=("island", "fused"), default="island",
                        help="the attention kernel to count: kmp's float32 island (seq x seq "
                        "scores) or a fused flash kernel (softmax statistics only)")
    parser.add_argument("--check", choices=("compile", "none"), default="compile",
                        help="compile the chosen setting for the GPU and show XLA's plan "
                        "(default; needs pip install 'kmp[plan]')")
    opts = parser.parse_args(argv)
    if opts.devices < 1 or opts.global_batch < 1:
        raise UserError(f"--devices and --global-batch must be >= 1. Received: "
                        f"{opts.devices} and {opts.global_batch}")
    try:
        device = gpu(opts.device)
    except UserError as error:
        error.field = "device"  # this command's option
        raise
    config = shape_for_params(parse_params(opts.params)) if opts.params else preset(
        opts.preset or "gpt2-124m")
    config = dataclasses.replace(config, seq_len=opts.seq_len or config.seq_len,
                                 attention=opts.attention)
    n = param_count(config)
    print(f"kmp plan: {config.preset}, {n / 1e9:.2f}B parameters ({config.num_layers} layers x "
          f"{config.hidden_dim}, {config.num_heads} heads, {config.seq_len} tokens) on "
          f"{opts.devices} x {device.name} ({device.memory / GIB:.1f} GiB, "
          f"{USABLE * device.memory / GIB:.1f} usable), global batch {opts.global_batch} "
          "sequences")
    settings = what_fits(config, device.memory, opts.devices, opts.global_batch,
                         device.capability)
    print(table(settings))
    if not settings[0].fits:
        print(why_not(config, device.memory, opts.devices, device.capability))
        return 1
    best = settings[0]
    print(f"cheapest that fits: {best.precision}, remat {best.remat}"
          f"{f', --mesh {best.mesh} --shard {best.shard}' if best.shard else ''}"
          f"{f', --mesh {best.mesh}' if best.mesh and not best.shard else ''}, micro-batch "
          f"{best.micro_batch} x {best.grad_accum} accumulation steps: "
          f"{best.bytes / GIB:.2f} GiB per device (estimate)")
    note = nearest_check(config, best.precision, best.remat, best.shard)
    if note:
        print(f"  {note}")
    if opts.check == "compile":
        from kmp.gpt import compiled

        key = next(k for k, v in GPUS.items() if v is device)
        print(f"  compiling it for {key} ...", flush=True)
        rows = best.micro_batch * _data_axis(best.mesh or f"data={opts.devices}")
        shaped = dataclasses.replace(config, batch_size=rows, remat=best.remat, mesh=best.mesh,
                                     shard=best.shard, grad_accum=best.grad_accum)
        try:
            xla = compiled.compiled_plan(shaped, best.precision, key, opts.devices, best.mesh,
                                         best.shard)
        except UserError as error:  # say it with this command's options
            error.field = {"target": "device", "gpus": "devices"}.get(error.field, error.field)
            raise
        verdict = "fits" if xla.total <= USABLE * device.memory else "does NOT fit"
        print(f"  XLA's plan for {key}: {xla.total / GIB:.2f} GiB per device "
              f"(estimate / XLA {best.bytes / xla.total:.2f}): {verdict}")
    return 0
