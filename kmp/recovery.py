"""Training that heals itself: notice a broken run, roll it back, skip its data, retry safer.

`Watchdog` (a callback) raises `Event` when a run breaks: the loss-scale skip budget is spent,
the loss spikes above `spike_factor` x the median of the last `window` steps, or a loss or a
weight turns non-finite without loss scaling. `RecoveryPlan` decides what to do, as a ladder:

1. roll back to the last verified checkpoint and skip the data window that led to the event
   (from the checkpoint's position through the event's batch);
2. if the event recurs within `stretch` steps of the previous one: also halve the learning
   rate for `stretch` steps from the checkpoint;
3. if it recurs again: also change precision, one rung at a time: mixed_float16 ->
   mixed_bfloat16 where the hardware computes bfloat16 natively, then a float32 residual
   stream;

and after `attempts` recurring attempts it stops with one line saying what was tried. The plan
is JSON (`state()`) kept in every checkpoint, so a run resumed after a kill continues with the
same skipped windows, learning rate and precision. Published practice does this by hand: PaLM
(Chowdhery et al. 2022, section 5.1) restarted about 100 steps before a spike and skipped 200
to 500 batches; the OPT-175B logbook (Zhang et al. 2022) records restarts with lowered
learning rates.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import math
import statistics
from pathlib import Path

import keras
from keras import ops

from kmp import backends
from kmp.callbacks import BatchLoss, SummaryWriter
from kmp.checkpoint import LATEST, verify, write_json_atomic
from kmp.errors import TrainingStopped, UserError
from kmp.scaling import LossScaleOptimizer

# Defaults from measurement (docs/reliability.md): over nine clean 600-step tiny runs (three
# backends x three policies) no step's loss exceeded 1.13x the median of the 50 before it.
SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 50
CAUSES = {"skip_budget": "loss-scale skip budget spent", "spike": "loss spike",
          "nonfinite_loss": "non-finite loss", "nonfinite_weights": "non-finite weights"}


class Event(Exception):
    """A broken run, raised out of `fit` by `Watchdog`.

    Args:
        cause: str. One of `CAUSES`.
        step: int. The run's step (from 0, skipped steps included) whose batch showed it.
        batch: int. That batch's index in the run (from 0; steps x gradient accumulation).
        detail: str. What was seen.
        loss: float or None. That batch's loss, if it had one. Defaults to None.
    """

    def __init__(self, cause: str, step: int, batch: int, detail: str, loss=None):
        super().__init__(f"step {step}: {CAUSES[cause]}: {detail}")
        self.cause, self.step, self.batch, self.detail = cause, step, batch, detail
        self.loss = loss
        self.losses = []  # (step, loss) of the batches the broken fit trained, for the plot


class Watchdog(keras.callbacks.Callback):
    """Raises `Event` out of `fit` when the run breaks (see the module docstring).

    Put it before the callbacks that must not see a broken epoch end (checkpoints): on a
    non-finite weight it raises at the epoch's end, before they run.

    Args:
        spike_factor: float. A batch whose loss exceeds this times the median of the last
            `window` losses is a spike. Defaults to `SPIKE_FACTOR`.
        window: int. Losses in the running median; no spike is called before this many.
            Defaults to `SPIKE_WINDOW`.
        max_skips: int or None. Consecutive skipped optimizer steps (loss scaling) that make
            an event; under gradient accumulation the scaler skips micro-batches, and the
            budget is `max_skips x batches_per_step` of them. Defaults to None: the
            optimizer's `max_consecutive_skips` (counted as it counts).
        first_batch: int. The run's index of the first batch this `fit` trains. Defaults to 0.
        batches_per_step: int. Batches per optimizer step (gradient accumulation). Defaults to 1.
        recent: iterable of float. The losses before `first_batch` (from a checkpoint).

    Example:
    >>> watchdog = Watchdog(spike_factor=2.0, window=20)
    >>> watchdog.recent.maxlen
    20
    """

    def __init__(self, spike_factor=SPIKE_FACTOR, window=SPIKE_WINDOW, max_skips=None,
                 first_batch=0, batches_per_step=1, recent=()):
        super().__init__()
        if max_skips is not None and (not isinstance(max_skips, int) or max_skips < 1):
            raise UserError(f"Watchdog: max_skips must be None or an int >= 1. Received: "
                            f"max_skips={max_skips!r}")
        self.spike_factor, self.max_skips = float(spike_factor), max_skips
        finite = [x for x in recent if math.isfinite(x)]
        self.recent = collections.deque(finite[-window:] if window else [], maxlen=window)
        self.batch, self.batches_per_step = first_batch, batches_per_step
        self.seen = []  # (step, loss) of every batch of this fit
        self._losses = BatchLoss()

    def on_epoch_begin(self, epoch, logs=None):
        self._losses.reset()

    def _event(self, cause, detail, loss=None):
        event = Event(cause, self.batch // self.batches_per_step, self.batch, detail, loss)
        event.losses = list(self.seen)
        return event

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        try:
            self._check(batch, logs)
        finally:
            self.batch += 1

    def _check(self, batch, logs):
        scaler = self.model.optimizer
        scaler = scaler if isinstance(scaler, LossScaleOptimizer) else None
        loss = self._losses(batch, logs)
        if loss is not None:
            self.seen.append(((self.batch + 1) / self.batches_per_step, loss))
        if scaler is not None:
            budget = (scaler.max_consecutive_skips if self.max_skips is None
                      else self.max_skips * self.batches_per_step)
            skips = logs.get("consecutive_skips")
            if skips is None:
                backends.sync_state(self.model)
                skips = scaler.state()["consecutive_skips"]
            if budget and skips >= budget:
                backends.sync_state(self.model)
                unit = "micro-batches" if self.batches_per_step > 1 else "steps"
                raise self._event("skip_budget", f"{int(skips)} consecutive skipped {unit}; "
                                  f"non-finite gradients in: {scaler.overflow_summary()}")
        if loss is None:
            return
        if not math.isfinite(loss):
            if scaler is None:  # with scaling the step was skipped: the skip budget judges
                raise self._event("nonfinite_loss", f"loss {loss} without loss scaling")
            return
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.spike_factor * median:
                raise self._event("spike", f"loss {loss:.4g} is {loss / median:.1f}x the "
                                  f"median {median:.4g} of the last {len(self.recent)} steps",
                                  loss)
        self.recent.append(loss)

    def _nonfinite_weights(self) -> list[str]:
        backends.sync_state(self.model)
        weights = [v for v in self.model.weights if "float" in str(v.dtype)]
        flags = ops.convert_to_numpy(ops.stack([ops.all(ops.isfinite(v)) for v in weights]))
        bad = [v.path for v, ok in zip(weights, flags) if not ok]  # one host read
        return bad

    def on_train_begin(self, logs=None):
        bad = self._nonfinite_weights()
        if bad:
            raise TrainingStopped(
                f"the weights to train from are already non-finite ({', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}): nothing to roll back to. Start a new run.")

    def on_epoch_end(self, epoch, logs=None):
        bad = self._nonfinite_weights()
        if bad:
            self.batch = max(self.batch - 1, 0)  # the epoch's last batch
            raise self._event("nonfinite_weights", f"in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def position(batch: int, skip) -> int:
    """The data position that batch `batch` of a run reads when the windows `skip` (sorted,
    disjoint, inclusive [first, last] positions) are left out of the data stream.

    Example:
    >>> [position(b, [(2, 3)]) for b in range(5)]
    [0, 1, 4, 5, 6]
    """
    for first, last in skip:
        if batch >= first:
            batch += last - first + 1
    return batch


def _merge(windows):
    merged = []
    for first, last in sorted(windows):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


class RecoveryPlan:
    """What recoveries have changed in a run, and the ladder that decides the next one.

    Args:
        attempts: int. Recurring attempts before giving up. Defaults to 4.
        stretch: int. Steps within which an event counts as the previous one recurring, and
            for which a halved learning rate lasts. Defaults to 100.
        state: dict or None. A plan to continue (`state()` from a checkpoint).

    Example:
    >>> plan = RecoveryPlan()
    >>> record = plan.decide(Event("spike", 130, 130, "loss 9.1"), rolled_back_to=100,
    ...                      policy="mixed_float16")
    >>> record["action"], plan.position(100)
    ('roll back to step 100, skip data positions 100-130', 131)
    """

    def __init__(self, attempts=4, stretch=100, state=None):
        state = state or {}
        self.attempts, self.stretch = attempts, stretch
        self.recoveries = [dict(r) for r in state.get("recoveries", [])]
        self.skip = [tuple(w) for w in state.get("skip", [])]
        self.lr_windows = [tuple(w) for w in state.get("lr_windows", [])]
        self.policy = state.get("policy")  # None: the run's own
        self.float32_residual = bool(state.get("float32_residual", False))

    def state(self) -> dict:
        """The plan as JSON-serializable data."""
        return {"recoveries": self.recoveries, "skip": [list(w) for w in self.skip],
                "lr_windows": [list(w) for w in self.lr_windows], "policy": self.policy,
                "float32_residual": self.float32_residual}

    def position(self, batch: int) -> int:
        """The data position batch `batch` of the run reads (see `position`)."""
        return position(batch, self.skip)

    def decide(self, event: Event, rolled_back_to: int, policy: str, bf16: bool = False,
               batches_per_step: int = 1, iteration: int | None = None) -> dict:
        """Records the recovery from `event` and changes the plan; returns the record.

        Args:
            event: Event. What broke.
            rolled_back_to: int. The run's step of the checkpoint to go back to, counted as
                `event.step` is (from 0, skipped steps included).
            policy: str. The policy the run broke under.
            bf16: bool. Whether the hardware computes bfloat16 natively.
            batches_per_step: int. Gradient accumulation.
            iteration: int or None. The optimizer's own step count at that checkpoint
                (skipped steps do not count), where a halved learning rate starts. Defaults
                to `rolled_back_to`.

        The skipped window is in data positions (batches); the learning-rate window is in the
        schedule's counter (micro-batches: `iteration x batches_per_step`).

        Raises:
            TrainingStopped: when the ladder is exhausted.
        """
        last = self.recoveries[-1] if self.recoveries else None
        recurs = last is not None and event.step <= last["step"] + self.stretch
        attempt = last["attempt"] + 1 if recurs else 1
        if attempt > self.attempts:
            tried = "; ".join(r["action"] for r in self.recoveries[-self.attempts:])
            raise TrainingStopped(
                f"recovery gave up at step {event.step} after {self.attempts} attempts "
                f"({CAUSES[event.cause]}: {event.detail}). Tried: {tried}. The checkpoint of "
                f"step {rolled_back_to} is whole: look at the data and the learning rate "
                "there, or raise the recovery attempts.")
        first = self.position(rolled_back_to * batches_per_step)
        window = (first, max(first, self.position(event.batch)))
        actions = [f"roll back to step {rolled_back_to}, skip data positions "
                   f"{window[0]}-{window[1]}"]
        self.skip = _merge([*self.skip, window])
        if attempt >= 2:
            start = (rolled_back_to if iteration is None else iteration) * batches_per_step
            self.lr_windows.append((start, start + self.stretch * batches_per_step, 0.5))
            factor = math.prod(f for a, b, f in self.lr_windows if a <= start < b)
            actions.append(f"learning rate x{factor:g} for {self.stretch} steps")
        if attempt >= 3:
            now = self.policy or policy
            if now == "mixed_float16" and bf16:
                self.policy = "mixed_bfloat16"
                actions.append("mixed_float16 -> mixed_bfloat16")
            elif now != "float32" and not self.float32_residual:
                self.float32_residual = True
                actions.append(f"{now} with a float32 residual stream")
        record = {"step": event.step, "cause": event.cause, "detail": event.detail,
                  "action": "; ".join(actions), "rolled_back_to": rolled_back_to,
                  "skipped_batches": list(window), "attempt": attempt}
        self.recoveries.append(record)
        return record


@keras.saving.register_keras_serializable(package="kmp")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by `factor` on steps [start, stop) of each window.

    Args:
        schedule: LearningRateSchedule or float. The schedule to scale.
        windows: list of (start, stop, factor). Factors of overlapping windows multiply.

    Example:
    >>> lr = ScaledSchedule(0.1, [(10, 20, 0.5)])
    >>> [round(float(lr(s)), 3) for s in (9, 10, 19, 20)]
    [0.1, 0.05, 0.05, 0.1]
    """

    def __init__(self, schedule, windows):
        self.schedule = schedule
        self.windows = [tuple(w) for w in windows]

    def __call__(self, step):
        lr = self.schedule(step) if callable(self.schedule) else ops.convert_to_tensor(
            self.schedule, "float32")
        step = ops.cast(step, "float32")
        for start, stop, factor in self.windows:
            inside = ops.logical_and(ops.greater_equal(step, start), ops.less(step, stop))
            lr = lr * ops.where(inside, ops.cast(factor, lr.dtype), ops.cast(1.0, lr.dtype))
        return lr

    def get_config(self):
        schedule = (keras.saving.serialize_keras_object(self.schedule)
                    if callable(self.schedule) else self.schedule)
        return {"schedule": schedule, "windows": [list(w) for w in self.windows]}

    @classmethod
    def from_config(cls, config):
        schedule = config["schedule"]
        if isinstance(schedule, dict):
            schedule = keras.saving.deserialize_keras_object(schedule)
        return cls(schedule, config["windows"])


