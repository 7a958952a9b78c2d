"""Multi-head Latent Attention as a drop-in attention module for a transformers decoder.

Per token the layer caches one vector [c | k_rope] of C + R numbers: the latent c (shared by all heads) and
the rotated rope key (shared by all heads). It is stored in the model's own transformers Cache as the "key"
of a single KV head, with a zero-width "value", so `generate()`, cropping and beam search work unchanged.

Two forms compute the same attention:
- expanded (training, prefill): k_nope and v are rebuilt per KV group from the latent;
- absorbed (decode): W_uk is folded into the query (q_lat = W_uk^T q_nope) and attention runs over the cached
  [c | k_rope] directly, as one-KV-head attention; W_uv is applied to the attended latent afterwards.
Optionally (mla["latent_norm_eps"]: one eps per layer) the latent passes a learned RMSNorm before it is cached, as
in DeepSeek's MLA and llama.cpp's deepseek2 (attn_kv_a_norm). A conversion cannot make it exact, so it is installed
by training (latent.install_latent_norm), with an eps of its own: a large one keeps the norm nearly linear. In
llama.cpp, whose norm uses the model's eps, the latent rows of kv_a are scaled by latent_row_scale() instead, which
is the same function; no eps-dominance trick then, so kv_a can be 4-bit like the rest.
The key up-projection bias adds q_nope . b_k to every score of a query, a constant that softmax ignores,
so the absorbed form drops it; the value bias is added after attention because the weights sum to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLAAttention(nn.Module):
    def __init__(self, config, mla: dict, layer_idx: int):
        super().__init__()
        E = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = mla["num_groups"]
        self.head_dim = mla["head_dim"]  # value width per head
        self.nope_dim = mla["nope_dim"]
        self.rope_dim = mla["rope_dim"]
        self.latent_dim = mla["latent_dim"]
        self.scaling = mla["softmax_scale"]
        self.rope_scaling = mla.get("rope_attention_scaling", 1.0)
        bias = mla["qkv_bias"]
        H, G, N, R, C, d = self.num_heads, self.num_groups, self.nope_dim, self.rope_dim, self.latent_dim, self.head_dim
        self.q_proj = nn.Linear(E, H * (N + R), bias=bias)
        self.kv_a_proj = nn.Linear(E, C + R, bias=bias)  # latent rows (bias zero there), then rope-key rows
        self.k_up = nn.Parameter(torch.zeros(G, N, C))
        self.v_up = nn.Parameter(torch.zeros(G, d, C))
        self.k_up_bias = nn.Parameter(torch.zeros(G, N)) if bias else None
        self.v_up_bias = nn.Parameter(torch.zeros(G, d)) if bias else None
        self.o_proj = nn.Linear(H * d, E, bias=mla.get("o_bias", False))
        eps = mla.get("latent_norm_eps")
        self.latent_norm = nn.RMSNorm(C, eps=eps[layer_idx]) if eps is not None else None
        self.model_eps = getattr(config, "rms_norm_eps", None)  # the eps llama.cpp's attn_kv_a_norm uses
        self.register_buffer("inv_freq", torch.zeros(R // 2), persistent=True)
        self.absorbed = False
        self.is_causal = True
        self.cache_quant = None  # optional fn over the cached row (q4_0.mla_cache emulates a q4_0 cache)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """NEOX rotation of the R rope dims with this layer's own per-pair frequencies. x: [B, *, T, R]."""
        freqs = position_ids[:, None, :, None].float() * self.inv_freq.float()
        cos = (freqs.cos() * self.rope_scaling).to(x.dtype)
        sin = (freqs.sin() * self.rope_scaling).to(x.dtype)
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                **kwargs):
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`; accept either
        past_key_values = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        H, N, R, C = self.num_heads, self.nope_dim, self.rope_dim, self.latent_dim
        if position_ids is None:
            start = past_key_values.get_seq_length(self.layer_idx) if past_key_values is not None else 0
            position_ids = torch.arange(start, start + T, device=hidden_states.device)[None].expand(B, T)
        q = self.q_proj(hidden_states).view(B, T, H, N + R).transpose(1, 2)  # [B, H, T, N+R]
        q_nope, q_rope = q.split([N, R], dim=-1)
        q_rope = self._rotate(q_rope, position_ids)
        kv = self.kv_a_proj(hidden_states)[:, None]  # [B, 1, T, C+R]
        latent, k_rope = kv.split([C, R], dim=-1)
        if self.latent_norm is not None:
            latent = self.latent_norm(latent)
        entry = torch.cat([latent, self._rotate(k_rope, position_ids)], -1)
        if self.cache_quant is not None:  # the runtime writes the row to its cache first, then attends over it
            entry = self.cache_quant(entry)
        if past_key_values is not None:
            entry, _ = past_key_values.update(entry, entry[..., :0], self.layer_idx)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, :, : entry.shape[-2]]
        is_causal = mask is None and T > 1
        if self.absorbed:
            out = self._absorbed(q_nope, q_rope, entry, mask, is_causal)
        else:
            out = self._expanded(q_nope, q_rope, entry, mask, is_causal)
        out = out.transpose(1, 2).reshape(B, T, H * self.head_dim)
        return self.o_proj(out), None

    def _expanded(self, q_nope, q_rope, entry, mask, is_causal):
        B, S = entry.shape[0], entry.shape[-2]
        G, R = self.num_groups, self.rope_dim
        latent, k_rope = entry[:, 0].split([self.latent_dim, R], dim=-1)  # [B, S, C], [B, S, R]
        k_nope = torch.einsum("bsc,gnc->bgsn", latent, self.k_up)
        v = torch.einsum("bsc,gdc->bgsd", latent, self.v_up)
        if self.k_up_bias is not None:
            k_nope = k_nope + self.k_up_bias[None, :, None]
            v = v + self.v_up_bias[None, :, None]
        k = torch.cat([k_nope, k_rope[:, None].expand(B, G, S, R)], -1)
        q = torch.cat([q_nope, q_rope], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
                                              enable_gqa=G != self.num_heads)

    def _absorbed(self, q_nope, q_rope, entry, mask, is_causal):
        H, G = self.num_heads, self.num_groups
        k_up = self.k_up.repeat_interleave(H // G, dim=0)  # [H, N, C]
        v_up = self.v_up.repeat_interleave(H // G, dim=0)  # [H, d, C]
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, k_up)
        q = torch.cat([q_latent, q_rope], -1)  # [B, H, T, C+R]
        attended = F.scaled_dot_product_attention(q, entry, entry[..., : self.latent_dim], attn_mask=mask,
                                                  is_causal=is_causal, scale=self.scaling, enable_gqa=True)
        out = torch.einsum("bhtc,hdc->bhtd", attended, v_up)
        if self.v_up_bias is not None:
            out = out + self.v_up_bias.repeat_interleave(H // G, dim=0)[None, :, None]
        return out


def latent_row_scale(attn: MLAAttention) -> float:
    """s such that the runtime's RMSNorm with the model's eps over s c equals this layer's latent norm over c:
    gamma s c / sqrt(s^2 mean(c^2) + eps_model) = gamma c / sqrt(mean(c^2) + eps_model / s^2)."""
    return math.sqrt(attn.model_eps / attn.latent_norm.eps)


def mla_layers(model) -> list[MLAAttention]:
    return [layer.self_attn for layer in model.model.layers if isinstance(layer.self_attn, MLAAttention)]


def set_cache_quant(model, fn) -> None:
    """Every MLA layer passes its cached row [c | k_rope] through `fn` (None: float cache), e.g. q4_0.mla_cache."""
    for layer in mla_layers(model):
        layer.cache_quant = fn


def set_absorbed(model, absorbed: bool = True) -> None:
    """Switch every MLA layer between the expanded (training) and absorbed (decode) form."""
    for layer in mla_layers(model):
        layer.absorbed = absorbed


def install_mla(model, mla: dict) -> None:
    """Replace each decoder layer's attention with an (uninitialized) MLA module sized by `mla`."""
    for i, layer in enumerate(model.model.layers):
        old = layer.self_attn
        new = MLAAttention(model.config, mla, i).to(device=old.o_proj.weight.device, dtype=old.o_proj.weight.dtype)
        layer.self_attn = new
    model.config.mla = mla


def new_cache(model):
    """An empty transformers DynamicCache for `model`: the one cache type both forms and generate() use."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward_with_cache(model, ids: torch.Tensor, cache=None):
    """Run `model` on `ids`, appending to `cache` (a new one when None); returns (logits, cache).

    The cache object is ours, so nothing depends on where a transformers release puts it in its outputs, or on
    what it calls the argument (`past_key_values` until 5.23, `cache` from 5.24)."""
    import inspect

    cache = new_cache(model) if cache is None else cache
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(ids, use_cache=True, **{name: cache}).logits
    return logits, cache


def cached_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (keys, values) a cache holds, [B, kv_heads, T, width] each. An MLA layer caches its row
    [c | k_rope] as the keys of one KV head, with zero-width values."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_bytes(cache) -> int:
    """Bytes actually held by a transformers cache: every tensor of every layer."""
    return sum(t.numel() * t.element_size() for kv in cached_tensors(cache) for t in kv if t is not None)
