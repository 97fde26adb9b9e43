"""Training across processes and machines on Keras's own engine: `keras.distribution` on JAX.

A run across N processes is N copies of the same script, told apart by three environment
variables that Keras reads (`keras.distribution.initialize`, which starts `jax.distributed`):

    KERAS_DISTRIBUTION_JOB_ADDRESSES   the coordinator's host:port (process 0's)
    KERAS_DISTRIBUTION_NUM_PROCESSES   N
    KERAS_DISTRIBUTION_PROCESS_ID      this process, 0 .. N-1

Any launcher that sets them works (SLURM, Kubernetes, ssh: docs/distributed.md).
`launch_local` is the local one behind `kmp pretrain --processes N`: a coordinator on
127.0.0.1 at a free port, one GPU per process where the machine has enough (else one CPU
device each; a JAX_PLATFORMS the user set is kept), and a watch over the workers: when one
dies, the others are stopped (they would wait forever in the next all-reduce) and the
launcher says which; a worker's user error or stopped run is reported as such.

Every process computes the same SPMD program over the global batch: each feeds its own rows
of it (`shard`), Keras assembles them (`jax.make_array_from_process_local_data`), and the
gradients, the loss scaler's finiteness check and the weights are global. Process 0 writes;
weights a `--shard` splits across processes are gathered whole for it by every process
(`whole`, `gather`). TensorFlow's MultiWorkerMirroredStrategy is not used: with Keras 3 it
fails (keras-team/keras#20585).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kmp.errors import TrainingStopped, UserError

ADDRESS, COUNT, INDEX = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                         "KERAS_DISTRIBUTION_PROCESS_ID")
GRACE_SECONDS = 5  # after one worker dies: SIGTERM to the others, then SIGKILL
ERRORS = "KMP_WORKER_ERRORS"  # where `launch`'s workers leave the error that stopped them


def process_count() -> int:
    """How many processes this run spans (1 without the environment above)."""
    return int(os.environ.get(COUNT, "1") or 1)


def process_index() -> int:
    """This process's index, 0 .. process_count() - 1 (0 alone)."""
    return int(os.environ.get(INDEX, "0") or 0)


def is_chief() -> bool:
    """Whether this process writes the run's outputs (process 0)."""
    return process_index() == 0


def shard(rows: int) -> slice:
    """This process's rows of a global batch of `rows` (which the process count divides).

    Example:
    >>> shard(8)
    slice(0, 8, None)
    """
    count, index = process_count(), process_index()
    if rows % count:
        raise UserError(f"The batch of {rows} does not split over {count} processes. Use a "
                        f"batch size that {count} divides.", field="batch_size")
    per = rows // count
    return slice(index * per, (index + 1) * per)


def initialize():
    """Joins this process to the run (a no-op for one process) and sets Keras's distribution:
    data-parallel over every device of every process. Returns the number of devices."""
    if process_count() == 1:
        return None
    import keras

    from kmp import backends

    # Keras's multi-host path; TensorFlow's MultiWorkerMirroredStrategy fails with Keras 3
    # (keras-team/keras#20585).
    backends.require("Training across processes", "jax")
    import jax

    keras.distribution.initialize()  # reads the three variables; starts jax.distributed
    mesh = keras.distribution.DataParallel(devices=jax.devices())
    mesh.auto_shard_dataset = False  # each process already reads its own rows (`shard`)
    keras.distribution.set_distribution(mesh)
    return len(jax.devices())


def join(processes: int, log_dir) -> int | None:
    """Joins this process to a run across `processes` processes started by a launcher
    (`launch_local`, or any that sets the environment above): checks the count, sends the
    output of every process but 0 to `log_dir/worker-K.log`, and sets Keras's distribution
    (`initialize`). Returns the number of devices, or None for a process alone.

    Raises:
        UserError: when the launcher started another number of processes.
    """
    if processes > 1 and process_count() != processes:
        raise UserError(f"processes={processes}, but the launcher started {process_count()} "
                        f"({COUNT}). Give the same count, or drop processes.",
                        field="processes")
    if not is_chief():  # only process 0 talks and writes
        log_to_file(log_dir)
    return initialize()


