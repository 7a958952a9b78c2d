"""The decoder as an ONNX graph, built node by node (no tracing); the LatentAttention op and its bodies live in
onnx_latent_attention.py.

Graph I/O (batch 1 is what the runner uses; the graph keeps batch symbolic):
  input_ids [B, S] int64, attention_mask [B, T] int64 (ones; T = past + S), logits_to_keep [] int64
  -> logits [B, logits_to_keep, V], and per layer the cache tensors (see `cache_tensors`).

MLA layer (absorbed form): one fused projection gives [q (per head N nope | R rope) | latent C | rope key R];
q_lat = k_up[g]^T q_nope per head (a batched MatMul over KV groups); RoPE on q_rope and on the rope key
(com.microsoft RotaryEmbedding, each layer with its own frequencies); then ONE node `LatentAttention` attends over the
cached [c | k_rope] rows with value = c; v_up per head, then o_proj.

The baseline (an unconverted model) is the same graph with standard GroupQueryAttention over separate K and V
caches and GQA's own rotary, which is how onnxruntime-genai's model builder exports Llama.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_mla.export import onnx_quant
from edge_mla.export.onnx_cache_codecs import SCALE_GROUP
from edge_mla.export.onnx_latent_attention import (DOMAIN, MS, OPSET, latent_attention_gqa,
                                                   latent_attention_matmul, latent_prefill, prefill_threshold)

IR_VERSION = 10  # onnxruntime 1.31 refuses newer IR versions written by onnx 1.23

# Cache dtypes: numbers per stored element and the ONNX element type. int4 is packed two per uint8.
CACHE_TYPES = {
    32: ("float32", TensorProto.FLOAT, 1),
    16: ("float16", TensorProto.FLOAT16, 1),
    8: ("int8", TensorProto.INT8, 1),
    4: ("uint8", TensorProto.UINT8, 2),
}


# Initializers under INLINE_BELOW bytes stay in model.onnx (onnx.save_model's size_threshold); larger ones start on
# an ALIGNMENT boundary of the data file when over ALIGN_ABOVE bytes (page-aligned, so a runtime may map them; 64 KiB
# is the largest gap onnx's external-data rules accept).
INLINE_BELOW, ALIGN_ABOVE, ALIGNMENT = 1024, 1 << 20, 1 << 16


class Graph:
    """Collects nodes and initializers; `op` returns output names, so the graph reads like the math.

    Given an open `data` file, every initializer's bytes are written there as it is made (an external-data
    reference stays in the proto), so a model larger than memory is written one tensor, or one piece of a tensor,
    at a time; without one the initializers are kept in the proto."""

    def __init__(self, data=None, location: str = "model.onnx.data"):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.data, self.location = data, location

    def fresh(self, hint: str) -> str:
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def op(self, op_type: str, inputs, outputs: int | list[str] = 1, domain: str = "", name: str | None = None,
           **attrs):
        base = name or op_type
        outs = outputs if isinstance(outputs, list) else [self.fresh(f"{base}/out") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(base), domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        return self.tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, [array])

    def tensor(self, name: str, elem_type: int, dims, pieces) -> str:
        """An initializer whose raw bytes are the concatenated bytes of `pieces` (arrays, made one after the other:
        the row blocks of a large matrix are written as they come and released)."""
        dims = [int(d) for d in dims]
        count = int(np.prod(dims, dtype=np.int64))
        nbytes = (count + 1) // 2 if elem_type in (TensorProto.INT4, TensorProto.UINT4) else \
            count * helper.tensor_dtype_to_np_dtype(elem_type).itemsize
        t = onnx.TensorProto(name=name, data_type=elem_type, dims=dims)
        if self.data is None or nbytes < INLINE_BELOW:
            t.raw_data = b"".join(np.ascontiguousarray(p).tobytes() for p in pieces)
            written = len(t.raw_data)
        else:
            offset = self.data.tell()
            if nbytes > ALIGN_ABOVE and offset % ALIGNMENT:
                self.data.write(bytes(ALIGNMENT - offset % ALIGNMENT))
                offset = self.data.tell()
            for piece in pieces:
                self.data.write(np.ascontiguousarray(piece).data)
            written = self.data.tell() - offset
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.location), ("offset", offset), ("length", nbytes)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
        if written != nbytes:
            raise AssertionError(f"initializer {name}: {written} bytes written for shape {dims}, expected {nbytes}")
        self.initializers.append(t)
        return name

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), array)
        return self._consts[key]


# ---------------------------------------------------------------------------------------------------------------
# The decoder.

@dataclass
class Decoder:
    """Everything the graph needs, as numpy arrays in the [out, in] layout of torch Linear weights."""
    kind: str  # "mla" or "baseline"
    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int  # value width per head (d)
    eps: float
    embed: np.ndarray  # [V, E] (or a torch tensor, or layerwise.Rows: read in row pieces)
    final_norm: np.ndarray
    lm_head: np.ndarray  # [V, E], likewise
    tied: bool = False  # lm_head is the embedding table: stored once
    layers: list[dict] = field(default_factory=list)  # or any sized iterable (one layer in memory at a time)
    softmax_scale: float = 1.0
    rope_scaling: float = 1.0  # factor on cos and sin
    # MLA
    num_groups: int = 0
    nope_dim: int = 0
    rope_dim: int = 0
    latent_dim: int = 0  # C as exported (padded so that C + R suits the attention kernel)
    latent_rotation: np.ndarray | None = None  # orthogonal Q: the cache holds Q c (None: c itself)
    latent_norm_eps: list | None = None  # per layer, a learned latent RMSNorm (layer["latent_norm"]) over the
    latent_channels: int = 0  # ... first latent_channels (C before padding); None: no latent norm
    # baseline
    kv_heads: int = 0
    inv_freq: np.ndarray | None = None
    max_positions: int = 0

    @property
    def cache_width(self) -> int:
        """Numbers per cached token per layer per cache tensor (per KV head for the baseline)."""
        return self.latent_dim + self.rope_dim if self.kind == "mla" else self.head_dim


@dataclass
class Options:
    kv_bits: int = 32
    body: str = "gqa"  # LatentAttention body: "gqa" (GroupQueryAttention) or "matmul" (all heads in one MatMul)
    fp16_weights: bool = False  # store float weights as fp16 (a Cast to fp32 that onnxruntime folds at load)
    cache_scales: list | None = None  # per layer: MLA [1,1,1,W]; baseline (k [1,kvH,1,d], v [1,kvH,1,d])
    cache_scales_mode: str = "channel"  # MLA int4 cache, matmul body: also "row" or "q4_0" scales kept per row
    prefill: str = "expanded"  # MLA prompt chunks: "expanded" (LatentPrefill where it pays) or "absorbed"
    up_bits: int = 32  # MLA k_up / v_up: 8 (or 4) bits in blocks of block_size, 16 or 32 (float)
    block_size: int = 32
    # 2D weights: 4 or 8 = MatMulNBits (onnx_quant.block_codes: llama.cpp's q4_0 / q8_0 grids when symmetric);
    # 0 = float (fp16_weights says which). A tied embedding is one table with the head (float, or the head's
    # MatMulNBits blocks read by GatherBlockQuantized when symmetric); an untied one is int4 GatherBlockQuantized
    # under 4-bit weights, float otherwise.
    weight_bits: int = 0
    head_bits: int = 0  # the output head's bits (and a shared table's); 0: weight_bits
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations
    method: str = "rtn"  # 4-bit layer weights: rtn, or hqq (onnx_quant.hqq_codes; the head stays rtn)


def scale_groups(dec: Decoder, mode: str) -> int:
    """Scales kept per cached row: one ("row") or one per 32 values ("q4_0")."""
    group = SCALE_GROUP[mode] or dec.cache_width
    return dec.cache_width // group


def prefill_chunk(dec: Decoder, opts: Options) -> int | None:
    """The runner's prompt tokens per run for this export, where its default (128) does not suit. The expanded
    prefill up-projects every cached row once per chunk, so longer chunks pay: 256-token chunks read a 4K prompt at
    315 tok/s against 194 for 128 and 155 for 64, for 11 MB more peak (docs/onnx.md). The q4_0 cache's absorbed body
    keeps one score matrix per 32 values (6 for C + R = 192), and 32-token chunks held a 4K prompt's peak at 354 MB
    instead of 626 MB, prefilling as fast (docs/onnx.md)."""
    if opts.cache_scales_mode == "q4_0":
        return 32
    return 256 if dec.kind == "mla" and prefill_form(dec, opts) == "expanded" else None


def layer_cache_tensors(dec: Decoder, opts: Options, i: int) -> list[dict]:
    """The cache I/O of layer i: past input, the present outputs bound to the same buffer, and their shape."""
    name, _, per_byte = CACHE_TYPES[opts.kv_bits]
    width = dec.cache_width // per_byte
    if dec.kind != "mla":
        return [dict(past=f"past_{part}.{i}", present=[f"present_{part}.{i}"], heads=dec.kv_heads, width=width,
                     dtype=name) for part in ("key", "value")]
    presents = [f"present.{i}", f"present.{i}.alias"] if opts.body == "gqa" else [f"present.{i}"]
    out = [dict(past=f"past.{i}", present=presents, heads=1, width=width, dtype=name)]
    if opts.cache_scales_mode != "channel":  # float16 scales of each row's groups (onnx_latent_attention)
        out.append(dict(past=f"past_group_scale.{i}", present=[f"present_group_scale.{i}"], heads=1,
                        width=scale_groups(dec, opts.cache_scales_mode), dtype="float16"))
    return out


def cache_tensors(dec: Decoder, opts: Options) -> list[dict]:
    """The cache I/O of every layer, in layer order."""
    return [t for i in range(len(dec.layers)) for t in layer_cache_tensors(dec, opts, i)]


PIECE_VALUES = 1 << 20  # a matrix is quantized and written this many values (4 MB of float32) at a time


def _float32(x) -> np.ndarray:
    """A numpy array, torch tensor or the torch slice of a layerwise.Rows as float32 numpy (no copy if it is one)."""
    return x.astype(np.float32, copy=False) if isinstance(x, np.ndarray) else x.float().numpy()


def _row_pieces(w, rows: int | None = None):
    """w [N, K] (numpy, torch or layerwise.Rows) in blocks of rows, float32."""
    rows = rows or max(1, PIECE_VALUES // w.shape[1])
    for r in range(0, w.shape[0], rows):
        yield _float32(w[r:r + rows])


def _nbits_weight(g: Graph, name: str, parts: list, bits: int, opts: Options, method: str = "rtn") -> list[str]:
    """MatMulNBits' B, scales (and zero points) for the matrices `parts` [N_i, K] stacked along N, quantized and
    written in row pieces: the float matrix is never copied whole."""
    K, N = parts[0].shape[1], sum(p.shape[0] for p in parts)
    bs = opts.block_size
    blocks = -(-K // bs)
    scales, zeros = [], []

    def packed():
        for part in parts:
            for piece in _row_pieces(part):
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


def _matmul_nbits(g: Graph, x: str, inputs: list[str], K: int, N: int, bits: int, name: str, opts: Options) -> str:
    level = {"accuracy_level": opts.accuracy_level} if opts.accuracy_level else {}
    return g.op("MatMulNBits", [x, *inputs], name=name, domain=MS, K=K, N=N, bits=bits, block_size=opts.block_size,
                **level)


def _matmul(g: Graph, x: str, w, name: str, opts: Options, bias: np.ndarray | None = None) -> str:
    """x @ w.T (+ bias); w [out, in], or a list of such matrices stacked along `out` (never concatenated when
    quantized). 4/8-bit weights become MatMulNBits, packed here; float ones are stored transposed ([in, out]) as
    MatMul B."""
    parts = w if isinstance(w, list) else [w]
    bits = (opts.head_bits or opts.weight_bits) if name == "lm_head" else opts.weight_bits
    if bits:
        method = opts.method if bits == 4 and name != "lm_head" else "rtn"
        K, N = parts[0].shape[1], sum(p.shape[0] for p in parts)
        y = _matmul_nbits(g, x, _nbits_weight(g, name, parts, bits, opts, method), K, N, bits, name, opts)
    else:
        wt = np.ascontiguousarray(np.concatenate([_float32(p[:]) for p in parts]).T)
        if opts.fp16_weights:
            b = g.op("Cast", [g.weight(name + ".weight", wt.astype(np.float16))], to=TensorProto.FLOAT,
                     name=name + "/cast")
        else:
            b = g.weight(name + ".weight", wt)
        y = g.op("MatMul", [x, b], name=name)
    if bias is not None:
        y = g.op("Add", [y, g.weight(name + ".bias", bias.astype(np.float32))], name=name + "/bias")
    return y


def _up_projection(g: Graph, name: str, w: np.ndarray, opts: Options) -> str:
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
    gate_up = _matmul(g, x, [layer["gate"], layer["up"]], f"layers.{i}.mlp.gate_up", opts)
    f = layer["gate"].shape[0]
    gate, up = g.op("Split", [gate_up, g.const([f, f])], 2, axis=-1)
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
    return _matmul(g, act, layer["down"], f"layers.{i}.mlp.down", opts)


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
    proj = _matmul(g, x, w, f"layers.{i}.attn.q_kv_a", opts, b)
    q_nope, q_rope, latent, k_rope = g.op("Split", [proj, g.const([H * N, H * R, C, R])], 4, axis=-1)
    if dec.latent_norm_eps is not None:
        latent = _latent_norm(g, latent, layer["latent_norm"], dec.latent_norm_eps[i], dec.latent_channels,
                              f"layers.{i}.attn.latent_norm")
    q_rope = rope(q_rope, layer["inv_freq"])
    entry = g.op("Concat", [latent, rope(k_rope, layer["inv_freq"])], axis=-1)
    k_up = _up_projection(g, f"layers.{i}.attn.k_up", layer["k_up"], opts)
    v_up = _up_projection(g, f"layers.{i}.attn.v_up", np.ascontiguousarray(layer["v_up"].transpose(0, 2, 1)), opts)
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
    return _matmul(g, out, layer["o"], f"layers.{i}.attn.o", opts, layer.get("o_bias"))


def all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of its If branches, depth first."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def prefill_form(dec: Decoder, opts: Options) -> str:
    """"expanded": prompt chunks run LatentPrefill (an If per layer picks it for chunks of at least
    `prefill_from` tokens); "absorbed": every chunk runs LatentAttention. The expanded form reads the cache in the
    codes GroupQueryAttention writes (static per-channel scales), and attends with GroupQueryAttention, whose head
    size (N + R, values padded to it) must be a multiple of 8."""
    key_width = dec.nope_dim + dec.rope_dim
    if (opts.prefill == "absorbed" or opts.cache_scales_mode != "channel" or dec.head_dim > key_width
            or key_width % 8):
        return "absorbed"
    return "expanded"


def prefill_work_bytes(dec: Decoder) -> int:
    """Working memory of the expanded prefill per token of context, for the one layer it runs at a time: the
    up-projected keys and values as GroupQueryAttention's past and present (float32, N + R wide per KV group) and
    two float copies of the read-back row. Measured on SmolLM2-135M (C + R = 224 + 32): peak RSS grows 6.4 KB a
    token more than the cache from 1K to 4K tokens; this gives 6.6 KB (docs/onnx.md)."""
    return 4 * (4 * dec.num_groups * (dec.nope_dim + dec.rope_dim) + 2 * dec.cache_width)


def prefill_from(dec: Decoder) -> int:
    return prefill_threshold(dec.num_heads, dec.num_groups, dec.latent_dim, dec.rope_dim, dec.nope_dim, dec.head_dim)


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
    qkv = _matmul(g, x, w, f"layers.{i}.attn.qkv", opts, b)
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
    return _matmul(g, out, layer["o"], f"layers.{i}.attn.o", opts, layer.get("o_bias"))


def _embedding(g: Graph, dec: Decoder, opts: Options, ids: str):
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
        inputs = _nbits_weight(g, "lm_head", [dec.lm_head], bits, opts)
        scales = g.op("Reshape", [inputs[1], g.const([V, -(-E // bs), 1])], name="embed_tokens/scales")
        rows = g.op("GatherBlockQuantized", [inputs[0], ids, scales], domain=MS, name="embed_tokens", bits=bits,
                    block_size=bs, gather_axis=0, quantize_axis=2)
        x = g.op("Reshape", [rows, g.const([0, 0, E])], name="embed_tokens/rows")
        return x, lambda h: _matmul_nbits(g, h, inputs, E, V, bits, "lm_head", opts)
    if opts.weight_bits == 4 and E % bs == 0:
        scales = []

        def signed():  # INT4 codes of the q4_0 grid: the unsigned code - 8 is its nibble with the top bit flipped
            for piece in _row_pieces(dec.embed):
                codes, s, _ = onnx_quant.block_codes(piece, 4, bs)
                scales.append(s)
                yield onnx_quant.pack(codes.reshape(len(piece), E) ^ 8, 4)

        table = g.tensor("embed_tokens.weight_Q4", TensorProto.INT4, [V, E], signed())
        x = g.op("GatherBlockQuantized", [table, ids, g.weight("embed_tokens.weight_scales", np.concatenate(scales))],
                 domain=MS, name="embed_tokens", gather_axis=0, quantize_axis=1, block_size=bs)
        return x, None
    dtype = np.float16 if opts.fp16_weights else np.float32
    table = g.tensor("embed_tokens.weight", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [V, E],
                     (piece.astype(dtype) for piece in _row_pieces(dec.embed)))
    x = g.op("Gather", [table, ids], name="embed_tokens")
    if opts.fp16_weights:
        table = g.op("Cast", [table], to=TensorProto.FLOAT)
        x = g.op("Cast", [x], to=TensorProto.FLOAT)
    if not (dec.tied and not opts.weight_bits):
        return x, None
    return x, lambda h: g.op("MatMul", [h, g.op("Transpose", [table], perm=[1, 0])], name="lm_head")


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

    x, head = _embedding(g, dec, opts, ids)

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
    head = head(h) if head else _matmul(g, h, dec.lm_head, "lm_head", opts)
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
