"""Preference record formats -> TRL's conversational preference schemas.

Two kinds of output, one schema each:

* ``pairs``: ``{"prompt": [... ending with a user turn], "chosen": [assistant msg],
  "rejected": [assistant msg]}`` (DPO and relatives);
* ``kto``: ``{"prompt": [...], "completion": [assistant msg], "label": bool}``.

Converters take one raw record and return ``(kind, prompt, answers)`` where ``answers`` is
``{"chosen", "rejected"}`` or ``{"completion", "label"}``, or raise :class:`BadRecord`
(reason codes of stage 03 plus ``identical_answers``). Records are read with stage 03's
readers (``sft_formats.iter_records``), so locations are file:line the same way.
"""
from __future__ import annotations

from typing import Any

from .sft_formats import (MESSAGES_ROLES, REASONS, SHAREGPT_ROLES, BadRecord, _get, _openai_content,
                          _text, check_conversation)

# Stage 03's reasons, plus two that only preference data has.
PREF_REASONS = REASONS + ("identical_answers", "chat_template_prefix")

# format -> (kind, the fields `columns` may rename). LLaMA-Factory's `ranking: true` datasets
# are alpaca_ranking / sharegpt_ranking; its KTO datasets carry `kto_tag` (read as `label`).
FORMATS = {
    "pairs": ("pairs", ("prompt", "messages", "chosen", "rejected", "system")),
    "alpaca_ranking": ("pairs", ("instruction", "input", "chosen", "rejected", "system", "history")),
    "sharegpt_ranking": ("pairs", ("conversations", "chosen", "rejected", "system", "from", "value")),
    "kto": ("kto", ("prompt", "messages", "conversations", "completion", "label", "system")),
}
KINDS = ("pairs", "kto")


