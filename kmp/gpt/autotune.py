"""`kmp tune`: the precision, XLA setting and attention kernel for a GPT, chosen by training it.

The trial is `kmp.tuning`'s (the module docstring there says how candidates are trained,
pruned and chosen) on the GPT preset's own model and batch: batches from the token cache in
the order `kmp bench` reads them, no learning-rate warm-up. XLA settings are the ones the
backend takes (`kmp.backends.jit_compile_for`: both on TensorFlow, on under JAX, off under
torch); the attention kernels are the one `kmp.harden(attention="auto")` keeps for
precision, and the island too where that is the fused kernel. The choice is kept in
`kmp.decisions`' cache per backend, device, model shape and candidate set, and, when every
policy was in the running, as this machine's latest, so `kmp.set_policy("auto")` uses it (and
says so) where it would otherwise use the rule table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import keras
import numpy as np

import kmp
from kmp import decisions
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import RUN_ONLY, GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, lm_loss, make_optimizer
from kmp.policy import POLICIES, global_policy
from kmp.tuning import Candidate, Tuning, check_policies, measure


def model_key(config: GPTConfig) -> str:
    """The model shape a tuning holds for (and the batch, which sets the step's work)."""
    return (f"layers={config.num_layers} heads={config.num_heads} hidden={config.hidden_dim} "
            f"mlp={config.intermediate_dim} vocab={config.vocab_size} seq={config.seq_len} "
            f"batch={config.batch_size} logits={config.logits} remat={config.remat}")


def _build(config: GPTConfig, cand: Candidate):
    with global_policy(cand.policy):
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
        kmp.compile(model, make_optimizer(config, model), lm_loss(), weighted_metrics=[],
                    jit_compile=cand.jit, islands=cand.attention)
    return model


def tune(config: GPTConfig, policies=None, chunk: int = 2, repeats: int = 3,
         warmup: int = 1, use_cache: bool = True, hardware=None, timer=time.perf_counter,
         log=print) -> Tuning:
    """Chooses the policy, XLA setting and attention kernel for `config`'s model by training
    every candidate a few steps on this machine (`kmp.tuning`), or returns the cached choice
    for this model shape, machine, backend and candidate set.

    Args:
        config: GPTConfig. The model, batch and corpus.
        policies: sequence of str or None. Policies to try; float32 (the reference) must be
            one. Defaults to None: all three, less those the hardware rules make pointless
            here (`kmp.policy.pointless`; named policies are all measured).
        chunk: int. Steps per timed turn at least (`kmp.tuning.trial`: up to 4x more for a
            model whose turn would last under a second). Defaults to 2.
        repeats: int. Rounds at most (candidates clearly slower stop earlier). Defaults to 3.
        warmup: int. Untimed steps per candidate once all are compiled (a model's first
            steps after other models ran are slow). Defaults to 1.
        use_cache: bool. Return a cached tuning when there is one. Defaults to True.
        hardware: Hardware or None. For the rules and the cache key. Defaults to
            `kmp.hardware.detect()`.
        timer: callable. The clock of the timed turns. Defaults to `time.perf_counter`.
        log: callable. Progress lines, then the table. Defaults to print.

    Returns:
        A `kmp.tuning.Tuning` (also recorded in the cache).

    Raises:
        UserError: for an unknown policy or none of float32, or when no candidate is accepted.

    Example (a minute or two on a 2-core CPU, so not run by the tests):
    >>> tune(kmp.gpt.preset("small")).policy  # doctest: +SKIP
    'mixed_bfloat16'
    """
    check_policies(policies)  # before the token cache, which may take a while to build
    config = dataclasses.replace(config, warmup_steps=0)  # every measured step trains
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir, log=log)

    def batch(step):
        x, y = data.window_batch(cache.train, config.seq_len, config.batch_size, config.seed,
                                 step)
        return {"token_ids": x, "padding_mask": np.ones_like(x)}, y

    return measure(model_key(config), lambda cand: _build(config, cand), batch,
                   (config.batch_size * config.seq_len, "tokens"), policies, chunk, repeats,
                   warmup, use_cache, hardware, timer, log)


def main(argv: list[str]) -> int:
    """`kmp tune`: measures (or reads the cached) choice for a GPT preset and prints why.

    Args:
        argv: list of str. The options after `kmp tune`.

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(
        prog="kmp tune", description="Train a GPT preset a few steps under every precision, "
        "XLA setting and attention kernel, interleaved; keep the fastest whose loss agrees "
        "with float32's, cache it for set_policy('auto') and print why. Candidates clearly "
        "slower after a round stop there.")
    add_arguments(parser, exclude={"precision", "steps", "warmup_steps", "attention",
                                   *RUN_ONLY})
    parser.add_argument("--policies", help="comma-separated, each measured at every XLA "
                        f"setting (default: {','.join(POLICIES)}, less those the hardware "
                        "rules make pointless here, e.g. float16 on a CPU)")
    parser.add_argument("--chunk", type=int, default=2, help="steps per timed turn, at least "
                        "(up to 4x more when a turn would last under a second)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds at most")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per candidate "
                        "once all are compiled")
    parser.add_argument("--force", action="store_true", help="measure again, ignoring the cache")
    opts = parser.parse_args(argv)
    for name in ("chunk", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"{name} must be a positive integer. Received: "
                            f"{name}={getattr(opts, name)}", field=name)
    config = from_args(opts)
    tune(config, opts.policies.split(",") if opts.policies else None, opts.chunk, opts.repeats,
         max(opts.warmup, 0), use_cache=not opts.force)
    print(f"cache: {decisions.cache_path()}")
    return 0
