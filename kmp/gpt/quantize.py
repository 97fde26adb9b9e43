"""Post-training quantization of a trained GPT run, with the price of each mode.

Keras 3.15 quantizes a built model in place (`Model.quantize`: int8, int4, GPTQ, AWQ). kmp
adds what a trained run needs around it, and works around what breaks:

- any source policy, through its float32 twin (same weights, float32 compute) where Keras
  fails in half precision: it refuses int8 when the compute dtype is float16 (its int8
  products, accumulated in int32, would overflow float16 when rescaled); its GPTQ stores each
  feature's group as `i / group_size`, a fraction that half precision rounds up into the next
  group (feature 511 of groups of 128 reads group 4 of 0-3 under bfloat16, and calibration
  fails);
- GPTQ and AWQ calibrate, on exactly the windows of the run's own training tokens kmp gives
  them: in Keras 3.15.1 their hooks never see an activation (both give round-to-nearest
  kernels), GPTQ propagates its rounding errors through the wrong inverse Hessian, and the
  windows are cut anew at an offset salted per process (`kmp._keras.gptq_awq_calibration`);
- saved models that reload to what was measured (`kmp._keras.gptq_awq_saveable`,
  `kmp._keras.restore_int4_reverse_inputs`, applied by `save` and `kmp.gpt.load_model`).

`quantize_run` measures each mode: validation loss and perplexity against the source, the
`.keras` file's size, the validation loss after a fresh load, and forward tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

import kmp
from kmp._keras import gptq_awq_calibration, gptq_awq_saveable
from kmp._keras import quantize as keras_quantize
from kmp.checkpoint import write_bytes_atomic
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.model import lm_loss, load_model
from kmp.gpt.run import open_run

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


def quantize_model(model, mode: str, calibration=None, tokenizer=None, group_size=GROUP_SIZE):
    """Quantizes `model` in place with Keras's `Model.quantize`.

    Args:
        model: a built Keras model (a kmp GPT for "gptq"/"awq").
        mode: str. One of `MODES`.
        calibration: int array (samples, seq_len) of token ids, for "gptq"/"awq": the
            windows they calibrate on, as they are.
        tokenizer: the run's tokenizer, which Keras's GPTQ/AWQ configs require.
        group_size: int. Weights per int4 group for "int4"/"gptq"/"awq" (at most the model
            width for "gptq"/"awq").

    Returns:
        `model`.
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
    calibrating = (gptq_awq_calibration(calibration) if mode in ("gptq", "awq")
                   else contextlib.nullcontext())
    interactive = keras.config.is_interactive_logging_enabled()
    if mode in ("gptq", "awq"):
        keras.config.disable_interactive_logging()  # Keras's progress bar over the blocks
    try:
        with calibrating:
            keras_quantize(model, mode, config=config)
    finally:
        if interactive:
            keras.config.enable_interactive_logging()
    return model


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


def quantize_run(run, modes, out, calibration_batches: int = 4, log=print) -> list[Row]:
    """Quantizes a finished `kmp pretrain` run every way in `modes` and prices each.

    Writes `out/<mode>.keras`, `out/source.keras` (the trained weights without the
    optimizer state that the run's model.keras also holds), `out/quantize.json` and
    `out/quantize.md` (the source's row first). Each `.keras` file holds the run's tokenizer:
    `kmp.gpt.load_model(path).generate("def")` works. A float8 run's source is its float8
    model; its quantized models come from its float weights (Keras quantizes no float8 layer).

    Args:
        run: str or Path. The run's --out directory (read with `kmp.gpt.open_run`).
        modes: list of str. Modes from `MODES`.
        out: str or Path. Where the quantized models and the tables go.
        calibration_batches: int. Training batches whose windows calibrate GPTQ and AWQ.
        log: callable. Where progress lines go.

    Returns:
        The rows, the source's first.

    Raises:
        UserError: when `run` is not a finished run.
    """
    finished, out = open_run(run, log=log), Path(out).expanduser()
    config, policy = finished.config, finished.policy
    out.mkdir(parents=True, exist_ok=True)
    cache = finished.cache()
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches)
    calibration = np.concatenate([
        data.window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)[0]
        for i in range(calibration_batches)])

    def priced(model, path):  # saved with its tokenizer; the loss of the file reloaded
        with finished.preprocessor_attached(model):
            save(model, path)
        return val_loss(load_model(path, preprocessor=False), val_ds)

    source = finished.model(preprocessor=False)  # as it was trained
    base = val_loss(source, val_ds)
    reloaded = priced(source, out / "source.keras")  # no optimizer state, as quantized
    label = f"{policy}, float8" if finished.float8 else policy
    rows = [Row(f"source ({label})", base, math.exp(base), 0.0,
                (out / "source.keras").stat().st_size, reloaded, forward_speed(source, val_ds))]
    for mode in modes:
        used = compute_policy(policy, mode)
        log(f"quantize: {mode} (from the model under {used})")
        model = kmp.harden(quantize_model(
            finished.model(used, float8=False, islands=False, preprocessor=False), mode,
            calibration, finished.tokenizer(), min(GROUP_SIZE, config.hidden_dim)))
        loss = val_loss(model, val_ds)
        path = out / f"{mode}.keras"
        reloaded = priced(model, path)
        why = ("Keras's int8 refuses float16 compute" if mode == "int8"
               else "Keras's GPTQ group indices break in half precision")
        notes = [f"from the float32 twin: {why}"] if used != policy else []
        if finished.float8:
            notes.append("from the float weights: Keras quantizes no float8 layer")
        rows.append(Row(mode, loss, math.exp(loss), loss / base - 1, path.stat().st_size,
                        reloaded, forward_speed(model, val_ds), "; ".join(notes)))
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


def main(argv) -> int:
    """`kmp quantize`: parses `argv` (the arguments after the command) and runs it."""
    parser = argparse.ArgumentParser(
        prog="kmp quantize", description="Quantize a finished `kmp pretrain` run every way "
        "asked (Keras's int8, int4, GPTQ, AWQ) and measure each: validation loss, perplexity "
        "and its change, .keras size, the loss after a fresh load, forward tokens/s.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--modes", default="int8,int4,gptq,awq",
                        help="comma-separated: int8, int4, gptq, awq (default: all)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where <mode>.keras, quantize.json and quantize.md go")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="training batches that calibrate GPTQ and AWQ (default: 4)")
    opts = parser.parse_args(argv)
    modes = parse_modes(opts.modes)
    if opts.calibration_batches < 1:
        raise UserError(f"calibration_batches must be >= 1. Received: "
                        f"{opts.calibration_batches}", field="calibration_batches")
    rows = quantize_run(opts.run, modes, opts.out, opts.calibration_batches)
    print(table(rows))
    print(f"written: {opts.out}/quantize.json, quantize.md and one .keras per mode")
    return 0
