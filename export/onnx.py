"""Export a converted MLA model (or, as a baseline, an original one) to ONNX for onnxruntime.

The folder written holds model.onnx (+ model.onnx.data), the tokenizer files and edge_mla_onnx.json, which says the
cache layout, dtypes and scales; `edge-mla run DIR` runs it with onnxruntime, tokenizers and numpy only.
Every MLA layer's attention is one `ai.edge_mla:LatentAttention` node, a model-local function whose body stock
onnxruntime inlines (see onnx_graph.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edge_mla import precision, provenance
from edge_mla.publish import refuse_existing, staged_folder
from edge_mla.runtimes.onnxruntime import META

from edge_mla.export import onnx_graph, onnx_quant

FORMAT = "edge-mla-onnx/1"
WEIGHT_BITS = (4, 8, 16, 32)
KV_BITS = (4, 8, 16, 32)
BODIES = ("gqa", "matmul")  # LatentAttention bodies (onnx_graph.py)
QUANTIZED_CACHE_ORT = "1.27.0"  # first onnxruntime whose CPU GroupQueryAttention keeps an int8/int4 cache


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="folder written by `edge-mla convert` (or, with --original, any source "
                                          "model: a Hugging Face folder, a .gguf file or a built-in name)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--bits", "--weight-bits", dest="weight_bits", type=int, default=4,
                        help="weight bits: 4 or 8 (MatMulNBits), 16 or 32 (float)")
    parser.add_argument("--kv-bits", type=int, default=None,
                        help="cache: 4 (packed int4), 8 (int8), 16 or 32 (float); default: the weight bits")
    parser.add_argument("--block-size", type=int, default=32, help="weight quantization block (power of 2, >= 16)")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric weight blocks (with zero points)")
    parser.add_argument("--head-bits", type=int, default=None,
                        help="bits of the output head (default: the weight bits); 8 costs ~14 MB on SmolLM2, "
                             "keeps more quality")
    parser.add_argument("--weight-method", default="rtn", choices=("rtn", "hqq"),
                        help="4-bit weights: rtn (round to nearest, symmetric unless --asymmetric; fast) or hqq "
                             "(optimized float zero points: much closer to float, but onnxruntime 1.31's CPU "
                             "kernel has no fast path for them, ~14x slower decode; see docs/onnx.md)")
    parser.add_argument("--accuracy-level", type=int, default=4,
                        help="MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32")
    parser.add_argument("--attention", default="gqa", choices=BODIES,
                        help="LatentAttention body: gqa (com.microsoft GroupQueryAttention) or matmul (plain ops: "
                             "one MatMul of all heads against the cache; any onnxruntime); both update the cache "
                             "in place (docs/onnx.md compares them)")
    parser.add_argument("--original", action="store_true",
                        help="export an unconverted model with standard GQA attention (the baseline to compare)")
    parser.add_argument("--calib-text", default=None, help="text for the cache scales (default: built-in "
                                                           "Wikipedia calibration part)")
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows for the cache scales")
    parser.add_argument("--calib-length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--genai", action="store_true", help="also write onnxruntime-genai's genai.onnx and "
                                                             "genai_config.json (docs/phones.md)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args) -> int:
    t0 = time.perf_counter()
    out = export(args.model_dir, args.out, weight_bits=args.weight_bits, kv_bits=args.kv_bits,
                 block_size=args.block_size, symmetric=not args.asymmetric, head_bits=args.head_bits,
                 weight_method=args.weight_method, accuracy_level=args.accuracy_level, body=args.attention, original=args.original,
                 calib_text=args.calib_text, calib_windows=args.calib_windows, calib_length=args.calib_length,
                 overwrite=args.force, genai=args.genai)
    meta = json.loads((out / META).read_text())
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    cache = meta["cache"]
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: model {size / 1e6:.1f} MB, weights "
          f"{meta['weights']['bits']}-bit, cache {cache['dtype']} {cache['bytes_per_token']} bytes/token "
          f"({cache['kind']}), context up to {meta['max_context']}")
    return 0


def check_options(weight_bits: int, kv_bits: int, block_size: int, body: str, head_bits: int | None,
                  weight_method: str = "rtn") -> None:
    """Refuse unsupported settings before any work, naming the fix."""
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"--weight-bits {weight_bits} is not supported: choose one of {WEIGHT_BITS}")
    if kv_bits not in KV_BITS:
        raise ValueError(f"--kv-bits {kv_bits} is not supported: choose one of {KV_BITS}")
    if head_bits is not None and head_bits not in (4, 8):
        raise ValueError(f"--head-bits {head_bits} is not supported: choose 4 or 8")
    if head_bits is not None and weight_bits not in (4, 8):
        raise ValueError("--head-bits applies to quantized weights; use it with --weight-bits 4 or 8")
    if weight_method not in ("hqq", "rtn"):
        raise ValueError(f"--weight-method {weight_method} is not supported: choose hqq or rtn")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"--block-size {block_size} is not supported: MatMulNBits needs a power of two >= 16")
    if body not in BODIES:
        raise ValueError(f"--attention {body} is not supported: choose one of {BODIES}")
    if kv_bits in (4, 8) and body == "gqa":  # the matmul body quantizes with plain ops
        import onnxruntime

        if _version(onnxruntime.__version__) < _version(QUANTIZED_CACHE_ORT):
            raise ValueError(f"an int{kv_bits} cache needs onnxruntime >= {QUANTIZED_CACHE_ORT} (installed "
                             f"{onnxruntime.__version__}): pip install -U onnxruntime, or export with --kv-bits 16 "
                             "or --attention matmul")


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def load_model(spec: str, original: bool):
    """(model, tokenizer) of a converted folder, or of any source model when `original`."""
    from edge_mla.convert import is_converted, load_any

    path = Path(spec)
    if original and is_converted(path):
        raise ValueError(f"{spec} is already converted to MLA; drop --original to export it with "
                         "LatentAttention, or give the source model to export the baseline")
    if not original and not is_converted(path):
        if (path / "config.json").exists():
            raise ValueError(f"{spec} is not a converted MLA model (its config.json has no 'mla' section): convert "
                             f"it first with `edge-mla convert --model {spec} --out DIR`, or pass --original to "
                             "export the unconverted model as a baseline")
        if not path.exists():
            raise ValueError(f"{spec} does not exist: give the --out folder of `edge-mla convert` (or pass "
                             "--original with a source model)")
    src = load_any(spec)
    return src.model, src.tokenizer


# ---------------------------------------------------------------------------------------------------------------
# torch model -> onnx_graph.Decoder

def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


def check_config(cfg) -> None:
    """What the decoder graph cannot express, from the configuration alone (the preflight calls it too)."""
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"activation '{cfg.hidden_act}' is not supported by the ONNX export (SiLU MLPs only)")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("MLP biases are not supported by the ONNX export")


def check_original(model) -> None:
    """What the baseline (original attention, GroupQueryAttention) export cannot express."""
    from edge_mla import families

    check_config(model.config)
    scaled = abs(float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) - 1.0) > 1e-6
    if scaled and families.rotary_pairs(model.config) * 2 != families.head_dim(model.config):
        raise ValueError("RoPE attention scaling with a partial rotary: the baseline's rotary table would scale the "
                         "position-free dims too")


def _common(model) -> dict:
    cfg = model.config
    check_config(cfg)
    m = model.model
    embed, lm_head = _np(m.embed_tokens.weight), _np(model.lm_head.weight)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                eps=float(cfg.rms_norm_eps), embed=embed, final_norm=_np(m.norm.weight), lm_head=lm_head,
                tied=bool(np.array_equal(embed, lm_head)), max_positions=int(cfg.max_position_embeddings))


def _layer_common(layer) -> dict:
    mlp = layer.mlp
    if any(getattr(p, "bias", None) is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        raise ValueError("MLP biases are not supported by the ONNX export")
    return dict(input_norm=_np(layer.input_layernorm.weight), post_norm=_np(layer.post_attention_layernorm.weight),
                gate=_np(mlp.gate_proj.weight), up=_np(mlp.up_proj.weight), down=_np(mlp.down_proj.weight))


def latent_padding(latent: int, rope: int) -> int:
    """Zero channels appended to the latent so that C + R is a multiple of 8, as GroupQueryAttention needs.
    They are zero in the cache and in every weight that touches them, so the result is unchanged."""
    return -(latent + rope) % 8


def hadamard(n: int) -> np.ndarray:
    """An orthogonal n x n matrix that spreads every direction over all channels: Sylvester's Hadamard matrix
    when n is a power of two, else a fixed random rotation."""
    if n & (n - 1) == 0:
        h = np.ones((1, 1))
        while len(h) < n:
            h = np.block([[h, h], [h, -h]])
        return h / np.sqrt(n)
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def decoder_from_mla(model, rotate_latent: bool = False) -> onnx_graph.Decoder:
    """The MLA model's weights; the latent zero-padded for the kernel and, when `rotate_latent`, turned by an
    orthogonal matrix Q (cache Q c; k_up and v_up times Q^T), which leaves every score and output unchanged but
    evens out the channels that a quantized cache must represent."""
    mla = model.config.mla
    C, R = mla["latent_dim"], mla["rope_dim"]
    pad = latent_padding(C, R)
    norm_eps = mla.get("latent_norm_eps")
    if rotate_latent and norm_eps is not None:
        raise ValueError("rotate_latent: this model has a learned latent norm, whose per-channel weight does not "
                         "commute with a rotation; export it without rotate_latent")
    rot = hadamard(C + pad) if rotate_latent else np.eye(C + pad)
    layers = []
    for layer in model.model.layers:
        a = layer.self_attn
        kv_a = _np(a.kv_a_proj.weight)
        entry = _layer_common(layer)
        latent_rows = rot @ np.concatenate([kv_a[:C], np.zeros((pad, kv_a.shape[1]), np.float32)])
        entry.update(
            q=_np(a.q_proj.weight), q_bias=_np(a.q_proj.bias),
            kv_a=np.concatenate([latent_rows, kv_a[C:]]).astype(np.float32),
            # k_up_bias cancels in softmax: dropped
            k_up=(np.pad(_np(a.k_up), ((0, 0), (0, 0), (0, pad))) @ rot.T).astype(np.float32),
            v_up=(np.pad(_np(a.v_up), ((0, 0), (0, 0), (0, pad))) @ rot.T).astype(np.float32),
            v_up_bias=_np(a.v_up_bias), o=_np(a.o_proj.weight), o_bias=_np(a.o_proj.bias), inv_freq=_np(a.inv_freq))
        if norm_eps is not None:
            entry["latent_norm"] = np.pad(_np(a.latent_norm.weight), (0, pad))
        if a.q_proj.bias is not None:
            b = _np(a.kv_a_proj.bias)
            entry["kv_a_bias"] = np.concatenate([rot @ np.concatenate([b[:C], np.zeros(pad)]), b[C:]]).astype(np.float32)
        layers.append(entry)
    return onnx_graph.Decoder(kind="mla", head_dim=mla["head_dim"], layers=layers,
                              latent_rotation=rot if rotate_latent else None, latent_norm_eps=norm_eps,
                              latent_channels=C,
                              softmax_scale=mla["softmax_scale"], rope_scaling=mla.get("rope_attention_scaling", 1.0),
                              num_groups=mla["num_groups"], nope_dim=mla["nope_dim"], rope_dim=R,
                              latent_dim=C + pad, **_common(model))


def decoder_from_original(model) -> onnx_graph.Decoder:
    from edge_mla.convert import head_dim_of

    from edge_mla import families

    cfg = model.config
    check_original(model)
    d = head_dim_of(cfg)
    layers = []
    for layer in model.model.layers:
        a = layer.self_attn
        entry = _layer_common(layer)
        entry.update(q=_np(a.q_proj.weight), k=_np(a.k_proj.weight), v=_np(a.v_proj.weight), o=_np(a.o_proj.weight),
                     q_bias=_np(a.q_proj.bias), k_bias=_np(a.k_proj.bias), v_bias=_np(a.v_proj.bias),
                     o_bias=_np(a.o_proj.bias), rotary=bool(getattr(a, "use_rope", True)))  # SmolLM3: NoPE layers
        if families.has_qk_norm(model):  # Qwen3: per-head RMSNorm of q and k before RoPE
            entry.update(q_norm=_np(a.q_norm.weight), k_norm=_np(a.k_norm.weight))
        layers.append(entry)
    rotary = model.model.rotary_emb
    return onnx_graph.Decoder(kind="baseline", head_dim=d, layers=layers, softmax_scale=d ** -0.5,
                              rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
                              kv_heads=cfg.num_key_value_heads, inv_freq=_np(rotary.inv_freq), **_common(model))


# ---------------------------------------------------------------------------------------------------------------
# cache scales

def cache_entries(model, windows) -> list[list[np.ndarray]]:
    """What the model caches on `windows`, per layer: MLA [tokens, C+R]; baseline [K [tokens, kvH, d], V ...]."""
    import torch

    from edge_mla.mla import cached_tensors, forward_with_cache

    per_layer = None
    with torch.no_grad():
        for window in windows:
            _, cache = forward_with_cache(model, window[None])
            got = []
            for keys, values in cached_tensors(cache):
                k = keys[0].transpose(0, 1).float().numpy()  # [T, heads, width]
                got.append([k] if values.shape[-1] == 0 else [k, values[0].transpose(0, 1).float().numpy()])
            per_layer = got if per_layer is None else [[np.concatenate([a, b]) for a, b in zip(p, g)]
                                                       for p, g in zip(per_layer, got)]
    return per_layer


def calibrate_scales(model, dec: onnx_graph.Decoder, bits: int, windows) -> list:
    """Static per-channel dequantization scales of the cache, fitted to the model's own cache on text."""
    scales = []
    for i, parts in enumerate(cache_entries(model, windows)):
        if dec.kind == "mla":
            C = model.config.mla["latent_dim"]
            x = parts[0][:, 0]
            latent = np.concatenate([x[:, :C], np.zeros((len(x), dec.latent_dim - C), np.float32)], 1)
            if dec.latent_rotation is not None:
                latent = latent @ dec.latent_rotation.T
            x = np.concatenate([latent, x[:, C:]], 1)
            groups = onnx_quant.pair_groups(dec.cache_width, dec.latent_dim, dec.rope_dim)
            scales.append(onnx_quant.channel_scales(x, bits, groups).reshape(1, 1, 1, -1))
        else:
            d, heads = dec.head_dim, dec.kv_heads
            k_groups = np.concatenate([onnx_quant.pair_groups(d, 0, d) + h * d for h in range(heads)])
            k = onnx_quant.channel_scales(parts[0].reshape(len(parts[0]), -1), bits, k_groups)
            v = onnx_quant.channel_scales(parts[1].reshape(len(parts[1]), -1), bits, np.arange(heads * d))
            scales.append((k.reshape(1, heads, 1, d), v.reshape(1, heads, 1, d)))
    return scales


