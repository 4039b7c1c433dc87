"""Hugging Face checkpoint -> one GGUF file that llama.cpp (and Ollama, LM Studio) serve and that
transformers loads back (``from_pretrained(dir, gguf_file=name)``).

Why our own writer instead of llama.cpp's ``convert_hf_to_gguf.py``: that script is not on PyPI
and follows llama.cpp's main branch, while the ``gguf`` package (pinned in requirements.txt) is,
and a lab run must export offline with what ``.venv`` has. The writer follows the converter's
conventions, because llama.cpp reads files by them and says nothing when one is broken except
through wrong output:
- tensor names from ``gguf.TensorNameMap``; a tied ``lm_head`` is not written (llama.cpp and
  transformers then use ``token_embd`` as the output);
- for the llama architecture the Q and K rows are permuted per head: HF's rotary embedding
  rotates half-split pairs (i, i + d/2), llama.cpp's "normal" rope rotates adjacent pairs
  (2i, 2i + 1); Qwen2/Qwen3 use llama.cpp's NEOX rope (half-split), so they are not permuted;
- 1-D tensors and norms stay F32; every other weight takes the file's type; in Q4_0/Q4_1 the
  output matrix (the tied token embedding here) is Q8_0: llama-quantize gives it Q6_K, which
  ``gguf`` cannot write in numpy (and falls back to Q8_0 itself when a row is not a multiple of
  256, as SmolLM2's 576 is); a row that a block type cannot split (not a multiple of 32) is F16;
- ``tokenizer.ggml.pre`` names llama.cpp's pre-tokenizer (its splitting regex). llama.cpp's
  converter picks it by hashing the token ids the HF tokenizer gives for one fixed text; we do
  the same with the few hashes of the tokenizers this lab uses (``PRE_TOKENIZERS``). An unknown
  hash is an error naming it, not a guess: a wrong regex tokenizes differently without failing.
  ``export_gguf(..., pre_tokenizer="name")`` states the name for a tokenizer known to split like
  one of llama.cpp's.

The file is written to a temp file beside the target, fsynced and renamed, so ``out_path`` holds
either a complete GGUF or nothing. GGUF has no checksum: ``check_gguf`` proves the structure is
whole (header, every tensor's data inside the file) and reads back the key metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import RunError
from ..runs import display_path

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")

# HF architecture -> (llama.cpp arch name, permute Q/K for llama.cpp's rope)
ARCHS = {"LlamaForCausalLM": ("llama", True), "Qwen2ForCausalLM": ("qwen2", False),
         "Qwen3ForCausalLM": ("qwen3", False)}

# llama.cpp's pre-tokenizer test text (convert_hf_to_gguf.py get_vocab_base_pre): the sha256 of
# str(token ids) of this text names the pre-tokenizer. The hashes are llama.cpp's.
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
           'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
           'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
           '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
           '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5/3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}

# gguf.TokenType values, named here so the code reads without the enum
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _say(log, msg: str) -> None:
    if log is not None:
        log.info(msg)


def _gguf():
    import gguf  # a heavy import, only for export and check
    return gguf


# --- the model ------------------------------------------------------------------------------
def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise RunError(f"{display_path(path)}: no config.json; not a Hugging Face model dir")
    conf = json.loads(path.read_text())
    if conf.get("text_config"):  # a multimodal wrapper: the text model's own keys
        conf = {**conf, **conf["text_config"]}
    arch = (conf.get("architectures") or ["?"])[0]
    if arch not in ARCHS:
        raise RunError(f"{display_path(path)}: architecture {arch} cannot be exported to GGUF "
                       f"here (supported: {', '.join(ARCHS)})")
    return conf


def _tensors(model_dir: Path):
    """(name, float32 numpy array) of every tensor of the checkpoint's safetensors files."""
    import torch
    from safetensors import safe_open
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RunError(f"{display_path(model_dir)}: no *.safetensors weights to export")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).to(torch.float32).numpy()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rotary rows -> llama.cpp's interleaved pairs, per head (rows = heads * d)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf, qtype: str, gname: str, data: np.ndarray, tied: bool):
    """The ggml type this tensor is stored in (see the module docstring for why)."""
    T = gguf.GGMLQuantizationType
    if data.ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return T.F32
    is_output = gname == "output.weight" or (tied and gname == "token_embd.weight")
    if qtype in ("Q4_0", "Q4_1") and is_output:
        return T.Q8_0
    return T[qtype]


