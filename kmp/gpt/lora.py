"""A keras-hub CausalLM made ready to fine-tune: loaded from a preset, its base quantized,
LoRA put in, and saved back as a preset.

What Keras 3.15.1 does, read in `keras/src/layers/core/dense.py` and `einsum_dense.py`, and
what kmp does about it:

- `enable_lora` creates the adapters `lora_kernel_a` (he_uniform) and `lora_kernel_b`
  (zeros) with `dtype="float32"`: float32 masters under any policy; the forward pass casts
  to the compute dtype. keras-hub's `Backbone.enable_lora(rank, target_layer_names)`
  freezes every layer, then re-enables the targets, whose kernel `enable_lora` freezes.
- Their **biases stay trainable** (only `_kernel.trainable` is cleared). kmp freezes them:
  a LoRA run trains the adapters alone, so the frozen base is bit-for-bit the preset's and
  `adapters.lora.h5` (which holds only the adapters) is the whole fine-tune; with
  `train_embeddings` the token embedding also trains, in full, and
  `kmp.gpt.adapters.save_trained` writes it beside the adapters.
- On a GPTQ layer `enable_lora` raises NotImplementedError; on a float8 layer it succeeds
  but the first call raises NotImplementedError (`_float8_call`); an AWQ layer's
  `_awq_call` multiplies by the dequantized kernel and never reads the adapters, so LoRA
  would train nothing. kmp refuses all three with one line (`check_lora_base`).
- On int8 and int4 layers LoRA is added to the quantized matmul's output (QLoRA-style:
  the base stays quantized; gradients reach the adapters through the dequantized kernel).
- Saving a LoRA layer merges the adapters into its kernel; an int8/int4 kernel is
  dequantized, merged and re-quantized with new scales (`_get_kernel_with_merged_lora`),
  which adds quantization error: the merged int8/int4 preset is not the model that was
  measured, and kmp reports both losses and keeps base + adapters as the exact form.

Keras has no NF4, no double quantization and no 8-bit optimizer state. kmp offers Keras's
int4 (symmetric, per-group scales, `--base int4`) and int8 (per-channel) bases, float32
LoRA masters, and Adam moments only for the adapters (a few percent of the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from kmp._keras import flatten_layers, quantize
from kmp.errors import UserError
from kmp.policy import global_policy

BASES = ("float", "int8", "int4")
INT4_BLOCK = 128  # Keras's default int4 group size, capped at the model width


def load_causal_lm(preset, dtype=None):
    """Loads a keras-hub `CausalLM` with its preprocessor from a preset directory or name.

    Args:
        preset: str or Path. A local preset directory (what `save_to_preset` writes), or a
            keras-hub preset name or handle, which needs a download (or a local copy in the
            Kaggle/Hugging Face cache).
        dtype: str or None. The dtype policy to build under (a quantized preset keeps its
            layers' quantization and computes in `dtype`). Defaults to the global one.

    Returns:
        A `keras_hub.models.CausalLM`.

    Raises:
        UserError: for a directory that is not a CausalLM preset, or a name that cannot be
            loaded here.

    Example:
    >>> import tempfile
    >>> try:
    ...     load_causal_lm(tempfile.mkdtemp())
    ... except UserError as e:
    ...     print("without config.json" in str(e))
    True
    """
    import keras_hub

    dtype = dtype or keras.config.dtype_policy().name
    path = Path(str(preset)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--preset {preset} is a directory without config.json, not a "
                            "keras-hub preset. Pass a directory that save_to_preset wrote.",
                            field="preset")
        try:
            # A quantized preset saves a DTypePolicyMap (each layer's quantization, the float
            # policy left to the global one at load time): a `dtype` argument would replace
            # it, so `dtype` is the global policy while it loads.
            saved = json.loads((path / "config.json").read_text())["config"].get("dtype")
            if isinstance(saved, dict) and saved.get("class_name") == "DTypePolicyMap":
                with global_policy(dtype):
                    return keras_hub.models.CausalLM.from_preset(str(path))
            return keras_hub.models.CausalLM.from_preset(str(path), dtype=dtype)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"--preset {preset} is not a keras-hub CausalLM preset "
                            f"({str(e)[:120]}). Pass a directory with a task.json and a "
                            "tokenizer (CausalLM.save_to_preset).", field="preset") from None
    known = str(preset) in keras_hub.models.CausalLM.presets or "://" in str(preset)
    if not known:
        raise UserError(f"--preset {preset!r} is neither a directory nor a keras-hub preset "
                        "name. Presets need a download (or a local copy): pass a directory "
                        "written by save_to_preset, or a name from "
                        "keras_hub.models.CausalLM.presets.", field="preset")
    try:
        return keras_hub.models.CausalLM.from_preset(str(preset), dtype=dtype)
    except Exception as e:  # a download that failed: the network, credentials, a cache
        raise UserError(f"--preset {preset!r} could not be loaded ({type(e).__name__}: "
                        f"{str(e)[:100]}). Presets need a download: run once where the "
                        "network reaches Kaggle/Hugging Face, save_to_preset a local copy, "
                        "and pass its directory.", field="preset") from None


def max_sequence_length(model):
    """The longest sequence a CausalLM's backbone takes.

    Args:
        model: a keras-hub CausalLM.

    Returns:
        An int, or None when the backbone has no limit (rotary position embeddings).

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> max_sequence_length(keras_hub.models.GPT2CausalLM(backbone))
    8
    """
    value = getattr(model.backbone, "max_sequence_length", None)
    return int(value) if value else None


def quantization_modes(model) -> set:
    """The quantization modes of a model's layers.

    Args:
        model: keras.Model. Any model.

    Returns:
        A set of str (e.g. {"int8"}); empty for a float model.

    Example:
    >>> dense = keras.layers.Dense(4)
    >>> model = keras.Sequential([dense])
    >>> dense.build((None, 4))
    >>> quantization_modes(model)
    set()
    >>> dense.quantize("int8")
    >>> quantization_modes(model)
    {'int8'}
    """
    return {layer.quantization_mode for layer in flatten_layers(model)
            if getattr(layer, "quantization_mode", None)}


def quantize_base(model, base: str):
    """Quantizes a CausalLM's backbone in place, for LoRA on a quantized base.

    Every Dense/EinsumDense and the token embedding get Keras's int8 (per channel) or int4
    (groups of `INT4_BLOCK`, at most the model width); an int8 base keeps the embedding in
    float (see `_not_reversible`). Keras's `quantize` runs through `kmp._keras.quantize`: one
    garbage collection in all, not one per kernel.

    Args:
        model: a keras-hub CausalLM with float weights.
        base: str. "float" (left as it is), "int8" or "int4".

    Returns:
        The same model.

    Raises:
        UserError: for an unknown `base`, a model already quantized, or int8 under
            mixed_float16 (which Keras refuses).

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = quantize_base(keras_hub.models.GPT2CausalLM(backbone), "int4")
    >>> quantization_modes(model)
    {'int4'}
    """
    if base not in BASES:
        raise UserError(f"Unknown base {base!r}. Use one of: {', '.join(BASES)}.", field="base")
    if base == "float":
        return model
    if quantization_modes(model):
        raise UserError(f"--base {base}: the preset is already quantized "
                        f"({', '.join(sorted(quantization_modes(model)))}). Use --base float "
                        "to fine-tune it as it is.", field="base")
    if base == "int8" and keras.config.dtype_policy().compute_dtype == "float16":
        raise UserError("--base int8 under mixed_float16 is refused by Keras (its int8 "
                        "products, rescaled, overflow float16). Use --precision "
                        "mixed_bfloat16 or float32, or --base int4.", field="base")
    config = None
    if base == "int4":
        width = getattr(model.backbone, "hidden_dim", INT4_BLOCK)
        config = keras.quantizers.Int4QuantizationConfig(block_size=min(INT4_BLOCK, width))
    quantize(model.backbone, base, config=config,
             filters=None if base != "int8" else _not_reversible)
    return model


def _not_reversible(layer) -> bool:
    """False for a ReversibleEmbedding (the token embedding and vocabulary projection).

    Keras 3.15.1's int8 reverse projection (`ReversibleEmbedding._int8_call(reverse=True)`)
    quantizes its inputs with no custom gradient: the gradient reaches the hidden states only
    through the inputs' abs-max scale, never through the product, and LoRA below it diverges
    (measured: validation loss 6.24 -> 13.3 in 200 steps, where int4 and float bases fall to
    5.98). So an int8 base keeps the embedding in float; int4's reverse projection is
    weight-only and trains correctly."""
    return not hasattr(layer, "tie_weights")


_NO_LORA = {
    "gptq": "Keras's enable_lora raises on GPTQ layers",
    "awq": "Keras's AWQ forward pass never reads LoRA adapters, so they would train nothing",
    "float8": "Keras's float8 forward pass raises on LoRA layers",
}


def check_lora_base(model) -> None:
    """Checks that LoRA can train on a model's quantization (float, int8 or int4).

    Args:
        model: keras.Model. The model LoRA would go into.

    Raises:
        UserError: for GPTQ, AWQ or float8 layers, on which Keras's LoRA raises or trains
            nothing.

    Example:
    >>> dense = keras.layers.Dense(4)
    >>> dense.build((None, 4))
    >>> dense.quantize("int8")
    >>> check_lora_base(keras.Sequential([dense]))  # int8: LoRA trains on it
    """
    for mode in sorted(quantization_modes(model) & set(_NO_LORA)):
        raise UserError(f"LoRA on a {mode} base is not supported ({_NO_LORA[mode]}, Keras "
                        f"{keras.__version__}). Fine-tune a float preset with --base float, "
                        "int8 or int4.", field="lora")


def lora_candidates(model) -> list:
    """The names of a CausalLM's layers that can take LoRA (Dense and EinsumDense).

    Embeddings have `enable_lora` too, but keras-hub's `save_lora_weights` reads
    `lora_kernel_a`, which an embedding's LoRA does not have (keras-hub 0.32): they are left
    out.

    Args:
        model: a keras-hub CausalLM.

    Returns:
        A sorted list of str.

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> lora_candidates(keras_hub.models.GPT2CausalLM(backbone))[:3]
    ['attention_output', 'feedforward_intermediate_dense', 'feedforward_output_dense']
    """
    return sorted({layer.name for layer in flatten_layers(model.backbone)
                   if hasattr(layer, "enable_lora") and layer.weights
                   and not isinstance(layer, keras.layers.Embedding)})


def check_targets(model, targets) -> None:
    """Checks that LoRA `targets` name layers of `model` that can take it.

    Args:
        model: a keras-hub CausalLM.
        targets: list of str or None. Layer names; None (the backbone's default) passes.

    Raises:
        UserError: when a name is not one of `lora_candidates(model)`.

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> try:
    ...     check_targets(keras_hub.models.GPT2CausalLM(backbone), ["qkv"])
    ... except UserError as e:
    ...     print(str(e)[:47])
    --lora-targets qkv name no Dense or EinsumDense
    """
    unknown = set(targets or ()) - set(lora_candidates(model))
    if unknown:
        raise UserError(f"--lora-targets {', '.join(sorted(unknown))} name no Dense or "
                        f"EinsumDense layer of this model. Use some of: "
                        f"{', '.join(lora_candidates(model))}.", field="lora_targets")


def enable_lora(model, rank: int, targets=None) -> list:
    """Puts LoRA adapters into a CausalLM's backbone and freezes everything else.

    The `targets` layers get rank-`rank` adapters (float32 masters under any policy); every
    other weight is frozen, the targets' own kernels and biases included (keras-hub would
    leave the biases trainable).

    Args:
        model: a keras-hub CausalLM (float, int8 or int4 base).
        rank: int. The adapters' rank (alpha = rank, keras-hub's default).
        targets: list of str or None. Layer names (`lora_candidates`). Defaults to the
            backbone's `default_lora_layer_names()` (the query and value projections).

    Returns:
        The layers LoRA was put into.

    Raises:
        UserError: for a rank below 1, a GPTQ/AWQ/float8 base, or targets naming no layer.

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = keras_hub.models.GPT2CausalLM(backbone)
    >>> sorted(layer.name for layer in enable_lora(model, 4))
    ['query', 'value']
    >>> sorted({v.path.rsplit("/", 1)[-1] for v in model.trainable_variables})
    ['lora_kernel_a', 'lora_kernel_b']
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"--lora must be a positive integer rank. Received: {rank!r}",
                        field="lora")
    check_lora_base(model)
    check_targets(model, targets)
    backbone = model.backbone
    names = list(targets) if targets else backbone.default_lora_layer_names()
    backbone.enable_lora(rank, target_layer_names=names)
    layers = [layer for layer in flatten_layers(backbone) if getattr(layer, "lora_enabled",
                                                                     False)]
    if not layers:
        raise UserError(f"LoRA found none of the layers {', '.join(names)} in this model. "
                        f"Pass --lora-targets from: {', '.join(lora_candidates(model))}.",
                        field="lora_targets")
    for layer in layers:  # keras-hub leaves the targets' biases trainable: kmp does not
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False
    return layers


