"""Fault injection: make chosen training steps produce inf/NaN gradients, on chosen replicas.

For tests, and for users who want to see their setup survive an overflow storm before a long run
does it for them. TensorFlow backend (the poison is a `tf.custom_gradient`).
"""

from __future__ import annotations

import keras

KINDS = ("inf", "nan")


class FaultInjector(keras.callbacks.Callback):
    """Poisons the gradients of chosen training steps with inf or NaN.

    Wrap the loss with `wrap` when compiling and pass the injector to `fit`. On a chosen step
    the gradient of the loss is multiplied by inf (or NaN) on the chosen replicas, so every
    trainable variable's gradient there is non-finite, as after a float16 overflow. Steps are
    counted from 0 over every batch this callback has seen, across epochs and `fit` calls,
    whether or not the step was applied. The forward pass and the loss value are untouched.

    Args:
        steps: iterable of int, callable (int -> bool), or "all". Steps to poison.
        kind: str. "inf" or "nan". Defaults to "inf".
        replicas: iterable of int or None. Replica ids (`replica_id_in_sync_group`) to
            poison under a `tf.distribute` strategy. Defaults to None: all.

    Example:
    >>> faults = FaultInjector(steps=[3, 4], kind="nan")
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> m.compile("sgd", faults.wrap("mse"))
    """

    def __init__(self, steps, kind="inf", replicas=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}. Use one of: {', '.join(KINDS)}.")
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
            import tensorflow as tf

            with tf.init_scope():
                self._armed = tf.Variable(False, trainable=False, name="kmp_fault_armed")
        return self._armed

    def wrap(self, loss):
        """Returns `loss` (a Keras loss name, object or function) with the poison attached."""
        import tensorflow as tf

        loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        armed = self._flag()
        bad = float("inf") if self.kind == "inf" else float("nan")
        replicas = self.replicas

        @tf.custom_gradient
        def poison(value):
            def grad(upstream):
                hit = armed.read_value()
                if replicas is not None:
                    ctx = tf.distribute.get_replica_context()
                    rid = ctx.replica_id_in_sync_group if ctx is not None else 0
                    hit = tf.logical_and(hit, tf.reduce_any(tf.equal(rid, replicas)))
                return upstream * tf.where(hit, tf.constant(bad, upstream.dtype),
                                           tf.constant(1.0, upstream.dtype))
            return tf.identity(value), grad

        def poisoned_loss(y_true, y_pred):
            return poison(loss_fn(y_true, y_pred))

        poisoned_loss.__name__ = f"faulty_{getattr(loss_fn, '__name__', 'loss')}"
        return poisoned_loss

    def on_train_batch_begin(self, batch, logs=None):
        hit = bool(self._hit(self.step))
        self._flag().assign(hit)
        if hit:
            self.poisoned.append(self.step)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1

    def on_train_end(self, logs=None):
        self._flag().assign(False)
