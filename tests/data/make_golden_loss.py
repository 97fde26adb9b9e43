"""Regenerates golden_tiny_loss.json: per-step training losses of a fixed-seed reduced tiny run.

    python tests/data/make_golden_loss.py

Run it only when a change is meant to alter the numerics, and say why in the commit.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from test_pretrain import SMALL  # noqa: E402

from kmp import checkpoint, set_policy  # noqa: E402
from kmp.recipes import pretrain_gpt  # noqa: E402

ARGS = ["--steps", "24", "--val-every", "12"]
TOLERANCE = {"float32": 1e-3, "mixed_bfloat16": 2e-2}


def main():
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in TOLERANCE:
            out = Path(tmp, policy)
            pretrain_gpt.main([*SMALL, *ARGS, "--precision", policy, "--cache-dir",
                               f"{tmp}/cache", "--out", str(out)])
            history = checkpoint.latest(out / "checkpoints")["extra"]["history"]["train"]
            losses[policy] = [round(loss, 6) for _, loss in history]
            set_policy("float32")
    golden = {"args": ARGS, "tolerance": TOLERANCE, "losses": losses}
    path = Path(__file__).with_name("golden_tiny_loss.json")
    path.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
