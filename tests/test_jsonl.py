"""forgelab.jsonl: one JSONL reader, each bad-line policy on real files."""
from __future__ import annotations

import pytest

from forgelab.jsonl import BadJson, BadLine, JsonlError, iter_jsonl, loads_line, read_jsonl
from forgelab.report.runs import ReportError, read_metrics

GOOD = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'


def write(tmp_path, text: str | bytes, name: str = "m.jsonl"):
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


@pytest.mark.parametrize("bad", ["raise", "torn_tail", "skip", "keep"])
def test_blank_lines_are_skipped_and_line_numbers_are_the_files(tmp_path, bad):
    p = write(tmp_path, '\n{"a": 1}\n   \n\n{"a": 2}\r\n\t\n')
    assert list(iter_jsonl(p, bad=bad)) == [(2, {"a": 1}), (5, {"a": 2})]


def test_raise_names_file_line_and_the_json_error(tmp_path):
    p = write(tmp_path, GOOD + "{broken\n" + GOOD)
    with pytest.raises(JsonlError, match=rf"^{p}:3: invalid JSON \(Expecting property name enclosed in "
                                          r"double quotes, column 2\)$"):
        read_jsonl(p)
    torn = write(tmp_path, GOOD + '{"step": 3, "lo', "torn.jsonl")
    with pytest.raises(JsonlError, match=rf"{torn}:3: invalid JSON"):  # "raise" allows no torn line either
        read_jsonl(torn)


def test_callers_exception_class(tmp_path):
    p = write(tmp_path, "not json\n")
    with pytest.raises(ReportError, match=rf"{p}:1: invalid JSON \(Expecting value, column 1\)"):
        list(iter_jsonl(p, error=ReportError))


def test_torn_tail_skips_and_records_only_an_unterminated_last_line(tmp_path):
    p = write(tmp_path, GOOD + '{"step": 3, "lo')  # killed mid-append
    r = read_jsonl(p, bad="torn_tail")
    assert [x["step"] for x in r.records] == [1, 2]
    assert len(r.bad) == 1 and r.bad[0].torn and r.bad[0].lineno == 3
    assert str(r.bad[0]).startswith(f"{p}:3: invalid JSON (") and str(r.bad[0]).endswith("(torn last line)")
    # a complete last line without its newline is a record, not a torn line
    ok = write(tmp_path, GOOD + '{"step": 3}', "ok.jsonl")
    assert [x["step"] for x in read_jsonl(ok, bad="torn_tail").records] == [1, 2, 3]


@pytest.mark.parametrize("text,line", [
    (GOOD + '{"step": 3, "lo\n' + '{"step": 4}\n', 3),  # bad middle line
    (GOOD + '{"step": 3, "lo\n', 3),                    # bad last line that was terminated: not torn
    ('{"step": 1}\n{"step": 2, "lo\n\n{"step": 3, "l', 2),  # torn tail after an earlier bad line
])
def test_torn_tail_raises_on_any_other_bad_line(tmp_path, text, line):
    p = write(tmp_path, text)
    with pytest.raises(JsonlError, match=rf"{p}:{line}: invalid JSON"):
        read_jsonl(p, bad="torn_tail")


def test_torn_tail_of_a_cut_multibyte_character(tmp_path):
    p = write(tmp_path, GOOD.encode() + '{"text": "日本'.encode()[:-1])
    r = read_jsonl(p, bad="torn_tail")
    assert len(r.records) == 2 and r.bad[0].torn and "not UTF-8" in r.bad[0].reason


def test_skip_counts_every_bad_line(tmp_path):
    p = write(tmp_path, '{"a": 1}\n[oops\n{"a": 2}\n{"a" 2}\n{"a": 3}\n{"a": ')
    r = read_jsonl(p, bad="skip")
    assert r.records == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert [(b.lineno, b.torn) for b in r.bad] == [(2, False), (4, False), (6, True)]
    assert all(str(b).startswith(f"{p}:{b.lineno}: invalid JSON (") for b in r.bad)
    collected: list = []
    assert len(list(iter_jsonl(p, bad="skip", bad_lines=collected))) == 3 and collected == r.bad


