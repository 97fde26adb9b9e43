"""Pretrain a GPT in mixed precision: config, policy, data, model, optimizer, fit, summary.

    kmp pretrain                                   # the tiny preset on the stdlib corpus
    kmp pretrain --preset small --precision mixed_bfloat16 --out runs/small
    kmp pretrain --processes 2                    # data-parallel over 2 local processes (JAX)
    python recipes/pretrain_gpt.py --steps 100    # the same script, from a checkout

Writes to --out: config.json, checkpoints/ (what --resume continues from), tensorboard/,
loss.png, samples.txt, history.json, metrics.json and model.keras (process 0 of a run across
processes; the others log to logs/worker-K.log).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import keras

import kmp
from kmp import backends, distributed
from kmp.callbacks import PrecisionMonitor, SummaryWriter, TensorBoardScalars, Throughput
from kmp.checkpoint import LATEST, Checkpoint, precision_change, restore, verify, write_json_atomic
from kmp.errors import TrainingStopped, UserError
from kmp.faults import FaultInjector, PoisonedRows, parse_faults
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
        if distributed.is_chief():
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
    if distributed.is_chief():
        write_json_atomic(saved, json.loads(config.to_json()))
    return out, record if config.resume else None


def main(argv=None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(argv)
    if config.processes > 1 and distributed.process_count() == 1:
        return launch(config, argv)
    if config.processes > 1 and distributed.process_count() != config.processes:
        raise UserError(f"--processes {config.processes}, but the launcher started "
                        f"{distributed.process_count()} ({distributed.COUNT}). Give the same "
                        "count, or drop --processes.", field="processes")
    if not distributed.is_chief():  # only process 0 talks and writes
        distributed.log_to_file(Path(config.out).expanduser() / "logs")
    devices = distributed.initialize()  # None: this process alone
    print("config:\n" + config.to_json())
    out, verified = prepare_out(config)
    if devices:
        print(f"processes: {distributed.process_count()} ({devices} devices), this is "
              f"process {distributed.process_index()}")
        return train(config, out, verified, devices, started)
    # One device, or data-parallel over the local devices (--strategy mirrored).
    with backends.distribution(config.strategy) as replicas:
        return train(config, out, verified, replicas, started)


def launch(config: GPTConfig, argv: list[str]) -> int:
    """`--processes N` on one machine: N workers of this script on the JAX backend."""
    if importlib.util.find_spec("jax") is None:
        raise UserError("--processes runs on the JAX backend, which is not installed. "
                        "pip install 'kmp[jax]'.", field="processes")
    if config.batch_size % config.processes:
        raise UserError(f"--batch-size {config.batch_size} does not split over "
                        f"{config.processes} processes. Use a multiple of {config.processes}.",
                        field="batch_size")
    if keras.backend.backend() != "jax":
        print("processes: the workers run on the JAX backend (Keras's multi-host path; "
              "TensorFlow's MultiWorkerMirroredStrategy fails with Keras 3, "
              "keras-team/keras#20585)")
    # Built once here, not by N workers at once in the same directory.
    data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    resume = [*argv, *([] if config.resume else ["--resume"])]
    hint = shlex.join(["kmp", "--backend", "jax", "pretrain", *resume])
    print(f"processes: starting {config.processes} workers; process 0 prints and writes "
          f"{config.out}, the others log to {Path(config.out) / 'logs'}/worker-K.log",
          flush=True)
    command = [sys.executable, "-m", "kmp.cli", "--backend", "jax", "pretrain", *argv]
    return distributed.launch(command, config.processes, hint)


def train(config: GPTConfig, out: Path, verified: dict | None, replicas: int,
          started: float) -> int:
    # 1. Data: a BPE tokenizer and token cache (built once), random windows (a PyDataset).
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    val_ds = data.val_dataset(cache, config.seq_len, config.batch_size, config.val_batches,
                              rows=distributed.shard(config.batch_size))

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

    # 3. Summary: validation loss and perplexity, samples, the loss curve, history.json,
    #    metrics.json (across processes: evaluated by all, written by process 0).
    val_loss = float(model.evaluate(val_ds, verbose=0, return_dict=True)["loss"])
    checksum = weights_checksum(model)
    print(f"weights sha256: {checksum}")
    if not distributed.is_chief():
        return 0
    samples = []
    if distributed.process_count() == 1:  # sampling is not SPMD: one process only
        samples = report.sample_text(model, cache.tokenizer(), [config.prompt] * config.samples,
                                     max_length=min(config.seq_len, 128), seed=config.seed)
    elif config.samples:
        print("samples: not drawn in a run across processes; load model.keras to sample")
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
        "processes": distributed.process_count(),
        "weights_sha256": checksum,
        "wall_seconds": time.time() - started,
    }
    write_json_atomic(out / "history.json", history.state())
    write_json_atomic(out / "metrics.json", metrics)
    tmp = out / "model.tmp.keras"
    with distributed.local():
        model.save(tmp)
    os.replace(tmp, out / "model.keras")

    if samples:
        print(f"\nsample ({config.prompt!r}):\n{samples[0]}\n")
    print(report.summary(metrics, config.vocab_size))
    print(f"outputs in {out}/: metrics.json, history.json, samples.txt, loss.png, "
          "model.keras, checkpoints/, tensorboard/")
    return 0


def weights_checksum(model) -> str:
    """SHA-256 of every weight's bytes, in order: equal across processes that agree."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(w.tobytes())
    return digest.hexdigest()


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
                                  start=first, stop=epochs * batches_per_epoch, skip=plan.skip,
                                  rows=distributed.shard(config.batch_size))
    train_ds = poison_rows(config, plan, first, train_ds)
    peak = peak_flops(detect(), keras.config.dtype_policy().compute_dtype)
    throughput = Throughput(config.batch_size * config.seq_len, flops_per_token(config),
                            peak * replicas if peak else None)
    checkpoint = Checkpoint(ckpt_dir, extra_state=lambda: {"history": history.state(),
                                                           "recovery": plan.state()})
    chief = distributed.is_chief()  # the others compute alike and write nothing
    callbacks = [
        PrecisionMonitor(log_dir=str(out / "tensorboard" / "kmp") if chief else None,
                         verbose=True, step=first),
        throughput, history, *faults,
    ]
    if chief:
        callbacks[3:3] = [TensorBoardScalars(out / "tensorboard", update_freq=10), checkpoint]
    if config.recover:  # first: it must see a broken epoch before the checkpoint does
        callbacks.insert(0, Watchdog(config.spike_factor, config.spike_window,
                                     config.max_skips, first, config.grad_accum,
                                     recent=[value for _, value in history.train]))
        if record is None:  # something to roll back to before the first epoch ends
            model.optimizer.build(model.trainable_variables)  # by all: variables are collective
            if chief:
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
    faults = [f for f in parse_faults(config.inject_fault) if f.worker is None]
    made = []
    for kind in sorted({f.kind for f in faults}):
        chosen = [f for f in faults if f.kind == kind]

        def hit(k, chosen=chosen):
            step = plan.position(first + k) // config.grad_accum
            return any(f.hits(step) for f in chosen)

        made.append(FaultInjector(steps=hit, kind=kind))
    return made


