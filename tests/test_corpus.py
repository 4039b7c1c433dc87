"""Stage 02 (CPT corpus) on the real KJV and People's Daily files: cleaning, POS-tag
stripping, grouping, every filter reason, exact and near duplicates, mixing, the held-out
split and determinism."""
import functools
import json
import logging
from collections import Counter

import pytest

from forgelab import config as cfg
from forgelab.data import clean
from forgelab.data.corpus import (CorpusConfig, CorpusError, SourceConfig, build_corpus, filter_reason,
                                  read_documents, sample_source, split_heldout)

LOG = logging.getLogger("test")


@functools.lru_cache(maxsize=None)
def _read_kjv(path):
    return tuple(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())


def kjv_rows(raw_data):
    return [dict(r) for r in _read_kjv(raw_data["kjv"])]


def chapter(rows, book, ch):
    return [r for r in rows if r["book"] == book and r["chapter"] == ch]


def pd_lines(raw_data):
    return raw_data["peoples_daily"].read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- cleaning

def test_normalize_removes_ansi_and_controls_applies_nfkc_collapses_whitespace(raw_data):
    verse = kjv_rows(raw_data)[0]["text"]  # "In the beginning God created the heaven and the earth."
    dirty = (f"\x1b[1;31m{verse}\x1b[0m\x07\u200b \t  \x1b]0;title\x07"
             "\r\n\r\n\r\n\n  ＡＢＣ　１２３，ﬁne\x00  end  ")
    out = clean.normalize(dirty)
    assert out == f"{verse}\n\nABC 123,fine end"
    assert clean.normalize(dirty, form=None).endswith("ＡＢＣ　１２３，ﬁne end".replace("　", " "))
    # real People's Daily text: full-width digits and punctuation become ASCII under NFKC
    pd = clean.strip_pos_tags(pd_lines(raw_data)[3])
    assert "１２月" in pd and "12月" in clean.normalize(pd) and "，" not in clean.normalize(pd)


def test_strip_pos_tags_on_the_real_file(raw_data):
    lines = pd_lines(raw_data)
    assert clean.strip_pos_tags(lines[0]) == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    total = sum(len(clean.strip_pos_tags(ln)) for ln in lines)
    assert 1_830_000 < total < 1_850_000  # 1.84M characters once the tags are gone
    assert clean.strip_pos_tags("１/２/m  的/u") == "１/２的"  # a word may hold "/"
    with pytest.raises(ValueError, match=r"f\.txt:7: token '充满' is not WORD/TAG"):
        clean.strip_pos_tags("迈向/v  充满  希望/n", "f.txt:7")


def test_text_stats_and_language_share(raw_data):
    en = clean.text_stats(" ".join(r["text"] for r in chapter(kjv_rows(raw_data), "Genesis", 1)))
    zh = clean.text_stats(clean.normalize(clean.strip_pos_tags(pd_lines(raw_data)[5])))
    assert en.latin_share == 1.0 and en.cjk_share == 0.0 and en.symbol_ratio < 0.06
    assert zh.cjk_share > 0.95 and 0.05 < zh.symbol_ratio < 0.25
    assert clean.script_share(zh, "zh") == zh.cjk_share and clean.script_share(en, "en") == en.latin_share


# ----------------------------------------------------------------------------- grouping

def test_kjv_chapters_become_titled_documents(raw_data):
    src = SourceConfig(name="kjv", path=str(raw_data["kjv"]), format="jsonl", lang="en",
                       group_by=["book", "chapter"], title="{book} {chapter}", join=" ")
    counts = Counter()
    docs = list(read_documents(src, "error", counts, LOG))
    assert len(docs) == 1189 and counts["records"] == 31103
    g1 = chapter(kjv_rows(raw_data), "Genesis", 1)
    assert docs[0].id == "kjv:1-31"
    assert docs[0].text == "Genesis 1\n" + " ".join(r["text"] for r in g1)


