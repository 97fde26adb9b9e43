"""Writes gradscaler_golden.json: torch.amp.GradScaler's scale after each step.

Run with PyTorch installed (it is not a kmp dependency):
    python tests/data/make_gradscaler_golden.py
Each case drives a real GradScaler on the CPU through scale -> backward -> step -> update, with
the chosen steps made non-finite by an inf in the loss, and records `get_scale()` after update.
"""

import json
import pathlib

import numpy as np
import torch

CASES = [
    dict(init_scale=2.0**15, growth_factor=2.0, backoff_factor=0.5, growth_interval=3, seed=0),
    dict(init_scale=2.0**10, growth_factor=4.0, backoff_factor=0.25, growth_interval=5, seed=1),
    dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=1, seed=2),
    dict(init_scale=256.0, growth_factor=1.5, backoff_factor=0.75, growth_interval=2, seed=3),
]


def run(case, steps=60):
    rng = np.random.default_rng(case["seed"])
    overflow = (rng.random(steps) < 0.3).tolist()
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1e-3)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=case["init_scale"],
        growth_factor=case["growth_factor"],
        backoff_factor=case["backoff_factor"],
        growth_interval=case["growth_interval"],
    )
    scales = []
    for bad in overflow:
        opt.zero_grad()
        loss = (w * w).sum() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return dict(case, overflow=overflow, scales=scales)


if __name__ == "__main__":
    out = {"torch_version": torch.__version__, "cases": [run(c) for c in CASES]}
    path = pathlib.Path(__file__).with_name("gradscaler_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)
