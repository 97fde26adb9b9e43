"""What XLA plans for kmp's training step on a GPU this machine need not have.

With the JAX CUDA plugin installed (`pip install kmp[plan]`: jax-cuda12-plugin and
jax-cuda12-pjrt of jaxlib's version; no driver, no CUDA libraries),
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` gives
compile-only devices of any GPU XLA has a description of (`kmp.gpt.gpus`). kmp builds the
recipe's model and optimizer without values (`keras.StatelessScope(initialize_variables=False)`:
nothing is allocated), lowers Keras's own JAX train step from shapes alone, sharded over the
devices as `keras.distribution` would place it, compiles it, and reads the executable's
`memory_analysis()`: per device, the arguments (weights, optimizer state, the batch), the
outputs, what the outputs alias (the donated state) and the temporaries (gradients,
activations, workspaces). `argument + output - alias + temp` is what one device holds at the
step's peak.

Known traps, measured with jaxlib 0.10.2: `.lower(lowering_platforms=("cuda",))` silently
compiles for the CPU, so the step is lowered on the GPU devices' shardings instead;
`cost_analysis()` is None on a compile-only executable; without a device XLA cannot autotune,
so matmuls take Triton kernels (`gemm="cublas"` sets `--xla_gpu_enable_triton_gemm=false`
for cuBLAS's plan; `kmp memory` shows both). XLA's plan for the CPU is no stand-in for a GPU's
under a mixed policy: it widens bfloat16 arithmetic to float32.

The JAX backend compiles in this process; under another backend, or for another XLA flag, a
child process with the JAX backend does (`compiled_plan`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

from kmp.errors import UserError
from kmp.policy import global_policy

TARGETS = ("h100", "h200", "a100", "l4", "cpu")  # `kmp memory --target`; kmp.gpt.gpus has more
GEMMS = ("triton", "cublas")
_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """XLA's per-device memory plan of one training step, in bytes.

    `weights` and `optimizer` are the per-device shards of the state (the arguments XLA keeps
    between steps); `temp` holds the gradients and the activations.

    Example:
    >>> plan = CompiledPlan("h100", 1, "float32", "none", "triton", weights=4, optimizer=8,
    ...                     argument=16, output=12, alias=12, temp=20, seconds=1.0)
    >>> plan.total, plan.other
    (36, 4)
    """

    target: str
    devices: int
    policy: str
    remat: str
    gemm: str
    weights: int
    optimizer: int
    argument: int
    output: int
    alias: int
    temp: int
    seconds: float
    memory_limit: int = 0  # the device memory XLA was given, when not the GPU's own

    @property
    def total(self) -> int:
        """What one device holds at the step's peak: arguments + outputs - aliased + temporaries."""
        return self.argument + self.output - self.alias + self.temp

    @property
    def other(self) -> int:
        """What is neither state nor temporaries: the batch, the outputs that alias nothing."""
        return self.total - self.weights - self.optimizer - self.temp

    def to_json(self) -> dict:
        """The fields and the total, in bytes."""
        return {**dataclasses.asdict(self), "total": self.total}


def _distribution(devices, mesh: str, shard: str):
    import keras

    if mesh:
        from kmp.gpt import sharding

        return sharding.distribution(mesh, shard, devices=devices)
    mesh_ = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices=devices)
    return keras.distribution.DataParallel(device_mesh=mesh_)


