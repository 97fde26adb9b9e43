"""`kmp tune`: the precision, XLA setting and attention kernel for a GPT, chosen by training it.

Every candidate (policy x XLA setting x attention kernel) trains the user's model on this
machine, interleaved as `kmp bench` does: the same initial weights, the same batches in the
same order, no learning-rate warm-up, turns of `chunk` steps whose order rotates every round,
the first (compiling) step and `warmup` more untimed. XLA settings are the ones the backend
takes (`kmp.backends.jit_compile_for`: both on TensorFlow, on under JAX, off under torch); the
attention kernels are the one `kmp.harden(attention="auto")` keeps for precision, and the
island too where that is the fused kernel.

A candidate is rejected when its loss did not fall, a step was skipped (float16 loss scaling:
an overflow), or its final loss is more than `LOSS_TOLERANCE` (relative) from float32's; of
the rest, those within `SPEED_MARGIN` of the fastest (median step time) tie and the simplest
wins (float32, then bfloat16, then float16). The choice is kept in `kmp.decisions`' cache
per backend, device and model shape, and as this machine's latest, so `kmp.set_policy("auto")`
uses it (and says so) where it would otherwise use the rule table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import keras

import kmp
from kmp import backends, decisions
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.bench import Run, _fit
from kmp.gpt.config import RUN_ONLY, GPTConfig, add_arguments, from_args
from kmp.gpt.model import build_model, lm_loss, make_optimizer
from kmp.hardware import detect
from kmp.layers import attention_choices
from kmp.policy import POLICIES
from kmp.scaling import LossScaleOptimizer

# After the same steps from the same weights on the same batches, half precision's loss stays
# within a fraction of a percent of float32's when it computes correctly; 2% is `kmp bench`'s
# check (kmp.gpt.bench.check_losses), loose enough for noise and tight enough for a broken run.
LOSS_TOLERANCE = 0.02
# Chunk times on a shared 2-core CPU vary by a few percent between rounds: a candidate must be
# more than 5% faster than a simpler one to be chosen over it (float32 first, then bfloat16,
# which needs no loss scaling, then float16).
SPEED_MARGIN = 0.05
_SIMPLER = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass
class Candidate(Run):
    """A `kmp.gpt.bench.Run` with the attention kernel, skipped steps and the verdict."""

    attention: str = "auto"
    skipped: int = 0
    verdict: str = ""

    @property
    def key(self) -> tuple:
        return (self.policy, self.jit, self.attention)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What `tune` chose, and why.

    Args:
        policy: str. The chosen Keras dtype policy.
        jit_compile: bool. The chosen XLA setting.
        attention: str. The chosen attention kernel ("fused", "island"; "fused" under float32).
        reason: str. One line: the choice against float32, and where it comes from.
        table: str. Every candidate: step time, tokens/s, losses, verdict (Markdown).
        source: str. "measured" or "cached".
        seconds: float. How long the measurement took (cached: the original's).
    """

    policy: str
    jit_compile: bool
    attention: str
    reason: str
    table: str
    source: str
    seconds: float

    def __str__(self):
        return f"{self.table}\n\nchosen: {self.reason}"


def model_key(config: GPTConfig) -> str:
    """The model shape a tuning holds for (and the batch, which sets the step's work)."""
    return (f"layers={config.num_layers} heads={config.num_heads} hidden={config.hidden_dim} "
            f"mlp={config.intermediate_dim} vocab={config.vocab_size} seq={config.seq_len} "
            f"batch={config.batch_size} logits={config.logits} remat={config.remat}")


def _key(model: str) -> dict:
    return decisions.key("precision", model=model)


def cached(model: str | None = None) -> dict | None:
    """The cached tuning for the model shape `model` on this machine and backend, or this
    machine's latest tuning for any model (None), or None when there is none."""
    return decisions.lookup(_key(model or "any"))


def candidates(policies=POLICIES) -> list[Candidate]:
    """Every (policy, XLA) pair the backend runs, attention "auto" (resolved when built)."""
    xla = dict.fromkeys(backends.jit_compile_for(choice)[0] for choice in (True, False))
    return [Candidate(f"{p}, XLA {'on' if jit else 'off'}", p, jit)
            for p in policies for jit in xla]


