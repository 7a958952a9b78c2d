"""How fast the original model writes self-distillation text: selfdistill.Sampler (static KV cache, decode step
compiled into a CUDA graph, bf16) at several batch sizes, then generate_texts end to end; `--reference` also times
transformers' generate() (growing cache, fp32 weights under bf16 autocast: the generator before) on one batch of
the same prompts. Tokens counted as generate_texts counts them: each row up to and including its end-of-turn token.

    python benchmarks/selfdistill_speed.py --batches 1024,2048 --tokens 4000000 --json docs/results/selfdistill_speed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

from edge_mla.data import training_texts
from edge_mla.selfdistill import Sampler, generate_texts, make_prompts
from edge_mla.source import load_source


def useful(out: torch.Tensor, eos: int) -> int:
    """Tokens up to and including each row's eos (all of a row that has none)."""
    hit = out == eos
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], out.shape[1], dtype=torch.long))
    return int(first.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", default="1024,2048")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per batch size (after one warm-up batch)")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=0, help="then generate_texts end to end for this many tokens")
    ap.add_argument("--reference", action="store_true", help="also time generate() on one batch of 1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    src = load_source(args.model)
    tok, model = src.tokenizer, src.model.cuda().eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    corpus = training_texts()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "new_tokens": args.new_tokens, "rows": []}

    def report(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for batch in [int(b) for b in args.batches.split(",")]:
        rng = random.Random(0)
        torch.manual_seed(0)
        sampler = Sampler(bf16, batch, args.new_tokens)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        sampler(make_prompts(tok, corpus, batch, rng), eos, pad)  # compiles and captures the graph
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        made = slots = 0
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = sampler(make_prompts(tok, corpus, batch, rng), eos, pad)
            made += useful(out, eos)
            slots += out.shape[0] * out.shape[1]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        report({"generator": "Sampler (static cache, CUDA graph, bf16)", "batch": batch, "warmup_s": round(warm, 1),
                "tokens": made, "seconds": round(dt, 2), "tokens_per_s": round(made / dt),
                "share_of_rows_written": round(made / slots, 3),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)})
    if args.reference:
        rng = random.Random(0)
        prompts = make_prompts(tok, corpus, 1024, rng)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                 top_k=0, max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        made = useful(out[:, width:], eos)
        report({"generator": "transformers generate() (dynamic cache, fp32 + autocast)", "batch": 1024,
                "tokens": made, "seconds": round(dt, 2), "tokens_per_s": round(made / dt)})
    if args.tokens:
        t0 = time.perf_counter()
        texts = generate_texts(model, tok, args.tokens, corpus, seed=0)
        dt = time.perf_counter() - t0
        report({"generator": "generate_texts (end to end: prompts, Sampler, decoding to text)", "batch": 1024,
                "tokens": args.tokens, "texts": len(texts), "seconds": round(dt, 1),
                "tokens_per_s": round(args.tokens / dt)})


if __name__ == "__main__":
    main()
