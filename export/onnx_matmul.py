"""The decoder's weights as ONNX nodes: MatMulNBits over llama.cpp's q4_0 / q8_0 grids (or onnxruntime's HQQ), float
MatMuls, the 3-D up-projections widened by DequantizeLinear, and the embedding that shares the output head's
quantized table (GatherBlockQuantized). Each matrix is quantized and written a piece at a time (onnx_graph.Graph's
data file), so the export holds one layer in memory (docs/scale.md)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edge_mla.export import onnx_quant
from edge_mla.export.onnx_graph import Decoder, Graph, Options
from edge_mla.export.onnx_latent_attention import MS


PIECE_VALUES = 1 << 20  # a matrix is quantized and written this many values (4 MB of float32) at a time


def float32(x) -> np.ndarray:
    """A numpy array, torch tensor or the torch slice of a layerwise.Rows as float32 numpy (no copy if it is one)."""
    return x.astype(np.float32, copy=False) if isinstance(x, np.ndarray) else x.float().numpy()


def row_pieces(w, rows: int | None = None):
    """w [N, K] (numpy, torch or layerwise.Rows) in blocks of rows, float32."""
    rows = rows or max(1, PIECE_VALUES // w.shape[1])
    for r in range(0, w.shape[0], rows):
        yield float32(w[r:r + rows])


def nbits_weight(g: Graph, name: str, parts: list, bits: int, opts: Options, method: str = "rtn") -> list[str]:
    """MatMulNBits' B, scales (and zero points) for the matrices `parts` [N_i, K] stacked along N, quantized and
    written in row pieces: the float matrix is never copied whole."""
    K, N = parts[0].shape[1], sum(p.shape[0] for p in parts)
    bs = opts.block_size
    blocks = -(-K // bs)
    scales, zeros = [], []

    def packed():
        for part in parts:
            for piece in row_pieces(part):
                if method == "hqq":
                    codes, s, z = onnx_quant.hqq_codes(piece, bits, bs)
                    scales.append(s), zeros.append(z)
                    yield codes
                    continue
                codes, s, z = onnx_quant.block_codes(piece, bits, bs, opts.symmetric)
                scales.append(s)
                if z is not None:
                    zeros.append(onnx_quant.pack(z, bits))
                yield onnx_quant.pack(codes, bits)

    inputs = [g.tensor(f"{name}.weight_Q{bits}", TensorProto.UINT8, [N, blocks, bs * bits // 8], packed()),
              g.weight(f"{name}.weight_scales", np.concatenate(scales))]
    if zeros:
        inputs.append(g.weight(f"{name}.weight_zero_points", np.concatenate(zeros)))
    return inputs


def matmul_nbits(g: Graph, x: str, inputs: list[str], K: int, N: int, bits: int, name: str, opts: Options) -> str:
    level = {"accuracy_level": opts.accuracy_level} if opts.accuracy_level else {}
    return g.op("MatMulNBits", [x, *inputs], name=name, domain=MS, K=K, N=N, bits=bits, block_size=opts.block_size,
                **level)


def matmul(g: Graph, x: str, w, name: str, opts: Options, bias: np.ndarray | None = None) -> str:
    """x @ w.T (+ bias); w [out, in], or a list of such matrices stacked along `out` (never concatenated when
    quantized). 4/8-bit weights become MatMulNBits, packed here; float ones are stored transposed ([in, out]) as
    MatMul B."""
    parts = w if isinstance(w, list) else [w]
    bits = (opts.head_bits or opts.weight_bits) if name == "lm_head" else opts.weight_bits
    if bits:
        method = opts.method if bits == 4 and name != "lm_head" else "rtn"
        K, N = parts[0].shape[1], sum(p.shape[0] for p in parts)
        y = matmul_nbits(g, x, nbits_weight(g, name, parts, bits, opts, method), K, N, bits, name, opts)
    else:
        wt = np.ascontiguousarray(np.concatenate([float32(p[:]) for p in parts]).T)
        if opts.fp16_weights:
            b = g.op("Cast", [g.weight(name + ".weight", wt.astype(np.float16))], to=TensorProto.FLOAT,
                     name=name + "/cast")
        else:
            b = g.weight(name + ".weight", wt)
        y = g.op("MatMul", [x, b], name=name)
    if bias is not None:
        y = g.op("Add", [y, g.weight(name + ".bias", bias.astype(np.float32))], name=name + "/bias")
    return y


def up_projection(g: Graph, name: str, w: np.ndarray, opts: Options) -> str:
    """A per-group up-projection [G, K, M] (x [.., K] @ w[g]) at the weights' precision: int4/int8 blocks of
    `block_size` along K through DequantizeLinear (MatMulNBits takes 2D weights only), on llama.cpp's q4_0 / q8_0
    grids (onnx_quant.block_codes), so the recovery's q4_0 training serves both runtimes; fp16 through a Cast.
    onnxruntime folds either into a float constant at load (the runner asks it to fold DequantizeLinear too)."""
    w = w.astype(np.float32)
    if opts.up_bits == 16:
        return g.op("Cast", [g.weight(name, w.astype(np.float16))], to=TensorProto.FLOAT, name=name + "/cast")
    if opts.up_bits not in (4, 8):
        return g.weight(name, w)
    G, K, M = w.shape
    codes, scales, _ = onnx_quant.block_codes(w.transpose(0, 2, 1).reshape(G * M, K), opts.up_bits,
                                              opts.block_size)  # blocks along K
    blocks = scales.shape[1]
    signed = codes.reshape(G, M, -1)[:, :, :K].transpose(0, 2, 1).astype(np.int16) - 2 ** (opts.up_bits - 1)
    if opts.up_bits == 4:  # two per byte, low nibble first
        raw = onnx_quant.pack((signed & 15).astype(np.uint8).ravel(), 4)
        codes_name = g.tensor(name + ".codes", TensorProto.INT4, signed.shape, [raw])
    else:
        codes_name = g.weight(name + ".codes", signed.astype(np.int8))
    scale = np.ascontiguousarray(scales.reshape(G, M, blocks).transpose(0, 2, 1))
    return g.op("DequantizeLinear", [codes_name, g.weight(name + ".scales", scale)],
                axis=1, block_size=opts.block_size, name=name + "/dequantize")


def embedding(g: Graph, dec: Decoder, opts: Options, ids: str):
    """The token lookup [B, S, E], and, when the output head shares its table, a function h -> logits over it.
    Tied weights are stored once: as the float table (the head reads it transposed; onnxruntime folds the
    Transpose), or, quantized and symmetric, as the head's MatMulNBits blocks, which GatherBlockQuantized reads
    (both quantize each vocabulary row in blocks along E: the head's packed rows [V, blocks, bytes] are the
    embedding's, one scale per block). An untied table under 4-bit weights is int4 GatherBlockQuantized (q4_0
    blocks); otherwise float. Every table is written in row pieces."""
    V, E = dec.embed.shape
    bs = opts.block_size
    if opts.weight_bits and dec.tied and opts.symmetric:
        bits = opts.head_bits or opts.weight_bits
        inputs = nbits_weight(g, "lm_head", [dec.lm_head], bits, opts)
        scales = g.op("Reshape", [inputs[1], g.const([V, -(-E // bs), 1])], name="embed_tokens/scales")
        rows = g.op("GatherBlockQuantized", [inputs[0], ids, scales], domain=MS, name="embed_tokens", bits=bits,
                    block_size=bs, gather_axis=0, quantize_axis=2)
        x = g.op("Reshape", [rows, g.const([0, 0, E])], name="embed_tokens/rows")
        return x, lambda h: matmul_nbits(g, h, inputs, E, V, bits, "lm_head", opts)
    if opts.weight_bits == 4 and E % bs == 0:
        scales = []

        def signed():  # INT4 codes of the q4_0 grid: the unsigned code - 8 is its nibble with the top bit flipped
            for piece in row_pieces(dec.embed):
                codes, s, _ = onnx_quant.block_codes(piece, 4, bs)
                scales.append(s)
                yield onnx_quant.pack(codes.reshape(len(piece), E) ^ 8, 4)

        table = g.tensor("embed_tokens.weight_Q4", TensorProto.INT4, [V, E], signed())
        x = g.op("GatherBlockQuantized", [table, ids, g.weight("embed_tokens.weight_scales", np.concatenate(scales))],
                 domain=MS, name="embed_tokens", gather_axis=0, quantize_axis=1, block_size=bs)
        return x, None
    dtype = np.float16 if opts.fp16_weights else np.float32
    table = g.tensor("embed_tokens.weight", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [V, E],
                     (piece.astype(dtype) for piece in row_pieces(dec.embed)))
    x = g.op("Gather", [table, ids], name="embed_tokens")
    if opts.fp16_weights:
        table = g.op("Cast", [table], to=TensorProto.FLOAT)
        x = g.op("Cast", [x], to=TensorProto.FLOAT)
    if not (dec.tied and not opts.weight_bits):
        return x, None
    return x, lambda h: g.op("MatMul", [h, g.op("Transpose", [table], perm=[1, 0])], name="lm_head")