def _build(config: GPTConfig, cand: Candidate):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(cand.policy)
    try:
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
        kmp.compile(model, make_optimizer(config, model), lm_loss(), weighted_metrics=[],
                    jit_compile=cand.jit, islands=cand.attention)
    finally:
        keras.config.set_dtype_policy(previous)
    if cand.attention == "auto":  # resolved by measurement (kmp.harden)
        chosen = attention_choices(model)
        cand.attention = chosen[0].choice if chosen else "fused"
    cand.label = f"{cand.policy}, XLA {'on' if cand.jit else 'off'}, {cand.attention}"
    return model


def measure(config: GPTConfig, cands: list[Candidate], chunk: int = 3, repeats: int = 3,
            warmup: int = 1, timer=time.perf_counter, log=print) -> list[Candidate]:
    """Trains every candidate interleaved (see the module docstring); fills in step times,
    losses and skipped steps. A candidate whose kept attention is the fused kernel gets an
    island twin. `timer` is the clock (a fake one in tests)."""
    config = dataclasses.replace(config, warmup_steps=0)  # every measured step trains
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir, log=log)
    cands, built = list(cands), {}
    for cand in list(cands):
        built[id(cand)] = _build(config, cand)
        if cand.attention == "fused" and cand.policy != "float32":  # is the island faster?
            twin = dataclasses.replace(cand, attention="island", step_seconds=[])
            cands.insert(cands.index(cand) + 1, twin)
            built[id(twin)] = _build(config, twin)
    next_batch = [0] * len(cands)
    for i, cand in enumerate(cands):
        start = time.perf_counter()
        cand.first_loss = _fit(built[id(cand)], (), cache, config, next_batch, i, 1)
        log(f"tune: {cand.label}: first step (compilation) {time.perf_counter() - start:.1f} s")
    for i, cand in enumerate(cands):  # untimed: a model's first steps after another's are slow
        _fit(built[id(cand)], (), cache, config, next_batch, i, warmup)
    for r in range(repeats):
        for k in range(len(cands)):
            i = (k + r) % len(cands)
            start = timer()
            cands[i].final_loss = _fit(built[id(cands[i])], (), cache, config, next_batch, i,
                                       chunk)
            cands[i].step_seconds.append((timer() - start) / chunk)
    tokens = config.batch_size * config.seq_len
    for cand in cands:
        cand.tokens_per_sec = tokens / cand.median_step
        optimizer = built[id(cand)].optimizer
        if isinstance(optimizer, LossScaleOptimizer):
            cand.skipped = int(optimizer.state()["skipped_steps"])
    return cands


def choose(cands: list[Candidate], tolerance: float = LOSS_TOLERANCE,
           margin: float = SPEED_MARGIN) -> Candidate:
    """Gives every candidate its verdict and returns the chosen one: of the accepted, those
    within `margin` of the fastest tie, and the simplest of them wins (float32, then bfloat16,
    then float16 with its loss scaling; the faster within a policy).

    Raises:
        UserError: when no float32 candidate ran (nothing to check the losses against) or
            none is accepted.
    """
    base = [c for c in cands if c.policy == "float32"]
    if not base:
        raise UserError("kmp tune needs float32 among the policies: it is the reference the "
                        "others' losses are checked against. Add float32 to --policies.",
                        field="policies")
    ref = statistics.mean(c.final_loss for c in base)
    for c in cands:
        off = abs(c.final_loss / ref - 1) if ref else float("inf")
        if not c.final_loss < c.first_loss:
            c.verdict = (f"rejected: the loss did not fall ({c.first_loss:.3f} -> "
                         f"{c.final_loss:.3f})")
        elif c.skipped:
            c.verdict = f"rejected: {c.skipped} skipped step(s) (overflow)"
        elif not off <= tolerance:
            c.verdict = (f"rejected: final loss {off:.1%} from float32's (tolerance "
                         f"{tolerance:.0%})")
        else:
            c.verdict = f"accepted: final loss {off:.2%} from float32's"
    accepted = [c for c in cands if c.verdict.startswith("accepted")]
    if not accepted:
        raise UserError("kmp tune: no candidate trained correctly (see the table). Check the "
                        "model with kmp parity.")
    fastest = min(accepted, key=lambda c: c.median_step)
    near = [c for c in accepted if c.median_step <= fastest.median_step * (1 + margin)]
    best = min(near, key=lambda c: (_SIMPLER.index(c.policy), c.median_step))
    best.verdict = "chosen: " + best.verdict.removeprefix("accepted: ") + (
        ", the fastest" if best is fastest else
        f", within {margin:.0%} of the fastest ({fastest.label}) and simpler")
    return best


