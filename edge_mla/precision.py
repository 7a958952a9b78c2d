"""Precision: one vocabulary of bits for weights and caches, and what each bit width becomes in each runtime.

Every command speaks `--bits` (weights) and `--kv-bits` (cache) in {4, 8, 16}; the exporters and runners turn
them into types here and nowhere else. No torch, no runtime imports: the runners use this too.
"""
from __future__ import annotations

BITS = (4, 8, 16)

# llama.cpp: weight file types (gguf-py writes Q8_0/Q4_0 itself) and cache types (-ctk/-ctv).
GGUF_WEIGHT_TYPE = {4: "q4_0", 8: "q8_0", 16: "f16", 32: "f32"}
GGUF_CACHE_TYPE = {4: "q4_0", 8: "q8_0", 16: "f16", 32: "f32"}
CACHE_BITS_OF_TYPE = {v: k for k, v in GGUF_CACHE_TYPE.items()}
# onnxruntime: the cache dtype an ONNX export states in its metadata file.
ONNX_CACHE_DTYPE = {4: "int4", 8: "int8", 16: "float16", 32: "float32"}
ONNX_CACHE_BITS = {v: k for k, v in ONNX_CACHE_DTYPE.items()}

# The GGUF key that carries the cache type a build priced, so `edge-mla run` uses the same one.
GGUF_CACHE_KEY = "edge_mla.cache_type"


def check_bits(bits: int, what: str = "--bits") -> int:
    if bits not in BITS:
        raise ValueError(f"{what} {bits} is not supported: use {', '.join(map(str, BITS))}")
    return bits


def head_bits(weight_bits: int) -> int | None:
    """The tied embedding / output head keeps 8 bits under 4-bit weights, as llama.cpp's q4_0 mix does (the
    head is the most sensitive matrix); otherwise it follows the weights."""
    return 8 if weight_bits == 4 else None


def default_cache_bits(weight_bits: int, trained: bool) -> int:
    """The cache follows the weights. A model recovered or fine-tuned through the 4-bit cache keeps it; a
    training-free conversion keeps 8 bits under 4-bit weights: a 4-bit cache breaks it (docs/recovery.md: +30%
    perplexity at C=256 with q4_0)."""
    return 8 if weight_bits == 4 and not trained else weight_bits


def default_cache_bits_for(weight_bits: int, mla: dict | None) -> int:
    """default_cache_bits for one model, the one policy of every command (build, export onnx, export gguf): `mla` is
    a converted model's MLA section (its config's), None for an original model, which is no conversion to break;
    a conversion counts as trained when it records a recovery or a fine-tune."""
    trained = mla is None or bool(mla.get("recovery") or mla.get("finetune"))
    return default_cache_bits(weight_bits, trained)


WEIGHT_BITS_OF_TYPE = {"f32": 32, "f16": 16, "q8_0": 8, "q4_0": 4, "q4_k": 4}


def gguf_cache_type(kv_bits: int) -> str:
    return GGUF_CACHE_TYPE[check_bits(kv_bits, "--kv-bits")]


def default_flash_attention(cache_type: str) -> bool:
    """llama.cpp's flash attention as edge-mla runs a cache unless told: on for a quantized one (llama.cpp needs it
    there), off for f16/f32."""
    return cache_type not in ("f16", "f32")


def gguf_weight_type(bits: int) -> str:
    return GGUF_WEIGHT_TYPE[check_bits(bits)]
