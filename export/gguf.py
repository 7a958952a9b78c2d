"""Export a model to GGUF for stock llama.cpp (MLA folders as deepseek2, originals as llama/qwen2).

A converted MLA folder becomes `deepseek2`, which llama.cpp runs with its compressed MLA cache; an original
model becomes a plain llama/qwen2 file.

`edge-mla export gguf MODEL --out FILE.gguf [--weights f32|f16|q8_0|q4_0|q4_k]`. MODEL is a converted folder
(`edge-mla convert --out`) or anything `edge-mla convert --model` accepts, so baselines go through the same
path. How each MLA tensor maps to llama.cpp, and why it is exact: docs/gguf.md.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, LlamaFileType

from edge_mla import precision, provenance
from edge_mla.data import calibration_windows
from edge_mla.publish import refuse_existing, staged_file
from edge_mla.runtimes.gguf_file import GGUFInfo, check_gguf, check_kv_type

WEIGHTS = ("f32", "f16", "q8_0", "q4_0", "q4_k")
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_M}
KV_A_QUANTIZED = QT.BF16  # attn_kv_a_mqa beside q8_0/q4_0/q4_k weights
PROVENANCE_KEY = "edge_mla.provenance"  # JSON: source, plan, bits, calibration text, versions
DEFAULT_ALIGN = 32  # q8_0/q4_0 caches need C and C + R to be multiples of their block size, 32
# Latent-norm neutralisation: the latent rows are scaled by beta = 2^-k (exact in F32), k in [30, 60].
BETA_EXP_RANGE = (30, 60)
# mean(c^2) may grow this much over its calibration maximum (1024x in rms) and the norm still divides by
# exactly sqrt(eps) in float32.
HEADROOM = 2.0 ** 20
# Split patterns of byte-level BPE tokenizers, and the names llama.cpp gives their pre-tokenizers.
KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="converted MLA folder (-> deepseek2), or an original model: folder, .gguf "
                                          "file or built-in name (-> plain llama/qwen2, the baseline)")
    parser.add_argument("-o", "--out", required=True, help="output .gguf file")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--bits", type=int, default=None, choices=precision.BITS,
                      help="weight bits: 4 = q4_0, 8 = q8_0, 16 = f16 (default 16)")
    kind.add_argument("--weights", default=None, choices=WEIGHTS,
                      help="an exact weight type instead of --bits: f32/f16, q8_0/q4_0 (gguf-py), q4_k (llama.cpp's "
                           "Q4_K_M quantizer)")
    parser.add_argument("--kv-bits", type=int, default=16, choices=precision.BITS,
                        help="the llama.cpp cache the file is meant for (recorded in it; `edge-mla run` uses it)")
    parser.add_argument("--align", type=int, default=DEFAULT_ALIGN,
                        help="pad C and C+R with exact zeros to multiples of this (32: q8_0/q4_0 caches work; "
                             "1: no padding)")
    parser.add_argument("--tokenizer-gguf", default=None,
                        help="copy the tokenizer.* keys from this GGUF (default: the source model's GGUF when "
                             "there is one, else built from the folder's HF tokenizer)")
    parser.add_argument("--tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name for an HF tokenizer (e.g. gpt-2, smollm, llama-bpe, qwen2)")
    parser.add_argument("--calib-windows", type=int, default=4, help="calibration windows for the latent-norm check")
    parser.add_argument("--calib-length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--text", default=None, help="calibration text file (default: built-in Wikipedia sample)")
    parser.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer (q4_k)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args) -> int:
    weights = args.weights or precision.gguf_weight_type(args.bits or 16)
    info, notes = export(args.model_dir, args.out, weights=weights, align=args.align,
                         cache_type=precision.gguf_cache_type(args.kv_bits),
                         tokenizer_gguf=args.tokenizer_gguf, tokenizer_pre=args.tokenizer_pre,
                         calib_windows=args.calib_windows, calib_length=args.calib_length, text=args.text,
                         threads=args.threads, force=args.force)
    size = info.path.stat().st_size / 1e6
    kind = (f"deepseek2 MLA, cache row C + R = {info.latent_dim} + {info.rope_dim}" if info.is_mla
            else f"{info.arch} (original attention)")
    per_token = ", ".join(f"{t} {info.kv_bytes_per_token(t)}" for t in ("f16", "q8_0", "q4_0")
                          if _kv_ok(info, t))
    print(f"wrote {info.path} ({size:.1f} MB, {weights} weights, for a {info.cache_type} cache): {kind}")
    for note in notes:
        print(f"  {note}")
    print(f"  llama.cpp KV cache bytes per token (all {info.n_layer} layers): {per_token}")
    return 0


def _kv_ok(info: GGUFInfo, kv_type: str) -> bool:
    try:
        check_kv_type(info, kv_type)
        return True
    except ValueError:
        return False


# --- loading ------------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    model: object  # transformers model (MLA layers when converted)
    tokenizer: object
    mla: dict | None
    folder: Path | None  # folder with HF tokenizer files
    name: str
    tokenizer_gguf: Path | None  # GGUF the model came from, whose tokenizer keys are copied


def load_model(spec) -> Loaded:
    """A converted folder (-> deepseek2) or a source model (-> its plain architecture), given as a path or
    name, or already loaded as a source.Source (the build hands over its objects)."""
    from edge_mla.convert import load_any

    src = spec if hasattr(spec, "model") else load_any(spec)
    mla = getattr(src.model.config, "mla", None)
    return Loaded(src.model, src.tokenizer, dict(mla) if mla else None, src.path, src.name, src.gguf)


# --- tokenizer ----------------------------------------------------------------------------------------------

Field = tuple  # (key, value, GGUFValueType, sub_type or None)


def tokenizer_fields_from_gguf(path: Path, n_vocab: int) -> list[Field]:
    """Every tokenizer.* key of a GGUF, values and types as they are (the vocab loader ignores the arch)."""
    reader = gguf.GGUFReader(path)
    fields = []
    for name, f in reader.fields.items():
        if name.startswith("tokenizer."):
            main = f.types[0]
            fields.append((name, f.contents(), main, f.types[-1] if main == GGUFValueType.ARRAY else None))
    tokens = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.ggml.tokens); give another --tokenizer-gguf")
    if len(tokens) != n_vocab:
        raise ValueError(f"the tokenizer in {path} has {len(tokens)} tokens but the model's embedding has {n_vocab} "
                         "rows: it is not this model's tokenizer; give the right --tokenizer-gguf")
    return fields


def guess_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, when its pre-tokenizer is a known one."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return KNOWN_SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def tokenizer_fields_from_hf(folder: Path, n_vocab: int, pre: str | None = None) -> list[Field]:
    """tokenizer.* keys from HF tokenizer files, the way llama.cpp's converter builds them for byte-level BPE."""
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise ValueError(f"{folder}: only byte-level BPE (GPT-2 style) HF tokenizers can be written to GGUF here. "
                         "Give --tokenizer-gguf FILE, a GGUF of the source model, to copy its tokenizer") from None
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = pre or guess_pre(tokenizer_json)
    if pre is None:
        raise ValueError(f"{folder}: cannot tell which llama.cpp pre-tokenizer this tokenizer uses; pass "
                         "--tokenizer-pre NAME (the name llama.cpp's convert_hf_to_gguf.py gives it) or "
                         "--tokenizer-gguf FILE")
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(int(token_type))
    # Added tokens that duplicate vocab entries come out NORMAL; llama.cpp needs specials as CONTROL.
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special")
                                     else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_vocab:
        raise ValueError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than the model's {n_vocab} "
                         "embedding rows")
    for i in range(len(tokens), n_vocab):  # embedding rows past the tokenizer (padding), as llama.cpp does
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.USER_DEFINED))
    scratch = gguf.GGUFWriter(None, "llama")
    scratch.add_tokenizer_model(vocab.tokenizer_model)
    scratch.add_tokenizer_pre(pre)
    scratch.add_token_list(tokens)
    scratch.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(scratch, quiet=True)
    return [(k, v.value, v.type, v.sub_type) for k, v in scratch.kv_data[0].items() if k.startswith("tokenizer.")]


