"""`kmp bench`: every precision side by side on one machine, in one process, interleaved.

Each (policy, XLA) run gets its own model built under its policy, compiled the kmp way, and
warmed up (compilation excluded). Then the runs take turns, `chunk` steps at a time, for
`repeats` rounds, the order rotating every round, so machine drift hits all runs alike. Steps
are `train_on_batch` calls on batches from the token cache (the input pipeline is not timed;
the recipe's Throughput callback measures it with the model). A run's step time is the median
over its chunks of the mean step time in the chunk. `benchmark` gives ratios to float32 with
the same XLA setting; `overhead` gives the kmp path's ratio to plain Keras. On Linux each run
also records the hypervisor's steal time during its timed chunks; the report warns when it
reached 10% (speeds measured then are not the machine's: docs/benchmarks.md).

The steps are real training: every run starts from the same initial weights, reads the same
batches in the same order, and trains without learning-rate warm-up, so its loss must fall
from the first step to the last and the runs' final losses must agree (`check_losses`); a run
that computes wrongly shows there, not only a slow one.

`main` is the command, with its options; `--backends` (one process per Keras backend) lives in
`kmp.gpt.crossbackend`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import keras
import numpy as np

from kmp import backends
from kmp.callbacks import PrecisionMonitor
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import RUN_ONLY, GPTConfig, add_arguments, from_args
from kmp.gpt.memory import state_bytes
from kmp.gpt.model import build_model, flops_per_token, lm_loss, make_optimizer
from kmp.hardware import STEAL_WARNING, cpu_ticks, detect, peak_flops, ticks_between
from kmp.policy import POLICIES, global_policy
from kmp.policy import plan as make_plan
from kmp.training import compile as kmp_compile

# Why a CPU run shows no peak memory (ru_maxrss only grows; a reset peak would count pages freed
# by other runs' models and reused by this one as nothing).
CPU_MEMORY = ("not measured on CPU: the process's memory holds every run's model and the "
              "allocator's freed pages, so no figure would be one run's own (kmp memory "
              "estimates it)")


@dataclasses.dataclass
class Run:
    """One benchmarked configuration and what was measured for it."""

    label: str
    policy: str
    jit: bool
    path: str = "kmp"  # or "keras": plain model.compile
    step_seconds: list = dataclasses.field(default_factory=list)  # per chunk, per step
    first_loss: float | None = None
    final_loss: float | None = None
    peak_memory: int | None = None
    memory_kind: str = ""
    tokens_per_sec: float | None = None
    mfu: float | None = None
    ratio: float | None = None
    steal: float | None = None  # the hypervisor's share of the CPU during the timed chunks

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)

    def row(self) -> dict:
        return {"run": self.label, "policy": self.policy, "xla": self.jit,
                "median_step_ms": 1000 * self.median_step,
                "step_ms": [1000 * s for s in self.step_seconds],
                "tokens_per_sec": self.tokens_per_sec,
                "mfu": self.mfu, "peak_memory_mib": (self.peak_memory / 2**20
                                                     if self.peak_memory else None),
                "memory_kind": self.memory_kind, "first_loss": self.first_loss,
                "final_loss": self.final_loss, "ratio": self.ratio, "cpu_steal": self.steal}


def _runs(policies, xla, peer=None) -> list[Run]:
    runs = []
    for name in policies:
        if name == "auto":
            p = make_plan("auto")
            runs.append(Run(f"auto = {p.policy}, XLA {'on' if p.jit_compile else 'off'}",
                            p.policy, p.jit_compile))
            continue
        if name not in POLICIES:
            raise UserError(f"Unknown policy {name!r}. Use some of: auto, {', '.join(POLICIES)}.",
                            field="policies")
        for jit in xla:
            runs.append(Run(f"{name}, XLA {'on' if jit else 'off'}", name, jit))
    if peer is not None:  # the peer at every precision kmp runs, compiled where XLA is on
        for policy in dict.fromkeys(r.policy for r in runs):
            for jit in xla:
                runs.append(Run(f"{peer} peer: {policy}, compile {'on' if jit else 'off'}",
                                policy, jit, path=peer))
    return runs


def loss_reference(runs: list[Run]) -> tuple[str, list[Run]]:
    """The runs whose final losses the others' are checked against, and what they are: kmp's
    and plain Keras's float32 runs ("float32's"), else the plain Keras runs ("plain Keras's");
    ("", []) when neither ran. A peer starts from other weights and is never a reference."""
    base = [r for r in runs if r.policy == "float32" and r.path in ("kmp", "keras")]
    if base:
        return "float32's", base
    base = [r for r in runs if r.path == "keras"]
    return ("plain Keras's", base) if base else ("", [])


def check_losses(runs: list[Run], tolerance: float = 0.02) -> list[str]:
    """What is wrong with the runs' losses: a run whose loss did not fall, or a kmp or plain
    Keras run whose final loss is more than `tolerance` (relative) from the mean of the
    `loss_reference` runs'. Empty when all is well."""
    problems = [f"{r.label}: the loss did not fall ({r.first_loss:.4f} -> {r.final_loss:.4f})"
                for r in runs if not r.final_loss < r.first_loss]
    name, base = loss_reference(runs)
    if base:
        ref = sum(r.final_loss for r in base) / len(base)
        for r in (r for r in runs if r.path in ("kmp", "keras")):
            off = abs(r.final_loss / ref - 1)
            if not off <= tolerance:
                problems.append(f"{r.label}: final loss {r.final_loss:.4f} is {off:.1%} from "
                                f"{name} {ref:.4f} (tolerance {tolerance:.0%})")
    return problems


