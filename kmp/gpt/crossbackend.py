"""`kmp bench --backends`: one setting per Keras backend, each in its own process, compared.

A process has one Keras backend, so each backend's setting runs as its own `kmp --backend B
bench` (one run, one timed turn); the backends take turns for a number of rounds, the order
rotating every round, and the comparison is of the median tokens/s over the rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from kmp import backends
from kmp.errors import UserError
from kmp.policy import POLICIES


def parse_runs(spec: str) -> list[tuple[str, str, str | None]]:
    """"tensorflow:mixed_bfloat16:off,jax,torch:float32" -> [(backend, policy, xla)], the
    policy defaulting to auto (that backend's plan) and XLA to the plan's ("on"/"off"/None).

    Example:
    >>> parse_runs("jax,torch:float32:off")
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


def compare(bench_argv: list[str], spec: str, rounds: int, out, log=print) -> list[dict]:
    """Times one setting per Keras backend, each in its own process (a process has one
    backend), taking turns for `rounds` rounds with the order rotating, so drift on the
    machine hits all alike.

    Args:
        bench_argv: list of str. The `kmp bench` options; each turn is `kmp --backend B bench`
            with these (less --backends, --rounds, --repeats, --policies, --xla and --out),
            one run's policy and XLA setting, `--repeats 1` and its own --out under `out`.
        spec: str. The runs, as `parse_runs` reads them.
        rounds: int. Turns per backend.
        out: path. Where each turn writes.
        log: callable. Progress lines. Defaults to print.

    Returns:
        One dict per backend: tokens/s per round, the median, and the ratio of the medians to
        the first backend's.
    """
    runs = parse_runs(spec)
    bench_argv = _without(bench_argv, ("--backends", "--rounds", "--repeats", "--policies",
                                       "--xla", "--out"))
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
            if done.returncode == 2:  # a user error, in its one line
                said = done.stderr.strip().splitlines()[-1].removeprefix("kmp: error: ")
                raise UserError(f"under {backend}: {said}")
            if done.returncode != 0:
                raise RuntimeError(f"kmp bench under {backend} failed:\n{done.stderr[-3000:]}")
            row = json.loads((turn / "bench.json").read_text())["runs"][0]
            tokens[run].append(row["tokens_per_sec"])
            labels[run] = f"{backend}: {row['run']}"
    first = statistics.median(tokens[runs[0]])
    return [{"backend": run[0], "run": labels[run], "tokens_per_sec": tokens[run],
             "median_tokens_per_sec": statistics.median(tokens[run]),
             "ratio": statistics.median(tokens[run]) / first} for run in runs]


def to_markdown(rows: list[dict], title: str) -> str:
    """The rows of `compare` as a Markdown table."""
    lines = [f"**{title}**", "", "| backend: run | tokens/s per round | median tokens/s | "
             f"vs {rows[0]['backend']} |", "|---|---|---|---|"]
    for row in rows:
        each = ", ".join(f"{t:,.0f}" for t in row["tokens_per_sec"])
        lines.append(f"| {row['run']} | {each} | {row['median_tokens_per_sec']:,.0f} | "
                     f"{row['ratio']:.2f}x |")
    return "\n".join(lines)


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
