"""`kmp finetune --preset`: fine-tune any keras-hub CausalLM on your text, in full or with
LoRA, on a float, int8 or int4 base, in mixed precision.

The preset brings its own tokenizer and preprocessor (`kmp.gpt.finetune_data` tokenizes with
them). kmp adds what it adds to every run: the precision plan (`kmp.set_policy`),
`kmp.compile` (FP32 attention islands where the model has Keras attention layers, loss
scaling under float16 with the skip budget), checkpoints and `--resume`, TensorBoard,
loss.png, and an honest measurement: the validation loss before and after, the parameters
trained, tokens/s, peak memory (and on JAX the compiled step's bytes), and the merged preset
evaluated after it is reloaded. See `kmp.gpt.lora` for what Keras's LoRA does and what kmp
changes. (kmp.recovery's rollback ladder is not wired in: a fine-tune is short; rerun it.)

Example:
    ```python
    result = finetune_preset("presets/tiny", "notes/*.txt", "runs/ft", lora=8, steps=100)
    print(result["val_loss_before"], result["val_loss_after"])
    ```
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import keras
import numpy as np

import kmp
from kmp import backends
from kmp.callbacks import PrecisionMonitor, TensorBoardScalars, Throughput
from kmp.checkpoint import Checkpoint, prepare_run, restore, write_json_atomic
from kmp.errors import UserError
from kmp.gpt import adapters
from kmp.gpt import lora as lora_lib
from kmp.gpt.finetune_data import load_data
from kmp.gpt.finetune_metrics import (
    ValidationLoss,
    compiled_step_bytes,
    evaluate,
    peak_memory,
)
from kmp.gpt.model import NextTokenCrossentropy
from kmp.gpt.report import LossHistory, plot_losses
from kmp.hardware import detect

# Settings a resumed run cannot change, each mapped to why.
FIXED = {"preset": "source preset", "data": "data", "lora": "LoRA setting",
         "lora_targets": "LoRA setting", "train_embeddings": "LoRA setting", "base": "base",
         "seq_len": "data windows",
         "batch_size": "batch", "seed": "data order", "steps": "schedule",
         "learning_rate": "schedule"}


def _loss():
    """The recipe's next-token loss (`kmp.gpt.model.lm_loss`'s choice), averaged over the
    tokens that carry weight (a .jsonl prompt's and padding carry none)."""
    if detect().kind == "gpu":
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")
    return NextTokenCrossentropy(reduction="mean_with_sample_weight")


def _check(steps, batch_size, learning_rate, lora, base, eval_every, train_embeddings=False):
    """Checks the arguments that need no model; returns the steps between validations."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer. Received: {name}={value!r}",
                            field=name)
    if learning_rate is not None and not (isinstance(learning_rate, (int, float))
                                          and math.isfinite(learning_rate)
                                          and learning_rate > 0):
        raise UserError(f"learning_rate must be a finite number > 0. Received: "
                        f"learning_rate={learning_rate!r}", field="lr")
    if lora is not None and (not isinstance(lora, int) or isinstance(lora, bool) or lora < 1):
        raise UserError(f"--lora must be a positive integer rank. Received: {lora!r}",
                        field="lora")  # 0 would otherwise mean full fine-tuning
    if base not in lora_lib.BASES:
        raise UserError(f"Unknown base {base!r}. Use one of: {', '.join(lora_lib.BASES)}.",
                        field="base")
    if base != "float" and not lora:
        raise UserError(f"--base {base} trains nothing without LoRA (quantized kernels are "
                        "frozen). Add --lora RANK, or use --base float for full fine-tuning.",
                        field="base")
    if train_embeddings and not lora:
        raise UserError("--train-embeddings goes with --lora (full fine-tuning already trains "
                        "the embedding). Add --lora RANK, or leave it out.",
                        field="train_embeddings")
    if train_embeddings and base == "int4":  # Keras's int4 quantizes the embedding too
        raise UserError("--train-embeddings on an int4 base: the token embedding is quantized "
                        "and cannot train. Use --base float or int8 (which keeps the embedding "
                        "in float).", field="train_embeddings")
    every = eval_every or next(steps // k for k in (4, 3, 2, 1) if steps % k == 0)
    if not isinstance(every, int) or every < 1 or steps % every:
        raise UserError(f"eval_every={every!r} does not divide steps={steps}. Pick a divisor.",
                        field="eval_every")
    return every


def finetune_preset(preset, data, out, *, lora=None, lora_targets=None, train_embeddings=False,
                    base="float", steps=100, precision="auto", batch_size=8, seq_len=None,
                    learning_rate=None, eval_every=None, seed=0, resume=False, samples=2,
                    max_skips=50, jit_compile=None, return_model=False, log=print):
    """Fine-tunes a keras-hub CausalLM preset on text or prompt/response data.

    Writes to `out`: metrics.json (the returned dict), config.json, history.json, loss.png,
    samples.txt, `preset/` (the merged model: `keras_hub.models.CausalLM.from_preset` loads
    it), `adapters.lora.h5` (LoRA runs: `backbone.load_lora_weights`), `adapters.trained.h5`
    (with `train_embeddings`: the token embedding, `kmp.gpt.adapters.load_trained`),
    checkpoints/ and tensorboard/.

    Args:
        preset: str or Path. A preset directory (or a keras-hub name, which needs a download).
        data: str. Text files (language modelling) or `.jsonl` prompt/response files (the
            response alone trained on): a file, directory or glob.
        out: str or Path. Where outputs go.
        lora: int or None. LoRA rank; None fine-tunes every weight. Defaults to None.
        lora_targets: list of str or None. Layers to put LoRA in. Defaults to the backbone's
            own choice (query and value projections).
        train_embeddings: bool. With LoRA, also train the token embedding (tied: the
            vocabulary projection too) in full (PEFT's `modules_to_save`). Defaults to False.
        base: str. "float", "int8" or "int4": the base quantized before LoRA. Defaults to
            "float".
        steps: int. Optimizer steps. Defaults to 100.
        precision: str. auto, float32, mixed_float16 or mixed_bfloat16. Defaults to "auto".
        batch_size: int. Windows per step. Defaults to 8.
        seq_len: int or None. Window length; at most the model's maximum. Defaults to the
            preset preprocessor's sequence length.
        learning_rate: float or None. Peak of a cosine decay to 10%. Defaults to 2e-3 with
            LoRA, 3e-4 without.
        eval_every: int or None. Steps between validations (divides `steps`). Defaults to
            a quarter of the steps (or the largest of 1/3, 1/2, all that divides them).
        seed: int. Adapter initialization and batch order. Defaults to 0.
        resume: bool. Continue the run in `out` from its last checkpoint. Defaults to False.
        samples: int. Texts generated into samples.txt. Defaults to 2.
        max_skips: int. Consecutive loss-scale skips that stop the run (float16). Defaults to
            50.
        jit_compile: bool or None. None takes the precision plan's choice. Defaults to None.
        return_model: bool. Also return the trained model (LoRA unmerged). Defaults to False.
        log: callable. Where progress lines go. Defaults to print.

    Returns:
        The dict written to metrics.json; with `return_model`, (that dict, the model).

    Raises:
        UserError: for bad arguments, a preset that cannot be loaded, unusable data, a
            sequence length above the model's maximum, LoRA on a GPTQ/AWQ/float8 base.

    Example:
    >>> try:  # with a preset and data: finetune_preset(preset, "notes/*.txt", out, lora=8)
    ...     finetune_preset("presets/tiny", "notes/*.txt", "runs/ft", steps=0)
    ... except UserError as e:
    ...     print(e)
    steps must be a positive integer. Received: steps=0
    """
    every = _check(steps, batch_size, learning_rate, lora, base, eval_every, train_embeddings)
    lr = learning_rate or (2e-3 if lora else 3e-4)
    settings = {"preset": str(preset), "data": str(data), "lora": lora,
                "lora_targets": list(lora_targets) if lora_targets else None,
                "train_embeddings": bool(train_embeddings), "base": base,
                "steps": steps, "precision": precision, "batch_size": batch_size,
                "seq_len": seq_len, "learning_rate": lr, "eval_every": every, "seed": seed}
    plan = kmp.set_policy(precision)
    keras.utils.set_random_seed(seed)
    model = lora_lib.load_causal_lm(preset)
    limit = lora_lib.max_sequence_length(model)
    seq_len = seq_len or min(model.preprocessor.sequence_length, limit or 1 << 30)
    if limit and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} is above this model's maximum sequence length "
                        f"{limit}. Use --seq-len {limit} or less.", field="seq_len")
    settings["seq_len"] = seq_len
    if lora:  # before the data is read: a wrong layer name or base fails at once
        lora_lib.check_lora_base(model)
        lora_lib.check_targets(model, lora_targets)
    tune = load_data(data, model.preprocessor, seq_len, log=log)
    out, record = prepare_run(out, settings, resume, FIXED)
    val = tune.val_batches(batch_size)
    before = evaluate(model, val)
    log(f"finetune: {type(model.backbone).__name__} from {preset}, {plan.policy}; val loss "
        f"before {before:.4f}")
    lora_lib.quantize_base(model, base)
    base_loss = evaluate(model, val) if base != "float" else before
    layers = lora_lib.enable_lora(model, lora, lora_targets) if lora else []
    targets = sorted({layer.name for layer in layers})
    if train_embeddings:
        lora_lib.train_embeddings(model)
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps, alpha=0.1)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=0.0, beta_2=0.95,
                                       global_clipnorm=1.0)
    kmp.compile(model, optimizer, loss=_loss(), weighted_metrics=[],
                jit_compile=plan.jit_compile if jit_compile is None else jit_compile,
                loss_scale={"max_consecutive_skips": max_skips} if plan.loss_scaling else None)
    trainable, total = lora_lib.param_counts(model)
    log(f"finetune: {'LoRA rank ' + str(lora) + ' in ' + ', '.join(targets) if lora else 'full'}"
        f"{' + token embedding' if train_embeddings else ''} on a {base} base: {trainable:,} "
        f"of {total:,} parameters train")

    ckpt = out / "checkpoints"
    first = 0
    if record is not None:
        restore(model, ckpt, record)
        first = record["batches"]
        if lora:
            adapters.restore_adapters(model, preset, base, ckpt / adapters.adapters_name(first))
        log(f"resume: from step {first} of {steps}")
    history = LossHistory(1, state=record["extra"].get("history") if record else None)
    throughput = Throughput(batch_size * seq_len, every=max(1, min(10, every // 2)))
    checkpoint = Checkpoint(ckpt, batches=first,
                            extra_state=lambda: {"history": history.state()})
    callbacks = [ValidationLoss(val), PrecisionMonitor(log_dir=str(out / "tensorboard" / "kmp"),
                                                    step=first),
                 throughput, history, TensorBoardScalars(out / "tensorboard", step=first),
                 checkpoint] + ([adapters.AdapterCheckpoint(checkpoint)] if lora else [])
    backends.gpu_memory(reset=True)  # the peak of the fine-tuning, where the backend can
    started = time.time()
    if first < steps:  # keras-hub's own fit would run the preprocessor: token ids go in
        keras.Model.fit(model, tune.batches(batch_size, seed, first, steps),
                        epochs=(steps - first) // every, steps_per_epoch=every,
                        callbacks=callbacks, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)
    backends.sync_state(model)
    after = callbacks[0].last if callbacks[0].last is not None else evaluate(model, val)
    scaler = model.optimizer if plan.loss_scaling else None
    result = {"source_preset": _recorded(preset), "model": type(model.backbone).__name__,
              "policy": plan.policy, "backend": backends.name(), "lora": lora,
              "lora_targets": targets or None, "train_embeddings": bool(train_embeddings),
              "base": base, "steps": steps,
              "seq_len": seq_len, "batch_size": batch_size, "learning_rate": lr,
              "data_kind": tune.kind, "data_files": len(tune.files),
              "val_windows": len(tune.val[0]),
              "val_loss_before": before, "val_loss_base": base_loss, "val_loss_after": after,
              "trainable_params": trainable, "total_params": total,
              "weight_bytes": lora_lib.weight_bytes(model),
              "tokens_per_sec": throughput.tokens_per_sec,
              "skipped_steps": int(scaler.state().get("skipped_steps", 0)) if scaler else 0,
              "wall_seconds": time.time() - started, **peak_memory(),
              "compiled_step_bytes": compiled_step_bytes(
                  model, tune.batches(batch_size, seed, 0, 1)[0])}
    _save(model, out, result, val, log)
    result["samples"] = _samples(model, tune, out, samples, seq_len, seed)
    write_json_atomic(out / "history.json", history.state())
    plot_losses(history, out / "loss.png", f"fine-tuning {result['model']} "
                f"({'LoRA ' + str(lora) if lora else 'full'}, {base} base): {plan.policy}")
    write_json_atomic(out / "metrics.json", result)
    log(f"finetune: val loss {before:.4f} -> {after:.4f} "
        f"(merged preset {result['val_loss_merged']:.4f}); outputs in {out}/")
    return (result, model) if return_model else result


def _recorded(preset) -> str:
    """How metrics.json names the source preset: a directory by its absolute path (so
    `kmp.gpt.load_finetuned` finds it from any working directory), a name as given."""
    path = Path(str(preset)).expanduser()
    return str(path.resolve()) if path.is_dir() else str(preset)


def _save(model, out: Path, result: dict, val, log) -> None:
    """The adapters, the merged preset, and the merged preset's validation loss after a
    reload (islands put back in, as training had them)."""
    if result["lora"]:
        path = out / "adapters.lora.h5"
        path.unlink(missing_ok=True)
        model.backbone.save_lora_weights(str(path))
        trained = out / adapters.trained_name(path.name)
        trained.unlink(missing_ok=True)
        adapters.save_trained(model, trained)
    tmp = out / ".preset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_to_preset(str(tmp))
    shutil.rmtree(out / "preset", ignore_errors=True)
    os.replace(tmp, out / "preset")
    merged = kmp.harden(lora_lib.load_causal_lm(out / "preset"))
    result["val_loss_merged"] = evaluate(merged, val)
    drift = abs(result["val_loss_merged"] / result["val_loss_after"] - 1)
    result["merged_exact"] = bool(drift <= 1e-4)
    if not result["merged_exact"]:
        log(f"finetune: the merged preset re-quantizes the {result['base']} kernels: val loss "
            f"{result['val_loss_merged']:.4f} (measured {result['val_loss_after']:.4f}); the "
            "exact model is the source preset + adapters.lora.h5 "
            "(kmp.gpt.load_finetuned)")


def _as_text(value) -> str:
    value = keras.ops.convert_to_numpy(value) if not isinstance(value, (str, bytes)) else value
    value = value.item() if hasattr(value, "item") else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _samples(model, tune, out: Path, count: int, seq_len: int, seed: int) -> list:
    """`count` texts sampled (top-k 40, temperature 0.8) from the start of the first
    validation window (its prompt, for .jsonl data), written to samples.txt."""
    import keras_hub

    texts = []
    if count:
        ids = tune.val[0][0]
        if tune.kind == "jsonl":  # the prompt: the positions before the first weighted one
            ids = ids[:max(1, int(np.argmax(tune.val[2][0] > 0)) + 1)]
        else:
            ids = ids[:max(4, seq_len // 4)]
        prompt = _as_text(model.preprocessor.tokenizer.detokenize([int(i) for i in ids]))
        model.sampler = keras_hub.samplers.TopKSampler(k=40, seed=seed, temperature=0.8)
        model.generate_function = None  # rebuilt for the new sampler
        texts = [_as_text(t) for t in model.generate([prompt] * count, max_length=seq_len)]
    (out / "samples.txt").write_text("\n\n-----\n\n".join(texts) + "\n")
    return texts


def main(argv) -> int:
    """Runs `kmp finetune --preset ...`: parses `argv` and fine-tunes (`finetune_preset`).

    Args:
        argv: list of str. The arguments after `kmp finetune`.

    Returns:
        0 (the exit status) once the run has finished.

    Raises:
        UserError: as `finetune_preset` does; the `kmp` command prints it as one line.

    Example:
    >>> try:
    ...     main(["--preset", "presets/tiny", "--data", "notes", "--out", "o", "--lora", "0"])
    ... except UserError as e:
    ...     print(e)
    --lora must be a positive integer rank. Received: 0
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="kmp finetune --preset", description="Fine-tune a keras-hub CausalLM preset "
        "(a directory, or a name that needs a download) on text or prompt/response .jsonl, "
        "in full or with LoRA, on a float, int8 or int4 base, in mixed precision.")
    parser.add_argument("--preset", required=True, metavar="NAME_OR_DIR")
    parser.add_argument("--data", required=True, metavar="GLOB",
                        help="text files, or .jsonl lines with prompt and response")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--lora", type=int, default=None, metavar="RANK",
                        help="LoRA rank (default: full fine-tuning)")
    parser.add_argument("--lora-targets", nargs="+", default=None, metavar="LAYER",
                        help="layer names to put LoRA in (default: the backbone's query and "
                        "value projections)")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="with --lora, also train the token embedding in full")
    parser.add_argument("--base", default="float", help="float, int8 or int4 (with --lora)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--precision", default="auto",
                        help="auto, float32, mixed_float16 or mixed_bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 2e-3 with LoRA, 3e-4 without)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    opts = parser.parse_args(argv)
    finetune_preset(opts.preset, opts.data, opts.out, lora=opts.lora,
                    lora_targets=opts.lora_targets, train_embeddings=opts.train_embeddings,
                    base=opts.base, steps=opts.steps,
                    precision=opts.precision, batch_size=opts.batch_size, seq_len=opts.seq_len,
                    learning_rate=opts.lr, eval_every=opts.eval_every, seed=opts.seed,
                    resume=opts.resume, samples=opts.samples)
    return 0
