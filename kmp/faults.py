"""Fault injection: inf/NaN gradients or a loss spike on chosen training steps and replicas.

For rehearsing failures: users who want to see their setup survive an overflow storm or a loss
spike before a long run does it for them, and kmp's own tests. Runs on every backend: the poison
is an `ops.custom_gradient` (a plain product for spikes) whose switch is set between steps and
read inside the compiled step (`kmp.backends.switch`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from kmp import backends
from kmp.errors import UserError

KINDS = ("inf", "nan", "spike")
SPIKE_FACTOR = 100.0  # what a spike multiplies the loss by


class Fault(NamedTuple):
    """One fault to inject: `kind` on `count` consecutive steps from `step`; with `worker`,
    only in that process's share of the batch (a run across processes)."""

    kind: str
    step: int
    count: int = 1
    worker: int | None = None

    def hits(self, step: int) -> bool:
        return self.step <= step < self.step + self.count


def parse_faults(spec: str) -> list[Fault]:
    """Parses "KIND@STEP[xCOUNT][:WORKER]", comma-separated (KIND: inf, nan, spike; WORKER:
    one process's rows only, inf and nan).

    Example:
    >>> [tuple(f) for f in parse_faults("nan@200x30,spike@300")]
    [('nan', 200, 30, None), ('spike', 300, 1, None)]
    >>> parse_faults("inf@5:1")
    [Fault(kind='inf', step=5, count=1, worker=1)]

    Raises:
        UserError: for anything else.
    """
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = re.fullmatch(r"(\w+)@(\d+)(?:x(\d+))?(?::(\d+))?", part)
        if (not match or match[1] not in KINDS or int(match[3] or 1) < 1
                or (match[4] and match[1] == "spike")):
            raise UserError(f"Cannot read the fault {part!r}. Write KIND@STEP[xCOUNT] with "
                            f"KIND one of {', '.join(KINDS)}, e.g. nan@200x30 or spike@300, "
                            "and :WORKER after inf or nan for one process's rows (inf@5:1).",
                            field="inject_fault")
        worker = int(match[4]) if match[4] else None
        faults.append(Fault(match[1], int(match[2]), int(match[3] or 1), worker))
    return faults


