"""scripts/mutation.py itself: the dry run lists what each area mutates and with which tests, and
a real run over one small module writes the markdown table and its JSON twin with consistent
counts (mutmut is installed into .venv-mut on first use)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from forgelab.devtools import mutation as mut
from forgelab.runs import PROJECT_ROOT

SCRIPT = [sys.executable, "scripts/mutation.py"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*SCRIPT, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_every_area_names_existing_functions_and_fast_tests():
    import ast
    for area in mut.AREAS:
        for path, fns in area.targets.items():
            defined = mut._functions(ast.parse((PROJECT_ROOT / path).read_text(encoding="utf-8")))
            assert set(fns) <= set(defined), (path, set(fns) - set(defined))
        for t in area.tests:
            assert (PROJECT_ROOT / t.split("::")[0]).is_file(), t
    assert mut.patterns(mut.select(["runs"])[0])[-1] == "forgelab.runs.xǁRunǁ__exit____mutmut_*"


def test_dry_run_lists_areas_functions_and_tests():
    r = _run("--dry-run", "--modules", "config", "src/forgelab/train/packing_check.py")
    assert r.returncode == 0, r.stderr
    assert "config: Config validation" in r.stdout and "tests/test_mutation_guards_config.py" in r.stdout
    assert "mutate src/forgelab/train/packing_check.py: sample_spans, _alone" in r.stdout
    assert "sft_store.py" not in r.stdout  # a file picks that file only
    r = _run("--dry-run", "--modules", "nope")
    assert r.returncode == 2 and "--modules 'nope': not an area or a mutated source file" in r.stderr


def test_a_run_over_one_module_writes_the_table_and_the_json(tmp_path):
    out = tmp_path / "mutation.md"
    r = _run("--modules", "src/forgelab/train/packing_check.py", "--out", str(out), "--max-minutes", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    md, data = out.read_text(encoding="utf-8"), json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert data["tool"] == f"mutmut {mut.TOOL_VERSION}" and "scripts/mutation.py --modules" in data["command"]
    (area,) = data["areas"]
    (m,) = area["modules"]
    assert area["name"] == "packing" and m["path"] == "src/forgelab/train/packing_check.py"
    assert m["total"] > 0 and m["total"] == sum(m[k] for k in ("killed", "timeout", "survived", "no_tests",
                                                                 "incompetent", "not_checked"))
    assert len(m["survivors"]) == m["survived"] + m["no_tests"]
    assert all(s["verdict"].startswith(("equivalent mutant", "not equivalent")) for s in m["survivors"])
    row = re.search(r"^\| packing \| `src/forgelab/train/packing_check.py` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|"
                    r" (\d+) \| (\d+) \| (\d+) \| ([\d.]+%|-) \| (\d+) \| ([\d.]+%|-) \|$", md, re.M)
    assert row, md
    assert [int(x) for x in row.groups()[:7]] == [m[k] for k in ("total", "killed", "timeout", "survived",
                                                                 "no_tests", "incompetent", "not_checked")]
    assert int(row.group(9)) == m["equivalent"] == sum(s["verdict"].startswith("equivalent") for s in m["survivors"])
    assert row.group(8) == f"{100 * m['score']:.1f}%" and m["score"] == round(
        (m["killed"] + m["timeout"]) / (m["total"] - m["incompetent"] - m["not_checked"]), 4)
    assert "- `src/forgelab/train/packing_check.py` mutated functions: `sample_spans`, `_alone`" in md
