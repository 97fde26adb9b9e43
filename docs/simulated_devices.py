"""The simulated-device deadlock in JAX's CPU client, reproduced in a few seconds
(docs/distributed.md, "Simulated devices: a deadlock in JAX's CPU client, and its fix").

Usage: python docs/simulated_devices.py DEVICES THREADS [STEPS] [TRIES]
  e.g. python docs/simulated_devices.py 4 4      # JAX's default on a <= 4-core machine: hangs
       python docs/simulated_devices.py 4 8      # PJRT_NPROC=2 x devices (kmp --devices): runs
Each try is a fresh process: an fsdp-sharded 4-layer MLP's SGD step (all-gathers and
reduce-scatters) jitted over DEVICES simulated CPU devices and dispatched STEPS times without
waiting, so the dispatch runs far ahead of the devices, as Keras's variable creation does.
XLA aborts a try whose collective waits 20 s; the line says which ended how. XLA_FLAGS and
JAX_* variables set around the command are passed on; WAIT_EACH=1 waits for each step's
result before dispatching the next.
"""
import os
import subprocess
import sys
import time

STEP = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
split = NamedSharding(mesh, P("data", None))
rng = np.random.default_rng(0)
ws = [jax.device_put(rng.normal(0, 0.05, (256, 256)).astype("float32"), split) for _ in range(4)]
x = jax.device_put(rng.normal(size=(64, 256)).astype("float32"), split)
def loss(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)
@jax.jit
def step(ws, x):
    value, grads = jax.value_and_grad(loss)(ws, x)
    return [w - 0.1 * g for w, g in zip(ws, grads)], value
for _ in range(int(sys.argv[1])):
    ws, value = step(ws, x)
    if sys.argv[2] == "1":
        value.block_until_ready()
print(float(value))
"""

devices, threads = int(sys.argv[1]), int(sys.argv[2])
steps = sys.argv[3] if len(sys.argv) > 3 else "1000"
tries = int(sys.argv[4]) if len(sys.argv) > 4 else 3
env = {**os.environ, "JAX_PLATFORMS": "cpu", "PJRT_NPROC": str(threads),
       "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                    f"--xla_force_host_platform_device_count={devices} "
                    "--xla_cpu_collective_call_terminate_timeout_seconds=20"}
for attempt in range(1, tries + 1):
    start = time.time()
    done = subprocess.run([sys.executable, "-c", STEP, steps, os.environ.get("WAIT_EACH", "")],
                          env=env, capture_output=True, text=True, timeout=300)
    hung = [line for line in done.stderr.splitlines() if "Termination timeout" in line]
    outcome = ("hung: " + hung[0].split("exceeded.")[-1].strip() if hung
               else "ran" if done.returncode == 0 else f"failed (exit {done.returncode})")
    print(f"{devices} devices, PJRT_NPROC={threads}, try {attempt}: {outcome} "
          f"({time.time() - start:.0f} s)", flush=True)
