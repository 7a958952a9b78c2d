"""What the CPU recovery's teacher text and step count buy, per layer, on text it never saw.

    python benchmarks/recovery_teacher.py [--layers 3,14,25] [--variants "first:16;spread:48;spread:96;spread:32@600"]
        [--json docs/results/recovery_teacher.json]

The model is converted training-free (the build's plan); then for each chosen layer and each teacher variant a copy
of that layer's MLA block is recovered exactly as the build does it (recover.LayerRecovery: the latent rotation, the
learned latent norm, the training through the q4_0 cache and the 4-bit weights) on the original's attention inputs
and outputs over that text, and scored by the relative error of its output, with the shipped q4_0 cache and q4_0
weights, on 4 x 512 tokens of held-out Wikipedia and of the ABC news text (neither trains anything). A per-layer
proxy for perplexity: minutes, not the hour a whole recovered model per variant takes on 2 cores.

Variants (joined with ';'; '+' concatenates texts; '@N' sets the steps, '/LR' the learning rate): first:N (the first
N windows of the calibration split, the build's text before), spread:N (N windows spread over the split,
data.spread_windows), book:NAME:N (N windows spread over one of data.BOOKS), jsonl:PATH:N (N windows of a JSONL
file's "text" fields, e.g. the original model's own samples, edge_mla.selfdistill).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from edge_mla import recover as rc
from edge_mla.plans import recovery_options
from edge_mla.convert import calibrate_and_convert, named_plan
from edge_mla.data import book_text, news_text, split_text, spread_windows, token_windows
from edge_mla.mla import mla_layers
from edge_mla.source import load_source

LENGTH = 512


def windows(tokenizer, spec: str) -> torch.Tensor:
    kind, _, rest = spec.partition(":")
    if kind == "first":
        return token_windows(tokenizer, split_text("calibration"), LENGTH, int(rest))
    if kind == "spread":
        return spread_windows(tokenizer, count=int(rest), length=LENGTH)
    if kind == "book":  # N windows spread over one of data.BOOKS
        name, _, count = rest.partition(":")
        book = token_windows(tokenizer, book_text(name), LENGTH)
        return book[torch.linspace(0, len(book) - 1, int(count)).round().long()]
    if kind == "jsonl":
        path, _, count = rest.rpartition(":")
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        return token_windows(tokenizer, tokenizer.eos_token.join(texts), LENGTH, int(count))
    raise ValueError(f"unknown teacher text '{spec}': first:N, spread:N or jsonl:PATH:N")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="3,14,25")
    ap.add_argument("--variants", default="first:16;spread:48;spread:96;first:16+spread:16@600")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per layer where a variant names none")
    ap.add_argument("--compute", choices=["auto", "float32", "bf16"], default="auto",
                    help="the training's forward: bf16 autocast, float32, or as the build picks (recover.native_bf16)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = load_source(args.model)
    src.model.eval()
    tok = src.tokenizer
    original = copy.deepcopy(src.model)
    layers = [int(v) for v in args.layers.split(",")]
    bf16 = {"auto": None, "float32": False, "bf16": True}[args.compute]
    variants = []
    for v in args.variants.split(";"):
        v, _, lr = v.partition("/")
        variants.append((v.partition("@")[0], int(v.partition("@")[2] or args.steps), float(lr or 1e-4)))

    def io(w: torch.Tensor) -> dict:
        ins, outs = rc.collect_attention_io(original, w, desc="teacher pass")
        return {i: (ins[i], outs[i]) for i in layers}

    texts = {spec: io(windows(tok, spec)) for spec in {s for v, _, _ in variants for s in v.split("+")}}
    held_out = {"wiki": io(token_windows(tok, split_text("heldout"), LENGTH, 4)),
                "news": io(token_windows(tok, news_text(), LENGTH, 4))}
    calibrate_and_convert(src, named_plan("recovered", src.model.config))  # training-free, in place
    blocks = mla_layers(src.model)

    def score(attn, i: int) -> dict:
        shipped = copy.deepcopy(attn)
        params = dict(shipped.named_parameters())
        with torch.no_grad():
            for name, w in rc.q4_0_weights(shipped).items():
                params[name].copy_(w)
        shipped.cache_quant = rc.shipped_cache_quant(shipped, 4)
        return {k: round(rc.evaluate_attention(shipped, *held_out[k][i]), 5) for k in held_out}

    rows = []
    print("| layer | teacher | steps | lr | held-out Wikipedia error | news error | seconds |\n" + "|---" * 7 + "|")
    for i in layers:
        for spec, steps, lr in variants:
            ins = torch.cat([texts[s][i][0] for s in spec.split("+")])
            outs = torch.cat([texts[s][i][1] for s in spec.split("+")])
            block = copy.deepcopy(blocks[i])
            t0 = time.perf_counter()
            rc.LayerRecovery(steps=steps, bf16=bf16, **{**recovery_options(4, 4), "lr": lr})(i, block, ins, outs)
            row = {"layer": i, "teacher": spec, "windows": int(ins.shape[0]), "steps": steps, "lr": lr,
                   "compute": args.compute, **score(block, i),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"| {i} | {spec} | {steps} | {lr:g} | {row['wiki']:.4f} | {row['news']:.4f} | {row['seconds']} |",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"model": args.model, "threads": 1, "held_out": "4 x 512 tokens per text",
                               "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
