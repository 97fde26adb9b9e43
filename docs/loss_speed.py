"""Training-step time with Keras's sparse crossentropy against kmp's NextTokenCrossentropy.

    python docs/loss_speed.py --preset small --precision mixed_bfloat16

First the losses alone: forward and backward on random float32 logits of the preset's batch
(batch x sequence x vocabulary), in a tf.function, median of 5. Then whole training steps: two
copies of the same GPT (same weights, same batches) are compiled the kmp way, one with each
loss, warmed up, then timed in turns of `--chunk` train_on_batch steps for `--repeats` rounds,
the order alternating. Prints the median step time of each and the first steps' losses (the
two losses compute the same function; they differ only in float32 rounding).
"""

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

import kmp
from kmp.gpt import NextTokenCrossentropy, build_model, build_token_cache, make_optimizer, preset
from kmp.gpt.data import window_batch


def time_alone(loss, config, repeats=5) -> float:
    """Median seconds of one forward and backward pass of `loss` on the preset's logits."""
    rng = np.random.default_rng()
    shape = (config.batch_size, config.seq_len)
    logits = tf.constant(rng.normal(size=(*shape, config.vocab_size)).astype("float32") * 3)
    labels = tf.constant(rng.integers(0, config.vocab_size, size=shape))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss(labels, logits)
        return value, tape.gradient(value, logits)

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()[1].numpy()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    config = preset(args.preset)
    plan = kmp.set_policy(args.precision)
    cache = build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    losses = {"keras SparseCategoricalCrossentropy":
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "kmp NextTokenCrossentropy": NextTokenCrossentropy()}
    for r in range(2):  # twice, alternating, as drift on the machine hits both alike
        for name in (list(losses) if r == 0 else list(losses)[::-1]):
            print(f"  alone, round {r + 1}: {name}: "
                  f"{1000 * time_alone(losses[name], config):.0f} ms forward + backward")
    keras.utils.set_random_seed(config.seed)
    models = {}
    for name, loss in losses.items():
        models[name] = build_model(config)
        kmp.compile(models[name], make_optimizer(config, models[name]), loss=loss,
                    weighted_metrics=[], jit_compile=plan.jit_compile)
    reference, other = models.values()
    other.set_weights(reference.get_weights())

    def steps(model, start, n):
        out = []
        for i in range(start, start + n):
            x, y = window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)
            x = tf.constant(x)
            out.append(float(model.train_on_batch(
                {"token_ids": x, "padding_mask": tf.ones_like(x)}, tf.constant(y))))
        return out

    first = {name: steps(model, 0, 3) for name, model in models.items()}  # compiles, warms up
    times = {name: [] for name in models}
    for r in range(args.repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            t = time.perf_counter()
            steps(models[name], 3 + r * args.chunk, args.chunk)
            times[name].append((time.perf_counter() - t) / args.chunk)
    base = statistics.median(times["keras SparseCategoricalCrossentropy"])
    print(f"{args.preset}, {plan.policy}, XLA {'on' if plan.jit_compile else 'off'}, "
          f"{args.repeats} x {args.chunk} steps each")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name}: {1000 * median:.0f} ms/step, {base / median:.2f}x; first losses "
              f"{', '.join(f'{v:.4f}' for v in first[name])}")


if __name__ == "__main__":
    main()
