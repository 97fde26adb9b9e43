"""The precision trial: the policy, XLA setting and attention kernel chosen by training.

Every candidate (policy x XLA setting x attention kernel) trains the model on this machine,
interleaved as `kmp bench` does: built from the same seed (the same initial weights), then on
the same batches in the same order with no learning-rate warm-up. The first (compiling) step
is timed apart, as the compilation; once all are compiled, `warmup` more steps each are
untimed (a model's first steps after other models ran are slow); then come rounds of `chunk`
timed steps whose order rotates. After each round a candidate that skipped a step (float16
loss scaling: an overflow) or whose loss is more than `LOSS_TOLERANCE` (relative) from
float32's after the same steps is rejected, and one more than `DROP_SLOWER` x slower than
the fastest left stops; the rounds end early when one is left. At the end a candidate whose
loss did not fall is rejected too; of the rest, those within `SPEED_MARGIN` of the fastest
(median step time) tie and the simplest wins (float32, then bfloat16, then float16).
Candidates the hardware rules make pointless (`kmp.policy.pointless`: float16 on a CPU, say)
are skipped unless the policies are named.

`kmp.model_tuning.tune` does this for your own Keras model (and `kmp.set_policy("auto",
measure=model_fn, data=...)` with it); `kmp.gpt.autotune` (`kmp tune`) for a GPT preset. Both
go through `measure`, which keeps the choice in `kmp.decisions`' cache per backend, device,
model and candidate set.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from kmp import decisions
from kmp.errors import UserError

# After the same steps from the same weights on the same batches, half precision's loss stays
# within a fraction of a percent of float32's when it computes correctly; 2% is `kmp bench`'s
# check (kmp.gpt.bench.check_losses), loose enough for noise and tight enough for a broken run.
LOSS_TOLERANCE = 0.02
# Chunk times on a shared 2-core CPU vary by a few percent between rounds: a candidate must be
# more than 5% faster than a simpler one to be chosen over it (float32 first, then bfloat16,
# which needs no loss scaling, then float16).
SPEED_MARGIN = 0.05
# A candidate more than 1.3x slower than the fastest after a round would need the machine's load
# to swing by a quarter between turns to end within 5% of it: it stops there.
DROP_SLOWER = 1.3
# Turns much shorter than a second on a shared machine measure its neighbours more than the
# candidate: small models take more steps per turn.
TURN_SECONDS = 1.0
_SIMPLER = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass
class Candidate:
    """One policy, XLA setting and attention kernel in the trial, and what it measured.

    Args:
        policy: str. The Keras dtype policy.
        jit: bool. The `jit_compile` setting.
        attention: str or None. "auto" until built, then "fused" or "island"; None: the
            model has no attention layers.
        verdict: str. Empty while it trains; then "rejected: ...", "dropped after round N:
            ...", "skipped by rule: ...", "accepted: ..." or "chosen: ...".
    """

    policy: str
    jit: bool
    attention: str | None = "auto"
    verdict: str = ""
    step_seconds: list = dataclasses.field(default_factory=list)  # per round, per step
    losses: list = dataclasses.field(default_factory=list)  # the last step's of each round
    first_loss: float | None = None
    compile_seconds: float | None = None
    timed_steps: int = 0
    skipped: int = 0

    @property
    def label(self) -> str:
        kernel = [self.attention] if self.attention not in (None, "auto") else []
        return ", ".join([self.policy, f"XLA {'on' if self.jit else 'off'}", *kernel])

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else self.first_loss


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What a precision trial chose, and why.

    Args:
        policy: str. The chosen Keras dtype policy.
        jit_compile: bool. The chosen XLA setting.
        attention: str or None. The chosen attention kernel ("fused", "island"; "fused" under
            float32; None for a model without attention layers).
        reason: str. One line: the choice against float32, and where it comes from.
        table: str. Every candidate: compile time, step time, throughput, losses, verdict.
        source: str. "measured" or "cached".
        seconds: float. How long the measurement took, compilations included (cached: the
            original's).
        compile_seconds: float. The part of `seconds` spent building and compiling.
    """

    policy: str
    jit_compile: bool
    attention: str | None
    reason: str
    table: str
    source: str
    seconds: float
    compile_seconds: float = 0.0

    def __str__(self):
        return f"{self.table}\n\nchosen: {self.reason}"


