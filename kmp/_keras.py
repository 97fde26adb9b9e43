"""The private Keras internals kmp relies on, each wrapped once, and the layer walks built on
them. Checked against Keras 3.15.1; a Keras upgrade that breaks kmp should break here.
"""

from __future__ import annotations

import contextlib

import keras
from keras.src.utils import tracking  # Keras 3.15.1: no public equivalent

# Optimizer.build must create its variables without tracking them as attributes twice.
no_automatic_dependency_tracking = tracking.no_automatic_dependency_tracking


def flatten_layers(layer, include_self: bool = False, recursive: bool = True) -> list:
    """Every nested layer of `layer`, depth first (Keras 3.15.1 `Layer._flatten_layers`)."""
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def own_variables(layer) -> list:
    """The variables a layer created itself, without its sublayers' (Keras 3.15.1)."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


@contextlib.contextmanager
def tracking_unlocked(layer):
    """Lets a built layer take a new sublayer or attribute (Keras locks built layers' tracking;
    `Layer._tracker` in Keras 3.15.1)."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield layer
    finally:
        if locked:
            layer._tracker.lock()


def replace_sublayer(parent, attribute: str, new):
    """Sets `parent.<attribute>` to the layer `new` and stops tracking the layer it replaces."""
    old = getattr(parent, attribute, None)
    with tracking_unlocked(parent):
        setattr(parent, attribute, new)
    if old is not None and old in parent._layers:  # Keras 3.15.1: the tracked sublayer list
        parent._layers.remove(old)


def walk(model, prefix="", seen=None):
    """(path, layer) once for every nested layer, depth first; a layer without a `path` (keras
    sublayers created outside a build) gets its parent's path plus its name."""
    seen = set() if seen is None else seen
    for child in flatten_layers(model, recursive=False):
        if id(child) in seen:
            continue
        seen.add(id(child))
        path = child.path or f"{prefix}/{child.name}".lstrip("/")
        yield path, child
        yield from walk(child, path, seen)


def layer_paths(model) -> dict:
    """id(layer) -> path for every nested layer of `model` (see `walk`)."""
    return {id(layer): path for path, layer in walk(model)}


@contextlib.contextmanager
def recorded_outputs(model, probes=None):
    """Within the block, every float output of every (nested) layer of `model` is appended to
    the yielded list as (layer, tensor), in the order the calls finish; the layers' own `call`
    is put back afterwards.

    With `probes` (a list of tensors shaped like the outputs of an earlier recorded pass), the
    i-th recorded output has probes[i] added to it before it is returned, so a gradient with
    respect to the probes is the gradient with respect to the outputs (for functional autodiff,
    as on JAX).
    """
    outputs = []

    def recording(layer, call):
        def call_and_record(*args, **kwargs):
            out = call(*args, **kwargs)
            flat = keras.tree.flatten(out)
            for i, t in enumerate(flat):
                if keras.ops.is_tensor(t) and keras.backend.is_float_dtype(t.dtype):
                    if probes is not None:
                        flat[i] = t = t + probes[len(outputs)]
                    outputs.append((layer, t))
            return keras.tree.pack_sequence_as(out, flat) if probes is not None else out
        return call_and_record

    originals = []
    try:
        for layer in flatten_layers(model):
            originals.append((layer, layer.__dict__.get("call")))
            with tracking_unlocked(layer):
                layer.call = recording(layer, layer.call)
        yield outputs
    finally:
        for layer, call in originals:
            with tracking_unlocked(layer):
                if call is None:
                    del layer.call
                else:
                    layer.call = call


@contextlib.contextmanager
def gptq_awq_saveable(model):
    """Makes a GPTQ/AWQ-quantized model's `.keras` file reloadable.

    Keras 3.15.1's Dense/EinsumDense `save_own_variables` writes `kernel_zero` only when
    `_get_kernel_with_merged_lora()` returns one, and that returns None for gptq/awq: the file
    lacks the zero points and `load_model` fails ("expected 5 variables, but received 4").
    Inside this context each such layer returns its own `kernel_zero`.
    """
    patched = []
    for layer in flatten_layers(model):
        if (getattr(layer, "quantization_mode", None) in ("gptq", "awq")
                and hasattr(layer, "_get_kernel_with_merged_lora")
                and hasattr(layer, "kernel_zero")):
            layer.__dict__["_get_kernel_with_merged_lora"] = (
                lambda layer=layer: (layer.kernel, None, layer.kernel_zero))
            patched.append(layer)
    try:
        yield model
    finally:
        for layer in patched:
            del layer.__dict__["_get_kernel_with_merged_lora"]


def restore_int4_reverse_inputs(model):
    """Undoes a reload difference of int4 ReversibleEmbeddings (tied GPT vocabulary projections).

    `quantize("int4")` leaves the reverse projection's inputs in float (Keras's default
    Int4QuantizationConfig quantizes weights only), but a reloaded layer has no quantization
    config and Keras 3.15.1's `ReversibleEmbedding._int4_build` then falls back to an int8
    AbsMaxQuantizer for those inputs: the reloaded model's logits differ. Only Keras's default
    int4 config is assumed (what kmp uses).
    """
    for layer in flatten_layers(model):
        if (isinstance(layer, keras.layers.ReversibleEmbedding)
                and getattr(layer, "quantization_mode", None) == "int4"
                and layer.quantization_config is None):
            layer.inputs_quantizer = None

