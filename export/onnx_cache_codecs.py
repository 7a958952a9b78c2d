"""The ONNX latent cache's codecs: how each cache type stores a row [c | k_rope] and how the plain-op bodies
(onnx_latent_attention.py) read it. One object per cache type, each answering the four questions a body asks:

- `write`: the new rows in the cache's code ("rows_new", from the function input "entry");
- `read`: the cached rows back as float rows (the expanded prefill);
- `scores`: every query row against the cached rows (the absorbed decode, "q" [B, 1, S*H, W] against
  "cached" [B, 1, T, stored width]);
- `attend`: the attended latent from the softmax weights ("probs").

Float, int8 and int4 with static per-channel scales (x = code x scale; int4 codes + 8, two per byte, low nibble
first: the codes GroupQueryAttention writes, so every body reads every other's cache), and int4 with scales of its
own per row or per 32 values (llama.cpp's q4_0 rule, in a second buffer). The cached codes are never scaled where a
scale can multiply the query or the attended latent instead. Adding a cache type is one class here and its test.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edge_mla.export import onnx_quant

SCALE_GROUP = {"row": None, "q4_0": 32}  # int4 cache scales kept beside the rows: one per row, or per 32 values


def int4_matrices(width: int, latent: int) -> dict[str, np.ndarray]:
    """Constant matrices of the int4 codecs (W = width, C = latent, W2 = W / 2; channel pair k = (2k, 2k+1) shares
    a byte: low nibble 2k, high nibble 2k+1, each stored as code + 8).
    query [W, W]: q -> [q_e | q_o - 16 q_e] (times the scales, row by row), the query against [x | hi] where x is
    the byte value lo + 16 hi and hi its high nibble: q_e . lo + q_o . hi = q_e . x + (q_o - 16 q_e) . hi;
    latent [W, C]: the attended [x | hi] -> the attended nibbles lo = x - 16 hi (channel 2k) and hi (channel 2k+1)."""
    half = width // 2
    k = np.arange(half)
    query = np.zeros((width, width), np.float32)
    query[2 * k, k], query[2 * k + 1, half + k], query[2 * k, half + k] = 1, 1, -16
    out = np.zeros((width, width), np.float32)
    out[k, 2 * k], out[half + k, 2 * k], out[half + k, 2 * k + 1] = 1, -16, 1
    return {"query": query, "latent": out[:, :latent]}


class CacheCodec:
    """What every codec answers; as written here, for a cache that stores rows as they are (float16 / float32).
    The quantized codecs override what their code changes."""
    kv_bits = 0
    extra_inputs: tuple[str, ...] = ()
    extra_outputs: tuple[str, ...] = ()

    def __init__(self, latent: int, rope: int):
        self.latent, self.rope, self.width = latent, rope, latent + rope

    def prepare(self, body, decode: bool) -> None:
        """Constants the codec's nodes share (decode: the absorbed body's, which scales the query)."""

    def write(self, body) -> str:
        return body.node("CastLike", ["entry", "past"], "rows_new")

    def read(self, body, cached: str) -> str:
        return body.node("CastLike", [cached, "query"], "rows")

    def scores(self, body, cached: str) -> str:
        node = body.node
        kv = node("CastLike", [cached, "query"], "kv")
        qs = node("Mul", ["q", "softmax_scale"], "qs")
        return node("MatMul", [qs, node("Transpose", [kv], "kv_t", perm=[0, 1, 3, 2])], "scores")

    def attend(self, body) -> str:
        node, const = body.node, body.const
        return node("Slice", [node("MatMul", ["probs", "kv"], "att_all"), const("zero1", [0]),
                              const("c1", [self.latent]), const("last", [-1])], "att")


class FloatCache(CacheCodec):
    """A float16 / float32 cache: the base's reading as it is."""


