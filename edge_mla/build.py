"""`edge-mla build`: source -> convert -> (fine-tune) -> ONNX + GGUF -> budget report, all or nothing."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import budget as bud
from . import precision, provenance
from .convert import Plan, resolve_plan

# The training-free default: the strongest compression whose held-out perplexity stayed within QUALITY_BOUND of
# the original in docs/conversion_quality.md (SmolLM2-135M). A shared rope head keeps every frequency (llama.cpp
# runs it exactly) and C + R = 320 is a multiple of 32 (q8_0/q4_0 caches).
QUALITY_BOUND = 0.40
TRAINING_FREE_PLAN = Plan(selection="shared", latent=256, weighting="attention")
# With fine-tuning the latent can shrink much further: docs/finetune.md (C=128 recovers the original's perplexity).
FINETUNED_PLAN = Plan(selection="shared", latent=128, weighting="attention")


def step(i: int, n: int, what: str) -> None:
    print(f"[{i}/{n}] {what}", flush=True)


def build(model: str, device_name: str, bits: int, out: str | Path, context: int | None = None,
          finetune_tokens: int = 0, plan: Plan | None = None, force: bool = False,
          devices_file: str | None = None, kv_bits: int | None = None) -> dict:
    from .source import load_source

    precision.check_bits(bits)
    kv_bits = precision.check_bits(kv_bits or precision.default_cache_bits(bits, bool(finetune_tokens)), "--kv-bits")
    device = bud.find_device(device_name, bud.load_devices(devices_file))
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    if finetune_tokens:
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--finetune-tokens needs a CUDA GPU and none is visible; build without fine-tuning here "
                             "and fine-tune on a GPU machine with `edge-mla finetune`")
    if not device.runtimes:
        raise ValueError(f"no LLM fits {device.name}: {device.usable_mb} MB usable and no runtime that runs an LLM "
                         "there; even a 135M-parameter model at 4 bits needs about 90 MB. Pick a device with at least "
                         "256 MB of RAM (e.g. rpi-zero-2w)")
    n = 6 if finetune_tokens else 5
    t0 = time.perf_counter()
    step(1, n, f"loading {model}")
    src = load_source(model)
    config = src.model.config
    limit = int(config.max_position_embeddings)
    context = context or min(limit, 4096)
    if context > limit:
        raise ValueError(f"--context {context} is beyond what {model} allows ({limit}); use {limit} or less")
    plan = plan or (FINETUNED_PLAN if finetune_tokens else TRAINING_FREE_PLAN)
    full = resolve_plan(config, replace(plan, latent=None)).latent
    if plan.latent is not None and plan.latent > full:
        plan = replace(plan, latent=full)  # a small model: its full rank is already below the default latent

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        from .convert import convert_source, describe
        step(2, n, f"converting to MLA ({plan.selection} rope head, latent {plan.latent})")
        mla_dir, mla = convert_source(src, plan, staging / "mla")
        print("      " + describe(mla, config))
        k = 3
        if finetune_tokens:
            from .finetune import TrainConfig, finetune
            step(k, n, f"fine-tuning on {finetune_tokens:,} tokens (distilled from the original)")
            finetune(mla_dir, staging / "mla-ft", TrainConfig(tokens=finetune_tokens, distill=0.5), teacher=model)
            shutil.rmtree(mla_dir)
            os.replace(staging / "mla-ft", mla_dir)
            k += 1
        from .export import gguf as gguf_export
        from .export import onnx as onnx_export
        step(k, n, f"exporting ONNX ({bits}-bit weights, {kv_bits}-bit latent cache)")
        # 4-bit: the tied embedding/output head keeps 8 bits, as the GGUF's q4_0 mix does (llama.cpp's practice)
        onnx_dir = onnx_export.export(str(mla_dir), staging / "onnx", weight_bits=bits, kv_bits=kv_bits,
                                      head_bits=precision.head_bits(bits))
        step(k + 1, n, f"exporting GGUF ({precision.gguf_weight_type(bits)} weights, "
                       f"{precision.gguf_cache_type(kv_bits)} cache)")
        gguf_file = staging / "model.gguf"
        gguf_export.export(str(mla_dir), gguf_file, weights=precision.gguf_weight_type(bits),
                           cache_type=precision.gguf_cache_type(kv_bits))
        step(k + 2, n, f"budgeting for {device.name} (the original measured through the same exporters)")
        original = staging / ".original"
        orig_onnx = onnx_export.export(model, original / "onnx", weight_bits=bits, kv_bits=kv_bits, original=True,
                                       head_bits=precision.head_bits(bits))
        orig_gguf = original / "original.gguf"
        gguf_export.export(model, orig_gguf, weights=precision.gguf_weight_type(bits),
                           cache_type=precision.gguf_cache_type(kv_bits))
        summary, footprints, budgets = assess(model, config, mla, onnx_dir, gguf_file, device, kv_bits, context,
                                              orig_onnx, orig_gguf)
        summary["bits"], summary["kv_bits"] = bits, kv_bits
        shutil.rmtree(original)
        summary["plan"] = asdict(plan)
        summary["provenance"] = provenance.record(model, mla=mla, bits=bits, kv_bits=kv_bits,
                                                  calibration="built-in Wikipedia sample (gensim 4.4.0)")
        summary["finetune_tokens"] = finetune_tokens
        summary["build_seconds"] = round(time.perf_counter() - t0, 1)
        fits = [b for b in budgets if b.fits and not b.model.startswith("original")]
        if not fits:
            raise ValueError(no_fit_message(budgets, device, context))  # a device/context to change: exit 2
        from .report import write_reports
        write_reports(staging, summary, footprints, budgets, device, limit)
        for path in [staging, *staging.rglob("*")]:  # temporary files are created private; publish readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(summary["verdict"])
    for b in budgets:
        print("  " + bud.format_budget(b))
    print(f"wrote {out}/ (report.html, report.json, onnx/, model.gguf, mla/) in {summary['build_seconds']:.0f} s")
    return summary


def assess(model: str, config, mla: dict, onnx_dir: Path, gguf_file: Path, device: bud.Device, kv_bits: int,
           context: int, orig_onnx: Path, orig_gguf: Path):
    mla_onnx = bud.footprint_onnx(onnx_dir)
    mla_gguf = bud.footprint_gguf(gguf_file)  # the cache type the file records: the build's
    try:
        orig_gguf_fp = bud.footprint_gguf(orig_gguf)
    except ValueError:  # a head width the quantized cache's blocks do not divide: llama.cpp runs it with f16
        orig_gguf_fp = bud.footprint_gguf(orig_gguf, "f16")
    footprints = [mla_gguf, mla_onnx]
    for fp in (orig_gguf_fp, bud.footprint_onnx(orig_onnx)):
        fp.name = "original"
        footprints.append(fp)
    plain = {k: v for k, v in config.to_dict().items() if k != "mla"}
    original_cfg = type(config).from_dict(plain)
    fp16 = bud.footprint_estimate(original_cfg, 16, 2.0, "llama.cpp")
    footprints.append(bud.Footprint("original, fp16 cache", "llama.cpp", "original", footprints[2].weights_bytes,
                                    fp16.kv_bytes_per_token, fp16.max_context,
                                    "same weights, llama.cpp's default f16 cache"))
    budgets = [bud.budget(fp, device, context) for fp in footprints]
    best = max((b for b in budgets if not b.model.startswith("original")), key=lambda b: b.max_context)
    orig = max((b for b in budgets if b.model.startswith("original")), key=lambda b: b.max_context)
    verdict = (f"{'Fits' if best.fits else 'Does not fit'}: {model} as MLA on {device.name}, "
               f"{best.memory_mb:.0f} MB at {context} tokens ({best.runtime}); longest context {best.max_context}")
    per_token_orig = footprints[2].kv_bytes_per_token
    fp16_orig = fp16.kv_bytes_per_token
    summary = {
        "model": model, "device": asdict(device), "context": context, "verdict": verdict,
        "mla": mla, "files": {"onnx": str(onnx_dir.name), "gguf": gguf_file.name},
        "footprints": [asdict(fp) for fp in footprints], "budgets": [b.as_dict() for b in budgets],
        "key_figures": {
            "KV cache per token (GGUF, MLA)": f"{mla_gguf.kv_bytes_per_token:.0f} B vs {per_token_orig:.0f} B original "
                                              f"({100 * mla_gguf.kv_bytes_per_token / per_token_orig:.0f}%)",
            "KV cache per token (ONNX, MLA)": f"{mla_onnx.kv_bytes_per_token:.0f} B",
            "KV cache per token, original with its usual fp16 cache": f"{fp16_orig:.0f} B "
                                                                      f"({fp16_orig / mla_gguf.kv_bytes_per_token:.1f}x the MLA GGUF's)",
            "weights (GGUF / ONNX)": f"{mla_gguf.weights_bytes / bud.MB:.0f} MB / {mla_onnx.weights_bytes / bud.MB:.0f} MB",
            "longest context that fits (MLA / original)": f"{best.max_context} / {orig.max_context}",
            "decode bound at this context": f"{best.decode_tokens_per_s_bound:.0f} tokens/s",
        },
    }
    return summary, footprints, budgets


def no_fit_message(budgets: list[bud.Budget], device: bud.Device, context: int) -> str:
    best = min((b for b in budgets if not b.model.startswith("original")), key=lambda b: b.memory_mb)
    over = best.memory_mb - device.usable_mb
    hint = []
    if best.max_context > 0:
        hint.append(f"a context of {best.max_context} or less fits")
    if best.weights_mb > 0:
        hint.append("fewer bits (--bits 4)")
    hint.append("a device with more memory (`edge-mla devices`)")
    return (f"nothing fits {device.name}: the smallest build needs {best.memory_mb:.0f} MB at context {context}, "
            f"{over:.0f} MB more than the {device.usable_mb:.0f} MB usable. Try {'; or '.join(hint)}")
