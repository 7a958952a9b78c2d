"""Peak memory and time of each pipeline step against model size: convert, export gguf, export onnx, build.

Each step runs as its own `edge-mla` process (python -m edge_mla.cli ...) and reports its own peak RSS
(getrusage of that process, and separately of the processes it starts: the build's llama.cpp/onnxruntime
measurements run in children) and wall time; seconds per billion parameters = wall time / parameters. Results
are merged into docs/results/scale.json (one row per model and step) and printed as a table.

    python benchmarks/make_checkpoint.py llama-3.2-1b /tmp/edge-mla-ckpt/llama-3.2-1b
    python benchmarks/scale.py smollm2-135m /tmp/edge-mla-ckpt/llama-3.2-1b --out /tmp/edge-mla-scale

The calibration is cut to --calib-windows x --calib-length tokens (default 2 x 512; a default conversion reads
16 x 1024) so that an 8B fits an afternoon on 2 cores: the conversion's progress lines give the rate through the
layers, from which the default's time follows. GGUF's latent check and ONNX's cache scales read 1 x 128 tokens
(defaults 4 x 512 and 8 x 512); the build step reads --calib-windows x --calib-length everywhere.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "scale.json"
STEPS = ("convert", "export gguf", "export onnx", "build")

# Runs one CLI command in this process and reports its peak RSS, its children's, and the wall time as JSON.
MEASURE = r"""
import json, resource, sys, time
from edge_mla.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
ru = lambda who: resource.getrusage(who).ru_maxrss / 1024
print("SCALE " + json.dumps({"code": code, "seconds": round(time.perf_counter() - t0, 1),
                             "peak_rss_mb": round(ru(resource.RUSAGE_SELF)), "children_peak_rss_mb":
                             round(ru(resource.RUSAGE_CHILDREN))}), flush=True)
"""


def parameters(model: str) -> int:
    """Parameters of a source model, from its config and checkpoint index only (nothing loaded)."""
    from edge_mla.layerwise import Checkpoint
    from edge_mla.source import BUILTIN, _materialize_builtin

    folder = _materialize_builtin(model) if model in BUILTIN else Path(model)
    checkpoint = Checkpoint(folder)
    total = 0
    for name in checkpoint.files:
        total += checkpoint.tensor(name, None).numel()  # memory-mapped: only the header is read
    return total


def commands(model: str, out: Path, calib: tuple[int, int], rope_pairs: int | None,
             formats: str = "onnx,gguf") -> dict[str, list[str]]:
    windows, length = calib
    rope = ["--rope-pairs", str(rope_pairs)] if rope_pairs else []
    return {
        "convert": ["convert", "-m", model, "-o", str(out / "mla"), "--calib-windows", str(windows),
                    "--calib-length", str(length), "--force", *rope],
        "export gguf": ["export", "gguf", str(out / "mla"), "-o", str(out / "mla.gguf"), "--bits", "4",
                        "--calib-windows", "1", "--calib-length", "128", "--force"],
        "export onnx": ["export", "onnx", str(out / "mla"), "-o", str(out / "onnx"), "--bits", "4",
                        "--calib-windows", "1", "--calib-length", "128", "--force"],
        # the whole build, both formats, every calibration step on windows x length tokens
        "build": ["build", "-m", model, "--device", "laptop-16gb", "--bits", "4", "--recover-steps", "0",
                  "--quality-windows", "0", "--speed-prompt", "0", "--calib-windows", str(windows),
                  "--calib-length", str(length), "--formats", formats, "-o", str(out / "build"), "--force"],
    }


def run_step(argv: list[str], log: Path) -> dict:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", MEASURE, *argv], stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SCALE ")]
    log.write_text(log.read_text() + proc.stdout)
    if not lines:
        return {"code": proc.returncode, "error": (log.read_text().strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1][6:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="built-in name or checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="working folder (outputs are large)")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--calib-windows", type=int, default=2)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--rope-pairs", type=int, default=None,
                        help="fewer rope pairs, for llama3-scaled RoPE in GGUF (e.g. 15 for Llama-3.2-1B)")
    parser.add_argument("--formats", default="onnx,gguf",
                        help="the build step's outputs (onnx for a model GGUF cannot carry: Qwen2's attention biases)")
    parser.add_argument("--note", default="2 shared CPU cores (other jobs running), 24 GB RAM")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",")]
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for model in args.models:
        name = Path(model).name
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        params = parameters(model)
        cmds = commands(model, out, (args.calib_windows, args.calib_length), args.rope_pairs, args.formats)
        for step in steps:
            print(f"{name}: {step} ...", flush=True)
            result = run_step(cmds[step], out / f"{step.replace(' ', '-')}.log")
            row = {"model": name, "parameters": params, "step": step, **result,
                   "seconds_per_billion": round(result["seconds"] / (params / 1e9), 1) if "seconds" in result else None,
                   "command": "edge-mla " + " ".join(cmds[step]), "machine": args.note}
            rows = [r for r in rows if (r["model"], r["step"]) != (name, step)] + [row]
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'model':<16} {'params':>7} {'step':<12} {'wall s':>8} {'s / B':>8} {'peak RSS MB':>12} {'children MB':>12}")
    for r in rows:
        if "seconds" not in r:
            print(f"{r['model']:<16} {r['parameters'] / 1e9:>6.2f}B {r['step']:<12} failed: {r.get('error')}")
            continue
        print(f"{r['model']:<16} {r['parameters'] / 1e9:>6.2f}B {r['step']:<12} {r['seconds']:>8.0f} "
              f"{r['seconds_per_billion']:>8.0f} {r['peak_rss_mb']:>12} {str(r.get('children_peak_rss_mb', '-')):>12}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
