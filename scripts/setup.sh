#!/usr/bin/env bash
# Create .venv (once) and install gpt2_ascend with its test tools. torch is pinned to the CPU build
# on this machine's disk (requirements/constraints.txt); an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# setuptools prints an "Editable installation." banner (a UserWarning of the build backend) on every editable install;
# it asks nothing of the user. Filtered by that exact message and category only: any other warning still shows
# (tests/test_demo.py).
EDITABLE_BANNER="ignore:Editable installation.:UserWarning"
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}$EDITABLE_BANNER" \
  python -m pip install -q -c requirements/constraints.txt "torch==2.13.0" -e ".[dev]"
