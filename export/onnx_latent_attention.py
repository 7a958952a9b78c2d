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

from edge_mla.export.onnx_cache_codecs import codec_for

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


class _Body:
    """The nodes of a function body, added as the math reads: `node` returns its one output's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def const(self, name: str, value, dtype=np.int64) -> str:
        return self.node("Constant", [], name, value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))


def latent_attention_matmul(kv_bits: int, heads: int, latent: int, rope: int,
                            scales: str = "channel") -> onnx.FunctionProto:
    """Body of plain ai.onnx ops that reads the cache once for all heads, for a cache of `kv_bits` (0 = float) with
    `scales` (onnx_cache_codecs.py: how each cache type writes, scores and attends), written for the model's own
    cache type and widths (a model-local function: one export, one layout).

    The new rows are written into the cache buffer by ScatterElements at their positions; bound to the same buffer
    as the past, the cache updates in place. Heads are folded into rows, so one MatMul scores every head's latent
    query against the cached rows, q [B, 1, S*H, W] x rows^T [B, 1, W, T], and one more takes the attended latent,
    probs x rows; the codec's scales multiply the query and the attended latent, folded with the softmax scale into
    one matrix each (onnxruntime folds them at load). Row r = s*H + h sits at position positions[s] and sees keys
    0 .. positions[s]. The mask and the write positions depend only on `positions` and `total_sequence_length`,
    which every layer shares: onnxruntime computes them once per run.
    """
    codec = codec_for(kv_bits, latent, rope, scales)
    width = latent + rope
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
    codec.prepare(body, decode=True)
    cached = _write_rows(body, codec)
    node("Reshape", ["query", const("qshape", [0, 1, -1, width])], "q")  # [B, 1, S*H, W]
    scores = codec.scores(body, cached)
    node("Softmax", [node("Where", ["allowed", scores, const("neg", -1e30, np.float32)], "masked")], "probs", axis=-1)
    node("Reshape", [codec.attend(body), const("oshape", [0, -1, heads * latent])], "output")
    return helper.make_function(
        DOMAIN, "LatentAttention", LATENT_INPUTS + list(codec.extra_inputs),
        ["output", "present"] + list(codec.extra_outputs), _dedupe(nodes),
        [helper.make_opsetid("", OPSET)], attributes=LATENT_ATTRIBUTES,
        doc_string="Absorbed MLA attention over a latent cache [c | k_rope]; value = c. "
                   "Reference body: one MatMul of all heads against the cached rows, one against the latent.")


def _write_rows(body: _Body, codec) -> str:
    """The new rows in the cache's code, scattered into the bound buffer at their positions ("positions4"); returns
    the T cached rows [B, 1, T, stored width] ("t1" = T)."""
    node, const = body.node, body.const
    node("Unsqueeze", [codec.write(body), const("one1", [1])], "rows_new4")
    node("Expand", ["positions4", node("Shape", ["rows_new4"], "rows_shape")], "idx")
    node("ScatterElements", ["past", "idx", "rows_new4"], "present", axis=2)
    return node("Slice", ["present", const("zero1", [0]), "t1", const("two1", [2])], "cached")


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
    key_width = nope + rope
    if head_dim > key_width:
        raise ValueError(f"the expanded prefill needs the value width ({head_dim}) <= N + R ({key_width})")
    body = _Body()
    nodes, node, const = body.nodes, body.node, body.const

    node("Reshape", [node("Cast", ["total_sequence_length"], "t_any", to=TensorProto.INT64), const("one", [1])], "t1")
    node("Gather", [node("Shape", ["query"], "q_shape"), const("one1", [1])], "s1")
    node("Sub", ["t1", "s1"], "p1")  # rows cached before this chunk
    # the new rows in the cache's code, written at their positions; the T cached rows back as float [B, 1, T, W]
    codec = codec_for(kv_bits, latent, rope)
    codec.prepare(body, decode=False)
    node("Reshape", ["positions", const("column4", [1, 1, -1, 1])], "positions4")
    codec.read(body, _write_rows(body, codec))
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
