"""Score exported files on the quality battery (edge_mla.texts), the MLA build against the original, the way
`edge-mla build` does (edge_mla.quality.Battery: the same windows for every file, each runtime in its own process):
for files built elsewhere, e.g. a GPU machine without llama.cpp.

    python benchmarks/battery_files.py --mla-gguf FT/model.gguf --original-gguf ORIGINAL.gguf \
        [--mla-onnx FT/onnx --original-onnx ORIGINAL_ONNX] --kv-type q4_0 --out result.json

The original is `edge-mla export gguf smollm2-135m --weights q4_0 --kv-bits 4` (and `export onnx --original`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the original model (its tokenizer cuts the windows)")
    for model in ("mla", "original"):
        p.add_argument(f"--{model}-gguf", help=f"the {model} GGUF file")
        p.add_argument(f"--{model}-onnx", help=f"the {model} ONNX export folder")
    p.add_argument("--kv-type", default="q4_0", help="llama.cpp cache for both GGUF files")
    p.add_argument("--onnx-cache", default="int4", help="the ONNX files' cache, as labelled in the rows")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from edge_mla.quality import Battery, agreement, as_dicts, ratios
    from edge_mla.source import load_source

    tokenizer = load_source(args.model, lazy=True).tokenizer
    battery = Battery(tokenizer, kv_type=args.kv_type, onnx_cache=args.onnx_cache, count=args.windows,
                      length=args.length, threads=args.threads)
    files = {model: {k: v for k, v in (("gguf", getattr(args, f"{model}_gguf")), ("onnx", getattr(args, f"{model}_onnx")))
                     if v} for model in ("original", "mla")}
    battery.score(files)
    result = {"command": " ".join(["python", "benchmarks/battery_files.py"] + sys.argv[1:]),
              "quality": as_dicts(battery.rows), "quality_ratio": ratios(battery.rows),
              "quality_agreement": agreement(battery.rows)}
    for key, ratio in result["quality_ratio"].items():
        print(f"{key:40s} MLA / original {ratio:.3f}, same next token {100 * result['quality_agreement'][key]:.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
