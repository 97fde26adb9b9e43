"""The same matmuls in TensorFlow and in PyTorch, in one process: a GPT preset's shapes.

    python docs/matmul_speed.py                       # small, one matmul per call
    python docs/matmul_speed.py --preset tiny --chain 10

For each (m x k) @ (k x n) of a training step of the preset (the logits, their two
gradients, the feed-forward and attention projections) and each dtype, prints the median time
of 20 calls in TensorFlow (a `tf.function`, oneDNN) and in PyTorch (eager), each on the
machine's default threads. `--chain N` runs N matmuls per call, each waiting on the one before
(in TensorFlow one graph; both libraries add one element-wise pass over the left operand to
make the wait), and prints the time per matmul: the kernels' own speed, with little of the
cost of a call. docs/benchmarks.md has the results.
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf
import torch

from kmp.gpt.config import PRESETS, preset


def shapes(name):
    """The (m, k, n) of the preset's step: the logits, their input and embedding gradients,
    the feed-forward in and out, and the attention projections."""
    c = preset(name)
    tokens, width = c.batch_size * c.seq_len, c.hidden_dim
    vocab, inner = c.vocab_size, c.intermediate_dim
    return [(tokens, width, vocab), (tokens, vocab, width), (width, tokens, vocab),
            (tokens, width, inner), (tokens, inner, width), (tokens, width, width)]


def median_ms(fn, calls=20):
    fn(), fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--chain", type=int, default=1, help="matmuls per call (default 1)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| m x k x n | dtype | TensorFlow (ms) | PyTorch (ms) | TensorFlow / PyTorch time |")
    print("|---|---|---|---|---|")
    for m, k, n in shapes(args.preset):
        a, b = rng.normal(size=(m, k)), rng.normal(size=(k, n))
        for dtype in ("float32", "bfloat16"):
            ta, tb = tf.constant(a, dtype), tf.constant(b, dtype)
            pa, pb = (torch.tensor(x, dtype=getattr(torch, dtype)) for x in (a, b))

            @tf.function
            def product():
                out = tf.matmul(ta, tb)  # noqa: B023 (called right here)
                for _ in range(args.chain - 1):  # the next product waits on this one's first entry
                    out = tf.matmul(ta + out[0, 0] * 0, tb)  # noqa: B023
                return out

            def torch_product():
                out = pa @ pb  # noqa: B023
                for _ in range(args.chain - 1):  # the same extra element-wise pass as TensorFlow's
                    out = (pa + out[0, 0] * 0) @ pb  # noqa: B023

            tf_ms = median_ms(product) / args.chain
            torch_ms = median_ms(torch_product) / args.chain
            print(f"| {m} x {k} x {n} | {dtype} | {tf_ms:.2f} | {torch_ms:.2f} | "
                  f"{tf_ms / torch_ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
