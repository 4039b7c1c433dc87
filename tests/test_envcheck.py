"""Stage 00: the environment check reports this machine and fails, naming what is missing,
when the config requires something absent."""
import json
import os
import subprocess
import sys
from importlib import metadata

from forgelab import config as cfg
from forgelab.envcheck import EnvCheckConfig, collect, package_info, problems, report, resolve
from forgelab.runs import PROJECT_ROOT

ABSENT = "forgelab-no-such-package"


def run_check(*sets, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "scripts/00_check_env.py", "--run-name", name]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_names_resolve_to_distribution_and_module():
    assert resolve("flash_attn") == ("flash-attn", "flash-attn", "flash_attn")
    assert resolve("Liger_Kernel") == ("liger-kernel", "liger-kernel", "liger_kernel")
    assert resolve("yaml")[2] == "yaml" and resolve("pyyaml")[1] == "pyyaml"
    assert resolve("some.thing") == ("some.thing", "some.thing", "some_thing")


def test_package_info_reads_the_installed_versions():
    t = package_info("torch")
    assert t["ok"] and t["version"] == metadata.version("torch")
    missing = package_info(ABSENT)
    assert missing == {"name": ABSENT, "version": None, "module": ABSENT.replace("-", "_"),
                       "importable": False, "ok": False}


def test_collect_and_report_describe_this_machine():
    conf = cfg.build(EnvCheckConfig, {"require": ["torch", ABSENT], "optional": ["vllm"]})
    info = collect(conf)
    assert info["cpu_count"] == os.cpu_count() and info["ram_gib"]["total"] > 0
    import torch
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    issues = problems(info, conf)
    assert issues == [f"required package '{ABSENT}' is not installed"]
    text = report(info, issues)
    assert f"| {ABSENT} | required | - | no |" in text and "MISSING" in text
    big = cfg.build(EnvCheckConfig, {"min_ram_gib": 1e6, "min_disk_gib": 1e9})
    assert [i for i in problems(info, big) if "GiB" in i] == [
        f"1000000.0 GiB RAM required, {info['ram_gib']['total']} GiB present",
        f"1000000000.0 GiB free disk required, {info['disk_gib']['free']} GiB free"]


def test_script_exit_codes_and_report_files():
    ok = run_check(name="ok")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| torch | required |" in ok.stdout
    runs = PROJECT_ROOT / os.environ["FORGELAB_RUNS_DIR"] / "env"
    assert (runs / "ok" / "env_check.md").read_text() == (runs / "latest.md").read_text()
    assert json.loads((runs / "ok" / "summary.json").read_text())["missing"] == []

    import torch
    gpu = torch.cuda.is_available()
    bad = run_check(f"require=[torch,{ABSENT},flash_attn]", f"require_cuda={str(not gpu).lower()}", name="bad")
    assert bad.returncode == 1
    assert f"required package '{ABSENT}' is not installed" in bad.stderr
    if not gpu:
        assert "CUDA required but torch sees no GPU" in bad.stderr
    s = json.loads((runs / "bad" / "summary.json").read_text())
    assert s["outcome"] == "failed" and any(ABSENT in m for m in s["missing"])
    try:
        metadata.version("flash-attn")
    except metadata.PackageNotFoundError:  # the CPU machines have none: it must be named too
        assert "'flash-attn' is not installed" in bad.stderr

    typo = run_check("requir=[torch]", name="typo")
    assert typo.returncode == 2 and "did you mean 'require'" in typo.stderr

