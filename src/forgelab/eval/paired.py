"""Paired comparisons of evaluated models on the same items, with a verdict in words.

Two models scored on the same items are compared item by item, not through their separate
accuracies: the per-item differences cancel the items' own difficulty, so a paired test sees
differences that two independent standard errors hide.

- Accuracy tasks (math, MMLU, any predictions file with an item id and a correctness field):
  items are matched by id; the difference B - A comes with a percentile CI from a paired
  bootstrap over items, and p from McNemar's exact test (a two-sided binomial test on the
  discordant items, where exactly one of the two models is right).
- Perplexity: the same sliding windows (same tokenizer, same stream) are compared window by
  window; the difference of log-perplexity B - A (nats per token, token-weighted) comes with a
  bootstrap CI over windows and p from a sign-flip permutation test of the per-window
  differences.

A difference is *beyond noise* when the CI excludes 0 and p < alpha; otherwise the verdict says
that no difference was shown (never that the models are equal).

Which pairs: every model against the first one (the baseline, e.g. base), then every model
against the one before it (e.g. cpt -> sft-merged), each pair once.
"""
from __future__ import annotations

import glob
import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..jsonl import iter_jsonl
from ..runs import display_path, project_path

# How an item is identified and where its outcome is, tried in order on a file's first record.
# A new task needs an entry here only when its records use other field names.
ITEM_KEYS: list[tuple[str, ...]] = [
    ("subject", "row"),   # mmlu_<k>shot: row is the file line; the subject makes ids readable
    ("task_id",),         # code tasks (e.g. code_humaneval)
    ("row",),             # math_<ds>, choice_<ds>
    ("id",),
    ("doc_id",),
]
CORRECT_FIELDS: list[str] = ["correct", "passed"]
WINDOW_FIELDS = ("group", "begin", "end", "targets", "nll_sum")  # predictions/<model>.perplexity.jsonl
ALIGN_FIELDS = ("group", "begin", "end", "targets")

# Prediction files a model's summary says were written (runner.py's names); files of other
# tasks are found by listing predictions/.
EXPECTED_FILES = {
    "perplexity": lambda r: ["perplexity"],
    "math": lambda r: [f"math_{ds}" for ds in r],
    "mmlu": lambda r: [f"mmlu_{k.removesuffix('-shot')}shot" for k in r],
    "choice": lambda r: [f"choice_{ds}" for ds in r],
    "code": lambda r: [f"code_{ds}" for ds in r],  # code_humaneval
}
LABELS = [(re.compile(r"math_(.+)"), r"math \1"), (re.compile(r"mmlu_(\d+)shot"), r"MMLU \1-shot"),
          (re.compile(r"perplexity"), "held-out text")]

_CHUNK = 4_000_000  # resampled values held in memory at once (32 MB of float64)


class PairingError(ValueError):
    """Two predictions files that cannot be compared item by item (the message says why)."""


# --- statistics -------------------------------------------------------------------------------

