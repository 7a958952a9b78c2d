"""The same ONNX export run three ways, on one chat prompt with greedy decoding: edge-mla's own onnxruntime runner,
onnxruntime-genai (genai.onnx + genai_config.json, the runtime of genai's Android/iOS packages) and the web page
(onnxruntime-web, WebAssembly) in headless Chromium. Prints a table (tokens equal?, decode tokens/s, peak RSS,
cache allocated) and writes JSON. The page runs the site's model files (MatMulNBits dequantized to float16 by
default), so its tokens are compared with the runner on those same files ("runner-site").

    python benchmarks/phones.py --onnx build-smollm2-135m-rpi5/onnx --out docs/results/phones.json

Each native measurement is a fresh process (its peak RSS is the runtime's own). genai allocates its key and value
caches for `search.max_length` tokens up front; the runner allocates one latent buffer for the context it is
given; both are given --context tokens, so the cache rows of the table are what each one holds for that context.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_runner(folder: str, ids: list[int], new: int, threads: int, context: int) -> dict:
    from edge_mla.runtimes.onnxruntime import OnnxDecoder, generate

    decoder = OnnxDecoder(folder, threads=threads, context=context)
    result = generate(decoder, None, ids, new)
    return {"tokens": result["tokens"], "tokens_per_second": result["decode_steps"] / result["decode_s"],
            "cache_allocated_bytes": decoder.cache_bytes()[1], "peak_rss_mb": peak_rss_mb()}


def child_genai(folder: str, ids: list[int], new: int, threads: int, context: int) -> dict:
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=context, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)  # the prompt's forward pass: its first token is ready after it
    generator.generate_next_token()
    out, t0 = [int(generator.get_next_tokens()[0])], time.perf_counter()
    while len(out) < new and not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    seconds = time.perf_counter() - t0
    meta = json.loads((Path(folder) / "edge_mla_onnx.json").read_text())
    eos = set(meta["eos_token_ids"])
    if out and out[-1] in eos:  # the runner stops before the end-of-text token, genai returns it
        out = out[:-1]
    cache = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
    per_token = 2 * cache["num_hidden_layers"] * cache["num_key_value_heads"] * cache["head_size"] * (
        {"uint8": 1, "int8": 1, "float16": 2, "float32": 4}[meta["cache"]["tensors"][0]["dtype"]])
    return {"tokens": out, "tokens_per_second": (len(out) - 1) / seconds, "cache_allocated_bytes": per_token * context,
            "peak_rss_mb": peak_rss_mb()}


def measure(kind: str, folder: Path, ids: list[int], new: int, threads: int, context: int) -> dict:
    """One measurement in a fresh process (threads: onnxruntime's intra-op threads)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import phones; "
            f"print(json.dumps(phones.child_{kind}({str(folder)!r}, {ids!r}, {new}, {threads}, {context})))")
    if kind == "genai":  # genai takes its thread count from the session options of its config
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (folder / "genai_config.json").write_text(json.dumps(config, indent=1))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="an ONNX export folder (a build's onnx/)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--new", type=int, default=64, help="tokens to generate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048, help="cache length the native runtimes allocate")
    p.add_argument("--web-weights", default="float16", help="edge-mla web --weights")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args()

    from edge_mla.export import onnx_genai, web
    from edge_mla.runtimes.onnxruntime import Tokenizer, read_meta

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "onnx"
        shutil.copytree(args.onnx, folder)
        if not (folder / onnx_genai.CONFIG).exists():
            onnx_genai.add_genai(folder)
        meta = read_meta(folder)
        ids = Tokenizer(folder, meta).encode(args.prompt, chat=bool(meta.get("chat")))
        rows = {"runner": measure("runner", folder, ids, args.new, args.threads, args.context),
                "genai": measure("genai", folder, ids, args.new, args.threads, args.context)}
        site = web.build_site(folder, Path(work) / "site", weights=args.web_weights)
        rows["runner-site"] = measure("runner", site / "model", ids, args.new, args.threads, args.context)
        page = web.headless_run(site, {"prompt": args.prompt, "tokens": args.new, "threads": args.threads,
                                       "chat": "1" if meta.get("chat") else "0"}, timeout=600)
        rows["web"] = {"tokens": page["tokens"], "tokens_per_second": page["tokens_per_second"],
                       "threads": page["threads"], "cache_allocated_bytes": page["cache_bytes"]}
        tokenizer = Tokenizer(folder, meta)
        for row in rows.values():
            row["text"] = tokenizer.decode(row["tokens"])
        text = rows["runner"]["text"]
        site_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    import onnxruntime
    import onnxruntime_genai

    # genai runs the export's files, the page the site's (float16 weights by default): each against the runner on
    # the same files
    reference = {"runner": "runner", "genai": "runner", "runner-site": "runner", "web": "runner-site"}
    for name, row in rows.items():
        row["same_tokens_as"] = {reference[name]: row["tokens"] == rows[reference[name]]["tokens"]}
    print(f"prompt {len(ids)} tokens (chat: {bool(meta.get('chat'))}); site {site_mb:.0f} MB "
          f"(--weights {args.web_weights})")
    print(f"{'runtime':<12} {'same tokens as':>20} {'tokens':>6} {'decode tok/s':>12} {'peak RSS MB':>11} "
          f"{'cache allocated':>16}  text")
    for name, row in rows.items():
        rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-"
        (ref, same), = row["same_tokens_as"].items()
        print(f"{name:<12} {ref + ': ' + str(same):>20} {len(row['tokens']):>6} {row['tokens_per_second']:>12.1f} "
              f"{rss:>11} {row['cache_allocated_bytes'] / 1e6:>13.2f} MB  {row['text'][:60]!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": "python benchmarks/phones.py " + " ".join(sys.argv[1:]), "prompt": args.prompt,
            "prompt_tokens": len(ids), "new_tokens": args.new, "threads": args.threads, "context": args.context,
            "text": text, "cache": meta["cache"]["dtype"], "cache_bytes_per_token": meta["cache"]["bytes_per_token"],
            "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime-genai": onnxruntime_genai.__version__,
                         "onnxruntime-web": "1.30.0"},
            "site_mb": site_mb, "web_weights": args.web_weights, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
