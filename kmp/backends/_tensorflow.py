"""The backend seam on TensorFlow (see kmp.backends)."""

from __future__ import annotations

import contextlib

import tensorflow as tf


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


def replica_id():
    ctx = tf.distribute.get_replica_context()
    return ctx.replica_id_in_sync_group if ctx is not None else 0


@contextlib.contextmanager
def distribution(kind, devices=None):
    strategy = (tf.distribute.MirroredStrategy(devices) if kind == "mirrored"
                else tf.distribute.get_strategy())
    with strategy.scope():
        yield strategy.num_replicas_in_sync
