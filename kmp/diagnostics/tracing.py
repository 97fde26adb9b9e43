"""Non-finite tracing: which layer first produced an inf or NaN, forward or backward.

`trace_nonfinite(model, x, y)` runs one eager forward and backward pass with every layer's
output recorded in the order the calls finish (an inner layer before the layer that contains
it), then reports the first layer whose output has a non-finite value, the first layer (in
backward order, last layer first) whose output gradient has one, and every variable whose
gradient has one, each with its tensor statistics. Works on any Keras model on every backend
(the gradients of intermediate outputs come from `kmp.backends.forward_backward`); nothing of
the model changes.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kmp import backends
from kmp._keras import layer_paths, recorded_outputs


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Summary of one tensor: where it came from and how (non-)finite it is."""

    name: str
    dtype: str
    shape: tuple
    nan: int
    inf: int
    max_abs_finite: float

    @classmethod
    def of(cls, name, value) -> TensorStats:
        v = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(value, "float32")))
        finite = np.isfinite(v)
        return cls(name, keras.backend.standardize_dtype(value.dtype), tuple(v.shape),
                   int(np.isnan(v).sum()), int(np.isinf(v).sum()),
                   float(np.abs(v[finite]).max()) if finite.any() else float("nan"))

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def __str__(self):
        return (f"{self.name}: {self.dtype}{list(self.shape)}, {self.nan} NaN, {self.inf} inf, "
                f"max |finite| {self.max_abs_finite:.4g}")


@dataclasses.dataclass
class Trace:
    """What `trace_nonfinite` found (None / empty where everything was finite)."""

    forward: TensorStats | None
    backward: TensorStats | None
    variables: list
    loss: float

    def __str__(self):
        lines = [f"loss: {self.loss}",
                 f"first non-finite output (forward order): {self.forward or 'none'}",
                 f"first non-finite output gradient (backward order): {self.backward or 'none'}"]
        shown = list(map(str, self.variables[:10]))
        if len(self.variables) > 10:
            shown.append(f"... and {len(self.variables) - 10} more (Trace.variables)")
        lines.append("non-finite variable gradients: " + (
            "none" if not shown else f"{len(self.variables)}\n  " + "\n  ".join(shown)))
        return "\n".join(lines)


def trace_nonfinite(model, x, y=None, loss_scale: float = 1.0) -> Trace:
    """Finds the first layer whose forward output or backward gradient is non-finite.

    Args:
        model: keras.Model. Its compiled loss is used when `y` is given; otherwise the
            sum of its outputs.
        x: the model's input batch.
        y: targets for the compiled loss. Defaults to None.
        loss_scale: float. Multiplies the loss before the backward pass, as a loss-scaled
            optimizer would (to see float16 gradients overflow at a given scale). Defaults to 1.

    Returns:
        A `Trace`.

    Example:
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> trace_nonfinite(m, np.ones((1, 2), "float32")).forward is None
    True
    """
    loss, outputs, grads, var_grads = forward_backward(model, x, y, loss_scale)
    paths = layer_paths(model)
    forward = next((s for s in (TensorStats.of(paths[id(layer)], t) for layer, t in outputs)
                    if not s.finite), None)
    backward = None
    for (layer, _), g in zip(reversed(outputs), reversed(grads)):
        if g is not None:
            stats = TensorStats.of(f"{paths[id(layer)]} (gradient)", g)
            if not stats.finite:
                backward = stats
                break
    bad_vars = [s for s in (TensorStats.of(v.path, g) for v, g in
                            zip(model.trainable_variables, var_grads) if g is not None)
                if not s.finite]
    return Trace(forward, backward, bad_vars, float(loss))


def forward_backward(model, x, y=None, loss_scale: float = 1.0, training: bool = True):
    """One eager pass recording every layer output; returns (loss, outputs, output gradients,
    variable gradients), outputs as (layer, tensor) in the order the calls finished."""

    def forward(probes):
        with recorded_outputs(model, probes) as outputs:
            y_pred = model(x, training=training)
            if y is not None and getattr(model, "loss", None) is not None:
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred)
            else:
                loss = sum(keras.ops.sum(keras.ops.cast(t, "float32"))
                           for t in keras.tree.flatten(y_pred))
        return loss, outputs

    return backends.forward_backward(model, forward, loss_scale)
