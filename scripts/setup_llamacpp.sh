#!/usr/bin/env bash
# Build llama.cpp's tools (llama-server, llama-quantize, llama-tokenize, llama-perplexity) once per
# machine, outside the repo, from the llama.cpp vendored in PyPI's llama-cpp-python sdist.
#   bash scripts/setup_llamacpp.sh     # FORGELAB_LLAMACPP_HOME=dir to put it elsewhere
# Installs to ${FORGELAB_LLAMACPP_HOME:-~/.cache/forgelab/llama.cpp}/0.3.36/bin; instant when present.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0;; esac
cd "$(dirname "$0")/.."
VERSION=0.3.36                      # keep equal to forgelab.export.llamacpp.LLAMACPP_VERSION
SDIST=llama_cpp_python-$VERSION.tar.gz
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TARGETS=(llama-server llama-quantize llama-tokenize llama-perplexity)
ROOT=${FORGELAB_LLAMACPP_HOME:-$HOME/.cache/forgelab/llama.cpp}
PREFIX=$ROOT/$VERSION
stamp=$PREFIX/.forgelab-llamacpp.stamp
want="llama-cpp-python==$VERSION ${TARGETS[*]} native no-amx layout-2"
say() { echo "[setup_llamacpp] $*" >&2; }
ready() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] || return 1
  local t; for t in "${TARGETS[@]}"; do [ -x "$PREFIX/bin/$t" ] || return 1; done
  "$PREFIX/bin/llama-server" --version >/dev/null 2>&1
}
if ready; then say "llama.cpp $VERSION is ready in $PREFIX/bin"; exit 0; fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.setup-$VERSION.lock"
flock -n 9 || { say "another setup holds $ROOT/.setup-$VERSION.lock; waiting for it"; flock 9; }
if ready; then say "llama.cpp $VERSION is ready in $PREFIX/bin"; exit 0; fi

missing=()
for tool in cmake g++ make tar sha256sum; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "error: ${missing[*]} not found; building llama.cpp needs a C++ toolchain: apt-get install cmake g++"
  exit 1
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

# 1. the source: llama-cpp-python's sdist (77 MB), kept in a cache so a rebuild does not download
cache=$ROOT/sdist
mkdir -p "$cache"
if [ ! -f "$cache/$SDIST" ] || ! echo "$SHA256  $cache/$SDIST" | sha256sum -c --status; then
  say "downloading llama-cpp-python==$VERSION (source, 77 MB) into $cache"
  rm -f "$cache/$SDIST"
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$cache" \
    "llama-cpp-python==$VERSION"
fi
if ! echo "$SHA256  $cache/$SDIST" | sha256sum -c --status; then
  say "error: $cache/$SDIST does not have the expected sha256 $SHA256"; exit 1
fi

# 2. build in a scratch dir beside the install (same file system: the final move is atomic)
rm -rf "$ROOT"/.build-"$VERSION".*   # left by a killed run (we hold the lock: nobody else builds)
work=$(mktemp -d "$ROOT/.build-$VERSION.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
say "extracting vendor/llama.cpp into $work"
tar -xzf "$cache/$SDIST" -C "$work" "llama_cpp_python-$VERSION/vendor/llama.cpp"
src=$work/llama_cpp_python-$VERSION/vendor/llama.cpp
jobs=$(nproc)
# GGML_NATIVE=ON compiles for this CPU (-march=native). AMX is switched off: on Sapphire Rapids
# class CPUs its kernels segfault in ggml_backend_amx_mul_mat at the first decode with this
# llama.cpp (SmolLM2 Q4_1 here; upstream ggml-org/llama.cpp#20824, unfixed); explicit -mno-amx-*
# win over -march=native in GCC, so the AMX backend is not compiled and AVX-512/AVX2 kernels run.
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
say "configuring (Release, static, GGML_NATIVE=ON, AMX off)"
t0=$(date +%s)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" > "$work/configure.log" 2>&1 || { tail -n 40 "$work/configure.log" >&2;
  say "error: cmake configure failed (log above)"; exit 1; }
say "building ${TARGETS[*]} with -j$jobs (about 5 minutes on 2 cores)"
if ! cmake --build "$work/build" --config Release -j"$jobs" --target "${TARGETS[@]}" 2>&1 |
     tee "$work/build.log" | awk 'match($0, /^\[ *[0-9]+%\]/) { p = substr($0, RSTART, RLENGTH)
       if (p != last) { last = p; n = split($NF, f, "/"); print "[setup_llamacpp]   " p " " f[n]; fflush() } }' >&2; then
  tail -n 40 "$work/build.log" >&2; say "error: the build failed (last lines above)"; exit 1
fi

# 3. install: a complete bin dir with its stamp, moved into place in one rename
new=$work/install
mkdir -p "$new/bin"
for t in "${TARGETS[@]}"; do install -m 755 "$work/build/bin/$t" "$new/bin/$t"; done
"$new/bin/llama-server" --version >/dev/null 2>&1 || { say "error: the built llama-server does not run"; exit 1; }
echo "$want" > "$new/.forgelab-llamacpp.stamp"
if [ -e "$PREFIX" ]; then mv "$PREFIX" "$work/old"; fi
mv "$new" "$PREFIX"
say "built in $(( $(date +%s) - t0 )) s: $PREFIX/bin ($("$PREFIX/bin/llama-server" --version 2>&1 | head -n1))"
