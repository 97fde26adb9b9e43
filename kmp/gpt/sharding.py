"""Sharded training of the recipe's GPT-2 on a device mesh: `kmp pretrain --mesh data=D,model=M
--shard fsdp|tp|fsdp+tp`, on `keras.distribution.ModelParallel` (JAX backend).

keras-hub ships layout maps for Gemma, Llama and Qwen, not for GPT-2; this is GPT-2's, for the
variable paths of `kmp.gpt.model.build_model`. The mesh has two axes, "data" (the batch, and
with fsdp every weight) and "model" (tensor parallelism). Each rule names a weight by its path
and says which of its dimensions each shard mode splits over which axis:

    fsdp      every weight (and so its Adam moments, which take the weight's layout) split
              over the data axis along its width (hidden_dim): about 1/D per device
    tp        Megatron-style over the model axis: query/key/value split by head (column-
              parallel) and the attention output by head (row-parallel); the MLP's
              intermediate kernel by column and its output kernel by row; the token
              embedding (tied to the logits) by vocabulary. Norms, output biases and the
              position embedding stay whole, as in Megatron-LM.
    fsdp+tp   both on a 2-D mesh; where both would split the same dimension, tp does

With no `shard` a mesh is plain data parallelism: every weight replicated, the batch split
over the data axis. XLA's SPMD partitioner inserts the collectives; the global step is one
program, so per-step losses equal one device's up to float32 summation order. A mesh spans
every process's devices (`--processes`); a checkpoint gathers the weights split across
processes whole for process 0 to write (`kmp.distributed.whole`).
"""

from __future__ import annotations

import contextlib
import math
import re

from kmp.errors import UserError

AXES = ("data", "model")
SHARDS = ("fsdp", "tp", "fsdp+tp")

# (path pattern, each dimension's size as a config field, fsdp's axes, tp's axes). A path is
# matched whole (`keras.distribution.LayoutMap` uses re.fullmatch), after any prefix.
RULES = (
    ("token_embedding/embeddings", ("vocab_size", "hidden_dim"),
     (None, "data"), ("model", None)),
    ("position_embedding/embeddings", ("seq_len", "hidden_dim"), (None, "data"), (None, None)),
    ("self_attention/(query|key|value)/kernel", ("hidden_dim", "num_heads", "head_dim"),
     ("data", None, None), (None, "model", None)),
    ("self_attention/(query|key|value)/bias", ("num_heads", "head_dim"),
     (None, "data"), ("model", None)),
    ("self_attention/attention_output/kernel", ("num_heads", "head_dim", "hidden_dim"),
     (None, None, "data"), ("model", None, None)),
    ("self_attention/attention_output/bias", ("hidden_dim",), ("data",), (None,)),
    ("feedforward_intermediate_dense/kernel", ("hidden_dim", "intermediate_dim"),
     ("data", None), (None, "model")),
    ("feedforward_intermediate_dense/bias", ("intermediate_dim",), ("data",), ("model",)),
    ("feedforward_output_dense/kernel", ("intermediate_dim", "hidden_dim"),
     (None, "data"), ("model", None)),
    ("feedforward_output_dense/bias", ("hidden_dim",), ("data",), (None,)),
    (r"\w*layer_norm/(gamma|beta)", ("hidden_dim",), ("data",), (None,)),
)
_WHAT = {"vocab_size": "the vocabulary", "hidden_dim": "the width", "num_heads": "the heads",
         "head_dim": "each head's width", "intermediate_dim": "the MLP width",
         "seq_len": "the positions"}


def parse_mesh(spec: str) -> dict:
    """Reads a mesh spec, "data=D,model=M" (either axis may be left out: size 1).

    Args:
        spec: str. Comma-separated AXIS=SIZE, AXIS one of "data", "model". Empty: no mesh.

    Returns:
        dict. {"data": D, "model": M}, or {} for an empty spec.

    Raises:
        UserError: for an unknown axis, a size that is not a positive integer, or an axis
            given twice.

    Example:
    >>> parse_mesh("data=4,model=2")
    {'data': 4, 'model': 2}
    >>> parse_mesh("data=8")
    {'data': 8, 'model': 1}
    """
    if not spec.strip():
        return {}
    sizes = {}
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", part)
        if not match or match[1] not in AXES or int(match[2]) < 1 or match[1] in sizes:
            raise UserError(f"Cannot read the mesh {spec!r}. Write data=D,model=M (positive "
                            "sizes, each axis once; one may be left out), e.g. data=4,model=2.",
                            field="mesh")
        sizes[match[1]] = int(match[2])
    return {axis: sizes.get(axis, 1) for axis in AXES}