class BadPref(BadRecord):
    """A BadRecord whose reason may also be one of the preference-only reasons."""

    def __init__(self, reason: str, detail: str):
        assert reason in PREF_REASONS, reason
        ValueError.__init__(self, f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- turns

def _message(m: Any, i: int, where: str) -> dict:
    """One turn, OpenAI {role, content} or sharegpt {from, value}, as a schema message."""
    if not isinstance(m, dict):
        raise BadRecord("bad_type", f"{where}[{i}]: expected an object")
    if "from" in m:
        tag = m["from"]
        if tag not in SHAREGPT_ROLES:
            raise BadRecord("unknown_role", f"{where}[{i}]: role {tag!r} "
                                            f"(known: {', '.join(SHAREGPT_ROLES)})")
        if "value" not in m:
            raise BadRecord("missing_field", f"{where}[{i}]: no field 'value'")
        return {"role": SHAREGPT_ROLES[tag], "content": _text(m["value"], f"{where}[{i}]")}
    if "role" not in m:
        raise BadRecord("missing_field", f"{where}[{i}]: no field 'role' (or 'from')")
    if m["role"] not in MESSAGES_ROLES:
        raise BadRecord("unknown_role", f"{where}[{i}]: role {m['role']!r}")
    return {"role": m["role"], "content": _openai_content(m, i, "content")}


def _messages(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list):
        raise BadRecord("bad_type", f"{where}: expected a list of messages")
    if not turns:
        raise BadRecord("empty_conversation", f"{where} is empty")
    return [_message(m, i, where) for i, m in enumerate(turns)]


def _with_system(prompt: list[dict], system: Any) -> list[dict]:
    if system is not None and _text(system, "system") and prompt[0]["role"] != "system":
        return [{"role": "system", "content": _text(system, "system")}] + prompt
    return prompt


def check_prompt(prompt: list[dict]) -> None:
    """The prompt follows stage 03's role order and ends with a user turn."""
    if prompt and prompt[-1]["role"] != "user":
        raise BadRecord("role_order", f"prompt ends with {prompt[-1]['role']!r}, expected 'user'")
    # An assistant turn appended makes it a conversation stage 03's checker understands.
    check_conversation(prompt + [{"role": "assistant", "content": "."}], allow_tool_runs=True)


def answer(value: Any, field: str) -> list[dict]:
    """A string, one assistant message, or a list of exactly one -> [assistant message]."""
    if isinstance(value, str):
        content = value.strip()
    else:
        msgs = _messages(value if isinstance(value, list) else [value], field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise BadRecord("bad_type", f"{field}: expected one assistant message, got roles "
                                        f"{[m['role'] for m in msgs]}")
        content = msgs[0]["content"]
    if not content:
        raise BadRecord("empty_content", f"{field} is empty")
    return [{"role": "assistant", "content": content}]


def _prompt_field(rec: dict, columns: dict) -> list[dict]:
    """`prompt` (a string or messages) or, failing that, `messages` (the turns before the answer)."""
    value = _get(rec, "prompt", columns, required=False)
    if value is None:
        value = _get(rec, "messages", columns, required=False)
        if value is None:
            raise BadRecord("missing_field", f"no field '{columns.get('prompt', 'prompt')}' "
                                             f"or '{columns.get('messages', 'messages')}'")
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_content", "prompt is empty")
        return [{"role": "user", "content": value.strip()}]
    return _messages(value, "prompt")


def _pair(prompt: list[dict], rec: dict, columns: dict) -> tuple[str, list[dict], dict]:
    chosen = answer(_get(rec, "chosen", columns), "chosen")
    rejected = answer(_get(rec, "rejected", columns), "rejected")
    prompt = _with_system(prompt, _get(rec, "system", columns, required=False))
    check_prompt(prompt)
    if chosen == rejected:
        raise BadPref("identical_answers", "chosen and rejected are the same text")
    return "pairs", prompt, {"chosen": chosen, "rejected": rejected}


# ----------------------------------------------------------------------------- formats

def from_pairs(rec: dict, columns: dict, user_template: str) -> tuple[str, list[dict], dict]:
    return _pair(_prompt_field(rec, columns), rec, columns)


def from_alpaca_ranking(rec: dict, columns: dict, user_template: str) -> tuple[str, list[dict], dict]:
    instruction = _text(_get(rec, "instruction", columns), "instruction")
    if not instruction:
        raise BadRecord("empty_content", "instruction is empty")
    inp = _get(rec, "input", columns, required=False)
    inp = _text(inp, "input") if inp is not None else ""
    prompt = []
    history = _get(rec, "history", columns, required=False) or []
    if not isinstance(history, list):
        raise BadRecord("bad_type", "history: expected a list of [user, assistant] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord("bad_type", f"history[{k}]: expected a [user, assistant] pair")
        prompt += [{"role": "user", "content": _text(pair[0], f"history[{k}][0]")},
                   {"role": "assistant", "content": _text(pair[1], f"history[{k}][1]")}]
    user = user_template.format(instruction=instruction, input=inp).strip() if inp else instruction
    return _pair(prompt + [{"role": "user", "content": user}], rec, columns)


def from_sharegpt_ranking(rec: dict, columns: dict, user_template: str) -> tuple[str, list[dict], dict]:
    conv = _get(rec, "conversations", columns)
    role_key, value_key = columns.get("from", "from"), columns.get("value", "value")
    if isinstance(conv, list) and (role_key, value_key) != ("from", "value"):
        conv = [{"from": t.get(role_key), "value": t.get(value_key)} if isinstance(t, dict) else t
                for t in conv]
    return _pair(_messages(conv, "conversations"), rec, columns)


def _label(value: Any) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise BadRecord("bad_type", f"label: expected true or false, got {value!r}")


def from_kto(rec: dict, columns: dict, user_template: str) -> tuple[str, list[dict], dict]:
    # LLaMA-Factory names the label kto_tag; an explicit `columns.label` mapping wins.
    label_value = _get(rec, "label", columns, required=False)
    if label_value is None and "label" not in columns:
        label_value = rec.get("kto_tag")
    if label_value is None:
        raise BadRecord("missing_field", f"no field '{columns.get('label', 'label')}' (or 'kto_tag')")
    label = _label(label_value)
    completion = _get(rec, "completion", columns, required=False)
    if _get(rec, "prompt", columns, required=False) is None and \
            _get(rec, "messages", columns, required=False) is None:
        turns = _messages(_get(rec, "conversations", columns), "conversations")
    else:
        turns = _prompt_field(rec, columns)
    if completion is None:  # the last assistant turn is the completion
        if turns[-1]["role"] != "assistant":
            raise BadRecord("missing_field", "no field 'completion' and the last turn is not the assistant's")
        turns, completion = turns[:-1], turns[-1]
        if not turns:
            raise BadRecord("empty_conversation", "no prompt before the completion")
    completion = answer(completion, "completion")
    prompt = _with_system(turns, _get(rec, "system", columns, required=False))
    check_prompt(prompt)
    return "kto", prompt, {"completion": completion, "label": label}


CONVERTERS = {"pairs": from_pairs, "alpaca_ranking": from_alpaca_ranking,
              "sharegpt_ranking": from_sharegpt_ranking, "kto": from_kto}


def convert(rec: Any, fmt: str, columns: dict, user_template: str) -> tuple[str, list[dict], dict]:
    """One raw record -> (kind, prompt, answers); raises BadRecord."""
    if isinstance(rec, BadRecord):
        raise rec
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    return CONVERTERS[fmt](rec, columns, user_template)
