"""Precision audit: what every layer stores, computes in and really returns, and known traps.

The output dtype is measured by running the model once (a policy can say float16 while a layer
casts its result: keras-hub GPT-2's logits are float32 under mixed_float16). Matmul shapes are
checked against the Tensor Core rule for half precision: dimensions that are multiples of 8
(NVIDIA Deep Learning Performance Guide, "Matrix Multiplication Background").
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kmp._keras import own_variables, recorded_outputs, walk
from kmp.errors import UserError
from kmp.layers.harden import attention_choices
from kmp.layers.head import LMHead
from kmp.layers.islands import _Float32Island

HALF = ("float16", "bfloat16")
_UPCASTING = (keras.layers.LayerNormalization, keras.layers.BatchNormalization)  # keras's own


@dataclasses.dataclass(frozen=True)
class LayerAudit:
    """One layer: its dtypes, island status, own parameters and Tensor Core fit (rows come
    in the order the layers' calls finished: inner layers before the layer holding them)."""

    path: str
    kind: str
    variable_dtype: str
    compute_dtype: str
    output_dtypes: tuple  # measured; empty if the layer was not called
    island: bool
    params: int
    tensor_cores: str  # "yes", "no (dims ...)", or "-" where the layer has no matmul


@dataclasses.dataclass
class Audit:
    """What `audit` found: one row per layer and the warnings, most serious first."""

    layers: list
    warnings: list
    model_output_dtypes: tuple
    attention: tuple = ()  # kmp.layers.AttentionChoice: what kmp.harden kept, and why

    def table(self) -> str:
        """The rows as a Markdown table."""
        lines = ["| layer | class | variables | compute | output (measured) | FP32 island | "
                 "params | Tensor Core shapes |", "|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(f"| {r.path} | {r.kind} | {r.variable_dtype} | {r.compute_dtype} | "
                         f"{', '.join(r.output_dtypes) or 'not called'} | "
                         f"{'yes' if r.island else ''} | {r.params:,} | {r.tensor_cores} |")
        return "\n".join(lines)

    def __str__(self):
        warn = "\n".join(f"warning: {w}" for w in self.warnings) or "no warnings"
        kernels = "".join(f"\nattention kernel: {c}" for c in self.attention)
        return f"{self.table()}\n\nmodel output dtype(s): " \
               f"{', '.join(self.model_output_dtypes)}{kernels}\n{warn}"


def sample_inputs(model, batch: int = 2, length: int = 16, seed: int = 0):
    """Random inputs shaped like `model.inputs` (unknown dims: `batch`, then `length`);
    integer inputs are 0 or 1, valid for any embedding or mask."""
    rng = np.random.default_rng(seed)

    def one(spec):
        shape = [d if d is not None else (batch if i == 0 else length)
                 for i, d in enumerate(spec.shape)]
        if keras.backend.is_int_dtype(spec.dtype) or spec.dtype == "bool":
            return rng.integers(0, 2, size=shape).astype(spec.dtype)
        return rng.normal(size=shape).astype(spec.dtype)

    try:
        specs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    except (AttributeError, ValueError, IndexError, TypeError):
        raise UserError(f"audit: {type(model).__name__} has no known inputs. "
                         "Pass a batch: audit(model, x).") from None
    return keras.tree.map_structure(one, specs)


def _own_params(layer) -> int:
    return int(sum(math.prod(v.shape) for v in own_variables(layer)))


def _tensor_cores(layer) -> str:
    if isinstance(layer, keras.layers.Embedding):
        dims = tuple(layer.embeddings.shape) if layer.built else ()
    elif getattr(layer, "kernel", None) is not None and len(layer.kernel.shape) >= 2:
        shape = tuple(layer.kernel.shape)
        # Convolutions multiply over channels; dense/einsum kernels as (inputs, last dim).
        if isinstance(layer, keras.layers.Conv1D | keras.layers.Conv2D | keras.layers.Conv3D):
            dims = shape[-2:]
        else:
            dims = (math.prod(shape[:-1]), shape[-1])
    else:
        return "-"
    if not dims:
        return "-"
    odd = [d for d in dims if d % 8]
    return "yes" if not odd else f"no ({' x '.join(map(str, dims))})"


def _is_island(layer, model_compute: str) -> bool:
    if isinstance(layer, (_Float32Island, LMHead)):  # kmp.layers: float32 inside
        return True
    if model_compute in HALF and isinstance(layer, _UPCASTING):
        return True
    return model_compute in HALF and layer.compute_dtype == "float32"


def _is_softmax(layer) -> bool:
    if isinstance(layer, keras.layers.Softmax):
        return True
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) == "softmax"