def train_embeddings(model) -> list:
    """Makes the token embedding of a LoRA model train in full beside the adapters.

    PEFT calls this `modules_to_save`. In GPT-2 and Gemma the embedding is tied to the
    vocabulary projection; where it is not (Llama), its `reverse_embeddings` train too. A
    transfer that changes which tokens are frequent moves it most, and LoRA alone leaves it
    frozen.

    Args:
        model: a keras-hub CausalLM with LoRA enabled (`enable_lora`).

    Returns:
        The variables made trainable.

    Raises:
        UserError: when the backbone has no `token_embedding`, or it is quantized (an int4
            base: quantized weights cannot train).

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = keras_hub.models.GPT2CausalLM(backbone)
    >>> _ = enable_lora(model, 4)
    >>> [v.path for v in train_embeddings(model)]
    ['token_embedding/embeddings']
    """
    layer = getattr(model.backbone, "token_embedding", None)
    if layer is None or not layer.weights:
        raise UserError(f"--train-embeddings: {type(model.backbone).__name__} has no "
                        "token_embedding layer. Fine-tune without --train-embeddings.",
                        field="train_embeddings")
    if getattr(layer, "quantization_mode", None):
        raise UserError(f"--train-embeddings on a {layer.quantization_mode} base: the token "
                        "embedding is quantized and cannot train. Use --base float or int8 "
                        "(which keeps the embedding in float).", field="train_embeddings")
    layer.trainable = True
    return list(layer.trainable_variables)


def param_counts(model) -> tuple[int, int]:
    """Counts a model's trainable and total parameters.

    Args:
        model: keras.Model. Any model.

    Returns:
        (trainable, total): elements of the model's variables (a packed int4 kernel counts
        the bytes it stores).

    Example:
    >>> param_counts(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    (8, 8)
    """
    trainable = sum(int(v.numpy().size) for v in model.trainable_weights)
    total = sum(int(v.numpy().size) for v in model.weights)
    return trainable, total


def weight_bytes(model) -> int:
    """The bytes of a model's variables as stored (int8/int4 kernels at their size).

    Args:
        model: keras.Model. Any model.

    Returns:
        An int.

    Example:
    >>> weight_bytes(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))  # float32
    32
    """
    return sum(int(v.numpy().nbytes) for v in model.weights)