# ---------------------------------------------------------------------------------------------------------------
# the folder

def chat_template_parts(tokenizer) -> dict | None:
    """The chat template rendered around a marker, so the runner can wrap a prompt without jinja."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\u2063PROMPT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(marker) != 1:
        return None
    prefix, suffix = text.split(marker)
    return {"prefix": prefix, "suffix": suffix}


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def metadata(dec: onnx_graph.Decoder, opts: onnx_graph.Options, model, tokenizer, weights: dict, source: str) -> dict:
    import onnx
    import onnxruntime

    kv_name, _, per_byte = onnx_graph.CACHE_TYPES[opts.kv_bits]
    tensors = onnx_graph.cache_tensors(dec, opts)
    bytes_per_token = sum(t["heads"] * t["width"] * np.dtype(t["dtype"]).itemsize for t in tensors)
    cache = {
        "kind": "latent" if dec.kind == "mla" else "kv",
        "mode": "inplace",
        "attention_body": opts.body if dec.kind == "mla" else None,
        "dtype": precision.ONNX_CACHE_DTYPE[opts.kv_bits],
        "storage_dtype": kv_name,
        "layout": "[batch, heads, tokens, width]; latent: one head, width = latent_dim + rope_dim numbers "
                  "([c | rotated k_rope]), int4 packed two per byte (low nibble first, code + 8)",
        "bytes_per_token": int(bytes_per_token),
        "tensors": tensors,
    }
    if dec.kind == "mla":
        cache.update(latent_dim=dec.latent_dim, rope_dim=dec.rope_dim,
                     latent_padding=dec.latent_dim - model.config.mla["latent_dim"])
    else:
        cache.update(kv_heads=dec.kv_heads, head_dim=dec.head_dim)
    if opts.cache_scales is not None:
        cache["scales"] = {"kind": "static per channel (x = code * scale)", "calibration": weights.pop("calib"),
                           "layers": [np.asarray(s).round(8).ravel().tolist() if dec.kind == "mla" else
                                      {"key": s[0].ravel().tolist(), "value": s[1].ravel().tolist()}
                                      for s in opts.cache_scales]}
    else:
        weights.pop("calib", None)
    return {
        "format": FORMAT,
        "model": "model.onnx",
        "architecture": dec.kind,
        "source": source,
        "vocab_size": dec.vocab_size,
        "num_layers": len(dec.layers),
        "max_context": dec.max_positions,
        "eos_token_ids": eos_ids(model, tokenizer),
        "chat": chat_template_parts(tokenizer),
        "weights": weights,
        "cache": cache,
        "attention_op": f"{onnx_graph.DOMAIN}:LatentAttention" if dec.kind == "mla" else
                        "com.microsoft:GroupQueryAttention",
        "min_onnxruntime": QUANTIZED_CACHE_ORT if opts.kv_bits in (4, 8) and opts.body == "gqa" else "1.20.0",
        "exported_with": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
    }


def export(model_dir: str, out: str | Path, *, weight_bits: int = 4, kv_bits: int | None = None,
           block_size: int = 32, symmetric: bool = True, head_bits: int | None = None, accuracy_level: int = 4,
           weight_method: str = "rtn", rotate_latent: bool = False, body: str = "gqa", original: bool = False,
           calib_text: str | None = None, calib_windows: int = 8, calib_length: int = 512, overwrite: bool = False,
           model=None, tokenizer=None, genai: bool = False) -> Path:
    """Write the ONNX folder for `model_dir` at `out`, all or nothing. (model, tokenizer) may be given loaded."""
    import onnx

    out = Path(out)
    kv_bits = kv_bits if kv_bits is not None else weight_bits
    check_options(weight_bits, kv_bits, block_size, body, head_bits, weight_method)
    refuse_existing(out, overwrite)
    if model is None:
        model, tokenizer = load_model(model_dir, original)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the runner needs a fast tokenizer (tokenizer.json); this model's tokenizer is not one")
    dec = decoder_from_original(model) if original else decoder_from_mla(model, rotate_latent)
    if body != "gqa" and dec.kind != "mla":
        raise ValueError(f"--attention {body} applies to MLA models; the baseline always uses GroupQueryAttention")

    quantized = weight_bits in (4, 8)
    opts = onnx_graph.Options(kv_bits=kv_bits, body=body, fp16_weights=weight_bits == 16,
                              tie_head=dec.tied and not quantized, block_size=block_size,
                              # int4 up-projections cost +35% perplexity on SmolLM2, int8 +0.1% (docs/onnx.md),
                              # unless the recovery trained through their 4-bit round trip
                              up_bits=(4 if weight_bits == 4 and (getattr(model.config, "mla", None) or {}).get(
                                  "four_bit_up_projections") else 8) if quantized else weight_bits)
    calib = None
    if kv_bits in (4, 8):
        from edge_mla.data import calibration_windows  # torch: imported when used, the CLI starts without it
        windows = calibration_windows(tokenizer, calib_text, count=calib_windows, length=calib_length)
        opts.cache_scales = calibrate_scales(model, dec, kv_bits, windows)
        calib = {"windows": int(windows.shape[0]), "tokens_per_window": int(windows.shape[1]),
                 "text": calib_text or "built-in Wikipedia calibration part (edge_mla.data)"}
    proto = onnx_graph.build_model(dec, opts)
    weights = {"bits": weight_bits, "calib": calib}
    shared = dec.tied and (not quantized or symmetric)
    if quantized:
        weight_method = weight_method if weight_bits == 4 else "rtn"  # 8-bit round-to-nearest is close to float
        proto = onnx_quant.quantize_weights(proto, weight_bits, block_size, symmetric, accuracy_level, head_bits,
                                            weight_method, share_embedding=shared)
        head = head_bits or weight_bits
        weights.update(format="MatMulNBits", method=weight_method, block_size=block_size, symmetric=symmetric,
                       accuracy_level=accuracy_level, head_bits=head,
                       embedding=f"the output head's int{head} table (GatherBlockQuantized)" if shared else
                       "GatherBlockQuantized int4" if weight_bits == 4 else "float32")
    else:
        weights.update(format="float16 stored, float32 compute" if weight_bits == 16 else "float32",
                       embedding="shared with the output head" if shared else "separate")
    if dec.kind == "mla":
        weights["up_projections"] = {4: "int4", 8: "int8", 16: "float16", 32: "float32"}[opts.up_bits] + (
            f" (blocks of {block_size}, DequantizeLinear)" if opts.up_bits in (4, 8) else "")
    mla = getattr(model.config, "mla", None)
    source = mla.get("source") if mla else str(model_dir)  # a converted folder may be a deleted staging path
    meta = metadata(dec, opts, model, tokenizer, weights, source)
    meta["provenance"] = provenance.record(source, mla=mla, bits=weight_bits, kv_bits=kv_bits,
                                           calibration=(calib or {}).get("text"))

    with staged_folder(out) as staging:
        onnx.save_model(proto, str(staging / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        tokenizer.save_pretrained(staging)
        (staging / META).write_text(json.dumps(meta, indent=1))
        smoke_test(staging)
        if genai:
            from edge_mla.export.onnx_genai import add_genai
            add_genai(staging)
    return out


def smoke_test(folder: Path) -> None:
    """Load the export with onnxruntime and run a short prompt and one decode step, before it is published."""
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    dec = OnnxDecoder(folder, threads=1, context=8)
    logits = dec.forward(np.arange(1, 5, dtype=np.int64))
    logits = dec.forward(np.array([int(logits[-1].argmax())], np.int64))
    if not np.isfinite(logits).all():
        raise ValueError(f"the exported model gives non-finite logits; please report this ({folder})")

