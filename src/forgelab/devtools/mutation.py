"""Mutation testing of the modules behind the lab's guarantees (scripts/mutation.py).

Each area (checkpoint selection, packing, config validation, run records, report refusal, merge
check) names the functions that implement its guarantee and the fast tests that protect them.
mutmut changes those functions one small edit at a time (a mutant) and runs the tests that
reach the changed function; a mutant that no test notices is a gap in the tests, unless it is
equivalent (the edit changes nothing observable); JUDGED says which survivors are which.

mutmut runs in its own environment (.venv-mut) and in a temporary copy of the project, so the
working tree is never touched: it writes its mutated copy (mutants/) and its setup.cfg there.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from ..runs import PROJECT_ROOT, write_json

TOOL = "mutmut"
TOOL_VERSION = "3.8.1"
TOOL_VENV = ".venv-mut"
COPIED = ("src", "tests", "configs", "scripts", "pyproject.toml")  # what the tests read from the project
LINKED = ("data", "model")  # large inputs some fixtures read: linked into the copy, not copied
SEP = "ǁ"  # mutmut's separator in the names of method mutants (xǁClassǁmethod__mutmut_3)


class MutationError(RuntimeError):
    """The mutation run could not start or its tool failed; the message says where to look."""


@dataclasses.dataclass(frozen=True)
class Area:
    name: str
    title: str
    targets: dict  # source file -> functions mutated ("Class.method" for a method)
    tests: tuple   # pytest arguments: test files or node ids, all fast
    note: str = ""  # what is not mutated or not used, and why
    # (file, function) -> start of the statement that ends the mutated part of that function
    until: dict = dataclasses.field(default_factory=dict)


AREAS = (
    Area("checkpoint", "Checkpoint selection and publish", {
        "src/forgelab/train/checkpoint.py": ("save_failure", "check", "complete_checkpoints", "latest",
                                              "staging_dirs", "clean_staging", "staging_path", "publish",
                                              "rotate", "step_of", "resolve_resume"),
        "src/forgelab/manifest.py": ("_sha256", "_files", "write_manifest", "verify", "require_intact"),
        "src/forgelab/train/hf_private.py": ("check",),
    }, ("tests/test_train_units.py::test_checkpoint_selection_ignores_unfinished_saves",
        "tests/test_architecture.py::test_the_private_trainer_api_the_lab_overrides_is_unchanged",
        "tests/test_mutation_guards_checkpoint.py"),
        "checkpoint._fsync_dir (durability of a rename, invisible to a test) and dir_bytes (a log figure) "
        "are not mutated; hf_private.AtomicCheckpoints runs only inside a Trainer save, which only the "
        "slow training tests (test_faults.py, test_train_resume.py) reach."),
    Area("packing", "Packing and position ids", {
        "src/forgelab/data/sft_store.py": ("write_store", "SFTDataset.__init__", "SFTDataset.__len__",
                                            "SFTDataset.row_length", "SFTDataset.__getitem__",
                                            "check_packed_forward", "collate_sft"),
        "src/forgelab/train/packing_check.py": ("sample_spans", "_alone"),
        "src/forgelab/data/tokenize_sft.py": ("pack_best_fit", "padding_waste"),
    }, ("tests/test_tokenize_sft.py::test_best_fit_packing_is_deterministic_and_tight",
        "tests/test_train_units.py::test_collators_count_real_tokens_and_padded_slots",
        "tests/test_mutation_guards_packing.py"),
        "packing_check.packed_vs_alone carries @torch.no_grad(), and mutmut leaves decorated functions "
        "alone; the guard tests still run it. tests/test_packing.py and the store tests of "
        "tests/test_tokenize_sft.py build SmolLM2 data and a model in their fixtures (7+ s per mutant), "
        "so tiny real models and stores built in the guard tests stand in for them."),
    Area("config", "Config validation", {
        "src/forgelab/config.py": ("field", "_read_yaml", "_merge", "_mark", "_load_layers", "parse_set",
                                   "load", "_where", "_type_name", "_coerce", "build"),
    }, ("tests/test_config.py", "tests/test_mutation_guards_config.py"),
        "The output helpers to_dict, config_hash, dump_yaml and describe validate nothing and are not "
        "mutated."),
    Area("runs", "Run records", {
        "src/forgelab/runs.py": ("project_path", "runs_dir", "logs_dir", "atomic_write_text", "write_json",
                                 "read_json", "read_metrics", "sha256_file", "fingerprint_paths",
                                 "package_versions", "hardware", "fingerprint", "_append", "Run.__init__",
                                 "Run.__enter__", "Run.write_summary", "Run.__exit__"),
    }, ("tests/test_mutation_guards_runs.py",),
        "tests/test_run_records.py runs stage 04 as a subprocess, whose interpreter imports the unmutated "
        "source, so it cannot notice a mutant and is not used; the guard tests run Run in-process. "
        "git_state is not mutated (the copy the mutants run in is no git checkout), nor now_iso (the "
        "clock); the properties is_main and summary_path are decorated, which mutmut leaves alone."),
    Area("report", "Report refusal", {
        "src/forgelab/report/runs.py": ("RunRecord.get", "RunRecord.need", "read_metrics", "load_run",
                                        "discover", "protocol_differences", "group_by_protocol",
                                        "explain_groups", "check_comparable"),
        "src/forgelab/serve/bench_report.py": ("compare",),
    }, ("tests/test_report_protocol.py::test_every_serving_protocol_key_is_tested",
        "tests/test_report_protocol.py::test_benchmark_runs_differing_in_one_key_are_refused",
        "tests/test_report_protocol.py::test_force_compares_them_and_shows_the_difference",
        "tests/test_report_protocol.py::test_identical_benchmark_runs_are_compared",
        "tests/test_mutation_guards_report.py"),
        "RunRecord.protocol and RunRecord.launch are properties, which mutmut leaves alone (the guard "
        "tests still check protocol through check_comparable). The training half of "
        "tests/test_report_protocol.py trains two real runs in a module fixture (15 s per mutant); the "
        "guard tests write run directories from files instead. Only the refusal (compare) of "
        "serve/bench_report.py is mutated: compare up to its refusal, not the table it renders after.",
        until={("src/forgelab/serve/bench_report.py", "compare"): "if diffs and not force"}),
    Area("merge", "Merge check", {
        "src/forgelab/train/merge.py": ("MergeConfig.validate", "resolve_base", "_tokenizer_source",
                                        "render_prompts", "prompt_logits", "max_abs_diff", "_dtype",
                                        "_check_dtype", "peft_reference", "verify_merged", "merge_lora",
                                        "verify_merge"),
    }, ("tests/test_merge.py::test_config_errors_name_the_key", "tests/test_mutation_guards_merge.py"),
        "The other tests of tests/test_merge.py train an adapter on KJV text in a module fixture (10+ s "
        "per mutant); the guard tests merge a tiny real LoRA adapter instead. merge_lora is mutated up to its "
        "publish (the parameter count and log line after it are not).",
        until={("src/forgelab/train/merge.py", "merge_lora"): "try:"}),
)

# Survivors already judged: (source file, function, text of the change, verdict). A
# verdict says "equivalent mutant: why", or "not equivalent: why no fast test can kill it".
_CFG, _CK, _MF, _HF = ("src/forgelab/config.py", "src/forgelab/train/checkpoint.py", "src/forgelab/manifest.py",
                       "src/forgelab/train/hf_private.py")
_BR = "src/forgelab/serve/bench_report.py"
_MG, _RU = "src/forgelab/train/merge.py", "src/forgelab/runs.py"
_ENTER = "equivalent mutant: __enter__ sets it before anything reads it"
_WIDEN = ("equivalent mutant: the .to(dt) that follows converts the model to the check dtype anyway, and float32 "
          "weights widen exactly")
_ST, _TS = "src/forgelab/data/sft_store.py", "src/forgelab/data/tokenize_sft.py"
_LOCALE = ("equivalent mutant here: Python reads and writes text as UTF-8 under a UTF-8 or C locale (UTF-8 mode); it "
           "differs only on a legacy non-UTF-8 locale")
_LONG = "equivalent mutant: torch.full infers int64 (torch.long) from an integer fill value"
_FULL_ROWS = ("equivalent mutant: it only keeps rows with no room left open, which only an empty sample could use, "
              "and every sample has at least one token")
_INSIDE = ("not equivalent: shows only for run directories inside the project tree, and tests keep their files in "
           "a temporary directory")
_ONLY_FIRST = "equivalent mutant: only the closest match (close[0]) is shown, so how many are looked up is not seen"
_THROWAWAY = ("equivalent mutant: this merge is passed a throwaway origins dict (each layer records its own "
              "origins), so the origin given here is never read")
_ASCII = "equivalent mutant: json.dump escapes non-ASCII, so the manifest file is plain ASCII in any encoding"
_STOCK = ("not equivalent: the check reads transformers' own Trainer source, so only a transformers release whose "
          "_save_checkpoint stops calling _get_output_dir can tell them apart")
JUDGED: tuple[tuple[str | None, str | None, str, str], ...] = (  # None: any file, any function
    (_CFG, "_coerce", "errors.append(", "equivalent mutant: the list of member errors is built but never read "
                                        "(dead code)"),
    (_CFG, "_coerce", "get_args(tp)], )", _ONLY_FIRST),
    (_CFG, "_coerce", "get_args(tp)], n=2)", _ONLY_FIRST),
    (_CFG, "build", "list(fields), cutoff=0.5)", _ONLY_FIRST),
    (_CFG, "build", "list(fields), n=2, cutoff=0.5)", _ONLY_FIRST),
    (_CFG, "_load_layers", "seen + (path,)), None, {})", _THROWAWAY),
    (_CFG, "_load_layers", 'seen + (path,)), "XXXX", {})', _THROWAWAY),
    (_CFG, "load", "origins), None, {})", _THROWAWAY),
    (_CFG, "load", "origins), str(None), {})", _THROWAWAY),
    (_CFG, "_merge", "(isinstance(v, (dict, list))) and False", "equivalent mutant: every layer is a fresh YAML "
                                                                "parse, so keeping its dicts instead of copies is "
                                                                "not observable"),
    (_CFG, "build", "value, None, origins)", "equivalent mutant: key and origins appear only in error messages, "
                                             "and a schema's own defaults are valid"),
    (_CFG, "build", "prefix + name, None)", "equivalent mutant: key and origins appear only in error messages, "
                                            "and a schema's own defaults are valid"),
    (_CFG, "build", "rstrip('XX.XX')", "equivalent mutant: stripping 'X' and '.' equals stripping '.' unless a "
                                       "section name ends in 'X'; the lab's keys are lower case"),
    (_CK, "publish", "ignore_errors=None", "not equivalent: only an I/O error while removing the emptied staging "
                                           "dir tells them apart; no fast test injects one"),
    (_CK, "publish", "shutil.rmtree(staging_root, )", "not equivalent: only an I/O error while removing the "
                                                      "emptied staging dir tells them apart; no fast test injects one"),
    (_CK, "publish", "ignore_errors=False", "not equivalent: only an I/O error while removing the emptied staging "
                                            "dir tells them apart; no fast test injects one"),
    (_CK, "save_failure", "free_b <", "not equivalent: needs a disk with less than 16 MiB free (the full-disk save "
                                      "of tests/test_faults.py, marked slow)"),
    (_CK, "rotate", "keep_last >= 0", "equivalent mutant: found[:-0] is empty, so keep_last 0 removes nothing "
                                      "either way"),
    (_CK, "staging_dirs", "(run_dir.is_dir()) or True", "equivalent mutant: a glob in a missing directory yields "
                                                        "nothing, so the guard only saves a scan"),
    (_MF, "_sha256", "f.read(", "equivalent mutant: one block or many give the same digest (the chunk only bounds "
                                "memory)"),
    (_MF, "write_manifest", "encoding=None", _ASCII),
    (_MF, "write_manifest", 'encoding="UTF-8"', _ASCII),
    (_MF, "write_manifest", 'open(tmp, "w", )', _ASCII),
    (_MF, "verify", "encoding=None", _ASCII),
    (_MF, "verify", 'encoding="UTF-8"', _ASCII),
    (_MF, "write_manifest", "json.dump(body, f, ", "equivalent mutant: the indentation changes the layout of the "
                                                   "JSON, not what verify reads"),
    (_HF, "check", "save = getattr(Trainer", _STOCK),
    (_HF, "check", "if save is None", _STOCK),
    (_HF, "check", "no longer asks _get_output_dir for its directory", _STOCK),
    ("src/forgelab/report/runs.py", "discover", '"runs/train"', "not equivalent: the default root is the project's "
     "runs/train, which the temporary copy the mutants run in does not hold (runs/ is not copied)"),
    ("src/forgelab/report/runs.py", "discover", "(root.is_dir()) or True", "equivalent mutant: a glob in a missing "
     "directory yields nothing, so the guard only saves a scan"),
    (_BR, "compare", "is_relative_to(PROJECT_ROOT)) and False", _INSIDE),
    (_BR, "compare", "relpath(None, PROJECT_ROOT)", _INSIDE),
    (_BR, "compare", "relpath(PROJECT_ROOT)", _INSIDE),
    (_BR, "compare", "relpath(d, None)", _INSIDE + "; and relative to the working directory it is the same path "
                                         "whenever the command runs from the project root"),
    (_BR, "compare", "relpath(d, )", _INSIDE + "; and relative to the working directory it is the same path "
                                     "whenever the command runs from the project root"),
    (_ST, "check_packed_forward", 'getattr(conf, "use_cache", None)', "equivalent mutant: a config without use_cache "
     "reads None, falsy like False"),
    (_ST, "collate_sft", "dtype=None)", _LONG),
    (_ST, "collate_sft", "pad_token_id, )", _LONG),
    (_ST, "collate_sft", "IGNORE_INDEX, )", _LONG),
    (_ST, "write_store", '+ "\\n", )`', _LOCALE),
    ("src/forgelab/train/packing_check.py", "_alone", "+n % pad_to", "equivalent mutant: causal attention, so the "
     "amount of right padding cannot change the first n logits"),
    ("src/forgelab/train/packing_check.py", "_alone", ".to(None)", "equivalent mutant here: the ids are already on "
     "the CPU the tests run on; it differs on a GPU"),
    (_TS, "pack_best_fit", "(n, -2)", "equivalent mutant: any value below 0 sorts before every row index"),
    (_TS, "pack_best_fit", "room + n > 0", _FULL_ROWS),
    (_TS, "pack_best_fit", "room - n >= 0", _FULL_ROWS),
    (_TS, "padding_waste", "dtype=None)", "equivalent mutant here: NumPy makes Python ints int64 on Linux anyway"),
    (_TS, "padding_waste", "asarray(row_lengths, )", "equivalent mutant here: NumPy makes Python ints int64 on Linux "
                                                     "anyway"),
    (_MG, "render_prompts", 'getattr(tok, "chat_template", )', "equivalent mutant: every transformers tokenizer has "
     "a chat_template attribute (None without a template)"),
    (_MG, "render_prompts", "tokenize=None", "equivalent mutant: None is falsy like False"),
    (_MG, "peft_reference", "from_pretrained(base, dtype=None)", _WIDEN),
    (_MG, "peft_reference", "from_pretrained(base, )", _WIDEN),
    (_MG, "peft_reference", "is_trainable=False).to(None)", "equivalent mutant here: peft loads the adapter in the "
     "base model's dtype (float64 here), so the cast changes nothing"),
    (_MG, "merge_lora", 'float("INF")', "equivalent mutant: float() reads 'INF' as infinity too"),
    (_MG, "peft_reference", "is_trainable=None", "equivalent mutant: None is falsy like the default False"),
    (_MG, "peft_reference", "from_pretrained(model, adapter, ).to(dt)", "equivalent mutant: is_trainable defaults "
                                                                         "to False"),
    (_MG, "merge_lora", "safe_serialization=", "equivalent mutant here: this transformers version writes safetensors "
                                               "whatever the flag says"),
    (_MG, "merge_lora", "save_pretrained(tmp, )", "equivalent mutant here: this transformers version writes "
                                                  "safetensors whatever the flag says"),
    (_MG, "verify_merge", 'or "XXXX")', "equivalent mutant: neither path holds adapter_config.json, and the error "
                                        "names the record, not the path"),
    (_RU, "project_path", "(p.is_absolute()) and False", "equivalent mutant: pathlib joins an absolute path to the "
                                                          "root as that absolute path"),
    (_RU, "atomic_write_text", 'open(tmp, "w", )', _LOCALE),
    (_RU, "_append", 'open(path, "a", )', _LOCALE),
    (_RU, "Run.__enter__", "FileHandler(self.dir / log_name, )", _LOCALE),
    (_RU, "Run.__enter__", "StreamHandler(None)", "equivalent mutant: a StreamHandler without a stream writes to "
                                                 "sys.stderr"),
    (_RU, "sha256_file", "f.read(None)", "equivalent mutant: one block or many give the same digest (the chunk only "
                                         "bounds memory)"),
    (_RU, "hardware", "torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())", "not equivalent: "
     "runs only where CUDA is available, and the tests run on a CPU"),
    (_RU, "Run.__init__", "self._t0 = ", _ENTER),
    (_RU, "Run.__init__", "self._handlers: list[logging.Handler] = None", _ENTER),
    (_RU, "Run.write_summary", "round(time.time() - self._t0, 4)", "not equivalent, harmless: one more decimal in "
     "wall_seconds; a test of it would fail whenever the fourth decimal happens to be 0"),
    (_RU, "Run.__exit__", "format_exception(None, exc, tb)", "equivalent mutant: since Python 3.10 the type is taken "
                                                            "from the exception when value and traceback are given"),
    (_RU, "Run.__exit__", 'self.log.error(err)', "equivalent mutant: logging %-formats a message only when it has "
                                                 "arguments, so a '%' in the error is safe either way"),
    # any file
    (None, None, "ensure_ascii=None", "equivalent mutant: None is falsy like False"),
    # any file: how a text file is opened
    (None, None, 'encoding="UTF-8"', "equivalent mutant: codec names are case-insensitive"),
    (None, None, "encoding=None", _LOCALE),
)

# mutmut's exit codes per mutant, grouped as the report counts them
_KILLED, _TIMEOUT, _SURVIVED, _NO_TESTS = {1, 3}, {36, 24, -24, 152, 255, -9}, {0}, {5, 33}


def status_of(code) -> str:
    if code is None:
        return "not_checked"  # the budget ran out first
    for name, codes in (("killed", _KILLED), ("timeout", _TIMEOUT), ("survived", _SURVIVED),
                        ("no_tests", _NO_TESTS)):
        if code in codes:
            return name
    return "incompetent"  # suspicious, skipped, crashed: not a verdict on the tests


# ----------------------------------------------------------------------------- selection

def select(names: list[str] | None) -> list[Area]:
    """Areas by name, or by a source file (that area, mutating only that file)."""
    if not names:
        return list(AREAS)
    by_name = {a.name: a for a in AREAS}
    out = []
    for n in names:
        if n in by_name:
            out.append(by_name[n])
            continue
        rel = os.path.relpath(Path(n).resolve(), PROJECT_ROOT) if Path(n).exists() else n
        hits = [a for a in AREAS if rel in a.targets]
        if not hits:
            known = ", ".join(sorted(by_name) + sorted(f for a in AREAS for f in a.targets))
            raise MutationError(f"--modules {n!r}: not an area or a mutated source file; known: {known}")
        out.append(dataclasses.replace(hits[0], targets={rel: hits[0].targets[rel]}))
    return out


def module_of(path: str) -> str:
    return path[len("src/"):-len(".py")].replace("/", ".")


def mangled(function: str) -> str:
    """mutmut's name for a function's mutants: x_func, or xǁClassǁmethod for a method."""
    cls, _, fn = function.rpartition(".")
    return f"x{SEP}{cls}{SEP}{fn}" if cls else f"x_{function}"


def patterns(area: Area) -> list[str]:
    return [f"{module_of(path)}.{mangled(fn)}__mutmut_*" for path, fns in area.targets.items() for fn in fns]


# ----------------------------------------------------------------------------- the tool

def _site_packages(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def ensure_tool(root: Path = PROJECT_ROOT, log=print) -> Path:
    """The mutmut executable of .venv-mut, created when missing. mutmut runs the tests inside its
    own process (it forks one child per mutant), so its interpreter must also import torch and the
    lab: a .pth file adds this environment's site-packages after the tool's own."""
    venv = root / TOOL_VENV
    exe, stamp, want = venv / "bin" / TOOL, venv / ".forgelab-mut", f"{TOOL}=={TOOL_VERSION}"
    if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return exe
    log(f"[mutation] creating {venv} with {want}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    main_site = sysconfig.get_paths()["purelib"]
    pth = Path(_site_packages(venv / "bin" / "python")) / "_forgelab_main_env.pth"
    pth.write_text(f"import site; site.addsitedir({main_site!r})\n")
    # with the main environment visible, pip adds only what it lacks (pytest is reused)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", want], check=True)
    stamp.write_text(want + "\n")
    return exe


def _setup_cfg(area: Area) -> str:
    def lines(key, values):
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)
    return ("[mutmut]\nsource_paths = src\n" + lines("only_mutate", area.targets)
            + lines("also_copy", ("configs", "scripts"))
            + lines("pytest_add_cli_args_test_selection", (*area.tests, "-m", "not slow"))
            + lines("pytest_add_cli_args", ("-p", "no:cacheprovider"))
            + "use_git_change_detection = false\n")


def prepare_copy(area: Area, root: Path = PROJECT_ROOT) -> Path:
    """A temporary copy of the project for one area, with the setup.cfg that configures mutmut."""
    work = Path(tempfile.mkdtemp(prefix=f"forgelab-mutation-{area.name}-"))
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=skip)
        elif src.is_file():
            shutil.copy2(src, work / name)
    (work / "setup.cfg").write_text(_setup_cfg(area))
    for (path, fn), text in area.until.items():
        _stop_mutating_after(work / path, fn, text)
    # mutmut builds mutants/ as the tests' project root; links made first are kept
    (work / "mutants").mkdir()
    for name in LINKED:
        if (root / name).exists():
            (work / "mutants" / name).symlink_to(root / name)
    return work


def _stop_mutating_after(path: Path, function: str, text: str) -> None:
    """Exclude the rest of a function after the statement starting with `text` from mutation,
    with mutmut's no-mutate pragmas (in the copy only)."""
    src = path.read_text(encoding="utf-8")
    fn = _functions(ast.parse(src))[function]
    body = fn.body
    at = next(i for i, st in enumerate(body) if ast.get_source_segment(src, st).startswith(text))
    if at + 1 == len(body):
        return
    lines = src.splitlines(keepends=True)
    first, last = body[at + 1].lineno - 1, fn.end_lineno  # 0-based first excluded line, end of the function
    indent = " " * body[at + 1].col_offset
    lines.insert(last, f"{indent}# pragma: no mutate end\n")
    lines.insert(first, f"{indent}# pragma: no mutate start\n")
    path.write_text("".join(lines), encoding="utf-8")


