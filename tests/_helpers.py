"""Helpers for tests: gradients on any Keras backend (through kmp's backend seam), the
arrays of a checkpoint file, a directory's contents, and the XLA flag per backend."""

import hashlib

import keras
import pytest

from kmp import backends

# Where the `reliability` fixture puts its rows (test id, fault, outcome) when
# docs/reliability.py runs the tests.
RELIABILITY_ROWS = pytest.StashKey[list]()


class _Holder(keras.layers.Layer):
    """Holds `x` as a variable (so it can be differentiated) and tracks `layers`."""

    def __init__(self, x, layers=()):
        super().__init__(dtype="float32")
        self.x = self.add_weight(x.shape, keras.initializers.Constant(x), dtype=str(x.dtype),
                                 name="x")
        self.held = list(layers)


def xla_flag(backend=None):
    """The `kmp pretrain` XLA flag tests train with on `backend` (default: this suite's): on
    under JAX (op by op, JAX is slow), off elsewhere (torch.compile takes minutes on 2 cores)."""
    return "--jit" if (backend or keras.backend.backend()) == "jax" else "--no-jit"


def value_and_grads(fn, x, layers=()):
    """fn(x) -> scalar tensor. Returns (value, [d value / d x] + the gradients of each layer's
    trainable variables in `layers`), as numpy arrays."""
    holder = _Holder(x, layers)
    wanted = [holder.x] + [v for layer in layers for v in layer.trainable_variables]

    def forward(probes):
        return fn(keras.ops.convert_to_tensor(holder.x)), []

    value, _, _, grads = backends.forward_backward(holder, forward, 1.0)
    by_id = dict(zip(map(id, holder.trainable_variables), grads))
    return (keras.ops.convert_to_numpy(value),
            [keras.ops.convert_to_numpy(by_id[id(v)]) for v in wanted])


def h5_arrays(path) -> dict:
    """Every dataset of an HDF5 file (a checkpoint's weights), by its path in the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def snapshot(directory) -> dict:
    """Every file under `directory` by its relative path, as a SHA-256 of its bytes."""
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
