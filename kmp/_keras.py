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


# --- keras.optimizers.Optimizer internals (Keras 3.15.1) used by kmp.LossScaleOptimizer.
def optimizer_own_variables(optimizer) -> list:
    """The variables `optimizer` created itself (`Optimizer._variables`), without those of an
    inner optimizer; `optimizer.variables` lists both."""
    return optimizer._variables


def optimizer_built_for(optimizer) -> list:
    """The trainable variables `optimizer` was built for, in build order
    (`Optimizer._trainable_variables`)."""
    return optimizer._trainable_variables


def optimizer_variable_index(optimizer, variable) -> int:
    """The position of `variable` among those `optimizer` was built for
    (`Optimizer._get_variable_index`)."""
    return optimizer._get_variable_index(variable)


def overwrites_with_gradient(optimizer, variable) -> bool:
    """True when `optimizer` assigns the gradient to `variable` instead of applying it, as for
    float8 scale variables (`Optimizer._overwrite_variable_with_gradient`)."""
    return optimizer._overwrite_variable_with_gradient(variable)


def set_layer_call(layer, fn):
    """Makes this layer instance compute `fn(layer, *args, **kwargs)` in place of its class's
    `call` (the class's is `type(layer).call`)."""
    with tracking_unlocked(layer):
        layer.call = fn.__get__(layer, type(layer))


# --- keras.layers.MultiHeadAttention internals (Keras 3.15.1) used by the FP32 islands.
def mha_softmax(layer):
    """The softmax sublayer of a MultiHeadAttention (`_softmax`)."""
    return layer._softmax


def set_mha_softmax(layer, softmax):
    """Replaces a MultiHeadAttention's softmax sublayer with `softmax`."""
    replace_sublayer(layer, "_softmax", softmax)


def mha_attention_override(layer):
    """The function bound to this MultiHeadAttention instance in place of its class's
    `_compute_attention` (see `set_mha_attention`), or None."""
    return layer.__dict__.get("_compute_attention")


def set_mha_attention(layer, fn):
    """Makes this MultiHeadAttention instance compute attention with `fn(layer, query, key,
    value, attention_mask=None, training=None, return_attention_scores=False,
    use_causal_mask=False) -> (output, scores)`, Keras's `_compute_attention` signature."""
    with tracking_unlocked(layer):
        layer._compute_attention = fn.__get__(layer, type(layer))


def unset_mha_attention(layer):
    """Undoes `set_mha_attention`: the instance computes attention with its class's own
    `_compute_attention` again (Keras's fused kernel when dropout is 0)."""
    with tracking_unlocked(layer):
        layer.__dict__.pop("_compute_attention", None)


def mha_class_attention(layer, query, key, value, attention_mask=None, training=None):
    """Runs the attention of a MultiHeadAttention's class (Keras's own path, or a subclass's),
    bypassing any override `set_mha_attention` bound: (output, scores)."""
    return type(layer)._compute_attention(layer, query, key, value,
                                          attention_mask=attention_mask, training=training)


def mha_compute_attention(layer, query, key, value, attention_mask=None, training=None):
    """Runs a MultiHeadAttention's attention on already projected query, key and value
    (batch, seq, heads, dim): (output, scores), through its own or an overriding path."""
    return layer._compute_attention(query, key, value, attention_mask=attention_mask,
                                    training=training)


def mha_equations(layer) -> tuple[str, str]:
    """(scores equation, combine equation): a MultiHeadAttention's einsum equations for
    key x query -> scores and probabilities x value -> output."""
    return layer._dot_product_equation, layer._combine_equation


def mha_score_scale(layer) -> float:
    """The factor a MultiHeadAttention multiplies the query by: 1 / sqrt(key_dim)."""
    return float(layer._inverse_sqrt_key_dim)


def mha_dropout(layer) -> tuple[float, object]:
    """(rate, dropout layer) of a MultiHeadAttention's attention probabilities."""
    return layer._dropout, layer._dropout_layer


def mha_masked_softmax(layer, scores, mask):
    """A MultiHeadAttention's masked softmax of `scores`, in its softmax sublayer."""
    return layer._masked_softmax(scores, mask)


def mha_causal_mask(layer, query, value):
    """The (batch, query, value) boolean causal mask a MultiHeadAttention would build."""
    return layer._compute_causal_mask(query, value)


# --- TensorFlow internals (TF 2.21), imported only when called (on the TensorFlow backend).
def tf_strategy_supports_no_merge_call() -> bool:
    """True when the current tf.distribute strategy lets replicas update variables without a
    `merge_call` (`tf.__internal__.distribute.strategy_supports_no_merge_call`; Keras 3.15.1's
    own LossScaleOptimizer asks the same)."""
    import tensorflow as tf

    return tf.__internal__.distribute.strategy_supports_no_merge_call()


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


