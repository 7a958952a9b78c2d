"""Exact transforms of an MLA block's latent, which the recovery applies before it trains: an orthogonal rotation
(c -> Q c, the up-projections turned back, so the block computes the same in float; a Hadamard within each q4_0
block makes a blockwise 4-bit cache lose less, docs/recovery.md) and a learned latent RMSNorm that starts nearly
linear (llama.cpp's deepseek2 has one)."""
from __future__ import annotations

import math

import torch

from edge_mla import q4_0
from edge_mla.mla import MLAAttention, mla_layers


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix, n a power of two."""
    if n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def block_hadamard(n: int, block: int = q4_0.BLOCK) -> torch.Tensor:
    """Hadamard within each q4_0 block: spreads outliers over their block, keeps blocks' magnitudes apart."""
    return torch.block_diag(*[hadamard(block)] * (n // block))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_latent(attn: MLAAttention, rotation: torch.Tensor) -> None:
    """c -> Q c for an orthogonal Q (C x C): the latent rows of kv_a become Q W_dkv and the up-projections
    W_up Q^T, so k_nope and v are unchanged; only what the cache holds (and how it rounds) changes."""
    C = attn.latent_dim
    q = rotation.to(torch.float64)
    w = attn.kv_a_proj.weight
    w[:C] = (q @ w[:C].double()).to(w.dtype)
    if attn.kv_a_proj.bias is not None:
        b = attn.kv_a_proj.bias
        b[:C] = (q @ b[:C].double()).to(b.dtype)
    attn.k_up.copy_(torch.einsum("gnc,dc->gnd", attn.k_up.double(), q).to(attn.k_up.dtype))
    attn.v_up.copy_(torch.einsum("gnc,dc->gnd", attn.v_up.double(), q).to(attn.v_up.dtype))


# The latent norm's eps over the latent's median mean square on calibration text: with eps = 10 x that, a typical
# token's scale changes by under 5% when its mean square halves or doubles, so the norm starts nearly linear
# (measured: a plain norm, eps = the model's, costs 6% perplexity after recovery, docs/recovery.md).
LATENT_NORM_SOFTNESS = 10.0


@torch.no_grad()
def install_latent_norm(attn: MLAAttention, x: torch.Tensor, softness: float = LATENT_NORM_SOFTNESS) -> float:
    """Give the block a latent RMSNorm, fitted to its inputs x [n, T, E]: eps = softness x the latent's median mean
    square (nearly linear), weight = the mean of sqrt(mean(c^2) + eps) so a typical token keeps its size; the block
    starts close to what it computed and training makes up the rest. Returns eps."""
    from torch import nn

    C = attn.latent_dim
    mean_squares = torch.cat([attn.kv_a_proj(x[i:i + 1].to(attn.kv_a_proj.weight.dtype))[..., :C].double().pow(2)
                              .mean(-1).flatten() for i in range(x.shape[0])])
    eps = float(softness * mean_squares.median()) or float(attn.model_eps)
    norm = nn.RMSNorm(C, eps=eps).to(device=attn.kv_a_proj.weight.device, dtype=attn.kv_a_proj.weight.dtype)
    norm.weight.fill_(float((mean_squares + eps).sqrt().mean()))
    attn.latent_norm = norm
    return eps


def install_latent_norms(model, inputs: list[torch.Tensor], softness: float = LATENT_NORM_SOFTNESS) -> None:
    """A latent RMSNorm in every MLA block (install_latent_norm); the eps per layer is recorded in config.mla so the
    saved folder and the exporters know. inputs: per layer, the block's inputs [n, T, E] (collect_attention_io)."""
    model.config.mla["latent_norm_eps"] = [install_latent_norm(attn, x, softness)
                                           for attn, x in zip(mla_layers(model), inputs)]
