#!/usr/bin/env bash
# The test command: bootstraps .venv from requirements.txt, then runs pytest (all tests,
# slow ones included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap_env.sh
# Debian packages some tests need: a compiler and cmake (the llama.cpp tests build llama.cpp
# from source, scripts/setup_llamacpp.sh), Chromium and its driver (the board's browser tests)
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [[ ${#need[@]} -gt 0 ]]; then
  if [[ $(id -u) = 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: the tests need these Debian packages: apt-get install ${need[*]}" >&2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
