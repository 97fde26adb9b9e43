"""Quantization-aware fine-tuning of a finished `kmp pretrain` run (`kmp finetune --qat int4`).

The run's model trains on for `steps` more steps, on training windows the run never read,
with its weights fake-quantized to Keras's int4 grid (`kmp.qat`); then Keras quantizes it for
real. What it recovers is measured against two references: the source quantized as it is
(post-training quantization, PTQ), and a control that fine-tunes the same steps on the same
data in float and then quantizes, so the gain from QAT is told apart from the gain of simply
training longer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
import tempfile
from pathlib import Path

import keras

import kmp
from kmp import qat
from kmp.checkpoint import write_bytes_atomic
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.model import lm_loss, load_model, make_optimizer
from kmp.gpt.quantize import quantize_model, save, val_loss
from kmp.gpt.run import open_run


def _int4(run, val_ds, block_size: int, weights=None):
    """Keras's int4 quantization of the run's float weights (or `weights`, a fine-tuned
    copy), islands in, and its validation loss."""
    model = kmp.harden(quantize_model(run.model(float8=False, islands=False, preprocessor=False,
                                          weights=weights), "int4", group_size=block_size))
    return model, val_loss(model, val_ds)


def _fine_tune(run, val_ds, steps: int, lr: float, fake: bool, points: int, block_size: int,
               log):
    """Trains the run's model `steps` more steps (fake-quantized when `fake`) on windows it
    never read; returns it (float weights) and [(step, val_loss)] taken `points` times along
    the way."""
    config = run.config
    keras.utils.set_random_seed(config.seed)
    model = run.model(float8=False, islands=False, preprocessor=False)
    if fake:
        qat.enable(model, "int4", block_size)
    tuned = dataclasses.replace(config, steps=steps, warmup_steps=0, learning_rate=lr)
    precision = kmp.set_policy(run.policy)
    kmp.compile(model, make_optimizer(tuned, model), loss=lm_loss(), weighted_metrics=[],
                jit_compile=precision.jit_compile if config.jit is None else config.jit)
    accum, first = config.grad_accum, run.steps_read  # past every window the run read
    bounds = [round(steps * k / points) for k in range(points + 1)]
    label = "qat int4" if fake else "control (float)"
    curve = [(0, _evaluate(model, val_ds))]
    for start, stop in zip(bounds, bounds[1:]):
        if stop == start:
            continue
        batches = data.train_dataset(run.cache(), config.seq_len, config.batch_size,
                                     config.seed, first + start * accum, first + stop * accum)
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

    Writes `out/qat-int4.keras` (load it with `kmp.gpt.load_model`; it holds the run's
    tokenizer, so it generates from text), `out/finetune.json`, `out/finetune.md` and
    `out/finetune.png`. The run itself is only read. Fine-tuning reads the training windows
    after the last one the run read (`FinishedRun.steps_read`, a recovery's skipped windows
    counted); a float8 run is fine-tuned from its float weights.

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
        UserError: for a directory that is not a finished run, or bad arguments (an
            unknown mode, steps or points below 1, a learning rate not finite and > 0).
    """
    if mode not in qat.MODES:
        raise UserError(f"Unknown QAT mode {mode!r}. Use one of: {', '.join(qat.MODES)}.",
                        field="qat")
    for name, value in (("steps", steps), ("points", points)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer. Received: {name}={value!r}",
                            field=name)
    if learning_rate is not None and not (
            isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool)
            and math.isfinite(learning_rate) and learning_rate > 0):
        raise UserError(f"learning_rate must be a finite number > 0. Received: learning_rate="
                        f"{learning_rate!r}", field="learning_rate")
    run = open_run(run, log=log)
    config, policy = run.config, run.policy
    out = Path(out).expanduser() if out else run.dir.with_name(f"{run.dir.name}-qat-{mode}")
    if out.resolve() == run.dir.resolve():
        raise UserError(f"--out {out} is the run itself; QAT writes elsewhere.", field="out")
    lr = learning_rate if learning_rate is not None else config.learning_rate / 10
    out.mkdir(parents=True, exist_ok=True)
    val_ds = data.val_dataset(run.cache(), config.seq_len, config.batch_size,
                              config.val_batches)
    block_size = min(block_size, config.hidden_dim)

    source_loss = val_loss(run.model(preprocessor=False), val_ds)  # as it was trained
    _, ptq_loss = _int4(run, val_ds, block_size)
    log(f"finetune: source {source_loss:.4f}, int4 PTQ {ptq_loss:.4f}"
        + (" (fine-tuning the float weights: the run trained in float8)" if run.float8 else ""))
    result = {"run": str(run.dir), "policy": policy, "float8": run.float8, "mode": mode,
              "steps": steps, "learning_rate": lr, "block_size": block_size,
              "first_position": run.steps_read,
              "source_val_loss": source_loss, "ptq_val_loss": ptq_loss}
    path = out / f"qat-{mode}.keras"
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "tuned.weights.h5"
        tuned, curve = _fine_tune(run, val_ds, steps, lr, True, points, block_size, log)
        tuned.save_weights(weights)
        model, qat_loss = _int4(run, val_ds, block_size, weights)
        result.update(qat_val_loss=qat_loss, qat_float_val_loss=val_loss(run.model(
            float8=False, preprocessor=False, weights=weights), val_ds), qat_curve=curve)
        with run.preprocessor_attached(model):  # the file generates from text
            save(model, path)
        result["reload_val_loss"] = val_loss(load_model(path, preprocessor=False), val_ds)
        result["size_bytes"] = path.stat().st_size
        if control:
            tuned, _ = _fine_tune(run, val_ds, steps, lr, False, 1, block_size, log)
            tuned.save_weights(weights)
            result["control_float_val_loss"] = val_loss(run.model(
                float8=False, preprocessor=False, weights=weights), val_ds)
            result["control_int4_val_loss"] = _int4(run, val_ds, block_size, weights)[1]
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
    share = result["recovered_vs_source"]  # NaN where int4 PTQ did not raise the loss
    if math.isnan(share):
        text = "int4 PTQ did not raise the source's loss here: no gap for QAT to close"
    else:
        text = (f"QAT closes {share:.0%} of int4 PTQ's gap to the source (fine-tuning alone "
                "also lowers the loss)")
    share = result.get("recovered_vs_control")
    if share is not None and math.isnan(share):
        text += "; int4 PTQ did not raise the control's loss either"
    elif share is not None:
        text += f"; {share:.0%} of the gap the control still has after int4 (what QAT itself wins)"
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


