"""Pretrain a GPT in mixed precision: config, policy, data, model, optimizer, fit, summary.

    kmp pretrain                                   # the tiny preset on the stdlib corpus
    kmp pretrain --preset small --precision mixed_bfloat16 --out runs/small
    kmp pretrain --processes 2                    # data-parallel over 2 local processes (JAX)
    kmp --devices 4 pretrain --mesh data=2,model=2 --shard fsdp+tp   # sharded (JAX)
    python recipes/pretrain_gpt.py --steps 100    # the same script, from a checkout

Writes to --out: config.json, checkpoints/ (what --resume continues from), tensorboard/,
loss.png, samples.txt, history.json, metrics.json and model.keras (process 0 of a run across
processes; the others log to logs/worker-K.log).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras

import kmp
from kmp import backends, distributed, faults, recovery
from kmp.callbacks import PrecisionMonitor, TensorBoardScalars, Throughput
from kmp.checkpoint import Checkpoint, precision_change, prepare_run, restore
from kmp.gpt import data, report, sharding
from kmp.gpt.config import RESUME_FIXED, GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, flops_per_token, lm_loss, make_optimizer, use_float8
from kmp.hardware import detect, peak_flops
from kmp.layers import attention_choices


def parse_config(argv=None) -> GPTConfig:
    """The run's config: a preset plus every option given on the command line."""
    parser = argparse.ArgumentParser(prog="kmp pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    config = from_args(parser.parse_args(argv))
    config.intervals()  # the validations must space evenly: say so before any work
    return config


def prepare(config: GPTConfig, write: bool = True):
    """The run directory, checked (and, on --resume, the checkpoint to continue from)."""
    return prepare_run(config.out, json.loads(config.to_json()), config.resume, RESUME_FIXED,
                       write=write and distributed.is_chief())


def main(argv=None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv)
    if config.processes > 1 and distributed.process_count() == 1:  # start the workers
        def before():  # every check before any worker starts; the token cache built once
            prepare(config, write=False)
            data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)

        return distributed.launch_local(["pretrain", *argv], config.processes, config.out,
                                        before)
    with distributed.reporting():
        devices = distributed.join(config.processes, Path(config.out).expanduser() / "logs")
        print("config:\n" + config.to_json())
        out, record = prepare(config)
        if config.mesh:  # weights and batch split over a device mesh (kmp.gpt.sharding)
            with sharding.distribute(config) as devices:
                return train(config, out, record, devices, started)
        if devices:  # across processes: one SPMD program over every process's devices
            return train(config, out, record, devices, started)
        with backends.distribution(config.strategy) as replicas:  # one device, or mirrored
            return train(config, out, record, replicas, started)


def train(config: GPTConfig, out: Path, record: dict | None, replicas: int,
          started: float) -> int:
    # 1. Data: a BPE tokenizer and token cache (built once), random windows (a PyDataset).
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches,
                              rows=distributed.shard(config.batch_size))

    # 2. Policy, model, fit; when the run breaks, roll back to the last checkpoint and retry
    #    (kmp.recovery). What recoveries changed is in every checkpoint.
    ladder = recovery.RecoveryPlan(config.recover_attempts, config.recover_stretch,
                                   state=record["extra"].get("recovery") if record else None)

    def attempt(record):
        precision = kmp.set_policy(ladder.policy or config.precision)
        return train_from(record, config, out, cache, val_ds, precision, ladder, replicas)

    model, history, throughput = recovery.retry(
        attempt, ladder, out / "checkpoints", record, config.grad_accum, detect().bf16,
        out / "tensorboard" / "recovery", distributed.is_chief())

    # 3. Summary: validation loss, samples, loss curve, history.json, metrics.json, model.keras.
    return report.finish(model, config, out, cache, val_ds, history, throughput,
                         ladder.recoveries, started)


