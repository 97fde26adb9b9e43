"""FP32 parity: the same model, weights and batch under its own policy and under float32.

The float32 reference is rebuilt from the model's config with every dtype policy set to
float32, then given the model's weights. One deterministic forward and backward pass
(`training=False`: no dropout) on each gives the relative error, ||mixed - fp32|| / ||fp32||,
of every layer output, of the loss and of every variable gradient.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kmp._keras import flatten_layers, layer_paths, walk
from kmp.diagnostics.tracing import forward_backward
from kmp.layers.harden import harden, is_hardened
from kmp.policy import global_policy

# Default tolerances on the relative error, by compute dtype. `kmp parity` on a fresh tiny GPT
# (a stdlib batch) shows at most 1.7e-3 under float16 (loss-scaled) and 4.4e-2 under bfloat16.
TOLERANCE = {"float16": 1e-2, "bfloat16": 1e-1, "float32": 1e-5}


@dataclasses.dataclass(frozen=True)
class ParityRow:
    """The relative error of one tensor against its float32 reference."""

    name: str
    kind: str  # "output", "loss" or "gradient"
    dtype: str
    rel_error: float


@dataclasses.dataclass
class Parity:
    """What `parity_check` found; `flagged` lists the rows above `tolerance`."""

    policy: str
    tolerance: float
    loss: float
    reference_loss: float
    rows: list

    @property
    def flagged(self) -> list:
        return [r for r in self.rows if not r.rel_error <= self.tolerance]  # NaN is flagged

    def table(self, only_flagged: bool = False) -> str:
        """The rows as Markdown, in execution order (outputs, loss, then gradients)."""
        lines = ["| tensor | kind | dtype | relative error | |", "|---|---|---|---|---|"]
        for r in self.flagged if only_flagged else self.rows:
            mark = "above tolerance" if not r.rel_error <= self.tolerance else ""
            lines.append(f"| {r.name} | {r.kind} | {r.dtype} | {r.rel_error:.2e} | {mark} |")
        return "\n".join(lines)

    def __str__(self):
        worst = max(self.rows, key=lambda r: np.nan_to_num(r.rel_error, nan=np.inf))
        head = (f"{self.policy} against float32, same weights and batch: loss {self.loss:.6g} "
                f"vs {self.reference_loss:.6g}; worst "
                f"{worst.kind if worst.kind == worst.name else worst.kind + ' ' + worst.name} "
                f"{worst.rel_error:.2e}; {len(self.flagged)} of {len(self.rows)} tensors above "
                f"tolerance {self.tolerance:g}")
        return head + ("\n" + self.table(only_flagged=True) if self.flagged else "")


_HALF_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def _float32_config(obj):
    if isinstance(obj, dict):
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            if obj["config"].get("name") in _HALF_POLICIES:
                return {**obj, "config": {**obj["config"], "name": "float32"}}
            return obj
        return {k: ("float32" if k == "dtype" and v in _HALF_POLICIES else _float32_config(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj


def float32_clone(model, x):
    """The model rebuilt from its config with every policy float32, holding its weights."""
    config = _float32_config(keras.saving.serialize_keras_object(model))
    config.pop("compile_config", None)  # compiled below with the model's loss only
    if isinstance(config.get("config"), dict) and config["config"].get("preprocessor"):
        config["config"]["preprocessor"] = None  # keras-hub tasks: tokenizer files not needed
    with global_policy("float32"):
        clone = keras.saving.deserialize_keras_object(config)
    if any(is_hardened(layer) for layer in flatten_layers(model)):
        harden(clone)  # the islands live in the layer objects, not in the config
    clone(x, training=False)  # builds subclassed models and layers
    clone.set_weights(model.get_weights())
    if getattr(model, "loss", None) is not None and isinstance(clone, keras.Model):
        clone.compile(loss=model.loss)
    return clone


def _numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32")), np.float64)


def _errors(pairs) -> list:
    """||a - b|| / max(||b||, floor), the floor 1e-3 of the largest ||b|| among `pairs`: a
    tensor that is zero in exact arithmetic (the gradient of an attention key bias: softmax
    ignores a constant added to a row) is judged against its peers, not its own rounding."""
    diffs = [(np.linalg.norm(_numpy(a) - _numpy(b)), np.linalg.norm(_numpy(b))) for a, b in pairs]
    floor = 1e-3 * max((n for _, n in diffs if np.isfinite(n)), default=0.0)
    return [float(d / max(n, floor)) if max(n, floor) > 0 else (0.0 if d == 0 else float("inf"))
            for d, n in diffs]


def _loss_scale(model) -> float:
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return 1.0
    if getattr(optimizer, "built", False):
        return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))
    return float(optimizer.initial_scale)


def parity_check(model, x, y=None, tolerance: float | None = None,
                 loss_scale: float | None = None) -> Parity:
    """Compares a mixed-precision model or layer with its float32 twin on the same weights.

    Args:
        model: keras.Model or keras.layers.Layer, built, serializable (`get_config`), under
            any policy. Compared on its compiled loss when `y` is given, otherwise on the
            sum of its outputs.
        x: the input batch. Use real data: the errors depend on it.
        y: targets for the compiled loss. Defaults to None.
        tolerance: float. Relative error above which a tensor is flagged. Defaults to
            `TOLERANCE[compute dtype]` (1e-2 for float16, 1e-1 for bfloat16).
        loss_scale: float. The model's gradients are taken of loss x scale, then divided by
            it, as a loss-scaled optimizer does. Defaults to None: the scale of the model's
            LossScaleOptimizer, or 1.

    Returns:
        A `Parity`: `print` it, or read `.rows` and `.flagged`.

    Raises:
        ValueError: if the float32 twin records other layer outputs than the model.

    Example:
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype="mixed_float16")])
    >>> x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    >>> parity_check(m, x).flagged
    []
    """
    compute = keras.backend.standardize_dtype(model.compute_dtype)
    policy = model.dtype_policy.name
    if compute == "float32":  # e.g. a float32 Functional holding mixed layers
        found = {layer.compute_dtype for _, layer in walk(model)}
        compute = next((d for d in ("float16", "bfloat16") if d in found), compute)
    tolerance = TOLERANCE.get(compute, 1e-2) if tolerance is None else tolerance
    reference = float32_clone(model, x)
    scale = _loss_scale(model) if loss_scale is None else float(loss_scale)
    loss, outs, _, grads = forward_backward(model, x, y, scale, training=False)
    grads = [None if g is None else keras.ops.cast(g, "float32") / scale for g in grads]
    ref_loss, ref_outs, _, ref_grads = forward_backward(reference, x, y, training=False)
    if [tuple(t.shape) for _, t in outs] != [tuple(t.shape) for _, t in ref_outs]:
        raise ValueError(f"parity_check: the float32 rebuild of {model.name} records "
                         f"{len(ref_outs)} layer outputs, the model {len(outs)}; the model's "
                         "config does not rebuild it (a layer made outside get_config?).")
    paths = layer_paths(model)
    std = keras.backend.standardize_dtype
    errors = _errors([(t, r) for (_, t), (_, r) in zip(outs, ref_outs)])
    rows = [ParityRow(paths[id(layer)], "output", std(t.dtype), e)
            for (layer, t), e in zip(outs, errors)]
    rows.append(ParityRow("loss", "loss", std(loss.dtype), _errors([(loss, ref_loss)])[0]))
    pairs = [(v, g, r) for v, g, r in zip(model.trainable_variables, grads, ref_grads)
             if g is not None]
    errors = _errors([(g, r) for _, g, r in pairs])
    rows += [ParityRow(v.path, "gradient", std(v.dtype), e) for (v, _, _), e in zip(pairs, errors)]
    return Parity(policy, tolerance, float(loss), float(ref_loss), rows)
