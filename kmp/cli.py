"""The `kmp` command."""

from __future__ import annotations

import argparse
import os
import sys


def _doctor(args) -> int:
    from kmp.hardware import detect
    from kmp.policy import POLICIES, plan

    hw = detect()
    print(f"kmp doctor\n  hardware: {hw.describe()}")
    import keras
    import tensorflow as tf

    print(f"  versions: keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"backend {keras.backend.backend()}")
    print("  plans:")
    for name in POLICIES:
        p = plan(name, hw)
        note = f"  [warning: {p.warning}]" if p.warning else ""
        xla = "on " if p.jit_compile else "off"
        scaling = "yes" if p.loss_scaling else "no "
        print(f"    {name:<15} XLA {xla}  loss scaling {scaling}{note}")
    best = plan("auto", hw)
    print(f"  recommendation: {best}")
    print('  use it: kmp.set_policy("auto")')
    return 0


def main(argv=None) -> int:
    """Entry point of the `kmp` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="kmp", description="Keras mixed-precision kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="show the hardware, the plan for each policy, and the pick")
    args = parser.parse_args(argv)
    try:
        return {"doctor": _doctor}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, exit 2
        print(f"kmp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
