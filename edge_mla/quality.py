"""Quality through the runtimes themselves: perplexity of an exported file (GGUF in llama.cpp, ONNX in onnxruntime)
on a battery of kinds of text (edge_mla.texts: prose, news, code, technical docs, chat in the model's template,
math), the MLA build and the original side by side on the same token windows, and how often the two agree on the
next token.

No text of the battery is fitted on: Wikipedia's held-out split, and sources no calibration step reads
(docs/texts.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


# The original in onnxruntime with an int8 cache: what a user of that runtime would run (its int4 cache's static
# scales cost it ~28%); scored beside the same-bits pair, never in the ratios.
ORIGINAL_INT8 = "original, int8 cache"


def texts_about() -> dict:
    from edge_mla.texts import BATTERY_ABOUT
    return dict(BATTERY_ABOUT)


@dataclass
class QualityRow:
    model: str  # "mla", "original" or ORIGINAL_INT8
    runtime: str  # "llama.cpp" or "onnxruntime"
    text: str  # a key of texts.BATTERY
    perplexity: float
    tokens: int  # predicted tokens scored
    cache: str  # the cache it ran with (q4_0, int4, ...)
    top1_agreement: float | None = None  # MLA only: share of positions whose argmax is the original's


def text_windows(tokenizer, text: str, count: int, length: int) -> np.ndarray:
    """[count, length] token ids of one text of the battery, tokenized once by the model's own tokenizer so that
    every file is scored on the same ids; windows spread over the whole text."""
    from edge_mla.data import token_windows
    from edge_mla.texts import battery_text

    windows = token_windows(tokenizer, battery_text(tokenizer, text), length).numpy()
    if len(windows) <= count:
        return windows
    return windows[np.linspace(0, len(windows) - 1, count).round().astype(int)]


def _nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] ([T, V] float). In float32, in place, a row block
    at a time: a 512 x 49K window in float64 took the build a second a window (96 windows a build)."""
    x = np.asarray(logits[:-1], dtype=np.float32)
    total = 0.0
    for start in range(0, len(x), 128):
        block = x[start:start + 128] - x[start:start + 128].max(1, keepdims=True)
        picked = block[np.arange(len(block)), ids[start + 1:start + 1 + len(block)]]
        np.exp(block, out=block)
        total += float((np.log(block.sum(1, dtype=np.float64)) - picked).sum())
    return total


def _scores(logits: np.ndarray, ids: np.ndarray) -> tuple[float, np.ndarray]:
    return _nll_sum(logits, ids), logits[:-1].argmax(1).astype(np.int32)


def gguf_scores(path: str, windows: dict, kv_type: str, threads: int | None = None) -> dict:
    """llama.cpp's summed NLL and argmax per text over each window from an empty cache: {text: (nll, n, argmax)}.
    One child process scores every text (run it through llamacpp.run_isolated)."""
    from edge_mla.runtimes import llamacpp

    length = next(iter(windows.values())).shape[1]
    model = llamacpp.open_model(path, n_ctx=length, threads=threads, kv_type=kv_type, logits_all=True,
                                n_batch=length)
    found = {}
    for text, rows in windows.items():
        scored = [_scores(llamacpp.prompt_logits(model, ids.tolist()), ids) for ids in rows]
        found[text] = (sum(s[0] for s in scored), rows.size - len(rows), np.stack([s[1] for s in scored]))
    return found


def onnx_scores(folder: str, windows: dict, threads: int | None = None) -> dict:
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    length = next(iter(windows.values())).shape[1]
    decoder = OnnxDecoder(folder, threads=threads, context=length)
    found = {}
    for text, rows in windows.items():
        scored = []
        for ids in rows:
            decoder.reset(length)
            scored.append(_scores(decoder.forward(ids.astype(np.int64), keep=length), ids))
        found[text] = (sum(s[0] for s in scored), rows.size - len(rows), np.stack([s[1] for s in scored]))
    return found


# The originals' scores are kept (EDGE_MLA_CACHE/scores) under the content of the exported files, the windows, the
# cache type and the runtime's version: a second build of the same model at the same bits scores them in no time,
# and its recovery gets those minutes (timebudget). Bump when the scoring itself changes.
SCORE_FORMAT = 1
CACHED_MODELS = ("original", ORIGINAL_INT8)  # the MLA files are new with every build


