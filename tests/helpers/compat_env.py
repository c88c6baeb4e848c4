"""A second Python environment with the lowest transformers (and peft) that setup.cfg allows, built once under
REPO/.compat/ (gitignored) and reused by later runs.

Cheap by construction: a venv without pip whose site-packages holds a .pth line pointing at the running
environment's site-packages, so torch, numpy, safetensors, accelerate, ... come from there and are not
installed again (a venv made with --system-site-packages would see the base interpreter's packages, not this
venv's). pip (the running environment's, through --python) then installs only what the old versions need on
top: transformers, peft, tokenizers, huggingface_hub and a few small dependencies, about 15 MB and 10-30 s
from PyPI. The new environment's own site-packages comes first on sys.path, so its versions win.
"""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# used only if setup.cfg names no peft floor: the peft release of transformers 4.45's time
PEFT_FOR_OLDEST_TRANSFORMERS = "0.13.2"


def declared_floor(package: str, setup_cfg: str = os.path.join(REPO, "setup.cfg")) -> str | None:
    """The `>=` version setup.cfg's install_requires gives `package`, or None."""
    from packaging.requirements import Requirement
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    for line in parser["options"]["install_requires"].strip().splitlines():
        requirement = Requirement(line.strip())
        if requirement.name.lower() == package:
            floors = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
            return floors[0] if floors else None
    return None


def compat_pins() -> dict:
    """{package: version} of the environment: the declared floors."""
    return {"transformers": declared_floor("transformers"),
            "peft": declared_floor("peft") or PEFT_FOR_OLDEST_TRANSFORMERS}


def ensure_env(pins: dict, root: str = os.path.join(REPO, ".compat")) -> str:
    """The python executable of the environment for `pins`, built on first use."""
    name = "-".join(f"{k}{v}" for k, v in sorted(pins.items()))
    env = os.path.join(root, name)
    python = os.path.join(env, "bin", "python")
    marker = os.path.join(env, "READY")
    if os.path.isfile(marker):
        return python
    overlay_venv(env)
    result = pip_install(python, *[f"{k}=={v}" for k, v in pins.items()])
    if result.returncode != 0:
        raise RuntimeError(f"could not build the compatibility environment {env} (pip needs PyPI): "
                           f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    with open(marker, "w", encoding="utf-8") as f:
        f.write(" ".join(f"{k}=={v}" for k, v in sorted(pins.items())) + "\n")
    return python


def overlay_venv(env: str) -> str:
    """A new venv (no pip) that sees this environment's packages after its own: its python executable."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", env], check=True)
    python = os.path.join(env, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # a plain path line: that folder's own .pth files (this checkout's editable install) are not run
    with open(os.path.join(purelib, "_base_environment.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: str, *args: str) -> subprocess.CompletedProcess:
    """This environment's pip installing into another interpreter's environment."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                           "--disable-pip-version-check", *args], capture_output=True, text=True)