def train_from(record, config: GPTConfig, out: Path, cache, val_ds, precision, ladder,
               replicas: int):
    """Builds the model under `precision`, restores `record`'s checkpoint (if any) and trains
    to the end; raises `kmp.recovery.Event` when the run breaks (with `config.recover`).
    `ladder` (a `kmp.recovery.RecoveryPlan`) holds what recoveries changed."""
    jit = precision.jit_compile if config.jit is None else config.jit
    print(f"precision: {precision}\n  XLA: {'on' if jit else 'off'}")
    first = record["batches"] if record else 0  # the run's batches so far
    interval, epochs = config.intervals(first // config.grad_accum)
    batches_per_epoch = interval * config.grad_accum

    # The model and optimizer (the same initial weights in every attempt).
    keras.utils.set_random_seed(config.seed)
    model = build_model(config, float32_residual=ladder.float32_residual)
    if config.float8:  # float8 matmuls in every Dense/EinsumDense (simulated on CPUs)
        use_float8(model)
    train_ds = data.train_dataset(cache, config.seq_len, config.batch_size, config.seed,
                                  start=first, stop=first + epochs * batches_per_epoch,
                                  position=ladder.position,
                                  rows=distributed.shard(config.batch_size))
    injectors, train_ds = faults.rehearsal(config.inject_fault, train_ds, first, ladder.position,
                                           config.grad_accum, distributed.process_index(),
                                           distributed.process_count())
    loss = lm_loss()
    for injector in injectors:
        loss = injector.wrap(loss)
    # The skip budget, in micro-batches: the optimizer stops the run at it, or the Watchdog
    # recovers from it.
    budget = None if config.recover else config.max_skips * config.grad_accum
    kmp.compile(model, make_optimizer(config, model, ladder.lr_windows), loss=loss,
                weighted_metrics=[], jit_compile=jit, islands=_attention(config, precision),
                loss_scale={"max_consecutive_skips": budget} if precision.loss_scaling else None)
    for choice in attention_choices(model):  # measured once per machine, then cached
        print(f"attention: {choice}")
    print(f"model: GPT-2 {config.num_layers} layers x {config.hidden_dim} wide, "
          f"{model.count_params():,} parameters, {replicas} replica(s), "
          f"backend {backends.name()}")

    ckpt_dir = out / "checkpoints"
    if record is not None:
        restore(model, ckpt_dir, record)
        print(f"resume: from step {first // config.grad_accum} of {config.steps} (data "
              f"position {ladder.position(first)})")
        change = precision_change(record, model)
        if change:
            print(f"resume: warning: {change}")
        if ladder.policy and ladder.policy != config.precision:
            print(f"resume: under {ladder.policy}, which a recovery chose (not --precision "
                  f"{config.precision})")
    history = report.LossHistory(config.grad_accum,
                                 state=record["extra"].get("history") if record else None)
    peak = peak_flops(detect(), keras.config.dtype_policy().compute_dtype)
    throughput = Throughput(config.batch_size * config.seq_len, flops_per_token(config),
                            peak * replicas if peak else None)
    checkpoint = Checkpoint(ckpt_dir, batches=first, position=ladder.position,
                            extra_state=lambda: {"history": history.state(),
                                                 "recovery": ladder.state()})
    chief = distributed.is_chief()  # the others compute alike and write nothing
    callbacks = [
        PrecisionMonitor(log_dir=str(out / "tensorboard" / "kmp") if chief else None,
                         verbose=True, step=first),
        throughput, history, checkpoint, *injectors,  # checkpoint: all join, process 0 writes
    ]
    if chief:
        callbacks.insert(3, TensorBoardScalars(out / "tensorboard", update_freq=10, step=first))
    if config.recover:  # first: it must see a broken epoch before the checkpoint does
        callbacks.insert(0, recovery.Watchdog(
            config.spike_factor, config.spike_window, config.max_skips, first,
            config.grad_accum, recent=[value for _, value in history.train]))
        if record is None:  # something to roll back to before the first epoch ends
            model.optimizer.build(model.trainable_variables)  # by all: variables are collective
            checkpoint.set_model(model)
            checkpoint.save()  # by all too: process 0 writes

    # Fit: `epochs` rounds of `interval` steps, validation and a checkpoint after each. A
    # progress bar on a terminal; one line per epoch in a log file or pipe.
    with recovery.closing_on_event(callbacks):
        model.fit(train_ds, epochs=epochs, steps_per_epoch=batches_per_epoch,
                  validation_data=val_ds, callbacks=callbacks, shuffle=False,
                  verbose=1 if sys.stdout.isatty() else 2)
    return model, history, throughput


def _attention(config: GPTConfig, precision) -> str:
    """--attention, except that under "auto" a `kmp tune` measurement that found the island
    faster keeps it (a fused kernel is only ever kept where it measures as precise)."""
    if config.attention == "auto" and precision.attention == "island":
        return "island"
    return config.attention


if __name__ == "__main__":
    sys.exit(main())