def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: min(1, 2 P(X <= min(k, n-k))),
    summed in exact integers (one term from the previous, so large n stays cheap)."""
    m = min(k, n - k)
    term, tail = 1, 1
    for j in range(1, m + 1):
        term = term * (n - j + 1) // j  # C(n, j), exact
        tail += term
    return min(1.0, float(Fraction(2 * tail, 1 << n)))


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of two models' outcomes on the same items (a[i], b[i]: item i right).
    b01: A wrong and B right; b10: A right and B wrong. Only these discordant items carry
    information; under no difference each is equally likely to go either way."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar: {len(a)} outcomes for A, {len(b)} for B")
    b01 = sum(1 for x, y in zip(a, b) if not x and y)
    b10 = sum(1 for x, y in zip(a, b) if x and not y)
    n = b01 + b10
    return {"n": len(a), "b01": b01, "b10": b10, "discordant": n,
            "p_value": 1.0 if n == 0 else binomial_two_sided(b01, n)}


def _percentiles(stats: np.ndarray, conf: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - conf) / 2, 1 - (1 - conf) / 2])
    return float(lo), float(hi)


def _check_boot(n: int, n_boot: int, conf: float) -> None:
    if n == 0:
        raise ValueError("no items to compare")
    if n_boot < 1 or not 0 < conf < 1:
        raise ValueError(f"n_boot must be >= 1 and conf in (0, 1), got n_boot={n_boot}, conf={conf}")


def paired_bootstrap(a: list[bool], b: list[bool], n_boot: int = 10000, seed: int = 0,
                     conf: float = 0.95) -> dict:
    """Accuracy difference B - A (a fraction) with a percentile CI from resampling items.

    An item's paired outcome is -1, 0 or +1 (B minus A), and a resample's difference depends
    only on how many drawn items fall in each of the three: drawing those counts from a
    multinomial is exactly resampling n items with replacement, at O(n_boot) cost."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} outcomes for A, {len(b)} for B")
    n = len(a)
    _check_boot(n, n_boot, conf)
    d = np.asarray(b, dtype=np.int64) - np.asarray(a, dtype=np.int64)
    counts = np.array([(d == -1).sum(), (d == 0).sum(), (d == 1).sum()])
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot)
    lo, hi = _percentiles((draws[:, 2] - draws[:, 0]) / n, conf)
    return {"n": n, "acc_a": float(np.mean(a)), "acc_b": float(np.mean(b)), "diff": float(d.mean()),
            "ci_low": lo, "ci_high": hi, "conf": conf, "n_boot": n_boot, "seed": seed}


