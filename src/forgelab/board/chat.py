"""The board's chat: the lab's running servers, starting the embedded one, the chat template and
system prompt the server's model uses, and a streamed answer through the servers' own
OpenAI-compatible API (forgelab.serve.client)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

from ..serve import server
from ..serve.client import RequestError, chat_body, delta_text, stream_events

EMBEDDED_CONFIG = "configs/serve/transformers.yaml"
BOARD_SERVER = "board-chat"


def servers() -> list[dict]:
    """Running servers of the lab (runs/serve/*/server.json whose process is alive)."""
    return server.running_servers()


def server_choices() -> list[str]:
    return [f"{s['name']} ({s['backend']}, {s['url']})" for s in servers()]


def state_of(choice: str) -> dict:
    name = choice.split(" (", 1)[0].strip()
    st = server.load_state(name)
    if st is None:
        raise server.ServeError(f"no server named {name!r}")
    return st


def start_embedded(api_key: str = "") -> dict:
    """Start `transformers serve` with the embedded default model on a free port, recorded like
    any server of the lab (runs/serve/board-chat/), and return its state."""
    from .. import config as cfg
    from ..runs import project_path
    from ..serve.config import ServeConfig
    overrides = [f"name={BOARD_SERVER}", f"port={server.free_port()}"] + ([f"api_key={api_key}"] if api_key else [])
    conf = cfg.load(ServeConfig, [project_path(EMBEDDED_CONFIG)], overrides)
    existing = server.load_state(BOARD_SERVER)
    if existing and server.is_alive(existing):
        return existing
    return server.start_recorded(conf, progress=False)


@functools.lru_cache(maxsize=8)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def template_info(state: dict) -> dict:
    """The chat template and default system prompt of the model a server serves (a model dir);
    for a GGUF the template is inside the file and the server applies it itself."""
    model = str(state.get("model") or "")
    if not Path(model).is_dir():
        return {"template": f"(the template inside {model}, applied by the server)", "default_system": "",
                "model": model}
    tok = _tokenizer(model)
    default_system = ""
    try:
        from ..export.modelfile import measure
        default_system = measure(tok).default_system
    except Exception:  # noqa: BLE001 - a template the measurement cannot split: shown without it
        pass
    return {"template": tok.chat_template or "(no chat template)", "default_system": default_system, "model": model}


def rendered_prompt(state: dict, messages: list[dict]) -> str:
    """The exact text the template makes of the conversation (what the model sees)."""
    model = str(state.get("model") or "")
    if not Path(model).is_dir() or not messages:
        return ""
    return _tokenizer(model).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stream_answer(state: dict, messages: list[dict], api_key: str = "", max_tokens: int = 128,
                  temperature: float = 0.0) -> Iterator[str]:
    """The answer so far, after each streamed chunk."""
    ep = server.endpoint_from_state(state, api_key)
    body = chat_body(ep, messages, max_tokens=int(max_tokens), temperature=float(temperature), stream=True)
    text = ""
    try:
        for _, chunk in stream_events(ep, "chat/completions", body, timeout=120):
            piece = delta_text(chunk)
            if piece:
                text += piece
                yield text
    except RequestError as e:
        yield text + f"\n\n[error from {ep.base_url}: {e}]"
