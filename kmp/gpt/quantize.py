"""Post-training quantization of a trained GPT run, with the price of each mode.

Keras 3.15 quantizes a built model in place (`Model.quantize`: int8, int4, GPTQ, AWQ). kmp
adds what a trained run needs around it, and works around what breaks:

- any source policy, through its float32 twin (same weights, float32 compute) where Keras
  fails in half precision: it refuses int8 when the compute dtype is float16 (its int8
  products, accumulated in int32, would overflow float16 when rescaled); its GPTQ stores each
  feature's group as `i / group_size`, a fraction that half precision rounds up into the next
  group (feature 511 of groups of 128 reads group 4 of 0-3 under bfloat16, and calibration
  fails);
- GPTQ and AWQ calibrate on windows of the run's own training tokens;
- saved models that reload to what was measured (`kmp._keras.gptq_awq_saveable`,
  `kmp._keras.restore_int4_reverse_inputs`, applied by `save` and `kmp.gpt.load_model`).

`quantize_run` measures each mode: validation loss and perplexity against the source, the
`.keras` file's size, the validation loss after a fresh load, and forward tokens/s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path

import keras
import numpy as np

import kmp
from kmp._keras import gptq_awq_saveable
from kmp.checkpoint import write_bytes_atomic
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import GPTConfig
from kmp.gpt.model import build_model, lm_loss, load_model

MODES = ("int8", "int4", "gptq", "awq")
GROUP_SIZE = 128  # int4 group size of GPTQ/AWQ, and Keras's default for int4


@dataclasses.dataclass
class Row:
    """One model's price. `delta_vs_source` is the relative change of the validation loss."""

    mode: str
    val_loss: float
    perplexity: float
    delta_vs_source: float
    size_bytes: int
    reload_val_loss: float
    tokens_per_sec: float
    note: str = ""


def parse_modes(text: str) -> list[str]:
    """Comma-separated modes, checked.

    Example:
    >>> parse_modes("int8,int4")
    ['int8', 'int4']
    """
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise UserError(f"Unknown quantization mode(s) {', '.join(unknown) or '(none)'}. Use "
                        f"some of: {', '.join(MODES)}.", field="modes")
    return modes


def compute_policy(policy: str, mode: str) -> str:
    """The policy the source model is rebuilt under before `mode` quantizes it (see the module
    docstring for why some are float32).

    Example:
    >>> compute_policy("mixed_float16", "int8"), compute_policy("mixed_bfloat16", "int8")
    ('float32', 'mixed_bfloat16')
    >>> compute_policy("mixed_bfloat16", "gptq"), compute_policy("mixed_bfloat16", "awq")
    ('float32', 'mixed_bfloat16')
    """
    half_fails = (mode == "int8" and policy == "mixed_float16") or (
        mode == "gptq" and policy != "float32")
    return "float32" if half_fails else policy


def quantize(model, mode: str, calibration=None, tokenizer=None, group_size=GROUP_SIZE):
    """Quantizes `model` in place with Keras's `Model.quantize`.

    Args:
        model: a built Keras model (a kmp GPT for "gptq"/"awq").
        mode: str. One of `MODES`, or "float8" (for training: `quantize_float8`).
        calibration: int array (samples, seq_len) of token ids, for "gptq"/"awq".
        tokenizer: the run's tokenizer, which Keras's GPTQ/AWQ configs require.
        group_size: int. Weights per int4 group for "int4"/"gptq"/"awq" (at most the model
            width for "gptq"/"awq").
    """
    config = None
    if mode in ("gptq", "awq"):
        if calibration is None or tokenizer is None:
            raise UserError(f"{mode} needs calibration tokens and the run's tokenizer.")
        config_class = (keras.quantizers.GPTQConfig if mode == "gptq"
                        else keras.quantizers.AWQConfig)
        config = config_class(dataset=calibration, tokenizer=tokenizer,
                              num_samples=len(calibration),
                              sequence_length=calibration.shape[1], group_size=group_size)
    elif mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=group_size)
    with warnings.catch_warnings():  # Keras names every layer it has nothing to quantize in
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        warnings.filterwarnings("ignore", message="Invalid quantization mode")
        model.quantize(mode, config=config)
    return model


def quantize_float8(model):
    """Makes every Dense/EinsumDense of a built `model` train in float8 (Keras's delayed
    scaling: e4m3 forward, e5m2 gradients, scales from an amax history). Call before compiling.
    """
    return quantize(model, "float8")


