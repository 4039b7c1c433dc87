"""A small OpenAI-compatible HTTP client on the standard library (no extra dependency): JSON
calls, chat completions and SSE streaming, with every failure turned into a RequestError whose
`kind` says what went wrong (connection, timeout, http_<status>, protocol, stream_error)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8000/v1"


@dataclass
class Endpoint:
    base_url: str = DEFAULT_URL
    model: str = ""      # the `model` field requests carry; empty: left out
    api_key: str = ""
    backend: str = ""    # "vllm", "transformers" or "" when unknown

    def __post_init__(self):
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad server URL {self.base_url!r}; expected e.g. {DEFAULT_URL}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")

    def path(self, p: str) -> str:
        """'/health' is from the server root; 'chat/completions' is under the base URL's path."""
        return p if p.startswith("/") else f"{self._prefix}/{p}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


class RequestError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.status = status
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in ("connection", "timeout", "protocol") or \
            (self.status is not None and (self.status >= 500 or self.status in (408, 429)))


def _classify(e: BaseException) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (socket.timeout, TimeoutError)):
        return RequestError("timeout", str(e) or "timed out")
    if isinstance(e, (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead,
                      OSError)):
        return RequestError("connection", f"{type(e).__name__}: {e}")
    if isinstance(e, (http.client.HTTPException, ValueError)):
        return RequestError("protocol", f"{type(e).__name__}: {e}")
    raise e


def _error_text(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
        err = obj.get("error", obj.get("detail", obj)) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            err = err.get("message", err)
        text = err if isinstance(err, str) else json.dumps(err)
    except json.JSONDecodeError:
        pass
    return text[:500]


def request(ep: Endpoint, method: str, path: str, body: Any = None, timeout: float = 60.0,
            raw_body: bytes | None = None) -> Any:
    """One JSON request; returns the decoded JSON answer or raises RequestError."""
    conn = ep.connection(timeout)
    try:
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, ep.path(path), body=data, headers=ep.headers())
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 400:
            raise RequestError(f"http_{resp.status}", _error_text(raw), resp.status)
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError as e:
            raise RequestError("protocol", f"answer is not JSON: {e}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes a RequestError
        raise _classify(e) from None
    finally:
        conn.close()


def get_json(ep: Endpoint, path: str, timeout: float = 10.0) -> Any:
    return request(ep, "GET", path, timeout=timeout)


def chat_body(ep: Endpoint, messages: list[dict], **params) -> dict:
    body: dict = {"messages": messages}
    if ep.model:
        body["model"] = ep.model
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def chat_once(ep: Endpoint, messages: list[dict], timeout: float = 120.0, **params) -> dict:
    """A non-streaming chat completion; returns the whole answer."""
    return request(ep, "POST", "chat/completions", chat_body(ep, messages, **params), timeout=timeout)


def stream_events(ep: Endpoint, path: str, body: dict, timeout: float = 120.0,
                  deadline: float | None = None) -> Iterator[tuple[float, dict]]:
    """POST with stream=true and yield (perf_counter time, decoded SSE data object) per event.

    `timeout` bounds each wait for bytes; `deadline` (a perf_counter time) bounds the whole
    request. A server error event inside the stream raises RequestError("stream_error").
    """
    conn = ep.connection(timeout)
    try:
        conn.request("POST", ep.path(path), body=json.dumps(body).encode(), headers=ep.headers())
        resp = conn.getresponse()
        if resp.status >= 400:
            raise RequestError(f"http_{resp.status}", _error_text(resp.read()), resp.status)
        while True:
            line = resp.readline()
            now = time.perf_counter()
            if not line:
                return
            if deadline is not None and now > deadline:
                raise RequestError("timeout", "request ran past its total time limit")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                obj = json.loads(data)
            except json.JSONDecodeError as e:
                raise RequestError("protocol", f"bad SSE data: {e}") from None
            if isinstance(obj, dict) and obj.get("error") and not obj.get("choices"):
                raise RequestError("stream_error", _error_text(json.dumps(obj).encode()))
            yield now, obj
    except Exception as e:  # noqa: BLE001
        raise _classify(e) from None
    finally:
        conn.close()


def delta_text(chunk: dict) -> str:
    """Generated text in one chat chunk (answer and reasoning alike)."""
    out = []
    for c in chunk.get("choices") or []:
        d = c.get("delta") or {}
        for k in ("reasoning_content", "reasoning", "content"):
            if d.get(k):
                out.append(d[k])
    return "".join(out)


def finish_reason(chunk: dict) -> str | None:
    for c in chunk.get("choices") or []:
        if c.get("finish_reason"):
            return c["finish_reason"]
    return None


def api_key_from_env() -> str:
    return os.environ.get("FORGELAB_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
