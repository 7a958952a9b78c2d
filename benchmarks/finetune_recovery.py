"""How much a short fine-tune recovers: held-out perplexity of the original, the training-free conversion and
the fine-tuned conversion (plain and distilled), with training throughput and memory. Needs a GPU to be quick.

    python benchmarks/finetune_recovery.py --tokens 10000000 --runs plain,distill --json docs/results/finetune.json
    torchrun --nproc_per_node 2 benchmarks/finetune_recovery.py ...   # several GPUs (DDP)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert, load, save
from edge_mla.data import CORPUS_ABOUT, BOOKS, split_text, token_windows
from edge_mla.eval import perplexity
from edge_mla.finetune import TrainConfig, finetune
from edge_mla.source import load_source


def heldout_ppl(model, tokenizer, windows: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ppl = perplexity(model.to(device), token_windows(tokenizer, split_text("heldout"), 1024, windows))
    model.to("cpu")
    return ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--selection", default="shared")
    ap.add_argument("--latent", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--runs", default="plain,distill", help="comma list of plain, distill")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of 1024 tokens")
    ap.add_argument("--work", default="/tmp/edge-mla-ft", help="scratch folder for models")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    work = Path(args.work)
    converted = work / f"{args.model}-{args.selection}-{args.latent}"
    result = {"model": args.model, "selection": args.selection, "latent": args.latent, "tokens": args.tokens,
              "heldout": f"{args.windows} x 1024 tokens, {CORPUS_ABOUT}",
              "training_data": ["Wikipedia calibration split (first 80% of articles)"] + [b[3] for b in BOOKS.values()],
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "rows": []}
    if rank == 0 and not converted.exists():
        src = load_source(args.model)
        calib = token_windows(src.tokenizer, split_text("calibration"), 1024, 16)
        stats = collect_stats(src.model.to("cuda" if torch.cuda.is_available() else "cpu"), calib)
        src.model.to("cpu")
        result["rows"].append({"model": "original", "ppl": heldout_ppl(src.model, src.tokenizer, args.windows)})
        t0 = time.perf_counter()
        convert(src.model, Plan(selection=args.selection, latent=args.latent), stats, source=args.model)
        result["convert_s"] = time.perf_counter() - t0
        save(src.model, src.tokenizer, converted)
        result["rows"].append({"model": "converted, no fine-tune", "ppl": heldout_ppl(src.model, src.tokenizer,
                                                                                      args.windows)})
    if torch.distributed.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        dist.barrier()
    for run in args.runs.split(","):
        if not run:
            continue
        cfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, micro_batch=args.micro_batch, lr=args.lr,
                          distill=0.5 if run == "distill" else 0.0, compile=args.compile)
        out = work / f"{converted.name}-ft-{run}-{args.tokens}"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        summary = finetune(converted, out, cfg, teacher=args.model, overwrite=True)
        wall = time.perf_counter() - t0
        if rank == 0:
            model, tokenizer = load(out)
            hist = summary["history"]
            steady = [h["tokens_per_s"] for h in hist[len(hist) // 4:]] or [0]
            result["rows"].append({
                "model": f"fine-tuned ({run})", "ppl": heldout_ppl(model, tokenizer, args.windows),
                "train_tokens": summary["steps"] * cfg.micro_batch * summary["world_size"] * cfg.seq_len,
                "world_size": summary["world_size"], "tokens_per_s": steady[-1], "wall_s": wall,
                "peak_gpu_gib": (summary["peak_gpu_bytes"] or 0) / 2**30, "final_loss": hist[-1]["loss"],
                "first_loss": hist[0]["loss"]})
    if rank == 0:
        for row in result["rows"]:
            print(json.dumps(row))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