def save(model, path):
    """Saves `model` to a `.keras` file (atomically) that reloads to the same model."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    with gptq_awq_saveable(model):
        model.save(tmp)
    os.replace(tmp, path)


def val_loss(model, val_ds) -> float:
    """Mean next-token cross-entropy of `model` over `val_ds`."""
    model.compile(loss=lm_loss(), jit_compile=False)
    return float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])


def forward_speed(model, val_ds, repeats: int = 2) -> float:
    """Forward tokens/s over `val_ds` (after one untimed pass)."""
    batches = [val_ds[i][0] for i in range(len(val_ds))]
    model.predict_on_batch(batches[0])
    start, tokens = time.perf_counter(), 0
    for _ in range(repeats):
        for x in batches:
            keras.ops.convert_to_numpy(model.predict_on_batch(x))
            tokens += x["token_ids"].size
    return tokens / (time.perf_counter() - start)


def trained_model(config: GPTConfig, weights, policy: str):
    """A fresh model under `policy` holding `weights` (a run's model.keras, or a
    .weights.h5), without its FP32 islands yet (Keras cannot quantize a model holding unbuilt
    layers: `kmp.harden` comes after)."""
    kmp.set_policy(policy)
    model = build_model(config)
    model.load_weights(weights)
    return model


def read_run(run: Path) -> tuple[GPTConfig, str]:
    """A finished `kmp pretrain` run's config and the policy it trained under.

    Raises:
        UserError: when `run` is not a finished run.
    """
    for name in ("config.json", "metrics.json", "model.keras"):
        if not (run / name).is_file():
            raise UserError(f"{run} is not a finished kmp pretrain run (no {name}). Pass a "
                            "run's --out directory.", field="run")
    config = GPTConfig(**json.loads((run / "config.json").read_text()))
    return config, json.loads((run / "metrics.json").read_text())["policy"]


def quantize_run(run, modes, out, calibration_batches: int = 4, log=print) -> list[Row]:
    """Quantizes a finished `kmp pretrain` run every way in `modes` and prices each.

    Writes `out/<mode>.keras`, `out/source.keras` (the trained weights without the
    optimizer state that the run's model.keras also holds), `out/quantize.json` and
    `out/quantize.md` (the source's row first).

    Args:
        run: str or Path. The run's --out directory (config.json, metrics.json, model.keras).
        modes: list of str. Modes from `MODES`.
        out: str or Path. Where the quantized models and the tables go.
        calibration_batches: int. Training batches whose windows calibrate GPTQ and AWQ.
        log: callable. Where progress lines go.

    Returns:
        The rows, the source's first.

    Raises:
        UserError: when `run` is not a finished run.
    """
    run, out = Path(run).expanduser(), Path(out).expanduser()
    config, policy = read_run(run)
    out.mkdir(parents=True, exist_ok=True)
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir, log=log)
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches)
    calibration = np.concatenate([
        data.window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)[0]
        for i in range(calibration_batches)])

    source = kmp.harden(trained_model(config, run / "model.keras", policy))  # as it was trained
    base = val_loss(source, val_ds)
    save(source, out / "source.keras")  # the weights alone, as the quantized files hold them
    rows = [Row(f"source ({policy})", base, math.exp(base), 0.0,
                (out / "source.keras").stat().st_size,
                val_loss(load_model(out / "source.keras"), val_ds), forward_speed(source, val_ds))]
    for mode in modes:
        used = compute_policy(policy, mode)
        log(f"quantize: {mode} (from the model under {used})")
        model = kmp.harden(quantize(trained_model(config, run / "model.keras", used), mode,
                                    calibration, cache.tokenizer(),
                                    min(GROUP_SIZE, config.hidden_dim)))
        loss = val_loss(model, val_ds)
        path = out / f"{mode}.keras"
        save(model, path)
        reloaded = val_loss(load_model(path), val_ds)
        why = ("Keras's int8 refuses float16 compute" if mode == "int8"
               else "Keras's GPTQ group indices break in half precision")
        note = f"from the float32 twin: {why}" if used != policy else ""
        rows.append(Row(mode, loss, math.exp(loss), loss / base - 1, path.stat().st_size,
                        reloaded, forward_speed(model, val_ds), note))
    write_bytes_atomic(out / "quantize.json",
                       json.dumps([dataclasses.asdict(r) for r in rows], indent=2).encode())
    write_bytes_atomic(out / "quantize.md", table(rows).encode())
    return rows


def table(rows) -> str:
    """The rows as a Markdown table."""
    lines = ["| mode | val loss | perplexity | vs source | size (MB) | after reload | "
             "forward tokens/s | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.val_loss:.4f} | {r.perplexity:.1f} | "
                     f"{r.delta_vs_source:+.2%} | {r.size_bytes / 1e6:.2f} | "
                     f"{r.reload_val_loss:.4f} | {r.tokens_per_sec:,.0f} | {r.note} |")
    return "\n".join(lines) + "\n"