def candidates(policies=None, hardware=None) -> list[Candidate]:
    """Every (policy, XLA) pair the backend runs (`kmp.backends.jit_compile_for`), attention
    "auto". With `policies` None (all three), those the rules make pointless on `hardware`
    (`kmp.policy.pointless`: e.g. float16 on a CPU) are skipped, with the rule as verdict."""
    from kmp import backends
    from kmp.hardware import detect
    from kmp.policy import POLICIES, pointless

    hw = hardware or detect()
    xla = dict.fromkeys(backends.jit_compile_for(choice)[0] for choice in (True, False))
    cands = [Candidate(p, jit) for p in policies or POLICIES for jit in xla]
    for c in cands if policies is None else ():
        rule = pointless(c.policy, c.jit, hw)
        c.verdict = f"skipped by rule (name the policies to measure it): {rule}" if rule else ""
    return cands


def _train(model, batch, start: int, steps: int) -> float:
    """Trains batches start .. start+steps-1 with train_on_batch; the last one's loss."""
    for step in range(start, start + steps):
        model.reset_metrics()  # so the loss is this batch's, not a running mean
        loss = model.train_on_batch(*batch(step), return_dict=True)["loss"]
    return float(loss)


def _ready(model, cand: Candidate) -> None:
    """Resolves `cand.attention` to what the built model computes and builds the optimizer."""
    import keras

    from kmp._keras import flatten_layers
    from kmp.layers import attention_choices

    if cand.attention == "auto":  # resolved by measurement (kmp.harden)
        chosen = attention_choices(model)
        has = any(isinstance(layer, keras.layers.MultiHeadAttention)
                  for layer in flatten_layers(model, True))
        cand.attention = chosen[0].choice if chosen else ("fused" if has else None)
    # Keras's TensorFlow trainer builds the optimizer while tracing the first step and then
    # traces the step again, now without creating variables; built first, the step is traced
    # once, which saves about half of the first step on the GPT presets (keras 3.15.1).
    if model.built and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _loss_off(cands: list[Candidate], c: Candidate) -> tuple[float, int] | None:
    """How far `c`'s loss is from float32's (relative) after the last round both ran, and
    that round; None without a float32 loss to compare with."""
    base = [b for b in cands if b.policy == "float32" and b.losses]
    n = min(len(c.losses), max((len(b.losses) for b in base), default=0))
    if not n:
        return None
    ref = statistics.mean(b.losses[n - 1] for b in base if len(b.losses) >= n)
    return (abs(c.losses[n - 1] / ref - 1) if ref else float("inf")), n


def _rejection(cands: list[Candidate], c: Candidate, tolerance: float) -> str:
    """Why `c` is rejected so far (a skipped step, its loss off float32's), or ""."""
    off = _loss_off(cands, c)
    if c.skipped:
        return f"rejected: {c.skipped} skipped step(s) (overflow)"
    if off is not None and not off[0] <= tolerance:
        return (f"rejected: loss {off[0]:.1%} from float32's after round {off[1]} (tolerance "
                f"{tolerance:.0%})")
    return ""


def _prune(cands, models, done: int, drop: float, tolerance: float) -> None:
    """After round `done`: rejects the training candidates that skipped a step or whose loss
    left float32's, then drops those more than `drop` x slower than the fastest left."""
    from kmp.scaling import LossScaleOptimizer

    live = [c for c in cands if not c.verdict]
    for c in live:
        optimizer = models[id(c)].optimizer
        if isinstance(optimizer, LossScaleOptimizer):
            c.skipped = int(optimizer.state()["skipped_steps"])
        c.verdict = _rejection(cands, c, tolerance)
    live = [c for c in live if not c.verdict]
    fastest = min(live, key=lambda c: c.median_step, default=None)
    for c in live:
        if c.median_step > drop * fastest.median_step:
            c.verdict = (f"dropped after round {done}: {c.median_step / fastest.median_step:.2f}x "
                         f"the step time of {fastest.label} (limit {drop}x)")


