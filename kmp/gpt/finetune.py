"""Quantization-aware fine-tuning of a finished `kmp pretrain` run (`kmp finetune --qat int4`).

The run's model trains on for `steps` more steps, on training windows the run never read,
with its weights fake-quantized to Keras's int4 grid (`kmp.qat`); then Keras quantizes it for
real. What it recovers is measured against two references: the source quantized as it is
(post-training quantization, PTQ), and a control that fine-tunes the same steps on the same
data in float and then quantizes, so the gain from QAT is told apart from the gain of simply
training longer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import keras

import kmp
from kmp import qat
from kmp.checkpoint import write_bytes_atomic
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import GPTConfig
from kmp.gpt.model import lm_loss, load_model, make_optimizer
from kmp.gpt.quantize import quantize, read_run, save, trained_model, val_loss


def _int4(config: GPTConfig, policy: str, weights, val_ds, block_size: int):
    """Keras's int4 quantization of `weights`, islands in, and its validation loss."""
    model = kmp.harden(quantize(trained_model(config, weights, policy), "int4",
                                group_size=block_size))
    return model, val_loss(model, val_ds)


def _fine_tune(config: GPTConfig, policy: str, run: Path, cache, val_ds, steps: int, lr: float,
               fake: bool, points: int, block_size: int, log):
    """Trains the run's model `steps` more steps (fake-quantized when `fake`); returns it
    (float weights) and [(step, val_loss)] taken `points` times along the way."""
    keras.utils.set_random_seed(config.seed)
    model = trained_model(config, run / "model.keras", policy)
    if fake:
        qat.enable(model, "int4", block_size)
    tuned = dataclasses.replace(config, steps=steps, warmup_steps=0, learning_rate=lr)
    precision = kmp.set_policy(policy)
    kmp.compile(model, make_optimizer(tuned, model), loss=lm_loss(), weighted_metrics=[],
                jit_compile=precision.jit_compile if config.jit is None else config.jit)
    accum, first = config.grad_accum, config.steps * config.grad_accum  # unread windows
    bounds = [round(steps * k / points) for k in range(points + 1)]
    label = "qat int4" if fake else "control (float)"
    curve = [(0, _evaluate(model, val_ds))]
    for start, stop in zip(bounds, bounds[1:]):
        if stop == start:
            continue
        batches = data.train_dataset(cache, config.seq_len, config.batch_size, config.seed,
                                     first + start * accum, first + stop * accum)
        model.fit(batches, epochs=1, shuffle=False, verbose=1 if sys.stdout.isatty() else 0)
        curve.append((stop, _evaluate(model, val_ds)))
        log(f"finetune: {label} step {stop}/{steps}: val loss "
            f"{'(int4) ' if fake else ''}{curve[-1][1]:.4f}")
    if fake:
        qat.disable(model)
    return model, curve


def _evaluate(model, val_ds) -> float:
    """Validation loss of a model compiled for training (its own compile kept)."""
    return float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])


def finetune_run(run, out=None, mode: str = "int4", steps: int = 200, learning_rate=None,
                 control: bool = True, points: int = 4, block_size: int = qat.BLOCK_SIZE,
                 log=print) -> dict:
    """Quantization-aware fine-tuning of a finished run, priced against PTQ and a control.

    Writes `out/qat-int4.keras` (load it with `kmp.gpt.load_model`), `out/finetune.json`,
    `out/finetune.md` and `out/finetune.png`. The run itself is only read.

    Args:
        run: str or Path. A `kmp pretrain` --out directory.
        out: str or Path. Where results go. Defaults to `<run>-qat-int4` beside the run.
        mode: str. "int4".
        steps: int. Fine-tuning steps (optimizer steps, the run's batch and accumulation).
        learning_rate: float. Peak of a cosine decay to 10%. Defaults to a tenth of the run's
            peak (where its own schedule ended).
        control: bool. Also fine-tune in float and quantize after (the honest reference).
        points: int. Validation points along the fine-tuning.
        block_size: int. int4 group size (Keras's default 128).
        log: callable. Where progress lines go.

    Returns:
        The dict written to finetune.json.

    Raises:
        UserError: for a directory that is not a finished run, or bad arguments.
    """
    run = Path(run).expanduser()
    config, policy = read_run(run)
    if mode not in qat.MODES:
        raise UserError(f"Unknown QAT mode {mode!r}. Use one of: {', '.join(qat.MODES)}.",
                        field="qat")
    if steps < 1 or points < 1:
        raise UserError(f"steps and points must be >= 1. Received: steps={steps}, "
                        f"points={points}", field="steps")
    out = Path(out).expanduser() if out else run.with_name(f"{run.name}-qat-{mode}")
    if out.resolve() == run.resolve():
        raise UserError(f"--out {out} is the run itself; QAT writes elsewhere.", field="out")
    lr = learning_rate if learning_rate is not None else config.learning_rate / 10
    out.mkdir(parents=True, exist_ok=True)
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir, log=log)
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches)
    block_size = min(block_size, config.hidden_dim)

    source_loss = val_loss(kmp.harden(trained_model(config, run / "model.keras", policy)), val_ds)
    _, ptq_loss = _int4(config, policy, run / "model.keras", val_ds, block_size)
    log(f"finetune: source {source_loss:.4f}, int4 PTQ {ptq_loss:.4f}")
    result = {"run": str(run), "policy": policy, "mode": mode, "steps": steps,
              "learning_rate": lr, "block_size": block_size,
              "source_val_loss": source_loss, "ptq_val_loss": ptq_loss}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "tuned.weights.h5"
        tuned, curve = _fine_tune(config, policy, run, cache, val_ds, steps, lr, True, points,
                                  block_size, log)
        tuned.save_weights(weights)
        model, qat_loss = _int4(config, policy, weights, val_ds, block_size)
        result.update(qat_val_loss=qat_loss, qat_float_val_loss=val_loss(
            kmp.harden(trained_model(config, weights, policy)), val_ds), qat_curve=curve)
        save(model, out / f"qat-{mode}.keras")
        result["reload_val_loss"] = val_loss(load_model(out / f"qat-{mode}.keras"), val_ds)
        result["size_bytes"] = (out / f"qat-{mode}.keras").stat().st_size
        if control:
            tuned, _ = _fine_tune(config, policy, run, cache, val_ds, steps, lr, False, 1,
                                  block_size, log)
            tuned.save_weights(weights)
            result["control_float_val_loss"] = val_loss(
                kmp.harden(trained_model(config, weights, policy)), val_ds)
            result["control_int4_val_loss"] = _int4(config, policy, weights, val_ds,
                                                    block_size)[1]
    result.update(recovered(result))
    write_bytes_atomic(out / "finetune.json", json.dumps(result, indent=2).encode())
    write_bytes_atomic(out / "finetune.md", table(result).encode())
    plot(result, out / "finetune.png")
    return result


