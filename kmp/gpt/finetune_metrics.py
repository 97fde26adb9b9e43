"""What a `kmp finetune --preset` run measures besides fit's loss: the validation loss by the
model's own forward pass (`evaluate`, `ValidationLoss` each epoch), the process's and the GPU's
peak memory (`peak_memory`), and on JAX the memory XLA plans for the compiled train step
(`compiled_step_bytes`). metrics.json records all of them (docs/finetuning.md).
"""

from __future__ import annotations

import resource

import keras
import numpy as np

from kmp import backends


def evaluate(model, batches) -> float:
    """Measures a model's weighted mean next-token cross-entropy on batches.

    The model's own forward pass (not `fit`'s), the log-softmax summed in float64.

    Args:
        model: callable. A CausalLM (or anything called as `model(inputs, training=False)`
            that returns logits).
        batches: iterable of `(inputs, targets, weights)` (`TuneData.val_batches`).

    Returns:
        A float: nats per weighted token.

    Example:
    >>> uniform = lambda inputs, training: np.zeros((1, 2, 4))  # 4 tokens, equally likely
    >>> round(evaluate(uniform, [(None, np.array([[1, 3]]), np.ones((1, 2)))]), 4)  # ln 4
    1.3863
    """
    total = count = 0.0
    for x, y, w in batches:
        logits = keras.ops.convert_to_numpy(keras.ops.cast(model(x, training=False),
                                                           "float32")).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        ce = lse - np.take_along_axis(logits, y[..., None].astype(np.int64), -1)[..., 0]
        total += float((ce * w).sum())
        count += float(w.sum())
    return total / max(count, 1.0)


class ValidationLoss(keras.callbacks.Callback):
    """Adds `val_loss` (`evaluate` on the validation batches) to each epoch's logs.

    Args:
        batches: iterable of `(inputs, targets, weights)`, iterated anew each epoch
            (`TuneData.val_batches`).

    Example:
    >>> callback = ValidationLoss([])
    >>> callback.last is None  # set at each epoch's end: the latest validation loss
    True
    """

    def __init__(self, batches):
        super().__init__()
        self.batches, self.last = batches, None

    def on_epoch_begin(self, epoch, logs=None):
        self.last = None

    def on_epoch_end(self, epoch, logs=None):
        backends.sync_state(self.model)
        self.last = evaluate(self.model, self.batches)
        if logs is not None:
            logs["val_loss"] = self.last


def peak_memory() -> dict:
    """Reports the peak memory of this process, and of the first GPU where there is one.

    Returns:
        A dict: `host_peak_rss_bytes` (the process's peak resident set size: all it ever
        held, the interpreter and every library included) and, on a GPU,
        `device_peak_bytes` (`kmp.backends.gpu_memory`).

    Example:
    >>> peak_memory()["host_peak_rss_bytes"] > 0
    True
    """
    found = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    gpu = backends.gpu_memory()
    if gpu and gpu.get("peak") is not None:
        found["device_peak_bytes"] = int(gpu["peak"])
    return found


def compiled_step_bytes(model, batch) -> dict | None:
    """The memory XLA plans for one training step, on JAX.

    `jax.jit(train_step).lower(...).compile().memory_analysis()` of `model`'s step on `batch`.

    Args:
        model: keras.Model. A compiled model whose optimizer is built (after `fit`).
        batch: tuple. One batch as `fit` gets it: `(inputs, targets)` or with weights.

    Returns:
        A dict of bytes: `argument` (weights, optimizer state, batch), `output`, `temp`,
        `alias`, `generated_code`, and `total` (less donated aliases); None on other
        backends, or where XLA gives no analysis.

    Example:
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile("adam", "mse")
    >>> model.optimizer.build(model.trainable_variables)
    >>> plan = compiled_step_bytes(model, (np.ones((4, 3)), np.ones((4, 2))))
    >>> plan is None or plan["total"] > 0  # a dict on JAX
    True
    """
    if backends.name() != "jax":
        return None
    import jax

    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in model.optimizer.variables],
             [v.value for v in model.metrics_variables])
    step = jax.jit(lambda s, d: type(model).train_step(model, s, d))
    plan = step.lower(state, batch).compile().memory_analysis()
    if plan is None:
        return None
    parts = {k: int(getattr(plan, f"{k}_size_in_bytes")) for k in
             ("argument", "output", "temp", "alias", "generated_code")}
    parts["total"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return parts