def compile_step(config, policy: str, target: str = "h100", devices: int = 1, mesh: str = "",
                 shard: str = "", gemm: str = "triton", memory: int | None = None
                 ) -> CompiledPlan:
    """Compiles (without running, without allocating) the recipe's train step for a GPU.

    The model is `kmp.gpt.model.build_model(config)` (with `config.remat`) under `policy`,
    prepared by `kmp.compile` (FP32 islands, loss scaling under float16) with the recipe's
    AdamW; the batch is `config.batch_size` x `config.seq_len` tokens in all, split over the
    data-parallel devices (all of them, or the mesh's data axis). Needs the JAX backend (see
    `compiled_plan` for the others).

    Args:
        config: GPTConfig. The model, the global batch (`batch_size`, split over the
            data-parallel devices), the sequence length, remat and attention.
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16".
        target: str. A GPU of `kmp.gpt.gpus` ("h100", "a100-40gb", ...) or "cpu". Defaults to
            "h100".
        devices: int. Devices the step runs on: data-parallel, or the mesh's. Defaults to 1.
        mesh: str. A `--mesh` ("data=D,model=M", kmp.gpt.sharding); "" replicates the
            weights over `devices`. Defaults to "".
        shard: str. The `--shard` layout with `mesh`. Defaults to "".
        gemm: str. The matmul kernels the plan assumes ("triton" or "cublas"): set by the
            process's XLA_FLAGS, recorded here. Defaults to "triton".
        memory: int or None. The device memory XLA plans within, in bytes. XLA recomputes
            activations (its own rematerialization) where a plan would not fit; a large value
            shows the plan without that. Defaults to None: the GPU's.

    Returns:
        A `CompiledPlan`.

    Raises:
        UserError: for a batch that does not split over the data axis, a mesh the config
            does not fit, or no CUDA plugin (`kmp.gpt.gpus.topology`).

    Example:
    >>> from kmp.gpt.config import preset
    >>> compile_step(preset("tiny", num_layers=1), "float32", "h100").devices  # doctest: +SKIP
    1
    """
    import time

    started = time.time()
    with global_policy(policy):  # for the target GPU, not this machine: no advice
        return _compile(config, policy, target, devices, mesh, shard, gemm, memory, started)


def _compile(config, policy, target, devices, mesh, shard, gemm, memory, started):
    import time

    import jax
    import keras

    import kmp
    from kmp._keras import set_variable_layout
    from kmp.gpt.gpus import topology
    from kmp.gpt.model import build_model, lm_loss, make_optimizer

    placed = topology(target, devices, memory)
    distribution = _distribution(placed, mesh, shard)
    data_axis = distribution.device_mesh.shape[0]
    with keras.StatelessScope(initialize_variables=False):  # shapes only: nothing allocated
        keras.utils.set_random_seed(config.seed)
        model = build_model(config)
    for variable in model.variables:  # as the distribution would place them; AdamW's moments
        set_variable_layout(variable, distribution.get_variable_layout(variable))  # follow
    # The optimizer's counters and the loss tracker need values: made outside the scope, and
    # outside the distribution's (they would be put on devices that only compile).
    # The island, or the fused kernel asked for: "auto" is measured on the GPU that trains.
    kmp.compile(model, make_optimizer(config, model), loss=lm_loss(), weighted_metrics=[],
                jit_compile=True, loss_scale={} if policy == "mixed_float16" else None,
                islands="fused" if config.attention == "fused" else "island")
    with keras.StatelessScope(initialize_variables=False):
        model.optimizer.build(model.trainable_variables)

    def spec(variable):
        layout = distribution.get_variable_layout(variable).backend_layout
        return jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype, sharding=layout)

    state = tuple([spec(v) for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
        model.metrics_variables))
    rows = config.batch_size  # the global batch: data_axis rows-shares of it
    if rows % data_axis:
        raise UserError(f"batch_size {rows} does not split over {data_axis} data-parallel "
                        f"devices. Use a multiple of {data_axis}.", field="batch_size")
    layout = distribution.get_data_layout((rows, config.seq_len)).backend_layout
    tokens = jax.ShapeDtypeStruct((rows, config.seq_len), "int32", sharding=layout)
    batch = ({"token_ids": tokens, "padding_mask": tokens}, tokens)
    with distribution.scope(), warnings.catch_warnings():  # as in a sharded fit
        # JAX's persistent cache (kmp/__init__.py) keeps a step compiled for a GPU this machine
        # lacks but cannot load it back (jax 0.10.2: "PjRtCompiler must be constructed with a
        # Client"), and compiles again: what a plan needs, without the warning.
        warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry")
        compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, batch).compile()
    stats = compiled.memory_analysis()
    return CompiledPlan(
        target=target, devices=devices, policy=policy, remat=config.remat, gemm=gemm,
        weights=_per_device(state[0] + state[1]), optimizer=_per_device(state[2]),
        argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
        alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes,
        seconds=round(time.time() - started, 1), memory_limit=memory or 0)


def _per_device(specs) -> int:
    """Bytes of the largest shard of each array, summed: one device's share."""
    import numpy as np

    total = 0
    for s in specs:
        shape = s.sharding.shard_shape(s.shape)
        total += math.prod(shape) * np.dtype(s.dtype).itemsize
    return total


