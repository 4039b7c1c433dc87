"""Text cleaning and quality signals for the CPT corpus: normalization (control characters,
ANSI escapes, Unicode form, whitespace), per-document ratios used by the filters, POS-tag
stripping for tagged corpora, and MinHash near-duplicate detection.

The ``regex`` module (a transformers dependency) gives Unicode property and script classes;
they are compiled once into a code point -> class table, so a document's signals are one
numpy bincount instead of a Python loop over characters.
"""
from __future__ import annotations

import functools
import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np
import regex

# ESC-introduced sequences: CSI (colors, cursor moves), OSC (titles, links) and 2-char escapes.
_ANSI = regex.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# Control (Cc) and format (Cf: zero-width space, BOM, soft hyphen...) characters, tab and
# newline excepted. Applied after ANSI removal so an ESC does not leave "[31m" behind.
_CONTROL = regex.compile(r"[\p{Cc}\p{Cf}--[\t\n]]", flags=regex.V1)
_HSPACE = regex.compile(r"[^\S\n]+")
_BLANKS = regex.compile(r"\n{3,}")
_SPACE = regex.compile(r"\s")
_WORD = regex.compile(r"\w+")

# Which script a language is written in, for the language check.
CJK_LANGS = {"zh", "ja", "ko"}


def normalize(text: str, form: str | None = "NFKC") -> str:
    """ANSI escapes and control characters out, Unicode form, whitespace collapsed.

    Line structure is kept (paragraphs matter to a language model): runs of spaces and tabs
    become one space, lines are stripped, and at most one blank line separates paragraphs.
    """
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    text = _CONTROL.sub("", text)
    if form:
        text = unicodedata.normalize(form, text)
    text = _HSPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


# "/TAG" and the whitespace after it; a word may itself hold "/" (e.g. "1/2/m" -> "1/2").
_POS_TAG = regex.compile(r"/[^\s/]+(?:\s+|$)")


def strip_pos_tags(line: str, where: str = "") -> str:
    """'迈向/v  充满/v' -> '迈向充满'. Tokens are separated by whitespace, each ends in /TAG.

    Chinese words are joined without spaces; a token without a tag is an input error.
    """
    line = line.strip()
    text, n = _POS_TAG.subn("", line)
    tokens = line.split()
    if n != len(tokens):
        bad = next((t for t in tokens if not all(t.rpartition("/"))), tokens[0])
        raise ValueError(f"{where}: token {bad!r} is not WORD/TAG")
    return text


@dataclass
class TextStats:
    chars: int
    symbol_ratio: float   # punctuation + symbols over non-space characters
    digit_ratio: float    # decimal digits over non-space characters
    latin_share: float    # Latin-script letters over all letters
    cjk_share: float      # Han/kana/hangul over all letters


# Character classes of the table below.
_OTHER, _WS, _PUNCT, _DIGIT, _LATIN, _CJK, _LETTER = range(7)


