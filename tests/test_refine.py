"""Local prompt refinement with mlx-lm: a tiny random-weight Llama built here (no network), checked
against mlx-lm's own ``generate`` for the same model, chat, sampler and seed."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_sora.errors import UserError
from mlx_sora.prompts.refine import (
    SYSTEM_PROMPT,
    PromptRefiner,
    RefinerSettings,
    plan_refinement,
    refine_prompts,
    resolve_refiner,
    tidy,
)
from mlx_sora.runtime.streaming import MemoryBudgetError

WORDS = ("a red blue circle square moving left right up down slowly over black background the camera "
         "follows bright shape glides across frame smooth light soft").split()


def build_tiny_llm(folder: Path) -> Path:
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + [".", ","])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = template
    fast.save_pretrained(folder)
    config = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(vocab),
                  tie_word_embeddings=True, eos_token_id=vocab["</s>"], bos_token_id=vocab["<s>"])
    mx.random.seed(3)
    args = {k: v for k, v in config.items() if k not in ("eos_token_id", "bos_token_id")}
    model = llama.Model(llama.ModelArgs(**args))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny-llama")


def test_refinement_is_mlx_lm_generate_on_our_chat(tiny_llm):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    settings = RefinerSettings(model=str(tiny_llm), max_tokens=24, temperature=0.8, top_p=0.95)
    model, tokenizer = load(str(tiny_llm))
    prompt = "a red circle moving left"
    chat = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    expected = {}
    for seed in (0, 1):
        mx.random.seed(seed)
        expected[seed] = generate(model, tokenizer, prompt=chat, max_tokens=24, sampler=make_sampler(0.8, 0.95))
    assert expected[0] != expected[1]  # the seed matters: sampling, not greedy
    with PromptRefiner(tiny_llm, settings) as refiner:
        assert refiner.chat(prompt) == chat
        for seed in (0, 1):
            assert refiner.generate_raw(prompt, seed) == expected[seed]
            assert refiner.generate_raw(prompt, seed) == expected[seed]  # deterministic with the seed
            assert refiner.refine(prompt, seed) == tidy(expected[seed])


def test_refine_keeps_json_and_loop_segments(tiny_llm):
    settings = RefinerSettings(model=str(tiny_llm), max_tokens=8)
    with PromptRefiner(tiny_llm, settings) as refiner:
        a, b = (tidy(refiner.generate_raw(p, 5)) for p in ("a red circle", "a blue square"))
        got = refiner.refine('|0|a red circle|1|a blue square{"reference_path": "x.png", "mask_strategy": "0"}', 5)
    assert got == f'|0|{a}|1|{b}{{"reference_path": "x.png", "mask_strategy": "0"}}'


def test_refine_prompts_is_a_planned_reported_phase(tiny_llm):
    seen = []
    refined, report, plan = refine_prompts(["a red circle", "a blue square"], 7, 2**34,
                                           RefinerSettings(model=str(tiny_llm), max_tokens=8),
                                           on_refined=lambda p, r: seen.append((p, r)))
    assert len(refined) == 2 and [p for p, _ in seen] == ["a red circle", "a blue square"]
    assert report.name == "prompt refinement" and report.seconds > 0 and report.peak_memory > 0
    assert plan.phase == "prompt refinement" and plan.budget == 2**34
    with pytest.raises(MemoryBudgetError, match="prompt refinement"):
        plan_refinement(tiny_llm, 1000, 8)


def test_tidy_and_bad_models(tmp_path):
    assert tidy('  "A red circle\n glides left."  ') == "A red circle glides left."
    with pytest.raises(UserError, match="no config.json"):
        resolve_refiner(str(tmp_path))
    with pytest.raises(UserError, match="not a folder, nor a hub id"):
        resolve_refiner("no such model")