def trial(build, batch, cands: list[Candidate], chunk: int = 2, repeats: int = 3,
          warmup: int = 1, drop: float = DROP_SLOWER, tolerance: float = LOSS_TOLERANCE,
          timer=time.perf_counter, log=print) -> list[Candidate]:
    """Trains the candidates interleaved and prunes them after each round (the module
    docstring says how). A candidate whose attention is the fused kernel under half precision
    gets an island twin.

    Args:
        build: callable. `build(candidate)` returns the model compiled for it (its policy,
            `jit_compile` and attention kernel).
        batch: callable. `batch(step)` returns the (x, y) or (x, y, sample_weight) of step
            `step`, the same for every candidate.
        cands: list of Candidate. Those with a verdict already are left alone.
        chunk: int. Steps per timed turn at least; up to 4x more where the fastest
            candidate's `warmup` steps say a turn would be shorter than `TURN_SECONDS`.
            Defaults to 2.
        repeats: int. Rounds at most. Defaults to 3.
        warmup: int. Untimed steps per candidate once all are compiled (a model's first
            steps after other models ran are slow). Defaults to 1.
        drop: float. Defaults to `DROP_SLOWER`.
        tolerance: float. Defaults to `LOSS_TOLERANCE`.
        timer: callable. The clock of the timed turns (a fake one in tests).
        log: callable. A progress line per candidate and round. Defaults to print.

    Returns:
        The candidates (twins included) with their measurements and verdicts so far.
    """
    cands, models, i = list(cands), {}, 0
    while i < len(cands):
        c, i = cands[i], i + 1
        if c.verdict:
            continue
        start = time.perf_counter()
        models[id(c)] = model = build(c)
        _ready(model, c)
        c.first_loss = _train(model, batch, 0, 1)
        c.compile_seconds = time.perf_counter() - start
        log(f"tune: {c.label}: built and compiled in {c.compile_seconds:.1f} s (the first "
            f"step, loss {c.first_loss:.3f})")
        if c.attention == "fused" and c.policy != "float32":  # is the island faster?
            cands.insert(i, Candidate(c.policy, c.jit, "island"))
    seconds = [math.inf]
    for c in (c for c in cands if not c.verdict and warmup):  # untimed: a model's first
        start = timer()  # steps after other models ran are slow (measured)
        _train(models[id(c)], batch, 1, warmup)
        seconds.append((timer() - start) / warmup)
    # Turns of TURN_SECONDS (up to 4 x chunk), the same steps for every candidate.
    chunk = min(4 * chunk, max(chunk, math.ceil(TURN_SECONDS / max(min(seconds), 1e-9))))
    for r in range(repeats):
        live = [c for c in cands if not c.verdict]
        if r and len(live) < 2:
            break
        for k in range(len(live)):
            c = live[(k + r) % len(live)]
            start = timer()
            c.losses.append(_train(models[id(c)], batch, 1 + warmup + r * chunk, chunk))
            c.step_seconds.append((timer() - start) / chunk)
            c.timed_steps += chunk
            log(f"tune: round {r + 1}/{repeats}: {c.label}: {1000 * c.step_seconds[-1]:,.0f} "
                f"ms/step, loss {c.losses[-1]:.3f}")
        _prune(cands, models, r + 1, drop if r + 1 < repeats else float("inf"), tolerance)
        for c in live:
            if c.verdict:
                log(f"tune: {c.label}: {c.verdict}")
    return cands


