"""The GPT model and optimizer of the recipe: keras-hub GPT-2 with FP32 islands, AdamW."""

from __future__ import annotations

import contextlib
import threading
import warnings

import keras
import keras_hub
from keras import ops

from kmp import backends
from kmp._keras import (
    flatten_layers,
    quantize,
    remat_mode,
    remat_tensors_only,
    replace_sublayer,
    restore_int4_reverse_inputs,
    set_layer_call,
)
from kmp.errors import UserError
from kmp.gpt.config import GPTConfig
from kmp.gpt.memory import param_count
from kmp.hardware import detect
from kmp.layers import harden
from kmp.layers.harden import set_float32_residual
from kmp.policy import global_policy
from kmp.recovery import ScaledSchedule


@keras.saving.register_keras_serializable(package="kmp")
class GPTBackbone(keras_hub.models.GPT2Backbone):
    """keras-hub's GPT-2 backbone with kmp's precision options, which its config saves.

    keras-hub's `GPT2Backbone.get_config` keeps only the backbone's own dtype policy, so a
    vocabulary projection moved to the compute dtype or a float32 residual stream would come
    back from a `.keras` file as keras-hub's defaults: another computation than the one
    trained. This subclass records both and applies them when it is rebuilt; likewise a
    quantized model's float policy (mixed_bfloat16, say), which keras-hub leaves to the global
    policy at load time. On TensorFlow its feed-forward GELU and its layer norms are
    `kmp.backends.kernel("gelu_tanh")` and `kernel("layer_norm")`: the same functions with
    hand-written gradients, fewer passes over the activations (docs/benchmarks.md).

    Args:
        *args: `keras_hub.models.GPT2Backbone`'s arguments.
        logits_dtype: str or None. The dtype the tied vocabulary projection (the logits)
            multiplies in; None keeps keras-hub's (the variable dtype, float32). Defaults to None.
        float32_residual: bool. A float32 residual stream (see `kmp.harden`). Defaults to False.
        **kwargs: `keras_hub.models.GPT2Backbone`'s keyword arguments.
    """

    def __init__(self, *args, logits_dtype=None, float32_residual=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits_dtype = logits_dtype
        self.token_embedding.reverse_dtype = logits_dtype
        self.float32_residual = bool(float32_residual)
        if self.float32_residual:
            set_float32_residual(self)
        gelu = backends.kernel("gelu_tanh")  # the same functions in fewer passes (TensorFlow)
        norm = backends.kernel("layer_norm")
        for layer in flatten_layers(self):
            if (isinstance(layer, keras.layers.Dense)
                    and getattr(layer.activation, "__name__", "") == "gelu_approximate"):
                layer.activation = gelu or layer.activation
            elif (norm and type(layer) is keras.layers.LayerNormalization and layer.center
                  and layer.scale and not layer.rms_scaling):
                set_layer_call(layer, _layer_norm_call)

    def get_config(self):
        config = {**super().get_config(), "logits_dtype": self.logits_dtype,
                  "float32_residual": self.float32_residual}
        saved = config.get("dtype")
        if isinstance(saved, dict) and saved.get("class_name") == "DTypePolicyMap":  # quantized
            # keras-hub saves a quantized backbone's policies as a map whose default, and the
            # float policy of each quantized layer, are left to the global policy at load
            # time: a mixed_bfloat16 model reloaded under float32 computes in float32. Keep
            # the policy it computed under, which `from_config` loads it in.
            policy = self.dtype_policy
            config["float_policy"] = getattr(policy, "default_policy", policy).name
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        policy = config.pop("float_policy", None)
        if policy is None:
            return super().from_config(config)
        with global_policy(policy):
            return super().from_config(config)


def _layer_norm_call(layer, inputs):
    """A keras LayerNormalization's call through `kmp.backends.kernel("layer_norm")` where it
    normalizes the last axis, its class's call otherwise."""
    if layer.axis not in ([-1], [len(inputs.shape) - 1]):
        return type(layer).call(layer, inputs)
    out = backends.kernel("layer_norm")(inputs, layer.gamma, layer.beta, layer.epsilon)
    return ops.cast(out, layer.compute_dtype)


@keras.saving.register_keras_serializable(package="kmp")
class GPTCausalLM(keras_hub.models.GPT2CausalLM):
    """keras-hub's GPT-2 language model; without a preprocessor, `fit`, `evaluate` and
    `predict` take any Keras input (a `keras.utils.PyDataset`, arrays) on every backend.

    keras-hub 0.32's task converts every input to a tf.data or Grain dataset first, which a
    model fed token ids does not need and which needs TensorFlow or Grain installed. With a
    preprocessor attached (a loaded model, for `generate`), keras-hub's path is kept.
    """

    def fit(self, *args, **kwargs):
        if self.preprocessor is None:
            return keras.Model.fit(self, *args, **kwargs)
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        if self.preprocessor is None:
            return keras.Model.evaluate(self, *args, **kwargs)
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        if self.preprocessor is None:
            return keras.Model.predict(self, *args, **kwargs)
        return super().predict(*args, **kwargs)


def build_model(config: GPTConfig, float32_residual: bool = False):
    """A keras-hub GPT2CausalLM of `config`'s shape, under the current global dtype policy.

    The model is not compiled: `kmp.compile` puts the FP32 islands in (float32 attention
    scores and softmax in every attention layer; keras-hub keeps the layer norms in float32)
    and wraps the optimizer for loss scaling when the policy is mixed_float16. Under a mixed
    policy keras-hub multiplies the tied vocabulary projection in float32 (its embedding is not
    autocast); with `config.logits == "compute"` it runs in the compute dtype instead, as
    Megatron-LM does, and the loss upcasts the logits to float32 before the softmax. Both
    choices are saved with the model (`GPTBackbone`). `config.remat` builds the backbone
    inside a `keras.RematScope` (each transformer block, or every layer, recomputed for the
    backward pass); that is not saved: a loaded model rematerializes nothing.

    Args:
        config: GPTConfig. The model's shape; `seq_len` is its maximum sequence length, and
            `remat` what to rematerialize.
        float32_residual: bool. A float32 residual stream. Defaults to False.

    Returns:
        A `GPTCausalLM` (keras-hub's GPT2CausalLM) without a preprocessor.

    Raises:
        UserError: for `remat` with dropout (see `_check_remat`).
    """
    _check_remat(config)
    compute = keras.config.dtype_policy().compute_dtype
    with _remat_scope(config):
        backbone = GPTBackbone(
            vocabulary_size=config.vocab_size, num_layers=config.num_layers,
            num_heads=config.num_heads, hidden_dim=config.hidden_dim,
            intermediate_dim=config.intermediate_dim, dropout=config.dropout,
            max_sequence_length=config.seq_len,
            logits_dtype=compute if config.logits == "compute" and compute != "float32" else None,
            float32_residual=float32_residual,
        )
    for layer in flatten_layers(backbone, include_self=True):
        if remat_mode(layer) is not None:
            remat_tensors_only(layer)
    return GPTCausalLM(backbone=backbone, preprocessor=None, compile=False)


def _check_remat(config: GPTConfig) -> None:
    """Refuses rematerialized dropout, which Keras 3.15.1 gets wrong (measured on a micro GPT):
    the recomputation draws its own masks, so the gradients belong to other masks than the
    forward pass's (TensorFlow: per-step losses 2e-4 to 7e-4 off those without remat; torch:
    off from the first step) or the dropout seed's update escapes `jax.checkpoint` (JAX:
    UnexpectedTracerError)."""
    if config.remat != "none" and config.dropout > 0:
        raise UserError(
            f"remat={config.remat!r} with dropout={config.dropout} is not supported (the "
            "recomputed pass would not see the same dropout masks). Use dropout=0 or "
            "remat='none'.", field="remat")


def _remat_scope(config: GPTConfig):
    """The `keras.RematScope` of `config.remat` (a no-op for "none"); layers take its mode when
    they are created. "blocks" names keras-hub's transformer blocks (`transformer_layer_{i}`
    in `GPT2Backbone`)."""
    if config.remat == "none":
        return contextlib.nullcontext()
    if config.remat == "blocks":
        names = [f"transformer_layer_{i}" for i in range(config.num_layers)]
        return keras.RematScope(mode="list_of_layers", layer_names=names)
    return keras.RematScope(mode="full")


def use_float8(model):
    """Makes every Dense/EinsumDense of a built `model` train in float8: Keras's delayed
    scaling (`model.quantize("float8")`: e4m3 forward, e5m2 gradients, scales from an amax
    history), simulated where the hardware has no float8 matmuls. Call before compiling.
    Returns the model.

    Raises:
        UserError: for a model built with `remat`: the recomputed pass updates the float8
            scales' amax histories again (per-step losses measured 5e-5 to 5e-3 off those
            without remat on JAX and TensorFlow).
    """
    if any(remat_mode(layer) is not None for layer in flatten_layers(model)):
        raise UserError("float8 training of a model built with remat is not supported (the "
                        "recomputed pass would update the float8 scales twice). Use "
                        "remat='none' or no float8.", field="remat")
    quantize(model, "float8")
    return model


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the parameters without position embeddings (their lookup costs no matmul; the tied
    token embedding does, as the vocabulary projection).
    """
    n = param_count(config, position_embeddings=False)
    return 6 * n + 12 * config.num_layers * config.hidden_dim * config.seq_len


@keras.saving.register_keras_serializable("kmp")
class NextTokenCrossentropy(keras.losses.Loss):
    """Softmax cross-entropy of integer targets against logits, taken in float32.

    The same value and gradient as `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`
    (the logits are upcast to float32 first, as Keras's loss does), computed as
    logsumexp(logits) - logits[target], with the gradient softmax(logits) - onehot(target)
    written out. On a CPU this is faster than TensorFlow's fused
    SparseSoftmaxCrossEntropyWithLogits kernel: whole training steps measured 1.04x to 1.11x
    as fast on a 2-core Xeon (tiny and small presets, bfloat16 and float32; docs/benchmarks.md).
    `lm_loss` picks it where it wins. On TensorFlow, for (batch, length) targets, it is
    `kmp.backends.kernel("next_token_crossentropy")`: TensorFlow's log-softmax kernel, its
    output kept for the gradient.

    Args:
        reduction: str. Keras loss reduction. Defaults to "sum_over_batch_size".
        name: str. Defaults to "next_token_crossentropy".

    Example:
    >>> loss = NextTokenCrossentropy()
    >>> round(float(loss(keras.ops.array([[2]]), keras.ops.zeros((1, 1, 4)))), 4)  # ln 4
    1.3863
    """

    from_logits = True  # for kmp.diagnostics.audit, which looks for probability inputs

    def __init__(self, reduction="sum_over_batch_size", name="next_token_crossentropy",
                 **kwargs):
        super().__init__(reduction=reduction, name=name, **kwargs)

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true, "int32")
        logits = ops.cast(y_pred, "float32")
        own = backends.kernel("next_token_crossentropy")
        if own is not None and len(labels.shape) == 2:  # (batch, length) targets
            return own(labels, logits)
        vocab = ops.shape(logits)[-1]

        @ops.custom_gradient
        def crossentropy(logits):
            top = ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
            lse = ops.log(ops.sum(ops.exp(logits - top), axis=-1)) + top[..., 0]
            target = ops.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]

            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                onehot = ops.one_hot(labels, vocab, dtype="float32")
                return upstream[..., None] * (ops.softmax(logits, axis=-1) - onehot)

            return lse - target, grad

        return crossentropy(logits)


def lm_loss() -> keras.losses.Loss:
    """The recipe's next-token loss for this machine, on float32 logits.

    `NextTokenCrossentropy` where no GPU is visible (it is faster than TensorFlow's fused CPU
    kernel); on a GPU, `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`, whose
    fused kernel reads the logits once per pass (XLA fuses either). The machine is
    `kmp.hardware.detect()`'s.
    """
    if detect().kind == "gpu":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return NextTokenCrossentropy()


def _no_decay_variables(model) -> list:
    """Norm scales, biases (rank < 2, or named "bias": attention's query, key and value biases
    are (heads, head_dim)) and embedding tables."""
    chosen = {id(v): v for v in model.trainable_variables if len(v.shape) < 2 or v.name == "bias"}
    for layer in flatten_layers(model):
        if "Embedding" in type(layer).__name__:
            chosen.update({id(v): v for v in layer.trainable_variables})
    return list(chosen.values())


_STEP_LR = threading.local()  # per thread: tf.distribute traces each replica in its own


@keras.saving.register_keras_serializable(package="kmp")
class AdamW(keras.optimizers.AdamW):
    """Keras's AdamW, with the learning-rate schedule evaluated once per step.

    Keras 3.15's weight decay reads `learning_rate` once per decayed variable, so a schedule
    runs 1 + (decayed variables) times a step: 13 times for a 2-layer GPT, 73 for GPT-2 124M,
    each a conditional (`If`) op on TensorFlow, or a few eager ops on torch. Here it runs once,
    before the update, and every read in the update gets that value: the same value, since
    the counter the schedule reads moves only after the update. Same arguments, variables
    and checkpoints as `keras.optimizers.AdamW`. On torch `make_optimizer` keeps Keras's own:
    Keras replaces that class (not a subclass) by a multi-tensor version that reads the
    schedule once already.
    """

    def _backend_apply_gradients(self, grads, trainable_variables):
        lrs = _STEP_LR.__dict__.setdefault("lrs", {})
        lrs[id(self)] = super()._get_current_learning_rate()
        try:
            return super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            lrs.pop(id(self), None)

    def _get_current_learning_rate(self):
        lr = getattr(_STEP_LR, "lrs", {}).get(id(self))
        return super()._get_current_learning_rate() if lr is None else lr


def make_optimizer(config: GPTConfig, model, lr_windows=()) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up then cosine decay to 10%, global-norm clipping and accumulation.

    Weight decay skips norms, biases and embeddings. `model` must be built. `lr_windows`,
    (start, stop, factor) ranges of the schedule's counter, scale the learning rate there (a
    recovery's halving, `kmp.recovery.ScaledSchedule`). Keras calls the schedule with its
    micro-batch counter (`optimizer._iterations`, `grad_accum` per step), so the schedule's
    lengths are in micro-batches.
    """
    accum = config.grad_accum
    decay_steps = max(1, config.steps - config.warmup_steps) * accum
    if config.warmup_steps:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, alpha=0.1, warmup_target=config.learning_rate,
            warmup_steps=config.warmup_steps * accum)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps,
                                                          alpha=0.1)
    if lr_windows:
        schedule = ScaledSchedule(schedule, lr_windows)
    cls = keras.optimizers.AdamW if backends.name() == "torch" else AdamW  # see AdamW
    optimizer = cls(
        learning_rate=schedule, weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.95,
        epsilon=1e-8, global_clipnorm=config.grad_clip or None,
        gradient_accumulation_steps=config.grad_accum if config.grad_accum > 1 else None)
    optimizer.exclude_from_weight_decay(var_list=_no_decay_variables(model))
    return optimizer


def load_model(path, preprocessor: bool = True):
    """Loads a recipe's `model.keras` (safe mode), FP32 islands put back in; also the quantized
    models `kmp quantize` writes.

    Keras's loader warns that the GPT task's custom compile was not restored and that the
    training optimizer's variables were skipped; both are expected for inference and are
    silenced here. Generate with `model.generate("def", max_length=64)`.

    Args:
        path: str or Path. A `model.keras` written by `kmp pretrain`.
        preprocessor: bool. Keep the preprocessor (tokenizer) the file holds, so `generate`
            takes text; False detaches it, so `fit`/`evaluate`/`predict` take token windows.
            Defaults to True.

    Returns:
        A `GPTCausalLM`, with the file's preprocessor attached when `preprocessor`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compile.*custom", category=UserWarning)
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model = keras.saving.load_model(path, safe_mode=True)
    restore_int4_reverse_inputs(model)  # a Keras reload difference (kmp quantize's int4)
    harden(model)
    if not preprocessor:
        replace_sublayer(model, "preprocessor", None)
    return model
