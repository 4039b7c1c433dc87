"""The one JSONL reader of the lab, with an explicit policy for bad lines.

A JSONL file is read line by line (bytes, split at "\n" only and decoded per line, so every
error names its line). Blank (whitespace-only) lines are skipped under every policy. A line
is *bad* when it is not valid UTF-8 or not valid JSON; its reason names the column:

* ``invalid JSON (<msg>, column <c>)``: ``c`` is the 1-based character column of the JSON error;
* ``not UTF-8 (<reason> at column <c>)``: ``c`` is the 1-based *byte* column, within the line,
  of the first undecodable byte (e.g. ``not UTF-8 (invalid continuation byte at column 12)``).

Both kinds are treated alike under every policy. What happens to a bad line is the caller's
choice, ``bad=``:

``"raise"``
    Every bad line raises ``error(f"{file}:{line}: <reason>")``, e.g.
    ``m.jsonl:3: invalid JSON (Expecting value, column 1)`` (``error`` defaults to
    :class:`JsonlError`; callers pass their own exception class).
``"torn_tail"``
    For append-only files written one ``"...\\n"`` line at a time (metrics.jsonl, batch
    answers): a kill mid-append can leave only the *last* line cut, and such a line has no
    closing newline. A bad unterminated last line is skipped and recorded (``BadLine.torn``);
    any other bad line raises as under ``"raise"``.
``"skip"``
    Bad lines are skipped and recorded, so the caller can count and report them.
``"keep"``
    Bad lines are yielded in place as :class:`BadLine` objects (keeps positions and lets the
    caller turn them into its own bad-record type).

One undecodable byte therefore costs one line, never the file: under "skip" and "keep" the
file's other records are read as usual (a kill mid-append can also cut a multibyte character,
which "torn_tail" skips as a torn last line).

"Recorded" means appended to the ``bad_lines`` list given to :func:`iter_jsonl`, or to
``JsonlRead.bad`` from :func:`read_jsonl`. Each :class:`BadLine` prints as
``file:line: reason``.

Loops that read other formats in the same pass (plain text, POS-tagged lines) decode a line
with :func:`decode_line` and parse a JSONL line with :func:`loads_line`; both raise
:class:`BadJson` carrying the same reason text.

Standard library only: importable from any stage without heavy imports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

POLICIES = ("raise", "torn_tail", "skip", "keep")


class JsonlError(ValueError):
    """A bad JSONL line under a policy that does not allow it; the message names file:line."""


class BadJson(ValueError):
    """One line that is not UTF-8 or not JSON. ``reason`` is the text used in messages:
    'invalid JSON (<msg>, column <c>)' or 'not UTF-8 (<reason> at column <c>)' (byte column);
    ``kind`` is "json" or "utf8"."""

    def __init__(self, reason: str, msg: str, column: int | None = None, kind: str = "json"):
        super().__init__(reason)
        self.reason, self.msg, self.column, self.kind = reason, msg, column, kind

    @property
    def detail(self) -> str:
        """'<msg> at column <c>' (or the msg alone), for callers with their own reason codes."""
        return f"{self.msg} at column {self.column}" if self.column is not None else self.msg


@dataclass(frozen=True)
class BadLine:
    """A skipped (or kept) bad line: where it is and why it is bad."""
    path: str
    lineno: int
    reason: str
    detail: str
    torn: bool = False  # the unterminated last line of the file
    kind: str = "json"  # "json" (invalid JSON) or "utf8" (an undecodable byte)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" + (" (torn last line)" if self.torn else "")


@dataclass
class JsonlRead:
    """What :func:`read_jsonl` read: the records in file order and the skipped bad lines."""
    records: list = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


def decode_line(raw: bytes) -> str:
    """One line of a file as text; raises :class:`BadJson` (kind "utf8") naming the 1-based
    byte column of the first undecodable byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadJson(f"not UTF-8 ({e.reason} at column {e.start + 1})", e.reason, e.start + 1,
                      kind="utf8") from None


def loads_line(line: str | bytes) -> Any:
    """The JSON value of one line; raises :class:`BadJson`."""
    if isinstance(line, bytes):
        line = decode_line(line)
    try:
        return json.loads(line.rstrip("\r\n"))  # columns count within the line, not past its end
    except json.JSONDecodeError as e:
        raise BadJson(f"invalid JSON ({e.msg}, column {e.colno})", e.msg, e.colno) from None


def iter_jsonl(path: str | Path, *, bad: str = "raise", error: type[Exception] = JsonlError,
               bad_lines: list | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSONL file, in order; bad lines as
    the policy says (module docstring). Raises FileNotFoundError for a missing file."""
    if bad not in POLICIES:
        raise ValueError(f"bad={bad!r}: expected one of {', '.join(POLICIES)}")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield n, loads_line(raw)
            except BadJson as e:
                torn = not raw.endswith(b"\n")  # only the last line of a file can lack it
                if bad == "raise" or bad == "torn_tail" and not torn:
                    raise error(f"{path}:{n}: {e.reason}") from None
                line = BadLine(str(path), n, e.reason, e.detail, torn, e.kind)
                if bad == "keep":
                    yield n, line
                elif bad_lines is not None:
                    bad_lines.append(line)


def read_jsonl(path: str | Path, *, bad: str = "raise", error: type[Exception] = JsonlError,
               missing_ok: bool = False) -> JsonlRead:
    """All records of a JSONL file (see :func:`iter_jsonl`) and the bad lines it skipped; a
    missing file is an empty read when ``missing_ok``."""
    out = JsonlRead()
    if missing_ok and not Path(path).is_file():
        return out
    out.records = [rec for _, rec in iter_jsonl(path, bad=bad, error=error, bad_lines=out.bad)]
    return out


def cut_torn_tail(path: str | Path, log=None) -> int:
    """Truncate an append-only file after its last newline, before appending to it again: a
    process killed mid-write leaves a partial last line. Returns the bytes cut."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            if log:
                log.warning("%s: cutting a torn last line of %d bytes", path, len(data) - end)
            f.truncate(end)
    return len(data) - end
