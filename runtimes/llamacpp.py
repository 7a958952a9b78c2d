"""Run GGUF files with llama.cpp (through llama-cpp-python), after checking them with the file rules of
gguf_file. llama.cpp is native code that can kill its process: `run_isolated` runs it in a child process.
No torch and no converter here: only gguf-py, numpy and llama_cpp (lazily).
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_mla.precision import GGUF_CACHE_TYPE, default_flash_attention
from edge_mla.runtimes.gguf_file import KV_TYPES, GGUFError, GGUFInfo, check_gguf, check_kv_type  # noqa: F401

INSTALL_HINT = "install llama-cpp-python: ./install.sh llama (it compiles llama.cpp, ~5-10 min on 2 cores)"
REBUILD_HINT = ("llama-cpp-python was probably compiled for another CPU (pip caches the wheel it built with "
                "-march=native): rebuild it portably with `pip uninstall -y llama-cpp-python && ./install.sh llama` "
                "(or pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36 with "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\")")


class RuntimeCrash(RuntimeError):
    """llama.cpp killed the process it ran in (an illegal instruction, an assertion): named, with the fix."""


def _child(conn, fn, args, kwargs) -> None:
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as err:  # the parent re-raises it
        conn.send(("error", err))
    finally:
        conn.close()


def _answer(child, receive):
    """The child's answer, or EOFError once it is dead without one. recv() alone can wait forever: a child that dies
    before it unpickles its end of the pipe (its arguments fail to load) leaves a copy of that end open in this
    process (multiprocessing's resource sharer), so no end-of-file ever comes."""
    while not receive.poll(0.2):
        if not child.is_alive() and not receive.poll(0):
            raise EOFError
    return receive.recv()


def run_isolated(fn, *args, runtime: str = "llama.cpp", **kwargs):
    """fn(*args, **kwargs) in a fresh child process, its result or exception passed back. llama.cpp is native
    code: an illegal instruction or a GGML_ASSERT kills the whole process, so whatever runs it for a user or a
    check runs here, and a death becomes a RuntimeCrash that names the signal and the fix. (onnxruntime runs
    here too for a big model, `runtime` naming it: its memory then never adds to the build's.)"""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args, kwargs))
    child.start()
    send.close()
    try:
        status, value = _answer(child, receive)
    except EOFError:  # the child died before it could answer
        child.join()
        code = child.exitcode
        name = getattr(fn, '__name__', fn)
        if code is not None and code > 0:  # an exit, not a kill: Python's own error, printed above by the child
            raise RuntimeCrash(f"the child process that runs {name} exited with code {code} before it answered; "
                               "its error is above") from None
        what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        if runtime != "llama.cpp":
            raise RuntimeCrash(f"{runtime} died ({what}) while running {name} in a child "
                               "process; its last output is above") from None
        raise RuntimeCrash(f"llama.cpp crashed ({what}) while running {name}. "
                           + (REBUILD_HINT if code is not None and -code == signal.SIGILL else
                              "Its last log lines are above; " + REBUILD_HINT)) from None
    child.join()
    if status == "error":
        raise value
    return value


# --- llama.cpp ---------------------------------------------------------------------------------------------

_log_lines: list[str] = []
_log_echo = [False]
_log_callback = None  # keep the ctypes callback alive for as long as llama.cpp may call it


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"running a GGUF needs llama.cpp: {INSTALL_HINT}") from None
    global _log_callback
    if _log_callback is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            line = text.decode("utf-8", errors="replace")
            _log_lines.append(line)
            if _log_echo[0]:
                sys.stderr.write(line)
        _log_callback = callback
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


@dataclass
class Model:
    llm: object  # llama_cpp.Llama
    info: GGUFInfo
    kv_type: str
    log: str  # what llama.cpp logged while loading
    flash_attention: bool = False

    def kv_cache(self) -> dict:
        return kv_cache_from_log(self.log)


def open_model(path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, kv_type: str = "f16",
               logits_all: bool = False, n_batch: int = 512, n_ubatch: int | None = None,
               flash_attn: bool | None = None, verbose: bool = False) -> Model:
    """Check the file, then load it in llama.cpp with the cache type asked for. Flash attention: on for a
    quantized cache (llama.cpp requires it), else off unless asked; n_ubatch defaults to n_batch."""
    info = check_gguf(path)
    check_kv_type(info, kv_type)
    llama_cpp = _llama_cpp()
    threads = threads or os.cpu_count() or 1
    qtype = int(KV_TYPES[kv_type])
    quantized = default_flash_attention(kv_type)
    if quantized and flash_attn is False:
        raise ValueError(f"a {kv_type} cache needs flash attention in llama.cpp; use an f16 cache to run without it")
    start = len(_log_lines)
    _log_echo[0] = verbose
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=n_batch, n_ubatch=n_ubatch or n_batch, logits_all=logits_all, type_k=qtype,
                              type_v=qtype, flash_attn=quantized or bool(flash_attn), verbose=False)
    except ValueError as err:
        tail = "".join(_log_lines[start:])[-600:]
        raise ValueError(f"llama.cpp could not load {path}: {err}\n{tail}") from None
    finally:
        _log_echo[0] = False
    return Model(llm, info, kv_type, "".join(_log_lines[start:]), quantized or bool(flash_attn))


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers"
                      r".*?K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


