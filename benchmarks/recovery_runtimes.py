"""What each CPU-recovery option buys, measured through llama.cpp and onnxruntime at the build's bits.

    python benchmarks/recovery_runtimes.py [--variants base,norm,norm-w4] [--json out.json]

One conversion of the build's plan, then per variant a copy recovered as the build does and exported at 4-bit
weights and a 4-bit cache (GGUF q4_0/q4_0, ONNX int4/int4), beside the original exported the same way. Prints
file sizes and held-out perplexity on two texts (edge_mla.quality: Wikipedia held out, ABC news never fitted on).

Variants: base = the build before the learned latent norm (float weights in training, neutralised norm, kv_a BF16
and up-projections 8-bit in the GGUF); norm = a learned latent RMSNorm (kv_a 4-bit); norm-w4 = also trained through
every 4-bit weight incl. the up-projections, which are then stored at 4 bits; norm-w4-up8 = the same but the
up-projections trained in float and stored at 8 bits; w4 = base trained through 4-bit q/o.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from edge_mla import precision, recover
from edge_mla.plans import recovery_windows
from edge_mla.convert import calibrate_and_convert, named_plan
from edge_mla.mla_folder import save
from edge_mla.export import gguf as gguf_export
from edge_mla.export import onnx as onnx_export
from edge_mla.quality import measure
from edge_mla.source import load_source

VARIANTS = {"base": {}, "w4": {"weight_bits": 4}, "norm": {"latent_norm": True},
            "norm-w4": {"latent_norm": True, "weight_bits": 4, "up_projections": True},
            "norm-w4-up8": {"latent_norm": True, "weight_bits": 4}}


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data")]
    return round(sum(p.stat().st_size for p in files) / 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="base,norm,norm-w4", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows per text")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bits, kv_bits = 4, 4
    weights, cache = precision.gguf_weight_type(bits), precision.gguf_cache_type(kv_bits)
    onnx_cache = precision.ONNX_CACHE_DTYPE[kv_bits]
    src = load_source(args.model)
    work = Path(tempfile.mkdtemp(prefix="recovery-runtimes-"))
    rows, sizes = [], {}

    def report(name, files):
        for row in measure({name: files}, src.tokenizer, kv_type=cache, onnx_cache=onnx_cache, count=args.windows,
                           length=args.length):
            rows.append({"variant": name, "runtime": row.runtime, "text": row.text, "perplexity": row.perplexity})
        sizes[name] = {"gguf_mb": size_mb(files["gguf"]), "onnx_mb": size_mb(files["onnx"])}
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"model": args.model, "bits": bits, "kv_bits": kv_bits, "steps": args.steps,
                           "eval": f"{args.windows} x {args.length} tokens per text", "sizes": sizes, "rows": rows},
                          f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    original = {"gguf": work / "original.gguf", "onnx": work / "original-onnx"}
    onnx_export.export(args.model, original["onnx"], weight_bits=bits, kv_bits=kv_bits, original=True,
                       head_bits=precision.head_bits(bits), model=src.model, tokenizer=src.tokenizer)
    gguf_export.export(src, original["gguf"], weights=weights, cache_type=cache)
    report("original", original)
    teacher = recover.collect_attention_io(
        src.model, recovery_windows(src.tokenizer))
    calibrate_and_convert(src, named_plan("recovered", src.model.config))
    converted = src.model
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        src.model = copy.deepcopy(converted)
        summary = recover.recover_converted(src.model, (list(teacher[0]), list(teacher[1])), steps=args.steps,
                                            cache_bits=kv_bits, **VARIANTS[name])
        folder = save(src.model, src.tokenizer, work / name)
        files = {"gguf": work / f"{name}.gguf", "onnx": work / f"{name}-onnx"}
        onnx_export.export(str(folder), files["onnx"], weight_bits=bits, kv_bits=kv_bits,
                           head_bits=precision.head_bits(bits), model=src.model, tokenizer=src.tokenizer)
        gguf_export.export(src, files["gguf"], weights=weights, cache_type=cache)
        print(f"{name}: recovered in {summary['seconds']} s ({summary['trained_through']}), "
              f"{time.perf_counter() - t0:.0f} s with exports")
        report(name, files)
    ref = {(r["runtime"], r["text"]): r["perplexity"] for r in rows if r["variant"] == "original"}
    print("\n| variant | GGUF MB | ONNX MB | " + " | ".join(f"{rt} {tx}" for rt, tx in ref) + " |")
    print("|---|---|---|" + "---|" * len(ref))
    for name in sizes:
        got = {(r["runtime"], r["text"]): r["perplexity"] for r in rows if r["variant"] == name}
        cells = [f"{got[k]:.2f}" + ("" if name == "original" else f" ({got[k] / ref[k]:.3f}x)") for k in ref]
        print(f"| {name} | {sizes[name]['gguf_mb']} | {sizes[name]['onnx_mb']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
