"""Writes docs/reliability.md's table: runs the reliability and recovery tests (serially, under
the backend of KERAS_BACKEND) and records, per fault or bad input, what each test made happen
and checked. Everything under the table marker is replaced; the text above it is kept.

    python docs/reliability.py                 # regenerates docs/reliability.md
    python docs/reliability.py -k bad_input    # extra arguments go to pytest
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "reliability.md"
MARKER = "<!-- table -->"
sys.path.insert(0, str(ROOT / "tests"))  # the same _helpers module conftest.py imports

from _helpers import RELIABILITY_ROWS  # noqa: E402


class Rows:
    """A pytest plugin that hands the `reliability` fixture a list to fill."""

    def __init__(self):
        self.rows = []

    def pytest_configure(self, config):
        config.stash[RELIABILITY_ROWS] = self.rows


def cell(text: str) -> str:
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", text)
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv) -> int:
    plugin = Rows()
    tests = [str(ROOT / "tests" / "test_recovery.py"), str(ROOT / "tests" / "test_reliability.py")]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *tests, *argv], plugins=[plugin])
    if code != 0 or not plugin.rows:
        print(f"reliability: pytest exited {code} with {len(plugin.rows)} rows; "
              f"{DOC} left as it was", file=sys.stderr)
        return int(code) or 1
    head = DOC.read_text().split(MARKER)[0] if DOC.exists() else ""
    lines = [head + MARKER, "", "| fault or bad input | what happened | test |", "|---|---|---|"]
    for nodeid, fault, outcome in plugin.rows:
        lines.append(f"| {cell(fault)} | {cell(outcome)} | `{nodeid.split('::')[-1]}` |")
    DOC.write_text("\n".join(lines) + "\n")
    print(f"reliability: {len(plugin.rows)} rows written to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