class Int8Cache(CacheCodec):
    """int8 codes with static per-channel scales (cache_scale)."""
    kv_bits = 8

    def prepare(self, body, decode: bool) -> None:
        node, const = body.node, body.const
        node("Reshape", ["cache_scale", const("minus1", [-1])], "cs")  # [W]
        if decode:  # the softmax scale and the channel scales fold into the query; the latent's into the output
            node("Mul", ["cs", "softmax_scale"], "cs_scaled")
            node("Slice", ["cs", const("zero1", [0]), const("c1", [self.latent])], "cs_latent")

    def _codes(self, body) -> str:
        node, const = body.node, body.const
        lo, hi = onnx_quant.CODE_RANGE[self.kv_bits]
        return node("Clip", [node("Round", [node("Div", ["entry", "cs"], "scaled")], "rounded"),
                             const("code_min", lo, np.float32), const("code_max", hi, np.float32)], "codes")

    def write(self, body) -> str:
        return body.node("Cast", [self._codes(body)], "rows_new", to=TensorProto.INT8)

    def read(self, body, cached: str) -> str:
        node = body.node
        return node("Mul", [node("Cast", [cached], "codes_read", to=TensorProto.FLOAT), "cs"], "rows")

    def scores(self, body, cached: str) -> str:
        node = body.node
        kv = node("Cast", [cached], "kv", to=TensorProto.FLOAT)
        qs = node("Mul", ["q", "cs_scaled"], "qs")
        return node("MatMul", [qs, node("Transpose", [kv], "kv_t", perm=[0, 1, 3, 2])], "scores")

    def attend(self, body) -> str:
        node, const = body.node, body.const
        lat = node("Mul", ["cs_latent", const("lat_pick", np.eye(self.width, self.latent), np.float32)], "lat_matrix")
        return node("MatMul", [node("MatMul", ["probs", "kv"], "att_codes"), lat], "att")


