"""Activation statistics of the original model on calibration text, one pass, per attention layer.

Everything later steps need comes from the attention input x (after input_layernorm):
- E[x x^T] (float64): activation-aware low rank and the shared-rope-head PCA use it;
- mean 2-norm of every RoPE frequency pair of every query head and KV head: the 2-norm selection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from edge_mla import shape


@dataclass
class LayerStats:
    xx_sum: torch.Tensor  # (E, E) float64, sum of x x^T
    x_sum: torch.Tensor  # (E,) float64
    count: int
    q_pair_norm_sum: torch.Tensor  # (H, d/2) sum over tokens of |q pair|
    k_pair_norm_sum: torch.Tensor  # (n_kv, d/2)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.xx_sum / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / max(self.count, 1)

    def pair_scores(self, heads_per_group: int) -> torch.Tensor:
        """MHA2MLA's 2-norm score per KV head and pair: mean|q| x mean|k|, summed over the group's query heads."""
        q = self.q_pair_norm_sum / self.count
        k = self.k_pair_norm_sum / self.count
        q_group = q.view(k.shape[0], heads_per_group, -1)
        return (q_group * k[:, None, :]).sum(1)


def _pair_norms(t: torch.Tensor, heads: int) -> torch.Tensor:
    """|pair| summed over tokens, NEOX pairs (i, i + d/2): [tokens, heads*d] -> [heads, d/2]."""
    t = t.view(t.shape[0], heads, 2, -1)
    return t.pow(2).sum(2).sqrt().sum(0)


def new_stats(config) -> LayerStats:
    E, d = config.hidden_size, shape.head_dim(config)
    return LayerStats(torch.zeros(E, E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64), 0,
                      torch.zeros(config.num_attention_heads, d // 2, dtype=torch.float64),
                      torch.zeros(config.num_key_value_heads, d // 2, dtype=torch.float64))


def stats_hook(s: LayerStats, attn, config):
    """A forward pre-hook on an attention block that adds its input's statistics to `s`."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        x = x.reshape(-1, x.shape[-1])
        x64 = x.double().cpu()  # statistics live on the CPU in float64, whatever device the model runs on
        s.xx_sum += x64.T @ x64
        s.x_sum += x64.sum(0)
        s.count += x.shape[0]
        s.q_pair_norm_sum += _pair_norms(attn.q_proj(x).double(), n_heads).cpu()
        s.k_pair_norm_sum += _pair_norms(attn.k_proj(x).double(), n_kv).cpu()
    return hook


@torch.no_grad()
def layer_stats(walk, i: int, key: str = "calibration") -> LayerStats:
    """Statistics of layer i (loaded) over the walk's `key` windows; the walk moves on past the layer."""
    layer = walk.model.model.layers[i]
    s = new_stats(walk.model.config)
    hook = stats_hook(s, layer.self_attn, walk.model.config)
    walk.run(i, lambda k, layer: [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)] if k == key
             else [])
    return s


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, desc: str = "calibrating") -> list[LayerStats]:
    """Run the original model over token windows [n, T], layer by layer, and gather per-layer attention-input
    statistics (the same numbers as hooks on a whole-model forward: layerwise.layer_arguments)."""
    from edge_mla.layerwise import Walk

    walk = Walk(model, None, {"calibration": windows})
    return [layer_stats(walk, i) for i in tqdm(range(len(model.model.layers)), desc=desc, unit="layer", leave=False)]
