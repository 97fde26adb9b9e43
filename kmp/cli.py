"""The `kmp` command.

Nothing here imports Keras at module level: `--backend` must set KERAS_BACKEND before Keras
loads. User errors (`kmp.errors.UserError`) and runs that cannot go on
(`kmp.errors.TrainingStopped`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from kmp.errors import TrainingStopped, UserError

BACKENDS = ("tensorflow", "jax", "torch")  # kmp.backends.SUPPORTED, named without Keras
# Config fields a command does not use, so its --help does not offer them.
_RUN_ONLY = ("jit", "strategy", "processes", "prompt", "samples", "resume", "val_every",
             "val_batches", "recover", "max_skips", "spike_factor", "spike_window",
             "recover_attempts", "recover_stretch", "inject_fault", "float8")
_NOT_USED = {
    "bench": {"precision", "steps", "warmup_steps", *_RUN_ONLY},
    "memory": {"precision", "steps", "warmup_steps", "learning_rate", "weight_decay",
               "grad_clip", "dropout", "out", *_RUN_ONLY},
    "diagnose": {"steps", "warmup_steps", "grad_accum", *_RUN_ONLY},
}


def _set_backend(argv: list[str]) -> list[str]:
    """Takes `--backend NAME` (anywhere in argv) and sets KERAS_BACKEND before Keras loads."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--backend", choices=BACKENDS)
    known, rest = parser.parse_known_args(argv)
    if known.backend:
        if "keras" in sys.modules and sys.modules["keras"].backend.backend() != known.backend:
            raise UserError(f"--backend {known.backend}: Keras is already loaded with the "
                            f"{sys.modules['keras'].backend.backend()} backend in this process. "
                            "Choose the backend before Keras is imported.")
        os.environ["KERAS_BACKEND"] = known.backend
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    return rest


@contextlib.contextmanager
def _quiet_stderr():
    """Hides what native libraries write to stderr while loading (TensorFlow's start-up lines,
    which come before its log level is read); shows it again if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _load_quietly(command: str):
    """Imports the backend (and keras-hub, which imports TensorFlow whenever it is installed)
    before any output, so kmp's own lines come first and TensorFlow's start-up noise is gone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also hides the CPU-only cuInit error
    with _quiet_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow  # noqa: F401
        if command not in ("doctor",):
            import keras_hub  # noqa: F401


def _doctor(args) -> int:
    from kmp import backends
    from kmp.hardware import detect
    from kmp.policy import POLICIES, plan

    hw = detect()
    print(f"kmp doctor\n  hardware: {hw.describe()}")
    versions = ", ".join(f"{k} {v}" for k, v in backends.versions().items())
    print(f"  versions: {versions}; backend {backends.name()}")
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


def _quantize(args, rest) -> int:
    parser = argparse.ArgumentParser(
        prog="kmp quantize", description="Quantize a finished `kmp pretrain` run every way "
        "asked (Keras's int8, int4, GPTQ, AWQ) and measure each: validation loss, perplexity "
        "and its change, .keras size, the loss after a fresh load, forward tokens/s.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--modes", default="int8,int4,gptq,awq",
                        help="comma-separated: int8, int4, gptq, awq (default: all)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where <mode>.keras, quantize.json and quantize.md go")
    parser.add_argument("--calibration-batches", type=int, default=4,
                        help="training batches that calibrate GPTQ and AWQ (default: 4)")
    opts = parser.parse_args(rest)
    from kmp.gpt import quantize

    modes = quantize.parse_modes(opts.modes)
    if opts.calibration_batches < 1:
        raise UserError(f"--calibration-batches must be >= 1. Received: "
                        f"{opts.calibration_batches}")
    rows = quantize.quantize_run(opts.run, modes, opts.out, opts.calibration_batches)
    print(quantize.table(rows))
    print(f"written: {opts.out}/quantize.json, quantize.md and one .keras per mode")
    return 0


def _finetune(args, rest) -> int:
    parser = argparse.ArgumentParser(
        prog="kmp finetune", description="Quantization-aware fine-tuning of a finished `kmp "
        "pretrain` run: train on with fake-quantized int4 weights (straight-through "
        "gradients), quantize for real, and measure how much of int4's perplexity gap it "
        "recovers against post-training quantization and a float fine-tune of the same steps.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--qat", default="int4", help="the quantization to train for: int4")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default 200)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: a tenth of the run's)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where results go (default: <run>-qat-<mode> beside the run)")
    parser.add_argument("--points", type=int, default=4,
                        help="validation points along the fine-tuning (default 4)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the float fine-tune that QAT is compared with")
    opts = parser.parse_args(rest)
    from kmp.gpt import finetune

    result = finetune.finetune_run(opts.run, opts.out, opts.qat, opts.steps, opts.lr,
                                   not opts.no_control, opts.points)
    out = opts.out or f"{opts.run.rstrip('/')}-qat-{opts.qat}"
    print(finetune.table(result))
    print(f"written: {out}/finetune.json, finetune.md, finetune.png, qat-{opts.qat}.keras")
    return 0


