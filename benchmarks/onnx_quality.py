"""File size and held-out perplexity through onnxruntime of ONNX export folders, side by side.

    python benchmarks/onnx_quality.py before=DIR1 after=DIR2 [--windows 4 --length 512] [--json out.json]

Each folder is scored as the build scores its files (edge_mla.quality: Wikipedia held out and ABC news, `--windows`
x `--length` tokens each, a fresh cache per window), with the folder's own tokenizer. Used to check that the
exporter's own 4-bit packing (llama.cpp's q4_0 grid) ships at least the quality of onnxruntime's quantizer
(docs/scale.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="NAME=DIR: export folders to compare")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from edge_mla.quality import measure
    from edge_mla.runtimes.onnxruntime import read_meta

    rows = []
    for spec in args.folders:
        name, folder = spec.split("=", 1)
        folder = Path(folder)
        meta = read_meta(folder)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        scored = measure({name: {"onnx": folder}}, AutoTokenizer.from_pretrained(folder), kv_type="q4_0",
                         onnx_cache=meta["cache"]["dtype"], count=args.windows, length=args.length,
                         threads=args.threads)
        rows.append({"name": name, "folder": str(folder), "model_mb": round(size / 1e6, 2),
                     "weights": meta["weights"], "perplexity": {r.text: r.perplexity for r in scored},
                     "tokens": scored[0].tokens})
    print(f"\n{'export':<12} {'model MB':>9} " + " ".join(f"{t:>18}" for t in rows[0]["perplexity"]))
    for r in rows:
        print(f"{r['name']:<12} {r['model_mb']:>9.2f} " + " ".join(f"{p:>18.3f}" for p in r["perplexity"].values()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
