#!/usr/bin/env python3
"""Render a generated Modelfile's TEMPLATE with Go's text/template (the engine Ollama uses; needs
`go`: apt-get install golang-go) and compare it with the model's own chat template on the
Modelfile check chats plus one whose content holds template syntax.

  python scripts/check_modelfile.py model/smollm2-135m-instruct
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from forgelab.export.modelfile import CHECK_CHATS, go_template, measure

HERE = Path(__file__).resolve().parent / "modelfile_check"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a model dir with a tokenizer and chat template")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    pieces = measure(tok)
    chats = CHECK_CHATS + [[{"role": "user", "content": "a {{ .Content }} literal"}]]
    # Ollama sends SYSTEM as the first message when a request has none
    go_in = [c if c[0]["role"] == "system" or not pieces.default_system
             else [{"role": "system", "content": pieces.default_system}] + c for c in chats]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "t.tpl").write_text(go_template(pieces), encoding="utf-8")
        Path(d, "c.json").write_text(json.dumps([[{"Role": m["role"], "Content": m["content"]} for m in c]
                                                 for c in go_in]), encoding="utf-8")
        r = subprocess.run(["go", "run", str(HERE / "main.go"), f"{d}/t.tpl", f"{d}/c.json"], capture_output=True,
                           text=True, env={**os.environ, "GO111MODULE": "off", "GOCACHE": f"{d}/cache"})
    if r.returncode:
        print(r.stderr, file=sys.stderr)
        return 1
    bad = 0
    for c, got in zip(chats, json.loads(r.stdout)):
        want = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        bad += got != want
        print(("same" if got == want else "DIFFERENT"), json.dumps(c, ensure_ascii=False)[:70])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