def _write_tensors(gguf, writer, conf: dict, qtype: str, model_dir: Path, log) -> tuple[Counter, int]:
    arch, permute = ARCHS[conf["architectures"][0]]
    n_layer = conf["num_hidden_layers"]
    n_head, n_kv = conf["num_attention_heads"], conf.get("num_key_value_heads") or conf["num_attention_heads"]
    tied = bool(conf.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
    counts: Counter = Counter()
    params = 0
    for name, data in _tensors(model_dir):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue  # the output is token_embd: llama.cpp and transformers tie it on load
        params += data.size
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise RunError(f"{display_path(model_dir)}: tensor {name} has no GGUF name for {arch}")
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        ttype = _tensor_type(gguf, qtype, gname, data, tied)
        try:
            stored = gguf.quants.quantize(data, ttype)
        except gguf.QuantError:  # rows not a multiple of the block: F16, as llama.cpp does
            ttype = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, ttype)
        writer.add_tensor(gname, stored, raw_dtype=ttype)
        counts[ttype.name] += 1
    _say(log, f"gguf: {sum(counts.values())} tensors {dict(counts)}")
    return counts, params


def _write_hparams(gguf, writer, conf: dict, qtype: str, model_dir: Path) -> None:
    arch, _ = ARCHS[conf["architectures"][0]]
    n_head = conf["num_attention_heads"]
    head_dim = conf.get("head_dim") or conf["hidden_size"] // n_head
    rope = conf.get("rope_parameters") or {}
    writer.add_type("model")
    writer.add_name(conf.get("_model_name_or_path") or model_dir.name)
    writer.add_context_length(conf["max_position_embeddings"])
    writer.add_embedding_length(conf["hidden_size"])
    writer.add_block_count(conf["num_hidden_layers"])
    writer.add_feed_forward_length(conf["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(conf.get("num_key_value_heads") or n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", conf.get("rope_theta", 10000.0))))
    if rope.get("rope_type", "default") not in ("default", None):
        raise RunError(f"{display_path(model_dir)}: rope_type {rope['rope_type']} is not exported here "
                       "(only the default rope)")
    writer.add_layer_norm_rms_eps(conf["rms_norm_eps"])
    writer.add_vocab_size(conf["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, {"F32": "ALL_F32", "F16": "MOSTLY_F16"}
                                 .get(qtype, f"MOSTLY_{qtype}")))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the tokenizer ---------------------------------------------------------------------------
def pre_tokenizer_name(tok) -> tuple[str | None, str]:
    """(llama.cpp's pre-tokenizer name or None, the hash) for an HF tokenizer."""
    chkhsh = hashlib.sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()
    return PRE_TOKENIZERS.get(chkhsh), chkhsh


