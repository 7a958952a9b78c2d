"""What the CPU recovery step and the 4-bit cache levers buy: perplexity on two texts per cache width.

    python benchmarks/recovery_quality.py [--widths 128:32,160:16] [--steps 300] [--json out.json]

For each latent width C and rope pairs r (R = 2r): the training-free conversion, then layer-wise teacher-forced
distillation (edge_mla.recover) on calibration Wikipedia, plain or through a q4_0 cache (straight-through), each
scored with a float cache and with llama.cpp's q4_0 cache emulated bit-exactly over the row [c | k_pe]. Reference
rows: the original fp32 model, float and with a q4_0 K/V cache. Texts: held-out Wikipedia, and the Lee news corpus
that nothing is fitted on. Runs on one thread unless told otherwise (the build's CPU budget is the question).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from edge_mla import latent, q4_0
from edge_mla import recover as rc
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.data import CORPUS_ABOUT, NEWS_ABOUT, news_text, split_text, token_windows
from edge_mla.eval import perplexity
from edge_mla.mla import set_cache_quant
from edge_mla.mla import mla_layers
from edge_mla.source import load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--widths", default="256:32,128:32,160:16,64:32", help="C:r pairs (cache C + 2r per layer)")
    ap.add_argument("--modes", default="none,float,ste",
                    help="recovery: none (training-free), float (float cache), ste (through the q4_0 cache), "
                         "ste-norm (ste with a learned latent RMSNorm, as llama.cpp's deepseek2 has)")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1, help="windows per step")
    ap.add_argument("--params", default="all", help="MLA parameters trained: all, or e.g. kv_a_proj,k_up,v_up")
    ap.add_argument("--calib-windows", type=int, default=16, help="recovery text: calibration windows")
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--no-transforms", action="store_true",
                    help="skip the exact q4_0-friendly transform (a Hadamard within each 32-block of the latent)")
    ap.add_argument("--softness", type=float, default=latent.LATENT_NORM_SOFTNESS,
                    help="ste-norm: the latent norm's eps over the latent's median mean square")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here (rewritten after every row)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = load_source(args.model)
    src.model.eval()
    tok = src.tokenizer
    texts = {"wiki": token_windows(tok, split_text("heldout"), args.length, args.windows),
             "news": token_windows(tok, news_text(), args.length, args.windows)}
    stats = collect_stats(src.model, token_windows(tok, split_text("calibration"), 1024, 16))
    calib = token_windows(tok, split_text("calibration"), args.calib_length, args.calib_windows)
    rows: list[dict] = []

    def score(net, **row):
        row.update({name: perplexity(net, w) for name, w in texts.items()})
        rows.append(row)
        show(rows, row)
        if args.json:
            write(args, rows)

    print("| model | C | R | C+R | recovery | recovery s | cache | wiki | news | wiki / fp32 | news / fp32 | "
          "wiki / same bits | news / same bits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    score(src.model, model="original", C=None, R=None, recovery="-", recover_s=0.0, cache="fp32")
    with rc.original_cache_quant(src.model):
        score(src.model, model="original", C=None, R=None, recovery="-", recover_s=0.0, cache="q4_0")
    for width in args.widths.split(","):
        C, r = (int(v) for v in width.split(":"))
        base = copy.deepcopy(src.model)
        convert(base, Plan(selection="shared", latent=C, rope_pairs=r, weighting="attention"), stats)
        base.eval()
        R = mla_layers(base)[0].rope_dim
        if not args.no_transforms:  # exact in float; only what a 4-bit cache loses changes
            for attn in mla_layers(base):
                latent.rotate_latent(attn, latent.block_hadamard(C))
        q4 = q4_0.mla_cache(C)
        for mode in args.modes.split(","):
            model, seconds = base, 0.0
            if mode != "none":
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                io = rc.collect_attention_io(src.model, calib)
                if mode == "ste-norm":
                    latent.install_latent_norms(model, io[0], softness=args.softness)
                rc.recover_layerwise(None, model, None, steps=args.steps, lr=args.lr, batch=args.batch, io=io,
                                     params=args.params,
                                     cache_quant=q4_0.straight_through(q4) if mode.startswith("ste") else None)
                seconds = time.perf_counter() - t0
            common = dict(model="mla", C=C, R=R, recovery=mode, recover_s=round(seconds, 1))
            set_cache_quant(model, None)
            score(model, cache="fp32", **common)
            set_cache_quant(model, q4)
            score(model, cache="q4_0", **common)
            set_cache_quant(model, None)
            if model is not base:
                del model
        del base


def show(rows: list[dict], row: dict) -> None:
    ref = {r["cache"]: r for r in rows if r["model"] == "original"}
    fp32, same = ref["fp32"], ref.get(row["cache"], ref["fp32"])
    width = "-" if row["C"] is None else row["C"] + row["R"]
    print(f"| {row['model']} | {row['C'] or '-'} | {row['R'] or '-'} | {width} | {row['recovery']} | "
          f"{row['recover_s']} | {row['cache']} | {row['wiki']:.2f} | {row['news']:.2f} | "
          f"{row['wiki'] / fp32['wiki']:.3f} | {row['news'] / fp32['news']:.3f} | "
          f"{row['wiki'] / same['wiki']:.3f} | {row['news'] / same['news']:.3f} |", flush=True)


def write(args, rows) -> None:
    meta = {"model": args.model, "texts": {"wiki": CORPUS_ABOUT, "news": NEWS_ABOUT},
            "eval": f"{args.windows} x {args.length} tokens per text", "calibration":
            f"{args.calib_windows} x {args.calib_length} tokens of the Wikipedia calibration split",
            "steps": args.steps, "lr": args.lr, "batch": args.batch, "params": args.params,
            "transforms": not args.no_transforms, "threads": torch.get_num_threads(),
            "cache": "q4_0 = llama.cpp's q4_0 round trip over [c | k_pe] (k_pe interleaved), emulated bit-exactly"}
    with open(args.json + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
