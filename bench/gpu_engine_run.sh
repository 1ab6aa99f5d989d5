#!/usr/bin/env bash
# On the GPU machine, after bench/gpu_join.sh finish: the engine benchmark with the real Qwen2.5-Coder pair.
#   bash bench/gpu_engine_run.sh OUT_DIR [extra bench/decode.py flags, e.g. --compile]
set -euo pipefail
out=$1; shift
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python -m bench.decode --target /tmp/stage/target.gguf --draft /tmp/stage/draft.gguf \
  --prompts bench/data/humaneval.jsonl --chat --n 16 --hf-n 4 --max-new-tokens 128 \
  --device cuda --dtype bfloat16 --max-seq-len 1024 --out "$out/decode.json" "$@" 2>&1 \
  | grep -v "Loading\|Writing\|it/s\]" | tee "$out/decode.log"
