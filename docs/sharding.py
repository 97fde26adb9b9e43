"""Sharded training on simulated devices against one device: per-step losses, validation loss
and per-device state bytes (docs/distributed.md, "Sharding").

Usage: python docs/sharding.py PRESET PRECISION [STEPS] [MESH:SHARD ...]
  e.g. python docs/sharding.py tiny float32 60 data=4:fsdp model=4:tp data=2,model=2:fsdp+tp
Each run is `kmp --devices N --backend jax pretrain` in its own process (runs/sharding/); the
one-device reference is the same command without a mesh. KMP_FLAGS adds options to every run.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

name, precision = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 60
meshes = sys.argv[4:] or ["data=4:fsdp", "model=4:tp", "data=2,model=2:fsdp+tp",
                          "data=8:fsdp", "data=4,model=2:fsdp+tp"]
root = Path("runs/sharding")
common = ["--preset", name, "--precision", precision, "--steps", str(steps),
          "--val-every", str(steps), "--val-batches", "4", "--samples", "0", "--seed", "0",
          *os.environ.get("KMP_FLAGS", "").split()]  # e.g. KMP_FLAGS="--attention island"


def run(tag, mesh=None, shard=None):
    out = root / f"{name}-{precision}-{tag}"
    if not (out / "metrics.json").exists():
        devices = math.prod(int(p.split("=")[1]) for p in mesh.split(",")) if mesh else 1
        flags = ["--mesh", mesh, "--shard", shard] if mesh else []
        command = [sys.executable, "-m", "kmp.cli", "--devices", str(devices), "--backend",
                   "jax", "pretrain", *common, *flags, "--out", str(out)]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return [v for _, v in history["train"]], metrics


base, base_metrics = run("one")
print(f"| preset | precision | devices | mesh | shard | max rel. diff, {steps} step losses | "
      "val loss (rel. diff) | state bytes per device (x replicated) |")
print("|---|---|---|---|---|---|---|---|")
print(f"| {name} | {precision} | 1 | - | - | - | {base_metrics['val_loss']:.4f} | "
      f"{base_metrics['state_bytes_per_device']:,} (1) |")
for spec in meshes:
    mesh, shard = spec.split(":")
    losses, metrics = run(f"{mesh}-{shard}".replace(",", "_"), mesh, shard)
    worst = max(abs(b / a - 1) for a, b in zip(base, losses))
    val = metrics["val_loss"]
    state = metrics["state_bytes_per_device"]
    devices = math.prod(int(p.split("=")[1]) for p in mesh.split(","))
    print(f"| {name} | {precision} | {devices} | {mesh} | {shard} | {worst:.1e} | {val:.4f} "
          f"({val / base_metrics['val_loss'] - 1:+.1e}) | {state:,} "
          f"({state / base_metrics['state_bytes_per_device']:.3f}) |", flush=True)
