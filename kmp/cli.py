"""The `kmp` command: parses the common options, picks the Keras backend, dispatches.

Each command's options and work live beside the code it runs (`kmp bench` in kmp.gpt.bench,
`kmp memory` in kmp.gpt.memory, the diagnoses in kmp.gpt.diagnose, `kmp pretrain` in the
recipe), each as a `main(argv)` that parses its own options. Nothing here imports Keras at
module level: the backend must be chosen before Keras loads. User errors
(`kmp.errors.UserError`) and runs that cannot go on (`kmp.errors.TrainingStopped`) print one
line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from kmp.errors import TrainingStopped, UserError

BACKENDS = ("tensorflow", "jax", "torch")  # kmp.backends.SUPPORTED, named without Keras
# What each backend imports, and how to install it.
_PACKAGES = {"tensorflow": ("tensorflow", "TensorFlow", "pip install tensorflow"),
             "jax": ("jax", "JAX", 'pip install "kmp[jax]"'),
             "torch": ("torch", "PyTorch", 'pip install "kmp[torch]"')}
# command -> (module with its main(argv), help line)
_COMMANDS = {
    "pretrain": ("kmp.recipes.pretrain_gpt",
                 "pretrain a GPT on a corpus (kmp pretrain --help lists the options)"),
    "bench": ("kmp.gpt.bench", "compare precisions and XLA on a GPT preset (kmp bench --help)"),
    "tune": ("kmp.gpt.autotune", "choose precision, XLA and attention kernel by training a GPT "
             "preset a few steps on this machine, and cache the choice (kmp tune --help)"),
    "memory": ("kmp.gpt.memory", "training memory of a GPT preset per device, estimated and "
               "as XLA plans it for a GPU (kmp memory --help)"),
    "plan": ("kmp.gpt.plan", "what fits on a GPU: precision, remat, sharding, micro-batch and "
             "accumulation for a model size (kmp plan --help)"),
    "export": ("kmp.gpt.export",
               "export a trained GPT run to LiteRT and check the file (kmp export --help)"),
    "quantize": ("kmp.gpt.quantize",
                 "quantize a trained GPT run and price each mode (kmp quantize --help)"),
    "finetune": ("kmp.gpt.finetune", "fine-tune a keras-hub preset (LoRA, int8/int4 base) or "
                 "a trained run (--qat int4) in mixed precision (kmp finetune --help)"),
}
# The diagnoses, all run by kmp.gpt.diagnose.main(argv, command).
_DIAGNOSES = {
    "audit": "per-layer dtypes, FP32 islands, Tensor Core shapes and known traps",
    "parity": "the model under its policy against float32: every layer, the loss, the gradients",
    "trace": "the first layer whose output or gradient is inf/NaN",
    "grads": "|gradient| against the float16 range, and a suggested loss scale",
}


def _keras_json() -> Path:
    """Where Keras reads its keras.json: $KERAS_HOME, else ~/.keras (/tmp/.keras where the home
    directory is not writable). Mirrors keras/src/backend/config.py (checked against Keras
    3.15.1), which cannot be imported before the backend is chosen."""
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(os.path.expanduser(home)) / "keras.json"


def backend_setting(flag: str | None = None) -> tuple[str, str]:
    """The Keras backend `kmp` uses and where that came from, as Keras itself decides it.

    Args:
        flag: str or None. The `--backend` option, if given. Defaults to None.

    Returns:
        (backend, source): `flag`, else $KERAS_BACKEND, else the "backend" in keras.json
        (see `_keras_json`), else "tensorflow" (Keras's default).

    Example:
    >>> backend_setting("jax")
    ('jax', '--backend')
    """
    if flag:
        return flag, "--backend"
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "$KERAS_BACKEND"
    path = _keras_json()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("backend"):
        return str(saved["backend"]), str(path)
    return "tensorflow", "the default"


def _set_backend(argv: list[str]) -> list[str]:
    """Takes `--backend NAME` (anywhere in argv), checks the chosen backend can load, and sets
    KERAS_BACKEND before Keras loads. Returns argv without `--backend`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--backend", choices=BACKENDS)
    known, rest = parser.parse_known_args(argv)
    loaded = sys.modules.get("keras")
    if loaded is not None and not known.backend:
        return rest  # this process's Keras has chosen already
    name, source = backend_setting(known.backend)
    where = "" if source == "--backend" else f" (from {source})"
    if name not in BACKENDS:
        raise UserError(f"Unknown Keras backend {name!r}{where}. kmp runs on "
                        f"{', '.join(BACKENDS)}: pass --backend with one of them.")
    module, package, install = _PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a module without a spec
        found = False
    if not found:
        raise UserError(f"the {name} backend{where} needs {package}: {install}")
    if loaded is not None and loaded.backend.backend() != name:
        raise UserError(f"--backend {name}: Keras is already loaded with the "
                        f"{loaded.backend.backend()} backend in this process. "
                        "Choose the backend before Keras is imported.")
    os.environ["KERAS_BACKEND"] = name
    return rest


def simulate_devices(count: int) -> None:
    """Makes JAX show `count` CPU devices (XLA's --xla_force_host_platform_device_count, added
    to any XLA_FLAGS already set), for rehearsing a mesh on one machine. Must run before JAX
    loads; child processes (--processes workers) inherit it.

    It also gives JAX's CPU client 2 x `count` threads (PJRT_NPROC, unless already larger;
    `device_environment`). The client runs both the per-device launches of a multi-device
    program and the device programs themselves on one pool, of max(cores, devices) threads
    by default. A launch blocks its thread while its device has 32 programs in flight, and a
    program with a collective needs all `count` device programs running at once (each waits
    in the rendezvous for the others): with fewer than 2 x `count` threads, `count` blocked
    launches and `count - 1` programs in a rendezvous take every thread, and the last
    device's program never starts ("Expected 4 threads to join the rendezvous, but only 3 of
    them arrived"; found with gdb on jaxlib 0.10.2, docs/distributed.md). The wait allowed at
    a collective is raised to 10 minutes (unless XLA_FLAGS sets it): simulated devices share
    the machine's cores, and a slow one is not a hung one.

    Raises:
        UserError: for a count below 1, or when this process has loaded JAX already with
            another count.
    """
    if count < 1:
        raise UserError(f"--devices must be >= 1. Received: {count}")
    new = device_environment(count)
    if "jax" in sys.modules and new["XLA_FLAGS"] != os.environ.get("XLA_FLAGS"):
        raise UserError(f"--devices {count}: JAX is already loaded in this process, so its "
                        "devices are fixed. Start kmp afresh with --devices.")
    os.environ.update(new)


def device_environment(count: int, environ=None) -> dict:
    """The XLA_FLAGS and PJRT_NPROC that `simulate_devices` sets for `count` CPU devices.

    Args:
        count: int. The devices JAX is to show.
        environ: mapping or None. The environment they are added to (its XLA_FLAGS are kept,
            but for the device count; its collective waits are kept; a PJRT_NPROC above
            2 x `count` is kept). Defaults to None: os.environ.

    Returns:
        dict. {"XLA_FLAGS": str, "PJRT_NPROC": str}, for a child's environment or os.environ.

    Example:
    >>> device_environment(4, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"})["PJRT_NPROC"]
    '8'
    """
    environ = os.environ if environ is None else environ
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    waits = [f"--xla_cpu_collective_call_{k}_timeout_seconds={v}"
             for k, v in (("warn_stuck", 120), ("terminate", 600))]
    # Each simulated device computes its matmuls on its own thread (single-threaded Eigen)
    # rather than each splitting them over one intra-op pool shared by all devices: the
    # devices already share the cores. (Not the cause of the hangs it was once added for.)
    waits.append("--xla_cpu_multi_thread_eigen=false")
    flags = " ".join([*kept, f"{flag}={count}",
                      *(w for w in waits if w.split("=")[0] not in " ".join(kept))])
    try:
        asked = int(environ.get("PJRT_NPROC", "0"))
    except ValueError:
        asked = 0
    return {"XLA_FLAGS": flags, "PJRT_NPROC": str(max(2 * count, asked))}


@contextlib.contextmanager
def _quiet_stderr():
    """Hides what native libraries write to stderr while loading (TensorFlow's start-up lines,
    which come before its log level is read); shows it again if the import fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _load_quietly(command: str):
    """Imports the backend (and keras-hub, which imports TensorFlow whenever it is installed)
    before any output, so kmp's own lines come first and TensorFlow's start-up noise is gone."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also hides the CPU-only cuInit error
    with _quiet_stderr():
        from kmp import backends

        backends.current()  # the backend's seam module imports the backend itself
        if command not in ("doctor",):
            import keras_hub  # noqa: F401


def _estimate_only(command: str, rest: list[str]) -> bool:
    """Whether the command is arithmetic on a config (`kmp plan`, `kmp memory` without
    `--measure gpu`): it needs no backend, and loading TensorFlow would cost seconds. Its
    compile checks load JAX themselves."""
    if command == "plan":
        return True
    measure = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--measure"]
    measure += [a.split("=", 1)[1] for a in rest if a.startswith("--measure=")]
    return command == "memory" and "gpu" not in measure


def _doctor() -> int:
    from kmp import backends
    from kmp.hardware import detect
    from kmp.policy import POLICIES, plan

    hw = detect()
    print(f"kmp doctor\n  hardware: {hw.describe()}")
    versions = ", ".join(f"{k} {v}" for k, v in backends.versions().items())
    print(f"  versions: {versions}; backend {backends.name()}")
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if backends.name() == "tensorflow" and onednn is not None:
        who = ("set by kmp: TensorFlow's default is on only for x86 CPUs with AVX512_VNNI, "
               "AVX512_BF16 or AMX; TF_ENABLE_ONEDNN_OPTS=0 turns them off"
               if os.environ.get("KMP_ONEDNN_SET") else f"TF_ENABLE_ONEDNN_OPTS={onednn}")
        print(f"  oneDNN kernels: {'off' if onednn == '0' else 'on'} ({who})")
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
    """Entry point of the `kmp` console script.

    Args:
        argv: list of str or None. The arguments after `kmp`. Defaults to sys.argv[1:].

    Returns:
        The exit status: 0, or 2 for a user error or a run that stopped.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="kmp", description="Keras mixed-precision kit.",
        epilog="--backend tensorflow|jax|torch (anywhere on the line) picks the Keras backend; "
        "default: $KERAS_BACKEND, else the backend in keras.json ($KERAS_HOME or ~/.keras), "
        "else tensorflow.")
    parser.add_argument("--backend", choices=BACKENDS, help="the Keras backend (default: "
                        "$KERAS_BACKEND, else keras.json's, else tensorflow)")
    parser.add_argument("--devices", type=int, metavar="N", help="simulate N host (CPU) "
                        "devices for JAX, to rehearse a --mesh on a CPU (before the command)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="show the hardware, the plan for each policy, and the pick")
    helps = {**{name: text for name, (_, text) in _COMMANDS.items()},
             **{name: f"{text} (kmp {name} --help)" for name, text in _DIAGNOSES.items()}}
    for name, text in helps.items():
        sub.add_parser(name, add_help=False, help=text)
    args, _ = parser.parse_known_args(argv)
    try:
        rest = _set_backend(argv)
        if args.devices is not None:
            simulate_devices(args.devices)
        rest = rest[rest.index(args.command) + 1:]
        if args.command == "doctor" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if not _estimate_only(args.command, rest):
            _load_quietly(args.command)
        if args.command == "doctor":
            return _doctor()
        if args.command in _DIAGNOSES:
            return importlib.import_module("kmp.gpt.diagnose").main(rest, args.command)
        if args.command in _COMMANDS:
            return importlib.import_module(_COMMANDS[args.command][0]).main(rest)
    except UserError as e:  # the user's mistake: one line, exit 2
        flag = f"--{e.field.replace('_', '-')}: " if e.field else ""
        print(f"kmp: error: {flag}{e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a run that broke: what happened and what to try, one line
        print(f"kmp: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        print("kmp: this is a bug in kmp (or in a library it calls), not something you did "
              "wrong; please report it with the traceback below.", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
