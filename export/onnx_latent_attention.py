"""The LatentAttention op (ai.edge_mla) and the bodies that stock onnxruntime runs in its place.

`LatentAttention(query [B,S,H(C+R)], entry [B,S,C+R], past [B,1,L,W], seqlens_k [B] int32,
total_sequence_length [] int32, cache_scale [1,1,1,C+R]?) -> (output [B,S,HC], present[, present_alias])`:
softmax(scale q . [c | k_rope]) over the cached rows with value = c, per query head, causal. Each body is a
model-local function (FunctionProto) that onnxruntime inlines; a kernel registered later for
(ai.edge_mla, LatentAttention) would take over with no change to the model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_mla.export import onnx_quant

DOMAIN = "ai.edge_mla"  # the project's own ONNX domain
MS = "com.microsoft"
OPSET = 21  # ai.onnx; onnxruntime >= 1.20 loads it


def _ref(name: str, attr: str, kind) -> onnx.AttributeProto:
    a = helper.make_attribute_ref(name, kind)
    a.ref_attr_name = attr
    return a


LATENT_ATTRIBUTES = ["num_heads", "latent_dim", "rope_dim", "scale", "kv_bits", "kv_quant"]
# positions [1, S] int64: the positions of the new rows (the rotary's); the gqa body derives them itself
LATENT_INPUTS = ["query", "entry", "past", "seqlens_k", "total_sequence_length", "cache_scale", "positions"]


def _attr_vector(out: str, attr: str) -> list[onnx.NodeProto]:
    """[value of the function's int attribute `attr`] as a 1-D tensor (for shapes and slices)."""
    scalar = helper.make_node("Constant", [], [out + "_scalar"], value_int=0)
    scalar.attribute[0].CopyFrom(_ref("value_int", attr, onnx.AttributeProto.INT))
    return [scalar, helper.make_node("Constant", [], [out + "_axes"], value_ints=[0]),
            helper.make_node("Unsqueeze", [out + "_scalar", out + "_axes"], [out])]


def _keep_latent(nodes: list, y: str, out: str) -> None:
    """y [B, S, H*(C+R)] -> out [B, S, H*C]: keep each head's first C channels (the attended latent)."""
    nodes += _attr_vector("heads", "num_heads") + _attr_vector("c", "latent_dim") + [
        helper.make_node("Constant", [], ["zero2"], value_ints=[0, 0]),
        helper.make_node("Constant", [], ["minus1"], value_ints=[-1]),
        helper.make_node("Constant", [], ["zero1"], value_ints=[0]),
        helper.make_node("Constant", [], ["axis3"], value_ints=[3]),
        helper.make_node("Concat", ["zero2", "heads", "minus1"], ["shape4"], axis=0),
        helper.make_node("Reshape", [y, "shape4"], ["y4"]),
        helper.make_node("Slice", ["y4", "zero1", "c", "axis3"], ["y4c"]),
        helper.make_node("Concat", ["zero2", "minus1"], ["shape3"], axis=0),
        helper.make_node("Reshape", ["y4c", "shape3"], [out]),
    ]


def latent_attention_gqa() -> onnx.FunctionProto:
    """Body: com.microsoft GroupQueryAttention with one KV head whose key and value are both [c | k_rope].

    The cache buffer is fed as past_key and past_value; GQA must also produce present_value, which the function
    returns as `present_alias`: bind it (with `present`) to the past buffer and the cache updates in place.
    kv_bits 8/4 with kv_quant PER_CHANNEL keeps an int8 / packed int4 cache with static scales (onnxruntime >= 1.27).
    """
    gqa = helper.make_node(
        "GroupQueryAttention",
        ["query", "entry", "entry", "past", "past", "seqlens_k", "total_sequence_length",
         "", "", "", "", "", "cache_scale", "cache_scale"],
        ["y", "present", "present_alias"], domain=MS, kv_num_heads=1)
    gqa.attribute.extend([
        _ref("num_heads", "num_heads", onnx.AttributeProto.INT),
        _ref("scale", "scale", onnx.AttributeProto.FLOAT),
        _ref("kv_cache_bit_width", "kv_bits", onnx.AttributeProto.INT),
        _ref("k_quant_type", "kv_quant", onnx.AttributeProto.STRING),
        _ref("v_quant_type", "kv_quant", onnx.AttributeProto.STRING),
    ])
    nodes = [gqa]
    _keep_latent(nodes, "y", "output")
    return helper.make_function(
        DOMAIN, "LatentAttention", LATENT_INPUTS, ["output", "present", "present_alias"], nodes,
        [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], attributes=LATENT_ATTRIBUTES,
        doc_string="Absorbed MLA attention over a latent cache [c | k_rope]; value = c. "
                   "Reference body: GroupQueryAttention with kv_num_heads=1.")


def _int4_matrices(width: int, latent: int) -> dict[str, np.ndarray]:
    """Constant matrices of the int4 body (W = width, C = latent, W2 = W / 2; channel pair k = (2k, 2k+1) shares a
    byte: low nibble 2k, high nibble 2k+1, each stored as code + 8).
    pack [W, W2]: codes -> byte value code_2k + 16 code_2k+1;
    query [W, W]: q -> [q_e | q_o - 16 q_e] (times the scales, row by row), the query against [x | hi] where x is
    the byte value lo + 16 hi and hi its high nibble: q_e . lo + q_o . hi = q_e . x + (q_o - 16 q_e) . hi;
    latent [W, C]: the attended [x | hi] -> the attended nibbles lo = x - 16 hi (channel 2k) and hi (channel 2k+1)."""
    half = width // 2
    k = np.arange(half)
    pack = np.zeros((width, half), np.float32)
    pack[2 * k, k], pack[2 * k + 1, k] = 1, 16
    query = np.zeros((width, width), np.float32)
    query[2 * k, k], query[2 * k + 1, half + k], query[2 * k, half + k] = 1, 1, -16
    out = np.zeros((width, width), np.float32)
    out[k, 2 * k], out[half + k, 2 * k], out[half + k, 2 * k + 1] = 1, -16, 1
    return {"pack": pack, "query": query, "latent": out[:, :latent]}


def latent_attention_matmul(kv_bits: int, heads: int, latent: int, rope: int,
                            row_scales: bool = False) -> onnx.FunctionProto:
    """Body of plain ai.onnx ops that reads the cache once for all heads, for a cache of `kv_bits` (0 = float),
    written for the model's own cache type and widths (a model-local function: one export, one layout).

    The new rows are quantized (static per-channel scales) and written into the cache buffer by ScatterElements
    at their positions; bound to the same buffer as the past, the cache updates in place. Heads are folded into
    rows, so one MatMul scores every head's latent query against the cached rows, q [B, 1, S*H, W] x rows^T
    [B, 1, W, T], and one more takes the attended latent, probs x rows. The cached codes are never scaled: the
    scales multiply the query and the attended latent instead (q . (code * s) = (q * s) . code), folded with the
    softmax scale into one matrix each (onnxruntime folds them at load: one small MatMul per side per layer).
    An int4 cache is read as its bytes x = lo + 16 hi and their high nibbles hi = floor(x / 16) (float, see
    `_int4_matrices`). The +8 of the stored nibbles shifts every score of a row by the same amount (softmax ignores
    it) and the attended latent by exactly 8 (the weights sum to one). Row r = s*H + h sits at position
    positions[s] and sees keys 0 .. positions[s]. The mask and the write positions depend only on `positions` and
    `total_sequence_length`, which every layer shares: onnxruntime computes them once per run, not per layer.

    row_scales (int4 only): each row also gets its own scale, kept in a second cache buffer (`past_row_scale`
    [B, 1, L, 1] float32): the static scales only even out the channels (y = x / s_channel), and the row's codes
    are round(y / s_row) with llama.cpp's q4_0 rule s_row = y[argmax |y|] / -8 (the largest value is code -8
    exactly, the rest use all 16 codes), so a row is never clipped. The
    static scales still fold into the query and the latent; s_row multiplies the row's score and its attention
    weight (q . (code * s_row) = s_row (q . code)). The stored +8 then shifts a row's score by 8 s_row sum(q),
    which is no longer the same for every row: it is subtracted (a sum column of the query matrix), as is 8 s_row
    per row from the attended latent (the weights times s_row no longer sum to one).
    """
    if row_scales and kv_bits != 4:
        raise ValueError("per-row cache scales are made for the int4 cache")
    nodes: list[onnx.NodeProto] = []
    width = latent + rope

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(name, value, dtype=np.int64):
        return node("Constant", [], name, value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))

    scale = helper.make_node("Constant", [], ["softmax_scale"], value_float=1.0)
    scale.attribute[0].CopyFrom(_ref("value_float", "scale", onnx.AttributeProto.FLOAT))
    nodes.append(scale)
    # shared by all layers: T, the mask [S*H, T] and the write index
    node("Reshape", [node("Cast", ["total_sequence_length"], "t_any", to=TensorProto.INT64), const("one", [1])], "t1")
    node("Range", [const("zero0", 0), node("Squeeze", ["t1"], "t"), const("one0", 1)], "keys")  # [T]
    rows = node("Reshape", [node("Expand", [node("Reshape", ["positions", const("col", [-1, 1])], "pos_col"),
                                            const("heads_row", [1, heads])], "pos_heads"), const("col", [-1, 1])],
                "row_pos")  # [S*H, 1]: the position of every query row
    node("LessOrEqual", ["keys", rows], "allowed")
    node("Reshape", ["positions", const("column4", [1, 1, -1, 1])], "positions4")
    # the new rows in the cache's code, [B, 1, S, stored width]
    if kv_bits:
        node("Reshape", ["cache_scale", const("minus1", [-1])], "cs")  # [W]
        lo, hi = onnx_quant.CODE_RANGE[kv_bits]
        scaled = node("Div", ["entry", "cs"], "scaled")
        if row_scales:  # s_row = y[argmax |y|] / -8 (q4_0's rule), 1 for a zero row
            node("ArgMax", [node("Abs", [scaled], "scaled_abs")], "row_peak_at", axis=-1, keepdims=1)
            node("Mul", [node("GatherElements", [scaled, "row_peak_at"], "row_peak", axis=-1),
                         const("per_code_min", 1 / lo, np.float32)], "row_s")  # [B, S, 1]
            node("Where", [node("Equal", ["row_s", const("zero_f", 0.0, np.float32)], "row_zero"),
                           const("one_f", 1.0, np.float32), "row_s"], "row_scale_new")
            scaled = node("Div", [scaled, "row_scale_new"], "scaled_row")
        node("Clip", [node("Round", [scaled], "rounded"),
                      const("code_min", lo, np.float32), const("code_max", hi, np.float32)], "codes")
        node("Mul", ["cs", "softmax_scale"], "cs_scaled")
        node("Slice", ["cs", const("zero1", [0]), const("c1", [latent])], "cs_latent")
    if kv_bits == 4:  # two codes per byte: code_2k + 8 + 16 (code_2k+1 + 8)
        m = _int4_matrices(width, latent)
        node("Add", [node("MatMul", ["codes", const("pack", m["pack"], np.float32)], "packed_signed"),
                     const("offset", 8 * 17, np.float32)], "packed")
        node("Cast", ["packed"], "rows_new", to=TensorProto.UINT8)
        # the query's and the latent's matrices, scales folded in (constants: folded at load)
        q_pick = m["query"]
        if row_scales:  # one more column: 8 sum(q * scales), the score shift of the stored +8 before s_row
            q_pick = np.concatenate([q_pick, np.full((width, 1), 8, np.float32)], 1)
        node("Mul", [node("Unsqueeze", ["cs_scaled", const("last", [-1])], "cs_col"),
                     const("q_pick", q_pick, np.float32)], "q_matrix")
        node("Mul", ["cs_latent", const("lat_pick", m["latent"], np.float32)], "lat_matrix")
        node("Mul", ["cs_latent", const("minus8", -8.0, np.float32)], "lat_bias")
    elif kv_bits == 8:
        node("Cast", ["codes"], "rows_new", to=TensorProto.INT8)
        node("Mul", ["cs_latent", const("lat_pick", np.eye(width, latent), np.float32)], "lat_matrix")
    else:
        node("CastLike", ["entry", "past"], "rows_new")
    node("Unsqueeze", ["rows_new", const("one1", [1])], "rows_new4")
    node("Expand", ["positions4", node("Shape", ["rows_new4"], "rows_shape")], "idx")
    node("ScatterElements", ["past", "idx", "rows_new4"], "present", axis=2)
    # the T cached rows [B, 1, T, stored width], as float
    node("Slice", ["present", const("zero1", [0]), "t1", const("two1", [2])], "cached")
    if row_scales:  # the rows' scales: written beside them, read as [B, 1, 1, T]
        node("Unsqueeze", ["row_scale_new", const("one1", [1])], "row_scale_new4")
        node("Expand", ["positions4", node("Shape", ["row_scale_new4"], "row_scale_shape")], "row_idx")
        node("ScatterElements", ["past_row_scale", "row_idx", "row_scale_new4"], "present_row_scale", axis=2)
        node("Reshape", [node("Slice", ["present_row_scale", const("zero1", [0]), "t1", const("two1", [2])],
                              "row_scales_t"), const("row_shape", [0, 1, 1, -1])], "s_rows")
    node("Reshape", ["query", const("qshape", [0, 1, -1, width])], "q")  # [B, 1, S*H, W]
    if kv_bits == 4:
        node("Cast", ["cached"], "x", to=TensorProto.FLOAT)
        node("Floor", [node("Mul", ["x", const("sixteenth", 1 / 16, np.float32)], "x16")], "x_hi")
        node("Split", [node("MatMul", ["q", "q_matrix"], "q_both"),
                       const("halves", [width // 2] * 2 + ([1] if row_scales else []))], "q_split", axis=-1)
        nodes[-1].output[:] = ["q_x", "q_hi"] + (["q_shift"] if row_scales else [])
        node("Add", [node("MatMul", ["q_x", node("Transpose", ["x"], "x_t", perm=[0, 1, 3, 2])], "scores_x"),
                     node("MatMul", ["q_hi", node("Transpose", ["x_hi"], "x_hi_t", perm=[0, 1, 3, 2])], "scores_hi")],
             "scores_codes" if row_scales else "scores")
        if row_scales:
            node("Mul", [node("Sub", ["scores_codes", "q_shift"], "scores_unshifted"), "s_rows"], "scores")
    else:
        node("Cast" if kv_bits else "CastLike", ["cached"] + ([] if kv_bits else ["query"]), "kv",
             **({"to": TensorProto.FLOAT} if kv_bits else {}))
        node("Mul", ["q", "cs_scaled" if kv_bits else "softmax_scale"], "qs")
        node("MatMul", ["qs", node("Transpose", ["kv"], "kv_t", perm=[0, 1, 3, 2])], "scores")
    node("Softmax", [node("Where", ["allowed", "scores", const("neg", -1e30, np.float32)], "masked")], "probs",
         axis=-1)
    if kv_bits == 4:  # the attended [x | hi] -> latent codes + 8 -> latent
        weights = node("Mul", ["probs", "s_rows"], "probs_scaled") if row_scales else "probs"
        both = node("Concat", [node("MatMul", [weights, "x"], "att_x"), node("MatMul", [weights, "x_hi"], "att_hi")],
                    "att_both", axis=-1)
        bias = "lat_bias"
        if row_scales:  # the +8 of each row, times its weight and scale: -8 s_channel sum_t(p_t s_t)
            bias = node("Mul", [node("ReduceSum", [weights, const("last", [-1])], "weight_sum", keepdims=1),
                                "lat_bias"], "lat_bias_rows")
        node("Add", [node("MatMul", [both, "lat_matrix"], "att_scaled"), bias], "att")
    elif kv_bits == 8:
        node("MatMul", [node("MatMul", ["probs", "kv"], "att_codes"), "lat_matrix"], "att")
    else:
        node("Slice", [node("MatMul", ["probs", "kv"], "att_all"), const("zero1", [0]), const("c1", [latent]),
                       const("last", [-1])], "att")
    node("Reshape", ["att", const("oshape", [0, -1, heads * latent])], "output")
    return helper.make_function(
        DOMAIN, "LatentAttention", LATENT_INPUTS + (["past_row_scale"] if row_scales else []),
        ["output", "present"] + (["present_row_scale"] if row_scales else []), _dedupe(nodes),
        [helper.make_opsetid("", OPSET)], attributes=LATENT_ATTRIBUTES,
        doc_string="Absorbed MLA attention over a latent cache [c | k_rope]; value = c. "
                   "Reference body: one MatMul of all heads against the cached rows, one against the latent.")


def _dedupe(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Drop repeated Constant nodes of the same output (each constant defined once, where first used)."""
    seen, out = set(), []
    for n in nodes:
        if n.op_type == "Constant" and n.output[0] in seen:
            continue
        seen.update(n.output)
        out.append(n)
    return out