def loss_summary(runs: list[Run], tolerance: float = 0.02) -> str:
    """One line per problem `check_losses` finds, or a line saying what was checked and
    against what.

    Example:
    >>> print(loss_summary([Run("a", "mixed_bfloat16", False, first_loss=2.0, final_loss=1.0)]))
    Every run's loss fell (no float32 or plain Keras run ran to compare final losses with).
    """
    problems = check_losses(runs, tolerance)
    if problems:
        return "\n\n".join(f"warning: {p}" for p in problems)
    name, base = loss_reference(runs)
    if not base:
        return ("Every run's loss fell (no float32 or plain Keras run ran to compare final "
                "losses with).")
    return f"Every run's loss fell, and the final losses agree with {name} within {tolerance:.0%}."


def benchmark(config: GPTConfig, policies=("float32", "mixed_float16", "mixed_bfloat16", "auto"),
              xla=(True, False), chunk=10, repeats=3, warmup=3, log=print,
              peer=None) -> list[Run]:
    """Trains `config`'s model under each policy and XLA setting, interleaved; returns the runs.

    Ratios are to float32 with the same XLA setting (and the same implementation: kmp, or
    the peer).

    Args:
        config: GPTConfig. The model, batch and corpus (`config.corpus`).
        policies: sequence of str. Policies to compare; "auto" adds the plan's pick.
        xla: sequence of bool. XLA settings to try for each explicit policy.
        chunk: int. Steps per turn.
        repeats: int. Turns per run (timed); the median is over these.
        warmup: int. Untimed steps per run after all are compiled, before the timed turns.
        log: callable. Progress lines. Defaults to print.
        peer: str or None. "torch": also train the PyTorch reference of the same shape
            (`kmp.peers.torch_gpt`) at each precision, in the same process, on the same
            batches. Defaults to None.
    """
    runs = _measure(config, _runs(policies, xla, peer), chunk, repeats, warmup, log)
    for run in runs:
        base = next((b for b in runs if b.policy == "float32" and b.jit == run.jit
                     and b.path == run.path), None)
        run.ratio = run.tokens_per_sec / base.tokens_per_sec if base else None
    return runs