def roll_back(event: Event, plan: RecoveryPlan, checkpoints, policy: str,
              batches_per_step: int = 1, bf16: bool = False, log_dir=None,
              chief: bool = True) -> dict:
    """Decides the recovery from `event` (`RecoveryPlan.decide`), prints it, and records the
    new plan in the last verified checkpoint's record, which it returns.

    Args:
        event: Event. What broke (its `losses` are kept for the loss plot).
        plan: RecoveryPlan. The run's plan, changed in place.
        checkpoints: str or Path. The run's checkpoint directory.
        policy: str. The dtype policy the run broke under.
        batches_per_step: int. Gradient accumulation. Defaults to 1.
        bf16: bool. Whether the hardware computes bfloat16 natively. Defaults to False.
        log_dir: str, Path or None. Where to write the recovery as TensorBoard text and
            scalars. Defaults to None.
        chief: bool. Whether this process writes (every process of a run decides alike).
            Defaults to True.

    Raises:
        TrainingStopped: when there is no checkpoint to roll back to, or the ladder is spent.
    """
    try:
        record = verify(checkpoints)
    except UserError as e:
        raise TrainingStopped(f"step {event.step}: {CAUSES[event.cause]}, and no checkpoint "
                              f"to roll back to: {e}") from e
    done = plan.decide(event, record["batches"] // batches_per_step, policy, bf16,
                       batches_per_step, iteration=record["step"])
    done["abandoned_losses"] = [[x, loss if math.isfinite(loss) else None]
                                for x, loss in event.losses if x > done["rolled_back_to"]]
    line = (f"recover: step {event.step}: {CAUSES[event.cause]} ({event.detail}) -> "
            f"{done['action']} (attempt {done['attempt']} of {plan.attempts})")
    print(line, flush=True)
    record["extra"]["recovery"] = plan.state()
    record["position"] = plan.position(record["batches"])
    if chief:
        if log_dir is not None:
            writer = SummaryWriter(Path(log_dir))
            writer.text("kmp/recovery", line, event.step)
            writer.scalar("kmp/recoveries", len(plan.recoveries), event.step)
            writer.close()
        write_json_atomic(Path(checkpoints) / LATEST, record)  # a kill now resumes with it
    return record