def tokenizer_fields(loaded: Loaded, n_vocab: int, tokenizer_gguf: str | None, pre: str | None) -> list[Field]:
    if tokenizer_gguf:
        return tokenizer_fields_from_gguf(Path(tokenizer_gguf), n_vocab)
    if loaded.tokenizer_gguf is not None:
        return tokenizer_fields_from_gguf(loaded.tokenizer_gguf, n_vocab)
    if loaded.folder is not None and (loaded.folder / "tokenizer.json").exists():
        return tokenizer_fields_from_hf(loaded.folder, n_vocab, pre)
    if loaded.tokenizer is None:
        raise ValueError("the model has no tokenizer; give --tokenizer-gguf FILE")
    with tempfile.TemporaryDirectory() as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        return tokenizer_fields_from_hf(Path(tmp), n_vocab, pre)


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
    """Exact placement of per-layer rope frequencies on llama.cpp's geometric grid, or a clear error."""
    if align < 1:
        raise ValueError(f"--align must be at least 1, got {align}")
    step = 2 * math.log(base) / head_dim  # source pair k has frequency exp(-step k)
    grid = []
    for i, f in enumerate(inv_freqs):
        f = np.asarray(f, dtype=np.float64)
        k = -np.log(f) / step
        if np.any(np.abs(k - np.round(k)) > 1e-3) or np.any(np.round(k) < 0):
            raise ValueError(f"layer {i}: the rope frequencies are not on the plain RoPE grid of base {base:g} "
                             "(scaled RoPE such as llama3/yarn/linear?); llama.cpp's deepseek2 rope key cannot "
                             "express them exactly")
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

