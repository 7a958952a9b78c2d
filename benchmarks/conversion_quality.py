"""Training-free quality of MHA2MLA on a real model: held-out perplexity per selection x latent x weighting.

    python benchmarks/conversion_quality.py [--model smollm2-135m] [--windows 4] [--json out.json]

Prints a markdown table: perplexity of the original and of every conversion, the KV cache per token (fp16)
and its share of the original's, and the conversion time. No fine-tuning anywhere.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from edge_mla import shape
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert, resolve_plan
from edge_mla.data import CORPUS_ABOUT, split_text, token_windows
from edge_mla.eval import perplexity
from edge_mla.source import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of --length tokens")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--ranks", default="8,16,32,64,96,full", help="latent per KV head (MHA2MLA's d_kv), or full")
    ap.add_argument("--selections", default="high,low,uniform,2norm,partition,partition-2norm,shared")
    ap.add_argument("--weightings", default="weights,balanced,attention")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where perplexity runs (conversion itself always runs on the CPU, in float64)")
    ap.add_argument("--json", default=None, help="also write the rows here (rewritten after every row)")
    args = ap.parse_args()

    torch.manual_seed(0)
    src = load_source(args.model)
    cfg = src.model.config
    n_kv, d, layers = cfg.num_key_value_heads, shape.head_dim(cfg), cfg.num_hidden_layers
    original_per_token = 2 * n_kv * d * layers * 2  # fp16 K and V
    heldout = token_windows(src.tokenizer, split_text("heldout"), args.length, args.windows)
    calib = token_windows(src.tokenizer, split_text("calibration"), args.length, args.calib_windows)
    t0 = time.perf_counter()
    stats = collect_stats(src.model.to(args.device), calib)
    calib_s = time.perf_counter() - t0
    original_ppl = perplexity(src.model, heldout)
    src.model.to("cpu")
    rows = [{"selection": "original", "rank_per_kv_head": None, "latent": None, "weighting": None,
             "rope_dim": None, "ppl": original_ppl, "kv_bytes_per_token": original_per_token,
             "kv_share": 1.0, "convert_s": 0.0}]
    print(f"| selection | r | rank/KV head | latent C | rope R | weighting | KV bytes/token (fp16) | share | PPL | convert s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    show(rows[-1])
    for selection in args.selections.split(","):
        for rank in args.ranks.split(","):
            for weighting in args.weightings.split(","):
                plan = Plan(selection=selection, svd="joint", weighting=weighting)
                if rank != "full":
                    plan.latent = int(rank) * n_kv
                try:
                    plan = resolve_plan(cfg, plan)
                except ValueError as err:
                    print(f"skip {selection} {rank} {weighting}: {err}")
                    continue
                if rank == "full" and weighting != "attention":
                    continue  # at full rank the weighting changes nothing
                model = copy.deepcopy(src.model)
                t1 = time.perf_counter()
                mla = convert(model, plan, stats)
                convert_s = time.perf_counter() - t1
                per_token = (mla["latent_dim"] + mla["rope_dim"]) * layers * 2
                rows.append({"selection": selection, "rope_pairs": plan.rope_pairs, "rank_per_kv_head": rank,
                             "latent": mla["latent_dim"], "rope_dim": mla["rope_dim"],
                             "weighting": weighting if rank != "full" else "-",
                             "ppl": perplexity(model.to(args.device), heldout), "kv_bytes_per_token": per_token,
                             "kv_share": per_token / original_per_token, "convert_s": convert_s})
                show(rows[-1])
                del model
                if args.json:
                    write(args, rows, calib_s)
    if args.json:
        write(args, rows, calib_s)


def show(row: dict) -> None:
    print(f"| {row['selection']} | {row.get('rope_pairs', '-')} | {row['rank_per_kv_head'] or '-'} | "
          f"{row['latent'] or '-'} | {row['rope_dim'] or '-'} | {row['weighting'] or '-'} | "
          f"{row['kv_bytes_per_token']} | {100 * row['kv_share']:.1f}% | {row['ppl']:.2f} | "
          f"{row['convert_s']:.1f} |", flush=True)


def write(args, rows, calib_s) -> None:
    meta = {"model": args.model, "heldout_tokens": args.windows * args.length, "window": args.length,
            "corpus": CORPUS_ABOUT, "calibration_tokens": args.calib_windows * args.length,
            "calibration_s": calib_s, "threads": torch.get_num_threads(), "device": args.device,
            "eval_device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    with open(args.json + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    import os
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
