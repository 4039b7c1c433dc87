"""llama.cpp as a toolchain: where its binaries live and GGUF quantization with llama-quantize.

The binaries (llama-server, llama-quantize, llama-tokenize, llama-perplexity) are built once
per machine, outside the repo, by `bash scripts/setup_llamacpp.sh` from the llama.cpp vendored
in PyPI's llama-cpp-python sdist; they live in `llamacpp_home()/<LLAMACPP_VERSION>/bin`.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ..config import RunError

LLAMACPP_VERSION = "0.3.36"  # llama-cpp-python sdist; keep equal to scripts/setup_llamacpp.sh VERSION
HOME_ENV = "FORGELAB_LLAMACPP_HOME"
SETUP = "bash scripts/setup_llamacpp.sh"
K_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")
# Types llama-quantize takes by name that this lab uses; any other name is refused up front.
QTYPES = K_QUANTS + ("Q4_K_S", "Q5_K_S", "Q3_K_M", "Q2_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                     "F16", "BF16", "F32")


def llamacpp_home() -> Path:
    """Root of the per-machine llama.cpp builds: $FORGELAB_LLAMACPP_HOME or ~/.cache/forgelab/llama.cpp."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forgelab" / "llama.cpp"


def llamacpp_bin_dir() -> Path:
    return llamacpp_home() / LLAMACPP_VERSION / "bin"


def llamacpp_bin(name: str, bin_dir: str | Path | None = None) -> Path:
    """Path of one llama.cpp binary (e.g. "llama-server"); RunError naming the setup script if absent."""
    d = Path(bin_dir).expanduser() if bin_dir else llamacpp_bin_dir()
    p = d / name
    if not (p.is_file() and os.access(p, os.X_OK)):
        raise RunError(f"llama.cpp binary {name} not found in {d}: run `{SETUP}` (builds llama.cpp "
                       f"{LLAMACPP_VERSION} once per machine, ~5 min on 2 cores; needs cmake and g++)")
    return p


def quantize(src_gguf: str | Path, out_gguf: str | Path, qtype: str, threads: int | None = None,
             log=None, allow_requantize: bool = False, bin_dir: str | Path | None = None) -> dict:
    """Quantize a GGUF with llama-quantize (from an F16/F32 GGUF; `allow_requantize` also takes an
    already quantized one, at a quality cost). The output is written under a temporary name in the
    output's directory and renamed into place when complete, so a failure leaves no file behind.
    Returns {"qtype", "src", "out", "src_bytes", "bytes", "seconds"}."""
    src, out = Path(src_gguf), Path(out_gguf)
    qtype = qtype.upper()
    if qtype not in QTYPES:
        raise RunError(f"quantization type {qtype!r} is not one of {', '.join(QTYPES)}")
    if not src.is_file():
        raise RunError(f"GGUF to quantize not found: {src}")
    if src.resolve() == out.resolve():
        raise RunError(f"quantize would overwrite its input {src}: pick another output path")
    exe = llamacpp_bin("llama-quantize", bin_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = [str(exe)] + (["--allow-requantize"] if allow_requantize else []) + [str(src), str(tmp), qtype]
    cmd.append(str(threads or os.cpu_count() or 1))
    if log:
        log.info("quantizing %s -> %s (%s)", src, out, qtype)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            tail = "\n".join(proc.stdout.splitlines()[-20:])
            raise RunError(f"llama-quantize {qtype} of {src} failed (exit {proc.returncode}):\n{tail}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    res = {"qtype": qtype, "src": str(src), "out": str(out), "src_bytes": src.stat().st_size,
           "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 2)}
    if log:
        log.info("quantized %s: %.1f MB -> %.1f MB in %.1f s", qtype, res["src_bytes"] / 1e6,
                 res["bytes"] / 1e6, res["seconds"])
    return res
