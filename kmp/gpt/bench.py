"""`kmp bench`: every precision side by side on one machine, in one process, interleaved.

Each (policy, XLA) run gets its own model built under its policy, compiled the kmp way, and
warmed up (compilation excluded). Then the runs take turns, `chunk` steps at a time, for
`repeats` rounds, the order rotating every round, so machine drift hits all runs alike. Steps
are `train_on_batch` calls on batches from the token cache (the input pipeline is not timed;
the recipe's Throughput callback measures it with the model). A run's step time is the median
over its chunks of the mean step time in the chunk. `benchmark` gives ratios to float32 with
the same XLA setting; `overhead` gives the kmp path's ratio to plain Keras.

The steps are real training: every run starts from the same initial weights, reads the same
batches in the same order, and trains without learning-rate warm-up, so its loss must fall
from the first step to the last and the runs' final losses must agree (`check_losses`); a run
that computes wrongly shows there, not only a slow one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import resource
import statistics
import time

import keras
import numpy as np

from kmp import backends
from kmp.callbacks import PrecisionMonitor
from kmp.errors import UserError
from kmp.gpt import data
from kmp.gpt.config import GPTConfig
from kmp.gpt.model import build_model, flops_per_token, lm_loss, make_optimizer
from kmp.hardware import detect, peak_flops
from kmp.policy import POLICIES
from kmp.policy import plan as make_plan
from kmp.training import compile as kmp_compile


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

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)

    def row(self) -> dict:
        return {"run": self.label, "policy": self.policy, "xla": self.jit,
                "median_step_ms": 1000 * self.median_step, "tokens_per_sec": self.tokens_per_sec,
                "mfu": self.mfu, "peak_memory_mib": (self.peak_memory / 2**20
                                                     if self.peak_memory else None),
                "memory_kind": self.memory_kind, "first_loss": self.first_loss,
                "final_loss": self.final_loss, "ratio": self.ratio}


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


def _itemsize(dtype) -> int:
    bits = re.search(r"\d+", keras.backend.standardize_dtype(dtype))
    return int(bits.group()) // 8 if bits else 1  # bool


def state_bytes(model) -> int:
    """Bytes of a model's variables and its optimizer's (what it keeps on the device between
    steps)."""
    seen, total = set(), 0
    for v in [*model.variables, *getattr(model.optimizer, "variables", [])]:
        if id(v) not in seen:
            seen.add(id(v))
            total += math.prod(v.shape) * _itemsize(v.dtype)
    return total


def check_losses(runs: list[Run], tolerance: float = 0.02) -> list[str]:
    """What is wrong with the runs' losses: a run whose loss did not fall, or whose final loss
    is more than `tolerance` (relative) from the float32 runs' mean. Empty when all is well."""
    problems = [f"{r.label}: the loss did not fall ({r.first_loss:.4f} -> {r.final_loss:.4f})"
                for r in runs if not r.final_loss < r.first_loss]
    base = [r.final_loss for r in runs if r.policy == "float32" and r.path != "torch"]
    if base:  # a peer starts from other weights: only its own fall is checked
        ref = sum(base) / len(base)
        for r in (r for r in runs if r.path != "torch"):
            off = abs(r.final_loss / ref - 1)
            if not off <= tolerance:
                problems.append(f"{r.label}: final loss {r.final_loss:.4f} is {off:.1%} from "
                                f"float32's {ref:.4f} (tolerance {tolerance:.0%})")
    return problems


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
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(run.policy)  # layers keep the policy they were built with
    try:
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
        optimizer = make_optimizer(config, model)
        loss = lm_loss()
        if run.path == "keras":
            model.compile(optimizer, loss, weighted_metrics=[], jit_compile=run.jit)
            return model, ()
        kmp_compile(model, optimizer, loss, weighted_metrics=[], jit_compile=run.jit)
    finally:
        keras.config.set_dtype_policy(previous)
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
            run.peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            run.memory_kind = "process peak RSS so far"
    # An untimed round: a model's first steps after another model ran can be slow once.
    for i in range(len(runs)):
        _fit(*built[i], cache, config, next_batch, i, warmup)
    progress = keras.utils.Progbar(repeats * len(runs), unit_name="chunk")
    for r in range(repeats):
        for k in range(len(runs)):
            i = (k + r) % len(runs)
            model = built[i][0]
            # A peer measures its own device memory (torch's allocator), kmp the backend's.
            memory = getattr(model, "gpu_memory", backends.gpu_memory)
            before = memory(reset=True)
            t = time.perf_counter()
            loss = _fit(*built[i], cache, config, next_batch, i, chunk)
            runs[i].step_seconds.append((time.perf_counter() - t) / chunk)
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
    for run in runs:
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
    return "\n".join(lines)


