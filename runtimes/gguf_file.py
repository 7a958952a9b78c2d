"""The GGUF file rules: what llama.cpp's loader accepts (deepseek2 MLA, llama, qwen2) and what a file's cache
costs. `check_gguf` reads a GGUF with gguf-py and checks every key and tensor shape that llama.cpp will check,
so a broken file gets a message naming the problem instead of a crash or a silently wrong model. Read by the
exporter, the budget and the runner; imports neither torch nor llama.cpp.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from edge_mla.precision import GGUF_CACHE_KEY

QT = GGMLQuantizationType
# Cache types llama.cpp can hold; the numbers are ggml's type ids, the same as gguf-py's.
KV_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
ARCHS = ("deepseek2", "llama", "qwen2", "qwen3", "smollm3")

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
    cache_type: str = "f16"  # the cache the file was exported (and priced) for: edge_mla.cache_type, else f16

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
        if arch == "qwen3":  # per-head q/k RMSNorm weights
            shapes.update({b + "attn_q_norm.weight": (dk,), b + "attn_k_norm.weight": (dk,)})
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
    """Check a GGUF against what llama.cpp's loader expects; raise GGUFError naming every problem found. Each
    version of a file (path, modification time, size) is parsed once per process: a build reads its files' headers
    for the budget, the quality and speed runs and the run settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _checked(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _checked(path: Path, mtime_ns: int, size: int) -> GGUFInfo:
    try:
        reader = GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError/struct errors on foreign files
        raise GGUFError(f"{path} is not a GGUF file that can be read ({type(err).__name__}: {err})") from None
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
    recorded = _field(reader, GGUF_CACHE_KEY, required=False)
    if recorded in KV_TYPES:
        info.cache_type = recorded
    return info


def runnable_cache_type(info: GGUFInfo, wanted: str) -> str:
    """`wanted`, or f16 where its blocks do not divide this file's cache rows (llama.cpp would refuse it: a tiny
    model's head of 16, say); the caller records which one it used."""
    try:
        check_kv_type(info, wanted)
        return wanted
    except ValueError:
        return "f16"


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