def choose(cands: list[Candidate], tolerance: float = LOSS_TOLERANCE,
           margin: float = SPEED_MARGIN) -> Candidate:
    """Gives every candidate still without one its verdict and returns the chosen one: a
    candidate is rejected when its loss did not fall, it skipped a step, or its loss is more
    than `tolerance` from float32's; of the accepted, those within `margin` of the fastest
    tie, and the simplest of them wins (float32, then bfloat16, then float16 with its loss
    scaling; the faster within a policy).

    Raises:
        UserError: when no float32 candidate ran (nothing to check the losses against) or
            none is accepted.
    """
    if not any(c.policy == "float32" and c.losses for c in cands):
        raise UserError("Tuning needs float32 among the policies: it is the reference the "
                        "others' losses are checked against. Add float32 to the policies.",
                        field="policies")
    for c in (c for c in cands if not c.verdict):
        if not c.final_loss < c.first_loss:
            c.verdict = (f"rejected: the loss did not fall ({c.first_loss:.3f} -> "
                         f"{c.final_loss:.3f})")
        else:
            c.verdict = _rejection(cands, c, tolerance) or (
                f"accepted: loss {_loss_off(cands, c)[0]:.2%} from float32's")
    accepted = [c for c in cands if c.verdict.startswith("accepted")]
    if not accepted:
        raise UserError("Tuning: no candidate trained correctly (see the table). Check the "
                        "model in float32 first (kmp parity for a GPT).")
    fastest = min(accepted, key=lambda c: c.median_step)
    near = [c for c in accepted if c.median_step <= fastest.median_step * (1 + margin)]
    best = min(near, key=lambda c: (_SIMPLER.index(c.policy), c.median_step))
    best.verdict = "chosen: " + best.verdict.removeprefix("accepted: ") + (
        ", the fastest" if best is fastest else
        f", within {margin:.0%} of the fastest ({fastest.label}) and simpler")
    return best


