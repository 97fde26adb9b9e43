"""Rematerialization: compiled temp bytes (JAX), step time and per-step losses.
Usage: KERAS_BACKEND=jax|torch|tensorflow python docs/remat.py PRESET BATCH STEPS"""
import statistics
import sys
import time

import keras
import numpy as np

import kmp
from kmp.gpt import build_model, lm_loss, make_optimizer, preset

name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backend = keras.backend.backend()
kmp.set_policy("float32")
rng = np.random.default_rng(0)
config = preset(name, batch_size=batch)
batches = [rng.integers(0, config.vocab_size, (batch, config.seq_len + 1)).astype("int32")
           for _ in range(steps + 2)]

def split(b):
    return {"token_ids": b[:, :-1], "padding_mask": np.ones_like(b[:, :-1])}, b[:, 1:]

models = {}
for remat in ("none", "blocks", "full"):
    keras.utils.set_random_seed(0)
    model = build_model(preset(name, batch_size=batch, remat=remat))
    kmp.compile(model, make_optimizer(config, model), lm_loss(), jit_compile=backend != "torch")
    models[remat] = model
    x, y = split(batches[0])
    model.train_on_batch(x, y)  # builds the model, optimizer and step
    if backend == "jax":
        import jax
        state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                     optimizer_variables=True, metrics_variables=True)
        lowered = jax.jit(model.train_step).lower(state, (x, y, None))
        compiled = lowered.compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        dots = lowered.as_text(dialect="hlo").count(" dot("), compiled.as_text().count(" dot(")
        print(f"{remat}: temp {temp} bytes ({temp / 2**20:.1f} MiB); dots before/after XLA "
              f"{dots[0]}/{dots[1]}", flush=True)
times = {k: [] for k in models}
losses = {k: [] for k in models}
for b in batches[1:]:
    x, y = split(b)
    for remat, model in models.items():  # interleaved, same batches
        start = time.perf_counter()
        loss = model.train_on_batch(x, y, return_dict=True)["loss"]
        times[remat].append(time.perf_counter() - start)
        losses[remat].append(float(loss))
base = statistics.median(times["none"][1:])
for remat in models:
    t = statistics.median(times[remat][1:])
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses[remat], losses["none"]))
    print(f"{backend} {remat}: median step {t * 1000:.0f} ms over {len(times[remat]) - 1} steps "
          f"({t / base:.2f}x); max relative loss difference vs none {rel:.1e}; first losses "
          f"{[round(v, 5) for v in losses[remat][:3]]}", flush=True)
