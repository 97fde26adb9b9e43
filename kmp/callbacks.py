"""Callbacks: PrecisionMonitor (loss scale, skips, overflowing variables) and Throughput."""

from __future__ import annotations

import math
import time

import keras
import tensorflow as tf
from keras import ops

from kmp.scaling import STATE_VARIABLES, LossScaleOptimizer

LOG_KEYS = ("loss_scale", "skipped_steps", "consecutive_skips", "grad_norm")


class ScalerMetrics(keras.metrics.Metric):
    """Reads a kmp.LossScaleOptimizer's state into the train step's logs (no extra host sync).

    `kmp.compile` attaches one to the model, so fit's logs, History and TensorBoard carry
    `loss_scale`, `skipped_steps`, `consecutive_skips` and `grad_norm`.

    Args:
        optimizer: kmp.LossScaleOptimizer. The optimizer to read.
        name: str. Defaults to "kmp_scaler".
    """

    def __init__(self, optimizer, name="kmp_scaler", **kwargs):
        super().__init__(name=name, **kwargs)
        self._opt = optimizer

    def update_state(self, *args, **kwargs):
        pass

    def reset_state(self):
        pass

    def result(self):
        o = self._opt
        if not o.built:
            return {}
        return {k: ops.cast(getattr(o, STATE_VARIABLES[k]), "float32") for k in LOG_KEYS}


class PrecisionMonitor(keras.callbacks.Callback):
    """Watches mixed-precision health during `fit` and stops runaway runs with a clear message.

    With a `kmp.LossScaleOptimizer` it records each skipped step and the variables whose
    gradients overflowed (one host read, only on skipped steps), and enforces the optimizer's
    `max_consecutive_skips` budget by raising `kmp.scaling.NonFiniteGradientsError`. Without
    loss scaling, a non-finite loss means the weights are already damaged: training stops and
    says so. Scale, skips and gradient norm are in fit's logs when the model was prepared with
    `kmp.compile`; otherwise this callback reads them from the optimizer every `every` steps.

    Args:
        every: int. Steps between host reads of the optimizer when the logs lack its state.
            Defaults to 50.
        log_dir: str or None. Also write loss scale, skips and gradient norm as TensorBoard
            scalars every `every` steps, and overflow events as text. Defaults to None.
        verbose: bool. Print one line per skipped step. Defaults to False.

    Example:
    >>> monitor = PrecisionMonitor()
    >>> monitor.events
    []
    """

    def __init__(self, every=50, log_dir=None, verbose=False):
        super().__init__()
        self.every, self.log_dir, self.verbose = every, log_dir, verbose
        self.events = []  # (step, [variable paths]) per skipped step
        self.stopped_reason = None
        self._step = 0
        self._skipped = 0
        self._writer = None

    @property
    def _scaler(self):
        opt = getattr(self.model, "optimizer", None)
        return opt if isinstance(opt, LossScaleOptimizer) else None

    def on_train_begin(self, logs=None):
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        scaler = self._scaler
        self._skipped = scaler.state()["skipped_steps"] if scaler is not None else 0

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._step += 1
        scaler = self._scaler
        if scaler is None:
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.stopped_reason = (
                    f"kmp.PrecisionMonitor: loss became {float(loss)} at step {self._step} without "
                    "loss scaling; the weights may already be non-finite. Use kmp.compile under "
                    "mixed_float16, mixed_bfloat16, or a lower learning rate."
                )
                print(self.stopped_reason)
                self.model.stop_training = True
            return
        if "skipped_steps" in logs:
            state = {k: float(logs[k]) for k in LOG_KEYS}
        elif self._step % self.every == 0:
            state = scaler.state()
        else:
            return
        if state["skipped_steps"] > self._skipped:
            self._skipped = state["skipped_steps"]
            names = scaler.overflow_variables
            self.events.append((self._step, names))
            if self.verbose:
                print(f"kmp: step {self._step} skipped (loss scale now {state['loss_scale']:g}); "
                      f"non-finite gradients in: {', '.join(names)}")
            if self._writer is not None:
                with self._writer.as_default():
                    tf.summary.text("kmp/overflow_variables", ", ".join(names), step=self._step)
        budget = scaler.max_consecutive_skips
        if budget is not None and state["consecutive_skips"] >= budget:
            scaler.check_skip_budget()
        if self._writer is not None and self._step % self.every == 0:
            with self._writer.as_default():
                for key in ("loss_scale", "skipped_steps", "grad_norm"):
                    tf.summary.scalar(f"kmp/{key}", state[key], step=self._step)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


class Throughput(keras.callbacks.Callback):
    """Measures training tokens/s and model FLOPs utilization (MFU) during `fit`.

    It reads the loss (a host sync) only every `every` batches and times whole windows of
    `every` batches inside an epoch, so compilation (the first window), validation and
    checkpointing between epochs are not counted. At each epoch end it adds `tokens_per_sec`
    (and `mfu` when `peak_flops` is known) to the logs, for History and TensorBoard.

    Args:
        tokens_per_batch: int. Tokens in one batch (global batch size x sequence length).
        flops_per_token: float or None. Training FLOPs per token. Defaults to None.
        peak_flops: float or None. The devices' combined peak FLOP/s. Defaults to None.
        every: int. Batches per timed window. Defaults to 10.

    Example:
    >>> t = Throughput(tokens_per_batch=2048)
    >>> t.tokens_per_sec is None
    True
    """

    def __init__(self, tokens_per_batch, flops_per_token=None, peak_flops=None, every=10):
        super().__init__()
        self.tokens_per_batch, self.every = tokens_per_batch, every
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens = 0
        self.seconds = 0.0
        self._mark = None

    @property
    def tokens_per_sec(self):
        """Tokens per second over all timed windows so far, or None before the first one."""
        return self.tokens / self.seconds if self.seconds else None

    @property
    def mfu(self):
        """Achieved model FLOP/s over the peak, or None where either is unknown."""
        if self.tokens_per_sec is None or not self.flops_per_token or not self.peak_flops:
            return None
        return self.tokens_per_sec * self.flops_per_token / self.peak_flops

    def on_epoch_begin(self, epoch, logs=None):
        self._mark, self._batches = None, 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every:
            return
        if logs and "loss" in logs:
            float(logs["loss"])  # wait for the step to finish
        now = time.perf_counter()
        if self._mark is not None:
            self.tokens += self.every * self.tokens_per_batch
            self.seconds += now - self._mark
        self._mark = now

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.tokens_per_sec is not None:
            logs["tokens_per_sec"] = self.tokens_per_sec
            if self.mfu is not None:
                logs["mfu"] = self.mfu
