"""Trains the tiny preset under float32, mixed_float16 and mixed_bfloat16 (same seed and steps)
and prints the parity table of docs/pretraining.md.

    python docs/pretrain_parity.py [--out runs/parity] [extra kmp pretrain options]
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def weights_finite(path: Path) -> bool:
    import h5py

    finite = True

    def visit(_, obj):
        nonlocal finite
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
            finite &= bool(np.isfinite(obj[()]).all())

    with h5py.File(path) as f:
        f.visititems(visit)
    return finite


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/parity")
    args, extra = parser.parse_known_args()
    rows = {}
    for policy in POLICIES:
        out = Path(args.out, policy)
        subprocess.run([sys.executable, "-m", "kmp.cli", "pretrain", "--precision", policy,
                        "--out", str(out), *extra], check=True)
        metrics = json.loads((out / "metrics.json").read_text())
        record = json.loads((out / "checkpoints" / "latest.json").read_text())
        losses = [loss for _, loss in record["extra"]["history"]["train"]]
        ckpts = sorted((out / "checkpoints").glob("step-*.weights.h5"))
        rows[policy] = (metrics, all(map(math.isfinite, losses)),
                        all(weights_finite(p) for p in ckpts))
    ref = rows["float32"][0]["val_loss"]
    print("| policy | val loss | vs float32 | perplexity | final train loss | skipped steps |"
          " final loss scale | losses finite | weights finite | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for policy, (m, losses_ok, weights_ok) in rows.items():
        scale = "-" if m["final_loss_scale"] is None else f"{m['final_loss_scale']:g}"
        print(f"| {policy} | {m['val_loss']:.4f} | {(m['val_loss'] - ref) / ref:+.2%} | "
              f"{m['val_perplexity']:.1f} | {m['final_train_loss']:.4f} | {m['skipped_steps']} | "
              f"{scale} | {losses_ok} | {weights_ok} | {m['tokens_per_sec']:,.0f} |")


if __name__ == "__main__":
    main()
