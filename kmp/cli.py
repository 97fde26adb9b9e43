"""The `kmp` command."""

from __future__ import annotations

import argparse
import os
import sys


def _doctor(args) -> int:
    from kmp.hardware import detect
    from kmp.policy import POLICIES, plan

    hw = detect()
    print(f"kmp doctor\n  hardware: {hw.describe()}")
    import keras
    import tensorflow as tf

    print(f"  versions: keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"backend {keras.backend.backend()}")
    print("  plans:")
    for name in POLICIES:
        p = plan(name, hw)
        note = f"  [warning: {p.warning}]" if p.warning else ""
        xla = "on " if p.jit_compile else "off"
        scaling = "yes" if p.loss_scaling else "no "
        print(f"    {name:<15} XLA {xla}  loss scaling {scaling}{note}")
    best = plan("auto", hw)
    print(f"  recommendation: {best}")
    print('  use it: kmp.set_policy("auto")')
    return 0


def _pretrain(args, rest) -> int:
    from kmp.recipes import pretrain_gpt

    return pretrain_gpt.main(rest)


def _bench(args, rest) -> int:
    from pathlib import Path

    from kmp import bench
    from kmp.gpt.config import add_arguments, from_args

    parser = argparse.ArgumentParser(
        prog="kmp bench", description="Train a GPT preset under each precision and XLA "
        "setting, interleaved in one process; print a table and write bench.json/bench.md "
        "to --out.")
    add_arguments(parser)
    parser.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16,auto",
                        help="comma-separated; auto adds the plan's pick")
    parser.add_argument("--xla", default="on,off", help="comma-separated XLA settings: on,off")
    parser.add_argument("--chunk", type=int, default=10, help="steps per turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--overhead", nargs="?", const="auto", metavar="POLICY",
                        help="instead: plain Keras against the kmp path under POLICY (auto)")
    opts = parser.parse_args(rest)
    config = from_args(opts)
    xla = []
    for word in opts.xla.split(","):
        if word not in ("on", "off"):
            raise ValueError(f"Unknown --xla setting {word!r}. Use on, off or on,off.")
        xla.append(word == "on")
    for name, value in (("chunk", opts.chunk), ("repeats", opts.repeats),
                        ("warmup", opts.warmup)):
        if value < 1:
            raise ValueError(f"--{name} must be a positive integer. Received: {value}")
    if opts.overhead:
        runs = bench.overhead(config, opts.overhead, opts.chunk, opts.repeats, opts.warmup)
        name, baseline = "overhead", "plain Keras"
    else:
        runs = bench.benchmark(config, opts.policies.split(","), xla, opts.chunk, opts.repeats,
                               opts.warmup)
        name, baseline = "bench", "float32"
    from kmp.hardware import detect

    hw = detect().describe()
    title = (f"{config.preset}: batch {config.batch_size} x {config.seq_len} tokens, "
             f"{opts.repeats} x {opts.chunk} timed steps per run, on {hw}")
    table = bench.to_markdown(runs, title, baseline)
    print("\n" + table)
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(bench.to_json(runs, config, hw, baseline))
    (out / f"{name}.md").write_text(table + "\n")
    print(f"\nwritten: {out / (name + '.json')}, {out / (name + '.md')}")
    return 0


def _memory(args, rest) -> int:
    from kmp.diagnostics import memory_table
    from kmp.gpt.config import add_arguments, from_args

    parser = argparse.ArgumentParser(
        prog="kmp memory", description="Estimate training memory of a GPT preset by policy "
        "(Korthikanti et al. 2022 activations, 16 bytes/param model states).")
    add_arguments(parser)
    config = from_args(parser.parse_args(rest))
    print(f"{config.preset}: {config.num_layers} layers x {config.hidden_dim}, vocabulary "
          f"{config.vocab_size}, batch {config.batch_size} x {config.seq_len} tokens per device"
          f"{f', gradient accumulation {config.grad_accum}' if config.grad_accum > 1 else ''}")
    print(memory_table(config))
    return 0


def main(argv=None) -> int:
    """Entry point of the `kmp` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="kmp", description="Keras mixed-precision kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="show the hardware, the plan for each policy, and the pick")
    sub.add_parser("pretrain", add_help=False,
                   help="pretrain a GPT on a corpus (kmp pretrain --help lists the options)")
    sub.add_parser("bench", add_help=False,
                   help="compare precisions and XLA on a GPT preset (kmp bench --help)")
    sub.add_parser("memory", add_help=False,
                   help="estimate training memory of a GPT preset (kmp memory --help)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("pretrain", "bench", "memory"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in ("pretrain", "bench", "memory"):
            run = {"pretrain": _pretrain, "bench": _bench, "memory": _memory}[args.command]
            return run(args, rest)
        return {"doctor": _doctor}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, exit 2
        print(f"kmp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
