"""Atomic training checkpoints: weights, optimizer and loss-scale state, and a JSON record.

A checkpoint is `step-NNNNNNN.weights.h5` (model and optimizer variables, which include
kmp.LossScaleOptimizer's scale and counters) plus `latest.json`, which names it and carries the
epoch, the optimizer step and any extra state. Each file is written under a temporary name,
flushed to disk and renamed into place, and `latest.json` is replaced last: a kill at any moment
leaves the previous checkpoint whole and named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

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
        keep: int. Checkpoints kept on disk, newest first. Defaults to 2.

    Example:
    >>> import tempfile
    >>> ckpt = Checkpoint(tempfile.mkdtemp())
    >>> latest(ckpt.directory) is None
    True
    """

    def __init__(self, directory, extra_state=None, keep=2):
        super().__init__()
        self.directory = Path(directory)
        self.extra_state, self.keep = extra_state, keep

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch + 1)

    def save(self, epoch: int):
        """Writes the checkpoint for the state after `epoch` epochs; returns its record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        step = int(self.model.optimizer.iterations.numpy())
        name = f"step-{step:07d}.weights.h5"
        tmp = self.directory / f"tmp-{name}"
        self.model.save_weights(tmp, overwrite=True)
        _fsync_file(tmp)
        os.replace(tmp, self.directory / name)
        record = {"weights": name, "epoch": epoch, "step": step,
                  "extra": self.extra_state() if self.extra_state else {}}
        write_json_atomic(self.directory / LATEST, record)
        old = sorted(self.directory.glob("step-*.weights.h5"))[:-self.keep]
        for path in old:
            if path.name != name:
                path.unlink(missing_ok=True)
        return record


def latest(directory) -> dict | None:
    """The record of the newest complete checkpoint in `directory`, or None if there is none."""
    path = Path(directory) / LATEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def restore(model, directory) -> dict:
    """Loads the newest checkpoint into a compiled `model` (weights and optimizer state).

    Returns:
        The checkpoint's record (weights, epoch, step, extra).

    Raises:
        FileNotFoundError: when `directory` holds no checkpoint.
    """
    record = latest(directory)
    if record is None:
        raise FileNotFoundError(
            f"No checkpoint to resume from in {directory} (no {LATEST}). Drop --resume to start "
            "a new run."
        )
    model.optimizer.build(model.trainable_variables)
    model.load_weights(Path(directory) / record["weights"])
    return record
