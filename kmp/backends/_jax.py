"""The backend seam on JAX (see kmp.backends)."""

from __future__ import annotations

import contextlib

import jax
import keras
import numpy as np

from kmp._keras import optimizer_built_for
from kmp.backends import HostSwitch


def version() -> str:
    return jax.__version__


def accelerator():
    for platform in ("gpu", "tpu"):
        try:
            devices = jax.devices(platform)
        except RuntimeError:  # no backend for that platform
            continue
        if devices:
            cc = getattr(devices[0], "compute_capability", None)
            if isinstance(cc, str) and "." in cc:
                cc = tuple(int(p) for p in cc.split(".")[:2])
            return {"kind": platform, "name": devices[0].device_kind,
                    "compute_capability": cc if platform == "gpu" else None,
                    "count": len(devices)}
    return None


# jax_default_matmul_precision values that keep float32 matmuls in full float32 on GPUs (the
# default, None, and "default", "bfloat16", "high", "tensorfloat32" let XLA use TF32).
_FULL_FLOAT32 = ("highest", "float32", "F32_F32_F32")


def jit_compile_for(choice):
    if choice:
        return True, None
    return True, "Under JAX XLA stays on (without it Keras's JAX trainer runs each op on its own)."


def float32_matmuls_use_tf32() -> bool:
    precision = jax.config.jax_default_matmul_precision
    return precision is None or str(precision) not in _FULL_FLOAT32


def in_compiled_function(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def jit(fn):
    return jax.jit(fn)


def sync_state(model):
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def forward_backward(model, forward, loss_scale):
    from keras import StatelessScope

    _, shapes = forward(None)  # an eager pass for the outputs' shapes and dtypes
    probes = [jax.numpy.zeros(t.shape, t.dtype) for _, t in shapes]
    variables = model.trainable_variables
    values = [v.value for v in variables]

    def scaled_loss(values, probes):
        with StatelessScope(state_mapping=list(zip(variables, values))):
            loss, outputs = forward(probes)
        return loss * loss_scale, (loss, [t for _, t in outputs])

    (var_grads, grads), (loss, outputs) = jax.grad(scaled_loss, argnums=(0, 1), has_aux=True)(
        values, probes)
    return loss, [(layer, t) for (layer, _), t in zip(shapes, outputs)], grads, var_grads


def gpu_memory(reset):
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    stats = device.memory_stats() or {}
    return {"current": stats.get("bytes_in_use"), "peak": stats.get("peak_bytes_in_use"),
            "resettable": False}


class Switch(HostSwitch):
    """A Python flag that a compiled step reads at run time through a host callback."""

    def read(self):
        from jax.experimental import io_callback

        return io_callback(lambda: np.asarray(self.value), jax.ShapeDtypeStruct((), np.bool_),
                           ordered=False)


def apply_scaled(optimizer, flags, grads, tvs):
    # JAX arrays are immutable: the pure step, then assigned.
    optimizer._assign_stateless(grads, tvs or optimizer_built_for(optimizer))


def replica_id():
    return 0


@contextlib.contextmanager
def distribution(kind, devices=None):
    if kind != "mirrored":
        yield 1
        return
    devices = devices or jax.devices()
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield len(devices)
    finally:
        keras.distribution.set_distribution(previous)