def compiled_plan(config, policy: str, target: str = "h100", devices: int = 1, mesh: str = "",
                  shard: str = "", gemm: str = "triton", memory: int | None = None
                  ) -> CompiledPlan:
    """XLA's memory plan of the recipe's train step for a GPU: `compile_step` in this process
    when it can (the JAX backend, the same matmul flag), else in a child process with the JAX
    backend. For several plans, `compiled_plans` starts one child for all of them.

    Args:
        config: GPTConfig. The model, the global batch (`batch_size`, split over the
            data-parallel devices), the sequence length, remat and attention.
        policy: str. "float32", "mixed_float16" or "mixed_bfloat16".
        target: str. A GPU of `kmp.gpt.gpus` or "cpu". Defaults to "h100".
        devices: int. Devices the step runs on: data-parallel, or the mesh's. Defaults to 1.
        mesh: str. A `--mesh` ("data=D,model=M"); "" replicates the weights. Defaults to "".
        shard: str. The `--shard` layout with `mesh`. Defaults to "".
        gemm: str. "triton" or "cublas": the matmul kernels XLA plans with (a child process
            sets `--xla_gpu_enable_triton_gemm=false` for cuBLAS). Defaults to "triton".
        memory: int or None. The device memory XLA plans within, in bytes (see
            `compile_step`). Defaults to None: the GPU's.

    Returns:
        A `CompiledPlan`.

    Example:
    >>> from kmp.gpt.config import preset
    >>> plan = compiled_plan(preset("tiny", num_layers=1), "mixed_bfloat16", "h100")
    >>> plan.total > plan.weights + plan.optimizer  # + gradients and activations
    True

    Raises:
        UserError: for an unknown target or gemm, or when the child could not compile.
    """
    return compiled_plans([(config, policy)], target, devices, mesh, shard, gemm, memory)[0]


def compiled_plans(settings, target: str = "h100", devices: int = 1, mesh: str = "",
                   shard: str = "", gemm: str = "triton", memory: int | None = None
                   ) -> list[CompiledPlan]:
    """`compiled_plan` of each (config, policy) in `settings`, in order, compiled in one
    child process where one is needed (starting one costs about as much as a small
    compilation).

    Args:
        settings: list of (GPTConfig, str) pairs: a model and batch, and its policy.
        target, devices, mesh, shard, gemm, memory: as in `compiled_plan`, for every setting.

    Returns:
        list of `CompiledPlan`, one per setting.

    Example:
    >>> from kmp.gpt.config import preset
    >>> config = preset("tiny", num_layers=1)
    >>> settings = [(config, "float32"), (config, "mixed_bfloat16")]
    >>> [plan.policy for plan in compiled_plans(settings, "h100")]  # doctest: +SKIP
    ['float32', 'mixed_bfloat16']

    Raises:
        UserError: for an unknown target or gemm, or when the child could not compile.
    """
    if target != "cpu":
        from kmp.gpt.gpus import gpu

        gpu(target)  # an unknown name fails here, in one line
    if gemm not in GEMMS:
        raise UserError(f"Unknown gemm {gemm!r}. Use one of: {', '.join(GEMMS)}.")
    import keras

    flag = "--xla_gpu_enable_triton_gemm=false"
    here = keras.backend.backend() == "jax" and (flag in os.environ.get("XLA_FLAGS", "")) == (
        gemm == "cublas")
    if here and (target != "cpu" or devices == 1):
        return [compile_step(config, policy, target, devices, mesh, shard, gemm, memory)
                for config, policy in settings]
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    if target != "cpu":  # a step for a GPU it lacks: JAX's cache could not load it back
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f != flag
             and not f.startswith("--xla_force_host_platform_device_count")]
    if gemm == "cublas":
        flags.append(flag)
    if target == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    request = json.dumps([{"config": json.loads(config.to_json()), "policy": policy,
                           "target": target, "devices": devices, "mesh": mesh, "shard": shard,
                           "gemm": gemm, "memory": memory} for config, policy in settings])
    child = subprocess.run([sys.executable, "-m", "kmp.gpt.compiled", request], env=env,
                           capture_output=True, text=True)
    if child.returncode == 2:  # the child's one-line user error
        raise UserError(child.stderr.strip().splitlines()[-1])
    if child.returncode:
        raise RuntimeError(f"compiling the step in a JAX child process failed:\n{child.stderr}")
    return [CompiledPlan(**{k: v for k, v in plan.items() if k != "total"})
            for plan in json.loads(child.stdout.splitlines()[-1])]