def to_json(runs: list[Run], config: GPTConfig, hardware: str, baseline: str = "float32") -> str:
    """The runs, the config, the hardware and what `ratio` is relative to, as JSON."""
    return json.dumps({"hardware": hardware, "ratio_baseline": baseline,
                       "config": dataclasses.asdict(config),
                       "runs": [run.row() for run in runs]}, indent=2)


def parse_backend_runs(spec: str) -> list[tuple[str, str, str | None]]:
    """"tensorflow:mixed_bfloat16:off,jax,torch:float32" -> [(backend, policy, xla)], the
    policy defaulting to auto (that backend's plan) and XLA to the plan's ("on"/"off"/None).

    Example:
    >>> parse_backend_runs("jax,torch:float32:off")
    [('jax', 'auto', None), ('torch', 'float32', 'off')]
    """
    runs = []
    for item in spec.split(","):
        backend, policy, xla = (item.split(":") + ["auto", None])[:3]
        if backend not in backends.SUPPORTED or (policy != "auto" and policy not in POLICIES) or (
                xla not in (None, "on", "off")):
            raise UserError(f"Unknown backend run {item!r}. Use BACKEND[:POLICY[:on|off]] with "
                            f"a backend of {', '.join(backends.SUPPORTED)} and a policy of "
                            f"auto, {', '.join(POLICIES)}.", field="backends")
        runs.append((backend, policy, xla))
    return runs


def compare_backends(bench_argv: list[str], runs, rounds: int, out, log=print) -> list[dict]:
    """Times one setting per Keras backend, each in its own process (a process has one
    backend), taking turns for `rounds` rounds with the order rotating, so drift on the
    machine hits all alike. Each turn is `kmp --backend B bench` with `bench_argv` and
    `--repeats 1`. Returns one row per backend: tokens/s per round, the median, and the ratio
    of the medians to the first backend's."""
    import subprocess
    import sys
    from pathlib import Path

    tokens = {run: [] for run in runs}
    labels = {}
    for r in range(rounds):
        for k in range(len(runs)):
            backend, policy, xla = run = runs[(k + r) % len(runs)]
            turn = Path(out) / f"turn-{r}-{backend}"
            argv = [sys.executable, "-m", "kmp.cli", "--backend", backend, "bench",
                    *bench_argv, "--policies", policy, "--repeats", "1", "--out", str(turn)]
            if xla is not None and policy != "auto":
                argv += ["--xla", xla]
            log(f"bench: round {r + 1}/{rounds}: {backend} {policy} ...")
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"kmp bench under {backend} failed:\n{done.stderr[-3000:]}")
            row = json.loads((turn / "bench.json").read_text())["runs"][0]
            tokens[run].append(row["tokens_per_sec"])
            labels[run] = f"{backend}: {row['run']}"
    first = statistics.median(tokens[runs[0]])
    return [{"backend": run[0], "run": labels[run], "tokens_per_sec": tokens[run],
             "median_tokens_per_sec": statistics.median(tokens[run]),
             "ratio": statistics.median(tokens[run]) / first} for run in runs]


def backends_markdown(rows: list[dict], title: str) -> str:
    """The rows of `compare_backends` as a Markdown table."""
    lines = [f"**{title}**", "", "| backend: run | tokens/s per round | median tokens/s | "
             f"vs {rows[0]['backend']} |", "|---|---|---|---|"]
    for row in rows:
        each = ", ".join(f"{t:,.0f}" for t in row["tokens_per_sec"])
        lines.append(f"| {row['run']} | {each} | {row['median_tokens_per_sec']:,.0f} | "
                     f"{row['ratio']:.2f}x |")
    return "\n".join(lines)
