"""A finished `kmp pretrain` run as a plain keras-hub preset (`DIR/preset/`).

kmp's model is keras-hub's GPT-2 with precision options (`kmp.gpt.GPTBackbone`: the logits'
dtype, a float32 residual stream) and FP32 islands put in at run time (`kmp.harden`); a
`.keras` file of it needs kmp imported to load. The preset is written in keras-hub's own
classes instead (`GPT2Backbone`, `GPT2CausalLM`, `GPT2CausalLMPreprocessor` with the run's
byte-level BPE tokenizer), with the run's float weights (a float8 run's without its scales)
in float32, so `keras_hub.models.CausalLM.from_preset(DIR/preset)` loads it and generates
from it in any Python with keras-hub, and `kmp finetune --preset DIR/preset` starts from it.
Both options only change a mixed-precision computation: in float32 the plain model computes
what the run's model computes (`check_preset` measures it).

Example:
    ```python
    write_run_preset("runs/tiny")  # runs/tiny/preset/
    model = keras_hub.models.CausalLM.from_preset("runs/tiny/preset")
    print(model.generate("def", max_length=32))
    ```
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import keras

from kmp.errors import UserError
from kmp.policy import global_policy

_KMP_ONLY = ("logits_dtype", "float32_residual")  # GPTBackbone's options, not GPT2Backbone's


def plain_causal_lm(model, tokenizer, sequence_length: int):
    """Copies a kmp GPT into keras-hub's own GPT2CausalLM, with a preprocessor.

    Args:
        model: a kmp GPT (`kmp.gpt.GPTCausalLM`) with float weights (not float8).
        tokenizer: its `keras_hub.tokenizers.GPT2Tokenizer`.
        sequence_length: int. The preprocessor's sequence length.

    Returns:
        A `keras_hub.models.GPT2CausalLM` with `model`'s weights, built under the global
        dtype policy.

    Example:
    >>> import keras_hub
    >>> from kmp.gpt import GPTConfig, build_model
    >>> model = build_model(GPTConfig(vocab_size=6, num_layers=1, num_heads=2, hidden_dim=16,
    ...                               intermediate_dim=32, seq_len=8))
    >>> tokenizer = keras_hub.tokenizers.GPT2Tokenizer(
    ...     {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "Ġa": 4, "Ġb": 5}, ["Ġ a", "Ġ b"])
    >>> type(plain_causal_lm(model, tokenizer, 8).backbone).__name__
    'GPT2Backbone'
    """
    import keras_hub

    config = {k: v for k, v in model.backbone.get_config().items() if k not in _KMP_ONLY}
    config["dtype"] = keras.config.dtype_policy().name
    backbone = keras_hub.models.GPT2Backbone.from_config(config)
    backbone.set_weights(model.backbone.get_weights())
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


def write_run_preset(run, directory=None, log=print) -> Path:
    """Writes a finished run as a keras-hub preset: backbone, tokenizer and preprocessor.

    Args:
        run: str or Path. A `kmp pretrain` --out directory.
        directory: str or Path or None. Where the preset goes. Defaults to `<run>/preset`.
        log: callable. Where the closing line goes. Defaults to print.

    Returns:
        The preset directory.

    Raises:
        UserError: when `run` is not a finished run (`kmp.gpt.open_run`), or `directory`
            exists and is not a preset kmp wrote.

    Example:
    >>> import tempfile
    >>> try:
    ...     write_run_preset(tempfile.mkdtemp())  # an empty directory: not a run
    ... except UserError as e:
    ...     print("no config.json" in str(e))
    True
    """
    from kmp.gpt.run import open_run

    run = open_run(run, log=log)
    directory = Path(directory) if directory else run.dir / "preset"
    with global_policy("float32"):
        model = run.model("float32", float8=False, islands=False, preprocessor=False)
        plain = plain_causal_lm(model, run.tokenizer(), min(run.config.seq_len, 128))
    # It replaces `directory`: only an earlier preset, never the run or a folder around it.
    if directory.exists() and (
            run.dir.resolve().is_relative_to(directory.resolve())
            or not (directory / "metadata.json").exists()):
        raise UserError(f"{directory} exists and is not a keras-hub preset kmp wrote; it would "
                        "be replaced. Give a new directory.", field="out")
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_to_preset(str(tmp))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    log(f"preset: {directory} (keras_hub.models.CausalLM.from_preset loads it)")
    return directory


def check_preset(run, directory=None, windows: int = 2) -> tuple[float, float]:
    """Measures a run's preset against the run's own model: their float32 validation losses.

    Args:
        run: str or Path. A finished `kmp pretrain` --out directory.
        directory: str or Path or None. The preset (`write_run_preset`'s). Defaults to
            `<run>/preset`.
        windows: int. Validation batches to measure on. Defaults to 2.

    Returns:
        (the run's model's loss, the preset's loss), in nats per token; they agree within
        1e-5 relative when the preset is right.

    Raises:
        UserError: when `run` is not a finished run (`kmp.gpt.open_run`).

    Example:
    >>> import tempfile
    >>> try:
    ...     check_preset(tempfile.mkdtemp())  # with a run: ours, plain = check_preset(run)
    ... except UserError as e:
    ...     print("no config.json" in str(e))
    True
    """
    import keras_hub

    from kmp.gpt import data
    from kmp.gpt.run import open_run

    run = open_run(run, log=lambda *a: None)
    directory = Path(directory) if directory else run.dir / "preset"
    config = run.config
    val = data.val_dataset(run.cache(), config.seq_len, config.batch_size, windows)
    with global_policy("float32"):
        ours = run.model("float32", float8=False, preprocessor=False)
        plain = keras_hub.models.CausalLM.from_preset(str(directory))
    losses = []
    for model in (ours, plain):
        total = count = 0.0
        for i in range(len(val)):
            inputs, y = val[i]
            logits = keras.ops.cast(model(inputs, training=False), "float32")
            ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            total += float(keras.ops.sum(ce))
            count += float(keras.ops.size(ce))
        losses.append(total / count)
    return losses[0], losses[1]
