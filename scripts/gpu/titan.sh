#!/usr/bin/env bash
# torchtitan peer batch (one H200): torchtitan 0.2.2's own Trainer on its Qwen3 model
# (scripts/gpu/torchtitan_peer.py), fed the lab's CPT blocks, for the side-by-side with the lab's
# bench track (perf.sh runs the lab's half). Parts, in the order given (default: all):
#   s8k   1.7B, seq 8192, batch 4, compile, no checkpointing (flavor copy with max_seq_len 8192)
#   s16k  1.7B, seq 16384, batch 2, compile, no checkpointing
#   s8kfp8  1.7B, seq 8192, batch 4, float8 tensorwise (torchao, torchtitan's converter)
#   s16kfp8  1.7B, seq 16384, batch 2, float8 tensorwise
#   s06   the 0.6B flavor, seq 2048, batch 16, bf16
#   fp8   1.7B, seq 2048, batch 16, compile: bf16, float8 tensorwise, float8 rowwise (torchao)
#   fp8tw, bf16  one of those each
# Inputs: .gpu/tok; .gpu/cpt8192/train, .gpu/cpt16384/train, .gpu/cpt2048/train (the lab's runs of the
# same seq len read these); where one is missing the runner reads .gpu/cpt32k/train as one token
# stream cut into seq-len windows (same tokens, other cut points). .whl: torchtitan 0.2.2,
# torchdata 0.11.0, tyro, typeguard, docstring-parser, typing_extensions, torchao 0.18.0
# (scripts/gpu/README.md). Results: $OUT/titan-*.json (per-step rows + steady tokens/s), $OUT/titan-*.log,
# $OUT/titan.log (this script's output, when run as below).
# usage: OUT=dir BUDGET_S=560 bash scripts/gpu/titan.sh [s8k s16k fp8] 2>&1 | tee dir/titan.log
set -uo pipefail
source "$(dirname "$0")/_env.sh"
deadline=$(( t0 + ${BUDGET_S:-560} ))
left() { echo $(( deadline - $(date +%s) - 15 )); }
data() {  # data SEQ: the lab's blocks of that length, else the 32k blocks as a stream
  if [[ -f .gpu/cpt$1/train/meta.json ]]; then echo ".gpu/cpt$1/train"
  else el "  .gpu/cpt$1 missing: reading .gpu/cpt32k/train as a stream" >&2; echo ".gpu/cpt32k/train"; fi
}
titan() {  # titan NAME TIMEOUT [torchtitan_peer.py args]
  local name=$1 t=$2; shift 2
  (( $(left) < 60 )) && { el "skip $name (budget)"; return; }
  (( t > $(left) )) && t=$(left)
  el "run $name (timeout ${t}s)"
  # one inductor cache for the batch: the fp8 variants share shapes with each other's block graph
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout "$t" python3 scripts/gpu/torchtitan_peer.py --out "$OUT" --name "$name" \
    --tok .gpu/tok "$@" > "$OUT/$name.log" 2>&1 || el "  $name exited $?"
  grep -E "Error|error:|OutOfMemory" "$OUT/$name.log" | tail -3
  grep "^SUMMARY" "$OUT/$name.log" || tail -3 "$OUT/$name.log"
}
python3 -c "import torch, torchtitan, torchao; print('torch', torch.__version__, 'torchtitan', torchtitan.__version__, 'torchao', torchao.__version__)"
T17=(--flavor 1.7B --compile --ac none)
long17() {  # long17 NAME SEQ BATCH [torchtitan_peer.py args]: the 1.7B flavor at a long length, 20 steps
  local name=$1 seq=$2 batch=$3; shift 3
  titan "$name" 240 "${T17[@]}" --data "$(data "$seq")" --seq-len "$seq" --batch "$batch" --steps 20 --warmup-skip 6 "$@"
}
for part in ${@:-s8k s16k fp8}; do
  case $part in
    s8k)  long17 titan17-s8k 8192 4 ;;
    s16k) long17 titan17-s16k 16384 2 ;;
    s8kfp8) long17 titan17-s8k-fp8 8192 4 --fp8 tensorwise ;;
    s16kfp8) long17 titan17-s16k-fp8 16384 2 --fp8 tensorwise ;;
    s06) titan titan06-b16 200 --flavor 0.6B --compile --ac none --data "$(data 2048)" --seq-len 2048 --batch 16 \
      --steps 30 --warmup-skip 8 ;;
    fp8)
      d=$(data 2048)
      for r in none tensorwise rowwise; do
        titan "titan17-fp8-${r/none/bf16}" 200 "${T17[@]}" --data "$d" --seq-len 2048 --batch 16 --steps 30 --warmup-skip 8 --fp8 "$r"
      done ;;
    fp8tw)  # float8 tensorwise alone (the side-by-side partner of perf.sh fp8peer17)
      titan titan17-fp8-tensorwise 200 "${T17[@]}" --data "$(data 2048)" --seq-len 2048 --batch 16 --steps 30 \
        --warmup-skip 8 --fp8 tensorwise ;;
    bf16)
      titan titan17-fp8-bf16 200 "${T17[@]}" --data "$(data 2048)" --seq-len 2048 --batch 16 --steps 30 --warmup-skip 8 ;;
    *) el "unknown part $part" ;;
  esac
done
el "done"
