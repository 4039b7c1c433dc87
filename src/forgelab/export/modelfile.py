"""An Ollama Modelfile whose TEMPLATE is derived from the model's own chat template, so a GGUF
served by Ollama builds the prompt the model was trained on.

The Hugging Face template is Jinja; Ollama's is Go's text/template. Instead of translating
Jinja, the template is *measured*: it is rendered with sentinel contents, which splits it into
a prefix and a suffix per role, a generation prefix and the default system prompt (SmolLM2's
template inserts one when the chat has none). `assemble` rebuilds any chat from those pieces
and `check_pieces` proves, on several chats, that the pieces reproduce the Jinja rendering
exactly; a template the pieces cannot reproduce (one that depends on message position beyond
"first", or rewrites content) is refused rather than exported wrong.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import RunError

_S = "\x00SYS\x00"
_U = "\x00USR\x00"
_A = "\x00AST\x00"


@dataclass(frozen=True)
class Pieces:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str   # also the generation prompt
    assistant_suffix: str
    default_system: str     # inserted by the template when the chat has no system turn ("" if none)


def _render(tok, messages: list[dict], generation: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, left: str, right: str) -> str:
    i = text.index(left) + len(left)
    return text[i:text.index(right, i)]


def measure(tok) -> Pieces:
    """Split the tokenizer's chat template into per-role prefixes and suffixes."""
    if not getattr(tok, "chat_template", None):
        raise RunError("the tokenizer has no chat template: no Modelfile TEMPLATE can be derived")
    s, u, a = ({"role": r, "content": c} for r, c in (("system", _S), ("user", _U), ("assistant", _A)))
    try:
        full = _render(tok, [s, u, a, u], False)
        su = _render(tok, [s, u], False)
        su_gen = _render(tok, [s, u], True)
        sua = _render(tok, [s, u, a], False)
        bare = _render(tok, [u], True)
        system_prefix = full[:full.index(_S)]
        user_suffix = su[su.index(_U) + len(_U):]
        assistant_suffix = sua[sua.index(_A) + len(_A):]
        if not su_gen.startswith(su):
            raise ValueError("generation prompt")
        assistant_prefix = su_gen[len(su):]
        # between an assistant turn and a user turn: the assistant's suffix, then the user's prefix
        sep_au = _between(full, _A, _U)
        sep_su = _between(full, _S, _U)
        if not sep_au.startswith(assistant_suffix) or _between(full, _U, _A) != user_suffix + assistant_prefix:
            raise ValueError("turns")
        user_prefix = sep_au[len(assistant_suffix):]
        if not sep_su.endswith(user_prefix):
            raise ValueError("system turn")
        system_suffix = sep_su[:len(sep_su) - len(user_prefix)]
        head = bare[:bare.index(_U) - len(user_prefix)]
        default_system = ""
        if head:  # a preamble the template adds to a chat without a system turn
            if not (head.startswith(system_prefix) and head.endswith(system_suffix)):
                raise ValueError("preamble")
            default_system = head[len(system_prefix):len(head) - len(system_suffix)]
    except ValueError as e:
        raise RunError(f"the chat template is not a fixed prefix and suffix per role ({e}): no Modelfile "
                       "TEMPLATE can be derived from it") from None
    pieces = Pieces(system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                    default_system)
    check_pieces(tok, pieces)
    return pieces


def assemble(p: Pieces, messages: list[dict], generation: bool = True) -> str:
    """The prompt the pieces build for a chat (what the Modelfile's TEMPLATE renders)."""
    out = []
    if p.default_system and (not messages or messages[0]["role"] != "system"):
        out.append(p.system_prefix + p.default_system + p.system_suffix)
    for m in messages:
        role = m["role"]
        out.append(getattr(p, f"{role}_prefix") + m["content"] + getattr(p, f"{role}_suffix"))
    if generation and (not messages or messages[-1]["role"] != "assistant"):
        out.append(p.assistant_prefix)
    return "".join(out)


CHECK_CHATS = [
    [{"role": "user", "content": "How many clips did Natalia sell?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "请用一句话介绍北京。"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write a haiku\nabout rain."}],
]


def check_pieces(tok, p: Pieces) -> None:
    for chat in CHECK_CHATS:
        want = _render(tok, chat, True)
        got = assemble(p, chat)
        if got != want:
            raise RunError(f"the derived template does not reproduce the chat template on {chat!r}: "
                           f"expected {want!r}, got {got!r}")


def _go(s: str) -> str:
    """A literal for Go's text/template: only '{{' needs escaping."""
    return s.replace("{{", '{{ "{{" }}')


def go_template(p: Pieces) -> str:
    """Ollama TEMPLATE over .Messages: each turn its role's prefix and suffix, the generation prompt
    after a final non-assistant turn. The default system prompt goes to SYSTEM, which Ollama
    passes as a first system message when the request has none. No whitespace trimming
    ({{- ... -}}): the pieces' own newlines are part of the prompt."""
    out = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for k, role in enumerate(("system", "user", "assistant")):
        out.append(f'{{{{ {"if" if k == 0 else "else if"} eq .Role "{role}" }}}}{_go(getattr(p, role + "_prefix"))}'
                   f'{{{{ .Content }}}}{_go(getattr(p, role + "_suffix"))}')
    out.append("{{ end }}")
    out.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{_go(p.assistant_prefix)}{{{{ end }}}}')
    out.append("{{ end }}")
    return "".join(out)


def _quote(s: str) -> str:
    return '"""' + s.replace('"""', '\\"""') + '"""'


def modelfile(gguf_name: str, tok, params: dict | None = None) -> str:
    """The Modelfile text for a GGUF beside it: FROM, TEMPLATE, SYSTEM, stop tokens, parameters."""
    p = measure(tok)
    stops = []
    for t in (tok.eos_token, p.assistant_suffix.strip()):
        if t and t not in stops:
            stops.append(t)
    out = [f"# Generated by forgelab from the model's chat template (checked on {len(CHECK_CHATS)} chats).",
           f"FROM ./{gguf_name}", f"TEMPLATE {_quote(go_template(p))}"]
    if p.default_system:
        out.append(f"SYSTEM {_quote(p.default_system)}")
    out += [f'PARAMETER stop "{s}"' for s in stops]
    for k, v in (params or {}).items():
        out.append(f"PARAMETER {k} {v}")
    return "\n".join(out) + "\n"
