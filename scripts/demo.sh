#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: see demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python demo.py "$@"
