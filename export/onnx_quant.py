"""Weight quantization (MatMulNBits through onnxruntime.quantization) and static cache scales calibrated on text."""
from __future__ import annotations

import logging

import numpy as np
import onnx

# The cache kernels round to nearest even and clamp to these code ranges (symmetric, static scales).
CODE_RANGE = {8: (-128, 127), 4: (-8, 7)}


def quantize_weights(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                     head_bits: int | None = None, method: str = "rtn", share_embedding: bool = False
                     ) -> onnx.ModelProto:
    """Every 2D MatMul weight to MatMulNBits (`bits`; round-to-nearest, or HQQ's optimized float zero points),
    and the output head to `head_bits` when given. The embedding reads the head's quantized table when
    `share_embedding` (tied weights, symmetric), else it becomes GatherBlockQuantized int4 (4-bit only).
    The 3D absorbed up-projections stay float (small, per group)."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as q
    except ImportError as err:
        raise ValueError(f"{bits}-bit weights need onnxruntime.quantization, which failed to import ({err}). "
                         "Install its dependencies: pip install onnx-ir ml_dtypes") from None
    # the quantizer logs one INFO line per weight; keep the export quiet
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    absorbed = [name for name in matmuls if ".absorb_" in name]
    # Each pass names the nodes it must leave alone: the quantizer takes a node that is in nodes_to_include OR
    # of a listed op type, so an include list alone would quantize every MatMul in the head's pass.
    passes = []  # (bits, op types, nodes to exclude, RTN or HQQ)
    head_apart = bool(head_bits and head_bits != bits)
    if head_apart:
        passes.append((head_bits, ("MatMul",), [m for m in matmuls if m != "lm_head"], "rtn"))
    if bits == 4 and not share_embedding:
        passes.append((4, ("Gather",), [], "rtn"))
    passes.append((bits, ("MatMul",), absorbed + (["lm_head"] if head_apart else []), method))
    for nbits, op_types, exclude, algo in passes:
        if algo == "hqq":
            config = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=nbits, op_types_to_quantize=op_types)
        else:
            config = q.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                                    accuracy_level=accuracy_level, bits=nbits,
                                                    op_types_to_quantize=op_types)
        quantizer = q.MatMulNBitsQuantizer(model, bits=nbits, block_size=block_size, is_symmetric=symmetric,
                                           accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                           op_types_to_quantize=op_types, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    if algo == "hqq":  # HQQ leaves accuracy_level unset: int8 activations are what makes CPU decode fast
        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return share_head_table(model) if share_embedding else model


def share_head_table(model: onnx.ModelProto) -> onnx.ModelProto:
    """Tied weights stored once: the embedding Gather becomes a GatherBlockQuantized over the output head's
    MatMulNBits table. Both quantize each vocabulary row in blocks along the hidden size, so the head's packed
    rows [V, blocks, bytes] are the embedding's, with one scale per block ([V, blocks] -> [V, blocks, 1])."""
    from onnx import helper, numpy_helper

    graph = model.graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head"))
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if len(head.input) > 3 and head.input[3]:
        raise ValueError("sharing the embedding needs a symmetric head (no zero points)")
    table, scales = head.input[1], head.input[2]
    i, gather = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Gather" and n.name == "embed_tokens")
    vocab, blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
    shapes = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
              [("embed_tokens.scale_shape", [vocab, blocks, 1]), ("embed_tokens.row_shape", [0, 0, attrs["K"]])]]
    graph.initializer.extend(shapes)
    nodes = [helper.make_node("Reshape", [scales, shapes[0].name], ["embed_tokens/scales"], name="embed_tokens/scales"),
             helper.make_node("GatherBlockQuantized", [table, gather.input[1], "embed_tokens/scales"],
                              ["embed_tokens/blocks"], name="embed_tokens", domain="com.microsoft", bits=attrs["bits"],
                              block_size=attrs["block_size"], gather_axis=0, quantize_axis=2),
             helper.make_node("Reshape", ["embed_tokens/blocks", shapes[1].name], list(gather.output),
                              name="embed_tokens/rows")]
    del graph.node[i]
    for node in reversed(nodes):
        graph.node.insert(i, node)
    unused = [t for t in graph.initializer if t.name == gather.input[0]]
    for t in unused:
        graph.initializer.remove(t)
    return model


def fake_quantize(x: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = CODE_RANGE[bits]
    return np.clip(np.rint(x / scale), lo, hi) * scale


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
