"""T5 tokenizer == transformers' T5 tokenizer for Open-Sora's call (max_length 300, padded, truncated)."""

from __future__ import annotations

import inspect
import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from mlx_sora.prompts.tokenizer import T5Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
MAX_LENGTH = 300


def corpus() -> list[str]:
    docs = [textwrap.__doc__, json.__doc__, random.__doc__, inspect.__doc__, inspect.getdoc(str),
            inspect.getdoc(str.format), inspect.getdoc(dict), inspect.getdoc(Path)]
    lines = [line for doc in docs for line in (doc or "").splitlines() if line.strip()]
    cases = json.loads((FIXTURES / "text_preprocessing.json").read_text())["cases"]
    lines += [case["prompt"] for case in cases]
    lines += ["Ünïcödé façade naïve crème brûlée Straße", "Привет мир, как дела", "東京の夜景 北京 上海",
              "ｆｕｌｌ ｗｉｄｔｈ ﬁne ① ™", "a cat playing piano in a jazz club aesthetic score: 6.5."]
    return lines


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[T5Tokenizer, transformers.PreTrainedTokenizerBase]:
    """A small sentencepiece model with T5's conventions (pad 0, eos 1, unk 2, no bos, nmt_nfkc)."""
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "spiece"), vocab_size=400,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
    )
    return T5Tokenizer.from_folder(folder), transformers.T5Tokenizer.from_pretrained(folder)


def hf_call(hf, texts):
    out = hf(texts, max_length=MAX_LENGTH, padding="max_length", truncation=True,
             return_attention_mask=True, add_special_tokens=True, return_tensors="np")
    return out["input_ids"], out["attention_mask"]


def prompts() -> list[str]:
    cases = json.loads((FIXTURES / "text_preprocessing.json").read_text())["cases"]
    texts = [value for case in cases for key, value in case.items()]  # raw, cleaned, with scores
    long_text = " ".join(corpus())
    texts += [
        "", " ", "\t\n", "   leading and trailing   ", "a  b\t\tc\n\nd", "a\r\nb", "a\u00a0b\u3000c\u2003d",
        "zero\u200bwidth", "e\u0301 combining", "▁already ▁metaspace▁", "▁", "emoji 🐶🌊🎬", "ｆｕｌｌ ｗｉｄｔｈ",
        "ﬁ ligature", "Straße", "Привет", "東京", "\x00control\x07chars", "...,,;;!!??", "'quoted' \"double\"",
        "</s>", "<pad>", "<unk>", "a</s>b", "x </s> y", "<extra_id_0>", "<extra_id_99>", "<extra_id_100>",
        "a<extra_id_1>b", "<extra_id_1><extra_id_2>", "<extra_id_3> <extra_id_4>", "</s></s>", "<extra_id_12",
        long_text[:2000], long_text[:5000], long_text,
    ]
    rng = random.Random(0)
    alphabet = list("abcXYZ 019.,:;-_'\"<>/\t\n") + ["</s>", "<extra_id_7>", "é", "東", "▁", "\u00a0", "🐶", "ﬁ"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    return texts


def test_ids_and_mask_equal_transformers(tokenizers):
    ours, hf = tokenizers
    texts = prompts()
    ids, mask = hf_call(hf, texts)
    got = ours(texts)
    mismatched = [t for t, a, b in zip(texts, got.input_ids, ids) if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    np.testing.assert_array_equal(got.attention_mask, mask)
    assert got.input_ids.shape == (len(texts), MAX_LENGTH) and got.input_ids.dtype == np.int64
    for text in texts[:60]:  # one at a time too
        one = ours(text)
        np.testing.assert_array_equal(one.input_ids, hf_call(hf, [text])[0])


def test_special_ids_and_vocabulary(tokenizers):
    ours, hf = tokenizers
    assert (ours.pad_id, ours.eos_id) == (hf.pad_token_id, hf.eos_token_id) == (0, 1)
    assert ours.vocab_size == len(hf) == 500
    for i in (0, 1, 50, 99):
        assert ours.special_ids[f"<extra_id_{i}>"] == hf.convert_tokens_to_ids(f"<extra_id_{i}>")
    assert ours.encode("<extra_id_99>") == [400]  # sentinels sit right after the sentencepiece pieces


def test_truncation_keeps_eos_and_is_detectable(tokenizers):
    ours, hf = tokenizers
    long_text = " ".join(corpus())
    short = "a cat playing piano"
    got = ours([long_text, short, ""])
    n_long = len(hf(long_text, add_special_tokens=True)["input_ids"])
    assert n_long > MAX_LENGTH
    np.testing.assert_array_equal(got.num_tokens, [n_long, len(hf(short)["input_ids"]), 1])
    np.testing.assert_array_equal(got.truncated, [True, False, False])
    assert got.input_ids[0, -1] == 1 and got.attention_mask[0].all()
    assert got.input_ids[2, 0] == 1 and got.attention_mask[2].sum() == 1  # "" -> just </s>
    # a prompt of exactly max_length tokens (with </s>) is not truncated
    exact_ids = ours.encode(long_text)[: MAX_LENGTH - 1]
    exact = ours.sp.decode(exact_ids)
    exact_tokens = ours(exact)
    assert exact_tokens.num_tokens[0] == len(ours.encode(exact)) + 1
    np.testing.assert_array_equal(exact_tokens.input_ids, hf_call(hf, [exact])[0])
    # other lengths
    for length in (1, 7, 64):
        np.testing.assert_array_equal(
            ours(long_text, max_length=length).input_ids,
            hf(long_text, max_length=length, padding="max_length", truncation=True, return_tensors="np")["input_ids"],
        )


def test_bad_files_and_inputs(tmp_path, tokenizers):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        T5Tokenizer.from_folder(tmp_path)
    # a sentencepiece model without T5's <pad> piece (sentencepiece defaults: <unk>, <s>, </s>)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=200, minloglevel=2)
    with pytest.raises(ValueError, match="no <pad> piece"):
        T5Tokenizer(tmp_path / "plain.model")
    with pytest.raises(TypeError, match="must be a str"):
        tokenizers[0]([b"bytes"])