def recovered(result: dict) -> dict:
    """The share of the int4 gap QAT closes: against the source (`(ptq - qat) / (ptq -
    source)`), and against the control (`(control_int4 - qat) / (control_int4 -
    control_float)`: what QAT gains over fine-tuning in float, as a share of the gap the
    control still has).

    Example:
    >>> recovered({"source_val_loss": 5.0, "ptq_val_loss": 5.5, "qat_val_loss": 5.125})
    {'recovered_vs_source': 0.75}
    """
    shares = {}
    gap = result["ptq_val_loss"] - result["source_val_loss"]
    shares["recovered_vs_source"] = (result["ptq_val_loss"] - result["qat_val_loss"]) / gap \
        if gap > 0 else math.nan
    if "control_int4_val_loss" in result:
        gap = result["control_int4_val_loss"] - result["control_float_val_loss"]
        shares["recovered_vs_control"] = (result["control_int4_val_loss"]
                                          - result["qat_val_loss"]) / gap if gap > 0 else math.nan
    return shares


def table(result: dict) -> str:
    """finetune.json as a Markdown table."""
    rows = [("source (float weights)", result["source_val_loss"]),
            ("int4 PTQ of the source", result["ptq_val_loss"]),
            (f"QAT {result['steps']} steps, then int4", result["qat_val_loss"]),
            ("QAT weights in float", result["qat_float_val_loss"])]
    if "control_int4_val_loss" in result:
        rows += [(f"control: float fine-tune {result['steps']} steps",
                  result["control_float_val_loss"]),
                 ("control, then int4 PTQ", result["control_int4_val_loss"])]
    lines = ["| model | val loss | perplexity |", "|---|---|---|"]
    lines += [f"| {name} | {loss:.4f} | {math.exp(loss):.2f} |" for name, loss in rows]
    lines.append("")
    text = (f"QAT closes {result['recovered_vs_source']:.0%} of int4 PTQ's gap to the source "
            "(fine-tuning alone also lowers the loss)")
    if "recovered_vs_control" in result:
        text += (f"; {result['recovered_vs_control']:.0%} of the gap the control still has "
                 "after int4 (what QAT itself wins)")
    lines.append(text + ".")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    """Validation loss of the fake-quantized (= int4) model along the fine-tuning, against
    the source, PTQ and the control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*result["qat_curve"])
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(steps, losses, "o-", label="QAT model (int4 forward)")
    ax.axhline(result["source_val_loss"], color="k", ls="--", lw=1, label="source, float")
    ax.axhline(result["ptq_val_loss"], color="tab:red", ls=":", label="source, int4 PTQ")
    if "control_int4_val_loss" in result:
        ax.axhline(result["control_float_val_loss"], color="tab:green", ls="--", lw=1,
                   label="control fine-tune, float")
        ax.axhline(result["control_int4_val_loss"], color="tab:green", ls=":",
                   label="control fine-tune, int4 PTQ")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"int4 QAT from a {result['policy']} run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