@functools.cache
def _class_table() -> np.ndarray:
    """uint8 class of every code point (about 0.6 s, once per process)."""
    every = "".join(map(chr, range(0x110000)))
    table = np.zeros(0x110000, dtype=np.uint8)
    for code, pattern in [(_WS, r"\s"), (_PUNCT, r"[\p{P}\p{S}]"), (_DIGIT, r"\p{Nd}"),
                          (_LETTER, r"\p{L}"), (_LATIN, r"\p{Latin}"),
                          (_CJK, r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]")]:
        idx = np.fromiter((m.start() for m in regex.finditer(pattern, every)), dtype=np.int64)
        if code in (_LATIN, _CJK):  # scripts refine letters only (a script also has marks, digits)
            idx = idx[table[idx] == _LETTER]
        table[idx] = code
    return table


def text_stats(text: str) -> TextStats:
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = np.bincount(_class_table()[cps], minlength=7)
    visible = max(1, len(cps) - int(n[_WS]))
    letters = int(n[_LETTER] + n[_LATIN] + n[_CJK])
    return TextStats(
        chars=len(text),
        symbol_ratio=float(n[_PUNCT] / visible),
        digit_ratio=float(n[_DIGIT] / visible),
        latin_share=float(n[_LATIN] / letters) if letters else 0.0,
        cjk_share=float(n[_CJK] / letters) if letters else 0.0,
    )


def script_share(stats: TextStats, lang: str) -> float:
    """Share of letters in the script that `lang` is written in (CJK or Latin)."""
    return stats.cjk_share if lang in CJK_LANGS else stats.latin_share


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- near duplicates

_MASK32 = np.uint64(0xFFFFFFFF)


_WORD_IDS: dict[str, int] = {}


def _word_id(w: str) -> int:
    """Stable 64-bit id of a word (Python's hash() changes per process), memoized: a corpus
    has far fewer distinct words than words."""
    h = _WORD_IDS.get(w)
    if h is None:
        if len(_WORD_IDS) > 2_000_000:
            _WORD_IDS.clear()
        h = _WORD_IDS[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
    return h


def shingle_hashes(text: str, lang: str, word_ngram: int = 5, char_ngram: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of a document's shingles.

    Chinese and Japanese have no spaces between words, so CJK languages use character
    n-grams (spaces dropped); other languages use lower-cased word n-grams. The n-gram hash
    is a polynomial rolling hash computed in numpy over per-unit ids.
    """
    if lang in CJK_LANGS:
        units = np.frombuffer(_SPACE.sub("", text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = char_ngram
    else:
        words = _WORD.findall(text.lower())
        units = np.fromiter((_word_id(w) for w in words), dtype=np.uint64, count=len(words))
        n = word_ngram
    if len(units) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, len(units))
    h = np.zeros(len(units) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):  # h = sum units[i+k] * P^(n-1-k), mod 2^64
            h = h * np.uint64(1099511628211) + units[k:len(units) - n + 1 + k]
    return np.unique(h)


class MinHasher:
    """MinHash signatures with multiply-shift hash functions ((a*x + b) mod 2^64) >> 32."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, hashes: np.ndarray, chunk: int = 4096) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(hashes), chunk):  # chunks bound memory on very long docs
                x = hashes[i:i + chunk]
                v = (self.a[:, None] * x[None, :] + self.b[:, None]) >> np.uint64(32)
                sig = np.minimum(sig, v.min(axis=1))
        return sig.astype(np.uint32)


class NearDupIndex:
    """LSH over MinHash signatures: `bands` bands of `num_perm // bands` rows. A document whose
    estimated Jaccard similarity with an already kept one reaches `threshold` is a near duplicate.

    Keep-first: documents are offered in a fixed order, so the result is deterministic.
    """

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8, seed: int = 0):
        if num_perm % bands:
            raise ValueError(f"num_perm {num_perm} is not a multiple of bands {bands}")
        self.hasher = MinHasher(num_perm, seed)
        self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.sigs: list[np.ndarray] = []
        self.keys: list[str] = []

    def add_or_match(self, key: str, hashes: np.ndarray) -> tuple[str, float] | None:
        """Return (key, similarity) of a kept near duplicate, or index the document and return None."""
        if len(hashes) == 0:
            return None
        sig = self.hasher.signature(hashes)
        band_keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for b, bk in enumerate(band_keys):
            for j in self.buckets[b].get(bk, ()):
                if j in seen:
                    continue
                seen.add(j)
                sim = float(np.mean(self.sigs[j] == sig))
                if sim >= self.threshold:
                    return self.keys[j], sim
        idx = len(self.sigs)
        self.sigs.append(sig)
        self.keys.append(key)
        for b, bk in enumerate(band_keys):
            self.buckets[b].setdefault(bk, []).append(idx)
        return None


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash sets (for checks and tests)."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)
