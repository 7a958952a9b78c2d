"""How often does the original model agree with itself across precisions? The floor under the build's next-token
agreement figure: the original at the build's 4-bit weights and cache against the same model at 8-bit weights and
an f16 cache, through llama.cpp, on the battery (the same windows the build scores). Prints a table, writes JSON.

    python benchmarks/agreement_floor.py --out docs/results/agreement_floor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from edge_mla.export.gguf import export
    from edge_mla.quality import Battery
    from edge_mla.source import load_source

    src = load_source(args.model)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        files = {}
        for name, weights, cache in (("4-bit", "q4_0", "q4_0"), ("8-bit", "q8_0", "f16")):
            files[name] = (Path(work) / f"{name}.gguf", cache)
            export(args.model, files[name][0], weights=weights)
        scored = {}
        for name, (path, cache) in files.items():
            battery = Battery(src.tokenizer, kv_type=cache, onnx_cache="int4", count=args.windows,
                              length=args.length, threads=args.threads)
            battery.score({"original": {"gguf": path}})
            scored[name] = battery
    for text in scored["4-bit"].windows:
        low = scored["4-bit"].argmax[("original", "llama.cpp", text)]
        high = scored["8-bit"].argmax[("original", "llama.cpp", text)]
        ppl = {name: next(r.perplexity for r in b.rows if r.text == text) for name, b in scored.items()}
        rows[text] = {"agreement": round(float((low == high).mean()), 4), "perplexity_4bit": ppl["4-bit"],
                      "perplexity_8bit": ppl["8-bit"]}
    print("| text | next token: original q4_0 weights + q4_0 cache = original q8_0 weights + f16 cache | perplexity 4-bit / 8-bit |")
    print("|---|---|---|")
    for text, r in rows.items():
        print(f"| {text} | {100 * r['agreement']:.1f}% | {r['perplexity_4bit']:.2f} / {r['perplexity_8bit']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/agreement_floor.py " + " ".join(sys.argv[1:]),
                                              "model": args.model, "windows": args.windows, "length": args.length,
                                              "texts": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