def kv_cache_from_log(log: str) -> dict:
    """llama.cpp's own report of its cache: cells, layers, K/V types and MiB (2 decimals)."""
    m = _KV_LINE.search(log)
    if not m:
        raise ValueError("llama.cpp did not report its KV cache size in its log")
    return {"mib": float(m[1]), "cells": int(m[2]), "layers": int(m[3]), "k_type": m[4], "k_mib": float(m[5]),
            "v_type": m[6], "v_mib": float(m[7])}


def last_logits(model: Model) -> np.ndarray:
    llama_cpp = _llama_cpp()
    n_vocab = model.llm.n_vocab()
    ptr = llama_cpp.llama_get_logits_ith(model.llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def prompt_logits(model: Model, tokens: list[int]) -> np.ndarray:
    """Logits at every prompt position, [T, vocab] (needs logits_all=True)."""
    model.llm.reset()
    model.llm.eval(list(tokens))
    return np.array(model.llm.scores[: len(tokens)], dtype=np.float32)


def greedy(model: Model, tokens: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after the prompt, by argmax of llama.cpp's logits; returns (tokens, decode tok/s)."""
    model.llm.reset()
    model.llm.eval(list(tokens))
    return greedy_continue(model, n)


def greedy_continue(model: Model, n: int) -> tuple[list[int], float]:
    """n greedy tokens from where the cache stands, one llama_decode each; returns (tokens, tok/s)."""
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(np.argmax(last_logits(model))))
        model.llm.eval([out[-1]])
    return out, n / max(time.perf_counter() - t0, 1e-9)


def smoke(path: str | Path, kv_type: str = "f16", tokens: int = 4) -> list[int]:
    """Load a GGUF and decode a few greedy tokens: whether this llama.cpp build runs on this CPU at all.
    Call it through run_isolated."""
    model = open_model(path, n_ctx=64, threads=1, kv_type=kv_type)
    return greedy(model, [1, 2, 3, 4], tokens)[0]


def kv_type_from_args(args, info: GGUFInfo) -> str:
    """--kv-bits (or llama.cpp's own --kv-type name) when given, else the cache the file was built for."""
    if getattr(args, "kv_type", None):
        return args.kv_type
    if getattr(args, "kv_bits", None):
        return GGUF_CACHE_TYPE[args.kv_bits]
    return info.cache_type


def run_cli(args) -> int:
    """`edge-mla run FILE.gguf`: generate from a prompt with llama.cpp (in a child process, so that a crash is
    reported, not fatal) and report the cache it used."""
    text, report = run_isolated(_generate, args)
    print(text)
    print(report, file=sys.stderr)
    return 0


def _generate(args) -> tuple[str, str]:
    path = Path(args.path)
    info = check_gguf(path)
    kv_type = kv_type_from_args(args, info)
    check_kv_type(info, kv_type)
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    if args.chat:
        text = _chat_prompt(vocab, args.prompt)
    else:
        text = args.prompt
    ids = vocab.tokenize(text.encode(), add_bos=True, special=args.chat)
    del vocab
    n_ctx = args.context or len(ids) + args.max_new_tokens
    if len(ids) + args.max_new_tokens > n_ctx:
        raise ValueError(f"--context {n_ctx} is too small for a prompt of {len(ids)} tokens and "
                         f"{args.max_new_tokens} new tokens")
    flash = getattr(args, "flash_attn", None)
    model = open_model(path, n_ctx=n_ctx, threads=args.threads, kv_type=kv_type,
                       flash_attn=None if flash is None else flash == "on")
    llm = model.llm
    eos = {llm.token_eos()}
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    out = []
    t0 = time.perf_counter()
    for _ in range(args.max_new_tokens):
        token = int(np.argmax(last_logits(model)))
        if token in eos:
            break
        out.append(token)
        llm.eval([token])
    decode = time.perf_counter() - t0
    cache = model.kv_cache()
    kind = f"MLA, latent {info.latent_dim} + rope {info.rope_dim}" if info.is_mla else f"{info.arch}"
    per_token = info.kv_bytes_per_token(kv_type)
    report = (f"[{path.name}: {kind}; {len(ids)} prompt tokens in {prefill:.2f} s, {len(out)} new tokens at "
              f"{len(out) / max(decode, 1e-9):.1f} tok/s; KV cache {kv_type}: {per_token} bytes/token, flash attention "
              f"{'on' if model.flash_attention else 'off'}, "
              f"llama.cpp allocated {cache['mib']:.2f} MiB for {cache['cells']} cells]")
    return llm.detokenize(out).decode("utf-8", errors="replace"), report


def _chat_prompt(llm, prompt: str) -> str:
    """The GGUF's own chat template, rendered the way llama-cpp-python renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("this GGUF has no chat template (tokenizer.chat_template); run without --chat")
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if llm.token_bos() >= 0 else ""
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    return formatter(messages=[{"role": "user", "content": prompt}]).prompt
