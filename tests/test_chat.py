"""Chat data (qwenjax/data/chat.py, chat_batches.py): the Qwen2.5 template rendered as transformers renders it
(text and token ids), the assistant-only loss mask token by token, packing with segment ids, and one-line
errors for malformed conversations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwenjax.data import chat
from qwenjax.errors import UserError

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."}],
    [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
     {"role": "assistant", "content": "\n\n4, of course.  "}],
    [{"role": "user", "content": "héllo 中文"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "again"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system turn"},
     {"role": "assistant", "content": " leading space"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A small byte-level BPE (the pre-tokenizer family of Qwen's) with the ChatML tokens, as transformers'
    PreTrainedTokenizerFast with Qwen2.5's chat template; saved so qwenjax loads the same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [chat.render(c)[0] for c in CONVERSATIONS] * 20 + ["What is the sum of two numbers? " * 5]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = chat.QWEN2_5_CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("hf-chat-tok")
    fast.save_pretrained(folder)
    return fast, folder


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_template_parity_with_transformers(hf_tokenizer, i, gen):
    from qwenjax.data import load_tokenizer

    fast, folder = hf_tokenizer
    messages = CONVERSATIONS[i]
    want_text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    text, _ = chat.render(messages, add_generation_prompt=gen)
    assert text == want_text
    want_ids = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if hasattr(want_ids, "keys"):  # transformers 5 returns a BatchEncoding
        want_ids = want_ids["input_ids"]
    ids, mask = chat.encode_chat(load_tokenizer(folder), messages, add_generation_prompt=gen)
    assert ids.tolist() == list(want_ids)
    assert len(mask) == len(ids)


def test_default_system_prompt():
    text, _ = chat.render([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def _expected_mask(tokenizer, messages):
    """The rule, token by token, from the decoded pieces alone: after <|im_start|> the header runs to the first
    token holding a newline; after an "assistant\\n" header every token is trained up to and including the
    next <|im_end|>."""
    ids, _ = chat.encode_chat(tokenizer, messages)
    pieces = [tokenizer.decode([t]) for t in ids]
    out, state, header = [], "ctx", ""
    for p in pieces:
        if state == "assistant":
            out.append(1)
            if p == "<|im_end|>":
                state = "ctx"
            continue
        out.append(0)
        if p == "<|im_start|>":
            state, header = "header", ""
        elif state == "header":
            header += p
            if "\n" in header:
                state = "assistant" if header.startswith("assistant\n") else "ctx"
    return np.array(out, dtype=np.uint8), pieces


def test_mask_token_by_token_sentencepiece(tmp_path):
    """qwenjax's own sentencepiece tokenizer: ChatML tokens are single ids and the mask covers exactly the
    assistant content and its <|im_end|>, on a hand-checked conversation."""
    from qwenjax.data import load_tokenizer, train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(chat.render(c)[0] for c in CONVERSATIONS) * 50)
    tok = load_tokenizer(train_tokenizer(corpus, tmp_path / "tok", 340))
    assert set(chat.special_ids(tok).values()) == {tok.encode("<|im_start|>")[0], tok.encode("<|im_end|>")[0]}
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "7 ok"}]
    ids, mask = chat.encode_chat(tok, messages)
    pieces = [tok.decode([t]) for t in ids]
    trained = "".join(p for p, m in zip(pieces, mask, strict=True) if m)
    assert trained == "2<|im_end|>7 ok<|im_end|>"
    # each trained run starts right after "assistant\n" and ends with <|im_end|>
    text = "".join(pieces)
    assert text == chat.render(messages)[0]
    for conv in CONVERSATIONS:
        ids, mask = chat.encode_chat(tok, conv)
        want, _ = _expected_mask(tok, conv)
        np.testing.assert_array_equal(mask, want)


def test_mask_token_by_token_hf(hf_tokenizer):
    from qwenjax.data import load_tokenizer

    tok = load_tokenizer(hf_tokenizer[1])
    for conv in CONVERSATIONS:
        ids, mask = chat.encode_chat(tok, conv)
        want, pieces = _expected_mask(tok, conv)
        np.testing.assert_array_equal(mask, want, err_msg=str(list(zip(pieces, mask, strict=True))))
        spans = chat.render(conv)[1]
        assert sum(mask) > 0 or all(lo == hi - len("<|im_end|>") for lo, hi in spans) or not spans


BAD = [
    ({"messages": []}, "\"messages\" is empty"),
    ({"messages": [{"content": "x"}]}, "message 0 has no \"role\""),
    ({"messages": [{"role": "user"}]}, "message 0 has no \"content\""),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content of type int"),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "content of type list"),
    ({"text": "not chat"}, "expected an object with \"messages\""),
    ({"messages": "hi"}, "must be a list"),
]


@pytest.mark.parametrize("record,needle", BAD)
def test_malformed_conversation_is_one_line(tmp_path, record, needle):
    f = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[0]})
    f.write_text(good + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as e:
        list(chat.read_conversations([f]))
    msg = str(e.value)
    assert "\n" not in msg and f"{f}:3:" in msg and needle in msg, msg


def test_bad_json_line(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text('{"messages": [}\n')
    with pytest.raises(UserError, match=r"chat.jsonl:1: not valid JSON"):
        list(chat.read_conversations([f]))


def test_is_chat_file(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.txt"
    a.write_text("\n" + json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    b.write_text(json.dumps({"text": "x"}) + "\n")
    c.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    assert chat.is_chat_file(a) and not chat.is_chat_file(b) and not chat.is_chat_file(c)
