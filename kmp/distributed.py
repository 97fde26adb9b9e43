"""Training across processes and machines on Keras's own engine: `keras.distribution` on JAX.

A run across N processes is N copies of the same script, told apart by three environment
variables that Keras reads (`keras.distribution.initialize`, which starts `jax.distributed`):

    KERAS_DISTRIBUTION_JOB_ADDRESSES   the coordinator's host:port (process 0's)
    KERAS_DISTRIBUTION_NUM_PROCESSES   N
    KERAS_DISTRIBUTION_PROCESS_ID      this process, 0 .. N-1

Any launcher that sets them works (SLURM, Kubernetes, ssh: docs/distributed.md). `launch`
is the local one behind `kmp pretrain --processes N`: a coordinator on 127.0.0.1 at a free
port, one CPU device per process (unless JAX_PLATFORMS says otherwise), and a watch over
the workers: when one dies, the others are stopped (they would wait forever in the next
all-reduce) and the launcher says which.

Every process computes the same SPMD program over the global batch: each feeds its own rows
of it (`shard`), Keras assembles them (`jax.make_array_from_process_local_data`), and the
gradients, the loss scaler's finiteness check and the weights are global. TensorFlow's
MultiWorkerMirroredStrategy is not used: with Keras 3 it fails (keras-team/keras#20585).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kmp.errors import TrainingStopped, UserError

ADDRESS, COUNT, INDEX = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                         "KERAS_DISTRIBUTION_PROCESS_ID")
GRACE_SECONDS = 5  # after one worker dies: SIGTERM to the others, then SIGKILL


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

    if keras.backend.backend() != "jax":
        raise UserError(f"Training across processes runs on the JAX backend (Keras's "
                        f"multi-host path); this is {keras.backend.backend()}. TensorFlow's "
                        "MultiWorkerMirroredStrategy fails with Keras 3 (keras-team/keras"
                        "#20585). Run: kmp --backend jax pretrain ...", field="processes")
    import jax

    keras.distribution.initialize()  # reads the three variables; starts jax.distributed
    mesh = keras.distribution.DataParallel(devices=jax.devices())
    mesh.auto_shard_dataset = False  # each process already reads its own rows (`shard`)
    keras.distribution.set_distribution(mesh)
    return len(jax.devices())


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


def launch(command: list[str], processes: int, resume_hint: str, poll: float = 0.2) -> int:
    """Runs `command` as `processes` local worker processes of one run and waits for them.

    Args:
        command: list of str. The worker's command line (the same for each).
        processes: int. How many.
        resume_hint: str. The command that resumes the run, for the message when one dies.
        poll: float. Seconds between looks at the workers.

    Returns:
        0 when every worker finished.

    Raises:
        TrainingStopped: when a worker failed; the others are stopped first.
    """
    port = free_port()
    env = {**os.environ, ADDRESS: f"127.0.0.1:{port}", COUNT: str(processes),
           "KERAS_BACKEND": "jax", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    workers = [subprocess.Popen(command, env={**env, INDEX: str(k)})
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
