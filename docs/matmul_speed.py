"""The same matmuls in TensorFlow and in PyTorch, in one process: the `small` GPT's shapes.

    python docs/matmul_speed.py

For each (m x k) @ (k x n) of a `small` training step (the logits, their two gradients, the
feed-forward and attention projections) and each dtype, prints the median time of 20 calls in
TensorFlow (a `tf.function`, oneDNN) and in PyTorch (eager, oneDNN), each on the machine's
default threads. docs/benchmarks.md has the results.
"""

import statistics
import time

import numpy as np
import tensorflow as tf
import torch

SHAPES = [(4096, 256, 8192), (4096, 8192, 256), (256, 4096, 8192), (4096, 256, 1024),
          (4096, 1024, 256), (4096, 256, 256)]


def median_ms(fn, calls=20):
    fn(), fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    rng = np.random.default_rng(0)
    print("| m x k x n | dtype | TensorFlow (ms) | PyTorch (ms) | TensorFlow / PyTorch time |")
    print("|---|---|---|---|---|")
    for m, k, n in SHAPES:
        a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
        for dtype in ("float32", "bfloat16"):
            ta, tb = tf.constant(a, dtype), tf.constant(b, dtype)
            product = tf.function(lambda: tf.matmul(ta, tb))  # noqa: B023 (called right here)
            pa, pb = (torch.tensor(x, dtype=getattr(torch, dtype)) for x in (a, b))
            tf_ms = median_ms(product)
            torch_ms = median_ms(lambda: pa @ pb)  # noqa: B023
            print(f"| {m} x {k} x {n} | {dtype} | {tf_ms:.1f} | {torch_ms:.1f} | "
                  f"{tf_ms / torch_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
