"""One change to kmp's TensorFlow step against the step without it, in one process.

    python docs/kernel_ab.py small mixed_bfloat16 kernels      # kmp.backends.kernel on / off
    python docs/kernel_ab.py small mixed_bfloat16 kernel:layer_norm   # one of them on / off
    python docs/kernel_ab.py small mixed_bfloat16 xla-update   # AdamW's update under XLA
    python docs/kernel_ab.py tiny float32 fusible              # XLA clusters of element-wise ops
    python docs/kernel_ab.py tiny float32 lr-once              # kmp's AdamW against Keras's

Builds the recipe's GPT twice from the same seed (A: without the change, B: with it), traces
each model's step under its own setting, then trains both on the same batches in alternating
turns (ROUNDS turns of CHUNK steps, environment variables, 4 and 5 by default) and prints each
one's median step time (wall and process CPU time), B's speed-up over A and the largest
relative difference of their per-step losses. XLA is off in both (the recipe's choice on
CPUs). docs/benchmarks.md has the results.
"""

import os
import statistics
import sys
import time

# Which ops an auto-clustering may take, read when TensorFlow starts ("fusible" only).
os.environ.setdefault("TF_XLA_FLAGS", "--tf_xla_cpu_global_jit --tf_xla_ops_to_cluster=FUSIBLE")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kmp  # noqa: E402
from kmp import backends  # noqa: E402
from kmp.gpt import build_model, build_token_cache, lm_loss, make_optimizer, preset  # noqa: E402
from kmp.gpt.data import window_batch  # noqa: E402

CHANGES = ("kernels", "kernel:NAME", "xla-update", "fusible", "lr-once")


def update_under_xla(optimizer):
    """Compiles the optimizer's update (clipping, weight decay, AdamW) with XLA."""
    original, compiled = optimizer._backend_apply_gradients, {}

    def apply(grads, variables):
        key = tuple(map(id, variables))
        if key not in compiled:
            compiled[key] = tf.function(lambda g: original(g, variables), jit_compile=True,
                                        autograph=False)
        return compiled[key](list(grads))

    optimizer._backend_apply_gradients = apply


def main():
    name, policy, change = sys.argv[1:4]
    only = change.partition("kernel:")[2]  # one kernel of kmp.backends.kernel, by name
    if change not in CHANGES and not only:
        sys.exit(f"change must be one of {', '.join(CHANGES)}; got {change!r}")
    config = preset(name)
    kmp.set_policy(policy)
    cache = build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    own_kernel = backends.kernel

    def step(model, i):
        x, y = window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)
        model.reset_metrics()
        return float(model.train_on_batch({"token_ids": x, "padding_mask": np.ones_like(x)},
                                          y, return_dict=True)["loss"])

    def build(with_change):
        if with_change or not (change == "kernels" or only):
            backends.kernel = own_kernel
        else:  # A: without kmp's kernels, or without the one named
            backends.kernel = lambda n: None if n == only or not only else own_kernel(n)
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
        optimizer = make_optimizer(config, model)
        if with_change and change == "xla-update":
            update_under_xla(optimizer)
        if not with_change and change == "lr-once":  # A: Keras's AdamW, the schedule per variable
            optimizer.__class__ = keras.optimizers.AdamW
        tf.config.optimizer.set_jit("autoclustering" if with_change and change == "fusible"
                                    else False)
        kmp.compile(model, optimizer, loss=lm_loss(), weighted_metrics=[], jit_compile=False)
        first = step(model, 0)  # traced and instantiated under this setting
        tf.config.optimizer.set_jit(False)
        backends.kernel = own_kernel
        return model, [first]

    runs = {"A": build(False), "B": build(True)}
    rounds, chunk = int(os.environ.get("ROUNDS", 4)), int(os.environ.get("CHUNK", 5))
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for model, losses in runs.values():
        losses += [step(model, i) for i in (1, 2)]
    for r in range(rounds):
        for k in (("A", "B") if r % 2 == 0 else ("B", "A")):
            model, losses = runs[k]
            t, c = time.perf_counter(), time.process_time()
            losses += [step(model, 3 + r * chunk + i) for i in range(chunk)]
            wall[k].append((time.perf_counter() - t) / chunk)
            cpu[k].append((time.process_time() - c) / chunk)
    for k in runs:
        print(f"{k}: median step {1000 * statistics.median(wall[k]):.1f} ms, CPU "
              f"{1000 * statistics.median(cpu[k]):.1f} ms")
    a, b = runs["A"][1], runs["B"][1]
    speed = statistics.median(wall["A"]) / statistics.median(wall["B"])
    work = statistics.median(cpu["A"]) / statistics.median(cpu["B"])
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"{name}, {policy}, {change}: speed-up {speed:.3f}x (CPU time {work:.3f}x); "
          f"largest relative loss difference {worst:.1e}")


if __name__ == "__main__":
    main()
