"""Atomic checkpoints (kmp.checkpoint): names that never collide, where the run stands, and
the checks before a run (re)starts in a directory."""

import json

import keras
import numpy as np
import pytest

from kmp import checkpoint
from kmp.errors import UserError


def _compiled():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.backends
def test_a_checkpoint_at_the_same_step_never_overwrites_the_one_latest_names(tmp_path):
    # Skipped steps do not advance the optimizer's step (and a resume or rollback can reach
    # the same count again): the file latest.json names must stay whole until latest.json
    # names another.
    model = _compiled()
    ckpt = checkpoint.Checkpoint(tmp_path, keep=3)
    ckpt.set_model(model)
    first = ckpt.save(4)
    before = (tmp_path / first["weights"]).read_bytes()
    model.layers[0].kernel.assign(np.ones((3, 2), "float32"))
    second = ckpt.save(4)
    assert second["weights"] != first["weights"] and first["step"] == second["step"] == 0
    assert (tmp_path / first["weights"]).read_bytes() == before
    assert checkpoint.verify(tmp_path)["weights"] == second["weights"]
    third = ckpt.save(8)
    assert (third["batches"], third["position"]) == (8, 8)
    ckpt.keep = 1
    ckpt.save(12)  # keeps only the newest
    assert [p.name for p in tmp_path.glob("*.weights.h5")] == ["batch-00000012.weights.h5"]


@pytest.mark.backends
def test_the_record_says_where_the_run_stands(tmp_path):
    model = _compiled()
    ckpt = checkpoint.Checkpoint(tmp_path, batches=6, position=lambda b: b + 10)
    ckpt.set_model(model)
    for batch in range(6):  # this fit's batches, after the 6 the run had trained before
        ckpt.on_train_batch_end(batch)
    ckpt.on_epoch_end(0)
    record = checkpoint.latest(tmp_path)
    assert (record["batches"], record["position"], record["step"]) == (12, 22, 0)
    (tmp_path / "tmp-batch-00000015.weights.h5").write_bytes(b"half")  # a kill mid-save
    model.stop_training = True  # a run stopped mid-epoch: nothing to continue from
    ckpt.on_train_batch_end(0)
    ckpt.on_epoch_end(1)
    assert checkpoint.latest(tmp_path)["batches"] == 12
    model.stop_training = False
    ckpt.on_epoch_end(1)
    assert checkpoint.latest(tmp_path)["batches"] == 13
    assert not list(tmp_path.glob("tmp-*"))  # the next save removes what a kill left


def test_prepare_run_checks_everything_before_writing(tmp_path):
    config = {"num_layers": 2, "grad_accum": 1, "steps": 4}
    out, record = checkpoint.prepare_run(tmp_path / "run", config, resume=False)
    assert record is None and json.loads((out / "config.json").read_text()) == config
    with pytest.raises(UserError, match="No checkpoint to resume from"):
        checkpoint.prepare_run(out, config, resume=True)
    model = _compiled()
    ckpt = checkpoint.Checkpoint(out / "checkpoints")
    ckpt.set_model(model)
    ckpt.save(4)
    fixed = {"num_layers": "model shape", "grad_accum": "gradient accumulation"}
    changed = {**config, "num_layers": 3, "grad_accum": 2, "steps": 8}
    with pytest.raises(UserError, match=r"another model shape \(num_layers 2 -> 3\); another "
                                        r"gradient accumulation \(grad_accum 1 -> 2\)"):
        checkpoint.prepare_run(out, changed, resume=True, fixed=fixed)
    assert json.loads((out / "config.json").read_text()) == config  # untouched
    out, record = checkpoint.prepare_run(out, {**config, "steps": 8}, resume=True, fixed=fixed)
    assert record["batches"] == 4 and json.loads((out / "config.json").read_text())["steps"] == 8