def main(argv) -> int:
    """`kmp finetune`: parses `argv` (the arguments after the command) and runs it: QAT of a
    run (`--run DIR --qat int4`), or fine-tuning of a keras-hub preset (`--preset`,
    `kmp.gpt.finetune_hub`)."""
    if any(a == "--preset" or a.startswith("--preset=") for a in argv):
        from kmp.gpt.finetune_hub import main as tune_main

        return tune_main(argv)
    parser = argparse.ArgumentParser(
        prog="kmp finetune", description="Quantization-aware fine-tuning of a finished `kmp "
        "pretrain` run: train on with fake-quantized int4 weights (straight-through "
        "gradients), quantize for real, and measure how much of int4's perplexity gap it "
        "recovers against post-training quantization and a float fine-tune of the same steps.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--qat", default="int4", help="the quantization to train for: int4")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default 200)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: a tenth of the run's)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where results go (default: <run>-qat-<mode> beside the run)")
    parser.add_argument("--points", type=int, default=4,
                        help="validation points along the fine-tuning (default 4)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the float fine-tune that QAT is compared with")
    opts = parser.parse_args(argv)
    result = finetune_run(opts.run, opts.out, opts.qat, opts.steps, opts.lr,
                          not opts.no_control, opts.points)
    out = opts.out or f"{opts.run.rstrip('/')}-qat-{opts.qat}"
    print(table(result))
    print(f"written: {out}/finetune.json, finetune.md, finetune.png, qat-{opts.qat}.keras")
    return 0
