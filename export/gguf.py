"""Export a model to GGUF for stock llama.cpp (MLA folders as deepseek2, originals as llama/qwen2).

A converted MLA folder becomes `deepseek2`, which llama.cpp runs with its compressed MLA cache; an original
model becomes a plain llama/qwen2 file.

`edge-mla export gguf MODEL --out FILE.gguf [--weights f32|f16|q8_0|q4_0|q4_k]`. MODEL is a converted folder
(`edge-mla convert --out`) or anything `edge-mla convert --model` accepts, so baselines go through the same
path. How each MLA tensor maps to llama.cpp, and why it is exact: docs/gguf.md.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from edge_mla import precision, provenance, shape
from edge_mla.publish import refuse_existing, staged_file
from edge_mla.plans import CALIBRATION_DEFAULTS
from edge_mla.export.gguf_tensors import (BETA_EXP_RANGE, HEADROOM, KV_A_QUANTIZED, RopeLayout, to_numpy,  # noqa: F401
                                          check_attention_biases, check_ffn, check_nope_dim, encode, encode_rows,
                                          ffn_tensors, head_tensors, latent_mean_squares, latent_scale,
                                          mla_layer_tensors, plain_layer_tensors, rope_layout)
from edge_mla.export.gguf_quantize import llama_quantize, require_quantizer
from edge_mla.export.gguf_tokenizer import Field, tokenizer_fields, tokenizer_fields_from_hf  # noqa: F401
from edge_mla.runtimes.gguf_file import GGUFInfo, check_gguf, check_kv_type

WEIGHTS = ("f32", "f16", "q8_0", "q4_0", "q4_k")
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_k": LlamaFileType.MOSTLY_Q4_K_M}
PROVENANCE_KEY = "edge_mla.provenance"  # JSON: source, plan, bits, calibration text, versions
DEFAULT_ALIGN = 32  # q8_0/q4_0 caches need C and C + R to be multiples of their block size, 32
POSITION_FREE_FACTOR = 1e30  # rope_freqs factor of a frequency-0 pair: position * theta / 1e30 rounds to 0


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
    parser.add_argument("--kv-bits", type=int, default=None, choices=precision.BITS,
                        help="the llama.cpp cache the file is meant for (recorded in it; `edge-mla run` uses it); "
                             "default: the weight bits, but 8 for a training-free conversion under 4-bit weights "
                             "(precision.default_cache_bits)")
    parser.add_argument("--align", type=int, default=DEFAULT_ALIGN,
                        help="pad C and C+R with exact zeros to multiples of this (32: q8_0/q4_0 caches work; "
                             "1: no padding)")
    parser.add_argument("--tokenizer-gguf", default=None,
                        help="copy the tokenizer.* keys from this GGUF (default: the source model's GGUF when "
                             "there is one, else built from the folder's HF tokenizer)")
    parser.add_argument("--tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name for an HF tokenizer (e.g. gpt-2, smollm, llama-bpe, qwen2)")
    windows, length = CALIBRATION_DEFAULTS["gguf"]
    parser.add_argument("--calib-windows", type=int, default=windows,
                        help="calibration windows for the latent-norm check")
    parser.add_argument("--calib-length", type=int, default=length, help="tokens per calibration window")
    parser.add_argument("--calib-text", "--text", dest="calib_text", nargs="+", default=None, metavar="FILE",
                        help="text or JSONL files for the latent-norm check (default: the built-in mixture of "
                             "kinds of text, docs/texts.md)")
    parser.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer (q4_k)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args) -> int:
    weights = args.weights or precision.gguf_weight_type(args.bits or 16)
    info, notes = export(args.model_dir, args.out, weights=weights, align=args.align,
                         cache_type=precision.gguf_cache_type(args.kv_bits) if args.kv_bits else None,
                         tokenizer_gguf=args.tokenizer_gguf, tokenizer_pre=args.tokenizer_pre,
                         calib_windows=args.calib_windows, calib_length=args.calib_length, text=args.calib_text,
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
    checkpoint: object = None  # layerwise.Checkpoint: the weights stay on disk, read a layer at a time


def load_model(spec) -> Loaded:
    """A converted folder (-> deepseek2) or a source model (-> its plain architecture), given as a path or
    name, or already loaded as a source.Source (the build hands over its objects). A folder's weights stay on
    disk and are read a layer at a time."""
    from edge_mla.mla_folder import load_any

    src = spec if hasattr(spec, "model") else load_any(spec, lazy=True)
    mla = getattr(src.model.config, "mla", None)
    return Loaded(src.model, src.tokenizer, dict(mla) if mla else None, src.path, src.name, src.gguf,
                  src.checkpoint)


# --- writing ------------------------------------------------------------------------------------------------

def _context_length(config) -> int:
    ctx = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < ctx:
        ctx = int(window)  # llama.cpp runs full attention here: exact only within the window
    return ctx


def _float_eps(config) -> float:
    return float(np.float32(config.rms_norm_eps))  # llama.cpp reads it as float32


def _write(path: Path, arch: str, keys: list, tokenizer: list[Field], tensors, weights: str,
           mla: dict | None) -> None:
    """`tensors`: (name, array) pairs, made one layer at a time; each is encoded and spooled to a temporary file
    as it comes (gguf-py's use_temp_file), so the model is never in memory whole."""
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
    for add, *values in keys:
        add(writer, *values)
    for key, value, vtype, sub in tokenizer:
        writer.add_key_value(key, value, vtype, sub)
    for name, array in tensors:
        data, qtype = encode_rows(name, array, weights, mla)
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
    head_dim, N, C, R = mla["head_dim"], mla["nope_dim"], mla["latent_dim"], mla["rope_dim"]
    layout = check_mla(loaded, align)
    selection = (mla.get("plan") or {}).get("selection", "?")
    eps = _float_eps(config)
    learned = mla.get("latent_norm_eps") is not None
    beta, headroom = (1.0, float("inf")) if learned else latent_scale(
        latent_mean_squares(model, windows, layout.latent_dim, loaded.checkpoint), eps)

    def tensors():  # one layer in memory at a time
        from edge_mla.layerwise import layers  # torch: imported when used (`edge-mla run` of ONNX never needs it)

        yield from head_tensors(model, loaded.checkpoint).items()
        for i, layer in layers(model, loaded.checkpoint, "GGUF tensors" if loaded.checkpoint else None):
            yield from ffn_tensors(layer, i).items()
            for key, value in mla_layer_tensors(layer.self_attn, layout, i, beta, eps).items():
                yield f"blk.{i}.{key}", value
    W = gguf.GGUFWriter
    Cp, Rp = layout.latent_dim, layout.rope_dim
    keys = _common_keys(config, model.get_input_embeddings().weight.shape[0], 1) + [
        (W.add_key_length, Cp + Rp), (W.add_value_length, Cp), (W.add_key_length_mla, N + Rp),
        (W.add_value_length_mla, head_dim), (W.add_kv_lora_rank, Cp), (W.add_q_lora_rank, 0),
        (W.add_rope_dimension_count, Rp), (W.add_rope_freq_base, layout.freq_base),
        (W.add_leading_dense_block_count, config.num_hidden_layers),
        (W.add_expert_feed_forward_length, config.intermediate_size), (W.add_expert_shared_count, 0),
        (W.add_expert_weights_scale, 1.0),
        (W.add_string, "edge_mla.format", mla.get("format", "edge-mla/1")),
        (W.add_string, "edge_mla.selection", selection),
        (W.add_uint32, "edge_mla.latent_dim", C), (W.add_uint32, "edge_mla.rope_dim", R)]
    if not learned:
        keys += [(W.add_float32, "edge_mla.latent_scale", beta),
                 (W.add_float32, "edge_mla.latent_headroom", min(headroom, 3e38))]
    notes = [f"rope: {R // 2} pairs on llama.cpp's grid (stride {layout.stride}), base {layout.freq_base:.6g}; "
             f"cache row C + R = {Cp} + {Rp} (folder: {C} + {R}{'; zero-padded' if (Cp, Rp) != (C, R) else ''})",
             "latent norm: the model's own, learned (attn_kv_a_norm; its eps carried by the scale of kv_a's latent "
             "rows)"
             if learned else
             f"latent norm neutralised: latent rows x 2^{round(math.log2(beta))}, norm weight sqrt(eps)/beta; "
             f"calibration max mean(c^2) could grow {headroom:.3g}x and stay exact in float32"]
    return "deepseek2", keys, tensors(), notes


def check_mla(loaded: Loaded, align: int) -> RopeLayout:
    """Everything deepseek2 needs of a converted model, checked before any work: biases, FFN, NoPE width, and the
    rope key's place on llama.cpp's grid (returned)."""
    from edge_mla.layerwise import resident

    model, mla = loaded.model, loaded.mla
    inv_freqs = []
    for i, layer in enumerate(model.model.layers):  # a lazy model: only the attention blocks are read here
        with resident(layer.self_attn, f"model.layers.{i}.self_attn.", loaded.checkpoint) as attn:
            check_attention_biases(i, {"q_proj": attn.q_proj.bias, "kv_a_proj (latent and rope key)":
                                       attn.kv_a_proj.bias, "v_up (value)": attn.v_up_bias, "o_proj": attn.o_proj.bias})
            inv_freqs.append(to_numpy(attn.inv_freq))
    check_ffn(model.config)
    check_nope_dim(mla["nope_dim"])
    selection = (mla.get("plan") or {}).get("selection", "?")
    return rope_layout(inv_freqs,
                       shape.rope_base(model.config), mla.get("rotary_dim", mla["head_dim"]), mla["latent_dim"], align,
                       selection)


def check_plain(model) -> None:
    """What the plain llama/qwen2 export of an original model cannot write; raises before any work."""
    from edge_mla import families

    config = model.config
    rotary = model.model.rotary_emb
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-6:
        raise ValueError("the model's RoPE scales attention (yarn/longrope); llama.cpp's plain export does not "
                         "reproduce it exactly")
    if getattr(config, "mlp_bias", False):
        raise ValueError("the MLP has biases, which this export does not write")
    uses_rope = families.rope_layers(config)
    if not all(uses_rope) and uses_rope != [(i + 1) % SMOLLM3_NOPE_STEP != 0 for i in range(len(uses_rope))]:
        raise ValueError(f"the original model's layers without RoPE are not every {SMOLLM3_NOPE_STEP}th layer, the "
                         "only pattern llama.cpp's smollm3 runs")
    if plain_arch(config) != "llama" and families.rotary_pairs(config) * 2 != families.head_dim(config):
        raise ValueError(f"{plain_arch(config)} in llama.cpp has no per-frequency factors for a partial rotary")


# llama.cpp's smollm3 skips RoPE in every 4th layer, a constant of its loader (no GGUF key says so)
SMOLLM3_NOPE_STEP = 4


def plain_arch(config) -> str:
    """llama.cpp's architecture for an original model: qwen2 (biases), qwen3 (q/k norms), smollm3 (NoPE layers),
    otherwise llama."""
    from edge_mla import families

    if config.model_type in ("qwen2", "qwen3"):
        return config.model_type
    return "smollm3" if not all(families.rope_layers(config)) else "llama"


def plain_export(loaded: Loaded) -> tuple[str, list, dict, list[str]]:
    model = loaded.model
    config = model.config
    check_plain(model)
    arch = plain_arch(config)
    head_dim = shape.head_dim(config)
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    base = shape.rope_base(config)
    rotary = model.model.rotary_emb
    default = base ** (-np.arange(0, head_dim, 2) / head_dim)
    inv_freq = to_numpy(rotary.inv_freq)
    # A position-free pair (partial rotary) has frequency 0: a factor so large that its angle stays 0 in float32.
    factors = np.where(inv_freq > 0, default / np.where(inv_freq > 0, inv_freq, 1.0), POSITION_FREE_FACTOR)
    notes = []
    if np.abs(factors - 1).max() > 1e-5:  # llama3-style scaled frequencies: llama's rope_freqs divides theta
        if arch != "llama":
            raise ValueError(f"{arch} in llama.cpp has no per-frequency RoPE factors; cannot export this RoPE")
        notes.append("rope: per-frequency factors written as rope_freqs")

    def tensors():  # one layer in memory at a time
        from edge_mla.layerwise import layers  # torch: imported when used (`edge-mla run` of ONNX never needs it)

        yield from head_tensors(model, loaded.checkpoint).items()
        for i, layer in layers(model, loaded.checkpoint, "GGUF tensors" if loaded.checkpoint else None):
            yield from ffn_tensors(layer, i).items()
            for key, value in plain_layer_tensors(layer.self_attn, arch, H, Hkv).items():
                yield f"blk.{i}.{key}", value
        if np.abs(factors - 1).max() > 1e-5:
            yield "rope_freqs.weight", factors
    W = gguf.GGUFWriter
    keys = _common_keys(config, model.get_input_embeddings().weight.shape[0], Hkv) + [
        (W.add_key_length, head_dim), (W.add_value_length, head_dim), (W.add_rope_dimension_count, head_dim),
        (W.add_rope_freq_base, base)]
    return arch, keys, tensors(), notes


def export(model: str, out: str | Path, *, weights: str = "f16", align: int = DEFAULT_ALIGN,
           tokenizer_gguf: str | None = None, tokenizer_pre: str | None = None,
           calib_windows: int = CALIBRATION_DEFAULTS["gguf"][0], calib_length: int = CALIBRATION_DEFAULTS["gguf"][1],
           text: str | None = None, threads: int | None = None,
           force: bool = False, cache_type: str | None = None, tokenizer=None) -> tuple[GGUFInfo, list[str]]:
    """Write MODEL as a GGUF at OUT (atomically) and check it as llama.cpp would. Returns (info, notes).
    `cache_type` is the llama.cpp cache the file is meant to run with: recorded in it, used by `edge-mla run`
    (None: precision's one policy, the weights' bits, 8 for a training-free conversion at 4). `tokenizer`: the
    model's, already loaded (the build's: its texts' token ids are cached for the process, data.token_ids)."""
    out = Path(out)
    if cache_type is not None and cache_type not in precision.GGUF_CACHE_TYPE.values():
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
        require_quantizer()  # fail before the slow steps if llama.cpp is missing
    loaded = load_model(model)
    if tokenizer is not None:
        loaded = replace(loaded, tokenizer=tokenizer)
    if cache_type is None:
        cache_type = precision.gguf_cache_type(precision.default_cache_bits_for(
            min(16, precision.WEIGHT_BITS_OF_TYPE[weights]), loaded.mla))
    if loaded.mla is not None:
        check_mla(loaded, align)  # refuse before the calibration pass and the tokenizer
    else:
        check_plain(loaded.model)
    n_vocab = loaded.model.get_input_embeddings().weight.shape[0]
    tokenizer = tokenizer_fields(loaded, n_vocab, tokenizer_gguf, tokenizer_pre)
    if loaded.mla is not None:
        from edge_mla.data import calibration_windows  # torch: imported when used, the CLI starts without it
        windows = None if loaded.mla.get("latent_norm_eps") is not None else calibration_windows(
            loaded.tokenizer, text, count=calib_windows, length=calib_length)  # the neutralisation's headroom
        arch, keys, tensors, notes = mla_export(loaded, align, windows)
    else:
        arch, keys, tensors, notes = plain_export(loaded)
    keys = keys + provenance_keys(loaded, weights, cache_type, text)
    mla = loaded.mla  # what the model was trained for decides some tensors' types
    del loaded
    # q4_k: an F32 file first; llama.cpp's quantizer then sets the file type itself.
    keys = keys + [(gguf.GGUFWriter.add_file_type, int(FILE_TYPES["f32" if weights == "q4_k" else weights]))]
    if weights in ("q8_0", "q4_0"):
        keys.append((gguf.GGUFWriter.add_quantization_version, gguf.GGML_QUANT_VERSION))
    with staged_file(out) as final:
        if weights == "q4_k":
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                _write(Path(tmp) / "f32.gguf", arch, keys, tokenizer, tensors, weights, mla)
                del tensors
                llama_quantize(Path(tmp) / "f32.gguf", final, mla=arch == "deepseek2", threads=threads)
        else:
            _write(final, arch, keys, tokenizer, tensors, weights, mla)
        info = check_gguf(final)  # our own checks, before anyone hands it to llama.cpp
    return replace(info, path=out), notes


def provenance_keys(loaded: Loaded, weights: str, cache_type: str, text) -> list:
    """general.* as llama.cpp's converter fills them (the source model's name, not a folder's), and edge_mla.*:
    the cache type the file was priced with and where it came from."""
    from edge_mla.data import calibration_label

    W = gguf.GGUFWriter
    source = loaded.mla.get("source") if loaded.mla else loaded.name
    record = provenance.record(source, mla=loaded.mla, bits=precision.CACHE_BITS_OF_TYPE.get(weights),
                               kv_bits=precision.CACHE_BITS_OF_TYPE[cache_type],
                               calibration=calibration_label(text) if loaded.mla else None)  # an original reads no text
    name = record["model_name"]
    params = sum(p.numel() for p in loaded.model.parameters())
    what = (f"Multi-head Latent Attention conversion of {name} by edge-mla (latent {loaded.mla['latent_dim']}, "
            f"rope {loaded.mla['rope_dim']})" if loaded.mla else f"{name}, exported by edge-mla")
    return [(W.add_name, name), (W.add_basename, name), (W.add_size_label, gguf.size_label(params, 0, 0, 0)),
            (W.add_description, what), (W.add_base_model_count, 1), (W.add_base_model_name, 0, name),
            (W.add_string, precision.GGUF_CACHE_KEY, cache_type),
            (W.add_string, PROVENANCE_KEY, json.dumps(record, sort_keys=True))]