def retry(attempt, plan: RecoveryPlan, checkpoints, record=None, batches_per_step: int = 1,
          bf16: bool = False, log_dir=None, chief: bool = True):
    """Runs `attempt(record)` until it returns; each time it raises `Event`, rolls back
    (`roll_back`) and calls it again with the record to restart from.

    `attempt` builds its model under the plan's precision (`plan.policy`, `plan.
    float32_residual`, `plan.lr_windows`, `plan.skip`) and restores `record` when it is not
    None. Returns what `attempt` returned.

    Raises:
        TrainingStopped: when the ladder is spent (see `RecoveryPlan.decide`).
    """
    while True:
        try:
            return attempt(record)
        except Event as event:
            policy = keras.config.dtype_policy().name
            record = roll_back(event, plan, checkpoints, policy, batches_per_step, bf16,
                               log_dir, chief)
        gc.collect()  # the broken attempt's model and optimizer, before the next is built


@contextlib.contextmanager
def closing_on_event(callbacks):
    """Closes `callbacks` (`on_train_end`) when the body raises `Event`: the interrupted
    fit leaves its writers open."""
    try:
        yield
    except Event:
        for callback in callbacks:
            try:
                callback.on_train_end()
            except Exception as e:  # the event is what matters now
                print(f"recover: warning: closing {type(callback).__name__} failed: {e}")
        raise
