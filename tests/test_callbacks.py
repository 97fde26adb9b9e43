"""Callbacks (kmp.callbacks): each step's own loss, TensorBoard steps that continue."""

import math

import keras
import numpy as np
import pytest

import kmp
from kmp.callbacks import BatchLoss, TensorBoardScalars


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append(dict(logs))


@pytest.mark.backends
def test_kmp_compile_logs_each_steps_own_loss_through_a_non_finite_one():
    # Keras logs the epoch's running mean as `loss`: one inf loss makes it inf for the rest of
    # the epoch. kmp.compile's models also log each step's own loss as `batch_loss`.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    weights = np.ones(16, "float32")
    weights[4:8] = np.inf  # batch 1 of 4
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    # A scaler skips the inf step, and a zero learning rate keeps the weights of the others.
    kmp.compile(model, kmp.LossScaleOptimizer(keras.optimizers.SGD(0.0)), "mse",
                weighted_metrics=[])
    record = Record()
    model.fit(x, y, sample_weight=weights, batch_size=4, epochs=1, shuffle=False,
              callbacks=[record], verbose=0)
    means = [float(logs["loss"]) for logs in record.logs]
    own = [float(logs["batch_loss"]) for logs in record.logs]
    assert not math.isfinite(own[1]) and not any(math.isfinite(m) for m in means[1:])
    pred = model.predict(x, verbose=0)
    expected = [float(np.mean((pred[i:i + 4] - y[i:i + 4]) ** 2)) for i in (0, 8, 12)]
    np.testing.assert_allclose([own[0], own[2], own[3]], expected, rtol=1e-5)
    losses = BatchLoss()
    assert [losses(i, logs) for i, logs in enumerate(record.logs)][2:] == own[2:]


def test_tensorboard_steps_continue_from_the_runs_position(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TensorBoardScalars(tmp_path, update_freq=2, step=100)
    for batch in range(4):  # the epoch's running mean, and each step's own loss
        board.on_train_batch_end(batch, {"loss": 9.0, "batch_loss": 1.0 + batch})
    board.on_epoch_end(0, {"loss": 2.0, "batch_loss": 4.0, "val_loss": 3.0})
    board.on_train_end()
    train = EventAccumulator(str(tmp_path / "train")).Reload()
    steps = {tag: [e.step for e in train.Tensors(tag)] for tag in train.Tags()["tensors"]}
    assert steps == {"batch_loss": [102, 104], "epoch_loss": [104]}
    values = [float(e.tensor_proto.float_val[0]) for e in train.Tensors("batch_loss")]
    assert values == [2.0, 4.0]  # the steps' own losses
