"""Callbacks: PrecisionMonitor (loss scale, skips, overflowing variables), Throughput, and
TensorBoard scalars on every backend."""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras
from keras import ops

from kmp import backends
from kmp.scaling import LossScaleOptimizer

LOG_KEYS = ("loss_scale", "skipped_steps", "consecutive_skips", "grad_norm")


class BatchLoss:
    """Each training batch's own loss, read from fit's logs.

    Models compiled by `kmp.compile` log it as `batch_loss` (`LossTracker`). For other models
    it is derived from the running mean over the epoch that Keras logs as `loss`:
    k·mean_k − (k−1)·mean_(k−1), in float64; after a non-finite loss that mean stays
    non-finite for the rest of the epoch, and so do the derived values. Call `reset` at each
    epoch's start.

    Example:
    >>> losses = BatchLoss()
    >>> losses(0, {"loss": 4.0}), losses(1, {"loss": 3.5})
    (4.0, 3.0)
    >>> losses(2, {"loss": float("nan"), "batch_loss": 2.5})
    2.5
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._total = 0.0

    def __call__(self, batch: int, logs) -> float | None:
        """Batch `batch`'s (0-based, in the epoch) loss, or None when the logs have none."""
        if not logs or "loss" not in logs:
            return None
        total = float(logs["loss"]) * (batch + 1)
        derived, self._total = total - self._total, total
        return float(logs["batch_loss"]) if "batch_loss" in logs else derived


