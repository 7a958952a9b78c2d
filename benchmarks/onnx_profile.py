"""Where a decode step's time goes in onnxruntime: per op type and per node, for an ONNX export of edge-mla
(onnxruntime's own profiler, SessionOptions.enable_profiling), after a prompt of held-out text.

    python benchmarks/onnx_profile.py FOLDER [FOLDER ...] --context 1024 --steps 16 --threads 1

Prints per folder a table of op types (total ms per decode step, share, node count) and the slowest nodes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(folder: str, ids: np.ndarray, steps: int, threads: int) -> dict:
    import onnxruntime as ort

    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    decoder = OnnxDecoder(folder, threads=threads, context=len(ids) + steps + 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    decoder.session = ort.InferenceSession(str(Path(folder) / decoder.meta["model"]), options,
                                           providers=["CPUExecutionProvider"])
    start_ns = decoder.session.get_profiling_start_time_ns()
    token = int(decoder.forward(ids)[-1].argmax())
    mark = time.time_ns()
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(decoder.forward(np.array([token]))[-1].argmax())
    wall = (time.perf_counter() - t0) / steps
    events = json.loads(Path(decoder.session.end_profiling()).read_text())
    since = (mark - start_ns) / 1e3  # microseconds from the profiler's start
    by_type, by_node, counts = defaultdict(float), defaultdict(float), defaultdict(set)
    run_us = 0.0
    for e in events:
        if e.get("ts", 0) < since:
            continue
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run_us += e["dur"]
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        by_type[op] += e["dur"]
        by_node[node] += e["dur"]
        counts[op].add(node)
    return {"wall_ms_per_step": wall * 1e3, "run_ms_per_step": run_us / steps / 1e3,
            "by_type_ms": {k: v / steps / 1e3 for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
            "nodes_per_type": {k: len(v) for k, v in counts.items()},
            "top_nodes_ms": {k: v / steps / 1e3 for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:25]}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    from tokenizers import Tokenizer

    from edge_mla.data import split_text

    tok = Tokenizer.from_file(str(Path(args.folders[0]) / "tokenizer.json"))
    ids = np.array(tok.encode(split_text("heldout"), add_special_tokens=False).ids[: args.context], np.int64)
    result = {}
    for folder in args.folders:
        r = result[folder] = profile(folder, ids, args.steps, args.threads)
        kernels = sum(r["by_type_ms"].values())
        print(f"\n{folder}: {r['wall_ms_per_step']:.2f} ms per step (run {r['run_ms_per_step']:.2f}, kernels "
              f"{kernels:.2f})")
        for op, ms in r["by_type_ms"].items():
            print(f"  {op:34s} {ms:7.3f} ms {100 * ms / kernels:5.1f}%  {r['nodes_per_type'][op]} nodes")
        print("  slowest nodes:")
        for node, ms in list(r["top_nodes_ms"].items())[:12]:
            print(f"    {node[:70]:70s} {ms:7.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"context": args.context, "steps": args.steps, "threads": args.threads,
                                              "folders": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
