"""Interactive streaming chat against an OpenAI-compatible server: keeps the conversation,
prints tokens as they arrive, /reset starts over, /exit leaves."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .client import Endpoint, RequestError, chat_body, delta_text, finish_reason, stream_events

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D), /help"


class ChatSession:
    def __init__(self, ep: Endpoint, system: str = "", max_tokens: int = 512,
                 temperature: float | None = None, timeout: float = 300.0):
        self.ep = ep
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = timeout
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> dict:
        """Stream one reply; the turn joins the history only when the reply is complete."""
        messages = self.history + [{"role": "user", "content": text}]
        extras = {} if self.ep.backend == "transformers" else {"stream_options": {"include_usage": True}}
        body = chat_body(self.ep, messages, max_tokens=self.max_tokens, temperature=self.temperature,
                         stream=True, **extras)
        parts, usage, reason = [], None, None
        t0 = time.perf_counter()
        for _, chunk in stream_events(self.ep, "chat/completions", body, timeout=self.timeout):
            piece = delta_text(chunk)
            if piece:
                parts.append(piece)
                on_text(piece)
            usage = chunk.get("usage") or usage
            reason = finish_reason(chunk) or reason
        if reason is None:
            raise RequestError("protocol", "the stream ended before the reply was complete")
        reply = "".join(parts)
        self.history = messages + [{"role": "assistant", "content": reply}]
        return {"reply": reply, "usage": usage, "finish_reason": reason,
                "seconds": time.perf_counter() - t0}


def repl(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
         stats: bool = False) -> int:
    """Read-eval-print loop; returns the exit code."""
    interactive = inp.isatty()
    out.write(f"chat with {session.ep.model or 'the server'} at {session.ep.base_url}; {HELP}\n")
    while True:
        if interactive:
            out.write("you> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text}; {HELP}\n")
            continue
        out.write("assistant> ")
        out.flush()
        try:
            r = session.send(text, on_text=lambda s: (out.write(s), out.flush()))
        except RequestError as e:
            out.write(f"\n[error: {e}; the message was not added to the conversation]\n")
            continue
        except KeyboardInterrupt:
            out.write("\n[interrupted; the message was not added to the conversation]\n")
            continue
        out.write("\n")
        if stats:
            u = r["usage"] or {}
            out.write(f"[prompt_tokens={u.get('prompt_tokens')} completion_tokens="
                      f"{u.get('completion_tokens')} finish={r['finish_reason']} "
                      f"seconds={r['seconds']:.2f} turns={len(session.history) // 2}]\n")
