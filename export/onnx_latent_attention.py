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
        DOMAIN, "LatentAttention",
        ["query", "entry", "past", "seqlens_k", "total_sequence_length", "cache_scale"],
        ["output", "present", "present_alias"], nodes,
        [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], attributes=LATENT_ATTRIBUTES,
        doc_string="Absorbed MLA attention over a latent cache [c | k_rope]; value = c. "
                   "Reference body: GroupQueryAttention with kv_num_heads=1.")


def latent_attention_matmul(kv_bits: int) -> onnx.FunctionProto:
    """Body of plain ai.onnx ops that reads the cache once for all heads, for a cache of `kv_bits` (0 = float).

    The new rows are quantized (static per-channel scales) and written into the cache buffer by ScatterElements
    at positions P .. P+S-1 (P = total - S); bound to the same buffer as the past, the cache updates in place.
    Heads are folded into rows, so one MatMul scores every head's latent query against the cached rows,
    q [B, S*H, W] x rows^T [B, W, T], and one more takes the attended latent, probs x rows. The cached codes are
    never scaled: the scales multiply the query and the attended latent instead (q . (code * s) = (q * s) . code).
    An int4 cache is read as its bytes x = lo + 16 hi and their high nibbles hi (float): for the query's even
    (low-nibble) channels q_e and odd ones q_o, q . code = q_e . x + (q_o - 16 q_e) . hi, and the attended
    nibbles are probs x x - 16 probs x hi (low) and probs x hi (high). The +8 of the stored nibbles shifts every
    score of a row by the same amount (softmax ignores it) and the attended latent by exactly 8 (the weights sum
    to one). No per-element unpacking: onnxruntime's Gather, Floor and Concat on the cache were much slower.
    Row r = s*H + h sits at position P + s and sees keys 0 .. P+s.
    The body is written for the model's own `kv_bits` (a model-local function: one export, one cache type).
    """
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(name, **value):
        return node("Constant", [], name, **value)

    scale = helper.make_node("Constant", [], ["softmax_scale"], value_float=1.0)
    scale.attribute[0].CopyFrom(_ref("value_float", "scale", onnx.AttributeProto.FLOAT))
    nodes += _attr_vector("heads", "num_heads") + _attr_vector("c", "latent_dim") + _attr_vector("r", "rope_dim")
    nodes.append(scale)
    for name, v in [("zero1", [0]), ("one1", [1]), ("two1", [2]), ("minus1", [-1])]:
        const(name, value_ints=v)
    const("zero0", value_int=0), const("one0", value_int=1), const("two0", value_int=2), const("neg", value_float=-1e30)
    const("scalar_shape", value=onnx.numpy_helper.from_array(np.zeros(0, np.int64)))
    # widths from the attributes (constants: onnxruntime folds these at load)
    node("Add", ["c", "r"], "w")
    node("Concat", ["zero1", "minus1", "w"], "qshape", axis=0)
    node("Concat", ["zero1", "minus1", node("Mul", ["heads", "c"], "hc")], "oshape", axis=0)
    # lengths: T = total, S = new rows, P = T - S cached before them
    node("Reshape", [node("Cast", ["total_sequence_length"], "t_any", to=TensorProto.INT64), "scalar_shape"], "t")
    node("Gather", [node("Shape", ["entry"], "entry_shape"), "one0"], "s", axis=0)
    node("Sub", ["t", "s"], "p")
    # the new rows in the cache's code, [B, 1, S, stored width]
    if kv_bits:
        node("Reshape", ["cache_scale", "minus1"], "cs")  # [W]
        lo, hi = onnx_quant.CODE_RANGE[kv_bits]
        const("code_min", value_float=float(lo)), const("code_max", value_float=float(hi))
        node("Clip", [node("Round", [node("Div", ["entry", "cs"], "scaled")], "rounded"), "code_min", "code_max"],
             "codes")
    if kv_bits == 4:  # two codes per byte, low nibble first, stored as code + 8
        const("pair_shape", value_ints=[0, 0, -1, 2]), const("eight", value_float=8.0)
        const("nibbles", value_floats=[1.0, 16.0])
        node("Reshape", [node("Add", ["codes", "eight"], "unsigned"), "pair_shape"], "pairs")
        node("ReduceSum", [node("Mul", ["pairs", "nibbles"], "weighted"), "minus1"], "packed", keepdims=0)
        node("Cast", ["packed"], "rows_new", to=TensorProto.UINT8)
    elif kv_bits == 8:
        node("Cast", ["codes"], "rows_new", to=TensorProto.INT8)
    else:
        node("CastLike", ["entry", "past"], "rows_new")
    node("Unsqueeze", ["rows_new", "one1"], "rows_new4")
    const("column", value_ints=[1, 1, -1, 1])
    node("Reshape", [node("Range", ["p", "t", "one0"], "positions"), "column"], "positions4")
    node("Expand", ["positions4", node("Shape", ["rows_new4"], "rows_shape")], "idx")
    node("ScatterElements", ["past", "idx", "rows_new4"], "present", axis=2)
    # the T cached rows as float codes (int) or values (float): [B, T, W]
    node("Slice", ["present", "zero1", node("Unsqueeze", ["t", "zero1"], "t1"), "two1"], "cached")
    node("Squeeze", ["cached", "one1"], "cached3")
    if kv_bits == 4:  # bytes x [B, T, W/2] and their high nibbles
        const("four", value=onnx.numpy_helper.from_array(np.array(4, np.uint8))), const("sixteen", value_float=16.0)
        node("Cast", ["cached3"], "x", to=TensorProto.FLOAT)
        node("Cast", [node("BitShift", ["cached3", "four"], "high", direction="RIGHT")], "x_hi", to=TensorProto.FLOAT)
    elif kv_bits == 8:
        node("Cast", ["cached3"], "kv", to=TensorProto.FLOAT)
    else:
        node("CastLike", ["cached3", "query"], "kv")
    # q [B, S*H, W] x the softmax scale (x the cache scales), in the cache's channel order
    node("Reshape", ["query", "qshape"], "q")
    if kv_bits:  # (a product of constants, folded at load)
        node("Mul", ["q", node("Mul", ["cs", "softmax_scale"], "cs_scaled")], "qs_c")
    else:
        node("Mul", ["q", "softmax_scale"], "qs")
    if kv_bits == 4:  # scores = q_e . x + (q_o - 16 q_e) . hi
        const("big", value_ints=[1 << 62])
        node("Slice", ["qs_c", "zero1", "big", "minus1", "two1"], "q_e")  # channels 0, 2, 4, ..
        node("Slice", ["qs_c", "one1", "big", "minus1", "two1"], "q_o")  # channels 1, 3, 5, ..
        node("Sub", ["q_o", node("Mul", ["q_e", "sixteen"], "q_e16")], "q_hi")
        node("Add", [node("MatMul", ["q_e", node("Transpose", ["x"], "x_t", perm=[0, 2, 1])], "scores_x"),
                     node("MatMul", ["q_hi", node("Transpose", ["x_hi"], "x_hi_t", perm=[0, 2, 1])], "scores_hi")],
             "scores")
    else:
        q_final = "qs_c" if kv_bits else "qs"
        node("MatMul", [q_final, node("Transpose", ["kv"], "kv_t", perm=[0, 2, 1])], "scores")
    # causal mask: row r (position P + r // H) sees keys 0 .. P + r // H
    node("Gather", [node("Shape", ["q"], "q_shape"), "one0"], "rows", axis=0)
    node("Add", [node("Div", [node("Range", ["zero0", "rows", "one0"], "row_ids"), "heads"], "r_step"), "p"], "r_pos")
    node("LessOrEqual", [node("Range", ["zero0", "t", "one0"], "keys"), node("Unsqueeze", ["r_pos", "one1"], "r_col")],
         "allowed")  # [S*H, T]
    node("Softmax", [node("Where", ["allowed", "scores", "neg"], "masked")], "probs", axis=-1)
    if kv_bits == 4:  # attended nibbles: low = probs x x - 16 probs x hi, high = probs x hi; interleaved again
        node("MatMul", ["probs", "x_hi"], "att_hi")
        node("Sub", [node("MatMul", ["probs", "x"], "att_x"), node("Mul", ["att_hi", "sixteen"], "att_hi16")],
             "att_lo")
        node("Concat", [node("Unsqueeze", ["att_lo", "minus1"], "att_lo4"),
                        node("Unsqueeze", ["att_hi", "minus1"], "att_hi4")], "att_pairs", axis=-1)
        node("Reshape", ["att_pairs", "qshape"], "att_all")  # [B, S*H, W] codes + 8
        node("Sub", [node("Slice", ["att_all", "zero1", "c", "two1"], "att_c8"), "eight"], "att")
    else:
        node("MatMul", ["probs", "kv"], "att_all")  # [B, S*H, W]; the value is the latent, the first C channels
        node("Slice", ["att_all", "zero1", "c", "two1"], "att")
    if kv_bits:
        node("Mul", ["att", node("Slice", ["cs", "zero1", "c", "zero1"], "cs_latent")], "att_s")
    node("Reshape", ["att_s" if kv_bits else "att", "oshape"], "output")
    return helper.make_function(
        DOMAIN, "LatentAttention",
        ["query", "entry", "past", "seqlens_k", "total_sequence_length", "cache_scale"],
        ["output", "present"], nodes, [helper.make_opsetid("", OPSET)], attributes=LATENT_ATTRIBUTES,
        doc_string="Absorbed MLA attention over a latent cache [c | k_rope]; value = c. "
                   "Reference body: one MatMul of all heads against the cached rows, one against the latent.")
