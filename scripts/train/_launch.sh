#!/usr/bin/env bash
# Shared by scripts/train/<track>.sh and the numbered training scripts: composes
#   configs/train/<task>.yaml + tracks/<track>.yaml [+ tracks/<track>.<cpt|pretrain|sft>.yaml]
#   + backends/<backend>.yaml
# and calls the one entry point, scripts/train.py, which starts torchrun or the DeepSpeed
# launcher itself when the backend needs several processes.
# usage: _launch.sh TRACK|"" [BACKEND] [--task cpt|pretrain|sft_lora|sft_full|<method>] [scripts/train.py args]
#        _launch.sh TRACK|"" [BACKEND] [--task T] --print-configs   (the composed files, one per line)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
conf="$root/configs/train"
track=${1-}; shift || true
if [[ -z ${FORGELAB_COMMAND-} ]]; then  # recorded in train_summary.json as the command that made the run
  FORGELAB_COMMAND="bash scripts/train/${track:-_launch}.sh$(printf ' %q' "$@")"; export FORGELAB_COMMAND
fi
backend=single
if [[ $# -gt 0 && $1 != -* ]]; then backend=$1; shift; fi
task=cpt
print_configs=0
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --task) task=${2:?--task needs a value}; shift 2 ;;
    --task=*) task=${1#--task=}; shift ;;
    --print-configs) print_configs=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ $task == sft ]] && task=sft_lora
die() { echo "$*" >&2; exit 2; }
if [[ ! -f $conf/$task.yaml ]]; then  # one config per training method (src/forgelab/train/methods/)
  known=$(cd "$conf" && ls *.yaml | sed 's/\.yaml$//' | grep -vx base | paste -sd, - | sed 's/,/, /g')
  die "unknown task '$task' ($known)"
fi
[[ -f $conf/backends/$backend.yaml ]] || die "unknown backend '$backend' ($(cd "$conf/backends" && ls *.yaml | sed 's/\.yaml$//' | paste -sd, - | sed 's/,/, /g'))"
configs=(--config "$conf/$task.yaml")
if [[ -n $track ]]; then
  [[ -f $conf/tracks/$track.yaml ]] || die "unknown track '$track' (sanity, bench, profile, optimize, resume, longtrain)"
  configs+=(--config "$conf/tracks/$track.yaml")
  kind=${task%%_*}
  [[ -f $conf/tracks/$track.$kind.yaml ]] && configs+=(--config "$conf/tracks/$track.$kind.yaml")
fi
configs+=(--config "$conf/backends/$backend.yaml")
if [[ $print_configs == 1 ]]; then printf '%s\n' "${configs[@]}" | grep -vx -- --config; exit 0; fi
py=${PYTHON:-$root/.venv/bin/python}
[[ -x $py ]] || py=python3
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec "$py" "$root/scripts/train.py" "${configs[@]}" "${args[@]}"