@contextlib.contextmanager
def _hook_quantized_calls(layers_map, statistics, record):
    """Within the block, each layer of `layers_map` passes its input, flattened to
    (tokens, statistics[name].rows), to `record(statistics[name], inputs)` before it runs.

    The hook goes on `quantized_call`, the method Keras 3.15.1's `Operation.__call__` runs once
    a layer has a quantization mode (Keras's own hooks go on `call`, which no longer runs).
    """
    patched = []

    def hooked(name, layer):
        forward = type(layer).quantized_call.__get__(layer)

        def quantized_call(*args, **kwargs):
            inputs = args[0] if args else kwargs["inputs"]
            record(statistics[name], keras.ops.reshape(inputs, (-1, statistics[name].rows)))
            return forward(*args, **kwargs)
        return quantized_call

    try:
        for name, layer in layers_map.items():
            with tracking_unlocked(layer):
                layer.quantized_call = hooked(name, layer)
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            with tracking_unlocked(layer):
                del layer.quantized_call


@contextlib.contextmanager
def gptq_awq_calibration(windows):
    """Makes Keras's GPTQ and AWQ calibrate on `windows`, with the activations they claim to.

    Three defects of Keras 3.15.1 (keras.src.quantizers.gptq, gptq_core and awq_core), all
    silent:

    - **Calibration never sees an activation.** `Model.quantize` first gives every Dense and
      EinsumDense its gptq/awq mode, and from then on `Operation.__call__` runs the layer's
      `quantized_call`; the calibration hooks patch `call`, which no longer runs. GPTQ's
      Hessians stay zero (it then quantizes with the identity: round to nearest) and AWQ's
      activation maxima stay zero (it then searches scales against ones: every scale 1), so
      both give the same round-to-nearest kernels (keras-team/keras#23512). Inside this
      context the hooks go on `quantized_call`.
    - **GPTQ's updates use the wrong inverse.** GPTQ quantizes one input feature at a time
      and moves its rounding error onto the features not yet quantized, through the inverse
      Hessian of those remaining features: the rows of the upper Cholesky factor of H^-1
      (Frantar et al. 2022, section 3, step 3). Keras passes H^-1 itself, right for the first
      feature only: measured on a seeded GPT-2-shaped model, its kernels then reconstruct
      their layers' outputs worse than plain round-to-nearest in 4 of 12 layers (up to 1.45x
      the error). Inside this context GPTQ gets the Cholesky factor (activation_order=False
      only: kmp's setting), and the column loop runs in NumPy (kmp._gptq: the same steps,
      milliseconds where Keras's eager ops took seconds per matrix).
    - **Calibration windows differ from run to run.** Keras's data loader concatenates the
      samples and cuts new windows at an offset from Python's `hash` of a string, which is
      salted per process. Inside this context it returns `windows` as they are.

    Args:
        windows: int array (samples, seq_len). The token ids to calibrate on.
    """
    import numpy as np
    from keras.src.quantizers import awq_core, gptq, gptq_core  # Keras 3.15.1: not public

    from kmp import _gptq

    windows = np.asarray(windows, dtype="int32")

    def with_cholesky_factor(weights_transpose, inv_hessian, *, activation_order=False,
                             order_metric=None, **kwargs):
        if activation_order:
            raise NotImplementedError("kmp's GPTQ calibration supports activation_order=False "
                                      "only (the features must be permuted before the "
                                      "Cholesky factor is taken).")
        inverse = keras.ops.convert_to_numpy(inv_hessian).astype("float64")
        upper = np.linalg.cholesky((inverse + inverse.T) / 2).T
        return _gptq.quantize_matrix(weights_transpose, upper.astype("float32"), **kwargs)

    def fixed_windows(tokenizer, sequence_length, dataset, num_samples=128, **kwargs):
        if windows.shape[1] != sequence_length or len(windows) < num_samples:
            raise ValueError(f"Calibration asks for {num_samples} windows of {sequence_length} "
                             f"tokens; this context holds {windows.shape}.")
        return windows[:num_samples, None, :]

    patches = {
        (gptq, "gptq_quantize_matrix"): with_cholesky_factor,
        (gptq_core, "get_dataloader"): fixed_windows,
        (awq_core, "get_dataloader"): fixed_windows,
        (gptq_core, "stream_hessians"): lambda layers, objects: _hook_quantized_calls(
            layers, objects, lambda state, x: state.update_hessian_with_batch(x)),
        (awq_core, "stream_activations"): lambda layers, objects: _hook_quantized_calls(
            layers, objects, lambda state, x: state.update_activation_magnitudes(x)),
    }
    originals = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)