def peer_ratios(runs: list[Run]) -> list[tuple[str, Run, Run, float]]:
    """Per precision: kmp's fastest run, the peer's fastest, and kmp's tokens/s over the
    peer's."""
    rows = []
    for policy in dict.fromkeys(r.policy for r in runs):
        ours = [r for r in runs if r.policy == policy and r.path == "kmp"]
        theirs = [r for r in runs if r.policy == policy and r.path not in ("kmp", "keras")]
        if ours and theirs:
            best, peer = (max(rs, key=lambda r: r.tokens_per_sec) for rs in (ours, theirs))
            rows.append((policy, best, peer, best.tokens_per_sec / peer.tokens_per_sec))
    return rows


def overhead(config: GPTConfig, policy="auto", chunk=10, repeats=3, warmup=3,
             log=print) -> list[Run]:
    """The same model and policy trained the plain Keras way and the full kmp way, interleaved.

    Plain Keras: `keras.config.set_dtype_policy` and `model.compile` (Keras wraps its own
    LossScaleOptimizer under mixed_float16). kmp: `kmp.compile` (kmp's LossScaleOptimizer, FP32
    islands, scaler metrics) and a `PrecisionMonitor` called after every step. Both use the
    plan's XLA setting. The ratio is kmp's tokens/s over plain Keras's.
    """
    chosen = make_plan(policy)
    xla = "on" if chosen.jit_compile else "off"
    runs = [Run(f"plain Keras: {chosen.policy}, XLA {xla}", chosen.policy, chosen.jit_compile,
                path="keras"),
            Run(f"kmp: {chosen.policy}, XLA {xla}", chosen.policy, chosen.jit_compile)]
    runs = _measure(config, runs, chunk, repeats, warmup, log)
    for run in runs:
        run.ratio = run.tokens_per_sec / runs[0].tokens_per_sec
    return runs


def _build(config, run):
    config = dataclasses.replace(config, warmup_steps=0)  # every benchmarked step trains
    if run.path == "torch":
        try:
            from kmp.peers.torch_gpt import TorchPeer
        except ImportError:
            raise UserError("The torch peer needs PyTorch: pip install -e '.[peers]' (or "
                            "pip install torch).", field="peer") from None
        return TorchPeer(config, run.policy, compile=run.jit), ()
    with global_policy(run.policy):  # layers keep the policy they were built with
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
        optimizer = make_optimizer(config, model)
        loss = lm_loss()
        if run.path == "keras":
            model.compile(optimizer, loss, weighted_metrics=[], jit_compile=run.jit)
            return model, ()
        kmp_compile(model, optimizer, loss, weighted_metrics=[], jit_compile=run.jit)
    monitor = PrecisionMonitor()
    monitor.set_model(model)
    return model, (monitor,)


def _measure(config, runs, chunk, repeats, warmup, log) -> list[Run]:
    cache = data.build_token_cache(config.corpus, config.vocab_size, config.cache_dir, log=log)
    built, next_batch = [], [0] * len(runs)
    gpu = backends.gpu_memory() is not None
    for i, run in enumerate(runs):
        built.append(_build(config, run))
        t = time.perf_counter()
        run.first_loss = _fit(*built[i], cache, config, next_batch, i, 1)
        log(f"bench: {run.label}: first step (compilation) {time.perf_counter() - t:.1f} s")
        if not gpu:
            run.memory_kind = CPU_MEMORY
    # An untimed round: a model's first steps after another model ran can be slow once.
    for i in range(len(runs)):
        _fit(*built[i], cache, config, next_batch, i, warmup)
    progress = keras.utils.Progbar(repeats * len(runs), unit_name="chunk")
    ticks = [[0, 0] for _ in runs]  # (steal, total) during each run's timed chunks
    for r in range(repeats):
        for k in range(len(runs)):
            i = (k + r) % len(runs)
            model = built[i][0]
            # A peer measures its own device memory (torch's allocator), kmp the backend's.
            memory = getattr(model, "gpu_memory", backends.gpu_memory)
            before = memory(reset=True)
            cpu = cpu_ticks()
            t = time.perf_counter()
            loss = _fit(*built[i], cache, config, next_batch, i, chunk)
            runs[i].step_seconds.append((time.perf_counter() - t) / chunk)
            ticks[i] = [a + b for a, b in zip(ticks[i], ticks_between(cpu, cpu_ticks()))]
            runs[i].final_loss = loss
            if before is not None and before["resettable"]:
                # the other models' variables stay resident: leave them out
                own = memory()["peak"] - before["current"] + (
                    model.state_bytes() if runs[i].path == "torch" else state_bytes(model))
                runs[i].peak_memory = max(runs[i].peak_memory or 0, own)
                runs[i].memory_kind = "GPU peak (this model's)"
            elif before is not None:  # JAX: the device's peak since the process started
                runs[i].peak_memory = backends.gpu_memory()["peak"]
                runs[i].memory_kind = "GPU peak of the process so far (all runs)"
            progress.add(1)
    tokens = config.batch_size * config.seq_len
    fpt = flops_per_token(config)
    hw = detect()
    for run, (steal, total) in zip(runs, ticks):
        run.steal = steal / total if total else None
        run.tokens_per_sec = tokens / run.median_step
        peak = peak_flops(hw, keras.DTypePolicy(run.policy).compute_dtype)
        run.mfu = run.tokens_per_sec * fpt / peak if peak else None
    return runs


