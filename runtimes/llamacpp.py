"""Run GGUF files with llama.cpp (through llama-cpp-python), after checking them ourselves.

`check_gguf` reads a GGUF with gguf-py and checks every key and tensor shape that llama.cpp's loader will
check (deepseek2 MLA, llama, qwen2), so a broken file gets a message naming the problem instead of a
crash or a silently wrong model. No torch and no converter here: only gguf-py, numpy and llama_cpp (lazily).
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

QT = GGMLQuantizationType
# Cache types llama.cpp can hold; the numbers are ggml's type ids, the same as gguf-py's.
KV_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
ARCHS = ("deepseek2", "llama", "qwen2")
INSTALL_HINT = "install llama-cpp-python (pip install llama-cpp-python; it compiles llama.cpp, ~12 min on 2 cores)"


class GGUFError(ValueError):
    """A GGUF that llama.cpp would refuse or run wrongly; the message names the problem."""


@dataclass
class GGUFInfo:
    path: Path
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    context_length: int
    head_k: int  # cache row width per KV head: C + R for MLA
    head_v: int  # C for MLA (a view of the K row, not stored)
    latent_dim: int = 0  # C (MLA only)
    rope_dim: int = 0  # R
    tensor_types: dict = field(default_factory=dict)

    @property
    def is_mla(self) -> bool:
        return self.arch == "deepseek2"

    def kv_bytes_per_token(self, kv_type: str = "f16") -> int:
        """Bytes llama.cpp's cache holds per token, all layers: MLA keeps one K row of C + R, no V."""
        qtype = KV_TYPES[kv_type]
        if self.is_mla:
            return self.n_layer * row_bytes(self.head_k, qtype)
        return self.n_layer * (row_bytes(self.head_k * self.n_head_kv, qtype)
                               + row_bytes(self.head_v * self.n_head_kv, qtype))


def row_bytes(n: int, qtype: QT) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def _field(reader: GGUFReader, key: str, default=None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise GGUFError(f"{reader.path}: key '{key}' is missing; llama.cpp needs it")
        return default
    value = f.contents()
    return value


def _expected_deepseek2(k: dict) -> dict:
    """Tensor name -> shape (ggml order, fastest dim first), as llama.cpp's deepseek2 loader creates them."""
    E, V, H, F = k["E"], k["V"], k["H"], k["F"]
    C, R, NR, Vh = k["C"], k["R"], k["NR"], k["Vh"]
    N = NR - R
    shapes = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    for i in range(k["L"]):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (E,), b + "attn_kv_a_norm.weight": (C,),
            b + "attn_q.weight": (E, H * NR), b + "attn_kv_a_mqa.weight": (E, C + R),
            b + "attn_k_b.weight": (N, C, H), b + "attn_v_b.weight": (C, Vh, H),
            b + "attn_output.weight": (H * Vh, E), b + "ffn_norm.weight": (E,),
            b + "ffn_gate.weight": (E, F), b + "ffn_up.weight": (E, F), b + "ffn_down.weight": (F, E)})
    return shapes


def _expected_llama(k: dict, arch: str, names: set) -> dict:
    E, V, H, Hkv, F, dk, dv = k["E"], k["V"], k["H"], k["Hkv"], k["F"], k["dk"], k["dv"]
    shapes = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    if "rope_freqs.weight" in names and arch == "llama":
        shapes["rope_freqs.weight"] = (k["R"] // 2,)
    for i in range(k["L"]):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (E,), b + "attn_q.weight": (E, H * dk), b + "attn_k.weight": (E, Hkv * dk),
            b + "attn_v.weight": (E, Hkv * dv), b + "attn_output.weight": (H * dv, E), b + "ffn_norm.weight": (E,),
            b + "ffn_gate.weight": (E, F), b + "ffn_up.weight": (E, F), b + "ffn_down.weight": (F, E)})
        biases = {"attn_q.bias": H * dk, "attn_k.bias": Hkv * dk, "attn_v.bias": Hkv * dv}
        if arch == "llama":
            biases["attn_output.bias"] = E
        for name, n in biases.items():
            if arch == "qwen2" and name != "attn_output.bias" or b + name in names:
                shapes[b + name] = (n,)
    return shapes


