"""Default widths follow the model (a share of its cache), and a plan that saves (almost) nothing is refused."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, Qwen2Config

from edge_mla.commands import _plan_from
from edge_mla.convert import check_saving, named_plan, rope_key_width
from edge_mla.shape import cache_width
from edge_mla.plans import MAX_CACHE_SHARE, PLANS

# Published shapes (hidden, heads, KV heads, head_dim): no weights needed for widths.
SMOLLM2_135M = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                           num_hidden_layers=2, vocab_size=64)
QWEN25_05B = Qwen2Config(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         num_hidden_layers=2, vocab_size=64)
LLAMA32_1B = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                         num_hidden_layers=2, vocab_size=64)
TINY_GQA = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                       num_hidden_layers=2, vocab_size=64)


def cache_share(config, plan) -> float:
    return (plan.latent + rope_key_width(config, plan)) / cache_width(config)


def test_smollm2_keeps_the_widths_it_was_measured_at():
    assert cache_width(SMOLLM2_135M) == 384
    assert named_plan("training-free", SMOLLM2_135M).latent == 256  # + 64 rope = 320
    assert named_plan("recovered", SMOLLM2_135M).latent == 224  # + 32 rope = 256
    assert named_plan("finetuned", SMOLLM2_135M).latent == 128  # + 64 rope = 192


@pytest.mark.parametrize("config", [SMOLLM2_135M, QWEN25_05B, LLAMA32_1B, TINY_GQA])
@pytest.mark.parametrize("name", list(PLANS))
def test_every_default_saves_memory_on_every_shape(config, name):
    plan = named_plan(name, config)
    assert cache_share(config, plan) <= MAX_CACHE_SHARE
    check_saving(config, plan)  # the defaults are never refused
    if cache_width(config) >= 128:  # wide enough for whole q4_0 blocks
        assert (plan.latent + rope_key_width(config, plan)) % 32 == 0


def test_qwen_half_cache_is_a_real_saving():
    # 2 KV heads of 64: 256 cached numbers; the old absolute default (C + R = 192 + 64) kept all of them
    assert named_plan("recovered", QWEN25_05B).latent == 128  # + 32 = 160 of 256
    assert named_plan("training-free", QWEN25_05B).latent == 128


def test_a_plan_that_saves_nothing_is_refused_with_a_width_that_would():
    pointless = replace(PLANS["training-free"], latent=192)  # 192 + 64 = 256 = the original's
    with pytest.raises(ValueError, match=r"keeps 100% of the original's 256.*--latent 64 \(C \+ R = 128, 50%"):
        check_saving(QWEN25_05B, pointless, "some cost")
    almost = replace(PLANS["recovered"], latent=320)  # 352 of 384 = 92%
    with pytest.raises(ValueError, match="saves less than 10%"):
        check_saving(SMOLLM2_135M, almost)
    check_saving(SMOLLM2_135M, replace(PLANS["recovered"], latent=288))  # 320 of 384: saved 17%


def test_convert_command_refuses_before_converting_and_allows_full_rank():
    args = SimpleNamespace(selection="shared", rope_pairs=None, svd="joint", weighting="attention", rank=None,
                           latent=192, full_rank=False)
    with pytest.raises(ValueError, match="saves less than"):
        _plan_from(args, QWEN25_05B)
    assert _plan_from(replace_ns(args, latent=None), QWEN25_05B).latent == 128
    assert _plan_from(replace_ns(args, latent=None, full_rank=True), QWEN25_05B).latent is None  # exact, on purpose


def replace_ns(ns, **changes):
    return SimpleNamespace(**{**vars(ns), **changes})