class Int4Cache(Int8Cache):
    """int4 codes with static per-channel scales, code + 8 packed two per byte (low nibble first). Read as the
    bytes x = lo + 16 hi and their high nibbles hi = floor(x / 16): the +8 shifts every score of a row by the same
    amount (softmax ignores it) and the attended latent by exactly 8."""
    kv_bits = 4

    def _pack(self, body, nibbles: str) -> str:
        """Nibbles [B, S, W] -> bytes nibble_2k + 16 nibble_2k+1 [B, S, W / 2] (a [2, 1] constant, not [W, W / 2])."""
        node, const = body.node, body.const
        pairs = node("Reshape", [nibbles, const("pair_shape", [0, 0, self.width // 2, 2])], "code_pairs")
        packed = node("MatMul", [pairs, const("pack_pair", [[1.0], [16.0]], np.float32)], "packed_pairs")
        return node("Reshape", [packed, const("byte_shape", [0, 0, self.width // 2])], "packed")

    def write(self, body) -> str:
        node, const = body.node, body.const
        nibbles = node("Add", [self._codes(body), const("eight", 8.0, np.float32)], "nibbles_new")
        return node("Cast", [self._pack(body, nibbles)], "rows_new", to=TensorProto.UINT8)

    def _bytes(self, body, cached: str) -> tuple[str, str]:
        node, const = body.node, body.const
        x = node("Cast", [cached], "x", to=TensorProto.FLOAT)
        return x, node("Floor", [node("Mul", [x, const("sixteenth", 1 / 16, np.float32)], "x16")], "x_hi")

    def read(self, body, cached: str) -> str:
        node, const = body.node, body.const
        x, x_hi = self._bytes(body, cached)
        x_lo = node("Sub", [x, node("Mul", [x_hi, const("sixteen", 16.0, np.float32)], "x_hi16")], "x_lo")
        pairs = node("Concat", [node("Unsqueeze", [x_lo, const("last", [-1])], "lo5"),
                                node("Unsqueeze", [x_hi, const("last", [-1])], "hi5")], "pairs", axis=-1)
        nibbles = node("Reshape", [pairs, const("row_shape", [0, 0, 0, self.width])], "nibbles")
        return node("Mul", [node("Sub", [nibbles, const("eight", 8.0, np.float32)], "codes_read"), "cs"], "rows")

    def _query_matrix(self, body, extra_columns: np.ndarray | None = None, scale: str = "cs_scaled") -> str:
        """q -> [q_x | q_hi (| extra)] with `scale` folded in row by row (a constant: folded at load)."""
        node, const = body.node, body.const
        pick = int4_matrices(self.width, self.latent)["query"]
        if extra_columns is not None:
            pick = np.concatenate([pick, extra_columns], 1)
        return node("Mul", [node("Unsqueeze", [scale, const("last", [-1])], "cs_col"),
                            const("q_pick", pick, np.float32)], "q_matrix")

    def _split_query(self, body, extra: int = 0) -> list[str]:
        node, const = body.node, body.const
        node("Split", [node("MatMul", ["q", "q_matrix"], "q_both"),
                       const("halves", [self.width // 2] * 2 + ([extra] if extra else []))], "q_split", axis=-1)
        body.nodes[-1].output[:] = ["q_x", "q_hi"] + (["q_shift"] if extra else [])
        return list(body.nodes[-1].output)

    def scores(self, body, cached: str) -> str:
        node = body.node
        self._query_matrix(body)
        x, x_hi = self._bytes(body, cached)
        q_x, q_hi = self._split_query(body)
        return node("Add", [node("MatMul", [q_x, node("Transpose", [x], "x_t", perm=[0, 1, 3, 2])], "scores_x"),
                            node("MatMul", [q_hi, node("Transpose", [x_hi], "x_hi_t", perm=[0, 1, 3, 2])],
                                 "scores_hi")], "scores")

    def attend(self, body) -> str:
        node, const = body.node, body.const
        lat = node("Mul", ["cs_latent", const("lat_pick", int4_matrices(self.width, self.latent)["latent"],
                                               np.float32)], "lat_matrix")
        bias = node("Mul", ["cs_latent", const("minus8", -8.0, np.float32)], "lat_bias")
        both = node("Concat", [node("MatMul", ["probs", "x"], "att_x"), node("MatMul", ["probs", "x_hi"], "att_hi")],
                    "att_both", axis=-1)
        return node("Add", [node("MatMul", [both, lat], "att_scaled"), bias], "att")


class Int4GroupedCache(Int4Cache):
    """int4 rows that carry scales of their own, in a second cache buffer (`past_group_scale` [B, 1, L, G]
    float16), by llama.cpp's q4_0 rule (per group, d = the value of largest magnitude / -8, nibble =
    trunc(x / d + 8.5) clipped to 15, x = d (nibble - 8)). "row": one group per row, over the row divided by the
    static per-channel scales (which only even the channels out); "q4_0": groups of 32 values of the row itself,
    llama.cpp's q4_0 cache. Each group's partial score q_g . nibbles_g, less the shift 8 sum(q_g) (a column per
    group in the query matrix), is multiplied by its d and the groups summed; the attended latent likewise
    (weights times d, less 8 d per weight). The absorbed (decode) body only."""
    extra_inputs = ("past_group_scale",)
    extra_outputs = ("present_group_scale",)

    def __init__(self, latent: int, rope: int, scales: str):
        super().__init__(latent, rope)
        self.channel = scales == "row"  # static per-channel scales in play
        self.group = SCALE_GROUP[scales] or self.width
        if self.width % self.group:
            raise ValueError(f"q4_0 cache scales need C + R a multiple of {self.group}, got {self.width}")
        self.groups = self.width // self.group

    def prepare(self, body, decode: bool) -> None:
        if not decode:
            raise ValueError("the expanded prefill reads a cache of static per-channel scales only: export with "
                             "--prefill absorbed, or --kv-scales channel")
        if self.channel:
            super().prepare(body, decode)

    def write(self, body) -> str:
        node, const = body.node, body.const
        y = node("Div", ["entry", "cs"], "scaled") if self.channel else "entry"
        yg = node("Reshape", [y, const("group_shape", [0, 0, self.groups, self.group])], "y_groups")  # [B, S, G, g]
        node("ArgMax", [node("Abs", [yg], "y_abs")], "peak_at", axis=-1, keepdims=1)
        d = node("Mul", [node("GatherElements", [yg, "peak_at"], "peak", axis=-1),
                         const("per_code_min", -1 / 8, np.float32)], "d")  # [B, S, G, 1]
        inv = node("Where", [node("Equal", [d, const("zero_f", 0.0, np.float32)], "d_zero"),
                             const("zero_f", 0.0, np.float32), node("Reciprocal", [d], "d_inv")], "inv")
        node("Clip", [node("Floor", [node("Add", [node("Mul", [yg, inv], "y_scaled"),
                                                  const("half_up", 8.5, np.float32)], "y_shifted")], "y_floor"),
                      const("nibble_min", 0.0, np.float32), const("nibble_max", 15.0, np.float32)], "nibbles_g")
        nibbles = node("Reshape", ["nibbles_g", const("row_shape", [0, 0, self.width])], "nibbles")  # code + 8
        node("Cast", [node("Reshape", [d, const("scale_shape", [0, 0, self.groups])], "d_row")], "d16",
             to=TensorProto.FLOAT16)
        return node("Cast", [self._pack(body, nibbles)], "rows_new", to=TensorProto.UINT8)

    def read(self, body, cached: str) -> str:
        raise ValueError("the expanded prefill reads a cache of static per-channel scales only")

    def scores(self, body, cached: str) -> str:
        node, const = body.node, body.const
        # the rows' scales: written beside them at the new rows' positions, read as [B, 1, G, 1, T]
        node("Unsqueeze", ["d16", const("one1", [1])], "d16_4")
        node("Expand", ["positions4", node("Shape", ["d16_4"], "d_shape")], "d_idx")
        node("ScatterElements", ["past_group_scale", "d_idx", "d16_4"], "present_group_scale", axis=2)
        node("Unsqueeze", [node("Transpose", [node("Cast", [
            node("Slice", ["present_group_scale", const("zero1", [0]), "t1", const("two1", [2])], "d_cached16")],
            "d_cached", to=TensorProto.FLOAT)], "d_t", perm=[0, 1, 3, 2]), const("three1", [3])], "d_rows")
        sums = np.zeros((self.width, self.groups), np.float32)  # + 8 sum(q) per group
        sums[np.arange(self.width), np.arange(self.width) // self.group] = 8
        self._query_matrix(body, sums, "cs_scaled" if self.channel else "softmax_scale")
        x, x_hi = self._bytes(body, cached)
        q_x, q_hi, q_shift = self._split_query(body, self.groups)
        # per group: [x | hi] against [q_x | q_hi], [B, 1, G, S*H, T]
        half5 = const("half5", [0, 0, 0, self.groups, self.group // 2])
        node("Concat", [node("Reshape", [x, half5], "x_g"), node("Reshape", [x_hi, half5], "x_hi_g")],
             "kv_g", axis=-1)  # [B, 1, T, G, g]
        node("Concat", [node("Reshape", [q_x, half5], "q_x_g"), node("Reshape", [q_hi, half5], "q_hi_g")],
             "q_g", axis=-1)  # [B, 1, S*H, G, g]
        raw = node("MatMul", [node("Transpose", ["q_g"], "q_gt", perm=[0, 1, 3, 2, 4]),
                              node("Transpose", ["kv_g"], "kv_gt", perm=[0, 1, 3, 4, 2])], "scores_g")
        shift = node("Unsqueeze", [node("Transpose", [q_shift], "q_shift_t", perm=[0, 1, 3, 2]),
                                   const("last", [-1])], "shift_g")  # [B, 1, G, S*H, 1]
        return node("ReduceSum", [node("Mul", [node("Sub", [raw, shift], "scores_g0"), "d_rows"], "scores_gd"),
                                  const("two1", [2])], "scores", keepdims=0)

    def attend(self, body) -> str:
        # weights p_t d_t,g against each group's [x | hi], unpacked, less 8 sum(p d)
        node, const = body.node, body.const
        w = node("Mul", [node("Unsqueeze", ["probs", const("two1", [2])], "probs5"), "d_rows"], "w_g")
        att = node("MatMul", [w, node("Transpose", ["kv_g"], "kv_g_t", perm=[0, 1, 3, 2, 4])], "att_g")
        unpack = int4_matrices(self.group, self.group)["latent"]  # a group's attended [x | hi] -> its nibbles
        node("Add", [node("MatMul", [att, const("unpack", unpack, np.float32)], "att_nibbles"),
                     node("Mul", [node("ReduceSum", [w, const("last", [-1])], "w_sum", keepdims=1),
                                  const("minus8", -8.0, np.float32)], "att_offset")], "att_codes_g")
        row = node("Reshape", [node("Transpose", ["att_codes_g"], "att_codes_t", perm=[0, 1, 3, 2, 4]),
                               const("qshape", [0, 1, -1, self.width])], "att_row")  # [B, 1, S*H, W]
        latent = node("Slice", [row, const("zero1", [0]), const("c1", [self.latent]), const("last", [-1])],
                      "att_latent")
        return node("Mul", [latent, "cs_latent"], "att") if self.channel else node("Identity", [latent], "att")


def codec_for(kv_bits: int, latent: int, rope: int, scales: str = "channel") -> CacheCodec:
    """The codec of a cache of `kv_bits` (0: float) with `scales` ("channel": static per channel; "row", "q4_0":
    int4 rows with scales of their own)."""
    if scales not in ("channel", *SCALE_GROUP):
        raise ValueError(f"cache scales {scales!r}: choose channel, {', '.join(SCALE_GROUP)}")
    if scales != "channel":
        if kv_bits != 4:
            raise ValueError(f"{scales} cache scales are made for the int4 cache")
        return Int4GroupedCache(latent, rope, scales)
    codecs = {0: FloatCache, 8: Int8Cache, 4: Int4Cache}
    if kv_bits not in codecs:
        raise ValueError(f"no ONNX latent cache of {kv_bits} bits: choose one of {sorted(codecs)}")
    return codecs[kv_bits](latent, rope)
