"""Regenerates the table in docs/finetuning.md: full fine-tuning, LoRA, LoRA with the token
embedding trained in full (`--train-embeddings`), int8 + LoRA and int4 + LoRA of a kmp run
pretrained on the Python standard library, on licence texts it never saw, under float32,
mixed_bfloat16 and mixed_float16 (TensorFlow), and the compiled step's bytes of each method
under JAX.

    python docs/finetuning.py RUN_DIR OUT_DIR [--steps 200]

Each fine-tune is its own `kmp finetune --preset` process, one after another (so each
process's peak RSS is its own). Prints the Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = "/usr/share/common-licenses/*-*"  # the licence texts, without the unversioned links
TARGETS = ["query", "key", "value", "attention_output", "feedforward_intermediate_dense",
           "feedforward_output_dense"]
METHODS = {  # name -> flags
    "full": [],
    "LoRA r8": ["--lora", "8", "--lora-targets", *TARGETS],
    "LoRA r8 + embedding": ["--lora", "8", "--lora-targets", *TARGETS, "--train-embeddings"],
    "int8 + LoRA r8": ["--lora", "8", "--lora-targets", *TARGETS, "--base", "int8"],
    "int4 + LoRA r8": ["--lora", "8", "--lora-targets", *TARGETS, "--base", "int4"],
}
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def run(preset, out, flags, steps, precision, backend="tensorflow"):
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "kmp.cli", "finetune", "--preset", str(preset), "--data", DATA,
           "--steps", str(steps), "--precision", precision, "--batch-size", "8",
           "--samples", "1", "--out", str(out), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads((Path(out) / "metrics.json").read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=200)
    opts = parser.parse_args()
    preset, out = Path(opts.run) / "preset", Path(opts.out)
    rows = []
    for policy in POLICIES:
        for name, flags in METHODS.items():
            tag = f"{name.replace(' ', '').replace('+', '-')}-{policy}"
            r = run(preset, out / tag, flags, opts.steps, policy)
            rows.append((name, policy, r))
            print(name, policy, {k: r.get(k) for k in ("val_loss_after", "error")}, flush=True)
    jax = {}
    for name, flags in METHODS.items():
        r = run(preset, out / f"jax-{name.replace(' ', '').replace('+', '-')}", flags, 2,
                "mixed_bfloat16", backend="jax")
        jax[name] = (r.get("compiled_step_bytes") or {}).get("total")
    (out / "results.json").write_text(json.dumps({"rows": rows, "jax": jax}, indent=1))
    print(table(rows, jax))


def table(rows, jax):
    lines = ["| method | policy | val loss before | after | merged preset | trainable params "
             "| weight bytes | peak RSS (MB) | JAX compiled step (MB) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, policy, r in rows:
        if "error" in r:
            why = r["error"].split(": ")[-1].split(" (")[0]
            lines.append(f"| {name} | {policy} | refused: {why} |||||||||")
            continue
        step = jax.get(name) if policy == "mixed_bfloat16" else None
        lines.append(
            f"| {name} | {policy} | {r['val_loss_before']:.4f} | {r['val_loss_after']:.4f} | "
            f"{r['val_loss_merged']:.4f} | {r['trainable_params']:,} | {r['weight_bytes']:,} | "
            f"{r['host_peak_rss_bytes'] / 2**20:.0f} | "
            f"{'' if step is None else f'{step / 2**20:.2f}'} | "
            f"{r['tokens_per_sec'] or 0:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
