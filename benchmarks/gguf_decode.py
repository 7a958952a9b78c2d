"""Decode speed, KV bytes, peak RSS and perplexity in llama.cpp: an MLA GGUF beside the original SmolLM2 GGUF.

Both files are written by `edge-mla export gguf` with the same weight type, and run with the same cache type
and threads. Each measurement runs in a fresh process (so peak RSS is that run's own) that imports llama.cpp
but not torch.

    python benchmarks/gguf_decode.py --mla /tmp/m1 /tmp/m_part4r32 --weights q8_0 --kv-type q8_0 \
        --out docs/results/gguf_decode_q8_0.json

Decode speed at context N: the cache is filled with N - 64 tokens of held-out text, then 64 tokens are
generated one at a time (greedy, batch 1) up to position N; tok/s over those 64, best of --repeats passes
from the same filled cache.
Perplexity: llama-perplexity's method (non-overlapping windows of --ppl-ctx tokens of the held-out Wikipedia
text, the second half of each window scored), from llama.cpp's own logits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DECODE_TOKENS = 64


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_decode(path: str, text_file: str, context: int, kv_type: str, threads: int, repeats: int) -> dict:
    from edge_mla.runtimes import llamacpp

    lm = llamacpp.open_model(path, n_ctx=context, threads=threads, kv_type=kv_type)
    filled = context - DECODE_TOKENS
    ids = lm.llm.tokenize(Path(text_file).read_text().encode(), add_bos=False)
    if len(ids) < filled:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than the context {context}")
    t0 = time.perf_counter()
    lm.llm.eval(ids[:filled])
    prefill = time.perf_counter() - t0
    speeds = []
    for _ in range(repeats):  # best of a few passes: the least disturbed by other work on the machine
        lm.llm.n_tokens = filled  # the next eval drops the cache entries after the filled part
        speeds.append(llamacpp.greedy_continue(lm, DECODE_TOKENS)[1])
    cache = lm.kv_cache()
    return {"context": context, "decode_tok_s": max(speeds), "decode_tok_s_all": speeds,
            "prefill_tok_s": filled / prefill,
            "kv_mib_allocated": cache["k_mib"] + cache["v_mib"], "kv_cells": cache["cells"],
            "peak_rss_mb": peak_rss_mb()}


def worker_ppl(path: str, text_file: str, ctx: int, chunks: int, kv_type: str, threads: int) -> dict:
    import numpy as np

    from edge_mla.runtimes import llamacpp

    lm = llamacpp.open_model(path, n_ctx=ctx, threads=threads, kv_type=kv_type, logits_all=True, n_batch=ctx)
    ids = lm.llm.tokenize(Path(text_file).read_text().encode(), add_bos=False)
    chunks = min(chunks, len(ids) // ctx)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for c in range(chunks):
        window = ids[c * ctx:(c + 1) * ctx]
        logits = llamacpp.prompt_logits(lm, window).astype(np.float64)
        first = ctx // 2  # llama-perplexity scores the second half of each window
        scored = logits[first - 1:ctx - 1]
        targets = np.array(window[first:])
        top = scored.max(-1, keepdims=True)
        logz = np.log(np.exp(scored - top).sum(-1)) + top[:, 0]
        nll += float((logz - scored[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return {"ppl": float(np.exp(nll / count)), "ppl_tokens": count, "ppl_windows": chunks, "ppl_ctx": ctx,
            "ppl_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def run_worker(*argv) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, argv)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {argv} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def export_pair(args, work: Path) -> dict[str, Path]:
    from edge_mla.export.gguf import export

    files = {}
    specs = [("original", args.original)] + [(f"mla-{Path(m).name}", m) for m in args.mla]
    for name, spec in specs:
        out = work / f"{name}-{args.weights}.gguf"
        if not out.exists():
            print(f"exporting {spec} -> {out}", file=sys.stderr)
            export(spec, out, weights=args.weights)
        files[name] = out
    return files


def table(results: dict) -> str:
    contexts = results["contexts"]
    head = ("| model | file MB | KV bytes/token | PPL | " + " | ".join(f"tok/s @{c}" for c in contexts) + " | "
            + " | ".join(f"RSS MB @{c}" for c in contexts) + " |")
    rows = [head, "|" + "---|" * (4 + 2 * len(contexts))]
    for name, r in results["models"].items():
        speeds = " | ".join(f"{r['decode'][str(c)]['decode_tok_s']:.1f}" for c in contexts)
        rss = " | ".join(f"{r['decode'][str(c)]['peak_rss_mb']:.0f}" for c in contexts)
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        rows.append(f"| {name} ({r['kind']}) | {r['file_mb']:.1f} | {r['kv_bytes_per_token']} | {ppl} | "
                    f"{speeds} | {rss} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "decode":
            path, text, context, kv, threads, repeats = rest
            out = worker_decode(path, text, int(context), kv, int(threads), int(repeats))
        else:
            path, text, ctx, chunks, kv, threads = rest
            out = worker_ppl(path, text, int(ctx), int(chunks), kv, int(threads))
        print(json.dumps(out))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mla", required=True, nargs="+", help="converted MLA folders (edge-mla convert --out)")
    p.add_argument("--original", default="smollm2-135m", help="the original model it was converted from")
    p.add_argument("--weights", default="q8_0", choices=("f32", "f16", "q8_0", "q4_0", "q4_k"))
    p.add_argument("--kv-type", default="q8_0", choices=("f16", "q8_0", "q4_0"))
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="decode passes per context (the best one counts)")
    p.add_argument("--ppl-ctx", type=int, default=1024)
    p.add_argument("--ppl-windows", type=int, default=20, help="0: no perplexity")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "edge-mla" / "bench"), help="GGUF files go here")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    from edge_mla.data import CORPUS_ABOUT, split_text
    from edge_mla.runtimes.llamacpp import check_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "heldout.txt"
    text_file.write_text(split_text("heldout"))
    files = export_pair(args, work)
    import llama_cpp

    results = {"command": "python benchmarks/gguf_decode.py " + " ".join(sys.argv[1:]),
               "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
               "llama_cpp_python": llama_cpp.__version__, "weights": args.weights, "kv_type": args.kv_type,
               "threads": args.threads, "contexts": args.contexts, "decode_tokens": DECODE_TOKENS,
               "text": CORPUS_ABOUT, "models": {}}
    for name, path in files.items():
        info = check_gguf(path)
        kind = f"MLA C+R={info.latent_dim}+{info.rope_dim}" if info.is_mla else f"{info.arch} GQA"
        results["models"][name] = {"file": str(path), "kind": kind, "file_mb": path.stat().st_size / 1e6,
                                   "kv_bytes_per_token": info.kv_bytes_per_token(args.kv_type), "decode": {}}
    for context in args.contexts:  # models side by side at each context, so they share the machine's state
        for name, path in files.items():
            entry = results["models"][name]
            run = run_worker("decode", path, text_file, context, args.kv_type, args.threads, args.repeats)
            entry["decode"][str(context)] = run
            print(f"{name} @{context}: {run}", file=sys.stderr)
    for name, path in files.items():
        if args.ppl_windows <= 0:
            break
        entry = results["models"][name]
        entry.update(run_worker("ppl", path, text_file, args.ppl_ctx, args.ppl_windows, args.kv_type, args.threads))
        print(f"{name}: ppl {entry['ppl']:.3f}", file=sys.stderr)
    results["load_average_after"] = os.getloadavg()
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