def launch_local(command: list[str], processes: int, out, prepare=None) -> int:
    """`kmp COMMAND --processes N` on one machine: N workers of `kmp COMMAND` on the JAX
    backend, one GPU each when the machine has N, else one CPU device each.

    Args:
        command: list of str. The kmp command and its arguments, e.g. ["pretrain", ...].
        processes: int. How many workers.
        out: str or Path. The run directory (the workers' logs go to its logs/).
        prepare: callable or None. Runs before any worker starts: the run's checks (a user
            error stops here, not in N workers) and what the workers share (a data cache
            built once, not by N workers at once). Defaults to None.

    Raises:
        UserError: when JAX is missing; from `prepare`; a worker's user error.
        TrainingStopped: when a worker failed (see `launch`).
    """
    import importlib.util
    import shlex

    if importlib.util.find_spec("jax") is None:
        raise UserError("Training across processes runs on the JAX backend, which is not "
                        "installed. pip install 'kmp[jax]'.", field="processes")
    if prepare is not None:
        prepare()
    from kmp.hardware import detect

    print("processes: the workers run on the JAX backend (Keras's multi-host path; "
          "TensorFlow's MultiWorkerMirroredStrategy fails with Keras 3, keras-team/keras#20585)")
    hardware = detect()
    devices = worker_devices(processes, hardware.count if hardware.kind == "gpu" else 0)
    where = ("one GPU each" if "CUDA_VISIBLE_DEVICES" in devices[0]
             else f"JAX_PLATFORMS={devices[0]['JAX_PLATFORMS']}")
    resume = [*command, *([] if "--resume" in command else ["--resume"])]
    hint = shlex.join(["kmp", "--backend", "jax", *resume])
    print(f"processes: starting {processes} workers ({where}); process 0 prints and writes "
          f"{out}, the others log to {Path(out) / 'logs'}/worker-K.log", flush=True)
    return launch([sys.executable, "-m", "kmp.cli", "--backend", "jax", *command], processes,
                  hint, devices)


@contextlib.contextmanager
def local():
    """Keras's distribution switched off for the body: for what one process does alone.

    Saving creates variables (keras 3.15.1: `saving_lib.get_attr_skipset` builds a throwaway
    optimizer), and under a multi-process distribution every variable creation is a
    collective that all processes must join: process 0 saving alone would wait for the others
    forever. The weights themselves are replicated, so process 0 reads them locally.
    """
    if process_count() == 1:
        yield
        return
    import keras

    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


@contextlib.contextmanager
def whole(model):
    """Every variable of `model` and its optimizer whole on every process for the body, for
    process 0 to save: a weight split across processes (`--shard` with `--processes`) is laid
    out replicated, then laid out as it was after. Every process must enter it, in the same
    order (the re-layout is a collective). A no-op where no variable is split across
    processes.

    Example:
    >>> import keras
    >>> with whole(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])):
    ...     pass
    """
    from kmp import _keras

    split = _relayout(model)
    try:
        yield
    finally:
        for variable, value in split:
            _keras.replace_variable_value(variable, value)


def gather(model) -> None:
    """Lays out every variable of `model` split across processes replicated, for good (the end
    of a run: what comes after reads whole weights on every process). Every process must call
    it, in the same order."""
    _relayout(model)


def _relayout(model) -> list:
    """Replicates every variable split across processes; returns [(variable, old value)]."""
    if process_count() == 1:
        return []
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from kmp import _keras

    optimizer = getattr(model, "optimizer", None)
    variables = [*model.weights, *(optimizer.variables if optimizer is not None else [])]
    split = []
    for variable in {id(v): v for v in variables}.values():
        value = variable.value
        if getattr(value, "is_fully_addressable", True):
            continue
        split.append((variable, value))
        # `assign` would lay it out again by the variable's layout, which is the split one.
        _keras.replace_variable_value(variable, jax.device_put(
            value, NamedSharding(value.sharding.mesh, PartitionSpec())))
    return split


