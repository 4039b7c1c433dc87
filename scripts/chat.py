#!/usr/bin/env python3
"""Interactive streaming chat with a served model (OpenAI-compatible API).

  scripts/chat.py                          # the only running server from scripts/10_serve.sh
  scripts/chat.py --server vllm --system "You are terse."
  scripts/chat.py --url http://127.0.0.1:8000/v1 --model NAME

Keeps the conversation; /reset forgets it, /exit (or Ctrl-D) leaves. The API key, when the
server needs one, comes from --api-key or $FORGELAB_API_KEY.
"""
import argparse
import sys

from forgelab import cli
from forgelab.serve.chat import ChatSession, repl
from forgelab.serve.server import ServeError, resolve_endpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="", help="server name from scripts/10_serve.sh status")
    p.add_argument("--url", default="", help="base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="", help="`model` sent with requests (default: the server's)")
    p.add_argument("--api-key", default="", help="API key (default: $FORGELAB_API_KEY)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--stats", action="store_true", help="print token counts and time after each reply")
    a = p.parse_args()
    try:
        ep = resolve_endpoint(a.url, a.server, a.model, a.api_key)
    except (ServeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return repl(ChatSession(ep, a.system, a.max_tokens, a.temperature), stats=a.stats)


if __name__ == "__main__":
    cli.run_main(main)
