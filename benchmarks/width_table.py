"""Cache width x cache bits x CPU recovery, through the runtimes themselves (issue 11's table).

    python benchmarks/width_table.py [--widths 320,256,192,128] [--json docs/results/width_table.json]

For each C + R (R = 32: the build's rope key, the 16 highest frequencies; C = width - 32), the conversion the
build runs, training-free and then recovered on the CPU as the build recovers (`recover.recover_converted` with
`plans.recovery_options`: through the q4_0 cache and the 4-bit weights, a learned latent norm, `plans.RECOVER_STEPS`
steps per layer on the build's teacher windows), each exported at 4-bit weights as the build exports it (GGUF q4_0
with attn_k_b/attn_v_b at q8_0; ONNX int4 MatMulNBits with an 8-bit head) and scored by llama.cpp with f16 / q8_0 /
q4_0 caches (one file) and by onnxruntime with the caches of --onnx-caches (one export each), on the build's two
texts (`texts.BATTERY`, the same token windows for every row). The original model, exported by the same exporters
at the same bits, is scored with the same caches. Rows are written to --json after each model; a rerun with the
same --json resumes where it stopped. --modes recovered skips the training-free rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from edge_mla import precision, recover
from edge_mla.plans import recovery_options, recovery_windows
from edge_mla.convert import calibrate_and_convert
from edge_mla.mla_folder import save
from edge_mla.export import gguf as gguf_export
from edge_mla.export import onnx as onnx_export
from edge_mla.plans import PLANS, RECOVER_STEPS
from edge_mla.quality import measure
from edge_mla.source import load_source

CACHE_BITS = (16, 8, 4)
ROPE_DIM = 2 * PLANS["recovered"].rope_pairs


def export_and_score(src, name: str, folder: Path, *, original: bool, windows: int, length: int,
                     onnx_caches: list[int], threads: int) -> list[dict]:
    """Export `src` at 4-bit weights (one GGUF; one ONNX per cache width asked for) and score every cache on both
    texts."""
    gguf_file = folder / f"{name}.gguf"
    gguf_export.export(src, gguf_file, weights=precision.gguf_weight_type(4), cache_type="q4_0")
    rows = []
    for bits in CACHE_BITS:
        files = {"gguf": gguf_file}
        if bits in onnx_caches:
            files["onnx"] = onnx_export.export(str(folder / name), folder / f"{name}-onnx-{bits}", weight_bits=4,
                                               kv_bits=bits, head_bits=precision.head_bits(4), original=original,
                                               model=src.model, tokenizer=src.tokenizer)
        found = measure({name: files}, src.tokenizer, kv_type=precision.gguf_cache_type(bits),
                        onnx_cache=precision.ONNX_CACHE_DTYPE[bits], count=windows, length=length,
                        threads=threads)
        rows += [{**asdict(r), "cache_bits": bits} for r in found]
    return rows


def markdown(result: dict) -> str:
    """One row per model and cache bits: perplexity per text in each runtime, and MLA / original at the same bits."""
    cell = {(r["model"], r["cache_bits"], r["runtime"], r["text"]): r["perplexity"] for r in result["rows"]}
    meta = {r["model"]: r for r in result["rows"]}
    lines = ["| model | C + R | recovery (s) | cache bits | llama.cpp wiki | llama.cpp news | onnxruntime wiki | "
             "onnxruntime news |", "|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        m = meta[model]
        for bits in CACHE_BITS:
            cells = []
            for runtime in ("llama.cpp", "onnxruntime"):
                for text in ("wikipedia-heldout", "abc-news"):
                    ppl, base = cell.get((model, bits, runtime, text)), cell.get(("original", bits, runtime, text))
                    ratio = f" ({ppl / base:.2f}x)" if ppl and base and model != "original" else ""
                    cells.append(f"{ppl:.2f}{ratio}" if ppl else "-")
            if all(c == "-" for c in cells):
                continue
            recovery = f"{m.get('recovery_seconds', 0):.0f}" if m.get("recovery_steps") else "-"
            lines.append(f"| {model} | {m.get('width') or '-'} | {recovery} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--widths", default="128,256,320,192", help="C + R per layer (R = %d)" % ROPE_DIM)
    ap.add_argument("--steps", type=int, default=RECOVER_STEPS, help="recovery steps per layer (the build's default)")
    ap.add_argument("--modes", default="free,recovered", help="training-free and/or recovered rows")
    ap.add_argument("--windows", type=int, default=4, help="token windows per text (the build's default)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--onnx-caches", default="16,8,4", help="onnxruntime cache bits to export and score")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and the runtimes (1: a shared machine; oversubscribed cores spin)")
    ap.add_argument("--json", default="docs/results/width_table.json")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --json")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.json).read_text())))
        return
    onnx_caches = [int(b) for b in args.onnx_caches.split(",")]
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    base = load_source(args.model)
    base.model.eval()
    result = {"command": "python benchmarks/" + Path(__file__).name, "model": args.model,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "rows": []}
    if Path(args.json).exists():  # resume: what an earlier, interrupted run measured is kept, not redone
        result["rows"] = json.loads(Path(args.json).read_text())["rows"]
    done = {r["model"] for r in result["rows"]}

    def record(rows: list[dict], **extra) -> None:
        result["rows"] += [{**r, **extra} for r in rows]
        result["seconds"] = round(time.perf_counter() - t_start)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))

    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "original" not in done:
            save(base.model, base.tokenizer, tmp / "original")
            print("original at 4-bit weights", flush=True)
            record(export_and_score(base, "original", tmp, original=True, windows=args.windows,
                                    length=args.length, onnx_caches=onnx_caches, threads=args.threads),
                   width=None, recovery=None)
        teacher = None
        # Every width training-free first (minutes each), then recovered (the recovery is the slow part).
        modes = args.modes.split(",")
        for steps in [0] * ("free" in modes) + [args.steps] * ("recovered" in modes):
            for width in widths:
                name = f"mla-{width}-{'recovered' if steps else 'free'}"
                if name in done:
                    continue
                if steps and teacher is None:
                    teacher = recover.collect_attention_io(
                        base.model, recovery_windows(base.tokenizer))
                latent = width - ROPE_DIM
                src = copy.deepcopy(base)
                t0 = time.perf_counter()
                calibrate_and_convert(src, replace(PLANS["recovered"], latent=latent))
                convert_s = time.perf_counter() - t0
                recovery_s = 0.0
                if steps:
                    info = recover.recover_converted(src.model, (list(teacher[0]), list(teacher[1])), steps=steps,
                                                     **recovery_options(4, 4))
                    recovery_s = info["seconds"]
                    print(f"{name}: recovery {recovery_s:.0f} s", flush=True)
                save(src.model, src.tokenizer, tmp / name)
                rows = export_and_score(src, name, tmp, original=False, windows=args.windows, length=args.length,
                                        onnx_caches=onnx_caches, threads=args.threads)
                record(rows, width=width, latent=latent, rope=ROPE_DIM, recovery_steps=steps,
                       convert_seconds=round(convert_s), recovery_seconds=recovery_s)
                del src
    print(markdown(result))
    print(f"wrote {args.json} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
