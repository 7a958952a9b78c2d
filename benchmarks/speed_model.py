"""Check the speed model (edge_mla/speedmodel.py) against measurement: the line of time per token against the
context, drawn through the speeds at the prompts the build measures (256 and 1024 tokens), predicts the speeds at
longer prompts (4096 tokens); and where a file's cached row costs its time (per score, per multiply-add).

    python benchmarks/speed_model.py --onnx docs/results/onnx_prefill_forms.json:224:32 \
        --llama docs/results/llamacpp_settings_lines.json:224:32 ... --out docs/results/speed_model.json

Inputs are the JSON of benchmarks/onnx_decode.py (models "original" and "mla_gqa": the default export) and of
benchmarks/llamacpp_settings.py (flash attention on), each measured at 256, 1024 and 4096 tokens; ":C:R" names the
MLA build's widths (SmolLM2-135M's shape otherwise: 30 layers, 9 query heads of 64). Decode after a prompt of P
tokens is placed at the mean context of its 32 steps, P + 16; prefill at P (its tokens attend over P / 2 rows on
average, so its time per token is a line in P as well).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_mla.speedmodel import decode_context, line

DECODED = 32  # both benchmarks decode 32 tokens after the prompt
LAYERS, HEADS, HEAD_DIM = 30, 9, 64  # SmolLM2-135M


def onnx_runs(path: str) -> dict:
    """{(runtime, cache, model): {prompt: (prefill tok/s, decode tok/s)}} of a benchmarks/onnx_decode.py JSON."""
    result = json.loads(Path(path).read_text())
    runs: dict = {}
    for prompt, files in result["contexts"].items():
        for key, model in (("original", "original"), ("mla_gqa", "mla")):
            if key in files:
                entry = runs.setdefault(("onnxruntime", result["files"][key]["cache"], model), {})
                entry[int(prompt)] = (files[key]["prefill_tok_s"], files[key]["decode_tok_s"])
    return runs


def llama_runs(path: str) -> dict:
    """The same of a benchmarks/llamacpp_settings.py JSON (flash attention on: what the report prints)."""
    result = json.loads(Path(path).read_text())
    runs: dict = {}
    for key, run in result["runs"].items():
        model, setting, prompt = key.split("|")
        cache, _, attention = setting.partition(" cache, ")
        if attention == "flash attention on":
            runs.setdefault(("llama.cpp", cache, model), {})[int(prompt)] = (run["prefill_tok_s"], run["decode_tok_s"])
    return runs


def row_widths(runtime: str, model: str, latent: int, rope: int) -> int:
    """Numbers one query head reads per cached row and layer: key + value (speedmodel.py's docstring)."""
    if model == "original":
        return 2 * HEAD_DIM
    return 2 * (latent + rope) if runtime == "onnxruntime" else 2 * latent + rope


def check(runs: dict, label: str, latent: int, rope: int, fit_prompts: list[int]) -> tuple[list, list]:
    rows, costs = [], []
    for (runtime, cache, model), by_prompt in sorted(runs.items()):
        if not set(fit_prompts) <= set(by_prompt):
            continue
        for phase, index in (("prefill", 0), ("decode", 1)):
            place = (lambda p: decode_context(p, DECODED)) if phase == "decode" else (lambda p: p)
            fitted = line({place(p): by_prompt[p][index] for p in fit_prompts})
            for prompt in sorted(set(by_prompt) - set(fit_prompts)):
                measured, predicted = by_prompt[prompt][index], fitted.tokens_per_s(place(prompt))
                rows.append(dict(file=label, runtime=runtime, cache=cache, model=model, latent=latent, rope=rope,
                                 phase=phase, prompt=prompt, measured=round(measured, 1),
                                 predicted=round(predicted, 1), error=round(predicted / measured - 1, 3)))
            if phase == "decode":  # the cost of one cached row per layer and query head, over all measured prompts
                per_row = line({place(p): v[1] for p, v in by_prompt.items()}).per_token_ms * 1e6 / (LAYERS * HEADS)
                costs.append(dict(file=label, runtime=runtime, cache=cache, model=model,
                                  numbers_per_row=row_widths(runtime, model, latent, rope), ns_per_row=round(per_row, 2)))
    return rows, costs


def split_costs(costs: list[dict]) -> list[dict]:
    """Per runtime and cache: the per-row cost of the original and of the MLA build as score_ns + numbers * mac_ns
    (two shapes, two unknowns): what a score costs whatever its width, and what each number read costs."""
    out = []
    groups: dict = {}
    for c in costs:
        groups.setdefault((c["file"], c["runtime"], c["cache"]), {})[c["model"]] = c
    for (label, runtime, cache), pair in sorted(groups.items()):
        if set(pair) != {"mla", "original"}:
            continue
        (sa, a), (sb, b) = [(pair[m]["numbers_per_row"], pair[m]["ns_per_row"]) for m in ("original", "mla")]
        mac = (b - a) / (sb - sa)
        out.append(dict(file=label, runtime=runtime, cache=cache, score_ns=round(a - sa * mac, 2),
                        number_ns=round(mac, 4), mla_over_original_per_row=round(b / a, 2),
                        mla_over_original_numbers=round(sb / sa, 2)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", nargs="*", default=[], metavar="JSON[:C:R]")
    p.add_argument("--llama", nargs="*", default=[], metavar="JSON[:C:R]")
    p.add_argument("--fit-prompts", type=int, nargs="+", default=[256, 1024],
                   help="the prompts the line goes through (the build measures 256 and 4 x 256)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    rows, costs = [], []
    for reader, specs in ((onnx_runs, args.onnx), (llama_runs, args.llama)):
        for spec in specs:
            path, *width = spec.split(":")
            latent, rope = (int(width[0]), int(width[1])) if width else (224, 32)
            got = check(reader(path), f"{Path(path).name} ({latent}+{rope})", latent, rope, args.fit_prompts)
            rows, costs = rows + got[0], costs + got[1]
    print(f"{'file':42s} {'runtime':11s} {'cache':5s} {'model':8s} {'phase':7s} {'prompt':>6s} "
          f"{'measured':>8s} {'predicted':>9s} {'error':>7s}")
    for r in rows:
        print(f"{r['file'][:42]:42s} {r['runtime']:11s} {r['cache']:5s} {r['model']:8s} {r['phase']:7s} "
              f"{r['prompt']:6d} {r['measured']:8.1f} {r['predicted']:9.1f} {100 * r['error']:+6.1f}%")
    worst = max((abs(r["error"]) for r in rows), default=None)
    if worst is not None:
        print(f"\nlargest error: {100 * worst:.1f}% ({len(rows)} predictions from the lines through "
              f"{' and '.join(map(str, args.fit_prompts))} tokens)")
    split = split_costs(costs)
    if split:
        print("\nwhere a cached row's decode time goes (per layer and query head): a fixed cost per score and one "
              "per number read")
        for s in split:
            print(f"  {s['file'][:42]:42s} {s['runtime']:11s} {s['cache']:5s} score {s['score_ns']:6.2f} ns, "
                  f"number {s['number_ns']:.4f} ns: MLA reads {s['mla_over_original_numbers']:.2f}x the numbers a "
                  f"row, costs {s['mla_over_original_per_row']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "benchmarks/speed_model.py"] + sys.argv[1:]),
            "fit_prompts": args.fit_prompts, "predictions": rows, "largest_error": worst,
            "row_costs": costs, "row_cost_split": split}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
