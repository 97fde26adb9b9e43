"""The wheel users install: built from this tree, installed without the checkout, every module
of the source tree imports from it (an editable install would hide a missing package)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
CHECK = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
import kmp
assert kmp.__file__.startswith(sys.argv[1]), kmp.__file__
for name in sys.argv[2:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 2)
"""


def _modules() -> list[str]:
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts)
             for p in (ROOT / "kmp").rglob("*.py")]
    names = [n.removesuffix(".__init__") for n in names]
    return sorted(names) + ["kmp.recipes.pretrain_gpt"]


def test_a_real_wheel_install_imports_every_module(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside pyproject.toml
    for name in ("kmp", "recipes"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (built,) = (tmp_path / "dist").glob("kmp-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                              "--target", str(target), str(built)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    modules = _modules()
    assert len(modules) > 40 and "kmp.backends._jax" in modules
    done = subprocess.run([sys.executable, "-c", CHECK, str(target), *modules],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"KERAS_BACKEND": "jax", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(modules)}" in done.stdout
