"""Stage 00: what this machine has (Python, torch, CUDA, GPUs, RAM, disk, packages) and
whether it has what the chosen config requires."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata

from .config import ConfigError, field
from .runs import now_iso, project_path

# package name (as users write it) -> (distribution name, import name)
KNOWN = {
    "torch": ("torch", "torch"),
    "transformers": ("transformers", "transformers"),
    "tokenizers": ("tokenizers", "tokenizers"),
    "datasets": ("datasets", "datasets"),
    "accelerate": ("accelerate", "accelerate"),
    "peft": ("peft", "peft"),
    "safetensors": ("safetensors", "safetensors"),
    "deepspeed": ("deepspeed", "deepspeed"),
    "vllm": ("vllm", "vllm"),
    "flash-attn": ("flash-attn", "flash_attn"),
    "liger-kernel": ("liger-kernel", "liger_kernel"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "trl": ("trl", "trl"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "gguf": ("gguf", "gguf"),
    "numpy": ("numpy", "numpy"),
    "pyyaml": ("pyyaml", "yaml"),
    "tqdm": ("tqdm", "tqdm"),
    "psutil": ("psutil", "psutil"),
    "matplotlib": ("matplotlib", "matplotlib"),
    "triton": ("triton", "triton"),
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_ALIASES = {_canon(k): k for k in KNOWN} | {_canon(imp): k for k, (_, imp) in KNOWN.items()}


@dataclass
class EnvCheckConfig:
    require: list[str] = field(["torch", "transformers", "tokenizers", "datasets", "numpy",
                                "pyyaml", "tqdm"],
                               help="packages that must be installed and importable (a missing one fails the check)")
    optional: list[str] = field(["accelerate", "peft", "safetensors", "deepspeed", "vllm", "flash-attn",
                                 "liger-kernel", "bitsandbytes", "trl", "tensorboard", "gguf", "triton"],
                                help="packages reported when present, never required")
    require_cuda: bool = field(False, help="fail unless torch sees at least min_gpus CUDA GPUs")
    min_gpus: int = field(1, help="GPUs needed when require_cuda is true")
    min_ram_gib: float = field(0.0, help="fail below this much total RAM")
    min_disk_gib: float = field(0.0, help="fail below this much free disk at the project root")
    report_name: str = field("env_check.md", help="report file name in the run dir (copied to runs/env/latest.md)")

    def validate(self) -> None:
        for key in ("require", "optional"):
            for i, name in enumerate(getattr(self, key)):
                if not isinstance(name, str) or not name.strip():
                    raise ConfigError(f"key '{key}[{i}]': expected a package name, got {name!r}")
        if self.min_gpus < 0:
            raise ConfigError(f"key 'min_gpus': must be >= 0, got {self.min_gpus}")


def resolve(name: str) -> tuple[str, str, str]:
    """(display name, distribution, import name) of a package as a user writes it."""
    key = _ALIASES.get(_canon(name))
    if key:
        return key, *KNOWN[key]
    return name, name, re.sub(r"[-.]", "_", name)


def package_info(name: str) -> dict:
    """Installed version (package metadata) and whether the module can be found. Nothing is
    imported: importing vllm or deepspeed takes seconds and may print a lot."""
    disp, dist, mod = resolve(name)
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        version = None
    try:
        found = importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        found = False
    return {"name": disp, "version": version, "module": mod, "importable": found,
            "ok": version is not None and found}


def torch_info() -> dict:
    try:
        import torch
    except ImportError as e:
        return {"installed": False, "error": str(e), "cuda_available": False, "gpus": []}
    info = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpus": []}
    if info["cuda_available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(total / 2**30, 1),
                                 "free_gib": round(free / 2**30, 1)})
        info["driver"] = _nvidia_driver()
    info["threads"] = torch.get_num_threads()
    return info


def _nvidia_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def memory_gib() -> tuple[float, float]:
    """(total, available) RAM in GiB."""
    try:
        import psutil
        vm = psutil.virtual_memory()
        return vm.total / 2**30, vm.available / 2**30
    except ImportError:  # a bare machine may lack psutil: this check must still run
        page = os.sysconf("SC_PAGE_SIZE")
        return (os.sysconf("SC_PHYS_PAGES") * page / 2**30, os.sysconf("SC_AVPHYS_PAGES") * page / 2**30)


def collect(conf: EnvCheckConfig) -> dict:
    total, avail = memory_gib()
    disk = shutil.disk_usage(project_path("."))
    return {
        "checked_at": now_iso(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "ram_gib": {"total": round(total, 1), "available": round(avail, 1)},
        "disk_gib": {"path": str(project_path(".")), "free": round(disk.free / 2**30, 1),
                     "total": round(disk.total / 2**30, 1)},
        "torch": torch_info(),
        "required": [package_info(n) for n in conf.require],
        "optional": [package_info(n) for n in conf.optional if n not in conf.require],
    }


def problems(info: dict, conf: EnvCheckConfig) -> list[str]:
    """What the config needs and this machine lacks; empty when all is well."""
    out = []
    for p in info["required"]:
        if p["version"] is None:
            out.append(f"required package '{p['name']}' is not installed")
        elif not p["importable"]:
            out.append(f"required package '{p['name']}' {p['version']} is installed but module "
                       f"'{p['module']}' is not importable")
    t = info["torch"]
    if conf.require_cuda:
        if not t.get("installed"):
            out.append("CUDA required but torch is not installed")
        elif not t["cuda_available"]:
            build = t.get("cuda_build")
            out.append("CUDA required but torch sees no GPU" +
                       (f" (torch {t['version']} is a CPU build)" if not build else f" (torch built for CUDA {build})"))
        elif len(t["gpus"]) < conf.min_gpus:
            out.append(f"{conf.min_gpus} GPU(s) required, {len(t['gpus'])} visible")
    if info["ram_gib"]["total"] < conf.min_ram_gib:
        out.append(f"{conf.min_ram_gib} GiB RAM required, {info['ram_gib']['total']} GiB present")
    if info["disk_gib"]["free"] < conf.min_disk_gib:
        out.append(f"{conf.min_disk_gib} GiB free disk required, {info['disk_gib']['free']} GiB free")
    return out


def report(info: dict, issues: list[str]) -> str:
    t = info["torch"]
    rows = [("Python", info["python"]["version"]), ("Platform", info["platform"]),
            ("CPU cores", str(info["cpu_count"])),
            ("RAM", f"{info['ram_gib']['total']} GiB ({info['ram_gib']['available']} GiB available)"),
            ("Disk free", f"{info['disk_gib']['free']} of {info['disk_gib']['total']} GiB at {info['disk_gib']['path']}"),
            ("torch", t.get("version", "not installed")),
            ("CUDA", (f"available, torch built for {t.get('cuda_build')}, driver {t.get('driver')}"
                      if t.get("cuda_available") else f"not available (torch CUDA build: {t.get('cuda_build')})"))]
    if t.get("cuda_available"):
        rows.append(("bf16", str(t.get("bf16_supported"))))
    lines = ["# Environment check", "", f"Checked {info['checked_at']}.", "",
             "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if t.get("gpus"):
        lines += ["", "| GPU | name | capability | memory GiB | free GiB |", "|---|---|---|---|---|"]
        lines += [f"| {g['index']} | {g['name']} | {g['capability']} | {g['memory_gib']} | {g['free_gib']} |"
                  for g in t["gpus"]]
    lines += ["", "| package | needed | version | importable |", "|---|---|---|---|"]
    for kind in ("required", "optional"):
        for p in info[kind]:
            lines.append(f"| {p['name']} | {'required' if kind == 'required' else 'optional'} | "
                         f"{p['version'] or '-'} | {'yes' if p['importable'] else 'no'} |")
    lines += ["", "## Verdict", ""]
    lines += [f"- MISSING: {i}" for i in issues] if issues else ["- everything the config requires is present"]
    return "\n".join(lines) + "\n"
