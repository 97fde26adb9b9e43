"""The few things that differ per Keras backend, in one place.

The rest of kmp is written against keras.ops. What is not the same on TensorFlow, JAX and
torch (the device probe, version strings, the loss-scaled optimizer's step across replicas,
compiling a pure function, reading fit's state mid-epoch, gradients of intermediate outputs,
device memory, the fault-injection switch, the multi-device strategy) is one function here,
which calls the module of the active backend (`_tensorflow`, `_jax`, `_torch`), imported on
first use. So TensorFlow is imported only when it is the backend.
"""

from __future__ import annotations

import importlib

import keras

from kmp.errors import UserError

SUPPORTED = ("tensorflow", "jax", "torch")


def name() -> str:
    """The active Keras backend's name."""
    return keras.backend.backend()


def current():
    """The module implementing the seam for the active backend.

    Raises:
        UserError: on a Keras backend kmp does not support (numpy, openvino).
    """
    backend = name()
    if backend not in SUPPORTED:
        raise UserError(f"kmp runs on the Keras backends {', '.join(SUPPORTED)}; this Keras "
                        f"runs on {backend!r}. Set KERAS_BACKEND to one of them.")
    return importlib.import_module(f"kmp.backends._{backend}")


def require(feature: str, *backends: str):
    """Raises a one-line UserError when `feature` does not run on the active backend."""
    if name() not in backends:
        raise UserError(f"{feature} runs on the {' or '.join(backends)} backend, not on "
                        f"{name()}. Run with KERAS_BACKEND={backends[0]} (kmp --backend "
                        f"{backends[0]}).")


def accelerator() -> dict | None:
    """The accelerator the backend would train on, as {kind, name, compute_capability, count},
    or None on a CPU-only machine."""
    return current().accelerator()


def versions() -> dict:
    """Keras's version and the backend's, e.g. {"keras": "3.15.1", "jax": "0.10.2"}."""
    return {"keras": keras.__version__, name(): current().version()}


def jit_compile_for(choice: bool) -> tuple[bool, str | None]:
    """The `jit_compile` to use on the active backend when the hardware alone would pick
    `choice`, and a sentence saying why when they differ (None otherwise): TensorFlow takes
    the choice; JAX keeps XLA on (without it Keras's JAX trainer runs op by op); torch stays
    eager, Keras's default there (jit_compile=True means torch.compile)."""
    return current().jit_compile_for(choice)


def float32_matmuls_use_tf32() -> bool:
    """True when the backend runs float32 matmuls on TF32 Tensor Cores (on GPUs that have
    them, Ampere on): TensorFlow unless `tf.config.experimental.enable_tensor_float_32_execution
    (False)`; JAX unless `jax_default_matmul_precision` asks for full float32 ("highest",
    "float32"); torch only when asked (`torch.set_float32_matmul_precision("high")`,
    `torch.backends.cuda.matmul.allow_tf32 = True` or `fp32_precision = "tf32"`)."""
    return current().float32_matmuls_use_tf32()


def in_compiled_function(value) -> bool:
    """True while tracing a compiled train step (where a host read would cost a sync);
    `value` is a tensor of the step (on JAX, only a traced value tells)."""
    return current().in_compiled_function(value)


def kernel(name: str):
    """The active backend's own implementation of an element-wise computation kmp would
    otherwise compose from keras.ops, or None where Keras's is as good. TensorFlow (XLA off
    runs a graph op by op) has "gelu_tanh" (GPT-2's activation), "next_token_crossentropy"
    (`labels`, float32 `logits` of shape (batch, length, vocabulary) -> per-token losses),
    "layer_norm" (`x, gamma, beta, epsilon`, over the last axis, in float32) and
    "attention_island" (`query, key, value, mask, scale` -> the float32 attention island of
    `kmp.layers.attention.float32_attention`), each with a hand-written gradient taking fewer
    passes over the tensor; on JAX, XLA fuses the composed forms, and torch has one kernel for
    each.

    Example:
    >>> kernel("no such kernel") is None
    True
    """
    return getattr(current(), name, None)


def jit(fn):
    """`fn` compiled for the backend where a pure function can be (jax.jit on JAX); `fn`
    itself elsewhere."""
    return current().jit(fn)


def sync_state(model):
    """Writes the state a running `fit` holds outside the model's variables back into them.

    On JAX, `fit` keeps the weights and optimizer state in arrays between steps; a callback
    that reads a variable mid-epoch must sync first. A no-op on TensorFlow and torch.
    """
    current().sync_state(model)


def forward_backward(model, forward, loss_scale: float):
    """Runs `forward(probes)` -> (loss, [(layer, output)]) and differentiates loss x scale.

    Returns (loss, outputs, output gradients, variable gradients); a gradient is None where the
    loss does not depend on that tensor. `forward` records the layer outputs (see
    `kmp._keras.recorded_outputs`); on JAX it is called with zero probes to add to them.
    """
    return current().forward_backward(model, forward, loss_scale)


def gpu_memory(reset: bool = False) -> dict | None:
    """{"current": bytes, "peak": bytes} on the first GPU, or None without one. `reset`
    restarts the peak from now where the backend can (TensorFlow, torch; not JAX, whose
    peak counts from the start of the process: see "resettable")."""
    return current().gpu_memory(reset)


class HostSwitch:
    """A boolean that Python sets between steps; each backend's `Switch.read()` returns it as
    a tensor inside a step."""

    def __init__(self, initial: bool = False):
        self.value = bool(initial)

    def set(self, value: bool):
        self.value = bool(value)


def switch(initial: bool = False):
    """A boolean switch that Python sets between steps and a compiled step reads at run time
    (for fault injection): an object with `.set(bool)` and `.read()` (a tensor, in a step)."""
    return current().Switch(initial)


def apply_scaled(optimizer, flags, grads, tvs):
    """One stateful step of a kmp.LossScaleOptimizer, given its non-finite flags: the
    cross-replica decision under tf.distribute (skip when any replica overflowed), the
    compiled pure step on JAX, the plain step on torch."""
    current().apply_scaled(optimizer, flags, grads, tvs)


def replica_id():
    """The replica id under a TensorFlow distribution strategy (0 elsewhere, and outside one)."""
    return current().replica_id()


def distribution(kind: str, devices=None):
    """A context manager that places the model and the training steps on `kind`'s devices:
    "default" (one device) or "mirrored" (data-parallel over the local devices: TensorFlow's
    MirroredStrategy, or keras.distribution.DataParallel on JAX). Yields the replica count."""
    return current().distribution(kind, devices)