def to_markdown(cands: list[Candidate], title: str, per_step: tuple = (None, "")) -> str:
    """The candidates as a Markdown table; `per_step` is (items per step, their name), e.g.
    (4096, "tokens"), for a throughput column."""
    count, unit = per_step
    fastest32 = min((c.median_step for c in cands if c.policy == "float32" and c.step_seconds),
                    default=None)
    lines = [f"**{title}**", "", f"| candidate | compile (s) | median step (ms) | "
             f"{unit or 'steps'}/s | vs float32 | loss, first -> last | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in cands:
        if not c.step_seconds:
            lines.append(f"| {c.label} | - | - | - | - | - | {c.verdict} |")
            continue
        ratio = f"{fastest32 / c.median_step:.2f}x" if fastest32 else "-"
        built = "-" if c.compile_seconds is None else f"{c.compile_seconds:.1f}"
        lines.append(f"| {c.label} | {built} | {1000 * c.median_step:,.0f} | "
                     f"{(count or 1) / c.median_step:,.{0 if count else 2}f} | {ratio} | "
                     f"{c.first_loss:.3f} -> {c.final_loss:.3f} | {c.verdict} |")
    return "\n".join(lines)


def check_policies(policies) -> None:
    """Raises UserError, before any training, for an unknown policy or none of float32."""
    from kmp.policy import POLICIES

    unknown = [p for p in policies or () if p not in POLICIES]
    if unknown:
        raise UserError(f"Unknown policy {unknown[0]!r}. Use some of: {', '.join(POLICIES)}.",
                        field="policies")
    if policies is not None and "float32" not in policies:
        raise UserError(f"Tuning needs float32 among the policies (the reference the others' "
                        f"losses are checked against). Received: {','.join(policies)}.",
                        field="policies")


def measure(model: str, build, batch, per_step=(None, ""), policies=None, chunk: int = 2,
            repeats: int = 3, warmup: int = 1, use_cache: bool = True, hardware=None,
            timer=time.perf_counter, log=print) -> Tuning:
    """The cached choice for `model` on this backend and device from these candidates, else
    `trial`, `choose` and the cache.

    A trial of every policy is also kept as this machine's latest (model "any", which
    `kmp.set_policy("auto")` takes); one of fewer answers only the question it was asked.

    Args:
        model: str. Names the model's shape and batch: the cache key's model.
        build: callable. `trial`'s: `build(candidate)` returns the compiled model.
        batch: callable. `trial`'s: `batch(step)` returns that step's batch.
        per_step: tuple. `to_markdown`'s: (items per step, their name). Defaults to
            (None, ""): a steps/s column.
        policies: sequence of str or None. As `kmp.model_tuning.tune`'s. Defaults to None.
        chunk: int. As `trial`'s. Defaults to 2.
        repeats: int. As `trial`'s. Defaults to 3.
        warmup: int. As `trial`'s. Defaults to 1.
        use_cache: bool. Return a cached tuning when there is one. Defaults to True.
        hardware: Hardware or None. For the rules and the cache key. Defaults to
            `kmp.hardware.detect()`.
        timer: callable. The clock of the timed turns. Defaults to `time.perf_counter`.
        log: callable. Progress lines, then the table. Defaults to print.

    Returns:
        A `Tuning`, source "measured" or "cached".

    Raises:
        UserError: for an unknown policy or none of float32 (`check_policies`, before any
            training), or when no candidate trains correctly (`choose`).

    Example:
    >>> measure("m", None, None, policies=["mixed_bfloat16"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kmp.errors.UserError: Tuning needs float32 among the policies ...
    """
    from kmp import backends
    from kmp.hardware import STEAL_WARNING, cpu_ticks, detect, ticks_between
    from kmp.policy import POLICIES

    check_policies(policies)
    hw = hardware or detect()
    cands = candidates(policies, hw)
    asked = "; ".join(c.label for c in cands if not c.verdict)
    where = {**decisions.key("precision", hw, model=model), "candidates": asked}
    hit = decisions.lookup(where) if use_cache else None
    if hit is not None:
        tuning = Tuning(hit["policy"], hit["jit_compile"], hit["attention"], hit["reason"] +
                        " (cached)", hit["table"], "cached", hit["seconds"],
                        hit.get("compile_seconds", 0.0))
        log(f"tune: cached in {decisions.cache_path()}\n\n{tuning}")
        return tuning
    start, cpu = time.perf_counter(), cpu_ticks()
    cands = trial(build, batch, cands, chunk, repeats, warmup, timer=timer, log=log)
    best = choose(cands)
    seconds, (steal, total) = time.perf_counter() - start, ticks_between(cpu, cpu_ticks())
    compiling = sum(c.compile_seconds or 0 for c in cands)
    steps = sum(c.timed_steps for c in cands)
    chunk = max(c.timed_steps // len(c.step_seconds) for c in cands if c.step_seconds)
    log(f"tune: done in {seconds:.1f} s: {compiling:.1f} s building and compiling "
        f"{sum(c.compile_seconds is not None for c in cands)} candidates (their first steps), "
        f"{seconds - compiling:.1f} s training ({warmup} untimed step(s) each, {steps} timed)")
    fastest32 = min(c.median_step for c in cands if c.policy == "float32" and c.step_seconds)
    kernel = f", {best.attention} attention" if best.attention else ""
    reason = (f"{best.policy}, XLA {'on' if best.jit else 'off'}{kernel}: "
              f"{fastest32 / best.median_step:.2f}x the fastest float32's speed with its "
              f"loss within {LOSS_TOLERANCE:.0%}, measured on this machine ({model}) in "
              f"{seconds:.0f} s")
    table = to_markdown(cands, f"Tuning on {hw.describe()}, backend {backends.name()}: up to "
                        f"{repeats} turns of {chunk} timed steps per candidate", per_step)
    if total and steal / total >= STEAL_WARNING:
        table += (f"\n\nwarning: the hypervisor took {steal / total:.0%} of the CPU time "
                  "during this trial (steal, in /proc/stat), which slows the candidates by "
                  "different shares: the choice may not be this machine's. Tune again when the "
                  "host is quieter (`kmp tune --force`, or use_cache=False).")
    value = {"policy": best.policy, "jit_compile": best.jit, "attention": best.attention,
             "reason": reason, "table": table, "seconds": seconds,
             "compile_seconds": compiling, "model": model}
    decisions.record(where, value)
    if policies is None or set(policies) >= set(POLICIES):  # this machine's latest
        decisions.record(decisions.key("precision", hw, model="any"), value)
    tuning = Tuning(best.policy, best.jit, best.attention, reason, table, "measured", seconds,
                    compiling)
    log(f"\n{tuning}")
    return tuning