class FaultInjector(keras.callbacks.Callback):
    """Poisons the gradients of chosen training steps with inf or NaN, or spikes their loss.

    Wrap the loss with `wrap` when compiling and pass the injector to `fit`. On a chosen step
    the gradient of the loss is multiplied by inf (or NaN) on the chosen replicas, so every
    trainable variable's gradient there is non-finite, as after a float16 overflow; the forward
    pass and the loss value are untouched. A "spike" multiplies the step's loss (and so its
    gradient) by `SPIKE_FACTOR` instead. Steps are counted from 0 over every batch this callback
    has seen, across epochs and `fit` calls, whether or not the step was applied.

    Args:
        steps: iterable of int, callable (int -> bool), or "all". Steps to poison.
        kind: str. "inf", "nan" or "spike". Defaults to "inf".
        replicas: iterable of int or None. Replica ids (`replica_id_in_sync_group`) to
            poison under a `tf.distribute` strategy (TensorFlow backend; on JAX, put the
            overflow into one device's shard of the data instead). Defaults to None: all.

    Example:
    >>> faults = FaultInjector(steps=[3, 4], kind="nan")
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", faults.wrap("mse"))
    """

    def __init__(self, steps, kind="inf", replicas=None):
        super().__init__()
        if kind not in KINDS:
            raise UserError(f"Unknown fault kind {kind!r}. Use one of: {', '.join(KINDS)}.")
        if replicas is not None:
            backends.require("FaultInjector(replicas=...)", "tensorflow")
        if steps == "all":
            self._hit = lambda step: True
        elif callable(steps):
            self._hit = steps
        else:
            chosen = {int(s) for s in steps}
            self._hit = chosen.__contains__
        self.kind = kind
        self.replicas = None if replicas is None else sorted(int(r) for r in replicas)
        self.step = 0  # the next batch's index
        self.poisoned = []  # the steps that were poisoned
        self._armed = None

    def _flag(self):
        if self._armed is None:
            self._armed = backends.switch(False)
        return self._armed

    def wrap(self, loss):
        """Returns `loss` (a Keras loss name, object or function) with the poison attached."""
        loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        armed = self._flag()
        bad = float("inf") if self.kind == "inf" else float("nan")
        replicas = self.replicas

        if self.kind == "spike":
            def spiked_loss(y_true, y_pred):
                value = loss_fn(y_true, y_pred)
                return value * ops.where(armed.read(), ops.cast(SPIKE_FACTOR, value.dtype),
                                         ops.cast(1.0, value.dtype))

            spiked_loss.__name__ = f"spiked_{getattr(loss_fn, '__name__', 'loss')}"
            return spiked_loss

        @ops.custom_gradient
        def poison(value):
            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                hit = armed.read()
                if replicas is not None:
                    rid = backends.replica_id()
                    hit = ops.logical_and(hit, ops.any(ops.equal(rid, ops.array(replicas))))
                return upstream * ops.where(hit, ops.cast(bad, upstream.dtype),
                                            ops.cast(1.0, upstream.dtype))
            return ops.multiply(value, 1.0), grad

        def poisoned_loss(y_true, y_pred):
            return poison(loss_fn(y_true, y_pred))

        poisoned_loss.__name__ = f"faulty_{getattr(loss_fn, '__name__', 'loss')}"
        return poisoned_loss

    def on_train_batch_begin(self, batch, logs=None):
        hit = bool(self._hit(self.step))
        self._flag().set(hit)
        if hit:
            self.poisoned.append(self.step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self._flag().set(False)  # disarmed between steps: validation never sees a fault

    def on_train_end(self, logs=None):
        self._flag().set(False)


class PoisonedRows(keras.utils.PyDataset):
    """A dataset of (x, y) batches with sample weights: 1, or inf (NaN) on the rows this
    process feeds at the chosen batches, when `here` (nestable: one per fault).

    For a run across processes (`kmp.distributed`): one process's share of a batch overflows
    as if its part of the model had, and the step's gradients (global in SPMD) are
    non-finite everywhere. Every process wraps its data alike (the same batch structure);
    only the chosen one poisons.

    Args:
        dataset: a PyDataset of (x, y) batches.
        hit: callable (batch index -> bool).
        kind: str. "inf" or "nan".
        here: bool. Whether this process is the one to poison.
    """

    def __init__(self, dataset, hit, kind="inf", here=True):
        super().__init__()
        self.dataset, self.hit, self.here = dataset, hit, here
        self.bad = float("inf") if kind == "inf" else float("nan")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, *weights = self.dataset[i]  # (x, y), or (x, y, w) from another PoisonedRows
        weights = np.array(weights[0]) if weights else np.ones(np.shape(y), dtype="float32")
        if self.here and self.hit(i):
            weights[:] = self.bad
        return x, y, weights


def rehearsal(spec: str, dataset, first: int = 0, position=None, batches_per_step: int = 1,
              worker: int = 0, workers: int = 1):
    """Wires the faults of `spec` (`parse_faults`) into a run: one `FaultInjector` per kind
    (wrap the loss with each, pass each to fit) and, for the faults aimed at one worker's rows
    (inf@5:1), `dataset` wrapped in `PoisonedRows`. Faults are keyed to data positions, so a
    rolled-back run that skips the faulty window does not meet them again.

    Args:
        spec: str. The faults, e.g. "nan@200x30,spike@300" (empty: none).
        dataset: PyDataset. The fit's training batches; item k is the run's batch `first + k`.
        first: int. The run's index of the fit's first batch. Defaults to 0.
        position: callable or None. The run's batch index -> data position (skipped windows
            left out, `kmp.recovery.RecoveryPlan.position`). Defaults to None: the same.
        batches_per_step: int. Batches per optimizer step: a fault's STEP is the data
            position divided by it. Defaults to 1.
        worker: int. This process's index. Defaults to 0.
        workers: int. The run's process count. Defaults to 1.

    Returns:
        (list of FaultInjector, the dataset to fit on).

    Raises:
        UserError: for a spec that cannot be read or names a worker that does not exist.

    Example:
    >>> injectors, _ = rehearsal("nan@3,spike@5", dataset=None)
    >>> [f.kind for f in injectors]
    ['nan', 'spike']
    """
    position = position or (lambda b: b)
    faults = parse_faults(spec)

    def step_of(k):  # fit batch k -> the optimizer step of the data it reads
        return position(first + k) // batches_per_step

    injectors = []
    for kind in sorted({f.kind for f in faults if f.worker is None}):
        chosen = [f for f in faults if f.worker is None and f.kind == kind]
        injectors.append(FaultInjector(
            steps=lambda k, chosen=chosen: any(f.hits(step_of(k)) for f in chosen), kind=kind))
    for f in (f for f in faults if f.worker is not None):
        if f.worker >= workers:
            raise UserError(f"Fault {f.kind}@{f.step}:{f.worker}: there are {workers} "
                            f"worker(s), 0 .. {workers - 1}.", field="inject_fault")
        dataset = PoisonedRows(dataset, lambda k, f=f: f.hits(step_of(k)), f.kind,
                               here=worker == f.worker)
    return injectors, dataset