class LossTracker(keras.metrics.Mean):
    """Keras's loss tracker (the epoch's running mean, logged as `loss`) that also logs each
    step's own loss as `batch_loss`, so a non-finite loss on one step (a skipped float16
    overflow) does not hide the losses of the steps after it. `kmp.compile` installs it.

    Args:
        name: str. Defaults to "loss".
    """

    def __init__(self, name="loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.last = self.add_variable((), "zeros", "float32", "mean", "last")

    def update_state(self, values, sample_weight=None):
        super().update_state(values, sample_weight=sample_weight)
        self.last.assign(ops.cast(ops.mean(values), "float32"))

    def result(self):
        return {self.name: super().result(), f"batch_{self.name}": ops.copy(self.last.value)}


class ScalerMetrics(keras.metrics.Metric):
    """Carries a kmp.LossScaleOptimizer's state into the train step's logs (no extra host sync).

    `kmp.compile` attaches one to the model, so fit's logs, History and TensorBoard carry
    `loss_scale`, `skipped_steps`, `consecutive_skips` and `grad_norm`, current after every
    step on every backend. It copies the state the optimizer left from the step into its own
    variables (on JAX, fit holds the optimizer's variables outside the model until it syncs);
    an evaluation step shows the last training step's state. `reset_state` keeps it.

    Args:
        optimizer: kmp.LossScaleOptimizer. The optimizer to read.
        name: str. Defaults to "kmp_scaler".
    """

    def __init__(self, optimizer, name="kmp_scaler", **kwargs):
        super().__init__(name=name, **kwargs)
        self._opt = optimizer
        self._state = {k: self.add_variable((), "zeros", "float32", "only_first_replica", k)
                       for k in LOG_KEYS}

    def update_state(self, *args, **kwargs):
        pass

    def reset_state(self):
        pass

    def result(self):
        step = self._opt.take_step_state()  # what this step left (see its docstring)
        if step is not None:
            for key, variable in self._state.items():
                variable.assign(ops.cast(step[key], "float32"))
        # Copies: JAX's fit donates the variables' buffers to the next step.
        return {key: ops.copy(variable.value) for key, variable in self._state.items()}


class SummaryWriter:
    """TensorBoard event files from the `tensorboard` package (no TensorFlow needed).

    Args:
        log_dir: str or Path. Directory of the event file (created if missing).

    Example:
    >>> import tempfile
    >>> w = SummaryWriter(tempfile.mkdtemp())
    >>> w.scalar("kmp/loss_scale", 32768.0, step=1)
    >>> w.close()
    """

    def __init__(self, log_dir):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir))

    def _add(self, summary, step):
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                               summary=summary))

    def scalar(self, tag: str, value: float, step: int):
        """Writes one scalar."""
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        self._add(scalar_pb(tag, float(value)), step)

    def text(self, tag: str, value: str, step: int):
        """Writes one text entry."""
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._add(text_pb(tag, value), step)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class TensorBoardScalars(keras.callbacks.Callback):
    """Writes fit's logs (loss, metrics, loss scale, ...) as TensorBoard scalars on any backend.

    Keras's own `keras.callbacks.TensorBoard` needs TensorFlow; this writes the same scalar
    layout (`train/` every `update_freq` batches as `batch_<name>`, and `train/` and
    `validation/` as `epoch_<name>` at each epoch's end) through `SummaryWriter`. Every scalar's
    step is the run's batch count, continued from `step`: a resumed or rolled-back run's
    curves go on where it stands instead of starting again at 0.

    Args:
        log_dir: str or Path. Root directory of the event files.
        update_freq: int. Batches between batch-level scalars. Defaults to 10.
        step: int. Batches the run trained before this `fit`. Defaults to 0.
    """

    def __init__(self, log_dir, update_freq=10, step=0):
        super().__init__()
        self.log_dir, self.update_freq = Path(log_dir), update_freq
        self._writers, self._batches = {}, step

    def _writer(self, name):
        if name not in self._writers:
            self._writers[name] = SummaryWriter(self.log_dir / name)
        return self._writers[name]

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if logs and self._batches % self.update_freq == 0:
            logs = dict(logs)
            if "batch_loss" in logs:  # the step's own loss (kmp.compile), not the epoch's mean
                logs["loss"] = logs.pop("batch_loss")
            for key, value in logs.items():
                self._writer("train").scalar(f"batch_{key}", value, self._batches)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key.removeprefix("val_") == "batch_loss":  # one step's: no epoch figure
                continue
            split, key = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            self._writer(split).scalar(f"epoch_{key}", value, self._batches)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


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
        step: int. Batches trained before this `fit` (a resumed run's position), so that
            reported step numbers count from the run's start. Defaults to 0.

    Example:
    >>> monitor = PrecisionMonitor()
    >>> monitor.events
    []
    """

    def __init__(self, every=50, log_dir=None, verbose=False, step=0):
        super().__init__()
        self.every, self.log_dir, self.verbose = every, log_dir, verbose
        self.events = []  # (step, [variable paths]) per skipped step
        self.stopped_reason = None
        self._step = step
        self._skipped = 0
        self._writer = None

    @property
    def _scaler(self):
        opt = getattr(self.model, "optimizer", None)
        return opt if isinstance(opt, LossScaleOptimizer) else None

    def on_train_begin(self, logs=None):
        if self.log_dir:
            self._writer = SummaryWriter(self.log_dir)
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
            backends.sync_state(self.model)
            state = scaler.state()
        else:
            return
        if state["skipped_steps"] > self._skipped:
            self._skipped = state["skipped_steps"]
            backends.sync_state(self.model)  # the overflow record lives in the optimizer
            names = scaler.overflow_variables
            self.events.append((self._step, names))
            if self.verbose:
                print(f"kmp: step {self._step} skipped (loss scale now {state['loss_scale']:g}); "
                      f"non-finite gradients in: {scaler.overflow_summary()}")
            if self._writer is not None:
                self._writer.text("kmp/overflow_variables", ", ".join(names), self._step)
        budget = scaler.max_consecutive_skips
        if budget is not None and state["consecutive_skips"] >= budget:
            backends.sync_state(self.model)
            scaler.check_skip_budget()
        if self._writer is not None and self._step % self.every == 0:
            for key in ("loss_scale", "skipped_steps", "grad_norm"):
                self._writer.scalar(f"kmp/{key}", state[key], self._step)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