def _export(args, rest) -> int:
    parser = argparse.ArgumentParser(
        prog="kmp export", description="Export a finished `kmp pretrain` run to a LiteRT "
        "(TFLite) file for devices (TensorFlow backend), run the file in the LiteRT "
        "interpreter on validation windows and write export.json beside it: size, largest "
        "logit difference against Keras, validation loss in Keras and in LiteRT.")
    parser.add_argument("--run", required=True, metavar="DIR", help="the run's --out directory")
    parser.add_argument("--format", default="litert", choices=["litert"],
                        help="the file format (litert, formerly TFLite)")
    parser.add_argument("--dtype", default="float32",
                        help="float32, float16, int8 (activations too, calibrated on the run's "
                        "training tokens) or int8-dynamic (weights only) (default float32)")
    parser.add_argument("--out", required=True, metavar="FILE.tflite", help="the file to write")
    parser.add_argument("--windows", type=int, default=16,
                        help="validation windows to compare on (default 16)")
    opts = parser.parse_args(rest)
    if opts.windows < 1:
        raise UserError(f"--windows must be >= 1. Received: {opts.windows}")
    from kmp.gpt import export

    r = export.export_run(opts.run, opts.out, opts.dtype, opts.windows)
    print(f"{opts.out}: {r['size_bytes'] / 1e6:.2f} MB ({r['dtype']}); over {r['windows']} "
          f"validation windows: loss {r['litert_val_loss']:.4f} in LiteRT, "
          f"{r['keras_val_loss']:.4f} in Keras; largest logit difference "
          f"{r['max_abs_logit_diff']:.3g}")
    print(f"written: {opts.out}, {Path(opts.out).with_name('export.json')}")
    return 0


def _bench(args, rest) -> int:
    import json

    from kmp.gpt import bench
    from kmp.gpt.config import add_arguments, from_args

    parser = argparse.ArgumentParser(
        prog="kmp bench", description="Train a GPT preset under each precision and XLA "
        "setting, interleaved in one process; print a table and write bench.json/bench.md "
        "to --out.")
    add_arguments(parser, exclude=_NOT_USED["bench"])
    parser.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16,auto",
                        help="comma-separated; auto adds the plan's pick")
    parser.add_argument("--xla", default="on,off", help="comma-separated XLA settings: on,off")
    parser.add_argument("--chunk", type=int, default=10, help="steps per turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--overhead", nargs="?", const="auto", metavar="POLICY",
                        help="instead: plain Keras against the kmp path under POLICY (auto)")
    parser.add_argument("--backends", metavar="B[:POLICY[:on|off]],...",
                        help="instead: one setting per Keras backend, each in its own process, "
                        "taking turns for --rounds rounds (e.g. tensorflow,jax,torch; the "
                        "policy defaults to that backend's auto)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per backend (--backends)")
    parser.add_argument("--peer", choices=("torch",), help="also train a PyTorch reference of "
                        "the same shape (autocast, GradScaler, torch.compile where XLA is on) in "
                        "the same process on the same batches, and give kmp's speed over it")
    opts = parser.parse_args(rest)
    config = from_args(opts)
    if opts.backends:
        runs = bench.parse_backend_runs(opts.backends)
        passed = _without(rest, ("--backends", "--rounds", "--repeats", "--policies", "--xla",
                                 "--out"))
        out = Path(config.out).expanduser()
        rows = bench.compare_backends(passed, runs, opts.rounds, out)
        table = bench.backends_markdown(rows, f"{config.preset}: batch {config.batch_size} x "
                                        f"{config.seq_len} tokens, {opts.rounds} rounds")
        print("\n" + table)
        out.mkdir(parents=True, exist_ok=True)
        (out / "backends.json").write_text(json.dumps(rows, indent=2))
        (out / "backends.md").write_text(table + "\n")
        print(f"\nwritten: {out / 'backends.json'}, {out / 'backends.md'}")
        return 0
    xla = []
    for word in opts.xla.split(","):
        if word not in ("on", "off"):
            raise UserError(f"Unknown --xla setting {word!r}. Use on, off or on,off.")
        xla.append(word == "on")
    for name, value in (("chunk", opts.chunk), ("repeats", opts.repeats),
                        ("warmup", opts.warmup)):
        if value < 1:
            raise UserError(f"--{name} must be a positive integer. Received: {value}")
    if opts.overhead:
        runs = bench.overhead(config, opts.overhead, opts.chunk, opts.repeats, opts.warmup)
        name, baseline = "overhead", "plain Keras"
    else:
        runs = bench.benchmark(config, opts.policies.split(","), xla, opts.chunk, opts.repeats,
                               opts.warmup, peer=opts.peer)
        name, baseline = "bench", "float32"
    from kmp.hardware import detect

    hw = detect().describe()
    title = (f"{config.preset}: batch {config.batch_size} x {config.seq_len} tokens, "
             f"{opts.repeats} x {opts.chunk} timed steps per run, on {hw}")
    table = bench.to_markdown(runs, title, baseline)
    problems = bench.check_losses(runs)
    table += "".join(f"\n\nwarning: {p}" for p in problems) or (
        "\n\nEvery run's loss fell, and kmp's final losses agree with float32's within 2%.")
    ratios = bench.peer_ratios(runs)
    if ratios:
        table += ("\n\n| precision | kmp (fastest) | tokens/s | peer (fastest) | tokens/s | "
                  "kmp / peer |\n|---|---|---|---|---|---|\n" + "\n".join(
                      f"| {p} | {a.label} | {a.tokens_per_sec:,.0f} | {b.label} | "
                      f"{b.tokens_per_sec:,.0f} | {q:.2f}x |" for p, a, b, q in ratios))
    print("\n" + table)
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(bench.to_json(runs, config, hw, baseline))
    (out / f"{name}.md").write_text(table + "\n")
    print(f"\nwritten: {out / (name + '.json')}, {out / (name + '.md')}")
    return 0


