"""The one-way layering (docs/architecture.md), checked by import-linter's contracts in setup.cfg: the package keeps
them, and a copy of it with one upward import (inside a function: those count too) breaks them."""
import os
import shutil
import subprocess
import sys
from conftest import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def lint_imports(root) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([LINT_IMPORTS, "--config", os.path.join(str(root), "setup.cfg"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_the_package_keeps_its_import_contracts():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(os.path.join(REPO, "gpt2_ascend"), tmp_path / "gpt2_ascend", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "setup.cfg"), tmp_path / "setup.cfg")
    with open(tmp_path / "gpt2_ascend" / "model.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _seeded():\n    from .train import run  # noqa: F401  (the model reaching up to training)\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "gpt2_ascend.model -> gpt2_ascend.train.run" in proc.stdout and "broken." in proc.stdout, proc.stdout[-3000:]