def log_to_file(directory) -> None:
    """Sends this process's stdout and stderr to `directory/worker-K.log` (K > 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f"worker-{process_index()}.log",
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


@contextlib.contextmanager
def reporting():
    """Around a worker's work: a `UserError` or `TrainingStopped` leaving the body is also
    written where `launch` looks (its error directory), so the launcher reports it as what
    it is, not as a crash. A no-op outside `launch`."""
    try:
        yield
    except (UserError, TrainingStopped) as e:
        directory = os.environ.get(ERRORS)
        if directory:
            kind = "user" if isinstance(e, UserError) else "stopped"
            Path(directory, f"worker-{process_index()}.json").write_text(json.dumps(
                {"kind": kind, "message": str(e), "field": getattr(e, "field", None)}))
        raise


def worker_devices(processes: int, accelerators: int) -> list[dict]:
    """Each local worker's device environment: one GPU each (CUDA_VISIBLE_DEVICES) when the
    machine has at least `processes` of them, else one CPU device each. A JAX_PLATFORMS the
    user set is kept as it is.

    Example:
    >>> worker_devices(2, 0)
    [{'JAX_PLATFORMS': 'cpu'}, {'JAX_PLATFORMS': 'cpu'}]
    >>> worker_devices(2, 4)[1]
    {'CUDA_VISIBLE_DEVICES': '1'}
    """
    chosen = os.environ.get("JAX_PLATFORMS")
    if chosen is not None and chosen != os.environ.get("KMP_JAX_PLATFORMS_SET"):  # the user's
        return [{"JAX_PLATFORMS": chosen}] * processes
    if accelerators >= processes:
        return [{"CUDA_VISIBLE_DEVICES": str(k)} for k in range(processes)]
    return [{"JAX_PLATFORMS": "cpu"}] * processes


def launch(command: list[str], processes: int, resume_hint: str, devices=None,
           poll: float = 0.2) -> int:
    """Runs `command` as `processes` local worker processes of one run and waits for them.

    Args:
        command: list of str. The worker's command line (the same for each).
        processes: int. How many.
        resume_hint: str. The command that resumes the run, for the message when one dies.
        devices: list of dict or None. Each worker's device environment (`worker_devices`).
            Defaults to None: one CPU device each.
        poll: float. Seconds between looks at the workers.

    Returns:
        0 when every worker finished.

    Raises:
        UserError: when a worker stopped on a user error (the same message).
        TrainingStopped: when a worker's run stopped or a worker failed; the others are
            stopped first.
    """
    with tempfile.TemporaryDirectory(prefix="kmp-workers-") as errors:
        return _run(command, processes, resume_hint, devices or worker_devices(processes, 0),
                    errors, poll)


def _run(command, processes, resume_hint, devices, errors, poll) -> int:
    port = free_port()
    env = {**os.environ, ADDRESS: f"127.0.0.1:{port}", COUNT: str(processes),
           "KERAS_BACKEND": "jax", ERRORS: errors}
    env.pop("JAX_PLATFORMS", None)
    workers = [subprocess.Popen(command, env={**env, **devices[k], INDEX: str(k)})
               for k in range(processes)]
    try:
        while True:
            codes = [w.poll() for w in workers]
            failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                break
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll)
    except BaseException:
        _stop(workers)
        raise
    _stop(workers)
    reported = sorted(Path(errors).glob("worker-*.json"))
    if reported:  # a user error or a stopped run, which every worker met alike
        error = json.loads(reported[0].read_text())
        if error["kind"] == "user":
            raise UserError(error["message"], field=error["field"])
        raise TrainingStopped(error["message"])
    k = failed[0]
    where = "" if k == 0 else f" (its log: logs/worker-{k}.log in the run's directory)"
    raise TrainingStopped(f"worker {k} of {processes} stopped ({_how(codes[k])}){where}; "
                          f"the other workers were stopped. Resume with: {resume_hint}")


def _stop(workers) -> None:
    """SIGTERM to the workers still running, SIGKILL to those alive `GRACE_SECONDS` later."""
    for w in workers:
        if w.poll() is None:
            w.terminate()
    deadline = time.time() + GRACE_SECONDS
    for w in workers:
        try:
            w.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