def _without(argv: list[str], names) -> list[str]:
    """argv without the options in `names` and their values (`--x v` or `--x=v`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in names:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _memory(args, rest) -> int:
    from kmp.gpt.config import add_arguments, from_args
    from kmp.gpt.memory import memory_table

    parser = argparse.ArgumentParser(
        prog="kmp memory", description="Estimate training memory of a GPT preset by policy "
        "(Korthikanti et al. 2022 activations, 16 bytes/param model states).")
    add_arguments(parser, exclude=_NOT_USED["memory"])
    parser.add_argument("--measure", action="store_true", help="also train a few steps under "
                        "each policy (XLA on) and print the GPU's measured peak beside the "
                        "estimate (needs a GPU)")
    opts = parser.parse_args(rest)
    config = from_args(opts)
    measured = None
    if opts.measure:
        from kmp import backends
        from kmp.gpt import bench
        from kmp.policy import POLICIES

        if backends.gpu_memory() is None:
            raise UserError("kmp memory --measure reads the GPU's peak memory and this "
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

    parser = argparse.ArgumentParser(
        prog=f"kmp {command}", description=f"{_DIAGNOSES[command]}; on a fresh GPT preset "
        "(under --precision) or a trained one (--run), with one batch of the corpus.")
    from kmp.gpt.config import GPTConfig, add_arguments, from_args

    add_arguments(parser, exclude=_NOT_USED["diagnose"])
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
            raise UserError(f"--run {opts.run!r} is not a finished kmp pretrain run (no "
                             "config.json and model.keras). Pass its --out directory.")
        given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(GPTConfig)
                 if getattr(opts, f.name, None) is not None}
        saved = json.loads((run / "config.json").read_text())
        if given.get("seq_len", saved["seq_len"]) > saved["seq_len"]:
            raise UserError(f"--seq-len {given['seq_len']} is longer than the model's maximum "
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
        print("\nattention probabilities, measured against a float64 softmax (ulp: unit in the "
              "last place of the compute dtype):")
        for row in diagnostics.attention_precision(model):
            print(f"  {row}")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="kmp", description="Keras mixed-precision kit.",
        epilog="--backend tensorflow|jax|torch (anywhere on the line) picks the Keras backend; "
        "default: $KERAS_BACKEND, else tensorflow.")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="the Keras backend (default: $KERAS_BACKEND, else tensorflow)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="show the hardware, the plan for each policy, and the pick")
    sub.add_parser("pretrain", add_help=False,
                   help="pretrain a GPT on a corpus (kmp pretrain --help lists the options)")
    sub.add_parser("bench", add_help=False,
                   help="compare precisions and XLA on a GPT preset (kmp bench --help)")
    sub.add_parser("memory", add_help=False,
                   help="estimate training memory of a GPT preset (kmp memory --help)")
    sub.add_parser("quantize", add_help=False,
                   help="quantize a trained GPT run and price each mode (kmp quantize --help)")
    sub.add_parser("export", add_help=False,
                   help="export a trained GPT run to LiteRT and check the file (kmp export "
                   "--help)")
    sub.add_parser("finetune", add_help=False,
                   help="quantization-aware fine-tuning of a trained GPT run (kmp finetune "
                   "--help)")
    for name, text in _DIAGNOSES.items():
        sub.add_parser(name, add_help=False, help=f"{text} (kmp {name} --help)")
    args, _ = parser.parse_known_args(argv)
    try:
        rest = _set_backend(argv)
        rest = rest[rest.index(args.command) + 1:]
        if args.command == "doctor" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        _load_quietly(args.command)
        if args.command in _DIAGNOSES:
            return _diagnose(args.command, rest)
        if args.command != "doctor":
            run = {"pretrain": _pretrain, "bench": _bench, "memory": _memory,
                   "quantize": _quantize, "finetune": _finetune,
                   "export": _export}[args.command]
            return run(args, rest)
        return _doctor(args)
    except UserError as e:  # the user's mistake: one line, exit 2
        flag = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"kmp: error: {flag}{e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a run that broke: what happened and what to try, one line
        print(f"kmp: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        print("kmp: this is a bug in kmp (or in a library it calls), not something you did "
              "wrong; please report it with the traceback below.", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
