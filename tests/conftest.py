"""Tiny random models built inside the tests (no download): Llama MHA and GQA, Mistral, Qwen2 with q/k/v biases."""
from __future__ import annotations

import pytest
import torch

from edge_mla.calibration import collect_stats
from edge_mla.source import _finish, Source

VOCAB = 96


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
                  initializer_range=0.15, tie_word_embeddings=False)
    if kind == "llama-mha":
        config = LlamaConfig(num_key_value_heads=4, **common)
    elif kind == "llama-gqa":
        config = LlamaConfig(num_key_value_heads=2, **common)
    elif kind == "mistral":
        config = MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif kind == "qwen2":
        config = Qwen2Config(num_key_value_heads=2, **common)
    elif kind == "llama-bias":  # Llama with attention_bias=True: q/k/v and o biases
        config = LlamaConfig(num_key_value_heads=2, attention_bias=True, **common)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so the bias paths are really exercised
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    return _finish(Source(model, None, kind, None)).model


KINDS = ["llama-mha", "llama-gqa", "mistral", "qwen2"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def calibration_windows(seed: int = 1, n: int = 4, length: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def stats_for(model):
    return collect_stats(model, calibration_windows())


def prompt(length: int = 40, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, length), generator=g)


def with_latent_norms(model, seed: int = 0):
    """Give a converted model learned-looking latent norms: installed as the recovery does but far from linear (eps
    a tenth of the latent's median mean square, not the recovery's 10x), then each channel's weight spread by a
    random factor in [0.5, 1.5] (a uniform weight would hide a channel mix-up)."""
    from edge_mla import recover
    from edge_mla.mla import mla_layers

    g = torch.Generator().manual_seed(seed)
    E = model.config.hidden_size
    recover.install_latent_norms(model, [torch.randn(2, 16, E, generator=g) for _ in mla_layers(model)], softness=0.1)
    with torch.no_grad():
        for attn in mla_layers(model):
            attn.latent_norm.weight.mul_(0.5 + torch.rand(attn.latent_dim, generator=g))
    return model
