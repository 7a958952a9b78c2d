"""Speed through the runtimes themselves, measured on the build machine: prefill and decode tokens/s of an
exported file (GGUF in llama.cpp, ONNX in onnxruntime), the MLA build and the original side by side.

Prefill: one prompt of held-out text from an empty cache. Decode: greedy tokens one at a time after it. Each file
is measured `repeats` times, the files interleaved, and the best pass kept: the pass least disturbed by other work
on a shared machine, so the ratio of two files is fair. These are speeds on the build machine, not on the target
device; speedmodel.py scales them to the device's bandwidth and arithmetic.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SpeedRow:
    model: str  # "mla" or "original"
    runtime: str  # "llama.cpp" or "onnxruntime"
    prompt_tokens: int
    decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    threads: int
    cache: str
    flash_attention: bool | None = None  # llama.cpp's setting (None: onnxruntime)
    priced: bool = True  # at the cache the budget prices, compared across models; False: a run setting tried


def gguf_speed(path: str, prompt: list[int], decode_tokens: int, kv_type: str, threads: int,
               flash_attn: bool | None = None) -> tuple[float, float]:
    """(prefill, decode) tokens/s of a GGUF in llama.cpp; run it through llamacpp.run_isolated."""
    from edge_mla.runtimes import llamacpp

    model = llamacpp.open_model(path, n_ctx=len(prompt) + decode_tokens, threads=threads, kv_type=kv_type,
                                n_batch=len(prompt), flash_attn=flash_attn)
    model.llm.reset()
    t0 = time.perf_counter()
    model.llm.eval(list(prompt))
    prefill = len(prompt) / (time.perf_counter() - t0)
    return prefill, llamacpp.greedy_continue(model, decode_tokens)[1]


def gguf_speeds(path: str, prompts: list[list[int]], decode_tokens: int, settings: list[tuple[str, bool]],
                threads: int) -> list[tuple[str, bool, int, float, float]]:
    """gguf_speed for every (cache type, flash attention) setting after every prompt, in one llama.cpp process: a
    child's start is paid once per file and pass. Rows: (cache, flash attention, prompt tokens, prefill, decode)."""
    return [(cache, flash, len(prompt), *gguf_speed(path, prompt, decode_tokens, cache, threads, flash))
            for cache, flash in settings for prompt in prompts]


def onnx_speed(folder: str, prompt: list[int], decode_tokens: int, threads: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of an ONNX export in onnxruntime, with edge-mla's runner."""
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads, context=len(prompt) + decode_tokens)
    decoder.forward(np.asarray(prompt[:8], np.int64))  # first-run setup (allocations, kernel choice) not timed
    decoder.reset(len(prompt) + decode_tokens)
    t0 = time.perf_counter()
    token = int(decoder.forward(np.asarray(prompt, np.int64))[-1].argmax())
    prefill = len(prompt) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(decoder.forward(np.array([token], np.int64))[-1].argmax())
    return prefill, decode_tokens / (time.perf_counter() - t0)


