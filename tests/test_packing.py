"""The packing guarantee: a sample packed with others gets the same logits (and loss) as the
sample run alone, because its position ids restart at 0 and transformers builds a
block-diagonal causal mask from them. Naive packing (positions running on) must differ, so
this test can fail. And the labels cover exactly the assistant contents + <|im_end|>."""
import itertools
import json
import logging

import pytest
import torch

from forgelab import config as cfg
from forgelab.data.sft_dataset import SFTDataConfig
from forgelab.data.sft_formats import convert, iter_records
from forgelab.data.sft_store import IGNORE_INDEX, SFTDataset, check_packed_forward
from forgelab.data.tokenize_sft import TokenizeSFTConfig, encode_conversation, tokenize_split
from forgelab.runs import PROJECT_ROOT
from forgelab.train.packing_check import packed_vs_alone, sample_spans

TOL = 1e-5


def asdiv_conversations(path, n):
    """The first n ASDiv problems converted exactly as the default stage 03 config does."""
    src = cfg.load(SFTDataConfig, [PROJECT_ROOT / "configs/data/sft.yaml"]).sources["asdiv"]
    out = []
    for _, rec in itertools.islice(iter_records(path), n):
        messages, _ = convert(rec, src.format, src.columns, src.roles, src.user_template, src.system)
        out.append(messages)
    return out


def multi_turn(convs, system=None):
    """One conversation made of several real problems asked in turn."""
    msgs = [{"role": "system", "content": system}] if system else []
    for c in convs:
        msgs.extend(c)
    return msgs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def packed_store(tiny_model_dir, raw_data, tokenizer, tmp_path_factory):
    convs = asdiv_conversations(raw_data["asdiv"], 12)
    convs.append(multi_turn(convs[:3], system="Answer with a number and a unit."))
    tmp = tmp_path_factory.mktemp("pack")
    src = tmp / "train.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "source": "asdiv", "messages": m}) + "\n"
                           for i, m in enumerate(convs)))
    conf = TokenizeSFTConfig(tokenizer=str(tiny_model_dir), seq_len=512, packing=True)
    tokenize_split(conf, tokenizer, src, tmp / "train", logging.getLogger("test"))
    return SFTDataset(tmp / "train")


def samples_of(row):
    return sample_spans(row["position_ids"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_match_each_sample_alone(tiny_model_dir, packed_store, attn):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    rows = sorted(range(len(packed_store)), key=lambda i: -len(samples_of(packed_store[i])))[:2]
    row = packed_store[rows[0]]
    spans = samples_of(row)
    assert len(spans) >= 3, "the test needs a row with several packed samples"
    ids, pos = row["input_ids"][None], row["position_ids"][None]
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers skips the packed-sequence
        # mask (checked below), so the training loop must pass it.
        packed = model(input_ids=ids, position_ids=pos, labels=row["labels"][None], use_cache=False)
        naive = model(input_ids=ids, use_cache=False).logits[0]
        cached = model(input_ids=ids, position_ids=pos).logits[0]
        worst, sum_loss, n_lab = 0.0, 0.0, 0
        for k, (a, b) in enumerate(spans):
            alone = model(input_ids=row["input_ids"][None, a:b], labels=row["labels"][None, a:b])
            worst = max(worst, (packed.logits[0, a:b] - alone.logits[0]).abs().max().item())
            n = int((row["labels"][a + 1:b] != IGNORE_INDEX).sum())
            sum_loss += alone.loss.item() * n
            n_lab += n
            if k > 0:  # without restarting positions, later samples see the earlier ones
                assert (naive[a:b] - alone.logits[0]).abs().max().item() > 1e-3
                assert (cached[a:b] - alone.logits[0]).abs().max().item() > 1e-3, \
                    "transformers now masks packed samples even with use_cache: update docs/data_sft.md"
        print(f"[{attn}] {len(spans)} samples packed in one row: max |logit diff| = {worst:.2e}")
        assert worst <= TOL
        # The loss of the packed row is the token-weighted mean of the samples' losses.
        assert packed.loss.item() == pytest.approx(sum_loss / n_lab, rel=1e-5)

        # A padded batch from collate_sft (no attention mask), passed as training does, keeps
        # the guarantee once the model's cache is off (the check refuses it before).
        with pytest.raises(ValueError, match="use_cache is True"):
            check_packed_forward(model)
        model.config.use_cache = False
        res = packed_vs_alone(model, [packed_store[i] for i in rows], packed_store.meta["pad_token_id"], "cpu")
        assert res["samples"] >= 4
        assert res["max_abs_logit_diff"] <= TOL
        assert res["naive_packing_min_abs_logit_diff"] > 1e-3


def labelled_spans(labels):
    spans, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("system", [None, "You solve math word problems."])
def test_labels_cover_exactly_assistant_content_and_end_token(smollm2_dir, raw_data, system):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = multi_turn(asdiv_conversations(raw_data["asdiv"], 3), system=system)
    enc = encode_conversation(tok, messages)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert all(l == IGNORE_INDEX or l == t for t, l in zip(ids, labels))
    spans = labelled_spans(labels)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(spans) == len(answers) == 3
    for (a, b), answer in zip(spans, answers):
        assert tok.decode(ids[a:b]) == answer + "<|im_end|>"
        assert tok.decode(ids[:a]).endswith("<|im_start|>assistant\n")  # header masked
        assert tok.decode(ids[b:b + 1]) == "\n"  # the newline after <|im_end|> is masked
    # The labelled answer starts right where a server's generation prompt ends.
    last = len(messages) - 1
    prompt = tok.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert ids[:len(prompt)] == list(prompt) and spans[-1][0] == len(prompt)
    if system is None:  # the template's default system prompt is there, and never learned
        assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids[:spans[0][0]])
