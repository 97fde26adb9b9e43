"""Pretrain a GPT in mixed precision: config, policy, data, model, optimizer, fit, summary.

    kmp pretrain                                   # the tiny preset on the stdlib corpus
    kmp pretrain --preset small --precision mixed_bfloat16 --out runs/small
    python recipes/pretrain_gpt.py --steps 100    # the same script, from a checkout

Writes to --out: config.json, checkpoints/ (what --resume continues from), tensorboard/,
loss.png, samples.txt, metrics.json and model.keras.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import keras

import kmp
from kmp import backends
from kmp.callbacks import PrecisionMonitor, SummaryWriter, TensorBoardScalars, Throughput
from kmp.checkpoint import LATEST, Checkpoint, precision_change, restore, verify, write_json_atomic
from kmp.errors import TrainingStopped, UserError
from kmp.faults import FaultInjector, parse_faults
from kmp.gpt import data, report
from kmp.gpt.config import GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, flops_per_token, lm_loss, make_optimizer
from kmp.gpt.quantize import quantize_float8
from kmp.hardware import detect, peak_flops
from kmp.recovery import CAUSES, Event, RecoveryPlan, Watchdog


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
    # 1. Data: a BPE tokenizer and token cache (built once), random windows (a PyDataset).
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches)

    # 2. Policy, model, fit; when the run breaks, roll back and retry (kmp.recovery). What
    #    recoveries changed (skipped data, learning rate, precision) is in every checkpoint.
    record = verified
    plan = RecoveryPlan(config.recover_attempts, config.recover_stretch,
                        state=record["extra"].get("recovery") if record else None)
    while True:
        precision = kmp.set_policy(plan.policy or config.precision)
        try:
            model, history, throughput = fit(config, out, cache, val_ds, precision, plan,
                                             record, replicas)
            break
        except Event as event:
            record = roll_back(config, out, plan, event, precision.policy)
        gc.collect()  # the broken attempt's model and optimizer, before the next is built

    # 3. Summary: validation loss and perplexity, samples, the loss curve, metrics.json.
    val_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
    samples = report.sample_text(model, cache.tokenizer(), [config.prompt] * config.samples,
                                 max_length=min(config.seq_len, 128), seed=config.seed)
    (out / "samples.txt").write_text("\n\n-----\n\n".join(samples) + "\n")
    report.plot_losses(history, out / "loss.png",
                       f"{config.preset}: {precision.policy} on {detect().describe()}"[:90],
                       plan.recoveries)
    scaler = model.optimizer if isinstance(model.optimizer, kmp.LossScaleOptimizer) else None
    state = scaler.state() if scaler is not None else {}
    metrics = {
        "policy": precision.policy,
        "steps": int(model.optimizer.iterations.numpy()),
        "final_train_loss": history.final_train_loss(),
        "val_loss": val_loss,
        "val_perplexity": report.perplexity(val_loss),
        "tokens_per_sec": throughput.tokens_per_sec,
        "mfu": throughput.mfu,
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "final_loss_scale": state.get("loss_scale"),
        "recoveries": plan.recoveries,
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


def fit(config: GPTConfig, out: Path, cache, val_ds, precision, plan: RecoveryPlan,
        record: dict | None, replicas: int):
    """Builds the model under `precision`, restores `record`'s checkpoint (if any) and trains
    to the end; raises `kmp.recovery.Event` when the run breaks (with `config.recover`)."""
    interval = config.eval_interval
    batches_per_epoch = interval * config.grad_accum
    epochs = config.steps // interval
    jit = precision.jit_compile if config.jit is None else config.jit
    print(f"precision: {precision}\n  XLA: {'on' if jit else 'off'}")

    # The model and optimizer (the same initial weights in every attempt).
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, float32_residual=plan.float32_residual)
    if config.float8:  # float8 matmuls in every Dense/EinsumDense (FP8 training, simulated on CPUs)
        quantize_float8(model)
    first = (record["epoch"] if record else 0) * batches_per_epoch  # the first batch's index
    faults = injectors(config, plan, first)
    loss = lm_loss()
    for injector in faults:
        loss = injector.wrap(loss)
    # The skip budget: the optimizer stops the run at it, or the Watchdog recovers from it.
    budget = {"max_consecutive_skips": None if config.recover else config.max_skips}
    kmp.compile(model, make_optimizer(config, model, plan.lr_windows), loss=loss,
                weighted_metrics=[], jit_compile=jit,
                loss_scale=budget if precision.loss_scaling else None)
    print(f"model: GPT-2 {config.num_layers} layers x {config.hidden_dim} wide, "
          f"{model.count_params():,} parameters, {replicas} replica(s), "
          f"backend {backends.name()}")

    # Fit: `epochs` rounds of `interval` steps, validation and a checkpoint after each.
    ckpt_dir = out / "checkpoints"
    initial_epoch, history_state = 0, None
    if record is not None:
        restore(model, ckpt_dir, record)
        initial_epoch, history_state = record["epoch"], record["extra"].get("history")
        print(f"resume: from step {initial_epoch * interval} (epoch {initial_epoch} of "
              f"{epochs})")
        change = precision_change(record, model)
        if change:
            print(f"resume: warning: {change}")
        if plan.policy and plan.policy != config.precision:
            print(f"resume: under {plan.policy}, which a recovery chose (not --precision "
                  f"{config.precision})")
    history = report.LossHistory(config.grad_accum, state=history_state)
    train_ds = data.train_dataset(cache, config.seq_len, config.batch_size, config.seed,
                                  start=first, stop=epochs * batches_per_epoch, skip=plan.skip)
    peak = peak_flops(detect(), keras.config.dtype_policy().compute_dtype)
    throughput = Throughput(config.batch_size * config.seq_len, flops_per_token(config),
                            peak * replicas if peak else None)
    checkpoint = Checkpoint(ckpt_dir, extra_state=lambda: {"history": history.state(),
                                                           "recovery": plan.state()})
    callbacks = [
        PrecisionMonitor(log_dir=str(out / "tensorboard" / "kmp"), verbose=True, step=first),
        throughput, history, TensorBoardScalars(out / "tensorboard", update_freq=10),
        checkpoint, *faults,
    ]
    if config.recover:  # first: it must see a broken epoch before the checkpoint does
        callbacks.insert(0, Watchdog(config.spike_factor, config.spike_window,
                                     config.max_skips, first, config.grad_accum,
                                     recent=[value for _, value in history.train]))
        if record is None:  # something to roll back to before the first epoch ends
            model.optimizer.build(model.trainable_variables)
            checkpoint.set_model(model)
            checkpoint.save(0)
    # A progress bar on a terminal; one line per epoch in a log file or pipe.
    try:
        model.fit(train_ds, epochs=epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=batches_per_epoch, validation_data=val_ds,
                  callbacks=callbacks, shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
    except Event as event:
        for callback in callbacks:  # close what the interrupted fit left open
            try:
                callback.on_train_end()
            except Exception as e:  # the event is what matters now
                print(f"recover: warning: closing {type(callback).__name__} failed: {e}")
        event.losses = list(history.train)  # roll_back keeps the steps it abandons
        if event.loss is not None:
            event.losses.append(((event.batch + 1) / config.grad_accum, event.loss))
        raise
    return model, history, throughput


def injectors(config: GPTConfig, plan: RecoveryPlan, first: int) -> list:
    """One FaultInjector per kind in `--inject-fault`, keyed to data positions (`first` is the
    index of the fit's first batch): a rolled-back run that skips the faulty window does not
    meet the fault again."""
    faults = parse_faults(config.inject_fault)
    made = []
    for kind in sorted({f.kind for f in faults}):
        chosen = [f for f in faults if f.kind == kind]

        def hit(k, chosen=chosen):
            step = plan.position(first + k) // config.grad_accum
            return any(f.hits(step) for f in chosen)

        made.append(FaultInjector(steps=hit, kind=kind))
    return made


def roll_back(config: GPTConfig, out: Path, plan: RecoveryPlan, event: Event,
              policy: str) -> dict:
    """Records the recovery from `event` (or raises TrainingStopped when the ladder is spent),
    saves the new plan into the last verified checkpoint's record and returns that record."""
    ckpt_dir = out / "checkpoints"
    try:
        record = verify(ckpt_dir)
    except UserError as e:
        raise TrainingStopped(f"step {event.step}: {CAUSES[event.cause]}, and no checkpoint "
                              f"to roll back to: {e}") from e
    done = plan.decide(event, record["epoch"] * config.eval_interval, policy, detect().bf16,
                       config.grad_accum, iteration=record["step"])
    done["abandoned_losses"] = [[x, loss if math.isfinite(loss) else None]  # for the plot
                                for x, loss in getattr(event, "losses", [])
                                if x > done["rolled_back_to"]]
    line = (f"recover: step {event.step}: {CAUSES[event.cause]} ({event.detail}) -> "
            f"{done['action']} (attempt {done['attempt']} of {config.recover_attempts})")
    print(line, flush=True)
    writer = SummaryWriter(out / "tensorboard" / "recovery")
    writer.text("kmp/recovery", line, event.step)
    writer.scalar("kmp/recoveries", len(plan.recoveries), event.step)
    writer.close()
    record["extra"]["recovery"] = plan.state()
    write_json_atomic(ckpt_dir / LATEST, record)  # a kill from here on resumes with the plan
    return record


if __name__ == "__main__":
    sys.exit(main())
