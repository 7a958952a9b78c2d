"""Which llama.cpp settings run each file fastest, at the prompt lengths users type: prefill of a whole prompt and
decode after it, for an MLA GGUF and the original exported at the same weight bits, under each cache type and
flash-attention setting stock llama.cpp offers. Prints a table and writes JSON.

    .venv/bin/edge-mla export gguf smollm2-135m -o /tmp/original-q4_0.gguf --weights q4_0
    python benchmarks/llamacpp_settings.py --mla build-smollm2-135m-rpi5/model.gguf \
        --original /tmp/original-q4_0.gguf --contexts 256 4096 --out docs/results/llamacpp_settings.json

Each (file, setting, context) runs in its own process (llama.cpp's buffers and peak RSS are that run's): the
prompt (held-out Wikipedia, `context` tokens) is ingested in ubatches of --ubatch tokens from an empty cache
(prefill tok/s over the whole prompt), then --decode tokens are generated one at a time (decode tok/s). Files
alternate within each setting, so a ratio compares runs minutes apart at most. Cache MiB is what llama.cpp
allocated for that context (its own log).
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

# (cache type, flash attention): every combination stock llama.cpp runs on a CPU (a quantized V cache needs flash
# attention).
SETTINGS = (("q4_0", True), ("q8_0", True), ("f16", True), ("f16", False))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(path: str, text_file: str, context: int, kv_type: str, flash: bool, ubatch: int, decode: int,
           threads: int) -> dict:
    from edge_mla.runtimes import llamacpp

    lm = llamacpp.open_model(path, n_ctx=context + decode, threads=threads, kv_type=kv_type, n_batch=ubatch,
                             flash_attn=flash)
    ids = lm.llm.tokenize(Path(text_file).read_text().encode(), add_bos=False)[:context]
    if len(ids) < context:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than {context}")
    lm.llm.eval(ids[:8])  # first-run setup (buffers, threads) not timed
    lm.llm.reset()
    t0 = time.perf_counter()
    lm.llm.eval(ids)
    prefill = context / (time.perf_counter() - t0)
    decoded = llamacpp.greedy_continue(lm, decode)[1]
    cache = lm.kv_cache()
    return {"prefill_tok_s": prefill, "decode_tok_s": decoded, "cache_mib": cache["k_mib"] + cache["v_mib"],
            "peak_rss_mb": peak_rss_mb()}


def run_worker(*argv) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *map(str, argv)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {argv} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def setting_name(kv_type: str, flash: bool) -> str:
    return f"{kv_type} cache, flash attention {'on' if flash else 'off'}"


def table(results: dict) -> str:
    rows = ["| context | setting | MLA prefill | original prefill | ratio | MLA decode | original decode | ratio | "
            "MLA cache MiB | original cache MiB |", "|" + "---|" * 10]
    for context in results["contexts"]:
        for name in results["settings"]:
            m, o = (results["runs"][f"{model}|{name}|{context}"] for model in ("mla", "original"))
            rows.append(f"| {context} | {name} | {m['prefill_tok_s']:.1f} | {o['prefill_tok_s']:.1f} | "
                        f"{m['prefill_tok_s'] / o['prefill_tok_s']:.2f} | {m['decode_tok_s']:.1f} | "
                        f"{o['decode_tok_s']:.1f} | {m['decode_tok_s'] / o['decode_tok_s']:.2f} | "
                        f"{m['cache_mib']:.1f} | {o['cache_mib']:.1f} |")
    return "\n".join(rows)


def fastest(results: dict) -> dict:
    """Per file and context, the setting with the shortest prefill + decode of 128 tokens (a typical answer)."""
    out = {}
    for model in ("mla", "original"):
        for context in results["contexts"]:
            def seconds(name):
                r = results["runs"][f"{model}|{name}|{context}"]
                return context / r["prefill_tok_s"] + 128 / r["decode_tok_s"]
            out[f"{model}|{context}"] = min(results["settings"], key=seconds)
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, text, context, kv, flash, ubatch, decode, threads = sys.argv[2:]
        print(json.dumps(worker(path, text, int(context), kv, flash == "True", int(ubatch), int(decode),
                                int(threads))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mla", required=True, help="the MLA build's model.gguf")
    p.add_argument("--original", required=True, help="the original exported at the same weight bits")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--ubatch", type=int, default=512, help="tokens per ubatch of the prefill (llama.cpp's default)")
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--caches", nargs="+", default=None, choices=("q4_0", "q8_0", "f16"),
                   help="only these cache types, flash attention on (default: every setting)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    settings = [(kv, True) for kv in args.caches] if args.caches else SETTINGS

    from edge_mla.data import split_text

    work = Path.home() / ".cache" / "edge-mla" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    text_file = work / "heldout.txt"
    text_file.write_text(split_text("heldout"))
    import llama_cpp

    results = {"command": "python benchmarks/llamacpp_settings.py " + " ".join(sys.argv[1:]),
               "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
               "llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "ubatch": args.ubatch,
               "decode_tokens": args.decode, "contexts": args.contexts, "text": "held-out Wikipedia (gensim)",
               "files": {"mla": args.mla, "original": args.original},
               "settings": [setting_name(kv, fa) for kv, fa in settings], "runs": {}}
    for context in args.contexts:
        for kv_type, flash in settings:
            for model, path in (("mla", args.mla), ("original", args.original)):
                run = run_worker(path, text_file, context, kv_type, flash, args.ubatch, args.decode, args.threads)
                results["runs"][f"{model}|{setting_name(kv_type, flash)}|{context}"] = run
                print(f"{model:8s} {setting_name(kv_type, flash):32s} @{context}: prefill "
                      f"{run['prefill_tok_s']:.1f} tok/s, decode {run['decode_tok_s']:.1f} tok/s, cache "
                      f"{run['cache_mib']:.1f} MiB", file=sys.stderr, flush=True)
    results["fastest"] = fastest(results)
    results["load_average_after"] = os.getloadavg()
    print(table(results))
    print("fastest (prefill + 128 decoded tokens):", json.dumps(results["fastest"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
