"""SFT record formats, read with their locations and converted to one messages schema.

Readers yield ``(line, record)`` pairs: for JSON Lines the line number, for a JSON array the
line where the element starts, for Parquet the 1-based row number. Converters turn one
record into ``(messages, tools)`` or raise :class:`BadRecord` with a reason code and detail.
A record holding bytes that are not UTF-8 is read as ``BadRecord("not_utf8", "<reason> at
column <c>")`` (the 1-based byte column within its line; in a JSON array "<reason> at line <l>,
column <c>"), so it costs that record only.

The schema: a list of ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``,
at most one system message (first), then user first, assistant last, roles alternating
(user -> assistant, assistant -> user | tool, tool -> assistant; several tool results in a
row only in the ``messages`` format). Contents are stripped and must not be empty.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")

# Reason codes, in the order the summary lists them.
REASONS = ("bad_json", "not_an_object", "missing_field", "bad_type", "empty_conversation",
           "role_order", "empty_content", "unknown_role", "not_utf8")

# format -> the fields a source's `columns` may rename (format field -> name in the file).
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system", "tools", "from", "value"),
    "messages": ("messages", "role", "content", "tools"),
}

# ShareGPT role tags -> schema roles. `function` is the assistant calling a tool (its value is
# the call, usually JSON); `observation` is what the tool returned.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "function": "assistant", "observation": "tool"}
MESSAGES_ROLES = {r: r for r in ROLES}


class BadRecord(ValueError):
    """One record that cannot become a conversation; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SFTFileError(ValueError):
    """A whole file cannot be read (e.g. a JSON array that does not parse)."""


# ----------------------------------------------------------------------------- readers

