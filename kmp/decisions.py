"""Decisions kmp makes by measuring on the machine itself, and the on-disk cache that keeps them.

A measured decision (the attention kernel `kmp.harden(attention="auto")` keeps, the policy and
XLA setting `kmp tune` picks) depends on the machine, the Keras backend and their versions.
Each is measured once per key and kept in `decisions.json` under the cache directory
(`$KMP_CACHE_DIR`, else `~/.cache/kmp`). The key holds the Keras version and the backend's, so
an upgrade measures again; an entry of the same key under other versions is dropped when the
new one is written. Writes are atomic (a temporary file renamed over the old one); two
processes writing at once may lose one entry, which is measured again next time.

The precision and XLA decision is measured by `kmp.model_tuning` (any Keras model) and
`kmp.gpt.autotune` (`kmp tune`, a GPT); the attention kernel by `kmp.harden(attention="auto")`.

Example:
>>> import os, tempfile
>>> os.environ["KMP_CACHE_DIR"] = tempfile.mkdtemp()
>>> key = {"decision": "example", "backend": "tensorflow"}
>>> lookup(key, versions={"keras": "3.15.1"}) is None
True
>>> record(key, {"choice": "fused"}, versions={"keras": "3.15.1"})
>>> lookup(key, versions={"keras": "3.15.1"})["choice"]
'fused'
>>> lookup(key, versions={"keras": "3.16.0"}) is None
True
>>> del os.environ["KMP_CACHE_DIR"]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

ENV = "KMP_CACHE_DIR"
FILENAME = "decisions.json"
_FORMAT = 1  # the file's layout; another layout is ignored (and rewritten)


def cache_dir() -> Path:
    """kmp's cache directory: `$KMP_CACHE_DIR`, else `~/.cache/kmp` (decisions, JAX's
    compiled programs)."""
    return Path(os.environ.get(ENV) or "~/.cache/kmp").expanduser()


def cache_path() -> Path:
    """Where the decisions are kept: `$KMP_CACHE_DIR/decisions.json`, else
    `~/.cache/kmp/decisions.json`."""
    return cache_dir() / FILENAME


def current_versions() -> dict:
    """The versions a measurement holds for: Keras's and the active backend's."""
    from kmp import backends  # Keras, loaded only when a decision is looked up

    return backends.versions()


def key(decision: str, hardware=None, **fields) -> dict:
    """The cache key of a `decision` ("attention", "precision") on this backend and device
    (`hardware`, default `kmp.hardware.detect()`), with the decision's own `fields`."""
    from kmp import backends
    from kmp.hardware import detect

    hw = hardware or detect()
    return {"decision": decision, "backend": backends.name(), "device": f"{hw.kind}: {hw.name}",
            **fields}


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _name(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def lookup(key: dict, versions: dict | None = None) -> dict | None:
    """The value recorded for `key` under `versions`, or None.

    Args:
        key: dict of str. What the decision depends on besides versions (e.g. backend,
            device, compute dtype, shape).
        versions: dict or None. Defaults to `current_versions()`: Keras's and the backend's.

    Returns:
        The recorded dict (with "recorded_at", seconds since the epoch), or None.
    """
    entry = _load(cache_path()).get(_name(key))
    wanted = current_versions() if versions is None else versions
    if not isinstance(entry, dict) or entry.get("versions") != wanted:
        return None
    return entry.get("value")


def record(key: dict, value: dict, versions: dict | None = None) -> None:
    """Keeps `value` for `key` under `versions` (replacing any entry of that key).

    Args:
        key: dict of str. As for `lookup`.
        value: dict. JSON-serializable.
        versions: dict or None. Defaults to `current_versions()`.
    """
    path = cache_path()
    entries = _load(path)
    wanted = current_versions() if versions is None else versions
    entries[_name(key)] = {"versions": wanted,
                           "value": {**value, "recorded_at": round(time.time())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".decisions.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
