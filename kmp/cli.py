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
    parser.add_argument("--measure", action="store_true", help="also train a few steps under "
                        "each policy (XLA on) and print the GPU's measured peak beside the "
                        "estimate (needs a GPU)")
    opts = parser.parse_args(rest)
    config = from_args(opts)
    measured = None
    if opts.measure:
        import tensorflow as tf

        from kmp import bench
        from kmp.policy import POLICIES

        if not tf.config.list_physical_devices("GPU"):
            raise ValueError("kmp memory --measure reads the GPU's peak memory and this "
                             "machine has no GPU. Drop --measure for the estimate alone.")
        runs = bench.benchmark(config, POLICIES, xla=(True,), chunk=2, repeats=1, warmup=1)
        measured = {run.policy: run.peak_memory for run in runs}
    print(f"{config.preset}: {config.num_layers} layers x {config.hidden_dim}, vocabulary "
          f"{config.vocab_size}, batch {config.batch_size} x {config.seq_len} tokens per device"
          f"{f', gradient accumulation {config.grad_accum}' if config.grad_accum > 1 else ''}")
    print(memory_table(config, measured))
    return 0


_DIAGNOSES = {
    "audit": "per-layer variable, compute and measured output dtypes, FP32 islands, "
             "Tensor Core shapes, and warnings for known traps",
    "parity": "the model under its policy against float32 with the same weights: relative "
              "error of every layer output, the loss and every gradient",
    "trace": "the first layer whose output or gradient is inf/NaN, forward and backward",
    "grads": "|gradient| against the float16 range: flush/subnormal/overflow shares, a "
             "suggested loss scale, gradients.png in --out",
}


def _diagnose(command, rest) -> int:
    """Runs one diagnosis on a GPT (a preset, or a `kmp pretrain` run) and a corpus batch."""
    import dataclasses
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog=f"kmp {command}", description=f"{_DIAGNOSES[command]}; on a fresh GPT preset "
        "(under --precision) or a trained one (--run), with one batch of the corpus.")
    from kmp.gpt.config import GPTConfig, add_arguments, from_args

    add_arguments(parser)
    parser.add_argument("--run", metavar="DIR", help="a `kmp pretrain` --out directory: "
                        "diagnose its trained weights, with its config.json under the given "
                        "options (e.g. another --precision)")
    if command in ("trace", "parity"):
        parser.add_argument("--loss-scale", type=float, default=None,
                            help="multiply the loss before the backward pass (default: 1 for "
                            "trace; for parity the optimizer's current loss scale)")
    if command == "parity":
        parser.add_argument("--tolerance", type=float, default=None,
                            help="relative error to flag (default: by compute dtype)")
    opts = parser.parse_args(rest)
    config = from_args(opts)
    if opts.run:
        run = Path(opts.run).expanduser()
        if not (run / "config.json").is_file() or not (run / "model.keras").is_file():
            raise ValueError(f"--run {opts.run!r} is not a finished kmp pretrain run (no "
                             "config.json and model.keras). Pass its --out directory.")
        given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(GPTConfig)
                 if getattr(opts, f.name, None) is not None}
        saved = json.loads((run / "config.json").read_text())
        if given.get("seq_len", saved["seq_len"]) > saved["seq_len"]:
            raise ValueError(f"--seq-len {given['seq_len']} is longer than the model's maximum "
                             f"{saved['seq_len']} (its position embedding). Use --seq-len "
                             f"{saved['seq_len']} or less.")
        config = dataclasses.replace(GPTConfig(**saved), **given)

    import keras
    import numpy as np

    import kmp
    from kmp import diagnostics
    from kmp.gpt import data
    from kmp.gpt.model import build_model, lm_loss, make_optimizer

    plan = kmp.set_policy(config.precision)
    keras.utils.set_random_seed(config.seed)
    model = build_model(dataclasses.replace(config, seq_len=saved["seq_len"]) if opts.run
                        else config)
    where = f"fresh {config.preset} GPT (seed {config.seed})"
    if opts.run:  # the trained weights, under the precision asked for
        model.load_weights(run / "model.keras")
        where = f"{run / 'model.keras'}"
    kmp.compile(model, make_optimizer(config, model), lm_loss())
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir)
    tokens, targets = data.window_batch(cache.val, config.seq_len, config.batch_size,
                                        config.seed, 0)
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    print(f"kmp {command}: {where}, {model.dtype_policy.name}, {config.num_layers} layers x "
          f"{config.hidden_dim}; one validation batch of {config.batch_size} x "
          f"{config.seq_len} tokens from {config.corpus} (plan: {plan.policy})\n")
    if command == "audit":
        print(diagnostics.audit(model, x))
    elif command == "parity":
        print(diagnostics.parity_check(model, x, targets, tolerance=opts.tolerance,
                                       loss_scale=opts.loss_scale))
    elif command == "trace":
        print(diagnostics.trace_nonfinite(model, x, targets, loss_scale=opts.loss_scale or 1.0))
    else:
        from kmp.diagnostics.parity import float32_clone

        print("gradients taken in float32 (the model's float32 twin, same weights), read "
              "against float16's range")
        report = diagnostics.gradient_histogram(float32_clone(model, x), x, targets)
        scale = report.suggested_scale()
        for name, at in (("unscaled", 1.0), (f"at the suggested loss scale 2^{np.log2(scale):.0f}",
                                             scale)):
            f = report.fractions(at)
            print(f"{name}: {f['flush_to_zero']:.2%} of nonzero gradients flush to zero in "
                  f"float16, {f['subnormal']:.2%} subnormal, {f['overflow']:.2%} overflow")
        out = Path(config.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        report.plot(out / "gradients.png")
        print(f"suggested initial loss scale: {scale:g}\nwritten: {out / 'gradients.png'}")
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
    for name, text in _DIAGNOSES.items():
        sub.add_parser(name, add_help=False, help=f"{text} (kmp {name} --help)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "doctor" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in _DIAGNOSES:
            return _diagnose(args.command, rest)
        if args.command != "doctor":
            run = {"pretrain": _pretrain, "bench": _bench, "memory": _memory}[args.command]
            return run(args, rest)
        return _doctor(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, exit 2
        print(f"kmp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
