"""Independent references for partial RoPE, written the plain way (per-head attention over full keys), so the
MLA conversion is checked against a different formulation than the one it uses."""
from __future__ import annotations

import torch

from edge_mla import rope


def _rope(x, pos, inv_freq):
    freqs = pos[:, None, :, None].double() * inv_freq.double()
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attend(scores, v, scale):
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = (scores * scale).masked_fill(~causal, float("-inf")).softmax(-1)
    return weights @ v


def _heads(attn, x):
    B, T, _ = x.shape
    d, H = attn.head_dim, attn.config.num_attention_heads
    n_kv = attn.config.num_key_value_heads
    q = attn.q_proj(x).double().view(B, T, H, d).transpose(1, 2)
    k = attn.k_proj(x).double().view(B, T, n_kv, d).transpose(1, 2)
    v = attn.v_proj(x).double().view(B, T, n_kv, d).transpose(1, 2)
    return q, k, v, H // n_kv


def per_head_forward(attn, kept: torch.Tensor, inv_freq: torch.Tensor):
    """Original attention with RoPE only on pairs kept[g] of KV head g (and its query heads)."""
    def forward(hidden_states, attention_mask=None, position_ids=None, **kwargs):
        q, k, v, group = _heads(attn, hidden_states)
        B, H, T, d = q.shape
        half = d // 2
        mask = torch.zeros(k.shape[1], d, dtype=torch.bool)
        for g, pairs in enumerate(kept.tolist()):
            mask[g, pairs] = True
            mask[g, [p + half for p in pairs]] = True
        qmask = mask.repeat_interleave(group, 0)[None, :, None]
        q = torch.where(qmask, _rope(q, position_ids, inv_freq), q)
        k = torch.where(mask[None, :, None], _rope(k, position_ids, inv_freq), k)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = _attend(q @ k.transpose(-1, -2), v, d ** -0.5)
        out = out.transpose(1, 2).reshape(B, T, H * d).to(hidden_states.dtype)
        return attn.o_proj(out), None
    return forward


def shared_head_forward(attn, rotations: torch.Tensor, r: int, components: int, inv_freq: torch.Tensor):
    """RoRoPE: per frequency, rotate the KV heads into virtual heads k' = U^T k; every query head scores all
    virtual heads with q'_j = U[g, j] q; RoPE stays on virtual heads j < components of frequencies f < r."""
    def forward(hidden_states, attention_mask=None, position_ids=None, **kwargs):
        q, k, v, group = _heads(attn, hidden_states)
        B, H, T, d = q.shape
        half, n_kv = d // 2, k.shape[1]
        u = torch.cat([rotations, rotations], 0)  # per dim (d, n_kv, n_kv): both dims of a pair share U_f
        k_virtual = torch.einsum("dgj,bgtd->bjtd", u, k)
        q_virtual = torch.einsum("dhj,bhtd->bhjtd", u[:, torch.arange(H) // group], q)
        keep = torch.zeros(n_kv, d, dtype=torch.bool)
        keep[:components, :r] = True
        keep[:components, half:half + r] = True
        k_virtual = torch.where(keep[None, :, None], _rope(k_virtual, position_ids, inv_freq), k_virtual)
        rotated_q = _rope(q_virtual.flatten(1, 2), position_ids, inv_freq).view_as(q_virtual)
        q_virtual = torch.where(keep[None, None, :, None], rotated_q, q_virtual)
        scores = torch.einsum("bhjtd,bjsd->bhts", q_virtual, k_virtual)
        out = _attend(scores, v.repeat_interleave(group, 1), d ** -0.5)
        out = out.transpose(1, 2).reshape(B, T, H * d).to(hidden_states.dtype)
        return attn.o_proj(out), None
    return forward


def patch(model, forwards):
    for layer, forward in zip(model.model.layers, forwards):
        layer.self_attn.forward = forward


def rotations_for(attn, stats, n_kv, d):
    b = attn.k_proj.bias.detach() if attn.k_proj.bias is not None else None
    cov = rope.key_pair_covariance(attn.k_proj.weight.detach(), b, stats.second_moment, stats.mean, n_kv, d)
    return rope.shared_head_rotations(cov)
