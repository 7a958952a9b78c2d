"""Check the device rule of edge_mla/speedmodel.py (`on_machine`): a runtime's line of time per token against the
context, measured on one machine and scaled by two machines' rates (memory bandwidth for the decode's fixed part,
multiply-adds for the rest), against what the other machine measures.

    python benchmarks/device_speed.py --mla-gguf BUILD/model.gguf --original-gguf original.gguf \
        --mla-onnx BUILD/onnx --original-onnx original_onnx --threads 2 1 --out docs/results/device_speed.json

The "machines" are this one at each thread count (a 1-core machine has about half the arithmetic and less than
the bandwidth of a 2-core one; the rule must follow both): for each, speedmodel.probe's rates and the four files'
speeds after 256- and 1024-token prompts, then 32 tokens (llama.cpp at the priced q4_0 cache and at f16 with flash
attention; onnxruntime int4), the best of --repeats passes. Each machine's lines, scaled to every other machine's
rates, predict that machine's measured speeds; the table gives the error of each prediction.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from edge_mla import speed, speedmodel
from edge_mla.quality import text_windows

DECODED = 32


def lines_by_setting(rows: list) -> dict:
    """{(runtime, cache, flash attention): {phase: {model: Line}}} through each setting's measured prompts."""
    points: dict = {}
    for r in rows:
        at = points.setdefault((r.runtime, r.cache, r.flash_attention), {"decode": {}, "prefill": {}})
        at["decode"].setdefault(r.model, {})[speedmodel.decode_context(r.prompt_tokens, DECODED)] = r.decode_tokens_per_s
        at["prefill"].setdefault(r.model, {})[r.prompt_tokens] = r.prefill_tokens_per_s
    return {key: {phase: {m: speedmodel.line(p) for m, p in by_model.items() if len(p) > 1}
                  for phase, by_model in phases.items()} for key, phases in points.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mla-gguf", required=True)
    p.add_argument("--original-gguf", required=True)
    p.add_argument("--mla-onnx", required=True)
    p.add_argument("--original-onnx", required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--prompts", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from edge_mla.runtimes.gguf_file import check_gguf
    tokenizer = AutoTokenizer.from_pretrained(args.mla_onnx)
    prompt = text_windows(tokenizer, "wikipedia-heldout", 1, max(args.prompts))[0].tolist()
    files = {"mla": {"gguf": args.mla_gguf, "onnx": args.mla_onnx},
             "original": {"gguf": args.original_gguf, "onnx": args.original_onnx}}
    check_gguf(args.mla_gguf), check_gguf(args.original_gguf)
    machines = {}
    for threads in args.threads:
        rates = speedmodel.probe(threads)
        print(f"{threads} threads: {rates.bandwidth_gbs} GB/s, {rates.gmacs} GMAC/s (probe)", flush=True)
        rows = speed.measure(files, [prompt[:n] for n in args.prompts], kv_type="q4_0", onnx_cache="int4",
                             threads=threads, repeats=args.repeats, llama_settings={m: [("f16", True)] for m in files})
        machines[threads] = {"rates": rates, "rows": rows, "lines": lines_by_setting(rows)}

    predictions = []
    for source, fitted in machines.items():
        for target, measured in machines.items():
            if source == target:
                continue
            for setting, phases in fitted["lines"].items():
                scaled = speedmodel.on_machine(phases, fitted["rates"], measured["rates"])
                for r in measured["rows"]:
                    if (r.runtime, r.cache, r.flash_attention) != setting:
                        continue
                    for phase, got in (("decode", r.decode_tokens_per_s), ("prefill", r.prefill_tokens_per_s)):
                        line = scaled[phase].get(r.model)
                        if line is None:
                            continue
                        at = speedmodel.decode_context(r.prompt_tokens, DECODED) if phase == "decode" else r.prompt_tokens
                        guess = line.tokens_per_s(at)
                        predictions.append(dict(measured_with=source, predicted_for=target, runtime=r.runtime,
                                                cache=r.cache, flash_attention=r.flash_attention, model=r.model,
                                                phase=phase, prompt=r.prompt_tokens, measured=round(got, 1),
                                                predicted=round(guess, 1), error=round(guess / got - 1, 3)))
    print(f"\n{'from':>4s} {'to':>3s} {'runtime':11s} {'cache':9s} {'model':8s} {'phase':7s} {'prompt':>6s} "
          f"{'measured':>8s} {'predicted':>9s} {'error':>7s}")
    for r in predictions:
        cache = r["cache"] + (" FA" if r["flash_attention"] else "")
        print(f"{r['measured_with']:4d} {r['predicted_for']:3d} {r['runtime']:11s} {cache:9s} {r['model']:8s} "
              f"{r['phase']:7s} {r['prompt']:6d} {r['measured']:8.1f} {r['predicted']:9.1f} {100 * r['error']:+6.1f}%")
    worst = max((abs(r["error"]) for r in predictions), default=None)
    if worst is not None:
        print(f"\nlargest error: {100 * worst:.1f}% over {len(predictions)} predictions")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/device_speed.py"] + sys.argv[1:]),
            "machines": {t: {"rates": asdict(m["rates"]), "speeds": speed.as_dicts(m["rows"])}
                         for t, m in machines.items()},
            "predictions": predictions, "largest_error": worst}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