def test_plain_text_lines_grouped_by_size_and_blank_lines(tmp_path, raw_data):
    verses = [r["text"] for r in kjv_rows(raw_data)[:12]]
    txt = tmp_path / "plain.txt"
    txt.write_text("\n".join(verses[:8]) + "\n\n" + "\n".join(verses[8:]) + "\n", encoding="utf-8")
    one = list(read_documents(SourceConfig(name="t", path=str(txt), format="text"), "error", Counter(), LOG))
    assert [d.text for d in one] == verses and one[8].id == "t:10"
    src = SourceConfig(name="t", path=str(txt), format="text", group_max_chars=400)
    docs = list(read_documents(src, "error", Counter(), LOG))
    assert [line for d in docs for line in d.text.split("\n")] == verses
    assert 1 < len(docs) < 12 and all(len(d.text) <= 400 or "\n" not in d.text for d in docs)
    spans = [tuple(int(x) for x in d.id[2:].split("-")) for d in docs]
    assert not any(sp[0] < 9 < sp[-1] for sp in spans)  # no document runs across the blank line 9


def test_bad_record_is_reported_with_file_and_line(tmp_path, raw_data):
    lines = raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:3] + ['{"text": "broken', *lines[3:]]) + "\n", encoding="utf-8")
    src = SourceConfig(name="kjv", path=str(bad), group_by=["book", "chapter"])
    with pytest.raises(CorpusError, match=rf"{bad}:4: invalid JSON"):
        list(read_documents(src, "error", Counter(), LOG))
    counts = Counter()
    docs = list(read_documents(src, "skip", counts, LOG))
    assert counts["bad_record"] == 1 and counts["records"] == 5 and len(docs) == 1


# ----------------------------------------------------------------------------- the stage

