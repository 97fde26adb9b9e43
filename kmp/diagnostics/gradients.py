"""Gradient histograms against the float16 range, and the loss scale they call for.

For a model and a batch, the gradients of the loss with respect to every trainable variable and
every layer output (activation gradients, as in Figure 3 of Micikevicius et al. 2017) are taken
once in the model's own precision. Gradients scale linearly with the loss, so the fractions that
would flush to zero (|g| < 2^-24, float16's smallest subnormal), land in float16's subnormal
range (2^-24 <= |g| < 2^-14) or overflow (|g| > 65504) are then read off for any loss scale.
Run it on a float32 (or bfloat16) model to see what float16 would do to its gradients.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kmp._keras import layer_paths
from kmp.diagnostics.tracing import forward_backward

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL_EXP = -24
FP16_MIN_NORMAL_EXP = -14


@dataclasses.dataclass
class GradientReport:
    """Absolute gradient values of one batch, by name (variables and layer outputs)."""

    magnitudes: dict  # name -> 1-D float64 array of |g|, zeros included
    kinds: dict  # name -> "variable" or "activation"

    def _values(self, kind=None) -> np.ndarray:
        parts = [v for k, v in self.magnitudes.items() if kind in (None, self.kinds[k])]
        return np.concatenate(parts) if parts else np.zeros(0)

    def fractions(self, scale: float = 1.0, kind: str | None = None) -> dict:
        """Shares of the nonzero |g|·scale that flush, are subnormal, or overflow in float16."""
        v = self._values(kind) * scale
        v = v[v > 0]
        n = max(len(v), 1)
        return {
            "zero": 1.0 - len(v) / max(len(self._values(kind)), 1),
            "flush_to_zero": float((v < 2.0**FP16_MIN_SUBNORMAL_EXP).sum() / n),
            "subnormal": float(((v >= 2.0**FP16_MIN_SUBNORMAL_EXP)
                                & (v < 2.0**FP16_MIN_NORMAL_EXP)).sum() / n),
            "overflow": float((v > FP16_MAX).sum() / n),
        }

    def suggested_scale(self, margin: float = 2.0) -> float:
        """The largest power of two keeping max|g|·scale·margin below 65504 (at most 2^24)."""
        top = float(self._values().max()) if self._values().size else 0.0
        if top == 0.0:
            return 2.0**24
        return 2.0 ** min(24, math.floor(math.log2(FP16_MAX / (top * margin))))

    def table(self, scale: float = 1.0) -> str:
        """Per-name fractions at `scale` as Markdown."""
        lines = ["| gradient of | kind | flush to zero | subnormal | overflow |",
                 "|---|---|---|---|---|"]
        for name, mags in self.magnitudes.items():
            f = GradientReport({name: mags}, {name: self.kinds[name]}).fractions(scale)
            lines.append(f"| {name} | {self.kinds[name]} | {f['flush_to_zero']:.1%} | "
                         f"{f['subnormal']:.1%} | {f['overflow']:.1%} |")
        return "\n".join(lines)

    def plot(self, path, scale: float | None = None):
        """PNG of the log2|g| histogram (activation and variable gradients) against float16."""
        from matplotlib.figure import Figure  # not pyplot: no global backend change

        scale = self.suggested_scale() if scale is None else scale
        bins = np.arange(-60, 21)
        fig = Figure(figsize=(8, 4), dpi=120)
        ax = fig.subplots()
        for kind in ("activation", "variable"):
            v = self._values(kind)
            v = v[v > 0]
            if v.size:
                ax.hist(np.log2(v), bins=bins, alpha=0.6, label=f"{kind} gradients",
                        weights=np.full(v.size, 100.0 / v.size))
        for x, text in ((FP16_MIN_SUBNORMAL_EXP, "2^-24: below, flushed to zero"),
                        (FP16_MIN_NORMAL_EXP, "2^-14: subnormal below"),
                        (math.log2(FP16_MAX), "65504: overflow above")):
            ax.axvline(x, color="red", ls="--", lw=1)
            ax.text(x, ax.get_ylim()[1] * 0.95, " " + text, rotation=90, va="top", fontsize=7)
        shift = math.log2(scale)
        ax.axvline(FP16_MIN_SUBNORMAL_EXP - shift, color="green", ls=":", lw=1.5,
                   label=f"flush threshold at loss scale 2^{shift:.0f}")
        ax.set_xlabel("log2 |gradient| (unscaled)")
        ax.set_ylabel("% of nonzero values")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(path)


def gradient_histogram(model, x, y=None) -> GradientReport:
    """Collects |g| for every trainable variable and every layer output of one batch.

    Args:
        model: keras.Model. Its compiled loss is used when `y` is given; otherwise the
            sum of its outputs.
        x: the input batch. y: targets for the compiled loss. Defaults to None.

    Returns:
        A `GradientReport`.

    Example:
    >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> report = gradient_histogram(m, np.ones((4, 2), "float32"))
    >>> report.suggested_scale() > 1
    True
    """
    loss, outputs, out_grads, var_grads = forward_backward(model, x, y)
    paths = layer_paths(model)
    magnitudes, kinds = {}, {}

    def add(name, kind, g):
        if g is None:
            return
        key = name if name not in magnitudes else f"{name} #{len(magnitudes)}"
        g = keras.ops.convert_to_numpy(keras.ops.cast(g, "float32"))
        magnitudes[key] = np.abs(g.astype(np.float64)).ravel()
        kinds[key] = kind

    for (layer, _), g in zip(outputs, out_grads):
        add(paths[id(layer)], "activation", g)
    for v, g in zip(model.trainable_variables, var_grads):
        add(v.path, "variable", g)
    return GradientReport(magnitudes, kinds)
