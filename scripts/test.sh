#!/usr/bin/env bash
# The test command: bootstraps .venv from requirements.txt, then runs pytest (all tests,
# slow ones included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap_env.sh
# the llama.cpp tests build llama.cpp from source (scripts/setup_llamacpp.sh): a compiler and cmake
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  if [[ $(id -u) = 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
  else
    echo "note: cmake and g++ are needed by the llama.cpp tests (apt-get install cmake g++)" >&2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
