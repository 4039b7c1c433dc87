"""`transformers serve` behind a guard: the same CLI and FastAPI app, plus one ASGI layer that

- answers malformed chat/completion bodies with 400 (upstream raises KeyError/TypeError inside
  the handler and answers 500, which clients retry as if the server were broken), and
- enforces an API key (upstream has none), read from FORGELAB_SERVE_API_KEY so the key never
  shows on a command line, and
- on request (transformers.prompt_log), records the token ids of every prompt the model gets.

Run as ``python -m forgelab.serve.transformers_guard [transformers serve arguments]``.
"""
from __future__ import annotations

import hmac
import json
import os
import sys

KEY_ENV = "FORGELAB_SERVE_API_KEY"
PROMPT_LOG_ENV = "FORGELAB_SERVE_PROMPT_LOG"  # transformers.prompt_log: where the prompts' ids go
ROLES = {"system", "developer", "user", "assistant", "tool"}
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed")
_NUM_FIELDS = ("temperature", "top_p", "frequency_penalty")


def check_body(path: str, raw: bytes) -> str | None:
    """The problem with a request body, or None when it is well-formed enough to hand on."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"body is not valid JSON: {e}"
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}] must be an object"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role must be one of {sorted(ROLES)}"
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
                    return f"messages[{i}].content parts must be objects with a 'type'"
            elif not isinstance(content, str) and not (content is None and m.get("tool_calls")):
                return f"messages[{i}].content must be a string or a list of parts"
    elif path.endswith("/completions"):
        if not isinstance(body.get("prompt"), str):
            return "'prompt' must be a string"
    for k in _INT_FIELDS:
        v = body.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or
                              (k != "seed" and v < 1)):
            return f"'{k}' must be a positive integer" if k != "seed" else "'seed' must be an integer"
    for k in _NUM_FIELDS:
        v = body.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"'{k}' must be a number"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be true or false"
    return None


class Guard:
    """ASGI middleware: API key check on /v1/*, body check on POST completions."""

    def __init__(self, app, api_key: str = ""):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.api_key:
            headers = dict(scope.get("headers") or [])
            got = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(got, f"Bearer {self.api_key}"):
                return await _error(send, 401, "missing or wrong API key", "authentication_error")
        if scope["method"] != "POST" or not scope["path"].endswith("completions"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
        problem = check_body(scope["path"], raw)
        if problem:
            return await _error(send, 400, problem, "invalid_request_error")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


async def _error(send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def record_prompt_ids(path: str) -> None:
    """Append the ids of every prompt that reaches ``generate`` to ``path`` (one JSON line per
    request), and the ids it generated: what the server's chat template and tokenizer made of
    the messages, read from the model's own input rather than re-rendered beside it, and the
    exact tokens behind the answer text (the export gate compares them id for id)."""
    import threading

    from transformers.generation.utils import GenerationMixin
    original, lock = GenerationMixin.generate, threading.Lock()

    def generate(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        out = original(self, *args, **kwargs)
        if ids is not None and hasattr(ids, "tolist"):
            seqs = getattr(out, "sequences", out)
            seqs = seqs.tolist() if hasattr(seqs, "tolist") else [None] * len(ids)
            with lock, open(path, "a", encoding="utf-8") as f:
                for row, full in zip(ids.tolist(), seqs):
                    rec = {"prompt_ids": row}
                    if full is not None and full[:len(row)] == row:
                        rec["output_ids"] = full[len(row):]
                    f.write(json.dumps(rec) + "\n")
        return out

    GenerationMixin.generate = generate


def main(argv: list[str]) -> None:
    import transformers.cli.serving.server as server_mod
    import uvicorn
    from transformers.cli.transformers import app

    api_key = os.environ.pop(KEY_ENV, "")
    if os.environ.get(PROMPT_LOG_ENV):
        record_prompt_ids(os.environ[PROMPT_LOG_ENV])
    original_build, original_run = server_mod.build_server, uvicorn.Server.run
    installed = []

    def build_server(*args, **kwargs):
        fastapi_app = original_build(*args, **kwargs)
        fastapi_app.add_middleware(Guard, api_key=api_key)
        installed.append(True)
        return fastapi_app

    def run(self, *args, **kwargs):  # fail closed: never serve without the guard
        if not installed:
            sys.exit("forgelab guard: this transformers version does not build its app through "
                     "build_server; serve with transformers.guard: false (no API key support)")
        return original_run(self, *args, **kwargs)

    # `Serve` imports build_server from its module when it runs, so the wrapper is picked up.
    server_mod.build_server = build_server
    uvicorn.Server.run = run
    app(["serve", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
