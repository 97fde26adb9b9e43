"""Measures each kmp layer against a float32 reference; prints the table in docs/precision.md.

    python docs/layer_parity.py
"""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import test_layers as T  # noqa: E402  (the layer table, tolerances and helpers of the tests)

TRIALS = 5


def worst_errors(name, policy):
    make, shape = T.LAYERS[name]
    worst_out = worst_grad = 0.0
    for _ in range(TRIALS):
        rng = np.random.default_rng()
        x = rng.normal(size=shape).astype("float32")
        ref = make(dtype="float32")
        ref(x)
        if name.endswith("norm"):
            ref.set_weights([rng.normal(size=w.shape).astype("float32")
                             for w in ref.get_weights()])
        mixed = make(dtype=policy)
        mixed(x)
        mixed.set_weights(ref.get_weights())
        proj = tf.constant(rng.normal(size=ref.compute_output_shape(shape)).astype("float32"))
        y_ref, g_ref = T.forward_backward(ref, x, proj)
        y_mix, g_mix = T.forward_backward(mixed, x, proj)
        worst_out = max(worst_out, T.rel(y_mix, y_ref))
        worst_grad = max([worst_grad] + [T.rel(a, b) for a, b in zip(g_mix, g_ref)])
    return worst_out, worst_grad


if __name__ == "__main__":
    print("| layer | policy | max rel. error, output | max rel. error, gradients | test bound |")
    print("|---|---|---|---|---|")
    for name in T.LAYERS:
        for policy in T.POLICIES:
            out, grad = worst_errors(name, policy)
            print(f"| {name} | {policy} | {out:.1e} | {grad:.1e} | {T.TOL[policy]:.1e} |")
