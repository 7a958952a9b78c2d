"""The decoder's ONNX graph, built node by node (no tracing): its vocabulary and I/O here (the node builder Graph,
the Decoder read from the model, the export Options, the cache tensors and the prefill form); the layers and
build_model in onnx_decoder.py, the weights in onnx_matmul.py, the LatentAttention op and its bodies in
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

from edge_mla.export.onnx_cache_codecs import SCALE_GROUP
from edge_mla.export.onnx_latent_attention import prefill_threshold

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