def replace_loss_tracker(model, tracker) -> None:
    """Makes `tracker` (a keras.metrics.Mean) the compiled `model`'s loss tracker, the metric
    fit logs as `loss`. Keras 3.15.1 keeps it in `Trainer._loss_tracker`, set by `compile` and
    updated by each backend's train and test step with the step's unscaled loss."""
    with tracking_unlocked(model):
        model._loss_tracker = tracker


def remat_mode(layer):
    """The `keras.RematScope` mode `layer` was created under, or None (Keras 3.15.1 keeps it
    in `Layer._remat_mode`)."""
    return getattr(layer, "_remat_mode", None)


def remat_tensors_only(layer):
    """Makes `layer`'s rematerialized call checkpoint a function of its floating-point tensor
    arguments only, the others (`training=True`, `use_causal_mask=True`, None, the integer
    padding mask, which has no gradient) bound in a closure.

    Keras 3.15.1 hands the layer's whole call, keyword arguments included, to the backend's
    remat: TensorFlow's `tf.recompute_grad` refuses keyword arguments in graph mode
    ("custom_gradient ... keywords arguments only when eager execution is enabled",
    keras-team/keras#21207) and `jax.checkpoint` traces a Python bool into an array, which an
    `if training:` cannot branch on; `tf.recompute_grad` also warns for every integer
    tensor it is given to watch. Keras still decides which layers rematerialize
    (`Layer.rematerialized_call`, undocumented in 3.15.1) and does it (`keras.remat`).
    """
    from keras import ops

    keras_call = layer.rematerialized_call

    def rematerialized_call(layer_call, *args, **kwargs):
        if keras_call(layer_call, *args, **kwargs) is layer_call:  # not this layer
            return layer_call

        def call(*args, **kwargs):
            structure = (args, kwargs)
            leaves = keras.tree.flatten(structure)
            where = [i for i, leaf in enumerate(leaves) if ops.is_tensor(leaf)
                     and keras.backend.is_float_dtype(leaf.dtype)]

            def on_tensors(*tensors):
                filled = list(leaves)
                for i, tensor in zip(where, tensors):
                    filled[i] = tensor
                args, kwargs = keras.tree.pack_sequence_as(structure, filled)
                return layer_call(*args, **kwargs)

            return keras.remat(on_tensors)(*(leaves[i] for i in where))

        return call

    layer.rematerialized_call = rematerialized_call


def set_variable_layout(variable, layout) -> None:
    """Gives a variable that has no value yet (`StatelessScope(initialize_variables=False)`) the
    layout a distribution would, so that the optimizer's slots made from it take the same
    (`Optimizer.add_variable_from_reference` copies `_layout`, Keras 3.15.1)."""
    variable._layout = layout


def replace_variable_value(variable, value) -> None:
    """Puts `value` (a JAX array laid out as wanted) in `variable` as it is: `assign` would lay
    it out again by the variable's own layout (a JAX variable holds its array in `_value`,
    Keras 3.15.1)."""
    variable._value = value


def quantize(model, mode: str, config=None, filters=None) -> None:
    """`model.quantize(mode, config=config, filters=filters)` with one garbage collection in
    all, and without Keras's warning for each layer it has nothing to quantize in.

    Keras 3.15.1's `Layer.__delattr__` runs `gc.collect()` each time it deletes a variable (a
    float kernel replaced by its quantized one): a full collection of every object the process
    holds, about 0.1-0.4 s each with TensorFlow or JAX imported, so a tiny Gemma's int4
    `quantize` took 4-6 s on CPU, nearly all of it in `gc.collect`. With the objects that
    existed before frozen (`gc.freeze`), each of those collections scans only the new ones; the
    deleted kernels are freed by reference count either way (checked on TensorFlow, JAX and
    torch), and one full collection after the thaw frees any cycle. A process that froze
    objects itself (a pre-fork server) is left as it is.

    Example:
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> quantize(model, "int8")
    >>> model.layers[0].quantization_mode
    'int8'
    """
    import gc
    import warnings

    frozen = not gc.get_freeze_count()
    if frozen:
        gc.freeze()
    try:
        with warnings.catch_warnings():
            # Keras 3.15.1 names every layer it has nothing to quantize in.
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            warnings.filterwarnings("ignore", message="Invalid quantization mode")
            model.quantize(mode, config=config, filters=filters)
    finally:
        if frozen:
            gc.unfreeze()
            gc.collect()
