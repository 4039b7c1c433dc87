#!/usr/bin/env bash
# Serve a model over an OpenAI-compatible API: `10_serve.sh transformers [MODEL]`,
# `10_serve.sh vllm [MODEL]`, `10_serve.sh llamacpp [GGUF]`, `10_serve.sh deepspeed [MODEL]`,
# `10_serve.sh status`, `10_serve.sh stop [NAME]`.
# `10_serve.sh --help` for everything; the logic lives in src/forgelab/serve/server.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-.venv/bin/python}" scripts/10_serve.py "$@"
