"""Device catalog and memory model: does an exported model fit a device, how long a context, how fast at best.

    memory(context) = runtime base + weights (the real files) + context * (KV bytes per token + runtime work per token)

The runtime terms are constants measured by benchmarks/budget_accuracy.py (peak RSS of the real runtime at two
contexts, fitted), not guesses. The decode-speed bound assumes every weight byte and every cached byte is read once
per token from DRAM at the device's peak bandwidth: real decoding is slower, never faster.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

MB = 1_000_000
CATALOG = Path(__file__).with_name("devices.toml")

# Fitted on the ORIGINAL SmolLM2-135M files (q4_0 / int4, 8-bit head) at contexts 512, 2048 and 8192 (x86-64
# Linux, 2 threads; benchmarks/budget_accuracy.py, docs/budget.md, 2026-11-30): resident memory the runtime adds
# beyond the model file and the cache, and its working memory per token of context. llama.cpp's base includes
# llama-cpp-python's logits buffer (n_batch x vocabulary x 4 bytes, ~100 MB for a 49k vocabulary); onnxruntime's
# runner prefills in chunks of 128 tokens, so its work per token is small.
RUNTIME_BASE_BYTES = {"llama.cpp": 196 * MB, "onnxruntime": 113 * MB}
RUNTIME_BYTES_PER_TOKEN = {"llama.cpp": 1_306, "onnxruntime": 314}
# ggml cache types: bytes per element


@dataclass
class Device:
    key: str
    name: str
    ram_mb: float
    usable_mb: float
    bandwidth_gbs: float
    cpu: str
    runtimes: list[str]
    source: str
    aliases: list[str] = field(default_factory=list)
    gmacs: float | None = None  # peak float32 multiply-adds, billions a second (speedmodel.device_rates)


def load_devices(extra: str | Path | None = None) -> dict[str, Device]:
    """The built-in catalog, plus (overriding) the entries of a user file or $EDGE_MLA_DEVICES."""
    files = [CATALOG] + [Path(p) for p in (extra, os.environ.get("EDGE_MLA_DEVICES")) if p]
    devices: dict[str, Device] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"device file {file} does not exist")
        try:
            table = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"device file {file} is not valid TOML: {err}") from None
        for key, entry in table.items():
            try:
                devices[key] = Device(key=key, **entry)
            except TypeError as err:
                raise ValueError(f"device '{key}' in {file}: {err}; every entry needs name, ram_mb, usable_mb, "
                                 "bandwidth_gbs, cpu, runtimes and source") from None
    return devices


def find_device(name: str, devices: dict[str, Device]) -> Device:
    lookup = {k: d for k, d in devices.items()}
    lookup.update({alias: d for d in devices.values() for alias in d.aliases})
    if name in lookup:
        return lookup[name]
    near = difflib.get_close_matches(name, list(lookup), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ValueError(f"unknown device '{name}': {hint}`edge-mla devices` lists them all; add your own with --devices FILE")


@dataclass
class Footprint:
    """What a model costs in memory on a runtime."""
    name: str
    runtime: str  # "llama.cpp" or "onnxruntime"
    kind: str  # "mla" or "original"
    weights_bytes: int
    kv_bytes_per_token: float
    max_context: int
    detail: str = ""
    work_bytes_per_token: float = 0.0  # the file's own working memory per token of context (ONNX expanded prefill)

    def memory_bytes(self, context: int) -> float:
        return (RUNTIME_BASE_BYTES[self.runtime] + self.weights_bytes
                + context * (self.kv_bytes_per_token + RUNTIME_BYTES_PER_TOKEN[self.runtime]
                             + self.work_bytes_per_token))


def footprint_gguf(path: str | Path, cache_type: str | None = None) -> Footprint:
    """From a GGUF file: its size, and the cache per token that llama.cpp allocates for it with `cache_type`
    (default: the cache type the file records, else f16)."""
    from edge_mla.runtimes.gguf_file import check_gguf, check_kv_type

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    info = check_gguf(path)
    cache_type = cache_type or info.cache_type
    check_kv_type(info, cache_type)
    kind = "mla" if info.is_mla else "original"
    return Footprint(path.name, "llama.cpp", kind, path.stat().st_size, info.kv_bytes_per_token(cache_type),
                     info.context_length, f"{info.arch}, cache {cache_type}")


def footprint_onnx(folder: str | Path) -> Footprint:
    """From an `edge-mla export onnx` folder: its files, and the cache layout its JSON states."""
    from edge_mla.runtimes.onnxruntime import read_meta

    folder = Path(folder)
    meta = read_meta(folder)
    weights = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    cache = meta["cache"]
    kind = "mla" if meta["architecture"] == "mla" else "original"
    work = float(cache.get("prefill", {}).get("work_bytes_per_token", 0))
    return Footprint(folder.name, "onnxruntime", kind, weights, float(cache["bytes_per_token"]),
                     int(meta["max_context"]), f"weights {meta['weights'].get('bits')}-bit, cache {cache['dtype']}"
                     + (f", expanded prefill ({work / 1000:.1f} KB a token while a prompt is read)" if work else ""),
                     work_bytes_per_token=work)


def footprint_estimate(config, weight_bits: float, cache_bytes_per_elem: float, runtime: str,
                       name: str = "original") -> Footprint:
    """An unexported model (the original, for comparison): parameters x bits, cache from the config."""
    from edge_mla.shape import head_dim

    d = head_dim(config)
    mla = getattr(config, "mla", None)
    per_layer = (mla["latent_dim"] + mla["rope_dim"]) if mla else 2 * config.num_key_value_heads * d
    E, L, V, F = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    attention = E * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    params = L * (attention + 3 * E * F) + V * E * (1 if config.tie_word_embeddings else 2)
    return Footprint(name, runtime, "mla" if mla else "original", int(params * weight_bits / 8),
                     L * per_layer * cache_bytes_per_elem, int(config.max_position_embeddings),
                     f"estimated: {params / 1e6:.0f}M parameters at {weight_bits} bits")


@dataclass
class Budget:
    device: str
    model: str
    runtime: str
    context: int
    memory_mb: float
    usable_mb: float
    fits: bool
    max_context: int
    decode_tokens_per_s_bound: float
    weights_mb: float
    kv_mb: float

    def as_dict(self) -> dict:
        return asdict(self)


def budget(fp: Footprint, device: Device, context: int) -> Budget:
    if context > fp.max_context > 0:
        raise ValueError(f"context {context} is beyond what {fp.name} allows ({fp.max_context}); "
                         f"use --context {fp.max_context} or less")
    usable = device.usable_mb * MB
    fixed = RUNTIME_BASE_BYTES[fp.runtime] + fp.weights_bytes
    per_token = fp.kv_bytes_per_token + RUNTIME_BYTES_PER_TOKEN[fp.runtime]
    longest = max(0, int((usable - fixed) // per_token)) if usable > fixed else 0
    longest = min(longest, fp.max_context) if fp.max_context else longest
    read_per_token = fp.weights_bytes + fp.kv_bytes_per_token * context
    return Budget(device.key, fp.name, fp.runtime, context, fp.memory_bytes(context) / MB, device.usable_mb,
                  fp.memory_bytes(context) <= usable, longest, device.bandwidth_gbs * 1e9 / read_per_token,
                  fp.weights_bytes / MB, fp.kv_bytes_per_token * context / MB)


def format_budget(b: Budget) -> str:
    verdict = "fits" if b.fits else "DOES NOT FIT"
    return (f"{b.model} on {b.device} ({b.runtime}), context {b.context}: {b.memory_mb:.0f} MB of {b.usable_mb:.0f} "
            f"MB usable -> {verdict}; weights {b.weights_mb:.0f} MB, KV {b.kv_mb:.1f} MB; longest context that fits "
            f"{b.max_context}; decode at most {b.decode_tokens_per_s_bound:.0f} tokens/s (bandwidth bound)")
