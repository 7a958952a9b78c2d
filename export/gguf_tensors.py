"""GGUF tensors: how an MLA (or original) model's weights map onto llama.cpp's deepseek2 (or llama/qwen2) tensors,
the rope-key layout llama.cpp's single rope head needs, the latent-norm neutralisation, and each tensor's type.
Why each mapping is exact: docs/gguf.md."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

KV_A_QUANTIZED = QT.BF16  # attn_kv_a_mqa beside q8_0/q4_0/q4_k weights
# Latent-norm neutralisation: the latent rows are scaled by beta = 2^-k (exact in F32), k in [30, 60].
BETA_EXP_RANGE = (30, 60)
# mean(c^2) may grow this much over its calibration maximum (1024x in rms) and the norm still divides by
# exactly sqrt(eps) in float32.
HEADROOM = 2.0 ** 20

# --- rope layout --------------------------------------------------------------------------------------------

@dataclass
class RopeLayout:
    """Where the folder's rope pairs go in llama.cpp's one rope key: channel j has frequency
    freq_base^(-2j/R) = B^(-2 stride j / d); pairs the model does not use stay zero."""
    stride: int
    rope_dim: int  # R' (padded)
    latent_dim: int  # C' (padded)
    freq_base: float
    channel_of: list  # per layer: np.ndarray, channel of each of the folder's rope pairs


def rope_layout(inv_freqs: list[np.ndarray], base: float, head_dim: int, latent_dim: int, align: int,
                selection: str = "?") -> RopeLayout:
    """Exact placement of per-layer rope frequencies on llama.cpp's geometric grid, or a clear error. `head_dim`
    is the width the source's RoPE grid is defined over (the rotated width under partial rotary)."""
    if align < 1:
        raise ValueError(f"--align must be at least 1, got {align}")
    step = 2 * math.log(base) / head_dim  # source pair k has frequency exp(-step k)
    grid = []
    for i, f in enumerate(inv_freqs):
        f = np.asarray(f, dtype=np.float64)
        with np.errstate(divide="ignore"):
            k = -np.log(f) / step
        off = ~np.isfinite(k) | (np.abs(k - np.round(k)) > 1e-3) | (np.round(k) < 0)
        if np.any(off):
            fix = (f"; its first {int(np.argmax(off))} rope pairs are on the grid: --rope-pairs "
                   f"{int(np.argmax(off))} with --selection shared keeps those" if selection == "shared" and
                   np.argmax(off) > 0 else "")
            raise ValueError(f"layer {i}: the rope frequencies are not on the plain RoPE grid of base {base:g} "
                             "(scaled RoPE such as llama3/yarn/linear, or a layer without RoPE under a per-head "
                             "selection); llama.cpp's deepseek2 rope key has no per-frequency factors and cannot "
                             f"express them exactly{fix}")
        k = np.round(k).astype(np.int64)
        if len(set(k.tolist())) != len(k):
            raise ValueError(
                f"layer {i}: selection '{selection}' keeps the same rope frequency for more than one KV head, but "
                "llama.cpp's deepseek2 has a single rope key whose pairs all have distinct frequencies, so this "
                "model cannot be exported exactly. Convert with --selection partition (each KV head keeps its own "
                "frequencies) or --selection shared (one rope key, rope_components 1) instead")
        grid.append(k)
    every = np.concatenate(grid)
    stride = math.gcd(*every.tolist()) or 1
    channels = int(every.max()) // stride + 1
    latent = -(-latent_dim // align) * align
    rope = 2 * channels
    while (latent + rope) % align:
        rope += 2  # zero channels at the low-frequency end: exact (their q and k rows are zero)
    freq_base = float(base) ** (stride * rope / head_dim)
    return RopeLayout(stride, rope, latent, freq_base, [k // stride for k in grid])


# --- tensors ------------------------------------------------------------------------------------------------

def to_numpy(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _nonzero(t) -> float:
    return 0.0 if t is None else float(t.detach().abs().max())


def check_attention_biases(layer: int, biases: dict) -> None:
    """deepseek2 has no attention biases: exact only when the ones that matter are zero. `biases`: name -> tensor
    or None, for the converted layer (q_proj, kv_a_proj, v_up, o_proj) or, before conversion, the original's
    (q_proj, k_proj, v_proj, o_proj: the key bias reaches the rope key)."""
    for name, bias in biases.items():
        value = _nonzero(bias)
        if value > 0:
            raise ValueError(
                f"layer {layer} has a nonzero {name} bias (max |b| = {value:.3g}): llama.cpp's deepseek2 has no "
                "attention biases, so this model (Qwen2/Qwen2.5-style q/k/v biases) cannot be exported exactly as "
                "GGUF (only a key bias that stays out of the rope key would cancel in softmax); the ONNX export "
                "carries the biases exactly")


def check_ffn(config) -> None:
    """deepseek2's dense FFN is SiLU(gate) * up -> down without biases."""
    if getattr(config, "mlp_bias", False):
        raise ValueError("the MLP has biases, which llama.cpp's deepseek2 FFN does not load; cannot export exactly")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"the FFN activation is '{act}', but llama.cpp's deepseek2 FFN is SiLU-gated")


def check_nope_dim(nope_dim: int) -> None:
    if nope_dim < 1:
        raise ValueError(f"the model keeps no NoPE dims (nope_dim {nope_dim}); llama.cpp's deepseek2 needs at least "
                         "one. Convert with fewer rope pairs")


def mla_layer_tensors(attn, layout: RopeLayout, layer: int, beta: float, eps: float) -> dict:
    """deepseek2 tensors of one MLA layer (float64 arrays, numpy shapes = reversed ggml shapes). A model trained
    with a latent norm (attn.latent_norm) keeps it as attn_kv_a_norm, its latent rows of kv_a scaled so that the
    runtime's eps acts as the model's (mla.latent_row_scale); otherwise the norm is neutralised by beta."""
    from edge_mla.mla import latent_row_scale

    H, G, N, R, C, d = (attn.num_heads, attn.num_groups, attn.nope_dim, attn.rope_dim, attn.latent_dim,
                        attn.head_dim)
    Rp, Cp, P = layout.rope_dim, layout.latent_dim, R // 2
    E = attn.q_proj.weight.shape[1]
    ch = layout.channel_of[layer]
    # llama.cpp scales scores by 1/sqrt(N + R'); ours is softmax_scale (1/sqrt(d)), and a rope scaling
    # factor multiplies cos and sin of both q and k.
    alpha = attn.scaling * math.sqrt(N + Rp)
    rope_gain = alpha * attn.rope_scaling ** 2
    q = to_numpy(attn.q_proj.weight).reshape(H, N + R, E)
    q_out = np.zeros((H, N + Rp, E))
    q_out[:, :N] = q[:, :N] * alpha
    # NEOX pair p = rows (p, p + R/2) -> llama.cpp's NORM pair = rows (2j, 2j + 1) of channel j.
    q_out[:, N + 2 * ch] = q[:, N:N + P] * rope_gain
    q_out[:, N + 2 * ch + 1] = q[:, N + P:] * rope_gain
    kv = to_numpy(attn.kv_a_proj.weight)
    kv_out = np.zeros((Cp + Rp, E))
    learned = attn.latent_norm is not None
    if learned and Cp != C:
        raise ValueError(f"a learned latent norm averages over the latent's {C} channels, but llama.cpp's would "
                         f"average over {Cp} (padded to a multiple of the cache's 32-blocks); convert with a "
                         "latent width that is a multiple of 32")
    kv_out[:C] = kv[:C] * (latent_row_scale(attn) if learned else beta)  # neutralised: the RMSNorm then divides
    # by sqrt(eps) exactly
    kv_out[Cp + 2 * ch] = kv[C:C + P]
    kv_out[Cp + 2 * ch + 1] = kv[C + P:]
    group = np.arange(H) // (H // G)
    k_up, v_up = to_numpy(attn.k_up), to_numpy(attn.v_up)
    k_b = np.zeros((H, Cp, N))
    k_b[:, :C] = k_up[group].transpose(0, 2, 1)  # W_uk^T per query head
    v_b = np.zeros((H, d, Cp))
    v_b[:, :, :C] = v_up[group]
    return {"attn_q.weight": q_out.reshape(H * (N + Rp), E), "attn_kv_a_mqa.weight": kv_out,
            "attn_kv_a_norm.weight": (to_numpy(attn.latent_norm.weight) if learned else
                                      np.full(Cp, math.sqrt(eps) / beta)),
            "attn_k_b.weight": k_b, "attn_v_b.weight": v_b, "attn_output.weight": to_numpy(attn.o_proj.weight)}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """NEOX rows (i, i + d/2) of each head -> interleaved (2i, 2i + 1), as llama.cpp's Llama converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plain_layer_tensors(attn, arch: str, n_head: int, n_kv: int) -> dict:
    q, k = to_numpy(attn.q_proj.weight), to_numpy(attn.k_proj.weight)
    out = {"attn_v.weight": to_numpy(attn.v_proj.weight), "attn_output.weight": to_numpy(attn.o_proj.weight)}
    biases = {"attn_q.bias": attn.q_proj.bias, "attn_k.bias": attn.k_proj.bias, "attn_v.bias": attn.v_proj.bias,
              "attn_output.bias": attn.o_proj.bias}
    if arch in ("llama", "smollm3"):  # llama.cpp's llama/smollm3 use interleaved rope; qwen2/qwen3 keep NEOX
        q, k = _permute(q, n_head), _permute(k, n_kv)
    out["attn_q.weight"], out["attn_k.weight"] = q, k
    if arch == "qwen3":
        out["attn_q_norm.weight"], out["attn_k_norm.weight"] = to_numpy(attn.q_norm.weight), to_numpy(attn.k_norm.weight)
    for name, b in biases.items():
        if b is None:
            continue
        if arch == "qwen2" and name == "attn_output.bias":
            if _nonzero(b) > 0:
                raise ValueError("qwen2 in llama.cpp has no output-projection bias; cannot export exactly")
            continue
        b = to_numpy(b)
        if arch in ("llama", "smollm3") and name in ("attn_q.bias", "attn_k.bias"):
            b = _permute(b, n_head if name == "attn_q.bias" else n_kv)
        out[name] = b
    return out


def head_tensors(model, checkpoint=None) -> dict:
    """The tensors outside the layers (float32 values, or a lazy model's stored tensors, as torch tensors: encode
    converts them in pieces). A copied float32 value encodes to the same bytes from float32 as from float64."""
    from edge_mla.layerwise import weight

    tensors = {"token_embd.weight": weight(model, checkpoint, "model.embed_tokens.weight"),
               "output_norm.weight": weight(model, checkpoint, "model.norm.weight")}
    if not model.config.tie_word_embeddings:
        tensors["output.weight"] = weight(model, checkpoint, "lm_head.weight")
    return tensors


def ffn_tensors(layer, i: int) -> dict:
    mlp = layer.mlp
    return {f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight.detach(),
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight.detach(),
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight.detach(),
            f"blk.{i}.ffn_up.weight": mlp.up_proj.weight.detach(),
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight.detach()}


# The per-head up-projections stay 8-bit under q4_0: 2% of the weights, and at 4 bits they cost the recovered
# SmolLM2 build 26.52 against 22.20 held-out perplexity (llama.cpp, q4_0 cache; docs/recovery.md).
EIGHT_BIT_UNDER_Q4_0 = ("attn_k_b.weight", "attn_v_b.weight")


def tensor_type(name: str, shape: tuple, weights: str, mla: dict | None = None) -> QT:
    """Storage type of one tensor; `mla` says what the model was trained for (config.mla). Norms stay F32.
    attn_kv_a_mqa keeps an 8-bit exponent, F32 (BF16 next to quantized weights: the same 8-bit precision, half the
    bytes): its latent rows are scaled by 2^-30 or less under a neutralised norm, and by latent_row_scale (~1e-4)
    under a learned one, which would underflow F16 or q8_0's fp16 scales. Under q4_0 with a learned norm it is Q4_0:
    its scales are 8x larger than q8_0's, subnormal at worst (about 1% relative), and the recovery trains through
    exactly that round trip. The up-projections stay 8-bit under q4_0 unless the recovery trained through their
    4-bit round trip. Rows that are no multiple of 32 stay F16; with
    q4_0 the embedding/output head keeps 8 bits, as llama.cpp's own mixes do."""
    if len(shape) == 1 or weights in ("f32", "q4_k"):
        return QT.F32  # q4_k: llama.cpp's quantizer gets F32 and picks its own mix
    mla = mla or {}
    if name.endswith("attn_kv_a_mqa.weight") and not (weights == "q4_0" and mla.get("latent_norm_eps")):
        return QT.F32 if weights == "f16" else KV_A_QUANTIZED
    if weights == "f16":
        return QT.F16
    qtype = QT.Q8_0 if weights == "q8_0" or name in ("token_embd.weight", "output.weight") or \
        (name.endswith(EIGHT_BIT_UNDER_Q4_0) and not mla.get("four_bit_up_projections")) else QT.Q4_0
    return qtype if shape[-1] % 32 == 0 else QT.F16


def encode(name: str, array: np.ndarray, weights: str, mla: dict | None = None) -> tuple[np.ndarray, QT]:
    qtype = tensor_type(name, array.shape, weights, mla)
    if qtype == QT.F32:
        return array.astype(np.float32), qtype
    if qtype == QT.F16:
        return array.astype(np.float16), qtype
    if qtype == QT.BF16:
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


ROWS_PER_PIECE = 4096  # a vocabulary-sized tensor is converted and quantized this many rows at a time


def encode_rows(name: str, t, weights: str, mla: dict | None = None) -> tuple[np.ndarray, QT]:
    """encode() of a numpy array, torch tensor or layerwise.Rows, piece by piece along its rows into one
    preallocated result (every ggml type quantizes each row on its own, so the bytes are the same): never a float32
    or float64 copy of a whole vocabulary matrix."""
    def as_numpy(x):
        return x if isinstance(x, np.ndarray) else x.float().numpy()

    if t.ndim < 2 or t.shape[0] <= ROWS_PER_PIECE:
        return encode(name, as_numpy(t[:]), weights, mla)
    out = qtype = None
    for r in range(0, t.shape[0], ROWS_PER_PIECE):
        piece, qtype = encode(name, as_numpy(t[r:r + ROWS_PER_PIECE]), weights, mla)
        if out is None:
            out = np.empty((t.shape[0], *piece.shape[1:]), dtype=piece.dtype)
        out[r:r + len(piece)] = piece
    return out, qtype


# --- latent norm --------------------------------------------------------------------------------------------

def latent_mean_squares(model, windows, padded_latent: int, checkpoint=None) -> list[float]:
    """Per layer, the largest mean(c^2) over calibration tokens, as llama.cpp's RMSNorm computes it over C'.
    The windows walk through the layers one at a time (layerwise.Walk: a lazy model is read layer by layer)."""
    from edge_mla.layerwise import Progress, Walk, resident

    worst = [0.0] * len(model.model.layers)

    def hook(i, C):
        def fn(module, args, output):
            c = output[..., :C].double()
            worst[i] = max(worst[i], float((c * c).sum(-1).max()) / padded_latent)
        return fn

    walk = Walk(model, checkpoint, {"latent": windows})
    progress = Progress(len(model.model.layers), walk.tokens, "latent norm check") if checkpoint else None
    for i, layer in enumerate(model.model.layers):
        with resident(layer, f"model.layers.{i}.", checkpoint):
            walk.run(i, lambda key, layer, i=i: [layer.self_attn.kv_a_proj.register_forward_hook(
                hook(i, layer.self_attn.latent_dim))])
        if progress:
            progress.layer_done(i)
    return worst


def latent_scale(mean_squares: list[float], eps: float) -> tuple[float, float]:
    """beta = 2^-k such that beta^2 mean(c^2) stays under float32's half-ulp of eps with HEADROOM to spare:
    then RMSNorm(beta c) = beta c / sqrt(eps) exactly in float32. Returns (beta, headroom actually left)."""
    m = max(mean_squares)
    if not math.isfinite(m):
        raise ValueError("the latent is not finite on the calibration text; the converted model is broken")
    limit = eps * 2.0 ** -24  # below this, mean + eps rounds to eps in float32
    k = BETA_EXP_RANGE[0]
    while k <= BETA_EXP_RANGE[1] and 2.0 ** (-2 * k) * m * HEADROOM > limit:
        k += 1
    if k > BETA_EXP_RANGE[1]:
        layer = int(np.argmax(mean_squares))
        raise ValueError(f"layer {layer}: the latent's mean square reaches {m:.3g} on the calibration text, too large "
                         f"to neutralise llama.cpp's latent RMSNorm exactly (needs beta < 2^-{BETA_EXP_RANGE[1]}). "
                         "Check the conversion, or fine-tune the model with a latent norm")
    beta = 2.0 ** -k
    return beta, (limit / (beta * beta * m) if m > 0 else float("inf"))
