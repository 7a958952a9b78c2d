"""Weight quantization in MatMulNBits' block layout (llama.cpp's q4_0 / q8_0 grids) and static cache scales
calibrated on text."""
from __future__ import annotations

import logging

import numpy as np

# The cache kernels round to nearest even and clamp to these code ranges (symmetric, static scales).
CODE_RANGE = {8: (-128, 127), 4: (-8, 7)}


def block_codes(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of w [N, K] quantized in blocks of `block_size` along K (the last block zero-padded), as MatMulNBits
    stores them: (codes [N, blocks, block_size] uint8, unsigned; scales [N, blocks] float32; zero points
    [N, blocks] uint8, or None for symmetric blocks, whose zero point is 2^(bits-1)). Each row on its own, so a
    matrix quantized in row pieces gives the same codes.

    Symmetric blocks are llama.cpp's own grids, so both runtimes ship the same weights, the ones the recovery
    trained through: 4-bit is q4_0 (edge_mla/q4_0.py, the rule the recovery trains through), 8-bit is q8_0
    (d = max |x| / 127, codes x / d rounded half away from zero, + 128, computed with d in float32; d stored
    rounded to float16, as the GGUF block holds it). Asymmetric
    blocks span [min(x, 0), max(x, 0)] with an integer zero point, as onnxruntime's quantizer does."""
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    blocks = -(-K // block_size)
    x = np.pad(w, ((0, 0), (0, blocks * block_size - K))).reshape(N, blocks, block_size)
    top = 2 ** bits - 1
    with np.errstate(divide="ignore"):
        if symmetric and bits == 4:  # the project's one q4_0 rule (edge_mla/q4_0.py)
            import torch

            from edge_mla import q4_0
            codes, scales = (t.numpy() for t in q4_0.codes(torch.from_numpy(x.reshape(N, -1)), block_size))
            return codes, scales, None
        if symmetric:
            d = np.abs(x).max(-1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            codes = _round_half_away(x * inv) + 128
        else:
            low, high = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
            d = (high - low) / np.float32(top)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            zero = np.where(d == 0, 2 ** (bits - 1), np.rint(-low * inv)).clip(0, top)
            codes = np.rint(x * inv + zero).clip(0, top)
    scales = (d.astype(np.float16).astype(np.float32) if symmetric else d)[..., 0]
    return codes.astype(np.uint8), scales, None if symmetric else zero[..., 0].astype(np.uint8)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf, as ggml's q8_0 rounds (halves away from zero), computed as gguf-py does it: adding 0.5 first
    would round 0.49999997 up in float32."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., n] -> bytes, two 4-bit codes per byte (low nibble first; an odd count padded with 0)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], -1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def hqq_codes(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HQQ's optimized scales and float zero points for w [N, K] (onnxruntime.quantization's HQQ, run over a
    one-node graph holding just this weight): (packed [N, blocks, bytes], scales [N * blocks], zero points)."""
    from onnx import TensorProto, helper, numpy_helper

    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as q
    except ImportError as err:
        raise ValueError(f"--weight-method hqq needs onnxruntime.quantization, which failed to import ({err}). "
                         "Install its dependencies: pip install onnx-ir ml_dtypes") from None
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    N, K = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="m")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    config = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
    quantizer = q.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, op_types_to_quantize=("MatMul",),
                                       algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    node = next(n for n in out.graph.node if n.op_type == "MatMulNBits")
    init = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    return tuple(init[name] for name in node.input[1:4])


def fake_quantize(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = CODE_RANGE[bits]
    return np.clip(np.rint(x / scale), lo, hi) * scale


def group_fake_quantize(x: np.ndarray, group: int, channel_scale: np.ndarray | None = None) -> np.ndarray:
    """The round trip of the matmul body's int4 cache with scales kept per row: q4_0's rule (gguf-py's, bit for
    bit) on every `group` values of the last axis, over x / channel_scale when given (`--kv-scales row`: one group
    per row over the static per-channel scales; `--kv-scales q4_0`: groups of 32 of x itself)."""
    y = (x / channel_scale if channel_scale is not None else x).astype(np.float32)
    g = y.reshape(*y.shape[:-1], -1, group)
    d = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    nibbles = np.clip(np.trunc(g * inv + np.float32(8.5)), 0, 15)
    out = (d.astype(np.float16).astype(np.float32) * (nibbles - 8)).reshape(y.shape)
    return out * channel_scale if channel_scale is not None else out


def channel_scales(samples: np.ndarray, bits: int, groups: np.ndarray) -> np.ndarray:
    """Static per-channel scales for `samples` [tokens, channels]: per group of channels (a rope pair shares one,
    since rotation mixes its two channels), the clipping level among 20 fractions of the group's max |x| that
    gives the least squared error after quantization."""
    _, hi = CODE_RANGE[bits]
    scales = np.ones(samples.shape[1], np.float32)
    for group in np.unique(groups):
        cols = np.flatnonzero(groups == group)
        x = samples[:, cols].astype(np.float64)
        top = np.abs(x).max()
        if top == 0:
            continue  # a padding channel: always zero, any scale is exact
        best, best_err = top / hi, np.inf
        for frac in np.linspace(0.25, 1.0, 20):
            s = top * frac / hi
            err = np.square(fake_quantize(x, s, bits) - x).sum()
            if err < best_err:
                best, best_err = s, err
        scales[cols] = best
    return scales


def pair_groups(width: int, rope_start: int, rope_dim: int) -> np.ndarray:
    """Channel group ids: each channel alone, except rope pairs p and p + R/2 (NEOX) which share a group."""
    groups = np.arange(width)
    half = rope_dim // 2
    for p in range(half):
        groups[rope_start + half + p] = rope_start + p
    return groups
