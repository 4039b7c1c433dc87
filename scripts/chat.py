#!/usr/bin/env python3
"""Interactive streaming chat with a served model (OpenAI-compatible API).

  scripts/chat.py                          # the only running server from scripts/10_serve.sh
  scripts/chat.py --server vllm --system "You are terse."
  scripts/chat.py --url http://127.0.0.1:8000/v1 --model NAME

Keeps the conversation; /reset forgets it, /exit (or Ctrl-D) leaves. The API key, when the
server needs one, comes from --api-key or $FORGELAB_API_KEY.
"""
import argparse

from forgelab import cli
from forgelab.serve.chat import ChatSession, repl
from forgelab.serve.server import add_endpoint_args, endpoint_from_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_endpoint_args(p)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--stats", action="store_true", help="print token counts and time after each reply")
    a = p.parse_args()
    ep = endpoint_from_args(a)
    if ep is None:
        return 1
    return repl(ChatSession(ep, a.system, a.max_tokens, a.temperature), stats=a.stats)


if __name__ == "__main__":
    cli.run_main(main)