def _np(t) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _nonzero(t) -> float:
    return 0.0 if t is None else float(t.detach().abs().max())


def check_biases(model) -> None:
    """deepseek2 has no attention biases: exact only when the ones that matter are zero."""
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        worst = {"q_proj": _nonzero(attn.q_proj.bias),
                 "kv_a_proj (latent and rope key)": _nonzero(attn.kv_a_proj.bias),
                 "v_up (value)": _nonzero(attn.v_up_bias),
                 "o_proj": _nonzero(attn.o_proj.bias)}
        bad = {k: v for k, v in worst.items() if v > 0}
        if bad:
            name, value = next(iter(bad.items()))
            raise ValueError(
                f"layer {i} has a nonzero {name} bias (max |b| = {value:.3g}): llama.cpp's deepseek2 has no attention "
                "biases, so this model (Qwen2-style q/k/v biases) cannot be exported exactly (the key up-projection "
                "bias alone would be fine: it cancels in softmax). Export the original model instead, or use "
                "the ONNX export")
    if getattr(model.config, "mlp_bias", False):
        raise ValueError("the MLP has biases, which llama.cpp's deepseek2 FFN does not load; cannot export exactly")


def mla_layer_tensors(attn, layout: RopeLayout, layer: int, beta: float, eps: float) -> dict:
    """deepseek2 tensors of one MLA layer (float64 arrays, numpy shapes = reversed ggml shapes)."""
    H, G, N, R, C, d = (attn.num_heads, attn.num_groups, attn.nope_dim, attn.rope_dim, attn.latent_dim,
                        attn.head_dim)
    Rp, Cp, P = layout.rope_dim, layout.latent_dim, R // 2
    E = attn.q_proj.weight.shape[1]
    ch = layout.channel_of[layer]
    # llama.cpp scales scores by 1/sqrt(N + R'); ours is softmax_scale (1/sqrt(d)), and a rope scaling
    # factor multiplies cos and sin of both q and k.
    alpha = attn.scaling * math.sqrt(N + Rp)
    rope_gain = alpha * attn.rope_scaling ** 2
    q = _np(attn.q_proj.weight).reshape(H, N + R, E)
    q_out = np.zeros((H, N + Rp, E))
    q_out[:, :N] = q[:, :N] * alpha
    # NEOX pair p = rows (p, p + R/2) -> llama.cpp's NORM pair = rows (2j, 2j + 1) of channel j.
    q_out[:, N + 2 * ch] = q[:, N:N + P] * rope_gain
    q_out[:, N + 2 * ch + 1] = q[:, N + P:] * rope_gain
    kv = _np(attn.kv_a_proj.weight)
    kv_out = np.zeros((Cp + Rp, E))
    kv_out[:C] = kv[:C] * beta  # tiny latent: the RMSNorm then divides by sqrt(eps) exactly
    kv_out[Cp + 2 * ch] = kv[C:C + P]
    kv_out[Cp + 2 * ch + 1] = kv[C + P:]
    group = np.arange(H) // (H // G)
    k_up, v_up = _np(attn.k_up), _np(attn.v_up)
    k_b = np.zeros((H, Cp, N))
    k_b[:, :C] = k_up[group].transpose(0, 2, 1)  # W_uk^T per query head
    v_b = np.zeros((H, d, Cp))
    v_b[:, :, :C] = v_up[group]
    return {"attn_q.weight": q_out.reshape(H * (N + Rp), E), "attn_kv_a_mqa.weight": kv_out,
            "attn_kv_a_norm.weight": np.full(Cp, math.sqrt(eps) / beta),
            "attn_k_b.weight": k_b, "attn_v_b.weight": v_b, "attn_output.weight": _np(attn.o_proj.weight)}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """NEOX rows (i, i + d/2) of each head -> interleaved (2i, 2i + 1), as llama.cpp's Llama converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plain_layer_tensors(attn, arch: str, n_head: int, n_kv: int) -> dict:
    q, k = _np(attn.q_proj.weight), _np(attn.k_proj.weight)
    out = {"attn_v.weight": _np(attn.v_proj.weight), "attn_output.weight": _np(attn.o_proj.weight)}
    biases = {"attn_q.bias": attn.q_proj.bias, "attn_k.bias": attn.k_proj.bias, "attn_v.bias": attn.v_proj.bias,
              "attn_output.bias": attn.o_proj.bias}
    if arch == "llama":  # llama.cpp's llama uses interleaved rope; qwen2 keeps NEOX
        q, k = _permute(q, n_head), _permute(k, n_kv)
    out["attn_q.weight"], out["attn_k.weight"] = q, k
    for name, b in biases.items():
        if b is None:
            continue
        if arch == "qwen2" and name == "attn_output.bias":
            if _nonzero(b) > 0:
                raise ValueError("qwen2 in llama.cpp has no output-projection bias; cannot export exactly")
            continue
        b = _np(b)
        if arch == "llama" and name in ("attn_q.bias", "attn_k.bias"):
            b = _permute(b, n_head if name == "attn_q.bias" else n_kv)
        out[name] = b
    return out


def common_tensors(model) -> dict:
    tensors = {"token_embd.weight": _np(model.get_input_embeddings().weight),
               "output_norm.weight": _np(model.model.norm.weight)}
    if not model.config.tie_word_embeddings:
        tensors["output.weight"] = _np(model.get_output_embeddings().weight)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        tensors.update({f"blk.{i}.attn_norm.weight": _np(layer.input_layernorm.weight),
                        f"blk.{i}.ffn_norm.weight": _np(layer.post_attention_layernorm.weight),
                        f"blk.{i}.ffn_gate.weight": _np(mlp.gate_proj.weight),
                        f"blk.{i}.ffn_up.weight": _np(mlp.up_proj.weight),
                        f"blk.{i}.ffn_down.weight": _np(mlp.down_proj.weight)})
    return tensors


def tensor_type(name: str, shape: tuple, weights: str) -> QT:
    """Storage type of one tensor. Norms stay F32. attn_kv_a_mqa keeps an 8-bit exponent: its latent rows are
    scaled by 2^-30 or less and would underflow in F16 or in quant scales, so F32 (BF16 next to quantized
    weights: the same 8-bit precision, half the bytes of F32). Rows that are no multiple of 32 stay F16; with
    q4_0 the embedding/output head keeps 8 bits, as llama.cpp's own mixes do."""
    if len(shape) == 1 or weights in ("f32", "q4_k"):
        return QT.F32  # q4_k: llama.cpp's quantizer gets F32 and picks its own mix
    if name.endswith("attn_kv_a_mqa.weight"):
        return QT.F32 if weights == "f16" else KV_A_QUANTIZED
    if weights == "f16":
        return QT.F16
    qtype = QT.Q8_0 if weights == "q8_0" or name in ("token_embd.weight", "output.weight") else QT.Q4_0
    return qtype if shape[-1] % 32 == 0 else QT.F16


