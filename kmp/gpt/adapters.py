"""A LoRA fine-tune's saved forms: the adapters file, the fully trained weights beside it,
the adapters saved with each checkpoint, and a finished run loaded back as it was measured.

`kmp finetune --preset` (`kmp.gpt.finetune_hub`) writes into its --out directory:
`adapters.lora.h5` (keras-hub's `save_lora_weights`: the adapters alone),
`adapters.trained.h5` (with `train_embeddings`: the variables that trained in full,
`save_trained`), `checkpoints/adapters-<batches>.lora.h5` beside each checkpoint
(`AdapterCheckpoint`), and metrics.json last. `load_finetuned` rebuilds the model from them:
the source preset (`source_preset_for`: found from any working directory), quantized as it
was, with the adapters and trained weights loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

from kmp.errors import UserError
from kmp.gpt.lora import enable_lora, load_causal_lm, quantize_base, train_embeddings


def trained_name(adapters: str) -> str:
    """The name of the fully trained weights' file beside an adapters file.

    Args:
        adapters: str. An adapters file name, `*.lora.h5`.

    Returns:
        A str: `*.trained.h5` (`save_trained` writes it).

    Example:
    >>> trained_name("adapters.lora.h5")
    'adapters.trained.h5'
    """
    return adapters.replace(".lora.h5", ".trained.h5")


def save_trained(model, path) -> bool:
    """Writes the fully trained (not LoRA) variables of a LoRA model to an HDF5 file.

    One dataset per variable path, float32 masters as they are (`train_embeddings`' token
    embedding); `load_trained` reads them back.

    Args:
        model: a keras-hub CausalLM with LoRA enabled.
        path: str or Path. The file (`trained_name` of the adapters file).

    Returns:
        Whether the model had any such variable (nothing is written otherwise).

    Example:
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = keras_hub.models.GPT2CausalLM(backbone)
    >>> _ = enable_lora(model, 4)
    >>> save_trained(model, "never-written.trained.h5")  # the adapters alone train
    False
    """
    import h5py

    found = [v for v in model.trainable_variables if "lora_kernel" not in v.path]
    if not found:
        return False
    with h5py.File(path, "w") as f:
        for v in found:
            f[v.path] = keras.ops.convert_to_numpy(v)
    return True


def load_trained(model, path) -> None:
    """Assigns the variables `save_trained` wrote into a model, by variable path.

    Args:
        model: keras.Model. The model they were trained in, rebuilt (`load_finetuned`).
        path: str or Path. The file `save_trained` wrote.

    Raises:
        UserError: when the file names a variable `model` does not have, or of another shape.

    Example:
    >>> import os, tempfile
    >>> import keras_hub
    >>> backbone = keras_hub.models.GPT2Backbone(64, 1, 2, 16, 32, max_sequence_length=8)
    >>> model = keras_hub.models.GPT2CausalLM(backbone)
    >>> _ = enable_lora(model, 4)
    >>> _ = train_embeddings(model)
    >>> path = os.path.join(tempfile.mkdtemp(), "a.trained.h5")
    >>> save_trained(model, path)
    True
    >>> load_trained(model, path)
    """
    import h5py

    variables = {v.path: v for v in model.weights}
    with h5py.File(path, "r") as f:
        names = []
        f.visit(lambda name: names.append(name) if isinstance(f[name], h5py.Dataset) else None)
        for name in names:
            if name not in variables or tuple(variables[name].shape) != f[name].shape:
                raise UserError(f"{path} holds {name} {f[name].shape}, which this model does "
                                "not have. Load it into the model it was trained from.",
                                field="preset")
            variables[name].assign(f[name][()])


def adapters_name(batches: int) -> str:
    """The name of the adapters file `AdapterCheckpoint` saves after `batches` batches.

    Args:
        batches: int. Batches trained when the checkpoint was saved.

    Returns:
        A str.

    Example:
    >>> adapters_name(200)
    'adapters-00000200.lora.h5'
    """
    return f"adapters-{batches:08d}.lora.h5"


class AdapterCheckpoint(keras.callbacks.Callback):
    """Saves the LoRA adapters beside each `kmp.checkpoint.Checkpoint`.

    The file is `adapters_name(batches)` in the checkpoint directory; the two newest are
    kept. Keras 3.15.1 saves a LoRA layer's kernel with the adapters merged in (an int8/int4
    kernel re-quantized) and zeroes the adapters when it loads one: a checkpoint alone resumes
    the same function but not the same parameters (`restore_adapters` puts them back). Put it
    after the checkpoint in the callbacks list.

    Args:
        checkpoint: kmp.checkpoint.Checkpoint. The callback that saves the checkpoints.

    Example:
    >>> import tempfile
    >>> from kmp.checkpoint import Checkpoint
    >>> checkpoint = Checkpoint(tempfile.mkdtemp())
    >>> callbacks = [checkpoint, AdapterCheckpoint(checkpoint)]
    """

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        if getattr(self.model, "stop_training", False):
            return
        directory = self.checkpoint.directory
        path = directory / adapters_name(self.checkpoint.batches)
        tmp = path.with_name(f"tmp-{path.name}")
        self.model.backbone.save_lora_weights(str(tmp))
        os.replace(tmp, path)
        for old in sorted(directory.glob("adapters-*.lora.h5"))[:-2]:
            old.unlink(missing_ok=True)


def restore_adapters(model, preset, base, path: Path) -> None:
    """Puts a resumed LoRA run's frozen base and adapters back, after `kmp.checkpoint.restore`.

    The frozen base comes back from the preset (the checkpoint holds merged kernels), then
    the adapters saved with the checkpoint (`AdapterCheckpoint`). Variables that train in full
    (`train_embeddings`) keep the checkpoint's values: they are no LoRA layer's, so the
    checkpoint holds them exactly.

    Args:
        model: a keras-hub CausalLM with LoRA enabled, restored from the checkpoint.
        preset: str or Path. The source preset (`load_causal_lm`).
        base: str. The base's quantization: "float", "int8" or "int4".
        path: Path. The adapters file saved with the checkpoint.

    Raises:
        UserError: when `path` is missing, or the preset cannot be loaded.

    Example:
    >>> try:
    ...     restore_adapters(None, "presets/tiny", "float", Path("adapters-0.lora.h5"))
    ... except UserError as e:
    ...     print(str(e)[:30])
    adapters-0.lora.h5 is missing:
    """
    if not path.is_file():
        raise UserError(f"{path} is missing: the LoRA adapters saved with the checkpoint. "
                        "Start the run again without --resume.", field="resume")
    fresh = quantize_base(load_causal_lm(preset), base)
    found = {v.path: v for v in fresh.weights}
    trained = {v.path for v in model.trainable_variables}
    for variable in model.weights:
        if variable.path in found and variable.path not in trained:
            variable.assign(found[variable.path])
    model.backbone.load_lora_weights(str(path))


def load_finetuned(out, merged: bool = False, dtype=None, source=None):
    """Loads a `kmp finetune --preset` result: the exact model measured, or the merged preset.

    Args:
        out: str or Path. The run's --out directory.
        merged: bool. The merged preset (`out/preset`; for an int8/int4 base, re-quantized
            after the merge). False rebuilds the exact model that was measured: the source
            preset, quantized as it was, with `adapters.lora.h5` (and, for
            `train_embeddings`, `adapters.trained.h5`) loaded. A full fine-tune
            has only the merged form. Defaults to False.
        dtype: str or None. The dtype policy. Defaults to the global one.
        source: str or Path or None. The source preset, where it is no longer where the run
            found it (moved, or another machine). Defaults to the one metrics.json records
            (`source_preset_for`).

    Returns:
        A keras-hub CausalLM with its preprocessor.

    Raises:
        UserError: when `out` is not a finished `kmp finetune --preset` run (no readable
            metrics.json, or no adapters file for a LoRA run), or the source preset is not
            found.

    Example:
    >>> import tempfile
    >>> try:
    ...     load_finetuned(tempfile.mkdtemp())
    ... except UserError as e:
    ...     print("no metrics.json" in str(e))
    True
    """
    out = Path(out).expanduser()
    record = finished_run_record(out)
    if merged or not record.get("lora"):
        if not (out / "preset" / "config.json").is_file():
            raise UserError(f"{out / 'preset'} is missing: the merged preset of the run in "
                            f"{out}. Fine-tune again, or load base + adapters with "
                            "merged=False.", field="preset")
        return load_causal_lm(out / "preset", dtype=dtype)
    adapters = out / "adapters.lora.h5"
    trained = out / trained_name(adapters.name)
    for path in [adapters] + ([trained] if record.get("train_embeddings") else []):
        if not path.is_file():
            raise UserError(f"{path} is missing: a LoRA run keeps its fine-tune there. Load "
                            "the merged preset with merged=True, or fine-tune again.",
                            field="preset")
    model = load_causal_lm(source if source is not None else source_preset_for(out, record),
                           dtype=dtype)
    quantize_base(model, record["base"])
    enable_lora(model, record["lora"], record["lora_targets"])
    model.backbone.load_lora_weights(str(adapters))
    if record.get("train_embeddings"):
        train_embeddings(model)
        load_trained(model, trained)
    return model


def finished_run_record(out) -> dict:
    """The metrics.json of a finished `kmp finetune --preset` run (written last).

    Args:
        out: str or Path. The run's --out directory.

    Returns:
        The record, a dict with at least `source_preset`, `lora` and `base`.

    Raises:
        UserError: when `out` holds no readable metrics.json of a `kmp finetune --preset` run.

    Example:
    >>> import json, tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> _ = (out / "metrics.json").write_text(json.dumps(
    ...     {"source_preset": "presets/tiny", "lora": 8, "base": "int4"}))
    >>> finished_run_record(out)["base"]
    'int4'
    """
    out = Path(out).expanduser()
    path = out / "metrics.json"
    if not path.is_file():
        raise UserError(f"{out} has no metrics.json, so it is not a finished `kmp finetune "
                        "--preset` run (metrics.json is written last). Pass the --out "
                        "directory of a run that finished.", field="out")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({type(e).__name__}). Pass the --out "
                        "directory of a run that finished.", field="out") from None
    if not isinstance(record, dict) or not all(k in record for k in
                                                ("source_preset", "lora", "base")):
        raise UserError(f"{path} is not the metrics of a `kmp finetune --preset` run (it "
                        "lacks source_preset, lora or base). Pass such a run's --out "
                        "directory.", field="out")
    return record


def source_preset_for(out, record: dict) -> str:
    """The source preset of a finished run, found from any working directory.

    metrics.json records a preset directory as an absolute path. Earlier runs recorded it as
    given, often relative to the directory the run was started from: a relative path is looked
    up beside the run, in each directory above it (where runs are usually started from), then
    in the working directory. A keras-hub preset name or handle is returned as recorded.

    Args:
        out: str or Path. The run's --out directory.
        record: dict. Its metrics.json (`finished_run_record`).

    Returns:
        A str: a preset directory, or a keras-hub preset name or handle.

    Raises:
        UserError: when the recorded preset is neither found nor a keras-hub preset name.

    Example:
    >>> source_preset_for("runs/ft", {"source_preset": "gemma_2b_en"})
    'gemma_2b_en'
    """
    import keras_hub

    recorded = str(record["source_preset"])
    if "://" in recorded:
        return recorded
    path = Path(recorded).expanduser()
    run = Path(out).expanduser().resolve()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [where / path for where in (run, *run.parents)] + [Path.cwd() / path]
    for candidate in candidates:
        # Never the run's own merged preset (a source recorded as "preset" found beside it).
        if (candidate / "config.json").is_file() and candidate.resolve() != run / "preset":
            return str(candidate)
    if recorded in keras_hub.models.CausalLM.presets:
        return recorded
    raise UserError(f"The source preset {recorded} that {Path(out) / 'metrics.json'} records "
                    "is not found (looked beside the run, in each directory above it and in "
                    "the working directory). Pass where it is now: load_finetuned(out, "
                    "source=DIR); or load the merged preset: merged=True.", field="preset")
