"""Steps a second of the CPU recovery: one block on all of torch's threads against several blocks at once, each on
one thread in its own Python thread (tried for the build, not adopted: docs/recovery.md, "Two blocks at once").

    python benchmarks/recovery_workers.py [--steps 80] [--layers 5,6] [--heap build] [--json out.json]

The model is converted training-free (the build's plan); each timing trains copies of the chosen layers' blocks
exactly as the build does (latent rotation and norm, through the q4_0 cache and the 4-bit weights, bf16 autocast
where native) on 16 teacher windows of 512 tokens, and reads the training loop's own seconds per step. --heap says
how malloc is set, which decides the answer.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import threading
import time


from edge_mla import recover as rc
from edge_mla.convert import calibrate_and_convert, named_plan, torch_threads
from edge_mla.data import spread_windows
from edge_mla.layerwise import give_back_freed_memory, heap_allocations
from edge_mla.mla import mla_layers
from edge_mla.plans import recovery_options
from edge_mla.source import load_source

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--layers", default="5,6", help="the blocks trained (as many as the cores, for the parallel run)")
    ap.add_argument("--heap", choices=["glibc", "build", "build-untrimmed"], default="build",
                    help="malloc as glibc sets it; as the build sets it (a lazily read model: freed blocks of 1 MiB "
                         "go back at once, layerwise.give_back_freed_memory, and heap_allocations around each "
                         "training run); or the build's with a trim threshold of 256 MiB while training")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    cores = os.cpu_count() or 1
    if args.heap != "glibc":
        give_back_freed_memory()

    src = load_source(args.model)
    src.model.eval()
    original = copy.deepcopy(src.model)
    ins, outs = rc.collect_attention_io(original, spread_windows(src.tokenizer, count=16, length=512))
    calibrate_and_convert(src, named_plan("recovered", src.model.config))
    blocks = mla_layers(src.model)

    @contextlib.contextmanager
    def heap():
        if args.heap == "glibc":
            yield
            return
        with heap_allocations():
            if args.heap == "build-untrimmed":
                ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 256 << 20)
            try:
                yield
            finally:
                if args.heap == "build-untrimmed":
                    ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 128 << 10)  # glibc's default

    def train(i: int, seconds: list) -> None:
        recovery = rc.LayerRecovery(steps=args.steps, **recovery_options(4, 4))
        recovery(i, copy.deepcopy(blocks[i]), ins[i], outs[i])
        seconds.append(recovery.stats[-1]["train_seconds"] / args.steps)

    rows = []
    for threads in sorted({cores, 1}, reverse=True):
        with torch_threads(threads), heap():
            seconds: list = []
            for i in layers:
                train(i, seconds)
        rows.append({"run": f"one block at a time on {threads} thread(s)", "blocks_at_once": 1, "threads": threads,
                     "ms_per_step": round(1000 * min(seconds), 1), "steps_per_s": round(1 / min(seconds), 2)})
    with torch_threads(1), heap():
        seconds = []
        t0 = time.perf_counter()
        workers = [threading.Thread(target=train, args=(i, seconds)) for i in layers]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    rows.append({"run": f"{len(layers)} blocks at once, one thread each", "blocks_at_once": len(layers), "threads": 1,
                 "ms_per_step": round(1000 * max(seconds), 1), "steps_per_s": round(sum(1 / s for s in seconds), 2),
                 "wall_seconds": round(wall, 1)})
    base = rows[0]["steps_per_s"]
    print(f"{'run':42s} {'ms a step (per block)':>22s} {'steps/s (all blocks)':>21s} {'vs the first':>13s}")
    for r in rows:
        r["speedup"] = round(r["steps_per_s"] / base, 2)
        print(f"{r['run']:42s} {r['ms_per_step']:22.1f} {r['steps_per_s']:21.2f} {r['speedup']:12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/recovery_workers.py " + " ".join(
                f"--{k} {v}" for k, v in (("steps", args.steps), ("layers", args.layers), ("heap", args.heap))),
                "model": args.model, "cores": cores, "cpu": _cpu(), "rows": rows}, f, indent=1)


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
