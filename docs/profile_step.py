"""Where a training step's time goes: TensorFlow op time by op type, from the TF profiler.

    python docs/profile_step.py --preset small --precision mixed_bfloat16

Builds the recipe's GPT under the policy (kmp.compile, the recipe's loss and XLA setting unless
--jit/--no-jit), runs 3 warm-up steps, profiles `--steps` train_on_batch steps and prints the
wall time per step and the time per step of each op type, summed over TensorFlow's executor
threads (so on several cores the column can add up to more than the wall time). Matmul-type
ops are what bfloat16/float16 speed up; the rest is elementwise work, casts, reductions and
the optimizer.
"""

import argparse
import collections
import glob
import re
import tempfile
import time

import keras
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import kmp
from kmp.gpt import build_model, build_token_cache, lm_loss, make_optimizer, preset
from kmp.gpt.data import window_batch

MATMULS = ("MatMul", "Einsum", "BatchMatMul", "Conv")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--by", choices=("type", "scope", "name"), default="type",
                        help="group by op type, or by the op's top name scope and type "
                             "(which layer or the optimizer spent it), or by op name with "
                             "layer numbers dropped")
    args = parser.parse_args()
    config = preset(args.preset)
    plan = kmp.set_policy(args.precision)
    jit = plan.jit_compile if args.jit is None else args.jit
    cache = build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config)
    kmp.compile(model, make_optimizer(config, model), loss=lm_loss(), weighted_metrics=[],
                jit_compile=jit)

    def step(i):
        x, y = window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)
        x = tf.constant(x)
        float(model.train_on_batch({"token_ids": x, "padding_mask": tf.ones_like(x)},
                                   tf.constant(y), return_dict=True)["loss"])

    for i in range(3):
        step(i)
    logdir = tempfile.mkdtemp(prefix="kmp-profile-")
    tf.profiler.experimental.start(logdir)
    t = time.perf_counter()
    for i in range(args.steps):
        step(3 + i)
    wall = (time.perf_counter() - t) / args.steps
    tf.profiler.experimental.stop()

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    by_type = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor threads that run ops
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and not name.startswith("ExecutorState"):  # "op name:OpType"
                    op, kind = name.rsplit(":", 1)
                    if args.by == "scope":
                        scopes = [p for p in op.split("/") if "PartitionedCall" not in p]
                        kind = f"{scopes[0] if len(scopes) > 1 else '(top)'} {kind}"
                    elif args.by == "name":
                        scopes = [p for p in op.split("/") if "PartitionedCall" not in p]
                        kind = re.sub(r"_\d+", "", "/".join(scopes[-3:])) + f" {kind}"
                    by_type[kind] += event.duration_ps / 1e9 / args.steps
    total = sum(by_type.values())
    matmul = sum(ms for op, ms in by_type.items()
                 if any(m in op.split()[-1] for m in MATMULS))
    print(f"{config.preset}, {plan.policy}, XLA {'on' if jit else 'off'}: {1000 * wall:.0f} ms "
          f"per step (wall); op time {total:.0f} ms per step, of which matmuls {matmul:.0f} ms "
          f"({matmul / total:.0%})")
    for op, ms in by_type.most_common(args.top):
        print(f"  {op:40s} {ms:7.1f} ms  {ms / total:5.1%}")


if __name__ == "__main__":
    main()