def _write_tokenizer(writer, conf: dict, model_dir: Path, pre_tokenizer: str | None) -> str:
    from transformers import AutoTokenizer
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise RunError(f"{display_path(model_dir)}: no tokenizer.json (only byte-level BPE "
                       "tokenizers from tokenizer.json are exported)")
    model = json.loads(path.read_text())["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise RunError(f"{display_path(path)}: a {model.get('type')} tokenizer"
                       f"{' with byte fallback' if model.get('byte_fallback') else ''}; only "
                       "gpt2-style byte-level BPE is exported")
    tok = AutoTokenizer.from_pretrained(model_dir)
    found, chkhsh = pre_tokenizer_name(tok)
    pre = pre_tokenizer or found
    if pre is None:
        raise RunError(f"{display_path(model_dir)}: unknown pre-tokenizer (llama.cpp hash {chkhsh}); "
                       f"known: {sorted(set(PRE_TOKENIZERS.values()))}. If it splits text like one "
                       "of llama.cpp's, pass pre_tokenizer=<name>")

    vocab_size = conf["vocab_size"]
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise RunError(f"{display_path(model_dir)}: tokenizer id {max(by_id)} >= vocab_size {vocab_size}")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(_CONTROL if added[i].special else _USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id")
        tid = conf.get(f"{kind}_token_id") if tid is None else tid
        if isinstance(tid, int):
            getattr(writer, f"add_{kind}_token_id")(tid)
    # what the HF tokenizer adds to a plain encode is what llama.cpp should add
    ids = tok("a")["input_ids"]
    writer.add_add_bos_token(tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id])
    writer.add_add_eos_token(tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id])
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        writer.add_chat_template(template)
    return pre


# --- export and check ------------------------------------------------------------------------
def export_gguf(model_dir, out_path, qtype: str = "Q8_0", log=None, *,
                pre_tokenizer: str | None = None) -> dict:
    """Write the HF model in ``model_dir`` as one GGUF file at ``out_path`` (atomically) and
    return its stats: bytes, tensors per ggml type, source params, bits per weight, seconds."""
    gguf = _gguf()
    if qtype not in QTYPES:
        raise RunError(f"GGUF type {qtype!r} is not one of {', '.join(QTYPES)}")
    t0 = time.monotonic()
    model_dir, out = Path(model_dir), Path(out_path)
    conf = _config(model_dir)
    arch, _ = ARCHS[conf["architectures"][0]]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_hparams(gguf, writer, conf, qtype, model_dir)
        pre = _write_tokenizer(writer, conf, model_dir, pre_tokenizer)
        counts, params = _write_tensors(gguf, writer, conf, qtype, model_dir, log)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a model file is shared like any
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        for f in writer.fout or ():
            f.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    size = out.stat().st_size
    stats = {"path": display_path(out), "arch": arch, "qtype": qtype, "bytes": size,
             "tensors": dict(counts), "params": params, "bits_per_weight": round(size * 8 / params, 3),
             "pre_tokenizer": pre, "seconds": round(time.monotonic() - t0, 2)}
    _say(log, f"gguf: wrote {stats['path']} ({size / 2**20:.1f} MiB, {stats['bits_per_weight']} bits/weight)")
    return stats


def check_gguf(path) -> dict:
    """Open a GGUF and prove it is whole: header readable, the tensor count as stated, every
    tensor's data inside the file. Raises RunError naming the file when not. Returns the key
    metadata (arch, file_type, tensor count, vocab size, chat template present)."""
    gguf = _gguf()
    path = Path(path)
    name = display_path(path)
    if not path.is_file():
        raise RunError(f"{name}: no such GGUF file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        fields = reader.fields

        def value(key, default=None):
            return fields[key].contents() if key in fields else default

        stated = value("GGUF.tensor_count")
        ends = [t.data_offset + t.n_bytes for t in reader.tensors]
        arch = value("general.architecture")
        meta = {"path": name, "arch": arch, "file_type": value("general.file_type"),
                "tensors": len(reader.tensors), "vocab_size": len(fields["tokenizer.ggml.tokens"].data)
                if "tokenizer.ggml.tokens" in fields else None,
                "chat_template": "tokenizer.chat_template" in fields,
                "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors))}
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy/struct errors of a damaged file, said in one line
        raise RunError(f"{name}: not a readable GGUF file (truncated or corrupt?): "
                       f"{type(e).__name__}: {e}") from None
    if stated != len(reader.tensors):
        raise RunError(f"{name}: header states {stated} tensors, {len(reader.tensors)} read")
    if ends and max(ends) > size:
        raise RunError(f"{name}: truncated: tensor data ends at byte {max(ends)}, file has {size}")
    if not arch or not meta["tensors"]:
        raise RunError(f"{name}: GGUF without architecture or tensors")
    return meta