# line 2, byte column 14: \xc3 lacks its continuation byte
NOT_UTF8 = b'{"a": 1}\n{"text": "caf\xc3(", "n": 2}\n{"a": 3}\n'


@pytest.mark.parametrize("bad", ["raise", "torn_tail"])
def test_a_line_that_is_not_utf8_raises_with_line_and_byte_column(tmp_path, bad):
    p = write(tmp_path, NOT_UTF8)
    with pytest.raises(JsonlError, match=rf"^{p}:2: not UTF-8 \(invalid continuation byte at column 14\)$"):
        list(iter_jsonl(p, bad=bad))
    first = write(tmp_path, b'{"a": 1}\n\xff\xfe\n{"a": 2}\n', "first.jsonl")
    with pytest.raises(JsonlError, match=rf"{first}:2: not UTF-8 \(invalid start byte at column 1\)"):
        list(iter_jsonl(first, bad=bad))


def test_a_line_that_is_not_utf8_is_a_bad_line_under_skip_and_keep(tmp_path):
    p = write(tmp_path, NOT_UTF8)
    r = read_jsonl(p, bad="skip")
    assert r.records == [{"a": 1}, {"a": 3}]
    (b,) = r.bad
    assert (b.lineno, b.kind, b.torn) == (2, "utf8", False)
    assert str(b) == f"{p}:2: not UTF-8 (invalid continuation byte at column 14)"
    assert b.detail == "invalid continuation byte at column 14"
    got = list(iter_jsonl(p, bad="keep"))
    assert [n for n, _ in got] == [1, 2, 3] and got[1][1] == b and got[2][1] == {"a": 3}
    # a JSON error and an undecodable byte in one file: both counted, in file order
    mixed = write(tmp_path, NOT_UTF8 + b'{"a": \n\xe6\x97\n{"a": 4}\n', "mixed.jsonl")
    r = read_jsonl(mixed, bad="skip")
    assert r.records == [{"a": 1}, {"a": 3}, {"a": 4}]
    assert [(x.lineno, x.kind) for x in r.bad] == [(2, "utf8"), (4, "json"), (5, "utf8")]
    assert r.bad[2].reason == "not UTF-8 (invalid continuation byte at column 1)"


def test_keep_yields_bad_lines_in_place(tmp_path):
    p = write(tmp_path, '{"a": 1}\n{"a": \n[1, 2]\n')
    got = list(iter_jsonl(p, bad="keep"))
    assert [n for n, _ in got] == [1, 2, 3] and got[2][1] == [1, 2]
    b = got[1][1]
    assert isinstance(b, BadLine) and b.where == f"{p}:2" and not b.torn
    assert b.detail == "Expecting value at column 7"


def test_missing_file_and_unknown_policy(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl", missing_ok=True).records == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="bad='count'"):
        list(iter_jsonl(write(tmp_path, GOOD), bad="count"))


def test_loads_line():
    assert loads_line('{"a": [1]}\n') == {"a": [1]} and loads_line(b"3") == 3
    with pytest.raises(BadJson) as e:
        loads_line('{"a": 1')
    assert e.value.reason == "invalid JSON (Expecting ',' delimiter, column 8)"


def test_report_read_metrics_skips_a_torn_tail_and_raises_on_a_bad_middle_line(tmp_path):
    p = write(tmp_path, GOOD + '{"step": 3, "lo')
    torn: list = []
    assert [x["step"] for x in read_metrics(p, torn)] == [1, 2] and len(torn) == 1 and torn[0].torn
    bad = write(tmp_path, '{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', "bad.jsonl")
    with pytest.raises(ReportError, match=rf"{bad}:2: invalid JSON"):
        read_metrics(bad)
    assert read_metrics(tmp_path / "absent.jsonl") == []