def _fit(model, callbacks, cache, config, next_batch, i, steps) -> float:
    """Trains `steps` batches with train_on_batch (each returns its loss: a sync per step)."""
    loss = None
    for _ in range(steps):
        x, y = data.window_batch(cache.train, config.seq_len, config.batch_size, config.seed,
                                 next_batch[i])
        next_batch[i] += 1
        if not isinstance(model, keras.Model):  # a peer
            loss = model.train_step(x, y)
            continue
        model.reset_metrics()  # so the logged loss is this batch's, not a running mean
        logs = model.train_on_batch({"token_ids": x, "padding_mask": np.ones_like(x)}, y,
                                    return_dict=True)
        for callback in callbacks:
            callback.on_train_batch_end(next_batch[i], logs)
        loss = float(logs["loss"])
    return loss


def steal_summary(runs: list[Run], warn_at: float = STEAL_WARNING) -> str:
    """A line on the hypervisor's steal time during the runs' timed steps (Linux only; "" where
    it is not known), a warning when it reached `warn_at` in some run: on a shared host that
    slows whatever waits for the taken core, by different shares in different runs
    (docs/benchmarks.md), so the speeds are not the machine's.

    Example:
    >>> steal_summary([Run("a", "float32", False, steal=0.02), Run("b", "float32", True)])
    'Hypervisor steal during the timed steps: at most 2.0% of the CPU time in any run.'
    """
    known = [r for r in runs if r.steal is not None]
    if not known:
        return ""
    worst = max(known, key=lambda r: r.steal)
    if worst.steal >= warn_at:
        return (f"warning: the hypervisor took {worst.steal:.0%} of the CPU time during the "
                f"timed steps of {worst.label} (steal, in /proc/stat); speeds and ratios from "
                "such a run are not this machine's: run again when the host is quieter.")
    return (f"Hypervisor steal during the timed steps: at most {worst.steal:.1%} of the CPU "
            "time in any run.")


