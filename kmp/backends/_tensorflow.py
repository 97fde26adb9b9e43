"""The backend seam on TensorFlow (see kmp.backends)."""

from __future__ import annotations

import contextlib

import tensorflow as tf

from kmp._keras import tf_strategy_supports_no_merge_call


def version() -> str:
    return tf.__version__


def accelerator():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return {"kind": "gpu", "name": details.get("device_name", gpus[0].name),
                "compute_capability": details.get("compute_capability"), "count": len(gpus)}
    tpus = tf.config.list_logical_devices("TPU")
    if tpus:
        return {"kind": "tpu", "name": "TPU", "compute_capability": None, "count": len(tpus)}
    return None


def jit_compile_for(choice):
    return choice, None


def float32_matmuls_use_tf32() -> bool:
    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


def in_compiled_function(value) -> bool:
    return tf.inside_function()


def jit(fn):
    return fn


def sync_state(model):
    pass


def forward_backward(model, forward, loss_scale):
    with tf.GradientTape(persistent=True) as tape:
        loss, outputs = forward(None)
        scaled = loss * loss_scale
    grads = tape.gradient(scaled, [t for _, t in outputs])
    var_grads = tape.gradient(scaled, model.trainable_variables)
    return loss, outputs, grads, var_grads


def gpu_memory(reset):
    if not tf.config.list_physical_devices("GPU"):
        return None
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
    info = tf.config.experimental.get_memory_info("GPU:0")
    return {"current": info["current"], "peak": info["peak"], "resettable": True}


class Switch:
    """A tf.Variable: assigned between steps, read inside the compiled step."""

    def __init__(self, initial):
        with tf.init_scope():
            self._var = tf.Variable(bool(initial), trainable=False, name="kmp_switch")

    def set(self, value):
        self._var.assign(bool(value))

    def read(self):
        return self._var.read_value()


def apply_scaled(optimizer, flags, grads, tvs):
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise RuntimeError("kmp.LossScaleOptimizer.apply() must be called in a replica "
                           "context (inside strategy.run), as Keras's own apply.")
    # The one fix that matters across replicas: decide on the all-reduced flags, so every
    # replica skips when any replica saw an inf/NaN (Keras decides on replica 0's flags).
    if ctx.num_replicas_in_sync > 1:
        flags = ctx.all_reduce(tf.distribute.ReduceOp.SUM, flags)
    grad_norm = optimizer._local_grad_norm(grads)
    if tf_strategy_supports_no_merge_call():
        optimizer._apply_and_update(flags, grad_norm, grads, tvs)
        return

    def cross_replica(distribution, finite, flags, grad_norm, grads, tvs):
        first = distribution.experimental_local_results

        def apply_fn():
            distribution.extended.call_for_each_replica(optimizer._apply_finite,
                                                        args=(grads, tvs))
            return tf.no_op()

        # A cond in cross-replica context: the inner apply calls merge_call itself.
        finite0 = first(finite)[0]
        tf.cond(finite0, apply_fn, tf.no_op)
        optimizer._update_state(finite0, first(flags)[0], first(grad_norm)[0])

    finite = tf.equal(tf.reduce_sum(flags), 0)
    ctx.merge_call(cross_replica, args=(finite, flags, grad_norm, grads, tvs))


def replica_id():
    ctx = tf.distribute.get_replica_context()
    return ctx.replica_id_in_sync_group if ctx is not None else 0


@contextlib.contextmanager
def distribution(kind, devices=None):
    strategy = (tf.distribute.MirroredStrategy(devices) if kind == "mirrored"
                else tf.distribute.get_strategy())
    with strategy.scope():
        yield strategy.num_replicas_in_sync
