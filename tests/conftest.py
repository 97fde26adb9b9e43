"""Shared test set-up: the Keras backend, two logical CPU devices, markers and a clean policy.

The suite runs under KERAS_BACKEND=tensorflow (the default, everything) and under jax and
torch (only the tests marked `backends`: the backend-neutral part). Tests marked `tensorflow`
use tf.distribute or other TensorFlow-only API and run only under TensorFlow.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# kmp's measured decisions (attention kernel, kmp tune) are cached per run of the suite, not in
# the user's ~/.cache/kmp: a cached tune there would change what set_policy("auto") returns.
# Made once, by the first process (pytest-xdist's workers inherit it), which removes it at exit.
if "KMP_CACHE_DIR" not in os.environ:
    os.environ["KMP_CACHE_DIR"] = tempfile.mkdtemp(prefix="kmp-test-decisions-")
    atexit.register(shutil.rmtree, os.environ["KMP_CACHE_DIR"], ignore_errors=True)
# kmp keeps JAX's compiled programs in $KMP_CACHE_DIR/jax; the suite keeps every one of them,
# not only those over JAX's 1-second default: its tests and their child processes compile the
# same micro models again and again (a micro `kmp pretrain` under JAX: 35 -> 16 s of CPU).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":  # two CPU devices for keras.distribution tests
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
    # Two threads per simulated device, or JAX's CPU client can deadlock its collectives
    # (docs/distributed.md; what `kmp --devices N` sets).
    os.environ.setdefault("PJRT_NPROC", "4")

__import__("kmp")  # before Keras: keeps JAX off CUDA where there is no driver (kmp/__init__.py)

import keras  # noqa: E402
import pytest  # noqa: E402
from _helpers import RELIABILITY_ROWS  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu,
                                               [tf.config.LogicalDeviceConfiguration()] * 2)


# The regeneration scripts in data/ run when imported: --doctest-modules must not import them.
collect_ignore_glob = ["data/*.py"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


@pytest.fixture
def reliability(request):
    """Call with (fault, outcome) once the test has checked the outcome: a row of
    docs/reliability.md when docs/reliability.py runs the tests (a no-op otherwise)."""
    rows = request.config.stash.get(RELIABILITY_ROWS, None)
    return lambda fault, outcome: (rows.append((request.node.nodeid, fault, outcome))
                                   if rows is not None else None)


MICRO = dict(vocab_size=512, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
             seq_len=32, batch_size=8, val_batches=2)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A finished `kmp pretrain` run of a micro GPT under mixed_bfloat16 (20 steps on the test
    corpus), shared read-only by the tests of what comes after training (quantize, finetune,
    export). Returns its --out directory."""
    from kmp.recipes import pretrain_gpt

    root = tmp_path_factory.mktemp("micro")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in MICRO.items()]
    argv = [*flags, "--corpus", str(Path(__file__).parent / "data" / "corpus.txt"),
            "--steps", "20", "--val-every", "10", "--warmup-steps", "2", "--samples", "0",
            "--precision", "mixed_bfloat16", "--cache-dir", str(root / "cache"),
            "--out", str(root / "run")]
    assert pretrain_gpt.main(argv) == 0
    keras.config.set_dtype_policy("float32")
    return root / "run"


@pytest.fixture
def fake_hardware(monkeypatch):
    """Call with a KMP_FAKE_HARDWARE spec ("cpu", "cpu:bf16", "gpu:9.0", "tpu") to make
    kmp.hardware.detect() report that machine for the rest of the test."""
    from kmp.hardware import detect

    def fake(spec):
        monkeypatch.setenv("KMP_FAKE_HARDWARE", spec)
        detect.cache_clear()
        return detect()

    yield fake
    monkeypatch.delenv("KMP_FAKE_HARDWARE", raising=False)
    detect.cache_clear()


def pytest_collection_modifyitems(config, items):
    """Under jax/torch keep only the backend-neutral tests (marked `backends`, or
    `backends("jax")` for a test whose path differs only there, and the docstring examples);
    skip slow tests unless asked."""
    if BACKEND != "tensorflow":
        def runs_here(item):  # @backends, or @backends("jax"): also (only) under those
            mark = item.get_closest_marker("backends")
            return (mark is not None and "tensorflow" not in item.keywords
                    and (not mark.args or BACKEND in mark.args))

        keep = [i for i in items if isinstance(i, pytest.DoctestItem) or runs_here(i)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    if not config.getoption("--runslow"):
        skip = pytest.mark.skip(reason="slow; run with --runslow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    if any("gpu" in item.keywords for item in items):
        from kmp.hardware import detect

        if detect().kind != "gpu":
            skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under float32, whatever it sets."""
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