def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        # Many ".json" dumps are really JSON Lines: decide by the first character (read as
        # bytes, so an undecodable byte further on is that record's problem, not the file's).
        with open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                head = chunk.lstrip()
                if head:
                    return "json" if head[:1] == b"[" else "jsonl"
        return "json"
    raise SFTFileError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet)")


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line, record or BadRecord) for every record of a file; blank lines are skipped."""
    kind = file_kind(path)
    if kind == "jsonl":
        from ..jsonl import BadLine, iter_jsonl
        for n, rec in iter_jsonl(path, bad="keep", error=SFTFileError):
            if isinstance(rec, BadLine):
                rec = BadRecord("not_utf8" if rec.kind == "utf8" else "bad_json", rec.detail)
            yield n, rec
    elif kind == "json":
        yield from _iter_json_array(path)
    else:
        import pyarrow.parquet as pq  # installed with `datasets`

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Decode a JSON array element by element so each record keeps the line it starts on. An
    element with undecodable bytes (inside its strings) is a ``not_utf8`` bad record."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # bad bytes -> U+DC80..U+DCFF
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def fail(i: int, what: str) -> SFTFileError:
        line = text.count("\n", 0, i) + 1
        return SFTFileError(f"{path}:{line}: invalid JSON array: {what}")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise fail(i, "expected '['")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    line, counted = 1, 0  # line number of position `counted`, advanced incrementally
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        m = _ESCAPED.search(text, i, end)
        yield line, obj if m is None else _not_utf8(text, line + text.count("\n", i, m.start()), m.start())
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise fail(i + 1, "extra data after the array")
            return
        raise fail(i, "expected ',' or ']'")


_ESCAPED = re.compile("[\udc80-\udcff]")  # an undecodable byte, as surrogateescape reads it


def _not_utf8(text: str, line: int, pos: int) -> BadRecord:
    """The bad record of an undecodable byte at ``pos`` (on ``line``) of a surrogateescape text."""
    start = text.rfind("\n", 0, pos) + 1
    col = len(text[start:pos].encode("utf-8", "surrogateescape")) + 1
    end = text.find("\n", pos)
    try:
        text[pos:end if end >= 0 else len(text)].encode("utf-8", "surrogateescape").decode("utf-8")
        why = "invalid byte"
    except UnicodeDecodeError as e:
        why = e.reason
    return BadRecord("not_utf8", f"{why} at line {line}, column {col}")


# ----------------------------------------------------------------------------- converters

def _get(rec: dict, field: str, columns: dict, required: bool = True) -> Any:
    name = columns.get(field, field)
    if name not in rec or rec[name] is None:
        if required:
            raise BadRecord("missing_field", f"no field '{name}'"
                            + (f" (mapped from '{field}')" if name != field else ""))
        return None
    return rec[name]


def _turns(rec: dict, field: str, columns: dict) -> list:
    """The non-empty list of turns a sharegpt or messages record holds under ``field``."""
    turns = _get(rec, field, columns)
    if not isinstance(turns, list):
        raise BadRecord("bad_type", f"{field}: expected a list")
    if not turns:
        raise BadRecord("empty_conversation", f"{field} is empty")
    return turns


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("bad_type", f"{where}: expected a string, got {type(value).__name__}")
    return value.strip()


def _tools(value: Any) -> list | None:
    """Tool schemas: a list of objects, or a JSON string of one (LLaMA-Factory style)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord("bad_type", f"tools: not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord("bad_type", "tools: expected a list of objects")
    return value or None


def check_conversation(messages: list[dict], allow_tool_runs: bool = False) -> None:
    """Enforce the schema's role order and non-empty contents (raises BadRecord)."""
    if not messages:
        raise BadRecord("empty_conversation", "no messages")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role", f"message {i}: role {m['role']!r}")
        if not m["content"]:
            raise BadRecord("empty_content", f"message {i} ({m['role']}) is empty")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body:
        raise BadRecord("empty_conversation", "only a system message")
    allowed = {"user": {"assistant"}, "assistant": {"user", "tool"},
               "tool": {"assistant", "tool"} if allow_tool_runs else {"assistant"}}
    if body[0]["role"] != "user":
        raise BadRecord("role_order", f"first turn is {body[0]['role']!r}, expected 'user'")
    for i in range(1, len(body)):
        prev, cur = body[i - 1]["role"], body[i]["role"]
        if cur == "system":
            raise BadRecord("role_order", "system message not at the start")
        if cur not in allowed[prev]:
            raise BadRecord("role_order", f"{cur!r} after {prev!r} (turn {i})")
    if body[-1]["role"] != "assistant":
        raise BadRecord("role_order", f"last turn is {body[-1]['role']!r}, expected 'assistant'")


def from_alpaca(rec: dict, columns: dict, user_template: str) -> tuple[list[dict], None]:
    instruction = _text(_get(rec, "instruction", columns), "instruction")
    inp = _get(rec, "input", columns, required=False)
    inp = _text(inp, "input") if inp is not None else ""
    output = _text(_get(rec, "output", columns), "output")
    system = _get(rec, "system", columns, required=False)
    history = _get(rec, "history", columns, required=False) or []
    if not instruction:
        raise BadRecord("empty_content", "instruction is empty")
    messages = []
    if system is not None and _text(system, "system"):
        messages.append({"role": "system", "content": _text(system, "system")})
    if not isinstance(history, list):
        raise BadRecord("bad_type", "history: expected a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord("bad_type", f"history[{k}]: expected a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{k}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{k}][1]")})
    user = user_template.format(instruction=instruction, input=inp).strip() if inp else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    check_conversation(messages)
    return messages, None


def from_sharegpt(rec: dict, columns: dict, roles: dict) -> tuple[list[dict], list | None]:
    conv = _turns(rec, "conversations", columns)
    role_key, value_key = columns.get("from", "from"), columns.get("value", "value")
    tag_map = {**SHAREGPT_ROLES, **{k: SHAREGPT_ROLES[v] for k, v in roles.items()}}
    messages = []
    system = _get(rec, "system", columns, required=False)
    if system is not None and _text(system, "system"):
        messages.append({"role": "system", "content": _text(system, "system")})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRecord("bad_type", f"turn {i}: expected an object")
        if role_key not in turn:
            raise BadRecord("missing_field", f"turn {i}: no field '{role_key}'")
        if value_key not in turn:
            raise BadRecord("missing_field", f"turn {i}: no field '{value_key}'")
        tag = turn[role_key]
        if tag not in tag_map:
            raise BadRecord("unknown_role", f"turn {i}: role {tag!r} (known: {', '.join(tag_map)})")
        messages.append({"role": tag_map[tag], "content": _text(turn[value_key], f"turn {i}")})
    check_conversation(messages)
    return messages, _tools(_get(rec, "tools", columns, required=False))


def _openai_content(m: dict, i: int, content_key: str) -> str:
    content = m.get(content_key)
    if isinstance(content, list):  # content parts: only text parts can be trained on here
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord("bad_type", f"message {i}: unsupported content part {kind!r}")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None or content == "":
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            # An assistant turn that only calls tools: train on the calls as JSON text.
            return json.dumps([c.get("function", c) if isinstance(c, dict) else c for c in calls],
                              ensure_ascii=False)
        if content is None:
            raise BadRecord("missing_field", f"message {i}: no field '{content_key}'")
    return _text(content, f"message {i}")


def from_messages(rec: dict, columns: dict, roles: dict) -> tuple[list[dict], list | None]:
    msgs = _turns(rec, "messages", columns)
    role_key, content_key = columns.get("role", "role"), columns.get("content", "content")
    role_map = {**MESSAGES_ROLES, **roles}
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRecord("bad_type", f"message {i}: expected an object")
        if role_key not in m:
            raise BadRecord("missing_field", f"message {i}: no field '{role_key}'")
        if m[role_key] not in role_map:
            raise BadRecord("unknown_role", f"message {i}: role {m[role_key]!r} (known: {', '.join(role_map)})")
        out.append({"role": role_map[m[role_key]], "content": _openai_content(m, i, content_key)})
    check_conversation(out, allow_tool_runs=True)
    return out, _tools(_get(rec, "tools", columns, required=False))


def convert(rec: Any, fmt: str, columns: dict, roles: dict, user_template: str,
            default_system: str | None = None) -> tuple[list[dict], list | None]:
    """One raw record -> (messages, tools); raises BadRecord."""
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "alpaca":
        messages, tools = from_alpaca(rec, columns, user_template)
    elif fmt == "sharegpt":
        messages, tools = from_sharegpt(rec, columns, roles)
    else:
        messages, tools = from_messages(rec, columns, roles)
    if default_system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": default_system.strip()})
    return messages, tools


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}