def _file_digest(path: Path) -> str:
    """sha256 of an exported file, or of an ONNX folder's graph, weights and metadata."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    parts = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".onnx", ".data", ".json"))
    for part in parts:
        digest.update(part.name.encode())
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def score_key(path: Path, runtime: str, cache: str, windows: dict) -> str | None:
    """What a file's scores depend on: its bytes, the windows, the cache type, the runtime and its version (None for
    a path that is not a file or folder on disk, or a runtime whose version is unknown)."""
    import hashlib
    import importlib.metadata as metadata

    if not Path(path).exists():
        return None
    try:
        version = metadata.version({"llama.cpp": "llama_cpp_python", "onnxruntime": "onnxruntime"}[runtime])
    except metadata.PackageNotFoundError:  # a runtime without its package's metadata: nothing to key on, no keeping
        return None
    digest = hashlib.sha256(f"{SCORE_FORMAT} {runtime} {version} {cache}".encode())
    digest.update(_file_digest(path).encode())
    for text in sorted(windows):
        digest.update(text.encode())
        digest.update(np.ascontiguousarray(windows[text], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def _cached_scores(key: str) -> tuple[dict, float] | None:
    import json

    from edge_mla.source import cache_dir

    path = cache_dir() / "scores" / f"{key}.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    scores = {text: (nll, n, np.asarray(top1, np.int32)) for text, (nll, n, top1) in found["scores"].items()}
    return scores, float(found["seconds"])


def _keep_scores(key: str, scores: dict, seconds: float) -> None:
    import json

    from edge_mla.data import write_text_atomic
    from edge_mla.source import cache_dir

    folder = cache_dir() / "scores"
    folder.mkdir(parents=True, exist_ok=True)
    found = {text: [nll, n, top1.tolist()] for text, (nll, n, top1) in scores.items()}
    write_text_atomic(folder / f"{key}.json", json.dumps({"scores": found, "seconds": round(seconds, 2)}))


class Battery:
    """The battery's windows, tokenized once so every file is scored on the same ids, and what each file scored.
    Files can be scored in several calls (the build scores the originals before its recovery, the MLA files after
    it); the MLA build's next-token agreement is taken against the original scored earlier in the same runtime."""

    def __init__(self, tokenizer, *, kv_type: str, onnx_cache: str, count: int = 4, length: int = 512,
                 threads: int | None = None, texts: tuple[str, ...] | None = None, progress=print):
        from edge_mla.texts import BATTERY

        self.windows = {text: text_windows(tokenizer, text, count, length) for text in (texts or BATTERY)}
        self.kv_type, self.onnx_cache, self.threads, self.progress = kv_type, onnx_cache, threads, progress
        self.rows: list[QualityRow] = []
        self.argmax: dict = {}
        self.seconds: dict = {}  # (model, runtime) -> seconds its scoring took

    def score(self, files: dict) -> list[QualityRow]:
        """Score files ({model: {"gguf": path, "onnx": folder}}) on every text; returns (and keeps) their rows."""
        from edge_mla.runtimes import llamacpp
        from edge_mla.runtimes.gguf_file import check_gguf, runnable_cache_type
        from edge_mla.runtimes.onnxruntime import run_sized

        rows = []
        for runtime, kind in (("llama.cpp", "gguf"), ("onnxruntime", "onnx")):
            for model in sorted(files, key=lambda m: m != "original"):  # the original first: agreement needs it
                path = files[model].get(kind)
                if path is None:
                    continue
                started = time.perf_counter()
                if runtime == "llama.cpp":
                    cache = runnable_cache_type(check_gguf(path), self.kv_type)
                else:
                    cache = "int8" if model == ORIGINAL_INT8 else self.onnx_cache
                key = score_key(path, runtime, cache, self.windows) if model in CACHED_MODELS else None
                found = _cached_scores(key) if key else None
                if found:
                    scores, took = found
                    self.progress(f"      ({model}, {runtime}: scored before, on the same windows, by a build of the "
                                  f"same file; {took:.0f} s then)")
                elif runtime == "llama.cpp":
                    scores = llamacpp.run_isolated(gguf_scores, str(path), self.windows, cache, self.threads)
                else:
                    scores = run_sized(path, onnx_scores, str(path), self.windows, self.threads)
                for text, (nll, n, top1) in scores.items():
                    self.argmax[(model, runtime, text)] = top1
                    reference = self.argmax.get(("original", runtime, text))
                    agree = (None if model != "mla" or reference is None else
                             round(float((top1 == reference).mean()), 4))
                    row = QualityRow(model, runtime, text, round(math.exp(nll / n), 3), n, cache, agree)
                    self.progress(f"      perplexity {row.perplexity:7.2f}  {model:8s} {runtime:11s} {cache:5s} "
                                  f"{text} ({n} tokens)"
                                  + ("" if agree is None else f", next token as the original's {100 * agree:.1f}%"))
                    rows.append(row)
                if found:  # the time budget plans the MLA files' scoring from the time it took to measure
                    self.seconds[(model, runtime)] = found[1]
                    continue
                self.seconds[(model, runtime)] = time.perf_counter() - started
                if key:
                    _keep_scores(key, scores, self.seconds[(model, runtime)])
                self.progress(f"      ({model}, {runtime}: {sum(w.size for w in self.windows.values()):,} tokens "
                              f"scored in {self.seconds[(model, runtime)]:.0f} s)")
        self.rows += rows
        return rows


def measure(files: dict, tokenizer, *, kv_type: str, onnx_cache: str, count: int = 4, length: int = 512,
            threads: int | None = None, texts: tuple[str, ...] | None = None, progress=print) -> list[QualityRow]:
    """Perplexity of every file on every text of the battery, and the MLA build's next-token agreement with the
    original in the same runtime. files: {model: {"gguf": path, "onnx": folder}}, "original" among the models."""
    battery = Battery(tokenizer, kv_type=kv_type, onnx_cache=onnx_cache, count=count, length=length,
                      threads=threads, texts=texts, progress=progress)
    return battery.score(files)


def ratios(rows: list[QualityRow], baseline: str = "original") -> dict:
    """MLA perplexity over the baseline's, per (runtime, text): the figure a user decides on."""
    found = {(r.model, r.runtime, r.text): r.perplexity for r in rows}
    return {f"{runtime}, {text}": round(found[("mla", runtime, text)] / found[(baseline, runtime, text)], 3)
            for (model, runtime, text) in found if model == "mla" and (baseline, runtime, text) in found}


def agreement(rows: list[QualityRow]) -> dict:
    """The MLA build's next-token agreement with the original, per (runtime, text)."""
    return {f"{r.runtime}, {r.text}": r.top1_agreement for r in rows if r.top1_agreement is not None}


def as_dicts(rows: list[QualityRow]) -> list[dict]:
    return [asdict(r) for r in rows]