def axes(shard: str) -> list[tuple[str, tuple]]:
    """Each rule's path pattern and the mesh axes `shard` splits its dimensions over.

    Args:
        shard: str. "fsdp", "tp", "fsdp+tp", or "" (nothing split: data parallelism).

    Returns:
        list of (pattern, axes), one per weight kind (`RULES`), axes a tuple of "data",
        "model" or None per dimension.

    Example:
    >>> dict(axes("fsdp+tp"))["feedforward_intermediate_dense/kernel"]
    ('data', 'model')
    """
    if shard not in ("", *SHARDS):
        raise UserError(f"Unknown shard {shard!r}. Use one of: {', '.join(SHARDS)}.",
                        field="shard")
    fsdp, tp = shard in ("fsdp", "fsdp+tp"), shard in ("tp", "fsdp+tp")
    chosen = []
    for pattern, _, by_fsdp, by_tp in RULES:
        chosen.append((pattern, tuple((t if tp and t else None) or (f if fsdp else None)
                                      for f, t in zip(by_fsdp, by_tp))))
    return chosen


def check(config, sizes: dict | None = None, shard: str | None = None) -> None:
    """Checks that `config.mesh` (or `sizes`) can carry `config.shard` (or `shard`) for
    `config`'s shape.

    Args:
        config: GPTConfig. Its `mesh`, `shard`, shape, `batch_size`, `strategy`, `processes`.
        sizes: dict or None. The mesh ({"data": D, "model": M}); defaults to `config.mesh`'s.
        shard: str or None. The shard mode; defaults to `config.shard`.

    Raises:
        UserError: for a shard without a mesh, a mesh with --strategy mirrored, an axis that
            nothing uses, an axis size that does not divide a dimension it splits (the heads,
            the width, the vocabulary...), the batch, or the data axis over processes.
    """
    sizes = parse_mesh(config.mesh) if sizes is None else sizes
    shard = config.shard if shard is None else shard
    axes(shard)  # an unknown shard
    if not sizes:
        if shard:
            raise UserError(f"shard={shard!r} needs a mesh to shard over. Give --mesh "
                            "data=D,model=M too, or drop --shard.", field="shard")
        return
    spec = ",".join(f"{a}={n}" for a, n in sizes.items())
    if config.strategy == "mirrored":
        raise UserError(f"mesh={spec} already spreads the run over devices; --strategy "
                        "mirrored does too. Drop one of them.", field="mesh")
    if sizes["model"] > 1 and shard not in ("tp", "fsdp+tp"):
        raise UserError(f"mesh={spec} has a model axis, which only tp splits over (shard="
                        f"{shard or 'none'}). Use --shard tp or fsdp+tp, or model=1.",
                        field="mesh")
    dims = {f: getattr(config, f) for f in _WHAT if f != "head_dim"}
    dims["head_dim"] = config.hidden_dim // config.num_heads
    for (_, names, *_), (_, split) in zip(RULES, axes(shard)):
        for name, axis in zip(names, split):
            if axis and dims[name] % sizes[axis]:
                raise UserError(f"mesh {axis}={sizes[axis]} does not divide {name}="
                                f"{dims[name]}: shard={shard} splits {_WHAT[name]} over the "
                                f"{axis} axis. Use a {axis} size that divides {dims[name]}.",
                                field="mesh")
    if config.batch_size % sizes["data"]:
        raise UserError(f"batch_size {config.batch_size} does not split over mesh data="
                        f"{sizes['data']}. Use a multiple of {sizes['data']}.",
                        field="batch_size")
    if sizes["data"] % config.processes:
        raise UserError(f"mesh data={sizes['data']} does not split over {config.processes} "
                        "processes (each holds whole rows of the batch). Use a data size "
                        f"that {config.processes} divides.", field="mesh")


def layout_map(config, mesh, shard: str):
    """GPT-2's `keras.distribution.LayoutMap` for `shard` on `mesh`.

    Args:
        config: GPTConfig or None. The model's shape, checked against the mesh (None: not
            checked).
        mesh: keras.distribution.DeviceMesh. Axes named "data" and "model".
        shard: str. "fsdp", "tp", "fsdp+tp" or "" (every weight replicated).

    Returns:
        A `keras.distribution.LayoutMap`; a weight no rule names is replicated.

    Raises:
        UserError: from `check`.

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh((1, 2), ("data", "model"), ["cpu:0", "cpu:1"])
    >>> m = layout_map(None, mesh, "tp")
    >>> m["transformer_layer_0/self_attention/query/kernel"].axes
    (None, 'model', None)
    """
    import keras

    if config is not None:
        check(config, dict(zip(mesh.axis_names, mesh.shape)), shard)
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, split in axes(shard):
        if any(split):
            layouts[f"(.*/)?{pattern}"] = split
    if shard:  # activations: Keras constrains a layer's output to the layout of PATH/output
        for pattern, split in activation_axes(shard):
            layouts[f"(.*/)?{pattern}/output"] = split
    return layouts


