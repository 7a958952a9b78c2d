"""Predicted memory (edge_mla.budget) against the measured peak RSS of onnxruntime and llama.cpp running the files.

    python benchmarks/budget_accuracy.py BUILD_DIR [--original-gguf F] [--original-onnx D] [--contexts 512,4096]

BUILD_DIR is an `edge-mla build` output (onnx/ and model.gguf). Each measurement runs in a fresh process: it fills
the context (prefill of context - 16 tokens, then 8 decode steps) and reports peak RSS minus the RSS it had after
its imports, i.e. what the runtime and the model add. Given the original model's files as well, it also fits the
two runtime constants (base, work per token) on the ORIGINAL files alone and prints them: those are the constants
edge_mla.budget uses, so its predictions for the MLA files are not fitted to the MLA measurements.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1000
    return 0.0


def child(kind: str, path: str, context: int, kv_type: str) -> None:
    """Run one model at one context; print JSON with the RSS the runtime added (MB)."""
    if kind == "onnx":
        from edge_mla.runtimes.onnxruntime import OnnxDecoder
    else:
        from edge_mla.runtimes import llamacpp
    start = rss_mb()
    ids = np.random.default_rng(0).integers(100, 40000, size=context - 16)
    if kind == "onnx":
        dec = OnnxDecoder(path, threads=2, context=context)
        dec.forward(ids[None].astype(np.int64))
        for _ in range(8):
            dec.forward(np.array([[123]], dtype=np.int64))
    else:
        model = llamacpp.open_model(path, n_ctx=context, threads=2, kv_type=kv_type)
        llamacpp.prompt_logits(model, ids.tolist())
        llamacpp.greedy_continue(model, 8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1000
    print(json.dumps({"added_mb": peak - start, "start_mb": start}))


def measure(kind: str, path: Path, context: int, kv_type: str) -> float:
    cmd = [sys.executable, __file__, "--child", kind, str(path), str(context), kv_type]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["added_mb"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    from edge_mla import budget as bud

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--original-gguf", default=None, help="the original model as GGUF, same weight and cache type")
    ap.add_argument("--original-onnx", default=None, help="the original model's ONNX export, same bits")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--kv-type", default="q4_0")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    build = Path(args.build_dir)
    contexts = [int(c) for c in args.contexts.split(",")]
    files = [("gguf", build / "model.gguf", "MLA"), ("onnx", build / "onnx", "MLA")]
    if args.original_gguf:
        files.append(("gguf", Path(args.original_gguf), "original"))
    if args.original_onnx:
        files.append(("onnx", Path(args.original_onnx), "original"))
    rows = []
    for kind, path, label in files:
        fp = bud.footprint_gguf(path, args.kv_type) if kind == "gguf" else bud.footprint_onnx(path)
        for ctx in contexts:
            measured = measure(kind, path, ctx, args.kv_type)
            predicted = fp.memory_bytes(ctx) / bud.MB
            rows.append({"model": label, "runtime": fp.runtime, "file": path.name, "context": ctx,
                         "weights_mb": fp.weights_bytes / bud.MB, "kv_mb": fp.kv_bytes_per_token * ctx / bud.MB,
                         "predicted_mb": predicted, "measured_mb": measured,
                         "error": (predicted - measured) / measured})
            r = rows[-1]
            print(f"| {label} | {r['runtime']} | {ctx} | {r['weights_mb']:.0f} | {r['kv_mb']:.1f} | "
                  f"{predicted:.0f} | {measured:.0f} | {100 * r['error']:+.1f}% |", flush=True)
    fitted = {}
    for runtime in ("llama.cpp", "onnxruntime"):
        pts = [r for r in rows if r["model"] == "original" and r["runtime"] == runtime]
        if len(pts) >= 2:
            a, b = pts[0], pts[-1]
            # measured - weights - kv = base + context * work
            ya = a["measured_mb"] - a["weights_mb"] - a["kv_mb"]
            yb = b["measured_mb"] - b["weights_mb"] - b["kv_mb"]
            work = (yb - ya) / (b["context"] - a["context"]) * bud.MB
            fitted[runtime] = {"base_bytes": int((ya - a["context"] * work / bud.MB) * bud.MB),
                               "bytes_per_token": int(work)}
            print(f"fitted on the original, {runtime}: base {fitted[runtime]['base_bytes'] / bud.MB:.0f} MB, "
                  f"work {work:.0f} bytes per token of context")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fitted_on_original": fitted, "constants_used": {
            "base": bud.RUNTIME_BASE_BYTES, "per_token": bud.RUNTIME_BYTES_PER_TOKEN}}, indent=1))


if __name__ == "__main__":
    main()
