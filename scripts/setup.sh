#!/usr/bin/env bash
# Create .venv and install the project with the given extras (default: test).
#   bash scripts/setup.sh [EXTRAS]        e.g. bash scripts/setup.sh test,bench
# torch is installed first and pinned: an unpinned torch with nothing installed pulls a multi-GB CUDA build.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[$extras]"
echo "setup: .venv ready with extras [$extras] ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
