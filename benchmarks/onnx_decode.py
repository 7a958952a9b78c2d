"""Decode speed, peak memory, file size and perplexity of the MLA ONNX export (int4 weights, int4 latent cache)
against the original model exported int4 the way onnxruntime-genai's model builder does it (MatMulNBits int4
symmetric, block 32, accuracy level 4, int4 embedding, GroupQueryAttention with its own rotary, fp32 K/V cache),
both run by the same runner (runtimes/onnxruntime.py), interleaved in one run.

    edge-mla convert --out /tmp/m1                      # the CLI's default conversion of SmolLM2-135M
    python benchmarks/onnx_decode.py --mla /tmp/m1 --work /tmp/onnx_bench

Each speed measurement is a fresh process that imports only the runner (so peak RSS is the runtime's own):
it prefills CTX tokens of held-out text, then times NEW greedy decode steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would carry over the
    parent's peak (the parent holds torch and both models)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(folder: str, ids_file: str, context: int, new: int, threads: int) -> None:
    """One measurement, in its own process: prints a JSON line."""
    import numpy as np

    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    ids = np.load(ids_file)[:context]
    decoder = OnnxDecoder(folder, threads=threads, context=context + new)
    t0 = time.perf_counter()
    logits = decoder.forward(ids)
    prefill = time.perf_counter() - t0
    token = int(logits[-1].argmax())
    t1 = time.perf_counter()
    for _ in range(new):  # no end-of-text stop: always `new` steps
        token = int(decoder.forward(np.array([token]))[-1].argmax())
    decode = time.perf_counter() - t1
    used, allocated = decoder.cache_bytes()
    print(json.dumps({"prefill_tok_s": context / prefill, "decode_tok_s": new / decode,
                      "peak_rss_mb": peak_rss_mb(),
                      "cache_bytes_used": used, "cache_bytes_allocated": allocated}))


def measure(folder: Path, ids_file: str, context: int, new: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), ids_file, str(context), str(new), str(threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def exports(args) -> dict[str, Path]:
    from edge_mla.export.onnx import export

    work = Path(args.work)
    folders = {"mla": work / "mla_int4_kv4", "baseline": work / "original_int4_kv32"}
    if not folders["mla"].exists() or args.reexport:  # the CLI defaults for --weight-bits 4
        export(args.mla, folders["mla"], weight_bits=4, kv_bits=4, overwrite=True)
    if not folders["baseline"].exists() or args.reexport:
        export(args.source, folders["baseline"], weight_bits=4, kv_bits=32, weight_method="rtn", original=True,
               overwrite=True)
    return folders


def perplexities(args, folders: dict[str, Path]) -> dict:
    from edge_mla.convert import load
    from edge_mla.data import split_text, token_windows
    from edge_mla.eval import perplexity
    from edge_mla.runtimes.onnxruntime import OnnxDecoder, perplexity as onnx_perplexity
    from edge_mla.source import load_source

    mla, tokenizer = load(args.mla)
    windows = token_windows(tokenizer, split_text("heldout"), args.ppl_length, args.ppl_windows)
    out = {"windows": int(windows.shape[0]), "tokens_per_window": int(windows.shape[1])}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        out[f"{name}_onnx"] = onnx_perplexity(OnnxDecoder(folder, threads=args.threads), windows.numpy())
        out[f"{name}_onnx_s"] = time.perf_counter() - t0
    out["mla_pytorch_fp32"] = perplexity(mla, windows)
    out["original_pytorch_fp32"] = perplexity(load_source(args.source).model, windows)
    return out


def table(result: dict) -> str:
    rows = ["| context | MLA decode tok/s | original decode tok/s | ratio | MLA prefill tok/s | original prefill "
            "tok/s | MLA peak RSS MB | original peak RSS MB | MLA cache MB | original cache MB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for ctx, r in result["contexts"].items():
        m, b = r["mla"], r["baseline"]
        rows.append(f"| {ctx} | {m['decode_tok_s']:.1f} | {b['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | "
                    f"{m['prefill_tok_s']:.0f} | {b['prefill_tok_s']:.0f} | {m['peak_rss_mb']:.0f} | "
                    f"{b['peak_rss_mb']:.0f} | {m['cache_bytes_used'] / 1e6:.1f} | "
                    f"{b['cache_bytes_used'] / 1e6:.1f} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mla", required=True, help="converted MLA folder (edge-mla convert --out DIR)")
    p.add_argument("--source", default="smollm2-135m", help="the original model it was converted from")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edge_mla_onnx_bench"))
    p.add_argument("--reexport", action="store_true")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--new", type=int, default=64, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--ppl-length", type=int, default=1024)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "onnx_decode.json"))
    args = p.parse_args()

    import numpy as np

    from edge_mla.data import split_text
    from edge_mla.runtimes.onnxruntime import read_meta

    t0 = time.perf_counter()
    folders = exports(args)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folders["mla"] / "tokenizer.json"))
    ids = np.array(tok.encode(split_text("heldout"), add_special_tokens=False).ids, np.int64)
    if len(ids) < max(args.contexts):
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than context {max(args.contexts)}")
    ids_file = str(Path(args.work) / "prompt_ids.npy")
    np.save(ids_file, ids[: max(args.contexts)])

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
              "new_tokens": args.new, "repeats": args.repeats, "machine": os.uname().machine,
              "cpus": os.cpu_count(), "files": {}, "contexts": {}}
    for name, folder in folders.items():
        meta = read_meta(folder)
        result["files"][name] = {"folder": str(folder), "model_bytes": folder_size(folder),
                                 "cache": meta["cache"]["dtype"], "cache_bytes_per_token": meta["cache"]["bytes_per_token"],
                                 "weights": meta["weights"]}
    for ctx in args.contexts:
        runs = {"mla": [], "baseline": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for name, folder in folders.items():
                runs[name].append(measure(folder, ids_file, ctx, args.new, args.threads))
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
               for name, rs in runs.items()}
        med["decode_ratio"] = med["mla"]["decode_tok_s"] / med["baseline"]["decode_tok_s"]
        med["prefill_ratio"] = med["mla"]["prefill_tok_s"] / med["baseline"]["prefill_tok_s"]
        med["rss_ratio"] = med["mla"]["peak_rss_mb"] / med["baseline"]["peak_rss_mb"]
        result["contexts"][str(ctx)] = med
        print(f"context {ctx}: MLA {med['mla']['decode_tok_s']:.1f} tok/s, original "
              f"{med['baseline']['decode_tok_s']:.1f} tok/s (x{med['decode_ratio']:.2f})", flush=True)
    if not args.skip_ppl:
        result["perplexity"] = perplexities(args, folders)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    for name, f in result["files"].items():
        print(f"{name}: {f['model_bytes'] / 1e6:.1f} MB, cache {f['cache']} {f['cache_bytes_per_token']} B/token")
    if "perplexity" in result:
        print(json.dumps(result["perplexity"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