@pytest.fixture()
def mini_sources(tmp_path, raw_data):
    """Real chapters and paragraphs arranged so that each drop reason fires exactly once."""
    rows = kjv_rows(raw_data)
    zh = [clean.strip_pos_tags(x) for x in pd_lines(raw_data)]
    g3 = chapter(rows, "Genesis", 3)
    near = [dict(r) for r in g3[:-1]]  # Genesis 3 less its last verse, one word changed
    near[0]["text"] = near[0]["text"].replace("serpent", "snake", 1)
    recs = (chapter(rows, "Genesis", 1) + chapter(rows, "Genesis", 2) + g3
            + chapter(rows, "2 Kings", 19) + chapter(rows, "Isaiah", 37)          # similar (0.58), both kept
            + chapter(rows, "Psalms", 117)                                         # too_short (182 chars)
            + chapter(rows, "Psalms", 119)                                         # too_long (12.8k chars)
            + [{"book": "Symbols", "chapter": 1, "text": " ".join(f"{w} ** --" for w in g3[0]["text"].split())}]
            + [{"book": "Citations", "chapter": 1, "text": " ".join(r["citation"] for r in g3)}]  # digit_ratio
            + [{"book": "Mixed", "chapter": 1, "text": "".join(zh[4:8])}]          # wrong_language
            + chapter(rows, "Genesis", 2)                                          # exact_dup
            + near)                                                                # near_dup
    kjv = tmp_path / "kjv.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines.insert(10, "{not json")                                                  # bad_record (skip)
    kjv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tagged = pd_lines(raw_data)
    block_a, block_b, block_c = tagged[4:16], tagged[20:40], tagged[60:80]
    changed = block_a[:1] + [block_a[1].replace("高兴/a", "愉快/a")] + block_a[2:]  # two characters differ
    assert changed != block_a
    pd = tmp_path / "pd.txt"
    pd.write_text("\n\n".join("\n".join(b) for b in (block_a, block_b, block_c, block_a, changed)) + "\n",
                  encoding="utf-8")
    return kjv, pd


def corpus_conf(kjv, pd, out, **over):
    data = {
        "sources": [
            {"name": "kjv", "path": str(kjv), "format": "jsonl", "lang": "en", "ratio": 0.7,
             "group_by": ["book", "chapter"], "title": "{book} {chapter}", "join": " "},
            {"name": "pd", "path": str(pd), "format": "pos_tagged", "lang": "zh", "ratio": 0.3,
             "group_max_chars": 5000},
        ],
        "out_dir": str(out), "on_bad_record": "skip",
        "filters": {"min_chars": 200, "max_chars": 12000},
        "mix": {"by": "chars", "target": 0}, "heldout_fraction": 0.2, "seed": 0,
    }
    for k, v in over.items():
        node = data
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg.build(CorpusConfig, data)


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_every_drop_reason_is_counted(tmp_path, mini_sources):
    kjv, pd = mini_sources
    s = build_corpus(corpus_conf(kjv, pd, tmp_path / "out"), LOG)
    k, p = s["sources"]["kjv"]["dropped"], s["sources"]["pd"]["dropped"]
    for reason in ("bad_record", "too_short", "too_long", "symbol_ratio", "digit_ratio",
                   "wrong_language", "exact_dup", "near_dup"):
        assert k[reason] == 1, (reason, k)
    assert p["exact_dup"] == 1 and p["near_dup"] == 1
    assert s["sources"]["kjv"]["after_dedup_docs"] == 5  # Genesis 1-3, 2 Kings 19, Isaiah 37
    assert s["sources"]["pd"]["after_dedup_docs"] == 3
    ex = {e["dropped"]: e for e in s["near_dup_examples"]}
    assert len(ex) == 2 and all(e["similarity"] >= 0.8 for e in ex.values())
    # target 0: the largest 70/30 mix the documents allow; the limiting source is used whole
    assert s["dropped"]["sampled_out"] == k["sampled_out"] + p["sampled_out"]
    train, held = read_jsonl(tmp_path / "out" / "train.jsonl"), read_jsonl(tmp_path / "out" / "heldout.jsonl")
    assert {tuple(sorted(d)) for d in train + held} == {("id", "lang", "source", "text")}
    assert not {d["id"] for d in train} & {d["id"] for d in held}
    assert len(train) + len(held) == sum(v["sampled_docs"] for v in s["sources"].values())
    assert {d["source"] for d in held} == {"kjv", "pd"}  # at least one held out per source
    texts = [d["text"] for d in train + held]
    assert len(set(texts)) == len(texts)


def test_near_dup_threshold_is_what_decides(tmp_path, mini_sources):
    kjv, pd = mini_sources
    # 2 Kings 19 and Isaiah 37 share ~58% of their 5-word shingles: a 0.5 threshold drops one.
    s = build_corpus(corpus_conf(kjv, pd, tmp_path / "out", **{"dedup": {"threshold": 0.5}}), LOG)
    assert s["sources"]["kjv"]["dropped"]["near_dup"] == 2
    s = build_corpus(corpus_conf(kjv, pd, tmp_path / "out", **{"dedup": {"near": False, "exact": False}}), LOG)
    assert s["dropped"]["near_dup"] == 0 and s["dropped"]["exact_dup"] == 0


def test_minhash_estimate_tracks_exact_jaccard(raw_data):
    rows = kjv_rows(raw_data)
    a = clean.shingle_hashes(" ".join(r["text"] for r in chapter(rows, "2 Kings", 19)), "en")
    b = clean.shingle_hashes(" ".join(r["text"] for r in chapter(rows, "Isaiah", 37)), "en")
    h = clean.MinHasher(256, seed=1)
    est = float((h.signature(a) == h.signature(b)).mean())
    assert abs(est - clean.jaccard(a, b)) < 0.08 and 0.5 < clean.jaccard(a, b) < 0.65


def test_same_seed_same_output_other_seed_other_sample(tmp_path, raw_data):
    # the first third of each real source, a target below what is there: sampling decides
    src_kjv, src_pd = tmp_path / "kjv.jsonl", tmp_path / "pd.txt"
    src_kjv.write_text("\n".join(raw_data["kjv"].read_text(encoding="utf-8").splitlines()[:10_000]) + "\n",
                       encoding="utf-8")
    src_pd.write_text("\n".join(pd_lines(raw_data)[:6_500]) + "\n", encoding="utf-8")
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        conf = corpus_conf(src_kjv, src_pd, tmp_path / f"o{i}", seed=seed, heldout_fraction=0.05,
                           **{"mix.target": 600_000, "filters.min_chars": 50, "filters.max_chars": 100_000,
                              "sources": [
                                  {"name": "kjv", "path": str(src_kjv), "lang": "en", "ratio": 0.7,
                                   "group_by": ["book", "chapter"], "title": "{book} {chapter}", "join": " "},
                                  {"name": "pd", "path": str(src_pd), "format": "pos_tagged", "lang": "zh",
                                   "ratio": 0.3, "group_max_chars": 1000}]})
        s = build_corpus(conf, LOG)
        outs.append(((tmp_path / f"o{i}" / "train.jsonl").read_bytes(),
                     (tmp_path / f"o{i}" / "heldout.jsonl").read_bytes(), s))
    assert outs[0][:2] == outs[1][:2]
    assert outs[0][0] != outs[2][0]
    s = outs[0][2]
    assert abs(s["mix"]["achieved_ratio"]["kjv"] - 0.7) < 0.03
    assert abs(s["mix"]["achieved_total"] - 600_000) < 15_000
    assert s["sources"]["kjv"]["dropped"]["too_long"] == 0 and s["sources"]["pd"]["dropped"]["digit_ratio"] > 0


def test_sampling_and_split_do_not_depend_on_other_documents(raw_data):
    from forgelab.data.corpus import Doc
    docs = [Doc(f"s:{i}", "s", "en", "x" * (100 + i)) for i in range(200)]
    a = {d.id for d in sample_source(docs, 5000, "chars", 3)}
    b = {d.id for d in sample_source(docs[:150] + docs[150:][::-1], 5000, "chars", 3)}
    assert a == b  # input order does not matter
    tr, ho = split_heldout(docs, 0.1, 3)
    assert len(ho) == 20 and len(tr) == 180
    tr2, ho2 = split_heldout(docs + [Doc("s:new", "s", "en", "y" * 100)], 0.1, 3)
    assert len({d.id for d in ho} & {d.id for d in ho2}) >= 19  # one new doc moves at most one


def test_filter_reason_order_and_language(raw_data):
    f = cfg.build(CorpusConfig, {"sources": [{"name": "x", "path": "x"}]}).filters
    zh = clean.normalize("".join(clean.strip_pos_tags(x) for x in pd_lines(raw_data)[4:8]))
    assert filter_reason(zh, "zh", f) is None
    assert filter_reason(zh, "en", f) == "wrong_language"
    assert filter_reason(zh, "any", f) is None
    assert filter_reason(zh[:10], "zh", f) == "too_short"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"sources\[0\]\.ratio"):
        cfg.build(CorpusConfig, {"sources": [{"name": "a", "path": "p", "ratio": 0}]})
    with pytest.raises(cfg.ConfigError, match="dedup.bands"):
        cfg.build(CorpusConfig, {"sources": [{"name": "a", "path": "p"}], "dedup": {"bands": 7}})
    with pytest.raises(cfg.ConfigError, match="group_by"):
        cfg.build(CorpusConfig, {"sources": [{"name": "a", "path": "p", "format": "text", "group_by": ["x"]}]})
    conf = cfg.build(CorpusConfig, {"sources": [{"name": "a", "path": str(tmp_path / "nope.jsonl")}]})
    with pytest.raises(CorpusError, match="input file not found"):
        build_corpus(conf, LOG)
