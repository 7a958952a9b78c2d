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


class _Body:
    """The nodes of a function body, added as the math reads: `node` returns its one output's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.node("Constant", [], name, value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))


SCALE_GROUP = {"row": None, "q4_0": 32}  # int4 cache scales kept beside the rows: one per row, or per 32 values


def latent_attention_matmul(kv_bits: int, heads: int, latent: int, rope: int,
                            scales: str = "channel") -> onnx.FunctionProto:
    """Body of plain ai.onnx ops that reads the cache once for all heads, for a cache of `kv_bits` (0 = float),
    written for the model's own cache type and widths (a model-local function: one export, one layout).

    The new rows are quantized and written into the cache buffer by ScatterElements at their positions; bound to
    the same buffer as the past, the cache updates in place. Heads are folded into rows, so one MatMul scores every
    head's latent query against the cached rows, q [B, 1, S*H, W] x rows^T [B, 1, W, T], and one more takes the
    attended latent, probs x rows. The cached codes are never scaled: the scales multiply the query and the
    attended latent instead (q . (code * s) = (q * s) . code), folded with the softmax scale into one matrix each
    (onnxruntime folds them at load: one small MatMul per side per layer). An int4 cache is read as its bytes
    x = lo + 16 hi and their high nibbles hi = floor(x / 16) (float, see `_int4_matrices`). Row r = s*H + h sits at
    position positions[s] and sees keys 0 .. positions[s]. The mask and the write positions depend only on
    `positions` and `total_sequence_length`, which every layer shares: onnxruntime computes them once per run.

    scales (int4): "channel": static per-channel scales (cache_scale); the +8 of the stored nibbles shifts every
    score of a row by the same amount (softmax ignores it) and the attended latent by exactly 8. "row" and
    "q4_0": the rows also carry scales of their own, in a second cache buffer (`past_group_scale` [B, 1, L, G]
    float16), by llama.cpp's q4_0 rule (per group, d = the value of largest magnitude / -8, nibble =
    trunc(x / d + 8.5) clipped to 15, x = d (nibble - 8)); "row": one group per row, over the row divided by the
    static per-channel scales (which only even the channels out); "q4_0": groups of 32 values of the row itself,
    llama.cpp's q4_0 cache. Each group's partial score q_g . nibbles_g, less the shift 8 sum(q_g) (a column per
    group in the query matrix), is multiplied by its d and the groups summed; the attended latent likewise
    (weights times d, less 8 d per weight).
    """
    if scales not in ("channel", *SCALE_GROUP):
        raise ValueError(f"cache scales {scales!r}: choose channel, {', '.join(SCALE_GROUP)}")
    width = latent + rope
    grouped = scales != "channel"
    if grouped and kv_bits != 4:
        raise ValueError(f"{scales} cache scales are made for the int4 cache")
    group = SCALE_GROUP.get(scales) or width
    if grouped and width % group:
        raise ValueError(f"q4_0 cache scales need C + R a multiple of {group}, got {width}")
    groups = width // group
    body = _Body()
    nodes, node, const = body.nodes, body.node, body.const

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
    channel = kv_bits and scales != "q4_0"  # static per-channel scales in play
    if channel:
        node("Reshape", ["cache_scale", const("minus1", [-1])], "cs")  # [W]
        node("Mul", ["cs", "softmax_scale"], "cs_scaled")
        node("Slice", ["cs", const("zero1", [0]), const("c1", [latent])], "cs_latent")
    if grouped:  # q4_0's rule per group of the row (over x / s_channel for "row")
        y = node("Div", ["entry", "cs"], "scaled") if channel else "entry"
        yg = node("Reshape", [y, const("group_shape", [0, 0, groups, group])], "y_groups")  # [B, S, G, g]
        node("ArgMax", [node("Abs", [yg], "y_abs")], "peak_at", axis=-1, keepdims=1)
        d = node("Mul", [node("GatherElements", [yg, "peak_at"], "peak", axis=-1),
                         const("per_code_min", -1 / 8, np.float32)], "d")  # [B, S, G, 1]
        inv = node("Where", [node("Equal", [d, const("zero_f", 0.0, np.float32)], "d_zero"),
                             const("zero_f", 0.0, np.float32), node("Reciprocal", [d], "d_inv")], "inv")
        node("Clip", [node("Floor", [node("Add", [node("Mul", [yg, inv], "y_scaled"),
                                                  const("half_up", 8.5, np.float32)], "y_shifted")], "y_floor"),
                      const("nibble_min", 0.0, np.float32), const("nibble_max", 15.0, np.float32)], "nibbles_g")
        nibbles = node("Reshape", ["nibbles_g", const("row_shape", [0, 0, width])], "nibbles")  # code + 8
        node("Cast", [node("Reshape", [d, const("scale_shape", [0, 0, groups])], "d_row")], "d16",
             to=TensorProto.FLOAT16)
    elif kv_bits:
        lo, hi = onnx_quant.CODE_RANGE[kv_bits]
        node("Clip", [node("Round", [node("Div", ["entry", "cs"], "scaled")], "rounded"),
                      const("code_min", lo, np.float32), const("code_max", hi, np.float32)], "codes")
    if kv_bits == 4:  # two nibbles per byte: nibble_2k + 16 nibble_2k+1, each code + 8
        m = _int4_matrices(width, latent)
        if grouped:
            node("MatMul", [nibbles, const("pack", m["pack"], np.float32)], "packed")
        else:
            node("Add", [node("MatMul", ["codes", const("pack", m["pack"], np.float32)], "packed_signed"),
                         const("offset", 8 * 17, np.float32)], "packed")
        node("Cast", ["packed"], "rows_new", to=TensorProto.UINT8)
        # the query's matrix, scales folded in (a constant: folded at load); grouped: + 8 sum(q) per group
        q_pick = m["query"]
        if grouped:
            sums = np.zeros((width, groups), np.float32)
            sums[np.arange(width), np.arange(width) // group] = 8
            q_pick = np.concatenate([q_pick, sums], 1)
        node("Mul", [node("Unsqueeze", ["cs_scaled" if channel else "softmax_scale", const("last", [-1])], "cs_col"),
                     const("q_pick", q_pick, np.float32)], "q_matrix")
        if not grouped:
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
    if grouped:  # the rows' scales: written beside them, read as [B, 1, G, 1, T]
        node("Unsqueeze", ["d16", const("one1", [1])], "d16_4")
        node("Expand", ["positions4", node("Shape", ["d16_4"], "d_shape")], "d_idx")
        node("ScatterElements", ["past_group_scale", "d_idx", "d16_4"], "present_group_scale", axis=2)
        node("Unsqueeze", [node("Transpose", [node("Cast", [
            node("Slice", ["present_group_scale", const("zero1", [0]), "t1", const("two1", [2])], "d_cached16")],
            "d_cached", to=TensorProto.FLOAT)], "d_t", perm=[0, 1, 3, 2]), const("three1", [3])], "d_rows")
    node("Reshape", ["query", const("qshape", [0, 1, -1, width])], "q")  # [B, 1, S*H, W]
    if kv_bits == 4:
        node("Cast", ["cached"], "x", to=TensorProto.FLOAT)
        node("Floor", [node("Mul", ["x", const("sixteenth", 1 / 16, np.float32)], "x16")], "x_hi")
        node("Split", [node("MatMul", ["q", "q_matrix"], "q_both"),
                       const("halves", [width // 2] * 2 + ([groups] if grouped else []))], "q_split", axis=-1)
        nodes[-1].output[:] = ["q_x", "q_hi"] + (["q_shift"] if grouped else [])
    if kv_bits == 4 and grouped:  # per group: [x | hi] against [q_x | q_hi], [B, 1, G, S*H, T]
        half5 = const("half5", [0, 0, 0, groups, group // 2])
        node("Concat", [node("Reshape", ["x", half5], "x_g"), node("Reshape", ["x_hi", half5], "x_hi_g")],
             "kv_g", axis=-1)  # [B, 1, T, G, g]
        node("Concat", [node("Reshape", ["q_x", half5], "q_x_g"), node("Reshape", ["q_hi", half5], "q_hi_g")],
             "q_g", axis=-1)  # [B, 1, S*H, G, g]
        raw = node("MatMul", [node("Transpose", ["q_g"], "q_gt", perm=[0, 1, 3, 2, 4]),
                              node("Transpose", ["kv_g"], "kv_gt", perm=[0, 1, 3, 4, 2])], "scores_g")
        shift = node("Unsqueeze", [node("Transpose", ["q_shift"], "q_shift_t", perm=[0, 1, 3, 2]),
                                   const("last", [-1])], "shift_g")  # [B, 1, G, S*H, 1]
        node("ReduceSum", [node("Mul", [node("Sub", [raw, shift], "scores_g0"), "d_rows"], "scores_gd"),
                           const("two1", [2])], "scores", keepdims=0)
    elif kv_bits == 4:
        node("Add", [node("MatMul", ["q_x", node("Transpose", ["x"], "x_t", perm=[0, 1, 3, 2])], "scores_x"),
                     node("MatMul", ["q_hi", node("Transpose", ["x_hi"], "x_hi_t", perm=[0, 1, 3, 2])], "scores_hi")],
             "scores")
    else:
        node("Cast" if kv_bits else "CastLike", ["cached"] + ([] if kv_bits else ["query"]), "kv",
             **({"to": TensorProto.FLOAT} if kv_bits else {}))
        node("Mul", ["q", "cs_scaled" if kv_bits else "softmax_scale"], "qs")
        node("MatMul", ["qs", node("Transpose", ["kv"], "kv_t", perm=[0, 1, 3, 2])], "scores")
    node("Softmax", [node("Where", ["allowed", "scores", const("neg", -1e30, np.float32)], "masked")], "probs",
         axis=-1)
    if kv_bits == 4 and grouped:  # weights p_t d_t,g against each group's [x | hi], unpacked, less 8 sum(p d)
        w = node("Mul", [node("Unsqueeze", ["probs", const("two1", [2])], "probs5"), "d_rows"], "w_g")
        att = node("MatMul", [w, node("Transpose", ["kv_g"], "kv_g_t", perm=[0, 1, 3, 2, 4])], "att_g")
        unpack = _int4_matrices(group, group)["latent"]  # a group's attended [x | hi] -> its nibbles
        node("Add", [node("MatMul", [att, const("unpack", unpack, np.float32)], "att_nibbles"),
                     node("Mul", [node("ReduceSum", [w, const("last", [-1])], "w_sum", keepdims=1),
                                  const("minus8", -8.0, np.float32)], "att_offset")], "att_codes_g")
        row = node("Reshape", [node("Transpose", ["att_codes_g"], "att_codes_t", perm=[0, 1, 3, 2, 4]),
                               const("qshape", [0, 1, -1, width])], "att_row")  # [B, 1, S*H, W]
        att_latent = node("Slice", [row, const("zero1", [0]), const("c1", [latent]), const("last", [-1])],
                          "att_latent")
        if channel:
            node("Mul", [att_latent, "cs_latent"], "att")
        else:
            node("Identity", [att_latent], "att")
    elif kv_bits == 4:  # the attended [x | hi] -> latent codes + 8 -> latent
        both = node("Concat", [node("MatMul", ["probs", "x"], "att_x"), node("MatMul", ["probs", "x_hi"], "att_hi")],
                    "att_both", axis=-1)
        node("Add", [node("MatMul", [both, "lat_matrix"], "att_scaled"), "lat_bias"], "att")
    elif kv_bits == 8:
        node("MatMul", [node("MatMul", ["probs", "kv"], "att_codes"), "lat_matrix"], "att")
    else:
        node("Slice", [node("MatMul", ["probs", "kv"], "att_all"), const("zero1", [0]), const("c1", [latent]),
                       const("last", [-1])], "att")
    node("Reshape", ["att", const("oshape", [0, -1, heads * latent])], "output")
    return helper.make_function(
        DOMAIN, "LatentAttention", LATENT_INPUTS + (["past_group_scale"] if grouped else []),
        ["output", "present"] + (["present_group_scale"] if grouped else []), _dedupe(nodes),
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


# The expanded form serves prompt chunks of at least this many tokens where the shapes give no crossover of their own
# (see `prefill_threshold`).
PREFILL_ATTRIBUTES = ["num_heads", "num_groups", "latent_dim", "rope_dim", "nope_dim", "head_dim", "scale",
                      "kv_bits"]
PREFILL_INPUTS = ["query", "entry", "past", "seqlens_k", "total_sequence_length", "cache_scale", "positions",
                  "k_up", "v_up"]


def prefill_threshold(heads: int, groups: int, latent: int, rope: int, nope: int, head_dim: int) -> int:
    """Smallest chunk of new tokens for which the expanded form does less arithmetic than the absorbed one.

    Per (query, cached row) pair the absorbed form (GroupQueryAttention over [c | k_rope] as key and value) does
    heads x 2 (C + R) multiply-adds, the expanded one heads x 2 max(N + R, d) (GroupQueryAttention over per-head keys
    [k_nope | k_rope] and values padded to the key width). The expanded form first up-projects every cached row once
    per chunk: groups x C x (N + d). A chunk of S new tokens over T rows: S T pair costs against T up-projections."""
    width = max(nope + rope, head_dim)
    saved = heads * 2 * ((latent + rope) - width)
    if saved <= 0:
        return 1 << 62  # the expanded form never wins: keep the absorbed one
    return max(2, -(-groups * latent * (nope + head_dim) // saved))


def latent_prefill(kv_bits: int, heads: int, groups: int, latent: int, rope: int, nope: int,
                   head_dim: int) -> onnx.FunctionProto:
    """`LatentPrefill`: the same attention as LatentAttention over the same cache, in the expanded form that serves
    prompt chunks (DeepSeek's prefill): the new rows are written into the cache in its code, the T cached rows are
    read back, up-projected to per-group keys [k_up c | k_rope] and values v_up c, and attended by
    GroupQueryAttention with `groups` KV heads, as the original model's attention is. Only the latent is cached.

    Inputs as LatentAttention's but the query per head is [q_nope | q_rope] (N + R, not absorbed) and the
    up-projections k_up [G, N, C] and v_up [G, C, d] come in; output [B, S, heads x d]. The cache codes are those
    GroupQueryAttention writes (int4: code + 8 packed two per byte, low nibble first; int8; or float), so either form
    may continue what the other wrote. Values are zero-padded to the key width where d < N + R
    (GroupQueryAttention needs one head size)."""
    width = latent + rope
    key_width = nope + rope
    if head_dim > key_width:
        raise ValueError(f"the expanded prefill needs the value width ({head_dim}) <= N + R ({key_width})")
    body = _Body()
    nodes, node, const = body.nodes, body.node, body.const

    node("Reshape", [node("Cast", ["total_sequence_length"], "t_any", to=TensorProto.INT64), const("one", [1])], "t1")
    node("Gather", [node("Shape", ["query"], "q_shape"), const("one1", [1])], "s1")
    node("Sub", ["t1", "s1"], "p1")  # rows cached before this chunk
    # the new rows in the cache's code, written at their positions
    if kv_bits:
        node("Reshape", ["cache_scale", const("minus1", [-1])], "cs")  # [W]
        lo, hi = onnx_quant.CODE_RANGE[kv_bits]
        node("Clip", [node("Round", [node("Div", ["entry", "cs"], "scaled")], "rounded"),
                      const("code_min", lo, np.float32), const("code_max", hi, np.float32)], "codes")
    if kv_bits == 4:  # channel pair (2k, 2k+1) -> byte code_2k + 16 code_2k+1 + 8 x 17 (a [2, 1] constant, not [W, W/2])
        pairs_new = node("Reshape", ["codes", const("pair_shape", [0, 0, width // 2, 2])], "code_pairs")
        packed = node("MatMul", [pairs_new, const("pack_pair", [[1.0], [16.0]], np.float32)], "packed_pairs")
        node("Add", [node("Reshape", [packed, const("byte_shape", [0, 0, width // 2])], "packed_signed"),
                     const("offset", 8 * 17, np.float32)], "packed")
        node("Cast", ["packed"], "rows_new", to=TensorProto.UINT8)
    elif kv_bits == 8:
        node("Cast", ["codes"], "rows_new", to=TensorProto.INT8)
    else:
        node("CastLike", ["entry", "past"], "rows_new")
    node("Unsqueeze", ["rows_new", const("one1", [1])], "rows_new4")
    node("Expand", [node("Reshape", ["positions", const("column4", [1, 1, -1, 1])], "positions4"),
                    node("Shape", ["rows_new4"], "rows_shape")], "idx")
    node("ScatterElements", ["past", "idx", "rows_new4"], "present", axis=2)
    # the T cached rows as float [B, 1, T, W]
    cached = node("Slice", ["present", const("zero1", [0]), "t1", const("two1", [2])], "cached")
    if kv_bits == 4:  # byte x = lo + 16 hi -> channels (lo, hi) per byte, then (nibble - 8) x scale
        x = node("Cast", [cached], "x", to=TensorProto.FLOAT)
        x_hi = node("Floor", [node("Mul", [x, const("sixteenth", 1 / 16, np.float32)], "x16")], "x_hi")
        x_lo = node("Sub", [x, node("Mul", [x_hi, const("sixteen", 16.0, np.float32)], "x_hi16")], "x_lo")
        pairs = node("Concat", [node("Unsqueeze", [x_lo, const("last", [-1])], "lo5"),
                                node("Unsqueeze", [x_hi, const("last", [-1])], "hi5")], "pairs", axis=-1)
        nibbles = node("Reshape", [pairs, const("row_shape", [0, 0, 0, width])], "nibbles")
        node("Mul", [node("Sub", [nibbles, const("eight", 8.0, np.float32)], "codes_read"), "cs"], "rows")
    elif kv_bits == 8:
        node("Mul", [node("Cast", [cached], "codes_read", to=TensorProto.FLOAT), "cs"], "rows")
    else:
        node("CastLike", [cached, "query"], "rows")
    node("Split", ["rows", const("split_w", [latent, rope])], "latent_rows", axis=-1)
    nodes[-1].output[:] = ["latent_rows", "rope_rows"]
    # per group: keys [k_up c | k_rope] [B, G, T, N + R], values v_up c [B, G, T, d] (padded to N + R)
    # k_up c as (k_up [G, N, C] x c^T)^T: the weight is used as stored (a transposed copy would be folded into
    # one more constant per layer at load)
    k_nope_t = node("MatMul", ["k_up", node("Transpose", ["latent_rows"], "latent_t", perm=[0, 1, 3, 2])], "k_nope_t")
    k_nope = node("Transpose", [k_nope_t], "k_nope", perm=[0, 1, 3, 2])
    k_rope = node("Expand", ["rope_rows", const("groups_shape", [1, groups, 1, 1])], "k_rope_g")
    keys = node("Concat", [k_nope, k_rope], "keys", axis=-1)
    values = node("MatMul", ["latent_rows", "v_up"], "values")
    if head_dim < key_width:
        values = node("Pad", [values, const("v_pad", [0, 0, 0, 0, 0, 0, 0, key_width - head_dim])], "values_padded")
    split_at = node("Concat", ["p1", "s1"], "split_at", axis=0)
    for part, rows in (("key", keys), ("value", values)):
        node("Split", [rows, split_at], f"past_{part}", axis=2)
        nodes[-1].output[:] = [f"past_{part}", f"new_{part}4"]
        node("Reshape", [node("Transpose", [f"new_{part}4"], f"new_{part}_t", perm=[0, 2, 1, 3]),
                         const("flat3", [0, 0, -1])], f"new_{part}")
    gqa = helper.make_node("GroupQueryAttention",
                           ["query", "new_key", "new_value", "past_key", "past_value", "seqlens_k",
                            "total_sequence_length"], ["y", "y_present_key", "y_present_value"], domain=MS)
    gqa.attribute.extend([_ref("num_heads", "num_heads", onnx.AttributeProto.INT),
                          _ref("kv_num_heads", "num_groups", onnx.AttributeProto.INT),
                          _ref("scale", "scale", onnx.AttributeProto.FLOAT)])
    nodes.append(gqa)
    if head_dim < key_width:
        y4 = node("Reshape", ["y", const("heads4", [0, 0, heads, key_width])], "y4")
        node("Reshape", [node("Slice", [y4, const("zero1", [0]), const("d1", [head_dim]), const("three1", [3])],
                              "y4d"), const("flat3", [0, 0, -1])], "output")
    else:
        node("Identity", ["y"], "output")
    return helper.make_function(
        DOMAIN, "LatentPrefill", PREFILL_INPUTS, ["output", "present"], _dedupe(nodes),
        [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)], attributes=PREFILL_ATTRIBUTES,
        doc_string="MLA attention of a prompt chunk in the expanded form over the latent cache [c | k_rope]: "
                   "rows up-projected per KV group, GroupQueryAttention over them.")
