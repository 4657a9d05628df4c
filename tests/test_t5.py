"""T5 v1.1 encoder: parity with transformers.T5EncoderModel, conversion from HF checkpoints, XXL size."""

from __future__ import annotations

import inspect
import json
import shutil
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten, tree_map
from tolerances import f32
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

import mlx_sora
from mlx_sora.io.checkpoint import CheckpointError
from mlx_sora.models.t5 import T5Config, T5Encoder, relative_position_bucket
from mlx_sora.models.units import arrays_of
from mlx_sora.prompts.tokenizer import T5Tokenizer

SEQ_LEN = 40
LENGTHS = (SEQ_LEN, 33, 5)  # one full row, two padded ones


def hf_config(feed_forward_proj: str = "gated-gelu", **overrides) -> transformers.T5Config:
    kwargs = dict(vocab_size=140, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_decoder_layers=1,
                  num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=24,
                  feed_forward_proj=feed_forward_proj, dropout_rate=0.0, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.T5Config(**kwargs)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw the weights the HF init leaves trivial (norms = 1) or weak (q, position bias)."""
    g = torch.Generator().manual_seed(seed)
    d_model = model.config.d_model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".q.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * d_model**-0.5)
            elif "shared" in name or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # projections: 1/sqrt(fan_in), like the HF init of k, v, wi, wo
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


def inputs(vocab_size: int, seed: int = 0, lengths=LENGTHS, seq_len=SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ending with </s> (1) and padded with 0 after each row's length, like the tokenizer."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(len(lengths), seq_len))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n - 1] = 1
        ids[row, n:] = 0
        mask[row, :n] = 1
    return ids, mask


def reference(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    return out.float().numpy()


def rel_err(a: np.ndarray, r: np.ndarray, where: np.ndarray | None = None) -> float:
    diff = np.abs(np.asarray(a, np.float32) - r)
    if where is not None:
        diff = diff[where]
    return float(diff.max() / np.abs(r).max())


def spiece_corpus() -> list[str]:
    docs = [textwrap.__doc__, json.__doc__, inspect.getdoc(str), inspect.getdoc(str.format),
            inspect.getdoc(dict), inspect.getdoc(list), inspect.getdoc(Path)]
    return [line for doc in docs for line in (doc or "").splitlines() if line.strip()]


def save_checkpoint(model, folder: Path, spiece: Path, bin_shard_bytes: int | None = None) -> Path:
    """An HF snapshot folder: config.json, weights, spiece.model + the tokenizer files.

    ``bin_shard_bytes``: write sharded PyTorch ``.bin`` files + ``pytorch_model.bin.index.json`` the way
    transformers 4.x ``save_pretrained(safe_serialization=False, max_shard_size=...)`` did (DeepFloyd's
    layout; transformers 5.x no longer writes .bin). Otherwise transformers' own safetensors.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if bin_shard_bytes is None:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        state = model.state_dict()
        # DeepFloyd's .bin also holds the tied copies; they share storage with shared.weight
        state["encoder.embed_tokens.weight"] = model.encoder.embed_tokens.weight
        shards, current, size = [], {}, 0
        for key, value in state.items():
            if current and size + value.numel() * value.element_size() > bin_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[key] = value
            size += value.numel() * value.element_size()
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, folder / name)
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    transformers.T5Tokenizer.from_pretrained(spiece.parent).save_pretrained(folder)
    shutil.copy(spiece, folder / "spiece.model")  # transformers 5.x saves tokenizer.json only
    return folder


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spiece_corpus()), model_prefix=str(folder / "spiece"), vocab_size=120,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
    )
    return folder / "spiece.model"  # + 20 extra ids = vocab 140


def encoder_from(hf_model, **config_overrides) -> T5Encoder:
    """The MLX encoder with the HF model's weights, through the conversion key map."""
    from mlx_sora.models.t5 import FAMILY

    config = {**hf_model.config.to_dict(), "hf_embedding_key": "shared.weight", **config_overrides}
    model = FAMILY.build(config)
    weights = {}
    for key, value in hf_model.state_dict().items():
        mlx_key = FAMILY.rename(key, config)
        if mlx_key is not None:
            weights[mlx_key] = mx.array(value.float().numpy())
    model.load_weights(list(weights.items()), strict=True)
    return model