def poison_rows(config: GPTConfig, plan: RecoveryPlan, first: int, train_ds):
    """`train_ds` with the --inject-fault faults aimed at one worker's rows (inf@5:1) as
    sample weights; unchanged without such faults."""
    faults = [f for f in parse_faults(config.inject_fault) if f.worker is not None]
    for f in faults:
        if f.worker >= distributed.process_count():
            raise UserError(f"--inject-fault {f.kind}@{f.step}:{f.worker}: there are "
                            f"{distributed.process_count()} worker(s), 0 .. "
                            f"{distributed.process_count() - 1}.", field="inject_fault")
    for f in faults:
        def hit(k, f=f):
            return f.hits(plan.position(first + k) // config.grad_accum)

        train_ds = PoisonedRows(train_ds, hit, f.kind, distributed.process_index() == f.worker)
    return train_ds


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
    record["extra"]["recovery"] = plan.state()
    if distributed.is_chief():  # every process decided the same; one writes it down
        writer = SummaryWriter(out / "tensorboard" / "recovery")
        writer.text("kmp/recovery", line, event.step)
        writer.scalar("kmp/recoveries", len(plan.recoveries), event.step)
        writer.close()
        write_json_atomic(ckpt_dir / LATEST, record)  # a kill from here on resumes with it
    return record


if __name__ == "__main__":
    sys.exit(main())
