"""Atomic training checkpoints: weights, optimizer and loss-scale state, and a JSON record.

A checkpoint is `batch-NNNNNNNN.weights.h5` (model and optimizer variables, which include
kmp.LossScaleOptimizer's scale and counters) plus `latest.json`, which names it and carries its
size and SHA-256, where the run stands (`batches`: training batches done, skipped updates
included; `position`: the data position the run reads next; `step`: the optimizer's own step
count), a precision record (policy, loss-scaler state, versions, device) and any extra state.
Each file is written under a temporary name, flushed to disk and renamed into place, a name
never reused while `latest.json` points at it, and `latest.json` is replaced last: a kill at
any moment leaves the previous checkpoint whole and named. Weights files are HDF5 arrays:
loading runs no code. `prepare_run` checks a run directory before a run (re)starts in it.
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


def optimizer_steps(optimizer) -> int:
    """The optimizer's own step count as a Python int (updates applied; under gradient
    accumulation Keras derives it from the micro-batch counter), on every backend."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class Checkpoint(keras.callbacks.Callback):
    """Saves an atomic checkpoint at the end of every epoch (see the module docstring).

    Args:
        directory: str or Path. Where checkpoints go (created if missing).
        extra_state: callable or None. Returns a JSON-serializable dict stored in latest.json
            (e.g. the loss history). Defaults to None.
        keep: int. Checkpoints kept on disk, newest first; at least 1 (the one `--resume`
            reads). Defaults to 2.
        batches: int. Training batches the run had done before this `fit` (a resumed run's
            `batches`). Defaults to 0.
        position: callable or None. Maps the run's batch count to the data position it reads
            next (when some data positions are skipped, `kmp.recovery.RecoveryPlan.position`).
            Defaults to None: the same number.

    Raises:
        UserError: if `keep` is not an int >= 1.

    Example:
    >>> import tempfile
    >>> ckpt = Checkpoint(tempfile.mkdtemp())
    >>> latest(ckpt.directory) is None
    True
    """

    def __init__(self, directory, extra_state=None, keep=2, batches=0, position=None):
        super().__init__()
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise UserError(f"Checkpoint: keep must be an int >= 1 (the newest checkpoint is "
                            f"always kept). Received: keep={keep!r}")
        self.directory = Path(directory)
        self.extra_state, self.keep = extra_state, keep
        self.batches = batches
        self.position = position or (lambda b: b)

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        # A run stopped mid-epoch (e.g. its loss turned non-finite): not a state to go on from.
        if getattr(self.model, "stop_training", False):
            return
        self.save()

    def _new_name(self, batches: int) -> str:
        """A file name for the checkpoint after `batches`, never one that exists (above all
        the one latest.json names: a rollback or resume can reach the same count again)."""
        name, n = f"batch-{batches:08d}.weights.h5", 1
        while (self.directory / name).exists():
            name, n = f"batch-{batches:08d}-{n}.weights.h5", n + 1
        return name

    def save(self, batches: int | None = None):
        """Writes the checkpoint of the state after `batches` training batches (default: the
        batches this callback has counted); returns its record. In a run across processes
        every process calls it (the weights are gathered) and process 0 writes; the others
        return None."""
        self.batches = self.batches if batches is None else batches
        backends.sync_state(self.model)
        if distributed.process_count() > 1:  # every process joins; process 0 alone writes
            with distributed.whole(self.model):  # weights split across processes: gathered
                return self._write() if distributed.is_chief() else None
        return self._write()

    def _write(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("tmp-*.weights.h5"):  # a save a kill interrupted
            stale.unlink(missing_ok=True)
        name = self._new_name(self.batches)
        tmp = self.directory / f"tmp-{name}"
        with distributed.local():  # process 0 alone, in a run across processes
            self.model.save_weights(tmp, overwrite=True)
        _fsync_file(tmp)
        os.replace(tmp, self.directory / name)
        record = {"weights": name, "bytes": (self.directory / name).stat().st_size,
                  "sha256": _sha256(self.directory / name), "batches": self.batches,
                  "position": int(self.position(self.batches)),
                  "step": optimizer_steps(self.model.optimizer),
                  "precision": precision_record(self.model),
                  "extra": self.extra_state() if self.extra_state else {}}
        write_json_atomic(self.directory / LATEST, record)
        files = [*self.directory.glob("batch-*.weights.h5"),
                 *self.directory.glob("step-*.weights.h5")]  # kmp <= 0.1.0's names
        for path in sorted(files, key=lambda f: f.stat().st_mtime_ns)[:-self.keep]:
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
        if not isinstance(record, dict) or not {"weights", "step"} <= set(record):
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
        The checkpoint's record (weights, batches, position, step, precision, extra).

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


def prepare_run(out, config: dict, resume: bool, fixed: dict | None = None,
                write: bool = True) -> tuple[Path, dict | None]:
    """Makes the run directory `out` ready: creates it and checks it is writable; on `resume`,
    checks it holds a run (config.json) whose `fixed` settings equal `config`'s and a whole
    checkpoint (`verify`), whose record it returns; then, with `write` (process 0 of a run),
    saves `config` as config.json. Nothing in an existing directory changes before every
    check passed.

    Args:
        out: str or Path. The run directory.
        config: dict. The run's settings (JSON-serializable).
        resume: bool. Whether the run continues the one in `out`.
        fixed: dict or None. Settings that a resumed run cannot change, each mapped to why
            (e.g. {"num_layers": "model shape"}); settings sharing a reason are reported
            together. Defaults to None.
        write: bool. Write config.json (and test that `out` is writable). Defaults to True.

    Returns:
        (the directory as a Path, the checkpoint's record or None).

    Raises:
        UserError: for a directory that cannot be written, or a resume that does not fit.
    """
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if write:
            (out / ".write-test").write_text("")
            (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"The run directory {str(out)!r} is not writable ({e.strerror}). Pick "
                        "another directory.", field="out") from None
    saved, record = out / "config.json", None
    if resume:
        if not saved.exists():
            raise UserError(f"{out} is not a kmp pretrain run (no config.json). Point the run "
                            "directory at a run, or do not resume.", field="resume")
        try:
            old = json.loads(saved.read_text())
            if not isinstance(old, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{saved} is not a kmp config (damaged?). Point the run "
                            "directory at a kmp pretrain run, or do not resume.",
                            field="resume") from None
        record = verify(out / "checkpoints")  # before anything in the run is rewritten
        if "batches" not in record:
            raise UserError(f"The checkpoint in {out} was written by kmp 0.1.0, which "
                            "did not record the data position. Resume it with kmp 0.1.0, or "
                            "start a new run.", field="resume")
        changed: dict[str, list[str]] = {}
        for key, why in (fixed or {}).items():
            if key in old and old[key] != config.get(key):
                changed.setdefault(why, []).append(f"{key} {old[key]} -> {config.get(key)}")
        if changed:
            what = "; ".join(f"another {why} ({', '.join(c)})" for why, c in changed.items())
            raise UserError(f"The run in {out} has {what}. Use the run's own settings "
                            "or another run directory.", field="resume")
    if write:
        write_json_atomic(saved, config)
    return out, record