def to_markdown(runs: list[Run], title: str, baseline: str = "float32") -> str:
    """The runs as a Markdown table; the last column is the ratio to `baseline`."""
    lines = [f"**{title}**", "",
             "| run | median step (ms) | tokens/s | MFU | peak memory (MiB) | loss, first -> "
             f"last step | vs {baseline} |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        row = run.row()
        mem = f"{row['peak_memory_mib']:,.0f}" if row["peak_memory_mib"] else "-"
        mfu = f"{run.mfu:.1%}" if run.mfu is not None else "-"
        ratio = f"{run.ratio:.2f}x" if run.ratio is not None else "-"
        lines.append(f"| {run.label} | {row['median_step_ms']:.0f} | {run.tokens_per_sec:,.0f} | "
                     f"{mfu} | {mem} | {run.first_loss:.3f} -> {run.final_loss:.3f} | {ratio} |")
    kinds = dict.fromkeys(run.memory_kind for run in runs if run.memory_kind)
    return "\n".join(lines) + "".join(f"\n\npeak memory: {kind}." for kind in kinds)


def to_json(runs: list[Run], config: GPTConfig, hardware: str, baseline: str = "float32") -> str:
    """The runs, the config, the hardware and what `ratio` is relative to, as JSON."""
    return json.dumps({"hardware": hardware, "ratio_baseline": baseline,
                       "config": dataclasses.asdict(config),
                       "runs": [run.row() for run in runs]}, indent=2)



def main(argv: list[str]) -> int:
    """`kmp bench`: parses its options from `argv`, runs, prints the table and writes
    bench.json and bench.md (overhead.* with --overhead, backends.* with --backends) to --out.

    Args:
        argv: list of str. The options after `kmp bench`.

    Returns:
        0.

    Raises:
        UserError: for an option out of range or an unknown policy, backend or XLA setting.
    """
    parser = argparse.ArgumentParser(
        prog="kmp bench", description="Train a GPT preset under each precision and XLA "
        "setting, interleaved in one process; print a table and write bench.json/bench.md "
        "to --out.")
    add_arguments(parser, exclude={"precision", "steps", "warmup_steps", *RUN_ONLY})
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
    opts = parser.parse_args(argv)
    for name in ("chunk", "repeats", "warmup", "rounds"):
        if getattr(opts, name) < 1:
            raise UserError(f"{name} must be a positive integer. Received: "
                            f"{name}={getattr(opts, name)}", field=name)
    config = from_args(opts)
    out = Path(config.out).expanduser()
    if opts.backends:
        from kmp.gpt import crossbackend

        rows = crossbackend.compare(argv, opts.backends, opts.rounds, out)
        _write(out, "backends", json.dumps(rows, indent=2), crossbackend.to_markdown(
            rows, f"{config.preset}: batch {config.batch_size} x {config.seq_len} tokens, "
            f"{opts.rounds} rounds"))
        return 0
    xla = []
    for word in opts.xla.split(","):
        if word not in ("on", "off"):
            raise UserError(f"Unknown --xla setting {word!r}. Use on, off or on,off.")
        xla.append(word == "on")
    if opts.overhead:
        runs = overhead(config, opts.overhead, opts.chunk, opts.repeats, opts.warmup)
        name, baseline = "overhead", "plain Keras"
    else:
        runs = benchmark(config, opts.policies.split(","), xla, opts.chunk, opts.repeats,
                         opts.warmup, peer=opts.peer)
        name, baseline = "bench", "float32"
    hw = detect().describe()
    table = to_markdown(runs, f"{config.preset}: batch {config.batch_size} x {config.seq_len} "
                        f"tokens, {opts.repeats} x {opts.chunk} timed steps per run, on {hw}",
                        baseline) + "\n\n" + loss_summary(runs)
    if steal := steal_summary(runs):
        table += "\n\n" + steal
    ratios = peer_ratios(runs)
    if ratios:
        table += ("\n\n| precision | kmp (fastest) | tokens/s | peer (fastest) | tokens/s | "
                  "kmp / peer |\n|---|---|---|---|---|---|\n" + "\n".join(
                      f"| {p} | {a.label} | {a.tokens_per_sec:,.0f} | {b.label} | "
                      f"{b.tokens_per_sec:,.0f} | {q:.2f}x |" for p, a, b, q in ratios))
    _write(out, name, to_json(runs, config, hw, baseline), table)
    return 0


def _write(out: Path, name: str, report: str, table: str) -> None:
    """Prints `table` and writes `report` to out/name.json and `table` to out/name.md."""
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(report)
    (out / f"{name}.md").write_text(table + "\n")
    print(f"\nwritten: {out / (name + '.json')}, {out / (name + '.md')}")