# ---------------------------------------------------------------- numerics of the parts


def test_relative_position_bucket_matches_transformers():
    rel = np.arange(-1000, 1001)[None, :]
    for buckets, distance in ((32, 128), (16, 24), (8, 10)):
        ref = HFT5Attention._relative_position_bucket(torch.from_numpy(rel), True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, buckets, distance), ref)


def test_gelu_new_is_the_tanh_form():
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    ref = transformers.activations.ACT2FN["gelu_new"](torch.from_numpy(x)).numpy()
    got = np.array(nn.gelu_approx(mx.array(x)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # and not the erf form, which differs by up to ~1e-3
    assert np.abs(np.array(nn.gelu(mx.array(x))) - ref).max() > 1e-4


def test_config_from_dict_and_validation():
    hf = hf_config().to_dict()
    config = T5Config.from_dict({**hf, "an_unknown_key": 3})
    assert (config.d_model, config.num_layers, config.feed_forward_proj) == (64, 3, "gated-gelu")
    assert config.activation == "gelu_new" and config.is_gated
    assert T5Config.from_dict({}).feed_forward_proj == "relu"  # transformers' default (original T5)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-swish")
    with pytest.raises(ValueError, match="num_heads"):
        T5Config(num_heads=0)
    with pytest.raises(ValueError, match="num_buckets"):
        T5Config(relative_attention_num_buckets=7)


def test_xxl_parameter_count_without_allocating():
    before = mx.get_active_memory()
    model = T5Encoder(T5Config.t5_v1_1_xxl())
    count = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert count == 4_762_310_656  # encoder + shared embedding of DeepFloyd/t5-v1_1-xxl
    assert mx.get_active_memory() - before < 100 * 2**20  # nothing was evaluated
    assert len(model.blocks) == 24
    assert [u.name for u in model.units] == ["embed", *(f"block_{i:02d}" for i in range(24)), "final_norm"]


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.gpu
@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_fp32_parity_with_transformers(feed_forward_proj):
    ref_model = randomize(transformers.T5EncoderModel(hf_config(feed_forward_proj)), seed=1)
    model = encoder_from(ref_model)
    ids, mask = inputs(140)
    ref = reference(ref_model, ids, mask)
    out = np.array(model(mx.array(ids), mx.array(mask)))
    valid = mask.astype(bool)
    assert out.shape == (3, SEQ_LEN, 64) and out.dtype == np.float32
    assert rel_err(out, ref, valid) <= f32(1e-5)
    assert rel_err(out, ref, ~valid) <= f32(1e-5)  # padded rows are computed by the reference too
    # numpy inputs work the same
    np.testing.assert_array_equal(np.array(model(ids, mask)), out)


@pytest.mark.gpu
def test_gated_silu_variant():
    ref_model = randomize(transformers.T5EncoderModel(hf_config("gated-silu")), seed=2)
    ids, mask = inputs(140, seed=3)
    out = np.array(encoder_from(ref_model)(ids, mask))
    assert rel_err(out, reference(ref_model, ids, mask)) <= f32(1e-5)


@pytest.mark.gpu
def test_padding_does_not_change_valid_tokens():
    ref_model = randomize(transformers.T5EncoderModel(hf_config()), seed=4)
    model = encoder_from(ref_model)
    ids, mask = inputs(140, seed=5)
    batched = np.array(model(ids, mask))
    for row, n in enumerate(LENGTHS):
        alone = np.array(model(ids[row : row + 1, :n], mask[row : row + 1, :n]))[0]
        assert rel_err(batched[row, :n], alone) <= f32(1e-5)
    # without a mask, all keys count (as in transformers)
    no_mask = np.array(model(ids))
    assert rel_err(no_mask, reference(ref_model, ids, np.ones_like(mask))) <= f32(1e-5)


@pytest.mark.gpu
def test_units_one_by_one_equal_the_whole():
    model = encoder_from(randomize(transformers.T5EncoderModel(hf_config()), seed=6))
    ids, mask = inputs(140, seed=7)
    carry = model.check_inputs(ids, mask)
    for unit in model.units:
        carry = unit(carry)
        mx.eval(arrays_of(carry))
        if unit.name == "embed":
            assert carry[1].shape == (3, 4, SEQ_LEN, SEQ_LEN)
    assert model.attention_bias(SEQ_LEN).shape == (1, 4, SEQ_LEN, SEQ_LEN)
    np.testing.assert_array_equal(np.array(carry), np.array(model(ids, mask)))


@pytest.mark.gpu
def test_bfloat16_storage_with_float32_compute():
    """bf16 weights computed in fp32 == transformers fp32 on the bf16-rounded weights."""
    ref_model = randomize(transformers.T5EncoderModel(hf_config()), seed=8)
    ref_model = ref_model.to(torch.bfloat16).to(torch.float32)
    model = encoder_from(ref_model)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    model.compute_dtype = mx.float32
    ids, mask = inputs(140, seed=9)
    out = model(ids, mask)
    assert out.dtype == mx.float32
    assert rel_err(np.array(out), reference(ref_model, ids, mask)) <= f32(1e-5)


@pytest.mark.gpu
def test_bfloat16_compute_tolerance():
    """bf16 end to end, against transformers in bf16 and both against fp32.

    These random weights make attention peaky, so bf16 rounding shows: measured max|mlx - hf_bf16| /
    max|ref| ~3-4e-2 (mean ~1.6e-2 of mean|ref|), and MLX bf16's distance to fp32 is within ~1.2x of
    transformers' own bf16 distance to fp32.
    """
    fp32_model = randomize(transformers.T5EncoderModel(hf_config()), seed=10)
    ids, mask = inputs(140, seed=11)
    ref32 = reference(fp32_model, ids, mask)
    bf16_model = fp32_model.to(torch.bfloat16)  # Open-Sora casts the whole model, wo included
    ref16 = reference(bf16_model, ids, mask)
    model = encoder_from(bf16_model)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    model.compute_dtype = mx.bfloat16
    out = model(ids, mask)
    assert out.dtype == mx.bfloat16
    out = np.array(out.astype(mx.float32))

    def mean_rel(a, r):
        return float(np.abs(a - r).mean() / np.abs(r).mean())

    assert rel_err(out, ref16) <= 6e-2
    assert mean_rel(out, ref16) <= 2.5e-2
    assert mean_rel(out, ref32) <= 1.5 * mean_rel(ref16, ref32)


def test_bad_inputs_are_rejected():
    model = encoder_from(randomize(transformers.T5EncoderModel(hf_config()), seed=12))
    with pytest.raises(ValueError, match=r"\[0, 140\)"):
        model(np.array([[5, 140]]))
    with pytest.raises(ValueError, match="integer array"):
        model(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(np.ones((2, 3), dtype=np.int64), np.ones((2, 4), dtype=np.int64))


# ---------------------------------------------------------------- conversion from HF checkpoints


@pytest.fixture(scope="module")
def seq2seq():
    """A tiny T5ForConditionalGeneration (encoder + decoder + lm_head), as DeepFloyd publishes."""
    torch.manual_seed(0)
    return randomize(transformers.T5ForConditionalGeneration(hf_config()), seed=13)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sharded_bin", "safetensors"])
def test_convert_and_load_match_transformers(tmp_path, seq2seq, spiece, layout):
    shard_bytes = 300_000 if layout == "sharded_bin" else None
    hf_dir = save_checkpoint(seq2seq, tmp_path / "hf", spiece, bin_shard_bytes=shard_bytes)
    if layout == "sharded_bin":
        assert len(list(hf_dir.glob("pytorch_model-*.bin"))) >= 2
        assert not list(hf_dir.glob("*.safetensors"))
    out = mlx_sora.convert(hf_dir, tmp_path / "mlx")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "t5"
    assert config["mlx_sora"]["units"] == ["embed", "block_00", "block_01", "block_02", "final_norm"]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("decoder" in k or "lm_head" in k for k in weight_map)
    assert weight_map["embed_tokens.weight"] == weight_map["relative_attention_bias.weight"] == "embed.safetensors"
    assert (out / "spiece.model").read_bytes() == spiece.read_bytes()

    model = mlx_sora.load_model(out)
    assert isinstance(model, T5Encoder)
    ref_model = transformers.T5EncoderModel.from_pretrained(hf_dir).eval()
    ids, mask = inputs(140, seed=14)
    ref = reference(ref_model, ids, mask)
    np.testing.assert_array_equal(reference(seq2seq.get_encoder(), ids, mask), ref)
    assert rel_err(np.array(model(ids, mask)), ref) <= f32(1e-5)

    # the tokenizer of the converted folder feeds the model
    tokens = T5Tokenizer.from_folder(out)(["the string", "a"], max_length=SEQ_LEN)
    hf_tokens = transformers.T5Tokenizer.from_pretrained(hf_dir)(
        ["the string", "a"], max_length=SEQ_LEN, padding="max_length", truncation=True)
    np.testing.assert_array_equal(tokens.input_ids, hf_tokens["input_ids"])
    got = np.array(model(tokens.input_ids, tokens.attention_mask))
    assert rel_err(got, reference(ref_model, tokens.input_ids, tokens.attention_mask)) <= f32(1e-5)


@pytest.mark.gpu
def test_bfloat16_conversion_and_float32_compute(tmp_path, seq2seq, spiece):
    hf_dir = save_checkpoint(seq2seq, tmp_path / "hf", spiece)
    out = mlx_sora.convert(hf_dir, tmp_path / "mlx", dtype="bfloat16")
    stored = mlx_sora.load_model(out)
    assert stored.embed_tokens.weight.dtype == mx.bfloat16 and stored.compute_dtype == mx.bfloat16
    model = mlx_sora.load_model(out, dtype="float32")
    assert model.blocks[0].attention.q.weight.dtype == mx.float32 and model.compute_dtype == mx.float32
    ref_model = transformers.T5EncoderModel.from_pretrained(hf_dir).to(torch.bfloat16).to(torch.float32)
    ids, mask = inputs(140, seed=15)
    assert rel_err(np.array(model(ids, mask)), reference(ref_model, ids, mask)) <= f32(1e-5)


@pytest.mark.gpu
def test_checkpoint_with_only_the_encoder_embedding_copy(tmp_path, seq2seq, spiece):
    from safetensors.numpy import load_file, save_file

    hf_dir = save_checkpoint(seq2seq, tmp_path / "hf", spiece)
    (weights_file,) = hf_dir.glob("*.safetensors")
    state = load_file(weights_file)
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, weights_file, metadata={"format": "pt"})
    model = mlx_sora.load_model(mlx_sora.convert(hf_dir, tmp_path / "mlx"))
    ids, mask = inputs(140, seed=16)
    assert rel_err(np.array(model(ids, mask)), reference(seq2seq.get_encoder(), ids, mask)) <= f32(1e-5)


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path, seq2seq, spiece):
    hf_dir = save_checkpoint(seq2seq, tmp_path / "hf", spiece, bin_shard_bytes=300_000)
    shard = sorted(hf_dir.glob("pytorch_model-*.bin"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        mlx_sora.convert(hf_dir, tmp_path / "out_truncated")
    assert not (tmp_path / "out_truncated").exists()

    foreign = tmp_path / "bert"
    shutil.copytree(save_checkpoint(seq2seq, tmp_path / "hf2", spiece), foreign)
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="cannot tell which model"):
        mlx_sora.convert(foreign, tmp_path / "out_foreign")

    no_tokenizer = tmp_path / "hf3"
    save_checkpoint(seq2seq, no_tokenizer, spiece)
    (no_tokenizer / "spiece.model").unlink()
    with pytest.raises(CheckpointError, match="spiece.model"):
        mlx_sora.convert(no_tokenizer, tmp_path / "out_no_spiece")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, seq2seq, spiece):
    hf_dir = save_checkpoint(seq2seq, tmp_path / "hf", spiece, bin_shard_bytes=300_000)
    marker = tmp_path / "code_ran"
    shard = sorted(hf_dir.glob("pytorch_model-*.bin"))[-1]
    state = {"shared.weight": torch.zeros(2), "payload": _RunsCode(marker)}
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        mlx_sora.convert(hf_dir, tmp_path / "out")
    assert not marker.exists()
