"""The decoder as an ONNX graph, layer by layer (onnx_graph.py holds the graph's vocabulary and I/O, onnx_matmul.py
the weights, onnx_latent_attention.py the LatentAttention op): norms, the MLP, the MLA attention (absorbed form,
with the expanded prefill as a second branch) and the original's GroupQueryAttention, then `build_model`."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_mla.export.onnx_graph import (IR_VERSION, Decoder, Graph, Options, cache_tensors, layer_cache_tensors,
                                        prefill_form, prefill_from)
from edge_mla.export.onnx_latent_attention import (DOMAIN, MS, OPSET, latent_attention_gqa, latent_attention_matmul,
                                                   latent_prefill)
from edge_mla.export.onnx_matmul import embedding, matmul, up_projection


def _rms_norm(g: Graph, x: str, w: np.ndarray, eps: float, name: str) -> str:
    """RMSNorm from plain ops in the pattern onnxruntime fuses into one SimplifiedLayerNormalization kernel
    (Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul); used where there is no residual to fuse with."""
    var = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0, np.float32)]), g.const([-1])], keepdims=1)
    normed = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
    return g.op("Mul", [normed, g.weight(name, w.astype(np.float32))])


def _latent_norm(g: Graph, x: str, w: np.ndarray, eps: float, channels: int, name: str) -> str:
    """RMSNorm of the latent x [B, S, C'] over its first C = `channels` (the rest is zero padding), as a plain
    RMSNorm over all C' (one fused kernel in onnxruntime): with s = the sum of squares (the padding adds nothing),
    s / C + eps = (C' / C) (s / C' + eps C / C'), so w / sqrt(s / C + eps) = w sqrt(C / C') / sqrt(s / C' + eps'),
    eps' = eps C / C'."""
    width = len(w)
    return _rms_norm(g, x, w * np.sqrt(channels / width), eps * channels / width, name)


def _head_norm(g: Graph, x: str, w: np.ndarray, eps: float, d: int, name: str) -> str:
    """RMSNorm of every d-wide head of x [B, S, heads * d]."""
    heads = g.op("Reshape", [x, g.const([0, 0, -1, d])])
    return g.op("Reshape", [_rms_norm(g, heads, w, eps, name), g.const([0, 0, -1])])


def _skip_norm(g: Graph, x: str, residual: str, w: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual) in one com.microsoft kernel."""
    outs = [g.fresh(name + "/out"), g.fresh(name + "/sum")]
    g.op("SkipSimplifiedLayerNormalization", [x, residual, g.weight(name, w.astype(np.float32))],
         [outs[0], "", "", outs[1]], domain=MS, name=name, epsilon=eps)
    return outs[0], outs[1]


def _mlp(g: Graph, x: str, layer: dict, i: int, opts: Options) -> str:
    gate_up = matmul(g, x, [layer["gate"], layer["up"]], f"layers.{i}.mlp.gate_up", opts)
    f = layer["gate"].shape[0]
    gate, up = g.op("Split", [gate_up, g.const([f, f])], 2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
    return matmul(g, act, layer["down"], f"layers.{i}.mlp.down", opts)


class _Rope:
    """com.microsoft RotaryEmbedding (NEOX halves) with cos/sin tables per distinct set of layer frequencies."""

    def __init__(self, g: Graph, positions: str, max_positions: int, scaling: float):
        self.g, self.positions, self.max_positions, self.scaling = g, positions, max_positions, scaling
        self.tables = {}

    def __call__(self, x: str, inv_freq: np.ndarray) -> str:
        """Rotate x [B, S, heads * R] (each head's R channels) at the current positions."""
        key = inv_freq.astype(np.float32).tobytes()
        if key not in self.tables:
            angles = np.arange(self.max_positions, dtype=np.float64)[:, None] * inv_freq.astype(np.float32)[None]
            n = len(self.tables)
            self.tables[key] = (self.g.weight(f"rope.cos.{n}", (np.cos(angles) * self.scaling).astype(np.float32)),
                                self.g.weight(f"rope.sin.{n}", (np.sin(angles) * self.scaling).astype(np.float32)))
        cos, sin = self.tables[key]
        return self.g.op("RotaryEmbedding", [x, self.positions, cos, sin], domain=MS, interleaved=0)


def _mla_attention(g: Graph, x: str, layer: dict, i: int, dec: Decoder, opts: Options, rope: _Rope,
                   seqlens_k: str, total: str, long_chunk: str) -> str:
    """The MLA layer's attention; `long_chunk` (bool) picks the expanded prefill form over the absorbed one."""
    H, G, N, R, C = dec.num_heads, dec.num_groups, dec.nope_dim, dec.rope_dim, dec.latent_dim
    # one projection, rows [q_nope of every head | q_rope of every head | latent | rope key]
    w_q = layer["q"].reshape(H, N + R, -1)
    w = np.concatenate([w_q[:, :N].reshape(H * N, -1), w_q[:, N:].reshape(H * R, -1), layer["kv_a"]])
    b = None
    if layer.get("q_bias") is not None:
        b_q = layer["q_bias"].reshape(H, N + R)
        b = np.concatenate([b_q[:, :N].ravel(), b_q[:, N:].ravel(), layer["kv_a_bias"]])
    proj = matmul(g, x, w, f"layers.{i}.attn.q_kv_a", opts, b)
    q_nope, q_rope, latent, k_rope = g.op("Split", [proj, g.const([H * N, H * R, C, R])], 4, axis=-1)
    if dec.latent_norm_eps is not None:
        latent = _latent_norm(g, latent, layer["latent_norm"], dec.latent_norm_eps[i], dec.latent_channels,
                              f"layers.{i}.attn.latent_norm")
    q_rope = rope(q_rope, layer["inv_freq"])
    entry = g.op("Concat", [latent, rope(k_rope, layer["inv_freq"])], axis=-1)
    k_up = up_projection(g, f"layers.{i}.attn.k_up", layer["k_up"], opts)
    v_up = up_projection(g, f"layers.{i}.attn.v_up", np.ascontiguousarray(layer["v_up"].transpose(0, 2, 1)), opts)
    quantized = opts.kv_bits in (4, 8)
    cache_in = [f"past.{i}", seqlens_k, total,
                g.weight(f"layers.{i}.attn.cache_scale", opts.cache_scales[i].astype(np.float32)) if quantized else "",
                rope.positions]
    layer_cache = layer_cache_tensors(dec, opts, i)
    presents = [name for t in layer_cache for name in t["present"]]

    def absorbed(out: str, presents: list[str]) -> None:
        # q_lat = k_up[g]^T q_nope for every head of group g: [B,S,G,H/G,N] x [G,N,C]
        grouped = g.op("Reshape", [q_nope, g.const([0, 0, G, H // G, N])])
        q_lat = g.op("MatMul", [grouped, k_up], name=f"layers.{i}.attn.absorb_k")
        q_heads = g.op("Reshape", [q_rope, g.const([0, 0, G, H // G, R])])
        query = g.op("Reshape", [g.op("Concat", [q_lat, q_heads], axis=-1), g.const([0, 0, H * (C + R)])])
        latent_out = g.fresh(f"layers.{i}.attn/latent")
        # declared, so that ONNX shape inference can go on past a node whose body it cannot see into
        g.value_info.append(helper.make_tensor_value_info(latent_out, TensorProto.FLOAT, ["batch", "sequence", H * C]))
        g.op("LatentAttention", [query, entry] + cache_in + [t["past"] for t in layer_cache[1:]],
             [latent_out] + presents, domain=DOMAIN, name=f"layers.{i}.attn.latent_attention",
             num_heads=H, latent_dim=C, rope_dim=R, scale=float(dec.softmax_scale),
             kv_bits=opts.kv_bits if quantized else 0,
             kv_quant={"channel": "PER_CHANNEL", "row": "PER_ROW", "q4_0": "Q4_0"}[opts.cache_scales_mode]
             if quantized else "NONE")
        # out_h = v_up[g] attended_h: [B,S,G,H/G,C] x [G,C,d]
        att = g.op("Reshape", [latent_out, g.const([0, 0, G, H // G, C])])
        g.op("Reshape", [g.op("MatMul", [att, v_up], name=f"layers.{i}.attn.absorb_v"),
                         g.const([0, 0, H * dec.head_dim])], [out])

    def expanded(out: str, presents: list[str]) -> None:
        q_heads = g.op("Concat", [g.op("Reshape", [q_nope, g.const([0, 0, H, N])]),
                                  g.op("Reshape", [q_rope, g.const([0, 0, H, R])])], axis=-1)
        query = g.op("Reshape", [q_heads, g.const([0, 0, H * (N + R)])])
        present = g.fresh(f"layers.{i}.attn/present")
        g.op("LatentPrefill", [query, entry] + cache_in + [k_up, v_up], [out, present], domain=DOMAIN,
             name=f"layers.{i}.attn.latent_prefill", num_heads=H, num_groups=G, latent_dim=C, rope_dim=R,
             nope_dim=N, head_dim=dec.head_dim, scale=float(dec.softmax_scale),
             kv_bits=opts.kv_bits if quantized else 0)
        for name in presents:
            g.op("Identity", [present], [name])

    out = g.fresh(f"layers.{i}.attn/heads")
    if prefill_form(dec, opts) == "absorbed":
        absorbed(out, presents)
    else:  # prompt chunks of at least the threshold run the expanded form, shorter ones (decode) the absorbed
        types = [helper.np_dtype_to_tensor_dtype(np.dtype(t["dtype"])) for t in layer_cache for _ in t["present"]]
        g.op("If", [long_chunk], [out] + presents, name=f"layers.{i}.attn.form",
             then_branch=_branch(g, f"layers.{i}.expanded", expanded, types),
             else_branch=_branch(g, f"layers.{i}.absorbed", absorbed, types))
    if layer.get("v_up_bias") is not None:
        out = g.op("Add", [g.op("Reshape", [out, g.const([0, 0, G, H // G, dec.head_dim])]),
                           g.weight(f"layers.{i}.attn.v_up_bias", layer["v_up_bias"][:, None, :])])
        out = g.op("Reshape", [out, g.const([0, 0, H * dec.head_dim])])
    return matmul(g, out, layer["o"], f"layers.{i}.attn.o", opts, layer.get("o_bias"))


def _branch(g: Graph, name: str, body, cache_types: list[int]) -> onnx.GraphProto:
    """A subgraph of If: the nodes `body(out, presents)` adds (weights and shared values from the outer scope)."""
    outer = g.nodes, g.value_info
    g.nodes, g.value_info = [], []
    outs = [g.fresh(f"{name}/out")] + [g.fresh(f"{name}/present") for _ in cache_types]
    try:
        body(outs[0], outs[1:])
        nodes, value_info = g.nodes, g.value_info
    finally:
        g.nodes, g.value_info = outer
    types = [TensorProto.FLOAT] + cache_types
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types)],
                             value_info=value_info)


def _gqa_attention(g: Graph, x: str, layer: dict, i: int, dec: Decoder, opts: Options, rope: tuple[str, str],
                   seqlens_k: str, total: str) -> str:
    H, K, d = dec.num_heads, dec.kv_heads, dec.head_dim
    w = np.concatenate([layer["q"], layer["k"], layer["v"]])
    b = None if layer.get("q_bias") is None else np.concatenate([layer["q_bias"], layer["k_bias"], layer["v_bias"]])
    qkv = matmul(g, x, w, f"layers.{i}.attn.qkv", opts, b)
    q, k, v = g.op("Split", [qkv, g.const([H * d, K * d, K * d])], 3, axis=-1)
    if layer.get("q_norm") is not None:  # per-head RMSNorm before the rotary (Qwen3)
        q = _head_norm(g, q, layer["q_norm"], dec.eps, d, f"layers.{i}.attn.q_norm")
        k = _head_norm(g, k, layer["k_norm"], dec.eps, d, f"layers.{i}.attn.k_norm")
    quantized = opts.kv_bits in (4, 8)
    rotary = layer.get("rotary", True)  # SmolLM3's NoPE layers: no rotation
    inputs = [q, k, v, f"past_key.{i}", f"past_value.{i}", seqlens_k, total, *(rope if rotary else ("", ""))]
    attrs = dict(num_heads=H, kv_num_heads=K, scale=float(dec.softmax_scale), do_rotary=int(rotary),
                 local_window_size=-1)
    if quantized:
        ks, vs = opts.cache_scales[i]
        inputs += ["", "", "", g.weight(f"layers.{i}.attn.k_scale", ks.astype(np.float32)),
                   g.weight(f"layers.{i}.attn.v_scale", vs.astype(np.float32))]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=opts.kv_bits)
    out = g.fresh(f"layers.{i}.attn/out")
    g.op("GroupQueryAttention", inputs, [out, f"present_key.{i}", f"present_value.{i}"], domain=MS,
         name=f"layers.{i}.attn.gqa", **attrs)
    return matmul(g, out, layer["o"], f"layers.{i}.attn.o", opts, layer.get("o_bias"))


def build_model(dec: Decoder, opts: Options, data=None) -> onnx.ModelProto:
    """The decoder's graph; with `data` (an open binary file), its weights written there as they are made, one
    layer in memory at a time when dec.layers reads them so."""
    g = Graph(data)
    V = dec.vocab_size
    ids = "input_ids"
    g.inputs += [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                 helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
                 helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [])]
    for t in cache_tensors(dec, opts):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(t["dtype"]))
        shape = ["batch", t["heads"], "cache_capacity", t["width"]]
        g.inputs.append(helper.make_tensor_value_info(t["past"], elem, shape))
        for name in t["present"]:
            g.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    # Lengths and positions: GQA's seqlens_k = tokens so far - 1 per row, total = mask length; positions of the
    # new tokens are the last S of 0..T-1 (batch rows without left padding).
    seqlens_k = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const([1])], keepdims=0),
                                           g.const(1)])], to=TensorProto.INT32, name="seqlens_k")
    total64 = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    total = g.op("Cast", [total64], to=TensorProto.INT32, name="total_sequence_length")
    new = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)

    x, head = embedding(g, dec, opts, ids)

    if dec.kind == "mla":  # positions of the new tokens: past .. past + S - 1, as [1, S] (batch rows share them)
        positions = g.op("Range", [g.op("Sub", [total64, new]), total64, g.const(1)])
        pos = _Rope(g, g.op("Unsqueeze", [positions, g.const([0])], name="position_ids"), dec.max_positions,
                    dec.rope_scaling)
        # whether this run's chunk of new tokens is long enough for the expanded prefill (decided once per run)
        long_chunk = g.op("GreaterOrEqual", [new, g.const(prefill_from(dec))], name="long_chunk")
    else:
        freqs = np.arange(dec.max_positions, dtype=np.float32)[:, None] * dec.inv_freq.astype(np.float32)[None]
        rope = (g.weight("cos_cache", np.cos(freqs) * dec.rope_scaling), g.weight("sin_cache", np.sin(freqs) * dec.rope_scaling))

    residual, h, mlp_out = x, None, None
    for i, layer in enumerate(dec.layers):
        if i == 0:
            h = _rms_norm(g, x, layer["input_norm"], dec.eps, f"layers.{i}.input_norm")
        else:
            h, residual = _skip_norm(g, mlp_out, residual, layer["input_norm"], dec.eps, f"layers.{i}.input_norm")
        if dec.kind == "mla":
            att = _mla_attention(g, h, layer, i, dec, opts, pos, seqlens_k, total, long_chunk)
        else:
            att = _gqa_attention(g, h, layer, i, dec, opts, rope, seqlens_k, total)
        h, residual = _skip_norm(g, att, residual, layer["post_norm"], dec.eps, f"layers.{i}.post_norm")
        mlp_out = _mlp(g, h, layer, i, opts)
    h, _ = _skip_norm(g, mlp_out, residual, dec.final_norm, dec.eps, "final_norm")
    # logits only for the last `logits_to_keep` positions (1 when generating; S for perplexity)
    keep = g.op("Neg", [g.op("Unsqueeze", ["logits_to_keep", g.const([0])])])
    h = g.op("Slice", [h, keep, g.const([np.iinfo(np.int64).max]), g.const([1])])
    head = head(h) if head else matmul(g, h, dec.lm_head, "lm_head", opts)
    g.op("Identity", [head], ["logits"])
    g.outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", V]))

    graph = helper.make_graph(g.nodes, "edge_mla_decoder", g.inputs, g.outputs, g.initializers,
                              value_info=g.value_info)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    functions = []
    if dec.kind == "mla":
        opsets.append(helper.make_opsetid(DOMAIN, 1))
        quantized = opts.kv_bits in (4, 8)
        functions.append(latent_attention_gqa() if opts.body == "gqa" else
                         latent_attention_matmul(opts.kv_bits if quantized else 0, dec.num_heads, dec.latent_dim,
                                                 dec.rope_dim, scales=opts.cache_scales_mode))
        if prefill_form(dec, opts) == "expanded":
            functions.append(latent_prefill(opts.kv_bits if quantized else 0, dec.num_heads, dec.num_groups,
                                            dec.latent_dim, dec.rope_dim, dec.nope_dim, dec.head_dim))
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=IR_VERSION,
                             producer_name="edge-mla")
