"""How much a short fine-tune recovers, on text it never saw and through the 4-bit cache: held-out perplexity on
the held-out Wikipedia split and on the ABC news text (data.news_text(); nothing trains or calibrates on it), with
a float cache and with llama.cpp's q4_0 cache emulated over the cached row, for the original (fp32; its q4_0 K/V
cache beside it), the training-free conversion and conversions fine-tuned on the packaged corpora or on those mixed
with text the original model generated itself (selfdistill.py); with training tokens, time, tokens/s and memory.
Needs a GPU.

    python benchmarks/finetune_recovery.py --latents 64 --runs packaged,generated --tokens 20000000 \\
        --cache-bits 4 --generated-tokens 4000000 --json docs/results/finetune_qat.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.data import CORPUS_ABOUT, NEWS_ABOUT, news_text, split_text, token_windows, training_texts
from edge_mla.eval import perplexity
from edge_mla.finetune import BUILTIN_DATA, TrainConfig, finetune
from edge_mla import q4_0
from edge_mla.mla import set_cache_quant
from edge_mla.recover import original_cache_quant
from edge_mla.selfdistill import generate_texts, write_jsonl
from edge_mla.source import load_source

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (a CPU run with a tiny model checks the script)


def evaluate(model, windows: dict, latent: int | None) -> dict:
    """Perplexity on each text with a float cache (16) and llama.cpp's q4_0 cache (4); latent None: the original
    model, whose K and V go through q4_0 instead."""
    model.to(DEVICE).eval()
    out = {}
    for bits in (16, 4):
        if latent is not None:
            set_cache_quant(model, q4_0.mla_cache(latent) if bits == 4 else None)
        quant = original_cache_quant(model) if latent is None and bits == 4 else nullcontext()
        with quant:
            for text, w in windows.items():
                out[f"{text}_{bits}"] = round(perplexity(model, w), 3)
    if latent is not None:
        set_cache_quant(model, None)
    model.cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--latents", default="64", help="comma list of latent widths C")
    ap.add_argument("--rope-pairs", type=int, default=None, help="rope pairs kept (default: all, R = head width)")
    ap.add_argument("--runs", default="packaged,generated",
                    help="comma list: packaged (built-in corpus), generated (built-in corpus + generated text)")
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--distill", type=float, default=0.5)
    ap.add_argument("--cache-bits", type=int, default=4, help="cache the fine-tune trains through: 4 (q4_0) or 16")
    ap.add_argument("--generated-tokens", type=int, default=4_000_000)
    ap.add_argument("--generated", default=None, help="generated text (.jsonl) to reuse instead of generating")
    ap.add_argument("--gen-batch", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of 1024 tokens per text")
    ap.add_argument("--work", default="/tmp/edge-mla-ft", help="scratch folder for models and generated text")
    ap.add_argument("--compile", action="store_true", help="torch.compile student, teacher and head loss")
    ap.add_argument("--cache-teacher", action="store_true", help="keep the teacher's hidden states per row (GPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    runs = [r for r in args.runs.split(",") if r]
    src = load_source(args.model)
    tok = src.tokenizer
    windows = {"wiki": token_windows(tok, split_text("heldout"), 1024, args.windows),
               "news": token_windows(tok, news_text(), 1024, args.windows)}
    result = {"model": args.model, "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
              "texts": {"wiki": f"{args.windows} x 1024 tokens, {CORPUS_ABOUT}",
                        "news": f"{args.windows} x 1024 tokens, {NEWS_ABOUT}"},
              "args": vars(args), "rows": []}

    def report(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))

    report({"model": "original (fp32)", **evaluate(src.model, windows, None)})
    gen_path = Path(args.generated) if args.generated else work / "generated.jsonl"
    if "generated" in runs and not gen_path.exists():
        t0 = time.perf_counter()
        texts = generate_texts(src.model.to(DEVICE), tok, args.generated_tokens, training_texts(), batch=args.gen_batch)
        seconds = time.perf_counter() - t0
        src.model.cpu()
        write_jsonl(gen_path, texts)
        result["generated"] = {"texts": len(texts), "tokens": args.generated_tokens, "seconds": round(seconds, 1),
                               "tokens_per_s": round(args.generated_tokens / seconds)}
        print(json.dumps(result["generated"]), flush=True)
    calib = token_windows(tok, split_text("calibration"), 1024, 16)
    stats = collect_stats(src.model.to(DEVICE), calib)
    src.model.cpu()
    for latent in [int(c) for c in args.latents.split(",")]:
        model = copy.deepcopy(src.model)
        convert(model, Plan(selection="shared", latent=latent, rope_pairs=args.rope_pairs), stats, source=args.model)
        converted = save(model, tok, work / f"{args.model}-{latent}", overwrite=True)
        mla = model.config.mla
        shape = {"latent": latent, "rope_dim": mla["rope_dim"], "cached_per_token_layer": latent + mla["rope_dim"]}
        report({"model": "training-free", **shape, **evaluate(model, windows, latent)})
        del model
        for run in runs:
            cfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, micro_batch=args.micro_batch, lr=args.lr,
                              distill=args.distill, compile=args.compile, cache_bits=args.cache_bits,
                              cache_teacher=args.cache_teacher)
            data = [BUILTIN_DATA, str(gen_path)] if run == "generated" else None
            out = work / f"{converted.name}-{run}"
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            summary = finetune(converted, out, cfg, data=data, teacher=args.model, overwrite=True)
            wall = time.perf_counter() - t0
            hist = summary["history"]
            tokens = summary["steps"] * cfg.micro_batch * cfg.seq_len
            trained, _ = load(out)
            report({"model": f"fine-tuned ({run})", **shape, "trained_cache_bits": args.cache_bits,
                    **evaluate(trained, windows, latent), "train_tokens": tokens,
                    "tokens_per_s": round(hist[-1]["tokens_per_s"]),
                    "train_minutes": round(tokens / hist[-1]["tokens_per_s"] / 60, 2), "wall_s": round(wall, 1),
                    "peak_gpu_gib": round((summary["peak_gpu_bytes"] or 0) / 2**30, 1),
                    "first_loss": round(hist[0]["loss"], 3), "final_loss": round(hist[-1]["loss"], 3),
                    "distill": args.distill, "lr": args.lr, "micro_batch": args.micro_batch,
                    "compile": args.compile, "cache_teacher": args.cache_teacher})


if __name__ == "__main__":
    main()
