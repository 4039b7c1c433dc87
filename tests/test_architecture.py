"""The shape of src/: no import cycles (lazy imports inside functions count too), the layer
rules of docs/architecture.md, building a report loads no training code, the training methods
are found by name, and the private Trainer API the lab overrides is still what it assumes."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from forgelab.runs import PROJECT_ROOT

SRC = PROJECT_ROOT / "src"

# package -> packages of forgelab it must never import (docs/architecture.md, "Layers")
FORBIDDEN = {
    "data": {"train", "eval", "serve", "report", "estimate"},
    "model": {"train", "eval", "serve", "report", "estimate"},
    "estimate": {"train", "eval", "serve", "report", "data"},
    "eval": {"train"},
    "serve": {"train"},
    "align": {"train", "report", "estimate", "prof"},
    "report": {"train", "eval", "serve", "data", "prof"},
    "components": {"train", "eval", "serve", "report", "data", "model", "estimate", "prof"},
    "jsonl": {"train", "eval", "serve", "report", "data", "model", "estimate", "prof"},
    "manifest": {"train", "eval", "serve", "report", "data", "model", "estimate", "prof"},
    "runlock": {"train", "eval", "serve", "report", "data", "model", "estimate", "prof"},
    "runindex": {"train", "eval", "report", "data", "model", "estimate", "prof", "board"},
    # the board starts stages as processes and reads their files: no training or eval code in it
    "board": {"train", "eval", "data", "align", "estimate", "prof"},
}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in (SRC / "forgelab").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the forgelab modules it imports anywhere in its body (relative imports resolved)."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                assert not mod.startswith("scripts"), f"{path}: src/ imports scripts/"
                cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(c for c in cands if c in mods and c != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_of_src_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["forgelab.train.session"]  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_only_what_docs_architecture_allows():
    bad = []
    for mod, deps in import_graph().items():
        layer = mod.split(".")[1] if "." in mod else ""
        for d in deps:
            target = d.split(".")[1] if "." in d else ""
            if target in FORBIDDEN.get(layer, ()):
                bad.append(f"{mod} -> {d}")
    assert bad == []


def test_building_a_report_imports_no_training_code(tmp_path):
    code = (
        "import sys\n"
        "from forgelab.report.gpu_performance import build_gpu_performance\n"
        "import forgelab.report.builders, forgelab.eval.report, forgelab.serve.bench_report\n"
        f"build_gpu_performance('configs/report/gpu_performance.yaml', out_dir={str(tmp_path)!r}, command='t')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('forgelab.train', 'transformers.trainer', 'peft', "
        "'deepspeed')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert (tmp_path / "gpu_performance.md").is_file()


def test_training_methods_are_found_by_name_and_each_declares_its_parts():
    from forgelab.train.methods import method_for, names, registry, tasks
    from forgelab.train.methods.base import Method
    align = ["dpo", "grpo", "kto", "orpo", "simpo"]
    assert sorted(names()) == sorted(["cpt", "pretrain", "sft_full", "sft_lora", *align,
                                      *(f"{a}_full" for a in align)])
    assert tasks() == sorted(["cpt", "pretrain", "sft", *align])
    for name, m in registry().items():
        assert m.name == name and m.data_kind in ("cpt", "sft", "pref", "kto", "prompts")
        assert m.trainable in ("full", "lora")
        assert (PROJECT_ROOT / "configs" / "train" / f"{name}.yaml").is_file()  # one config per method
        assert m.about and isinstance(m, Method)
    from forgelab import config as cfg
    from forgelab.train.config import TrainConfig
    for name in names():
        conf = cfg.load(TrainConfig, [PROJECT_ROOT / "configs" / "train" / f"{name}.yaml"])
        assert method_for(conf).name == name


def test_an_unknown_task_is_a_config_error_listing_the_tasks():
    import pytest

    from forgelab import config as cfg
    from forgelab.train.config import TrainConfig
    with pytest.raises(cfg.ConfigError, match=r"key 'task': unknown task 'dpo_typo'; tasks: cpt, dpo, grpo, kto, orpo, pretrain, sft, simpo"):
        cfg.load(TrainConfig, [PROJECT_ROOT / "configs" / "train" / "cpt.yaml"], ["task=dpo_typo"])


def test_the_private_trainer_api_the_lab_overrides_is_unchanged():
    """Fails loudly when a transformers release renames or reshapes the private methods that
    atomic checkpoints override (forgelab/train/hf_private.py)."""
    from transformers import Trainer

    from forgelab.train import hf_private
    from forgelab.train.trainer import ForgeTrainer
    assert hf_private.check() == []
    # the only private Trainer methods ForgeTrainer overrides are the ones hf_private checks
    private = {n for k in ForgeTrainer.__mro__ if k not in Trainer.__mro__ for n in vars(k)
               if n.startswith("_") and not n.startswith("__") and callable(getattr(Trainer, n, None))}
    assert private == set(hf_private.PRIVATE)

    class Changed(Trainer):
        def _save_checkpoint(self, model):  # a changed signature
            pass
    assert any("_save_checkpoint" in p for p in hf_private.check(Changed))
