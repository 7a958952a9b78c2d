"""Decode and prefill speed, peak memory, file size (and optionally perplexity) of the MLA ONNX export, with each
LatentAttention body, against the original model exported by the same exporter at the same bits (what
`edge-mla build` compares: int4 MatMulNBits weights, 8-bit tied head/embedding table, int4 cache; the original
runs GroupQueryAttention with its own rotary over K and V caches), all run by the same runner
(runtimes/onnxruntime.py, chunked prefill), interleaved in one run.

    edge-mla build --device rpi5 --bits 4 -o /tmp/build      # or any `edge-mla convert` folder as --mla
    python benchmarks/onnx_decode.py --mla /tmp/build/mla --work /tmp/onnx_bench

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


def child(folder: str, ids_file: str, context: int, new: int, threads: int, chunk: int) -> None:
    """One measurement, in its own process: prints a JSON line."""
    import numpy as np

    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    ids = np.load(ids_file)[:context]
    decoder = OnnxDecoder(folder, threads=threads, context=context + new, prefill_chunk=None if chunk < 0 else chunk)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = decoder.forward(ids)
    prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    token = int(logits[-1].argmax())
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(new):  # no end-of-text stop: always `new` steps
        token = int(decoder.forward(np.array([token]))[-1].argmax())
    decode, decode_cpu = time.perf_counter() - t1, time.process_time() - c1
    used, allocated = decoder.cache_bytes()
    # per CPU second too: on a shared machine the CPU time a process uses moves far less with the load than the
    # wall time it waits (with --threads 1 it is the time the work itself took)
    print(json.dumps({"prefill_tok_s": context / prefill, "decode_tok_s": new / decode,
                      "prefill_tok_per_cpu_s": context / prefill_cpu, "decode_tok_per_cpu_s": new / decode_cpu,
                      "peak_rss_mb": peak_rss_mb(),
                      "cache_bytes_used": used, "cache_bytes_allocated": allocated}))


def measure(folder: Path, ids_file: str, context: int, new: int, threads: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), ids_file, str(context), str(new), str(threads),
           str(-1 if chunk is None else chunk)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def exports(args) -> dict[str, Path]:
    """MLA with each body, then the original: the settings `edge-mla build --bits B --kv-bits K` exports."""
    from edge_mla import precision
    from edge_mla.export.onnx import export

    work = Path(args.work)
    common = dict(weight_bits=args.bits, kv_bits=args.kv_bits, head_bits=precision.head_bits(args.bits),
                  overwrite=True)
    folders = {}
    for name in args.bodies:
        body, _, scales = name.partition("-")  # e.g. matmul-channel: the matmul body with static scales only
        for form in args.prefill_forms:  # the expanded prefill (the default) keeps the bare name
            key = f"mla_{name}" + ("" if form == "expanded" else f"_{form}")
            folders[key] = work / f"{key}_w{args.bits}_kv{args.kv_bits}"
            if not folders[key].exists() or args.reexport:
                export(args.mla, folders[key], body=body, kv_scales=scales or "channel", prefill=form, **common)
    folders["original"] = work / f"original_w{args.bits}_kv{args.original_kv_bits or args.kv_bits}"
    if not folders["original"].exists() or args.reexport:
        export(args.source, folders["original"], original=True, **(common | {"kv_bits": args.original_kv_bits or args.kv_bits}))
    return folders


def perplexities(args, folders: dict[str, Path]) -> dict:
    from edge_mla.mla_folder import load
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
    """One row per context and MLA body: its figures, the original's, and the ratios (MLA / original)."""
    rows = ["| context | export | decode tok/s | x original | per CPU s | x original | prefill tok/s | x original "
            "| per CPU s | x original | peak RSS MB | x original | cache MB |", "|---" * 13 + "|"]
    for ctx, r in result["contexts"].items():
        for name, m in r.items():
            if not isinstance(m, dict) or "decode_tok_s" not in m:
                continue
            ratio = r.get("ratios", {}).get(name, {})
            rows.append(f"| {ctx} | {name} | {m['decode_tok_s']:.1f} | {ratio.get('decode', 1):.2f} | "
                        f"{m['decode_tok_per_cpu_s']:.1f} | {ratio.get('decode_cpu', 1):.2f} | "
                        f"{m['prefill_tok_s']:.0f} | {ratio.get('prefill', 1):.2f} | "
                        f"{m['prefill_tok_per_cpu_s']:.0f} | {ratio.get('prefill_cpu', 1):.2f} | {m['peak_rss_mb']:.0f} | "
                        f"{ratio.get('peak_rss', 1):.2f} | {m['cache_bytes_used'] / 1e6:.1f} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mla", required=True, help="converted MLA folder (a build's mla/, or edge-mla convert --out DIR)")
    p.add_argument("--bits", type=int, default=4, help="weight bits of both exports (the build's --bits)")
    p.add_argument("--kv-bits", type=int, default=4, help="cache bits of both exports (the build's --kv-bits)")
    p.add_argument("--original-kv-bits", type=int, default=None, help="the original's cache bits, if not --kv-bits")
    p.add_argument("--bodies", nargs="+", default=["gqa", "matmul"],
                   help="LatentAttention bodies to measure, BODY or BODY-SCALES for an int4 cache's --kv-scales "
                        "(matmul-q4_0, matmul-row; static per-channel scales otherwise); a name whose folder "
                        "mla_NAME_wB_kvK already exists in --work is measured as it is, e.g. an export by older code")
    p.add_argument("--prefill-forms", nargs="+", default=["expanded"], choices=["expanded", "absorbed"],
                   help="MLA prompt chunks: the expanded form (LatentPrefill, the default) and/or the absorbed one")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per run (0: one piece; default: each export's own, else the runner's 128)")
    p.add_argument("--source", default="smollm2-135m", help="the original model it was converted from")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edge_mla_onnx_bench"))
    p.add_argument("--reexport", action="store_true")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--new", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-length", type=int, default=512)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "onnx_decode.json"))
    args = p.parse_args()

    import numpy as np

    from edge_mla.data import split_text
    from edge_mla.runtimes.onnxruntime import read_meta

    t0 = time.perf_counter()
    folders = exports(args)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folders["original"] / "tokenizer.json"))
    ids = np.array(tok.encode(split_text("heldout"), add_special_tokens=False).ids, np.int64)
    if len(ids) < max(args.contexts):
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than context {max(args.contexts)}")
    ids_file = str(Path(args.work) / "prompt_ids.npy")
    np.save(ids_file, ids[: max(args.contexts)])

    import onnxruntime

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": args.threads,
              "new_tokens": args.new, "repeats": args.repeats, "prefill_chunk": args.prefill_chunk,
              "machine": os.uname().machine, "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
              "files": {}, "contexts": {}}
    for name, folder in folders.items():
        meta = read_meta(folder)
        result["files"][name] = {"folder": str(folder), "model_bytes": folder_size(folder),
                                 "cache": meta["cache"]["dtype"], "cache_bytes_per_token": meta["cache"]["bytes_per_token"],
                                 "weights": meta["weights"]}
    for ctx in args.contexts:
        runs = {name: [] for name in folders}
        for _ in range(args.repeats):  # interleaved, so all see the same machine load
            for name, folder in folders.items():
                runs[name].append(measure(folder, ids_file, ctx, args.new, args.threads, args.prefill_chunk))
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"runs": rs}
               for name, rs in runs.items()}
        base = med["original"]
        med["ratios"] = {name: {"decode": m["decode_tok_s"] / base["decode_tok_s"],
                                "prefill": m["prefill_tok_s"] / base["prefill_tok_s"],
                                "decode_cpu": m["decode_tok_per_cpu_s"] / base["decode_tok_per_cpu_s"],
                                "prefill_cpu": m["prefill_tok_per_cpu_s"] / base["prefill_tok_per_cpu_s"],
                                "peak_rss": m["peak_rss_mb"] / base["peak_rss_mb"]}
                         for name, m in med.items() if name.startswith("mla")}
        result["contexts"][str(ctx)] = med
        print(f"context {ctx}: " + ", ".join(f"{name} {m['decode_tok_s']:.1f} tok/s decode, {m['prefill_tok_s']:.0f} "
                                              f"prefill, {m['peak_rss_mb']:.0f} MB" for name, m in med.items()
                                              if name in folders), flush=True)
    if not args.skip_ppl:
        result["perplexity"] = perplexities(args, folders)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    for name, f in result["files"].items():
        print(f"{name}: {f['model_bytes'] / 1e6:.2f} MB, cache {f['cache']} {f['cache_bytes_per_token']} B/token")
    if "perplexity" in result:
        print(json.dumps(result["perplexity"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
