"""llama.cpp's q4_0, the project's one 4-bit rule: blocks of 32 numbers, each with a float16 scale d = (the signed
value of largest magnitude) / -8 and codes trunc(x / d + 8.5) clipped to 0..15, bit for bit as gguf-py's
quants.quantize/dequantize(Q4_0). The recovery and the fine-tune train through its round trip (the cache and the
weights the runtimes will hold, straight-through), and the ONNX exporter stores MatMulNBits codes on the same grid
(export/onnx_quant.block_codes), so both runtimes ship the weights the training saw."""
from __future__ import annotations

import torch

BLOCK = 32


def codes(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (n a multiple of `block`) -> (codes [..., n / block, block] uint8 0..15, scales [..., n / block]
    float32 holding float16 values). Computed in float32 with the multiply and the add as two ops (no fused
    multiply-add), as numpy and gguf-py do."""
    if x.shape[-1] % block:
        raise ValueError(f"q4_0 needs rows that are a multiple of {block} numbers, got {x.shape[-1]}")
    blocks = x.detach().float().reshape(*x.shape[:-1], -1, block)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = peak / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15)
    return q.to(torch.uint8), d.half().float()[..., 0]


def roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x quantized to q4_0 and back along its last dim, in x's dtype."""
    q, d = codes(x)
    return (d[..., None] * (q.float() - 8)).reshape(x.shape).to(x.dtype)


def straight_through(fn):
    """`fn` in the forward, identity in the backward (straight-through estimator): training through a quantizer.
    The forward value is fn(x) bit for bit (x + (fn(x) - x).detach() would round)."""
    class StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return fn(x)

        @staticmethod
        def backward(ctx, grad):
            return grad
    return StraightThrough.apply


def neox_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Rope dims laid out NEOX (pair j = dims j, j + R/2) -> interleaved (2j, 2j + 1), llama.cpp's NORM layout:
    what llama.cpp caches, so which values share a q4_0 block."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.stack([x1, x2], -1).flatten(-2)


def interleaved_to_neox(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.cat([pairs[..., 0], pairs[..., 1]], -1)


def rope_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """q4_0 round trip of a NEOX rope vector as llama.cpp stores it: blocks of 32 over interleaved pairs."""
    return interleaved_to_neox(roundtrip(neox_to_interleaved(x)))


def mla_cache(latent_dim: int, rope: bool = True):
    """The q4_0 round trip of llama.cpp's MLA cache row [c | k_pe] (its k_pe is interleaved); rope=False keeps the
    rope key as is (a 16-bit rope-key cache beside a 4-bit latent, which ONNX can do and llama.cpp cannot)."""
    if latent_dim % BLOCK:
        raise ValueError(f"q4_0 needs a latent width that is a multiple of {BLOCK}, got {latent_dim}")

    def apply(entry):
        latent, k_rope = entry[..., :latent_dim], entry[..., latent_dim:]
        return torch.cat([roundtrip(latent), rope_roundtrip(k_rope) if rope else k_rope], -1)
    return apply