def to_markdown(cands: list[Candidate], title: str) -> str:
    fastest32 = min((c.median_step for c in cands if c.policy == "float32"), default=None)
    lines = [f"**{title}**", "", "| candidate | median step (ms) | tokens/s | vs float32 | "
             "loss, first -> last | verdict |", "|---|---|---|---|---|---|"]
    for c in cands:
        ratio = f"{fastest32 / c.median_step:.2f}x" if fastest32 else "-"
        lines.append(f"| {c.label} | {1000 * c.median_step:.0f} | {c.tokens_per_sec:,.0f} | "
                     f"{ratio} | {c.first_loss:.3f} -> {c.final_loss:.3f} | {c.verdict} |")
    return "\n".join(lines)


def tune(config: GPTConfig, policies=POLICIES, chunk: int = 3, repeats: int = 3,
         warmup: int = 1, use_cache: bool = True, timer=time.perf_counter,
         log=print) -> Tuning:
    """Chooses the policy, XLA setting and attention kernel for `config`'s model by training
    every candidate a few steps on this machine (see the module docstring), or returns the
    cached choice for this model shape, machine and backend.

    Args:
        config: GPTConfig. The model, batch and corpus.
        policies: sequence of str. Policies to try; float32 (the reference) must be one.
            Defaults to all three.
        chunk: int. Steps per timed turn. Defaults to 3.
        repeats: int. Timed turns per candidate. Defaults to 3.
        warmup: int. Untimed steps after the compiling one. Defaults to 1.
        use_cache: bool. Return a cached tuning when there is one. Defaults to True.
        timer: callable. The clock. Defaults to `time.perf_counter`.
        log: callable. Progress lines. Defaults to print.

    Returns:
        A `Tuning` (also recorded in the cache).

    Raises:
        UserError: without float32 among `policies`, or when no candidate is accepted.
    """
    model = model_key(config)
    hit = cached(model) if use_cache else None
    if hit is not None:
        return Tuning(hit["policy"], hit["jit_compile"], hit["attention"],
                      hit["reason"] + " (cached)", hit["table"], "cached", hit["seconds"])
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise UserError(f"Unknown policy {unknown[0]!r}. Use some of: {', '.join(POLICIES)}.",
                        field="policies")
    if "float32" not in policies:  # before any training: choose() needs it
        raise UserError(f"kmp tune needs float32 among the policies (the reference the others' "
                        f"losses are checked against). Received: {','.join(policies)}.",
                        field="policies")
    start = time.perf_counter()
    cands = measure(config, candidates(policies), chunk, repeats, warmup, timer, log)
    best = choose(cands)
    fastest32 = min(c.median_step for c in cands if c.policy == "float32")
    seconds = time.perf_counter() - start
    reason = (f"{best.policy}, XLA {'on' if best.jit else 'off'}, {best.attention} attention: "
              f"{fastest32 / best.median_step:.2f}x the fastest float32's tokens/s with its "
              f"loss within {LOSS_TOLERANCE:.0%}, measured by kmp tune on this machine "
              f"({model}) in {seconds:.0f} s")
    table = to_markdown(cands, f"kmp tune on {detect().describe()}, backend "
                        f"{backends.name()}: {repeats} x {chunk} timed steps per candidate")
    value = {"policy": best.policy, "jit_compile": best.jit, "attention": best.attention,
             "reason": reason, "table": table, "seconds": seconds, "model": model}
    decisions.record(_key(model), value)
    decisions.record(_key("any"), value)  # this machine's latest, for set_policy("auto")
    return Tuning(best.policy, best.jit, best.attention, reason, table, "measured", seconds)


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
        "with float32's, cache it for set_policy('auto') and print why.")
    add_arguments(parser, exclude={"precision", "steps", "warmup_steps", "attention",
                                   *RUN_ONLY})
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    parser.add_argument("--chunk", type=int, default=3, help="steps per timed turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per candidate")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per candidate")
    parser.add_argument("--force", action="store_true", help="measure again, ignoring the cache")
    opts = parser.parse_args(argv)
    for name in ("chunk", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"{name} must be a positive integer. Received: "
                            f"{name}={getattr(opts, name)}", field=name)
    config = from_args(opts)
    tuning = tune(config, opts.policies.split(","), opts.chunk, opts.repeats,
                  max(opts.warmup, 0), use_cache=not opts.force)
    print(f"\n{tuning}\ncache: {decisions.cache_path()}")
    return 0
