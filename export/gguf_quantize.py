"""llama.cpp's own quantizer for the GGUF exports it alone writes (K-quants: `--weights q4_k`), run in a child
process: native code that can crash. gguf-py writes every other type (export/gguf.py)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from edge_mla.export.gguf_tensors import KV_A_QUANTIZED


def require_quantizer():
    try:
        import llama_cpp
    except ImportError:
        raise ValueError("--weights q4_k uses llama.cpp's own quantizer: install llama-cpp-python "
                         "(or export q8_0/q4_0, which gguf-py writes)") from None
    return llama_cpp


def llama_quantize(src: Path, dst: Path, *, mla: bool, threads: int | None = None) -> None:
    """Q4_K_M through llama.cpp's quantizer (in a child process: native code that can crash)."""
    from edge_mla.runtimes.llamacpp import run_isolated

    require_quantizer()  # a missing package is named here, not in the child
    run_isolated(_llama_quantize, src, dst, mla=mla, threads=threads)


def _llama_quantize(src: Path, dst: Path, *, mla: bool, threads: int | None = None) -> None:
    """attn_kv_a_mqa keeps an 8-bit exponent (see tensor_type)."""
    llama_cpp = require_quantizer()
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