def encode(name: str, array: np.ndarray, weights: str) -> tuple[np.ndarray, QT]:
    qtype = tensor_type(name, array.shape, weights)
    if qtype == QT.F32:
        return array.astype(np.float32), qtype
    if qtype == QT.F16:
        return array.astype(np.float16), qtype
    if qtype == QT.BF16:
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


# --- latent norm --------------------------------------------------------------------------------------------

def latent_mean_squares(model, windows, padded_latent: int) -> list[float]:
    """Per layer, the largest mean(c^2) over calibration tokens, as llama.cpp's RMSNorm computes it over C'."""
    import torch

    worst = [0.0] * len(model.model.layers)

    def hook(i, C):
        def fn(module, args, output):
            c = output[..., :C].double()
            worst[i] = max(worst[i], float((c * c).sum(-1).max()) / padded_latent)
        return fn

    handles = [layer.self_attn.kv_a_proj.register_forward_hook(hook(i, layer.self_attn.latent_dim))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for window in windows:
                model.model(window[None], use_cache=False)  # the decoder only: no logits needed
    finally:
        for h in handles:
            h.remove()
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


# --- writing ------------------------------------------------------------------------------------------------

def _context_length(config) -> int:
    ctx = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < ctx:
        ctx = int(window)  # llama.cpp runs full attention here: exact only within the window
    return ctx


def _float_eps(config) -> float:
    return float(np.float32(config.rms_norm_eps))  # llama.cpp reads it as float32


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta") if isinstance(params, dict) else None
    return float(base or getattr(config, "rope_theta", None) or 10000.0)


def _write(path: Path, arch: str, keys: list, tokenizer: list[Field], tensors: dict, weights: str) -> None:
    writer = gguf.GGUFWriter(path, arch)
    for add, *values in keys:
        add(writer, *values)
    for key, value, vtype, sub in tokenizer:
        writer.add_key_value(key, value, vtype, sub)
    for name, array in tensors.items():
        data, qtype = encode(name, array, weights)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (QT.F32, QT.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _common_keys(config, n_vocab: int, n_head_kv: int) -> list:
    W = gguf.GGUFWriter
    keys = [(W.add_context_length, _context_length(config)),
            (W.add_embedding_length, config.hidden_size), (W.add_block_count, config.num_hidden_layers),
            (W.add_feed_forward_length, config.intermediate_size),
            (W.add_head_count, config.num_attention_heads), (W.add_head_count_kv, n_head_kv),
            (W.add_layer_norm_rms_eps, _float_eps(config)), (W.add_vocab_size, n_vocab)]
    return keys


def mla_export(loaded: Loaded, align: int, windows) -> tuple[str, list, dict, list[str]]:
    model, mla = loaded.model, loaded.mla
    config = model.config
    check_biases(model)
    layers = [layer.self_attn for layer in model.model.layers]
    head_dim, N, C, R = mla["head_dim"], mla["nope_dim"], mla["latent_dim"], mla["rope_dim"]
    if N < 1:
        raise ValueError(f"the model keeps no NoPE dims (nope_dim {N}); llama.cpp's deepseek2 needs at least one. "
                         "Convert with fewer rope pairs")
    selection = (mla.get("plan") or {}).get("selection", "?")
    layout = rope_layout([_np(a.inv_freq) for a in layers], _rope_base(config), head_dim, C, align, selection)
    eps = _float_eps(config)
    beta, headroom = latent_scale(latent_mean_squares(model, windows, layout.latent_dim), eps)
    tensors = common_tensors(model)
    for i, attn in enumerate(layers):
        for key, value in mla_layer_tensors(attn, layout, i, beta, eps).items():
            tensors[f"blk.{i}.{key}"] = value
    W = gguf.GGUFWriter
    Cp, Rp = layout.latent_dim, layout.rope_dim
    keys = _common_keys(config, tensors["token_embd.weight"].shape[0], 1) + [
        (W.add_key_length, Cp + Rp), (W.add_value_length, Cp), (W.add_key_length_mla, N + Rp),
        (W.add_value_length_mla, head_dim), (W.add_kv_lora_rank, Cp), (W.add_q_lora_rank, 0),
        (W.add_rope_dimension_count, Rp), (W.add_rope_freq_base, layout.freq_base),
        (W.add_leading_dense_block_count, config.num_hidden_layers),
        (W.add_expert_feed_forward_length, config.intermediate_size), (W.add_expert_shared_count, 0),
        (W.add_expert_weights_scale, 1.0),
        (W.add_string, "edge_mla.format", mla.get("format", "edge-mla/1")),
        (W.add_string, "edge_mla.selection", selection),
        (W.add_uint32, "edge_mla.latent_dim", C), (W.add_uint32, "edge_mla.rope_dim", R),
        (W.add_float32, "edge_mla.latent_scale", beta),
        (W.add_float32, "edge_mla.latent_headroom", min(headroom, 3e38))]
    notes = [f"rope: {R // 2} pairs on llama.cpp's grid (stride {layout.stride}), base {layout.freq_base:.6g}; "
             f"cache row C + R = {Cp} + {Rp} (folder: {C} + {R}{'; zero-padded' if (Cp, Rp) != (C, R) else ''})",
             f"latent norm neutralised: latent rows x 2^{round(math.log2(beta))}, norm weight sqrt(eps)/beta; "
             f"calibration max mean(c^2) could grow {headroom:.3g}x and stay exact in float32"]
    return "deepseek2", keys, tensors, notes


def plain_export(loaded: Loaded) -> tuple[str, list, dict, list[str]]:
    model = loaded.model
    config = model.config
    arch = "qwen2" if config.model_type == "qwen2" else "llama"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    base = _rope_base(config)
    rotary = model.model.rotary_emb
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise ValueError("the model's RoPE scales attention (yarn/longrope); llama.cpp's plain export does not "
                         "reproduce it exactly")
    if getattr(config, "mlp_bias", False):
        raise ValueError("the MLP has biases, which this export does not write")
    tensors = common_tensors(model)
    for i, layer in enumerate(model.model.layers):
        for key, value in plain_layer_tensors(layer.self_attn, arch, H, Hkv).items():
            tensors[f"blk.{i}.{key}"] = value
    default = base ** (-np.arange(0, head_dim, 2) / head_dim)
    factors = default / _np(rotary.inv_freq)
    notes = []
    if np.abs(factors - 1).max() > 1e-5:  # llama3-style scaled frequencies: llama's rope_freqs divides theta
        if arch != "llama":
            raise ValueError(f"{arch} in llama.cpp has no per-frequency RoPE factors; cannot export this RoPE")
        tensors["rope_freqs.weight"] = factors
        notes.append("rope: per-frequency factors written as rope_freqs")
    W = gguf.GGUFWriter
    keys = _common_keys(config, tensors["token_embd.weight"].shape[0], Hkv) + [
        (W.add_key_length, head_dim), (W.add_value_length, head_dim), (W.add_rope_dimension_count, head_dim),
        (W.add_rope_freq_base, base)]
    return arch, keys, tensors, notes


def export(model: str, out: str | Path, *, weights: str = "f16", align: int = DEFAULT_ALIGN,
           tokenizer_gguf: str | None = None, tokenizer_pre: str | None = None, calib_windows: int = 4,
           calib_length: int = 512, text: str | None = None, threads: int | None = None,
           force: bool = False, cache_type: str = "f16") -> tuple[GGUFInfo, list[str]]:
    """Write MODEL as a GGUF at OUT (atomically) and check it as llama.cpp would. Returns (info, notes).
    `cache_type` is the llama.cpp cache the file is meant to run with: recorded in it, used by `edge-mla run`."""
    out = Path(out)
    if cache_type not in precision.GGUF_CACHE_TYPE.values():
        raise ValueError(f"unknown cache type '{cache_type}': choose one of "
                         f"{', '.join(precision.GGUF_CACHE_TYPE.values())}")
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weight type '{weights}': choose one of {', '.join(WEIGHTS)}")
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} must end in .gguf (that is how `edge-mla run` recognises llama.cpp files)")
    refuse_existing(out, force)
    if tokenizer_gguf and not Path(tokenizer_gguf).is_file():
        raise FileNotFoundError(f"--tokenizer-gguf {tokenizer_gguf} does not exist")
    if weights == "q4_k":
        _quantizer()  # fail before the slow steps if llama.cpp is missing
    loaded = load_model(model)
    n_vocab = loaded.model.get_input_embeddings().weight.shape[0]
    tokenizer = tokenizer_fields(loaded, n_vocab, tokenizer_gguf, tokenizer_pre)
    if loaded.mla is not None:
        windows = calibration_windows(loaded.tokenizer, text, count=calib_windows, length=calib_length)
        arch, keys, tensors, notes = mla_export(loaded, align, windows)
    else:
        arch, keys, tensors, notes = plain_export(loaded)
    keys = keys + provenance_keys(loaded, weights, cache_type, text)
    del loaded
    # q4_k: an F32 file first; llama.cpp's quantizer then sets the file type itself.
    keys = keys + [(gguf.GGUFWriter.add_file_type, int(FILE_TYPES["f32" if weights == "q4_k" else weights]))]
    if weights in ("q8_0", "q4_0"):
        keys.append((gguf.GGUFWriter.add_quantization_version, gguf.GGML_QUANT_VERSION))
    with staged_file(out) as final:
        if weights == "q4_k":
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                _write(Path(tmp) / "f32.gguf", arch, keys, tokenizer, tensors, weights)
                del tensors
                llama_quantize(Path(tmp) / "f32.gguf", final, mla=arch == "deepseek2", threads=threads)
        else:
            _write(final, arch, keys, tokenizer, tensors, weights)
        info = check_gguf(final)  # our own checks, before anyone hands it to llama.cpp
    info.path = out
    return info, notes


def provenance_keys(loaded: Loaded, weights: str, cache_type: str, text: str | None) -> list:
    """general.* as llama.cpp's converter fills them (the source model's name, not a folder's), and edge_mla.*:
    the cache type the file was priced with and where it came from."""
    W = gguf.GGUFWriter
    source = loaded.mla.get("source") if loaded.mla else loaded.name
    record = provenance.record(source, mla=loaded.mla, bits=precision.CACHE_BITS_OF_TYPE.get(weights),
                               kv_bits=precision.CACHE_BITS_OF_TYPE[cache_type],
                               calibration=text or "built-in Wikipedia sample (gensim 4.4.0)")
    name = record["model_name"]
    params = sum(p.numel() for p in loaded.model.parameters())
    what = (f"Multi-head Latent Attention conversion of {name} by edge-mla (latent {loaded.mla['latent_dim']}, "
            f"rope {loaded.mla['rope_dim']})" if loaded.mla else f"{name}, exported by edge-mla")
    return [(W.add_name, name), (W.add_basename, name), (W.add_size_label, gguf.size_label(params, 0, 0, 0)),
            (W.add_description, what), (W.add_base_model_count, 1), (W.add_base_model_name, 0, name),
            (W.add_string, precision.GGUF_CACHE_KEY, cache_type),
            (W.add_string, PROVENANCE_KEY, json.dumps(record, sort_keys=True))]


# --- llama.cpp's quantizer (K-quants) -----------------------------------------------------------------------

def _quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise ValueError("--weights q4_k uses llama.cpp's own quantizer: install llama-cpp-python "
                         "(or export q8_0/q4_0, which gguf-py writes)") from None
    return llama_cpp


def llama_quantize(src: Path, dst: Path, *, mla: bool, threads: int | None = None) -> None:
    """Q4_K_M through llama.cpp's quantizer (in a child process: native code that can crash)."""
    from edge_mla.runtimes.llamacpp import run_isolated

    _quantizer()  # a missing package is named here, not in the child
    run_isolated(_llama_quantize, src, dst, mla=mla, threads=threads)


def _llama_quantize(src: Path, dst: Path, *, mla: bool, threads: int | None = None) -> None:
    """attn_kv_a_mqa keeps an 8-bit exponent (see tensor_type)."""
    llama_cpp = _quantizer()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads or os.cpu_count() or 1
    rules = [(b"attn_kv_a_mqa\\.weight", KV_A_QUANTIZED)] if mla else []
    overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
    for slot, (pattern, qtype) in zip(overrides, rules):
        slot.pattern, slot.type = pattern, int(qtype)
    overrides[len(rules)].pattern = None  # the list ends at a null pattern
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ValueError(f"llama.cpp's quantizer failed on {src} (code {rc})")