def _bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """sum(num) / sum(den) over n_boot resamples of the rows, in chunks that fit memory."""
    n, out = len(num), []
    chunk = max(1, _CHUNK // n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out.append(num[idx].sum(axis=1) / den[idx].sum(axis=1))
    return np.concatenate(out)


def sign_flip_p(d: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p of sum(d) under random signs of the paired differences d (no difference:
    each window's difference is as likely to go either way). Exact for up to 16 values, else
    Monte Carlo with the usual +1 correction (a valid p, never 0)."""
    n, obs = len(d), abs(float(d.sum()))
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # float sums of equal magnitude count as ties
    if n <= 16:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ d) >= obs - tol))
    rng, hits = np.random.default_rng(seed), 0
    chunk = max(1, _CHUNK // n)
    for start in range(0, n_perm, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, n_perm - start), n)) * 2 - 1
        hits += int((np.abs(signs @ d) >= obs - tol).sum())
    return (hits + 1) / (n_perm + 1)


def _check_windows(a_windows: list[dict], b_windows: list[dict]) -> None:
    """The two files must score the very same targets: same groups, spans and target counts."""
    if len(a_windows) != len(b_windows):
        raise PairingError(f"perplexity windows do not line up: {len(a_windows)} windows for A, "
                           f"{len(b_windows)} for B (different tokenizers or protocols?)")
    bad = [i for i, (x, y) in enumerate(zip(a_windows, b_windows))
           if any(x[k] != y[k] for k in ALIGN_FIELDS)]
    if bad:
        i = bad[0]
        raise PairingError(f"perplexity windows do not line up: {len(bad)} of {len(a_windows)} differ, "
                           f"first window {i}: A has {_span(a_windows[i])}, B has {_span(b_windows[i])} "
                           f"(different tokenizers or protocols?)")


def _span(w: dict) -> str:
    return ", ".join(f"{k}={w[k]!r}" for k in ALIGN_FIELDS)


def paired_perplexity(a_windows: list[dict], b_windows: list[dict], n_boot: int = 10000,
                      seed: int = 0, conf: float = 0.95) -> dict:
    """Window-by-window comparison of two models' NLLs on the same windows (records of
    predictions/<model>.perplexity.jsonl). diff = log-perplexity B - A in nats per token
    (token-weighted, so it equals the difference of the pooled figures); ratio = exp(diff) =
    perplexity B / perplexity A. Raises PairingError when the windows differ."""
    _check_windows(a_windows, b_windows)
    n = len(a_windows)
    _check_boot(n, n_boot, conf)
    t = np.array([w["targets"] for w in a_windows], dtype=np.float64)
    na = np.array([w["nll_sum"] for w in a_windows], dtype=np.float64)
    nb = np.array([w["nll_sum"] for w in b_windows], dtype=np.float64)
    d = nb - na
    diff = float(d.sum() / t.sum())
    lo, hi = _percentiles(_bootstrap_ratio(d, t, n_boot, np.random.default_rng(seed)), conf)
    nll_a, nll_b = float(na.sum() / t.sum()), float(nb.sum() / t.sum())
    return {"n": n, "tokens": int(t.sum()), "nll_a": nll_a, "nll_b": nll_b,
            "ppl_a": math.exp(nll_a), "ppl_b": math.exp(nll_b),
            "diff": diff, "ci_low": lo, "ci_high": hi, "ratio": math.exp(diff),
            "ratio_ci": [math.exp(lo), math.exp(hi)],
            "share_b_lower": float(np.mean(nb < na)), "p_value": sign_flip_p(d, n_boot, seed),
            "conf": conf, "n_boot": n_boot, "seed": seed}


# --- verdicts ---------------------------------------------------------------------------------

def classify(comp: dict, alpha: float = 0.05) -> str:
    """'beyond noise' (the CI excludes 0 and p < alpha), 'within noise' (neither) or
    'borderline' (one of the two)."""
    ci_out = comp["ci_low"] > 0 or comp["ci_high"] < 0
    p_low = comp["p_value"] < alpha
    return "beyond noise" if ci_out and p_low else "within noise" if not (ci_out or p_low) else "borderline"


def _signed(x: float, digits: int) -> str:
    x = 0.0 if round(x, digits) == 0 else x  # no "-0.0"
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def p_text(p: float, alpha: float = 0.05) -> str:
    """'= 0.41', '= 0.0002', '< 0.0001': two significant digits, more when rounding would put
    the shown value on alpha or on its other side (0.0499 is not shown as 0.05)."""
    if p < 1e-4:
        return "< 0.0001"
    for digits in range(2, 8):
        s = f"{p:.{digits}g}"
        if (float(s) < alpha) == (p < alpha) and (float(s) != alpha or p == alpha):
            return f"= {s}"
    return f"= {p!r}"


def verdict(comp: dict, alpha: float = 0.05) -> str:
    """One sentence for one comparison (a dict from compare_records), e.g. 'sft-merged beats
    base on math asdiv by +12.0 points (95% CI +7.5 to +16.4; McNemar p = 0.0002): beyond noise.'"""
    c = classify(comp, alpha)
    a, b, what, up = comp["a"], comp["b"], comp["label"], comp["diff"] > 0
    ci = f"{100 * comp['conf']:g}% CI"
    if comp["kind"] == "perplexity":
        head = (f"{b} has {'higher' if up else 'lower'} perplexity than {a} on {what}" if c == "beyond noise"
                else f"{b} differs from {a} in perplexity on {what}")
        detail = (f"by {_signed(comp['diff'], 3)} nats/token (ratio {comp['ratio']:.3f}; {ci} "
                  f"{_signed(comp['ci_low'], 3)} to {_signed(comp['ci_high'], 3)}; {b} lower on "
                  f"{100 * comp['share_b_lower']:.0f}% of {comp['n']} windows; "
                  f"sign-flip p {p_text(comp['p_value'], alpha)})")
    else:
        head = ((f"{b} beats {a}" if up else f"{b} loses to {a}") if c == "beyond noise"
                else f"{b} differs from {a}") + f" on {what}"
        detail = (f"by {_signed(100 * comp['diff'], 1)} points ({ci} {_signed(100 * comp['ci_low'], 1)} to "
                  f"{_signed(100 * comp['ci_high'], 1)}; McNemar p {p_text(comp['p_value'], alpha)})")
    if c == "beyond noise":
        end = "beyond noise."
    elif c == "within noise":
        end = "within noise, no difference shown."
    elif comp["p_value"] < alpha:
        end = f"borderline, no difference shown (p < {alpha:g} but the CI includes 0)."
    else:
        end = f"borderline, no difference shown (the CI excludes 0 but p \u2265 {alpha:g})."
    return f"{head} {detail}: {end}"


# --- predictions files ------------------------------------------------------------------------

def label(task: str) -> str:
    """'math_asdiv' -> 'math asdiv', 'mmlu_5shot' -> 'MMLU 5-shot', 'code_humaneval' -> 'code humaneval'."""
    base, _, group = task.partition(".")
    for pat, rep in LABELS:
        if pat.fullmatch(base):
            text = pat.sub(rep, base)
            break
    else:
        text = base.replace("_", " ")
    return f"{text}, {group}" if group else text


def load_predictions(path: str | Path) -> dict:
    """One predictions file as {"kind": "perplexity", "windows": [...]} or {"kind": "accuracy",
    "key": item key fields, "field": correctness field, "items": {key: bool}}."""
    lines = list(iter_jsonl(path, error=PairingError))
    if not lines:
        raise PairingError(f"{path}: no records")
    for n, rec in lines:
        if not isinstance(rec, dict):
            raise PairingError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
    first = lines[0][1]
    if all(k in first for k in WINDOW_FIELDS):
        for n, rec in lines:
            miss = [k for k in WINDOW_FIELDS if k not in rec]
            if miss:
                raise PairingError(f"{path}:{n}: window record without {', '.join(miss)}")
            if not isinstance(rec["targets"], int) or rec["targets"] < 1:
                raise PairingError(f"{path}:{n}: targets must be a positive integer, got {rec['targets']!r}")
        return {"kind": "perplexity", "windows": [rec for _, rec in lines]}
    key = next((k for k in ITEM_KEYS if all(f in first for f in k)), None)
    field = next((f for f in CORRECT_FIELDS if f in first), None)
    if key is None or field is None:
        raise PairingError(f"{path}: records have no item id ({' / '.join('+'.join(k) for k in ITEM_KEYS)}) "
                           f"and correctness field ({' / '.join(CORRECT_FIELDS)}); first record has "
                           f"{', '.join(sorted(first))}")
    items: dict = {}
    for n, rec in lines:
        miss = [f for f in (*key, field) if f not in rec]
        if miss:
            raise PairingError(f"{path}:{n}: record without {', '.join(miss)}")
        v = rec[field]
        if not isinstance(v, bool) and v not in (0, 1):
            raise PairingError(f"{path}:{n}: {field} must be true/false, got {v!r}")
        k = tuple(rec[f] for f in key)
        if not all(isinstance(x, (str, int)) for x in k):
            raise PairingError(f"{path}:{n}: item id {'+'.join(key)} must be strings or integers, got {k!r}")
        if k in items:
            raise PairingError(f"{path}:{n}: item {_key_text(key, k)} appears twice")
        items[k] = bool(v)
    return {"kind": "accuracy", "key": key, "field": field, "items": items}


def _key_text(fields: tuple, k: tuple) -> str:
    return ", ".join(f"{f}={v!r}" for f, v in zip(fields, k))


def match_items(a: dict, b: dict) -> tuple[list, list[bool], list[bool]]:
    """Items of two accuracy predictions (load_predictions) matched by key, in A's order.
    Refused (PairingError with the counts) unless both hold exactly the same items."""
    if a["key"] != b["key"]:
        raise PairingError(f"items are identified differently: A by {'+'.join(a['key'])}, B by {'+'.join(b['key'])}")
    only_a = [k for k in a["items"] if k not in b["items"]]
    only_b = [k for k in b["items"] if k not in a["items"]]
    if only_a or only_b:
        eg = _key_text(a["key"], (only_a or only_b)[0])
        raise PairingError(f"item sets differ: {len(only_a) + len(only_b)} unmatched items "
                           f"({len(only_a)} of A's {len(a['items'])} not in B, {len(only_b)} of B's "
                           f"{len(b['items'])} not in A; e.g. {eg})")
    keys = list(a["items"])
    return keys, [a["items"][k] for k in keys], [b["items"][k] for k in keys]


def compare_records(task: str, a: str, a_pred: dict, b: str, b_pred: dict, *, n_boot: int = 10000,
                    seed: int = 0, conf: float = 0.95, alpha: float = 0.05) -> list[dict]:
    """The comparisons of model b against model a on one task, from their loaded predictions:
    one for an accuracy task; for perplexity the pooled one, plus one per group when the
    windows have several. Each has the statistics, `call` and `verdict`."""
    if a_pred["kind"] != b_pred["kind"]:
        raise PairingError(f"A's file holds {a_pred['kind']} records, B's {b_pred['kind']} records")
    out = []
    if a_pred["kind"] == "accuracy":
        _, xa, xb = match_items(a_pred, b_pred)
        m = mcnemar(xa, xb)
        out.append({"task": task, **paired_bootstrap(xa, xb, n_boot, seed, conf), "p_value": m["p_value"],
                    "b01": m["b01"], "b10": m["b10"], "test": "McNemar exact",
                    "item_key": "+".join(a_pred["key"]), "field": a_pred["field"]})
    else:
        wa, wb = a_pred["windows"], b_pred["windows"]
        out.append({"task": task, **paired_perplexity(wa, wb, n_boot, seed, conf)})
        groups = list(dict.fromkeys(w["group"] for w in wa))
        if len(groups) > 1:
            for g in groups:
                idx = [i for i, w in enumerate(wa) if w["group"] == g]
                out.append({"task": f"{task}.{g}", **paired_perplexity([wa[i] for i in idx], [wb[i] for i in idx],
                                                                       n_boot, seed, conf)})
    for c in out:
        c.update(kind=a_pred["kind"], label=label(c["task"]), a=a, b=b)
        c.update(call=classify(c, alpha), verdict=verdict(c, alpha))
    return out


# --- a report view ----------------------------------------------------------------------------

def pairs(names: list[str]) -> list[tuple[str, str]]:
    """Each model against the first (the baseline), then each against the one before it."""
    if len(names) < 2:
        return []
    out = [(names[0], n) for n in names[1:]]
    out += [p for p in zip(names[1:], names[2:]) if p not in out]
    return out




def model_tasks(name: str, entry: dict) -> tuple[Path, list[str], set[str]]:
    """A model's predictions folder, the tasks it has predictions for or should have (in
    order), and the subset its summary says were evaluated."""
    pred_dir = project_path(entry["run"]).parent / "predictions"
    expected = [t for task, files in EXPECTED_FILES.items() if task in entry.get("results", {})
                for t in files(entry["results"][task])]
    # '<model>.<task>.jsonl'; a task with a dot would belong to a model named '<model>.<x>'
    found = sorted(p.name[len(name) + 1:-len(".jsonl")] for p in pred_dir.glob(f"{glob.escape(name)}.*.jsonl"))
    found = [t for t in found if "." not in t and t not in expected]
    return pred_dir, expected + found, set(expected)


def compare_view(view: dict, *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0,
                 conf: float = 0.95) -> dict:
    """Every paired comparison of a merged report view (report.merge): per task, each pair of
    `pairs()`. A comparison that cannot be made (missing file, different items, other
    tokenizer) is listed under "skipped" with the reason instead."""
    models = view["models"]
    names = list(models)
    info = {n: model_tasks(n, models[n]) for n in names}
    tasks = list(dict.fromkeys(t for n in names for t in info[n][1]))
    cache: dict = {}

    def load(name: str, task: str) -> dict:
        if (name, task) not in cache:
            path = info[name][0] / f"{name}.{task}.jsonl"
            if not path.is_file():
                what = ("is missing" if task in info[name][2] else
                        f"does not exist ({name} was not evaluated on {label(task)})")
                cache[name, task] = PairingError(f"{display_path(path)} {what}")
            else:
                try:
                    cache[name, task] = load_predictions(path)
                except PairingError as e:
                    cache[name, task] = e
        if isinstance(cache[name, task], PairingError):
            raise cache[name, task]
        return cache[name, task]

    comps, skipped = [], []
    for task in tasks:
        for a, b in pairs(names):
            if task not in info[a][1] and task not in info[b][1]:
                continue  # neither model has this task: nothing to say
            try:
                pa, pb = load(a, task), load(b, task)
                if pa["kind"] == "perplexity":
                    fa, fb = models[a].get("tokenizer_fingerprint"), models[b].get("tokenizer_fingerprint")
                    if fa != fb:
                        raise PairingError(f"tokenizers differ ({fa} vs {fb}): token-level NLLs are not comparable")
                comps += compare_records(task, a, pa, b, pb, n_boot=n_boot, seed=seed, conf=conf, alpha=alpha)
            except PairingError as e:
                skipped.append({"task": task, "label": label(task), "a": a, "b": b, "reason": str(e)})
    return {"alpha": alpha, "conf": conf, "n_boot": n_boot, "seed": seed,
            "pairs": [list(p) for p in pairs(names)], "comparisons": comps, "skipped": skipped}


def _cells(c: dict, alpha: float) -> list[str]:
    if c["kind"] == "perplexity":
        return [f"{c['n']} windows", f"ppl {c['ppl_a']:.3f}", f"ppl {c['ppl_b']:.3f}",
                f"{_signed(c['diff'], 3)} nats/token ({_signed(c['ci_low'], 3)} to {_signed(c['ci_high'], 3)})",
                f"ratio {c['ratio']:.3f} (p {p_text(c['p_value'], alpha)})"]
    return [str(c["n"]), f"{100 * c['acc_a']:.1f}%", f"{100 * c['acc_b']:.1f}%",
            f"{_signed(100 * c['diff'], 1)} ({_signed(100 * c['ci_low'], 1)} to {_signed(100 * c['ci_high'], 1)})",
            f"p {p_text(c['p_value'], alpha)}"]


def markdown_lines(paired: dict) -> list[str]:
    """The report section: a table, what the test is, the verdicts, what was not compared."""
    alpha, conf = paired["alpha"], f"{100 * paired['conf']:g}%"
    L = ["## Paired comparisons", ""]
    if not paired["pairs"]:
        return L + ["One model only: nothing to compare."]
    L += ["Pairs: each model against the first one (the baseline), then each model against the one before it. "
          "Differences are B − A.", "",
          f"| task | A | B | n items | A acc | B acc | difference ({conf} CI) | McNemar p / perplexity ratio "
          f"| verdict |",
          "|---|---|---|---|---|---|---|---|---|"]
    if not paired["comparisons"]:
        L = L[:-2] + ["No comparison could be made (see below)."]
    for c in paired["comparisons"]:
        L.append(f"| {c['label']} | {c['a']} | {c['b']} | " + " | ".join(_cells(c, alpha)) + f" | {c['call']} |")
    L += ["", f"Items are matched by id across the two models' predictions files; the difference "
          f"(accuracy points) has a {conf} CI from a paired bootstrap over items ({paired['n_boot']:,} resamples, "
          f"seed {paired['seed']}), and p is McNemar's exact test on the discordant items (one model right, "
          f"the other wrong). Perplexity compares the NLL per token of the same windows (B − A in nats/token, "
          f"bootstrap CI over windows, p from a sign-flip permutation test of the per-window differences); "
          f"a difference is beyond noise when the CI excludes 0 and p < {alpha:g}."]
    if paired["comparisons"]:
        L += [""] + [f"- {c['verdict']}" for c in paired["comparisons"]]
    if paired["skipped"]:
        L += ["", "Not compared:", ""]
        L += [f"- {s['label']}, {s['a']} vs {s['b']}: {s['reason']}" for s in paired["skipped"]]
    return L
