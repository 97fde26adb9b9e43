"""Atomic training checkpoints: weights, optimizer and loss-scale state, and a JSON record.

A checkpoint is `step-NNNNNNN.weights.h5` (model and optimizer variables, which include
kmp.LossScaleOptimizer's scale and counters) plus `latest.json`, which names it and carries its
size and SHA-256, the epoch, the optimizer step, a precision record (policy, loss-scaler state,
versions, device) and any extra state. Each file is written under a temporary name, flushed to
disk and renamed into place, and `latest.json` is replaced last: a kill at any moment leaves the
previous checkpoint whole and named. Weights files are HDF5 arrays: loading runs no code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import keras

from kmp import __version__, backends, distributed
from kmp.errors import UserError
from kmp.hardware import detect
from kmp.scaling import LossScaleOptimizer

LATEST = "latest.json"


def _fsync_file(path: Path):
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_bytes_atomic(path, data: bytes):
    """Writes `data` to `path` via a temporary file, fsync and rename: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _fsync_file(tmp)
    os.replace(tmp, path)


def write_json_atomic(path, data: dict):
    """Writes `data` as indented JSON to `path` atomically (see `write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())


class Checkpoint(keras.callbacks.Callback):
    """Saves an atomic checkpoint at the end of every epoch (see the module docstring).

    Args:
        directory: str or Path. Where checkpoints go (created if missing).
        extra_state: callable or None. Returns a JSON-serializable dict stored in latest.json
            (e.g. the loss history). Defaults to None.
        keep: int. Checkpoints kept on disk, newest first; at least 1 (the one `--resume`
            reads). Defaults to 2.

    Raises:
        UserError: if `keep` is not an int >= 1.

    Example:
    >>> import tempfile
    >>> ckpt = Checkpoint(tempfile.mkdtemp())
    >>> latest(ckpt.directory) is None
    True
    """

    def __init__(self, directory, extra_state=None, keep=2):
        super().__init__()
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise UserError(f"Checkpoint: keep must be an int >= 1 (the newest checkpoint is "
                            f"always kept). Received: keep={keep!r}")
        self.directory = Path(directory)
        self.extra_state, self.keep = extra_state, keep

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)

    def save(self, epoch: int):
        """Writes the checkpoint for the state after `epoch` epochs; returns its record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        backends.sync_state(self.model)
        step = int(self.model.optimizer.iterations.numpy())
        name = f"step-{step:07d}.weights.h5"
        tmp = self.directory / f"tmp-{name}"
        with distributed.local():  # process 0 alone, in a run across processes
            self.model.save_weights(tmp, overwrite=True)
        _fsync_file(tmp)
        os.replace(tmp, self.directory / name)
        record = {"weights": name, "bytes": (self.directory / name).stat().st_size,
                  "sha256": _sha256(self.directory / name), "epoch": epoch, "step": step,
                  "precision": precision_record(self.model),
                  "extra": self.extra_state() if self.extra_state else {}}
        write_json_atomic(self.directory / LATEST, record)
        old = sorted(self.directory.glob("step-*.weights.h5"))[:-self.keep]
        for path in old:
            if path.name != name:
                path.unlink(missing_ok=True)
        return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def precision_record(model) -> dict:
    """What a checkpoint depends on: policy, loss scaling, scaler state, versions, device."""
    optimizer = model.optimizer
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    state = optimizer.state() if isinstance(optimizer, LossScaleOptimizer) else None
    return {"policy": model.dtype_policy.name, "loss_scaling": scaled, "scaler": state,
            "versions": {"kmp": __version__, **backends.versions()},
            "device": detect().describe()}


def latest(directory) -> dict | None:
    """The record of the newest complete checkpoint in `directory`, or None if there is none.

    Raises:
        UserError: when `latest.json` is not a kmp checkpoint record.
    """
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not {"weights", "epoch", "step"} <= set(record):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a kmp checkpoint record (damaged, or from another "
                        "tool). Resume from a kmp pretrain run's directory, or start a new run.",
                        field="resume") from None
    return record


def precision_change(record: dict, model) -> str | None:
    """Explains how resuming `record` under `model`'s precision differs, or None if it does not."""
    saved = record.get("precision")
    if not saved:
        return None
    now = precision_record(model)
    notes = []
    if saved["policy"] != now["policy"]:
        scale = ("; the loss scale starts fresh at its initial value" if now["loss_scaling"]
                 and not saved["loss_scaling"] else "; loss scaling is dropped"
                 if saved["loss_scaling"] and not now["loss_scaling"] else "")
        notes.append(f"the checkpoint was trained under {saved['policy']} and resumes under "
                     f"{now['policy']}: weights and optimizer moments are float32 in both and "
                     f"carry over{scale}. Expect a small jump in the loss")
    if saved["device"] != now["device"]:
        notes.append(f"it was written on {saved['device']}, not this {now['device']}")
    if saved["versions"] != now["versions"]:
        notes.append(f"it was written with {saved['versions']}, now {now['versions']}")
    return "; ".join(notes) + "." if notes else None


def verify(directory) -> dict:
    """The newest checkpoint's record, after checking its weights file's size and SHA-256.

    Raises:
        UserError: when `directory` holds no checkpoint, or the record or the weights file is
            damaged.
    """
    record = latest(directory)
    if record is None:
        raise UserError(
            f"No checkpoint to resume from in {directory} (no {LATEST}). Start a new run instead "
            "of resuming.", field="resume")
    path = Path(directory) / record["weights"]
    size = path.stat().st_size if path.exists() else None
    if size is None or size != record.get("bytes", size) or (
            "sha256" in record and _sha256(path) != record["sha256"]):
        raise UserError(
            f"checkpoint {path} is missing or damaged ({size} bytes, expected "
            f"{record.get('bytes')}, or a checksum mismatch). Restore it from a backup, or "
            "start a new run instead of resuming.", field="resume")
    return record


def restore(model, directory, record: dict | None = None) -> dict:
    """Loads the newest checkpoint into a compiled `model` (weights and optimizer state).

    The checkpoint is checked first (`verify`) unless `record`, what `verify` returned, is
    given. A checkpoint written with loss scaling loads
    into a model without it and the reverse (a precision change, see `precision_change`): the
    optimizer's own state carries over, the loss scale does not.

    Returns:
        The checkpoint's record (weights, epoch, step, precision, extra).

    Raises:
        UserError: when `directory` holds no checkpoint, or the checkpoint is damaged or
            does not fit the model.
    """
    record = verify(directory) if record is None else record
    path = Path(directory) / record["weights"]
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    scaled_now = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scaled_then = (record.get("precision") or {}).get("loss_scaling", scaled_now)
    if scaled_then and not scaled_now:  # load through a scaler of the checkpoint's layout
        model.optimizer = LossScaleOptimizer(optimizer)
        model.optimizer.build(model.trainable_variables)
    elif scaled_now and not scaled_then:
        model.optimizer = optimizer.inner_optimizer
    try:
        model.load_weights(path)
    except (ValueError, OSError) as e:
        # Keras raises ValueError for a variable count or shape that does not match, and h5py
        # OSError for a file that is not HDF5: both are what a checkpoint of another run gives.
        raise UserError(f"checkpoint {path} does not fit this model ({str(e)[:120]}). Resume "
                        "with the run's own config, or start a new run.", field="resume") from e
    finally:
        model.optimizer = optimizer
    return record