def run_tool(exe: Path, area: Area, work: Path, workers: int, timeout_s: float) -> tuple[list[str], bool, str]:
    """Run mutmut for one area in its copy; returns (command, finished, log tail)."""
    cmd = [str(exe), "run", "--max-children", str(workers), *patterns(area)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    log_path = work / "mutmut.log"
    with open(log_path, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
            finished = True
        except subprocess.TimeoutExpired:  # the budget is spent: keep the verdicts already saved
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, finished = 0, False
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    if rc != 0:
        raise MutationError(f"{TOOL} failed for area {area.name} (exit {rc}); log {log_path}:\n{tail}")
    return cmd, finished, tail


# ----------------------------------------------------------------------------- reading the verdicts

def _functions(tree: ast.AST) -> dict[str, ast.FunctionDef]:
    """Top-level functions and methods by name ("Class.method" for a method)."""
    out = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"{node.name}.{sub.name}"] = sub
    return out


def _defs_by_name(source: str) -> dict[str, str]:
    """Every function's text by name (whole lines; the source is split once: mutated files are big)."""
    lines = source.splitlines()
    return {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def mutant_change(orig: str, mutant: str, names: tuple[str, str], plain: str) -> tuple[int, str]:
    """(line offset in the function, one-line diff) between a function's copy and its mutant,
    both shown under the function's own name."""
    a = orig.replace(names[0], plain).splitlines()
    b = mutant.replace(names[1], plain).splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            old = " ⏎ ".join(x.strip() for x in a[i1:i2]) or "(nothing)"
            new = " ⏎ ".join(x.strip() for x in b[j1:j2]) or "(nothing)"
            return i1, f"`{old}` → `{new}`"
    return 0, "(no textual change)"


def verdict(path: str, function: str, change: str, status: str) -> str:
    if status == "no_tests":
        return "not equivalent: no chosen test reaches this function, needs a test"
    for p, fn, text, judged in JUDGED:
        if p in (None, path) and fn in (None, function) and text in change:
            return judged
    return "not equivalent: needs a test"


def collect(area: Area, work: Path, root: Path = PROJECT_ROOT) -> list[dict]:
    """Per source file of the area: counts by status and the survivors with their diffs."""
    modules = []
    for path, fns in area.targets.items():
        meta = work / "mutants" / f"{path}.meta"
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"] if meta.is_file() else {}
        wanted = {f"{module_of(path)}.{mangled(fn)}": fn for fn in fns}
        mutated_src = (work / "mutants" / path).read_text(encoding="utf-8") if meta.is_file() else ""
        defs = _defs_by_name(mutated_src) if mutated_src else {}
        starts = {k: v.lineno for k, v in _functions(ast.parse((root / path).read_text(encoding="utf-8"))).items()}
        counts = dict.fromkeys(("total", "killed", "timeout", "survived", "no_tests", "incompetent",
                                "not_checked"), 0)
        survivors = []
        for key, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
            prefix = key.partition("__mutmut_")[0]
            if prefix not in wanted:
                continue  # a function of this file that the area does not mutate
            st = status_of(code)
            counts["total"] += 1
            counts[st] += 1
            if st in ("survived", "no_tests"):
                fn = wanted[prefix]
                local = key.rpartition(".")[2]
                orig_name = f"{prefix.rpartition('.')[2]}__mutmut_orig"
                offset, change = mutant_change(defs.get(orig_name, ""), defs.get(local, ""),
                                               (orig_name, local), fn.rpartition(".")[2])
                survivors.append({"mutant": key, "status": st, "function": fn,
                                  "line": starts.get(fn, 0) + offset, "change": change,
                                  "verdict": verdict(path, fn, change, st)})
        survivors.sort(key=lambda x: (x["line"], x["mutant"]))
        equivalent = sum(x["verdict"].startswith("equivalent") for x in survivors)
        detected = counts["killed"] + counts["timeout"]
        judged = counts["total"] - counts["incompetent"] - counts["not_checked"]
        modules.append({"path": path, "functions": list(fns), **counts, "equivalent": equivalent,
                        "score": _ratio(detected, judged),
                        "score_without_equivalent": _ratio(detected, judged - equivalent),
                        "survivors": survivors})
    return modules


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _natural(key: str) -> tuple[str, int]:
    head, _, n = key.rpartition("__mutmut_")
    return head, int(n) if n.isdigit() else 0


# ----------------------------------------------------------------------------- the run

def run(names: list[str] | None = None, out: Path | None = None, max_minutes: float = 40.0,
        workers: int = 2, keep: bool = False, command: str = "", log=print) -> dict:
    """Mutate every selected area in turn within the budget; write the markdown and JSON reports."""
    out = Path(out or PROJECT_ROOT / "reports" / "mutation.md")
    areas = select(names)
    exe = ensure_tool(log=log)
    t0 = time.monotonic()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results = []
    for area in areas:
        left = max_minutes * 60 - (time.monotonic() - t0)
        if left <= 0:
            results.append({"name": area.name, "title": area.title, "skipped": "budget spent before it started",
                            "tests": list(area.tests), "note": area.note, "modules": []})
            continue
        log(f"[mutation] {area.name}: {', '.join(area.targets)} ({left / 60:.1f} min left)")
        work = prepare_copy(area)
        a0 = time.monotonic()
        try:
            cmd, finished, _ = run_tool(exe, area, work, workers, left)
            modules = collect(area, work)
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        results.append({"name": area.name, "title": area.title, "tests": list(area.tests), "note": area.note,
                        "tool_command": " ".join(cmd[:4]) + " <one pattern per function>",
                        "wall_seconds": round(time.monotonic() - a0, 1), "finished": finished,
                        "modules": modules})
        for m in modules:
            log(f"[mutation]   {m['path']}: {m['killed'] + m['timeout']}/{m['total']} detected, "
                f"score {_pct(m['score'])}")
    report = {"date": started, "tool": f"{TOOL} {TOOL_VERSION}", "tool_venv": TOOL_VENV,
              "command": command, "workers": workers, "max_minutes": max_minutes,
              "wall_seconds": round(time.monotonic() - t0, 1),
              "score_rule": "(killed + timeout) / (total - incompetent - not checked)", "areas": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), report)
    out.write_text(markdown(report), encoding="utf-8")
    return report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rep: dict) -> str:
    lines = ["# Mutation testing of the lab's guarantees", "",
             f"- date: {rep['date']}; wall time {rep['wall_seconds'] / 60:.1f} min "
             f"(budget {rep['max_minutes']:g} min, {rep['workers']} workers)",
             f"- tool: {rep['tool']} in its own environment `{rep['tool_venv']}`, run in a temporary copy of "
             "the project (the working tree is not touched)",
             f"- command: `{rep['command']}`",
             f"- score = {rep['score_rule']}; a timeout counts as detected; \"no tests\" means no chosen "
             "test reaches the function, and counts as a survivor",
             "- only the functions listed per area are mutated, each against its area's fast tests only",
             "- \"of them equivalent\": survivors judged equivalent below; the last column sets them aside", "",
             "| area | module | mutants | killed | timeout | survived | no tests | incompetent | not checked "
             "| score | of them equivalent | score without equivalent |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in rep["areas"]:
        for m in a["modules"]:
            lines.append(f"| {a['name']} | `{m['path']}` | {m['total']} | {m['killed']} | {m['timeout']} | "
                         f"{m['survived']} | {m['no_tests']} | {m['incompetent']} | {m['not_checked']} | "
                         f"{_pct(m['score'])} | {m['equivalent']} | {_pct(m['score_without_equivalent'])} |")
        if not a["modules"]:
            lines.append(f"| {a['name']} | ({a.get('skipped', 'nothing mutated')}) | | | | | | | | | | |")
    for a in rep["areas"]:
        lines += ["", f"## {a['name']}: {a['title']}", ""]
        if "wall_seconds" in a:
            lines.append(f"- wall time {a['wall_seconds']:.0f} s" + ("" if a["finished"] else
                                                                      "; **stopped by the budget: partial**"))
        lines.append("- tests: " + ", ".join(f"`{t}`" for t in a["tests"]) + " (`-m \"not slow\"`)")
        for m in a["modules"]:
            lines.append(f"- `{m['path']}` mutated functions: " + ", ".join(f"`{f}`" for f in m["functions"]))
        if a["note"]:
            lines.append(f"- left out: {a['note']}")
        survivors = [(m["path"], s) for m in a["modules"] for s in m["survivors"]]
        if survivors:
            lines += ["", f"Surviving mutants ({len(survivors)}):", ""]
            lines += [f"- `{p}:{s['line']}` ({s['function']}) {s['change']}: {s['verdict']}" for p, s in survivors]
        elif a["modules"]:
            lines += ["", "No surviving mutants."]
    return "\n".join(lines) + "\n"
