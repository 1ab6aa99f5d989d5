#!/usr/bin/env bash
# The last call of a GPU session, once every piece is staged (bench/gpu_join.sh add ...): join and check the
# GGUF files, install the daemon's Python dependencies carried in assets/gpudeps (the device has torch and
# transformers but no registry), convert both models to bf16 HF folders (side by side: the device has 16
# cores), then run the benchmarks named on the command line, each writing under OUT.
#
#   bash bench/gpu_final.sh OUT daemon                  # bench/daemon_load.py with the real pair through Kafka
#   bash bench/gpu_final.sh OUT learning [ARGS...]      # bench/learning.py (ARGS go to it)
#   bash bench/gpu_final.sh OUT daemon learning [ARGS...]
#   bash bench/gpu_final.sh OUT daemon-learning         # the daemon serving while it runs learning rounds
#   bash bench/gpu_final.sh OUT proposers [ARGS...]     # python -m bench.proposers (ARGS go to it)
#   bash bench/gpu_final.sh OUT daemon-proposers        # the daemon through Kafka: auto vs none, homogeneous + mixed
#   bash bench/gpu_final.sh OUT suffix-cache            # python -m bench.suffix_cache on the GPU, 100k completions
#   bash bench/gpu_final.sh OUT scheduling [ARGS...]    # static vs continuous, batch 8 and 32, ~4 min (ARGS go to it)
set -euo pipefail
out=$1; shift
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
STAGE=${STAGE:-/tmp/stage}
bash bench/gpu_join.sh finish
bash bench/gpu_join.sh wheels
for role in target draft; do
  python -c "
from pathlib import Path
from bench import fetch_models as f
gguf = Path('$STAGE/$role.gguf')
f.convert_all([(gguf, open(str(gguf) + '.sha256').read().strip(), Path('$STAGE/$role-hf'), 'bfloat16')])
" 2>&1 | grep -v "it/s\]\|s/it\]" &
done
wait
[[ -f $STAGE/target-hf/config.json && -f $STAGE/draft-hf/config.json ]] || { echo "conversion failed" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case $1 in
    daemon)
      shift
      mkdir -p "$out/daemon"
      python -m bench.daemon_load --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --dtype bfloat16 --prompts 256 --batch-size 8 --max-new-tokens 128 --max-seq-len 1024 --repeat 2 \
        --threads 4 --out "$out/daemon/daemon_load.json" 2>&1 | grep -v "it/s\]" | tail -25 ;;
    daemon-learning)
      shift
      mkdir -p "$out/daemon-learning"
      python -m bench.daemon_load --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --dtype bfloat16 --prompts 768 --prompt-file bench/data/sharegpt.jsonl --batch-size 8 --max-new-tokens 128 \
        --max-seq-len 1024 --threads 4 --learning --round-tokens 8000 \
        --out "$out/daemon-learning/daemon_load.json" 2>&1 | grep -v "it/s\]" | tail -60 ;;
    proposers)
      shift
      mkdir -p "$out/proposers"
      python -m bench.proposers --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --dtype bfloat16 --out "$out/proposers" "$@" 2>&1 | grep -v "it/s\]" | tee "$out/proposers/log.txt" | tail -40
      break ;;
    daemon-proposers)
      shift
      mkdir -p "$out/daemon-proposers"
      for stream in "text_to_sql" "text_to_sql sharegpt"; do
        files=$(for d in $stream; do printf 'bench/data/%s.jsonl ' "$d"; done)
        python -m bench.daemon_load --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
          --dtype bfloat16 --prompts 192 --batch-size 8 --max-new-tokens 128 --max-seq-len 1024 --threads 4 \
          --prompt-file $files --chat --prompt-chars 3000 --proposers auto none --no-engine \
          --out "$out/daemon-proposers/${stream// /_and_}.json" 2>&1 | grep "^run "
      done ;;
    scheduling)
      shift
      mkdir -p "$out/scheduling"
      python -m bench.daemon_load --compare-scheduling --batch-sizes 8 32 --target "$STAGE/target-hf" --device cuda \
        --dtype bfloat16 --chat --prompt-file bench/data/text_to_sql.jsonl bench/data/sharegpt.jsonl \
        --max-new-tokens-per-file 32 128 --prompt-chars 2000 --max-seq-len 1024 --threads 4 --start-together \
        --budget-s 240 --out "$out/scheduling/scheduling.json" "$@" 2>&1 | grep -v "it/s\]" \
        | tee "$out/scheduling/log.txt" | tail -40
      break ;;
    suffix-cache)
      shift
      python -m bench.suffix_cache --tokenizer "$STAGE/target-hf" --completions 100000 --table-buckets 2097152 \
        --device cuda --out "$out/suffix-cache.json" | tail -12 ;;
    learning)
      shift
      mkdir -p "$out/learning"
      python -m bench.learning --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --out "$out/learning" "$@" 2>&1 | grep -v "it/s\]" | tee "$out/learning/log.txt" | tail -40
      break ;;
    *) echo "unknown benchmark $1" >&2; exit 2 ;;
  esac
done