def activation_axes(shard: str) -> list[tuple[str, tuple]]:
    """The layouts the blocks' activations keep: the batch over "data" always, and under tp the
    heads and the MLP's intermediate units over "model". Without them XLA's sharding
    propagation may gather the batch instead of the weights: measured on the H100 plan of the
    small preset on 4 devices, fsdp kept the whole global batch's MLP activations on every
    device (1.46 GB per device against 0.93 GB with these layouts; kmp memory --measure
    compile).

    Example:
    >>> dict(activation_axes("tp"))["feedforward_intermediate_dense"]
    ('data', None, 'model')
    """
    tp = "model" if shard in ("tp", "fsdp+tp") else None
    return [(r"transformer_layer_\d+", ("data", None, None)),
            ("self_attention/(query|key|value)", ("data", None, tp, None)),
            ("feedforward_intermediate_dense", ("data", None, tp)),
            ("feedforward_output_dense", ("data", None, None))]


def distribution(mesh_spec: str, shard: str, devices=None, config=None):
    """A `keras.distribution.ModelParallel` with GPT-2's layouts over a device mesh.

    Args:
        mesh_spec: str. "data=D,model=M" (`parse_mesh`).
        shard: str. "fsdp", "tp", "fsdp+tp", or "" (data parallelism).
        devices: list or None. The mesh's devices, D x M of them (e.g. compile-only devices
            from `jax.experimental.topologies`; they need not be local); the first D x M are
            used. Defaults to None: this run's JAX devices (every process's).
        config: GPTConfig or None. Checked against the mesh (`check`). Defaults to None.

    Returns:
        A `keras.distribution.Distribution` sharding the batch over "data" (set it with
        `keras.distribution.set_distribution`, or use `distribute`).

    Raises:
        UserError: for a bad spec or shard, a mesh the config does not fit, a mesh larger
            than the devices, or (several processes) smaller than them.

    Example:
    >>> d = distribution("data=2", "fsdp", devices=["cpu:0", "cpu:1"])
    >>> d.device_mesh.axis_names
    ('data', 'model')
    """
    import keras

    sizes = parse_mesh(mesh_spec)
    if not sizes:
        raise UserError("A sharded run needs a mesh. Give data=D,model=M.", field="mesh")
    axes(shard)
    if config is not None:
        check(config, sizes, shard)
    wanted = math.prod(sizes.values())
    if devices is None:
        import jax

        devices = jax.devices()
        if jax.process_count() > 1 and wanted != len(devices):
            raise UserError(f"mesh={mesh_spec} spans {wanted} devices; the run's "
                            f"{jax.process_count()} processes have {len(devices)}, and each "
                            "must take part. Use a mesh of all of them.", field="mesh")
    devices = list(devices)
    if wanted > len(devices):
        raise UserError(f"mesh={mesh_spec} needs {wanted} devices; there are {len(devices)}. "
                        f"Use a smaller mesh, or rehearse on a CPU with kmp --devices "
                        f"{wanted}.", field="mesh")
    mesh = keras.distribution.DeviceMesh(tuple(sizes[a] for a in AXES), AXES,
                                         devices[:wanted])
    return keras.distribution.ModelParallel(layout_map=layout_map(None, mesh, shard),
                                            batch_dim_name="data")


@contextlib.contextmanager
def distribute(config):
    """Trains the body on `config.mesh` with `config.shard`'s layouts (JAX backend): sets the
    distribution, restores the previous one after. Each process feeds its own rows of the
    batch (`kmp.distributed.shard`). Yields the number of devices.

    Raises:
        UserError: on another backend than JAX, and from `distribution`.
    """
    import keras

    from kmp import backends, distributed

    backends.require("Sharded training (--mesh)", "jax")
    chosen = distribution(config.mesh, config.shard, config=config)
    chosen.auto_shard_dataset = distributed.process_count() == 1
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(chosen)
    try:
        yield math.prod(chosen.device_mesh.shape)
    finally:
        keras.distribution.set_distribution(previous)


def unmatched(weights, shard: str) -> list[str]:
    """The paths among `weights` that no rule of `shard` splits (for tests and reports).

    Example:
    >>> class W: path = "transformer_layer_0/feedforward_output_dense/bias"
    >>> unmatched([W()], "tp")
    ['transformer_layer_0/feedforward_output_dense/bias']
    """
    split = [re.compile(f"(.*/)?{p}") for p, a in axes(shard) if any(a)]
    return [w.path for w in weights if not any(r.fullmatch(w.path) for r in split)]


def state_bytes_per_device(model) -> int:
    """Bytes of the weights and optimizer state one device holds (the most loaded one), from
    the arrays' addressable shards; a variable that is not a sharded array counts whole.

    Example:
    >>> import keras
    >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> state_bytes_per_device(m)  # 3 x 2 + 2 float32
    32
    """
    import numpy as np

    seen, per_device, whole = set(), {}, 0
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        shards = getattr(v.value, "addressable_shards", None)
        if shards is None:
            whole += int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
            continue
        for s in shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return whole + max(per_device.values(), default=0)
