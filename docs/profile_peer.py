"""Where the torch peer's training step spends its time: torch.profiler CPU time by op.

    python docs/profile_peer.py --preset tiny --precision mixed_bfloat16

Builds `kmp.peers.torch_gpt.TorchPeer` for the preset (eager), runs 3 warm-up steps, times
`--steps` steps, profiles as many again and prints the wall time per step, the operators' self
CPU time per step and the largest operators (the counterpart of docs/profile_step.py for kmp's
TensorFlow step).
"""

import argparse
import time

import torch

from kmp.gpt import build_token_cache, preset
from kmp.gpt.data import window_batch
from kmp.peers.torch_gpt import TorchPeer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    config = preset(args.preset, warmup_steps=0)
    cache = build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    peer = TorchPeer(config, args.precision)
    batches = [window_batch(cache.train, config.seq_len, config.batch_size, config.seed, i)
               for i in range(3 + args.steps)]
    for x, y in batches[:3]:
        peer.train_step(x, y)
    start = time.perf_counter()
    for x, y in batches[3:]:
        peer.train_step(x, y)
    plain = (time.perf_counter() - start) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for x, y in batches[3:]:
            peer.train_step(x, y)
        wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
    print(f"{args.preset}, {args.precision}: {plain * 1e3:.1f} ms/step wall "
          f"({config.batch_size * config.seq_len / plain:,.0f} tokens/s), {wall * 1e3:.1f} ms "
          f"under the profiler; operators' self CPU time {self_total:.1f} ms/step")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:<40} {e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms/step")


if __name__ == "__main__":
    main()
