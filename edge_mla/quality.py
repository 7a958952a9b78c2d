"""Quality through the runtimes themselves: held-out perplexity of an exported file (GGUF in llama.cpp, ONNX in
onnxruntime) on two texts, the MLA build and the original side by side on the same token windows.

The texts: the held-out 20% of the built-in Wikipedia sample (nothing is fitted on it) and the Lee ABC news
corpus, another domain that nothing is fitted on. Both come from the PyPI wheel of gensim 4.4.0 (test data).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

TEXTS = {
    "wikipedia-heldout": "held-out 20% of the Wikipedia sample (gensim 4.4.0; CC BY-SA 3.0)",
    "abc-news": "Lee background corpus, ABC news 2001 (gensim 4.4.0); another domain, never fitted on",
}


@dataclass
class QualityRow:
    model: str  # "mla" or "original"
    runtime: str  # "llama.cpp" or "onnxruntime"
    text: str  # a key of TEXTS
    perplexity: float
    tokens: int  # predicted tokens scored
    cache: str  # the cache it ran with (q4_0, int4, ...)


def text_windows(tokenizer, text: str, count: int, length: int) -> np.ndarray:
    """[count, length] token ids of one of TEXTS, tokenized once by the model's own tokenizer so that every file
    is scored on the same ids."""
    from edge_mla.data import load_text, news_text, token_windows

    raw = {"wikipedia-heldout": lambda: load_text(None, "heldout"), "abc-news": news_text}[text]()
    return token_windows(tokenizer, raw, length, count).numpy()


def _nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] ([T, V] float)."""
    x = logits[:-1].astype(np.float64)
    peak = x.max(1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(1))
    return float((log_z - x[np.arange(len(x)), ids[1:]]).sum())


def gguf_nll(path: str, windows: np.ndarray, kv_type: str, threads: int | None = None) -> tuple[float, int]:
    """llama.cpp's logits over each window from an empty cache (run it through llamacpp.run_isolated)."""
    from edge_mla.runtimes import llamacpp

    length = windows.shape[1]
    model = llamacpp.open_model(path, n_ctx=length, threads=threads, kv_type=kv_type, logits_all=True,
                                n_batch=length)
    total = 0.0
    for ids in windows:
        total += _nll_sum(llamacpp.prompt_logits(model, ids.tolist()), ids)
    return total, windows.size - len(windows)


def onnx_nll(folder: str, windows: np.ndarray, threads: int | None = None) -> tuple[float, int]:
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    length = windows.shape[1]
    decoder = OnnxDecoder(folder, threads=threads, context=length)
    total = 0.0
    for ids in windows:
        decoder.reset(length)
        total += _nll_sum(decoder.forward(ids.astype(np.int64), keep=length), ids)
    return total, windows.size - len(windows)


def measure(files: dict, tokenizer, *, kv_type: str, onnx_cache: str, count: int = 4, length: int = 512,
            threads: int | None = None, progress=print) -> list[QualityRow]:
    """Perplexity of every file on every text. files: {model: {"gguf": path, "onnx": folder}}."""
    from edge_mla.runtimes import llamacpp
    from edge_mla.runtimes.gguf_file import check_gguf, runnable_cache_type

    rows = []
    for text in TEXTS:
        windows = text_windows(tokenizer, text, count, length)
        for model, paths in files.items():
            for runtime, path in (("llama.cpp", paths.get("gguf")), ("onnxruntime", paths.get("onnx"))):
                if path is None:
                    continue
                cache = onnx_cache
                if runtime == "llama.cpp":
                    cache = runnable_cache_type(check_gguf(path), kv_type)
                    nll, n = llamacpp.run_isolated(gguf_nll, str(path), windows, cache, threads)
                else:
                    nll, n = onnx_nll(str(path), windows, threads)
                row = QualityRow(model, runtime, text, round(math.exp(nll / n), 3), n, cache)
                progress(f"      perplexity {row.perplexity:7.2f}  {model:8s} {runtime:11s} {text} ({n} tokens)")
                rows.append(row)
    return rows


def ratios(rows: list[QualityRow]) -> dict:
    """MLA perplexity over the original's, per (runtime, text): the figure a user decides on."""
    found = {(r.model, r.runtime, r.text): r.perplexity for r in rows}
    return {f"{runtime}, {text}": round(found[("mla", runtime, text)] / found[("original", runtime, text)], 3)
            for (model, runtime, text) in found if model == "mla" and ("original", runtime, text) in found}


def as_dicts(rows: list[QualityRow]) -> list[dict]:
    return [asdict(r) for r in rows]