def _probability_losses(model) -> list:
    """Names of the compiled crossentropy losses that take probabilities (from_logits=False)."""
    found = []
    for loss in keras.tree.flatten(getattr(model, "loss", None)):
        if loss is None:
            continue
        name = loss if isinstance(loss, str) else getattr(loss, "name", None) or getattr(
            loss, "__name__", type(loss).__name__)
        if "crossentropy" not in str(name):
            continue
        from_logits = getattr(loss, "from_logits", None)
        if from_logits is None:
            from_logits = getattr(loss, "_fn_kwargs", {}).get("from_logits", False)
        if not from_logits:
            found.append(str(name))
    return found


def audit(model, x=None) -> Audit:
    """Audits a model's precision layer by layer, measuring output dtypes on one batch.

    Warnings name known traps: half-precision probabilities fed to a crossentropy with
    `from_logits=False` (Keras cannot recover the logits through the cast, so the loss is
    clipped at -log(1e-7) = 16.1 per sample), a softmax computed in half precision, float16
    without a loss-scaled optimizer, and half-precision matmuls whose shapes miss Tensor Cores.

    Args:
        model: keras.Model. Any Keras model, compiled or not (the loss is checked if compiled).
        x: the model's input batch. Defaults to None: random inputs shaped like `model.inputs`.

    Returns:
        An `Audit` (`print` it, or use `.table()`, `.layers`, `.warnings`).

    Example:
    >>> m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    >>> audit(m).layers[0].output_dtypes
    ('float32',)
    """
    x = sample_inputs(model) if x is None else x
    with recorded_outputs(model) as outputs:
        y = model(x, training=False)
    measured = {}
    for layer, t in outputs:
        measured.setdefault(id(layer), [])
        dtype = keras.backend.standardize_dtype(t.dtype)
        if dtype not in measured[id(layer)]:
            measured[id(layer)].append(dtype)
    model_out = tuple(keras.backend.standardize_dtype(t.dtype) for t in keras.tree.flatten(y))
    compute = model.compute_dtype
    order = {}
    for i, (layer, _) in enumerate(outputs):
        order.setdefault(id(layer), i)
    layers = sorted((pl for pl in walk(model) if not isinstance(pl[1], keras.layers.InputLayer)),
                    key=lambda pl: order.get(id(pl[1]), len(outputs)))  # as calls finished
    rows, warnings, half_softmax, odd_shapes = [], [], [], []
    for path, layer in layers:
        row = LayerAudit(path, type(layer).__name__, layer.variable_dtype,
                         layer.compute_dtype, tuple(measured.get(id(layer), ())),
                         _is_island(layer, compute), _own_params(layer), _tensor_cores(layer))
        rows.append(row)
        if _is_softmax(layer) and not row.island and set(row.output_dtypes) & set(HALF):
            half_softmax.append(row.path)
        if row.tensor_cores.startswith("no") and row.compute_dtype in HALF:
            odd_shapes.append(f"{row.path} {row.tensor_cores[3:]}")
    probability_losses = _probability_losses(model)
    if probability_losses and set(model_out) & set(HALF):
        warnings.append(
            f"the model returns {'/'.join(sorted(set(model_out) & set(HALF)))} probabilities "
            f"to {', '.join(probability_losses)} with from_logits=False: the loss is clipped "
            "at -log(1e-7) = 16.1 per sample, and a clipped sample gives no gradient. Return "
            "float32 logits (a float32 last layer, kmp.layers.LMHead) with from_logits=True.")
    if half_softmax:
        warnings.append(f"softmax in half precision in {', '.join(half_softmax)}: compute it "
                        "in float32 (kmp.layers.Softmax or a float32 layer; kmp.harden(model) "
                        "does it for attention).")
    optimizer = getattr(model, "optimizer", None)
    if compute == "float16" and optimizer is not None and not isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer):
        warnings.append("float16 compute without a loss-scaled optimizer: small gradients "
                        "flush to zero. Compile with kmp.compile(model, optimizer, loss).")
    if odd_shapes:
        warnings.append("matmul dims not multiples of 8 miss Tensor Cores: "
                        + "; ".join(odd_shapes) + ". Pad them (e.g. the vocabulary to 64).")
    return Audit(rows, warnings, model_out, tuple(attention_choices(model)))
