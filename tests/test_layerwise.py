"""The layer-by-layer (streamed) path gives what the in-memory path gives: same statistics, same converted weights."""
from __future__ import annotations

import pytest
import torch

from conftest import calibration_windows, tiny_model
from edge_mla.calibration import collect_stats, new_stats, stats_hook
from edge_mla.convert import Plan, convert_source, load
from edge_mla.source import load_source
from test_gguf import bpe_tokenizer, tiny


def whole_model_stats(model, windows):
    """Statistics the way main gathered them before the layer walk: hooks on whole-model forwards, window by window."""
    stats = [new_stats(model.config) for _ in model.model.layers]
    handles = [layer.self_attn.register_forward_pre_hook(stats_hook(s, layer.self_attn, model.config), with_kwargs=True)
               for s, layer in zip(stats, model.model.layers)]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "llama-bias"])
def test_layer_walk_statistics_equal_whole_model_hooks(kind):
    model, windows = tiny_model(kind), calibration_windows()
    for a, b in zip(collect_stats(model, windows), whole_model_stats(model, windows)):
        assert a.count == b.count
        for name in ("xx_sum", "x_sum", "q_pair_norm_sum", "k_pair_norm_sum"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name  # bit for bit


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def bf16_folder(root, kind, tokenizer):
    """A tiny model saved like a hub download: bf16, sharded, with an index."""
    folder = root / kind
    tiny(kind, len(tokenizer)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.mark.parametrize("kind,plan", [("llama-gqa", Plan(selection="shared", latent=32)),
                                       ("qwen2", Plan(selection="partition-2norm", rope_pairs=2, latent=24)),
                                       ("mistral", Plan(selection="high", rope_pairs=2, weighting="weights"))])
def test_streamed_conversion_equals_in_memory(tmp_path, tokenizer, kind, plan):
    folder = bf16_folder(tmp_path, kind, tokenizer)
    in_memory = load_source(str(folder))
    streamed = load_source(str(folder), lazy=True)
    assert in_memory.checkpoint is None and streamed.checkpoint is not None
    assert all(p.is_meta for p in streamed.model.model.layers.parameters())  # nothing read yet
    options = dict(calib_windows=2, calib_length=48)
    _, mla_a = convert_source(in_memory, plan, tmp_path / "a", **options)
    _, mla_b = convert_source(streamed, plan, tmp_path / "b", **options)
    assert mla_a == mla_b
    a, b = load(tmp_path / "a")[0].state_dict(), load(tmp_path / "b")[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
