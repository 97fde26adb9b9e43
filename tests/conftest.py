"""Shared test set-up: two logical CPU devices (for tf.distribute tests) and a clean policy."""

import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--reliability-doc", metavar="PATH",
                     help="write the faults and bad inputs the tests tried, and what happened, "
                     "as a Markdown table to PATH (docs/reliability.md)")


_RELIABILITY = []  # (test id, fault or input, what happened), in test order


@pytest.fixture
def reliability(request):
    """Call with (fault, outcome) once the test has checked the outcome."""
    return lambda fault, outcome: _RELIABILITY.append((request.node.nodeid, fault, outcome))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--reliability-doc")
    if not path or not _RELIABILITY:
        return
    head = Path(path).read_text().split("<!-- table -->")[0] if Path(path).exists() else ""
    lines = [head + "<!-- table -->", "", "| fault or bad input | what happened | test |",
             "|---|---|---|"]

    def cell(text):
        text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", text)
        return text.replace("|", "\\|").replace("\n", " ")

    for nodeid, fault, outcome in _RELIABILITY:
        lines.append(f"| {cell(fault)} | {cell(outcome)} | `{nodeid.split('::')[-1]}` |")
    Path(path).write_text("\n".join(lines) + "\n")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under float32, whatever it sets."""
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
