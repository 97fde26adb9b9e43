"""Pretrain a GPT in mixed precision: config, policy, data, model, optimizer, fit, summary.

    kmp pretrain                                   # the tiny preset on the stdlib corpus
    kmp pretrain --preset small --precision mixed_bfloat16 --out runs/small
    python recipes/pretrain_gpt.py --steps 100    # the same script, from a checkout

Writes to --out: config.json, checkpoints/ (what --resume continues from), tensorboard/,
loss.png, samples.txt, metrics.json and model.keras.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import keras

import kmp
from kmp import backends
from kmp.callbacks import PrecisionMonitor, TensorBoardScalars, Throughput
from kmp.checkpoint import Checkpoint, precision_change, restore, verify, write_json_atomic
from kmp.errors import UserError
from kmp.gpt import data, report
from kmp.gpt.config import GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, flops_per_token, lm_loss, make_optimizer
from kmp.hardware import detect, peak_flops


def parse_config(argv=None) -> GPTConfig:
    """The run's config: a preset plus every option given on the command line."""
    parser = argparse.ArgumentParser(prog="kmp pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def prepare_out(config: GPTConfig) -> tuple[Path, dict | None]:
    """Creates --out, checks it is writable and, on --resume, that it holds this model's run
    and a whole checkpoint (whose record it returns); then saves config.json."""
    out = Path(config.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"--out {config.out!r} is not writable ({e.strerror}). "
                         "Pick another directory.") from None
    saved = out / "config.json"
    if config.resume and not saved.exists():
        raise UserError(f"--resume: {out} is not a kmp pretrain run (no config.json). Point "
                         "--out at a run's directory, or drop --resume.")
    if config.resume:
        try:
            old = json.loads(saved.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"--resume: {saved} is not a kmp config (damaged?). Point --out "
                             "at a kmp pretrain run, or drop --resume.") from None
        record = verify(out / "checkpoints")  # before anything in the run is rewritten
        if config.seq_len > old.get("seq_len", config.seq_len):
            raise UserError(f"--seq-len {config.seq_len} is longer than the model's maximum "
                             f"{old['seq_len']} (its position embedding). Resume with "
                             f"--seq-len {old['seq_len']}.")
        shape = ("vocab_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim",
                 "seq_len")
        changed = [f"{k} {old.get(k)} -> {getattr(config, k)}" for k in shape
                   if old.get(k) != getattr(config, k)]
        if changed:
            raise UserError(f"--resume: the run in {out} has another model shape "
                             f"({', '.join(changed)}). Use the same shape or another --out.")
    write_json_atomic(saved, json.loads(config.to_json()))
    return out, record if config.resume else None


def main(argv=None) -> int:
    started = time.time()
    config = parse_config(argv)
    print("config:\n" + config.to_json())
    out, verified = prepare_out(config)
    # One device, or data-parallel over the local devices (--strategy mirrored).
    with backends.distribution(config.strategy) as replicas:
        return train(config, out, verified, replicas, started)


def train(config: GPTConfig, out: Path, verified: dict | None, replicas: int,
          started: float) -> int:
    interval = config.eval_interval
    keras.utils.set_random_seed(config.seed)

    # 1. Policy: one switch picks float32, mixed_float16 or mixed_bfloat16 for this machine.
    plan = kmp.set_policy(config.precision)
    jit = plan.jit_compile if config.jit is None else config.jit
    print(f"precision: {plan}\n  XLA: {'on' if jit else 'off'}")

    # 2. Data: a BPE tokenizer and token cache (built once), random windows (a PyDataset).
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    tokenizer = cache.tokenizer()
    batches_per_epoch = interval * config.grad_accum
    epochs = config.steps // interval
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches)

    # 3. Model and optimizer.
    model = build_model(config)
    optimizer = kmp.compile(model, make_optimizer(config, model), loss=lm_loss(),
                            weighted_metrics=[], jit_compile=jit)
    print(f"model: GPT-2 {config.num_layers} layers x {config.hidden_dim} wide, "
          f"{model.count_params():,} parameters, {replicas} replica(s), "
          f"backend {backends.name()}")

    # 4. Fit: `epochs` rounds of `interval` steps, validation and a checkpoint after each.
    ckpt_dir = out / "checkpoints"
    initial_epoch, history_state = 0, None
    if config.resume:
        record = restore(model, ckpt_dir, verified)
        initial_epoch, history_state = record["epoch"], record["extra"].get("history")
        print(f"resume: from step {record['step']} (epoch {initial_epoch} of {epochs})")
        change = precision_change(record, model)
        if change:
            print(f"resume: warning: {change}")
    history = report.LossHistory(config.grad_accum, state=history_state)
    train_ds = data.train_dataset(cache, config.seq_len, config.batch_size, config.seed,
                                  start=initial_epoch * batches_per_epoch,
                                  stop=epochs * batches_per_epoch)
    hw = detect()
    peak = peak_flops(hw, keras.config.dtype_policy().compute_dtype)
    throughput = Throughput(config.batch_size * config.seq_len, flops_per_token(config),
                            peak * replicas if peak else None)
    monitor = PrecisionMonitor(log_dir=str(out / "tensorboard" / "kmp"), verbose=True)
    callbacks = [
        monitor, throughput, history,
        TensorBoardScalars(out / "tensorboard", update_freq=10),
        Checkpoint(ckpt_dir, extra_state=lambda: {"history": history.state()}),
    ]
    # A progress bar on a terminal; one line per epoch in a log file or pipe.
    model.fit(train_ds, epochs=epochs, initial_epoch=initial_epoch,
              steps_per_epoch=batches_per_epoch, validation_data=val_ds, callbacks=callbacks,
              shuffle=False, verbose=1 if sys.stdout.isatty() else 2)

    # 5. Summary: validation loss and perplexity, samples, the loss curve, metrics.json.
    val_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
    samples = report.sample_text(model, tokenizer, [config.prompt] * config.samples,
                                 max_length=min(config.seq_len, 128), seed=config.seed)
    (out / "samples.txt").write_text("\n\n-----\n\n".join(samples) + "\n")
    report.plot_losses(history, out / "loss.png",
                       f"{config.preset}: {plan.policy} on {hw.describe()}"[:90])
    scaler = optimizer if isinstance(optimizer, kmp.LossScaleOptimizer) else None
    state = scaler.state() if scaler is not None else {}
    metrics = {
        "policy": plan.policy,
        "steps": int(model.optimizer.iterations.numpy()),
        "final_train_loss": history.final_train_loss(),
        "val_loss": val_loss,
        "val_perplexity": report.perplexity(val_loss),
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "final_loss_scale": state.get("loss_scale"),
        "wall_seconds": time.time() - started,
    }
    write_json_atomic(out / "metrics.json", metrics)
    tmp = out / "model.tmp.keras"
    model.save(tmp)
    os.replace(tmp, out / "model.keras")

    if samples:
        print(f"\nsample ({config.prompt!r}):\n{samples[0]}\n")
    print(report.summary(metrics, config.vocab_size))
    print(f"outputs in {out}/: metrics.json, samples.txt, loss.png, model.keras, "
          "checkpoints/, tensorboard/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
