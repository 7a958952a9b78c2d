"""Export a converted MLA model (or, as a baseline, an original one) to ONNX for onnxruntime.

The folder written holds model.onnx (+ model.onnx.data), the tokenizer files and edge_mla_onnx.json, which says the
cache layout, dtypes and scales; `edge-mla run DIR` runs it with onnxruntime, tokenizers and numpy only.
Every MLA layer's attention is one `ai.edge_mla:LatentAttention` node, a model-local function whose body stock
onnxruntime inlines (see onnx_decoder.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edge_mla import precision, provenance
from edge_mla.publish import refuse_existing, staged_folder
from edge_mla.plans import CALIBRATION_DEFAULTS
from edge_mla.runtimes.onnxruntime import IN_CHILD_ABOVE, META

from edge_mla.export import onnx_decoder, onnx_graph, onnx_latent_attention
from edge_mla.export.onnx_weights import decoder_from_mla, decoder_from_original, layer_scales

FORMAT = "edge-mla-onnx/1"
WEIGHT_BITS = (4, 8, 16, 32)
KV_BITS = (4, 8, 16, 32)
BODIES = ("gqa", "matmul")  # LatentAttention bodies (onnx_latent_attention.py)
PREFILL_FORMS = ("expanded", "absorbed")  # MLA prompt chunks (onnx_graph.prefill_form)
KV_SCALES = ("q4_0", "row", "channel")  # int4 cache scales: llama.cpp's q4_0 blocks, one per row, static ones
QUANTIZED_CACHE_ORT = "1.27.0"  # first onnxruntime whose CPU GroupQueryAttention keeps an int8/int4 cache


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="folder written by `edge-mla convert` (or, with --original, any source "
                                          "model: a Hugging Face folder, a .gguf file or a built-in name)")
    parser.add_argument("-o", "--out", required=True, help="output folder")
    parser.add_argument("--bits", "--weight-bits", dest="weight_bits", type=int, default=4,
                        help="weight bits: 4 or 8 (MatMulNBits), 16 or 32 (float)")
    parser.add_argument("--kv-bits", type=int, default=None,
                        help="cache: 4 (packed int4), 8 (int8), 16 or 32 (float); default: the weight bits, but 8 "
                             "for a training-free conversion under 4-bit weights (precision.default_cache_bits)")
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
    parser.add_argument("--prefill", default="expanded", choices=PREFILL_FORMS,
                        help="MLA prompt chunks: expanded (up-project the cached latent to per-group keys and "
                             "values and attend as the original model does: 2-3x faster prefill, the default) or "
                             "absorbed (the decode form for every chunk); the cache is the same (docs/onnx.md)")
    parser.add_argument("--kv-scales", default="channel", choices=KV_SCALES,
                        help="int4 cache scales: q4_0 (llama.cpp's q4_0 blocks: a float16 scale per 32 values of "
                             "each row; C + R a multiple of 32), row (one scale per row over static per-channel "
                             "ones): the matmul body only, better quality at a slower decode (docs/onnx.md); or "
                             "channel (static per channel, GroupQueryAttention's; the default)")
    parser.add_argument("--original", action="store_true",
                        help="export an unconverted model with standard GQA attention (the baseline to compare)")
    parser.add_argument("--calib-text", nargs="+", default=None, metavar="FILE",
                        help="text or JSONL files for the cache scales (default: the built-in mixture of kinds of "
                             "text, docs/texts.md)")
    windows, length = CALIBRATION_DEFAULTS["onnx"]
    parser.add_argument("--calib-windows", type=int, default=windows, help="calibration windows for the cache scales")
    parser.add_argument("--calib-length", type=int, default=length, help="tokens per calibration window")
    parser.add_argument("--genai", action="store_true", help="also write onnxruntime-genai's genai.onnx and "
                                                             "genai_config.json (docs/phones.md)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def main(args) -> int:
    t0 = time.perf_counter()
    out = export(args.model_dir, args.out, weight_bits=args.weight_bits, kv_bits=args.kv_bits,
                 block_size=args.block_size, symmetric=not args.asymmetric, head_bits=args.head_bits,
                 weight_method=args.weight_method, accuracy_level=args.accuracy_level, body=args.attention,
                 original=args.original, prefill=args.prefill,
                 calib_text=args.calib_text, calib_windows=args.calib_windows, calib_length=args.calib_length,
                 overwrite=args.force, genai=args.genai, kv_scales=args.kv_scales)
    meta = json.loads((out / META).read_text())
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    cache = meta["cache"]
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: model {size / 1e6:.1f} MB, weights "
          f"{meta['weights']['bits']}-bit, cache {cache['dtype']} {cache['bytes_per_token']} bytes/token "
          f"({cache['kind']}), context up to {meta['max_context']}")
    return 0


def check_options(weight_bits: int, kv_bits: int, block_size: int, body: str, head_bits: int | None,
                  weight_method: str = "rtn", kv_scales: str = "channel", prefill: str = "expanded") -> None:
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
    if prefill not in PREFILL_FORMS:
        raise ValueError(f"--prefill {prefill} is not supported: choose one of {PREFILL_FORMS}")
    if body not in BODIES:
        raise ValueError(f"--attention {body} is not supported: choose one of {BODIES}")
    if kv_scales not in KV_SCALES:
        raise ValueError(f"--kv-scales {kv_scales} is not supported: choose one of {KV_SCALES}")
    if kv_scales != "channel" and (kv_bits != 4 or body != "matmul"):
        raise ValueError(f"--kv-scales {kv_scales} needs the int4 cache and the matmul body (--kv-bits 4 "
                         "--attention matmul); GroupQueryAttention keeps static scales only: use --kv-scales channel")
    if kv_bits in (4, 8) and body == "gqa":  # the matmul body quantizes with plain ops
        import onnxruntime

        if _version(onnxruntime.__version__) < _version(QUANTIZED_CACHE_ORT):
            raise ValueError(f"an int{kv_bits} cache needs onnxruntime >= {QUANTIZED_CACHE_ORT} (installed "
                             f"{onnxruntime.__version__}): pip install -U onnxruntime, or export with --kv-bits 16 "
                             "or --attention matmul")


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def load_model(spec: str, original: bool):
    """A converted folder, or any source model when `original`, as a source.Source: a folder's weights stay on disk
    and are read a layer at a time (layerwise.py)."""
    from edge_mla.mla_folder import is_converted, load_any

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
    return load_any(spec, lazy=True)


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
    if dec.kind == "mla":  # which form runs prompt chunks, from how many new tokens (docs/onnx.md)
        form = onnx_graph.prefill_form(dec, opts)
        cache["prefill"] = {"form": form, "from_tokens": onnx_graph.prefill_from(dec) if form == "expanded" else None,
                            "work_bytes_per_token": onnx_graph.prefill_work_bytes(dec) if form == "expanded" else 0}
    if dec.kind == "mla" and onnx_graph.prefill_chunk(dec, opts):
        cache["prefill_chunk"] = onnx_graph.prefill_chunk(dec, opts)
    if dec.kind == "mla":
        cache.update(latent_dim=dec.latent_dim, rope_dim=dec.rope_dim,
                     latent_padding=dec.latent_dim - model.config.mla["latent_dim"])
    else:
        cache.update(kv_heads=dec.kv_heads, head_dim=dec.head_dim)
    if opts.cache_scales is not None:
        kind = ("static per channel and one per row (x = code * row scale * channel scale; the row scales in "
                "past_group_scale.N)" if opts.cache_scales_mode == "row" else
                "llama.cpp's q4_0 blocks of 32 (x = d (nibble - 8), d float16 in past_group_scale.N)"
                if opts.cache_scales_mode == "q4_0" else "static per channel (x = code * scale)")
        cache["scales"] = {"kind": kind, "calibration": weights.pop("calib"),
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
        "attention_op": f"{onnx_latent_attention.DOMAIN}:LatentAttention" if dec.kind == "mla" else
                        "com.microsoft:GroupQueryAttention",
        "min_onnxruntime": QUANTIZED_CACHE_ORT if opts.kv_bits in (4, 8) and opts.body == "gqa" else "1.20.0",
        "exported_with": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
    }


def export(model_dir: str, out: str | Path, *, weight_bits: int = 4, kv_bits: int | None = None,
           block_size: int = 32, symmetric: bool = True, head_bits: int | None = None, accuracy_level: int = 4,
           weight_method: str = "rtn", rotate_latent: bool = False, body: str = "gqa", original: bool = False,
           calib_text: str | list[str] | None = None, calib_windows: int = CALIBRATION_DEFAULTS["onnx"][0],
           calib_length: int = CALIBRATION_DEFAULTS["onnx"][1], overwrite: bool = False,
           model=None, tokenizer=None, checkpoint=None, genai: bool = False, kv_scales: str = "channel",
           prefill: str = "expanded") -> Path:
    """Write the ONNX folder for `model_dir` at `out`, all or nothing. (model, tokenizer) may be given loaded, or
    lazy with their layerwise.Checkpoint; a folder given by path is read lazily. Every layer of a lazy model is
    read, calibrated, quantized and written to model.onnx.data in turn (one layer in memory at a time)."""
    out = Path(out)
    if kv_bits is not None:  # refused before any work; the default depends on the model (below)
        check_options(weight_bits, kv_bits, block_size, body, head_bits, weight_method, kv_scales, prefill)
    refuse_existing(out, overwrite)
    if model is None:
        src = load_model(model_dir, original)
        model, checkpoint = src.model, src.checkpoint
        # a tokenizer given is kept: its texts' token ids are cached for the process (data.token_ids)
        tokenizer = src.tokenizer if tokenizer is None else tokenizer
    if kv_bits is None:  # precision's one policy: the weights' bits, 8 for a training-free conversion at 4
        kv_bits = precision.default_cache_bits_for(weight_bits, None if original else
                                                   getattr(model.config, "mla", None))
        check_options(weight_bits, kv_bits, block_size, body, head_bits, weight_method, kv_scales, prefill)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the runner needs a fast tokenizer (tokenizer.json); this model's tokenizer is not one")
    dec = decoder_from_original(model, checkpoint) if original else decoder_from_mla(model, rotate_latent, checkpoint)
    if body != "gqa" and dec.kind != "mla":
        raise ValueError(f"--attention {body} applies to MLA models; the baseline always uses GroupQueryAttention")
    if kv_scales == "q4_0" and dec.cache_width % 32:
        raise ValueError(f"--kv-scales q4_0 needs C + R a multiple of 32 (this model caches {dec.cache_width} "
                         "numbers per token): use --kv-scales row")
    quantized = weight_bits in (4, 8)
    weight_method = weight_method if weight_bits == 4 else "rtn"  # 8-bit round-to-nearest is close to float
    opts = onnx_graph.Options(kv_bits=kv_bits, body=body, fp16_weights=weight_bits == 16, block_size=block_size,
                              # int4 up-projections cost +35% perplexity on SmolLM2, int8 +0.1% (docs/onnx.md),
                              # unless the recovery trained through their 4-bit round trip
                              up_bits=(4 if weight_bits == 4 and (getattr(model.config, "mla", None) or {}).get(
                                  "four_bit_up_projections") else 8) if quantized else weight_bits,
                              weight_bits=weight_bits if quantized else 0, head_bits=head_bits or 0,
                              symmetric=symmetric, accuracy_level=accuracy_level, method=weight_method,
                              cache_scales_mode=kv_scales if kv_bits == 4 else "channel", prefill=prefill)
    calib = None
    if kv_bits in (4, 8):  # the static cache scales, fitted as the layers are read
        from edge_mla.data import calibration_label, calibration_windows  # torch: imported when used
        from edge_mla.layerwise import Walk

        windows = calibration_windows(tokenizer, calib_text, count=calib_windows, length=calib_length)
        opts.cache_scales = []
        dec.layers.calibrate(Walk(model, checkpoint, {"cache": windows}),
                             lambda parts: layer_scales(dec, kv_bits, parts), opts.cache_scales)
        calib = {"windows": int(windows.shape[0]), "tokens_per_window": int(windows.shape[1]),
                 "text": calibration_label(calib_text)}
    weights = {"bits": weight_bits, "calib": calib}
    shared = dec.tied and (not quantized or symmetric)
    if quantized:
        head = head_bits or weight_bits
        E = dec.embed.shape[1]
        weights.update(format="MatMulNBits", method=weight_method, block_size=block_size, symmetric=symmetric,
                       grid=("llama.cpp q4_0 / q8_0 (float16 scales)" if symmetric else
                             "asymmetric, integer zero points"),
                       accuracy_level=accuracy_level, head_bits=head,
                       embedding=f"the output head's int{head} table (GatherBlockQuantized)" if shared else
                       "GatherBlockQuantized int4 (q4_0 blocks)" if weight_bits == 4 and E % block_size == 0 else
                       "float32")
    else:
        weights.update(format="float16 stored, float32 compute" if weight_bits == 16 else "float32",
                       embedding="shared with the output head" if shared else "separate")
    if dec.kind == "mla":
        weights["up_projections"] = {4: "int4", 8: "int8", 16: "float16", 32: "float32"}[opts.up_bits] + (
            f" (blocks of {block_size}, DequantizeLinear)" if opts.up_bits in (4, 8) else "")
    mla = getattr(model.config, "mla", None)
    source = mla.get("source") if mla else str(model_dir)  # a converted folder may be a deleted staging path

    with staged_folder(out) as staging:
        with open(staging / "model.onnx.data", "wb") as data:  # the weights, written as the graph is built
            proto = onnx_decoder.build_model(dec, opts, data)
        (staging / "model.onnx").write_bytes(proto.SerializeToString())
        del proto
        meta = metadata(dec, opts, model, tokenizer, weights, source)
        meta["provenance"] = provenance.record(source, mla=mla, bits=weight_bits, kv_bits=kv_bits,
                                               calibration=(calib or {}).get("text"))
        tokenizer.save_pretrained(staging)
        (staging / META).write_text(json.dumps(meta, indent=1))
        check_export(staging)
        if genai:
            from edge_mla.export.onnx_genai import add_genai
            add_genai(staging)
    return out


SMOKE_TEST_IN_CHILD = IN_CHILD_ABOVE  # bytes of weights above which onnxruntime's check runs in a child


def check_export(folder: Path) -> None:
    """smoke_test: in this process for a small model; for a large one in a child process, so that onnxruntime's
    copy of the whole model never adds to the exporter's own memory (one layer at a time)."""
    import subprocess
    import sys

    if (folder / "model.onnx.data").stat().st_size <= SMOKE_TEST_IN_CHILD:
        return smoke_test(folder)
    code = ("import sys; from pathlib import Path; from edge_mla.export.onnx import smoke_test; "
            "smoke_test(Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise ValueError(f"onnxruntime could not run the exported model: {last}")


def smoke_test(folder: Path) -> None:
    """Load the export with onnxruntime and run a short prompt and one decode step, before it is published."""
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    dec = OnnxDecoder(folder, threads=1, context=8)
    logits = dec.forward(np.arange(1, 5, dtype=np.int64))
    logits = dec.forward(np.array([int(logits[-1].argmax())], np.int64))
    if not np.isfinite(logits).all():
        raise ValueError(f"the exported model gives non-finite logits; please report this ({folder})")

