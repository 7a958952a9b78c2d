"""MHA2MLA conversion is exact where it must be: tiny random Llama (MHA, GQA), Mistral and Qwen2 (biases)."""
from __future__ import annotations

import copy

import pytest
import torch

import reference
from conftest import prompt, stats_for, tiny_model
from edge_mla import rope, shape
from edge_mla.convert import Plan, convert
from edge_mla.mla import cache_bytes, forward_with_cache, new_cache, set_absorbed

TOL = 1e-4


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def converted(kind, plan, stats=None):
    model = tiny_model(kind)
    stats = stats if stats is not None else stats_for(model)
    original = copy.deepcopy(model)
    convert(model, plan, stats)
    return original, model, stats


@pytest.mark.parametrize("selection", rope.PER_HEAD_SELECTIONS)
def test_full_rank_equals_original_with_same_pairs_removed(kind, selection):
    original, mla, stats = converted(kind, Plan(selection=selection, rope_pairs=2))
    cfg = original.config
    d, n_kv = shape.head_dim(cfg), cfg.num_key_value_heads
    heads_per_group = cfg.num_attention_heads // n_kv
    inv_freq = original.model.rotary_emb.inv_freq
    ids = prompt()
    before = logits(original, ids)
    forwards = []
    for layer, s in zip(original.model.layers, stats):
        kept = rope.kept_pairs(selection, 2, n_kv, d // 2, s.pair_scores(heads_per_group))
        forwards.append(reference.per_head_forward(layer.self_attn, kept, inv_freq))
    reference.patch(original, forwards)
    expected = logits(original, ids)
    assert (expected - before).abs().max() > 1e-2, "removing RoPE pairs must change the model, or the test is blind"
    assert (logits(mla, ids) - expected).abs().max() < TOL


def test_full_rank_shared_head_equals_rotated_reference(kind):
    original, mla, stats = converted(kind, Plan(selection="shared", rope_pairs=6))
    cfg = original.config
    d, n_kv = shape.head_dim(cfg), cfg.num_key_value_heads
    inv_freq = original.model.rotary_emb.inv_freq
    forwards = [reference.shared_head_forward(layer.self_attn, reference.rotations_for(layer.self_attn, s, n_kv, d),
                                              6, 1, inv_freq)
                for layer, s in zip(original.model.layers, stats)]
    ids = prompt()
    before = logits(original, ids)
    reference.patch(original, forwards)
    expected = logits(original, ids)
    assert (expected - before).abs().max() > 1e-2
    assert (logits(mla, ids) - expected).abs().max() < TOL


@pytest.mark.parametrize("svd", ["joint", "split"])
@pytest.mark.parametrize("weighting", ["weights", "activations", "balanced", "attention"])
def test_keeping_every_pair_at_full_rank_is_the_original(kind, svd, weighting):
    d = 16
    original, mla, _ = converted(kind, Plan(selection="high", rope_pairs=d // 2, svd=svd, weighting=weighting))
    ids = prompt()
    assert (logits(mla, ids) - logits(original, ids)).abs().max() < TOL


def test_shared_head_with_every_component_is_the_original(kind):
    model = tiny_model(kind)
    n_kv = model.config.num_key_value_heads
    original, mla, _ = converted(kind, Plan(selection="shared", rope_pairs=8, rope_components=n_kv))
    ids = prompt()
    assert (logits(mla, ids) - logits(original, ids)).abs().max() < TOL


@pytest.mark.parametrize("selection", ["partition", "shared"])
def test_absorbed_form_equals_expanded_form(kind, selection):
    _, mla, _ = converted(kind, Plan(selection=selection, rope_pairs=2, latent=12))
    ids = prompt()
    expanded = logits(mla, ids)
    set_absorbed(mla, True)
    absorbed = logits(mla, ids)
    assert (absorbed - expanded).abs().max() < TOL
    # and through the cache, one token at a time
    cache = new_cache(mla)
    with torch.no_grad():
        steps = [forward_with_cache(mla, ids[:, i:i + 1], cache)[0] for i in range(ids.shape[1])]
    assert (torch.cat(steps, 1) - expanded).abs().max() < TOL


@pytest.mark.parametrize("absorbed", [False, True])
def test_greedy_generation_with_latent_cache_equals_no_cache(kind, absorbed):
    _, mla, _ = converted(kind, Plan(selection="2norm", rope_pairs=2, latent=16))
    set_absorbed(mla, absorbed)
    mla.generation_config.eos_token_id = None  # random weights: never stop early
    ids = prompt(12)
    with torch.no_grad():
        cached = mla.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = mla.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape[1] == ids.shape[1] + 24
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("selection,r", [("partition", 2), ("high", 1), ("shared", 4)])
def test_cache_bytes_per_token_match_formula(kind, selection, r):
    latent = 10
    _, mla, _ = converted(kind, Plan(selection=selection, rope_pairs=r, latent=latent))
    cfg = mla.config
    n_kv = cfg.num_key_value_heads
    rope_width = 2 * r * n_kv if selection != "shared" else 2 * r
    assert cfg.mla["rope_dim"] == rope_width
    ids = prompt(33)
    with torch.no_grad():
        _, cache = forward_with_cache(mla, ids)
    per_token = cache_bytes(cache) / ids.shape[1]
    assert per_token == cfg.num_hidden_layers * (latent + rope_width) * 4  # fp32


def test_compression_is_not_exact_but_close_at_high_rank(kind):
    # A latent below full rank loses something; activation-aware loses less than weights-only on the data it saw.
    model = tiny_model(kind)
    stats = stats_for(model)
    full = copy.deepcopy(model)
    convert(full, Plan(selection="partition", rope_pairs=2), stats)
    from conftest import calibration_windows
    ids = calibration_windows()[:1]
    ref = logits(full, ids)
    errors = {}
    for weighting in ("weights", "balanced"):
        m = copy.deepcopy(model)
        convert(m, Plan(selection="partition", rope_pairs=2, latent=20, weighting=weighting), stats)
        errors[weighting] = (logits(m, ids) - ref).pow(2).mean().item()
    assert errors["weights"] > 1e-8
    assert errors["balanced"] < errors["weights"]