def _read_keys(reader: GGUFReader, arch: str) -> dict:
    a = arch + "."
    get = lambda key, default=None: _field(reader, a + key, default)  # noqa: E731
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{reader.path}: no tokenizer (tokenizer.ggml.tokens); llama.cpp needs the vocabulary in "
                        "the file. Re-export with a tokenizer (--tokenizer-gguf or the model's HF tokenizer files)")
    k = {"L": int(get("block_count")), "E": int(get("embedding_length")), "H": int(get("attention.head_count")),
         "F": int(get("feed_forward_length")), "V": len(tokens.data), "ctx": int(get("context_length"))}
    k["Hkv"] = int(get("attention.head_count_kv", k["H"]))
    k["dk"] = int(get("attention.key_length", k["E"] // k["H"]))
    k["dv"] = int(get("attention.value_length", k["E"] // k["H"]))
    k["R"] = int(get("rope.dimension_count", k["dk"]))
    if arch == "deepseek2":
        k["C"] = int(get("attention.kv_lora_rank"))
        k["NR"] = int(get("attention.key_length_mla"))
        k["Vh"] = int(get("attention.value_length_mla"))
        for key in ("expert_feed_forward_length", "expert_shared_count", "attention.layer_norm_rms_epsilon"):
            get(key)
        k["q_lora"] = int(get("attention.q_lora_rank"))
        k["dense"] = int(get("leading_dense_block_count", 0))
    return k


def _check_deepseek2_keys(k: dict) -> list[str]:
    problems = []
    C, R = k["C"], k["R"]
    if k["Hkv"] != 1:
        problems.append(f"attention.head_count_kv is {k['Hkv']}; the MLA cache has one KV head (1)")
    if k["dk"] != C + R:
        problems.append(f"attention.key_length is {k['dk']}; it must be kv_lora_rank + rope dims = {C + R}")
    if k["dv"] != C:
        problems.append(f"attention.value_length is {k['dv']}; it must be kv_lora_rank = {C}")
    if k["NR"] - R < 1:
        problems.append(f"key_length_mla {k['NR']} leaves no NoPE dims beside {R} rope dims (llama.cpp asserts >= 1)")
    if R % 2:
        problems.append(f"rope.dimension_count {R} is odd; rope pairs need an even width")
    if k["q_lora"] != 0:
        problems.append(f"attention.q_lora_rank is {k['q_lora']}; edge-mla files use the dense attn_q (0)")
    if k["dense"] != k["L"]:
        problems.append(f"leading_dense_block_count is {k['dense']}; every layer is dense ({k['L']})")
    return problems


def check_gguf(path: str | Path) -> GGUFInfo:
    """Check a GGUF against what llama.cpp's loader expects; raise GGUFError naming every problem found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError/struct errors on foreign files
        raise GGUFError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: architecture '{arch}' is not one edge-mla runs ({', '.join(ARCHS)})")
    k = _read_keys(reader, arch)
    names = {t.name for t in reader.tensors}
    problems = _check_deepseek2_keys(k) if arch == "deepseek2" else []
    if arch == "deepseek2":
        expected = _expected_deepseek2(k)
    else:
        expected = _expected_llama(k, arch, names)
    if "output.weight" in names:  # untied output head; absent means tied to token_embd
        expected["output.weight"] = (k["E"], k["V"])
    types = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in t.shape)
        types[t.name] = QT(t.tensor_type)
        if t.name not in expected:
            problems.append(f"unexpected tensor {t.name} {list(shape)} (llama.cpp refuses extra tensors)")
            continue
        if shape != expected[t.name]:
            problems.append(f"tensor {t.name} has shape {list(shape)}, llama.cpp expects {list(expected[t.name])}")
        block = GGML_QUANT_SIZES[QT(t.tensor_type)][0]
        if shape[0] % block:
            problems.append(f"tensor {t.name} is {QT(t.tensor_type).name}, whose blocks of {block} do not divide its "
                            f"rows of {shape[0]}")
    missing = sorted(set(expected) - names)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if arch == "deepseek2" and "edge_mla.latent_scale" in reader.fields:
        # The latent-norm neutralisation scales the latent rows by 2^-30 or less: only types with an 8-bit
        # exponent (F32, BF16) keep them.
        bad = [n for n, t in types.items() if n.endswith("attn_kv_a_mqa.weight") and t not in (QT.F32, QT.BF16)]
        if bad:
            problems.append(f"{bad[0]} is {types[bad[0]].name}; it must stay F32 or BF16 (its latent rows are "
                            "scaled by a tiny power of two that neutralises the latent RMSNorm)")
    if problems:
        shown = "\n  - ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise GGUFError(f"{path} would not load correctly in llama.cpp:\n  - {shown}{more}\n"
                        "Re-export it with `edge-mla export gguf`.")
    info = GGUFInfo(path, arch, k["L"], k["E"], k["H"], k["Hkv"], k["V"], k["ctx"], k["dk"], k["dv"],
                    tensor_types=types)
    if arch == "deepseek2":
        info.latent_dim, info.rope_dim = k["C"], k["R"]
    return info


def check_kv_type(info: GGUFInfo, kv_type: str) -> None:
    """A quantized cache needs its block size to divide the cached rows (llama.cpp refuses the context)."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"unknown KV cache type '{kv_type}': choose one of {', '.join(KV_TYPES)}")
    block = GGML_QUANT_SIZES[KV_TYPES[kv_type]][0]
    rows = {"C + R": info.head_k, "C": info.head_v} if info.is_mla else {"key head": info.head_k,
                                                                           "value head": info.head_v}
    for what, n in rows.items():
        if n % block:
            fix = ("re-export with --align 32 (pads C and R with exact zeros)" if info.is_mla
                   else "use an f16 cache")
            raise ValueError(f"{info.path.name}: a {kv_type} cache stores blocks of {block}, which do not divide "
                             f"{what} = {n}; {fix}")


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

    def kv_cache(self) -> dict:
        return kv_cache_from_log(self.log)


def open_model(path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, kv_type: str = "f16",
               logits_all: bool = False, n_batch: int = 512, verbose: bool = False) -> Model:
    """Check the file, then load it in llama.cpp with the cache type asked for (flash attention on for a
    quantized cache, which llama.cpp requires)."""
    info = check_gguf(path)
    check_kv_type(info, kv_type)
    llama_cpp = _llama_cpp()
    threads = threads or os.cpu_count() or 1
    qtype = int(KV_TYPES[kv_type])
    start = len(_log_lines)
    _log_echo[0] = verbose
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all, type_k=qtype, type_v=qtype,
                              flash_attn=kv_type not in ("f16", "f32"), verbose=False)
    except ValueError as err:
        tail = "".join(_log_lines[start:])[-600:]
        raise ValueError(f"llama.cpp could not load {path}: {err}\n{tail}") from None
    finally:
        _log_echo[0] = False
    return Model(llm, info, kv_type, "".join(_log_lines[start:]))


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


def run_cli(args) -> int:
    """`edge-mla run FILE.gguf`: generate from a prompt with llama.cpp and report the cache it used."""
    path = Path(args.path)
    kv_type = args.kv_type or "f16"
    info = check_gguf(path)
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
    model = open_model(path, n_ctx=n_ctx, threads=args.threads, kv_type=kv_type)
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
    print(llm.detokenize(out).decode("utf-8", errors="replace"))
    cache = model.kv_cache()
    kind = f"MLA, latent {info.latent_dim} + rope {info.rope_dim}" if info.is_mla else f"{info.arch}"
    per_token = info.kv_bytes_per_token(kv_type)
    print(f"[{path.name}: {kind}; {len(ids)} prompt tokens in {prefill:.2f} s, {len(out)} new tokens at "
          f"{len(out) / max(decode, 1e-9):.1f} tok/s; KV cache {kv_type}: {per_token} bytes/token, "
          f"llama.cpp allocated {cache['mib']:.2f} MiB for {cache['cells']} cells]", file=sys.stderr)
    return 0


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