def compiled_table(rows: list[dict]) -> str:
    """A Markdown table of estimates beside XLA's plans (rows from `compare`), in GiB: per
    device, the state (weights + optimizer), gradients + activations, and the total.

    Args:
        rows: list of dict. `compare`'s rows.

    Returns:
        str. The table: per row, the estimate's line and one line per matmul kernel's plan.

    Example:
    >>> compiled_table([]).startswith("| policy | remat | | weights |")
    True
    """
    lines = ["| policy | remat | | weights | optimizer | gradients + activations | total "
             "(GiB) | estimate / XLA |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        est = row["estimate"]
        lines.append(f"| {row['policy']} | {row['remat']} | estimate | "
                     f"{est['parameters'] / _GIB:.2f} | {est['optimizer'] / _GIB:.2f} | "
                     f"{(est['gradients'] + est['activations']) / _GIB:.2f} | "
                     f"{est['total'] / _GIB:.2f} | |")
        for gemm, plan in row["compiled"].items():
            rest = plan["total"] - plan["weights"] - plan["optimizer"]
            lines.append(f"| | | XLA {plan['target']}, {gemm} | {plan['weights'] / _GIB:.2f} | "
                         f"{plan['optimizer'] / _GIB:.2f} | {rest / _GIB:.2f} | "
                         f"{plan['total'] / _GIB:.2f} | {est['total'] / plan['total']:.2f} |")
    return "\n".join(lines)


def compare(config, policies, target: str = "h100", gpus: int = 1,
            gemms=("triton", "cublas"), progress=None) -> list[dict]:
    """kmp's estimate (`kmp.gpt.memory.estimate_memory`) and XLA's compiled plans side by
    side, per policy.

    Args:
        config: GPTConfig. The model, global batch, sequence length, remat, mesh and shard.
        policies: list of str. The precision policies.
        target: str. A GPU of `kmp.gpt.gpus`, or "cpu". Defaults to "h100".
        gpus: int. Data-parallel devices (or the mesh's). Defaults to 1.
        gemms: tuple of str. The matmul kernels to plan with. Defaults to both.
        progress: callable or None. Called with a line before each matmul kernel's
            compilations (one child process for all policies). Defaults to None.

    Returns:
        One dict per policy: policy, remat, estimate (parts), compiled (gemm -> plan),
        estimate_total_bytes and compiled_total_bytes (the first gemm's plan).

    Raises:
        UserError: from `compiled_plan` (an unknown target, no CUDA plugin).

    Example:
    >>> from kmp.gpt.config import preset
    >>> row, = compare(preset("tiny", num_layers=1), ["float32"],
    ...                gemms=("triton",))  # doctest: +SKIP
    >>> 0.5 < row["estimate_total_bytes"] / row["compiled_total_bytes"] < 2  # doctest: +SKIP
    True
    """
    from kmp.gpt.memory import estimate_memory

    plans = {policy: {} for policy in policies}
    for gemm in gemms if target != "cpu" else ("cpu",):  # one child process per matmul flag
        if progress:
            progress(f"compiling the {', '.join(policies)} step for {target} ({gemm} matmuls)")
        compiled = compiled_plans([(config, policy) for policy in policies], target, gpus,
                                  config.mesh, config.shard, "triton" if gemm == "cpu" else gemm)
        for policy, plan in zip(policies, compiled):
            plans[policy][gemm] = plan.to_json()
    rows = []
    for policy in policies:
        est = estimate_memory(config, policy, gpus).to_json()
        rows.append({"policy": policy, "remat": config.remat, "estimate": est,
                     "compiled": plans[policy], "estimate_total_bytes": est["total"],
                     "compiled_total_bytes": next(iter(plans[policy].values()))["total"]})
    return rows


def _child(request: str) -> int:
    from kmp.gpt.config import from_json

    plans = []
    for args in json.loads(request):
        config = from_json(args.pop("config"))
        try:
            plans.append(compile_step(config, **args).to_json())
        except UserError as error:
            print(str(error), file=sys.stderr)
            return 2
    print(json.dumps(plans))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
