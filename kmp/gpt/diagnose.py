"""`kmp audit | parity | trace | grads`: one diagnosis of a GPT and one batch of its corpus.

The GPT is a fresh preset (under --precision) or a finished `kmp pretrain` run's trained model
(--run, rebuilt by `kmp.gpt.run.open_run` under the policy it trained with, or the --precision
asked for); the batch is one validation batch of the corpus. The diagnoses themselves live in
`kmp.diagnostics`; this module chooses the model and the batch and prints what they report.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import keras
import numpy as np

import kmp
from kmp import diagnostics
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import RUN_ONLY, GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, lm_loss, make_optimizer
from kmp.gpt.run import open_run

DIAGNOSES = {
    "audit": "per-layer variable, compute and measured output dtypes, FP32 islands, "
             "Tensor Core shapes, and warnings for known traps",
    "parity": "the model under its policy against float32 with the same weights: relative "
              "error of every layer output, the loss and every gradient",
    "trace": "the first layer whose output or gradient is inf/NaN, forward and backward",
    "grads": "|gradient| against the float16 range: flush/subnormal/overflow shares, a "
             "suggested loss scale, gradients.png in --out",
}


def main(argv: list[str], command: str) -> int:
    """Runs the diagnosis `command` ("audit", "parity", "trace" or "grads") with the options in
    `argv` and prints its report.

    Args:
        argv: list of str. The options after `kmp COMMAND`.
        command: str. One of `DIAGNOSES`.

    Returns:
        0.

    Raises:
        UserError: for a --run that is not a finished run, a --seq-len longer than the run's
            model, or a bad config option.
    """
    parser = argparse.ArgumentParser(
        prog=f"kmp {command}", description=f"{DIAGNOSES[command]}; on a fresh GPT preset "
        "(under --precision) or a trained one (--run), with one batch of the corpus.")
    add_arguments(parser, exclude={"steps", "warmup_steps", "grad_accum", "remat", *RUN_ONLY})
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
    opts = parser.parse_args(argv)
    config, model, where, plan = _model(opts)
    kmp.compile(model, make_optimizer(config, model), lm_loss(), islands=config.attention)
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
        _grads(model, x, targets, Path(config.out).expanduser())
    return 0


def _model(opts):
    """(config, model, where it came from, precision plan): a fresh preset's model, or the
    --run's trained one, with the options given applied, under the precision asked for."""
    if not opts.run:
        config = from_args(opts)
        plan = kmp.set_policy(config.precision)
        keras.utils.set_random_seed(config.seed)
        return config, build_model(config), f"fresh {config.preset} GPT (seed {config.seed})", plan
    run = open_run(opts.run)
    given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(GPTConfig)
             if getattr(opts, f.name, None) is not None}
    longest = run.config.seq_len  # the position embedding's length
    if given.get("seq_len", longest) > longest:
        raise UserError(f"{given['seq_len']} is longer than the model's maximum {longest} (its "
                        f"position embedding). Use {longest} or less.", field="seq_len")
    # Unless asked otherwise, the policy the run trained under (a recovery's change included).
    config = dataclasses.replace(run.config, **{"precision": run.policy, **given})
    plan = kmp.set_policy(config.precision)
    model = run.model(plan.policy, preprocessor=False)  # token windows in, as trained
    return config, model, f"{run.dir} (trained)", plan


def _grads(model, x, targets, out: Path) -> None:
    """Prints the float32 twin's gradients against float16's range, unscaled and at the
    suggested loss scale, and writes gradients.png to `out`."""
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
    out.mkdir(parents=True, exist_ok=True)
    report.plot(out / "gradients.png")
    print(f"suggested initial loss scale: {scale:g}\nwritten: {out / 'gradients.png'}")