def measure(files: dict, prompts: list[list[int]], *, kv_type: str, onnx_cache: str, decode_tokens: int = 32,
            threads: int | None = None, repeats: int = 2, llama_settings: dict | None = None,
            progress=print) -> list[SpeedRow]:
    """Speeds of every file after each prompt. files: {model: {"gguf": path, "onnx": folder}} (either may be
    missing). llama_settings: {model: other (cache type, flash attention) settings} to try its GGUF with, once,
    beside the priced cache (runsettings.py chooses among them); their rows have priced=False."""
    import os

    from edge_mla.runtimes import llamacpp
    from edge_mla.precision import default_flash_attention
    from edge_mla.runtimes.gguf_file import check_gguf, runnable_cache_type
    from edge_mla.runtimes.onnxruntime import run_sized

    threads = threads or os.cpu_count() or 1
    best: dict[tuple, tuple[float, float]] = {}

    def keep(model, runtime, tokens, cache, flash, priced, got):
        key = (model, runtime, tokens, cache, flash, priced)
        old = best.get(key, (0.0, 0.0))
        best[key] = (max(old[0], got[0]), max(old[1], got[1]))

    for repeat in range(repeats):
        for model, paths in files.items():
            if paths.get("gguf") is not None:
                cache = runnable_cache_type(check_gguf(paths["gguf"]), kv_type)
                priced = (cache, default_flash_attention(cache))
                others = (llama_settings or {}).get(model, ())
                settings = [priced] + [s for s in others if s != priced and not repeat]
                for c, flash, tokens, *got in llamacpp.run_isolated(gguf_speeds, str(paths["gguf"]), prompts,
                                                                    decode_tokens, settings, threads):
                    keep(model, "llama.cpp", tokens, c, flash, (c, flash) == priced, got)
            if paths.get("onnx") is not None:
                for prompt in prompts:
                    keep(model, "onnxruntime", len(prompt), onnx_cache, None, True,
                         run_sized(paths["onnx"], onnx_speed, str(paths["onnx"]), prompt, decode_tokens, threads))
    rows = [SpeedRow(model, runtime, tokens, decode_tokens, round(p, 1), round(d, 1), threads, cache, flash, priced)
            for (model, runtime, tokens, cache, flash, priced), (p, d) in best.items()]
    for r in rows:
        setting = "" if r.priced else f", {r.cache} cache, flash attention {'on' if r.flash_attention else 'off'}"
        progress(f"      speed {r.model:8s} {r.runtime:11s} prefill {r.prefill_tokens_per_s:7.1f} tok/s, decode "
                 f"{r.decode_tokens_per_s:6.1f} tok/s ({r.prompt_tokens}-token prompt, {threads} threads{setting})")
    return rows


def by_runtime(rows: list[SpeedRow], contexts: list[int] = (), machine=None) -> dict:
    """report.json's per-runtime speeds at the priced cache: {runtime: {"decode_tokens_per_s": {model: x},
    "prefill_...": ..., "decode_ratio": MLA / original, "prefill_ratio": ..., "prompt_tokens": ...}} at the shortest
    prompt measured, every prompt's figures under "by_prompt", and, where two prompt lengths were measured, the
    speeds modelled at `contexts` under "modelled" (speedmodel.py); machine: the build machine's probed rates
    (speedmodel.Rates), kept under "machine" to scale the lines to a device."""
    from edge_mla import speedmodel

    out: dict = {}
    for r in sorted((r for r in rows if r.priced), key=lambda r: r.prompt_tokens):
        entry = out.setdefault(r.runtime, {"decode_tokens_per_s": {}, "prefill_tokens_per_s": {},
                                           "prompt_tokens": r.prompt_tokens, "threads": r.threads,
                                           "decode_tokens": r.decode_tokens, "by_prompt": {}})
        at = entry["by_prompt"].setdefault(r.prompt_tokens, {"decode": {}, "prefill": {}})
        at["decode"][r.model], at["prefill"][r.model] = r.decode_tokens_per_s, r.prefill_tokens_per_s
        if r.prompt_tokens == entry["prompt_tokens"]:
            entry["decode_tokens_per_s"][r.model] = r.decode_tokens_per_s
            entry["prefill_tokens_per_s"][r.model] = r.prefill_tokens_per_s
    for entry in out.values():
        for what in ("decode", "prefill"):
            speeds = entry[f"{what}_tokens_per_s"]
            if "mla" in speeds and speeds.get("original"):
                entry[f"{what}_ratio"] = round(speeds["mla"] / speeds["original"], 3)
        lines = speedmodel.lines_of(entry["by_prompt"], entry["decode_tokens"])
        if lines:
            entry["lines"] = {phase: {m: asdict(line) for m, line in by_model.items()} for phase, by_model in lines.items()}
            entry["modelled"] = speedmodel.speeds_at(lines, list(contexts))
        if machine is not None:
            entry["machine"] = asdict(machine)
    return out


def as_dicts(rows: list[SpeedRow]) -> list[dict]:
    return [asdict(r) for r in rows]
