"""The fine-tune on one GPU and on several: tokens/s and peak memory per GPU of the real loop (`edge-mla finetune`
started by torchrun), with DDP and with --fsdp, on models of random weights (timing needs no trained weights and no
download): SmolLM2-135M's shape and a Llama-3.2-1B shape. Each run distils from its own random original.

    python benchmarks/finetune_gpus.py --tokenizer TOKENIZER_DIR --work /root/gpus \\
        --runs 135m:1,135m:2,135m:2:fsdp,1b:1,1b:2:fsdp --json docs/results/finetune_gpus.json

A run is MODEL:GPUS[:fsdp]; MODEL is 135m (config of --tokenizer's folder, SmolLM2-135M's) or 1b (LLAMA_1B below).
Runs of one GPU whose GPU is free run at the same time as the run before them (`--parallel`: 135m:1 on GPU 0 beside
1b:1 on GPU 1). Steady tokens/s: from the step `--steady-from` (share of the run) to the end, read off the loop's
own log (its time stamps every 10 steps), so compiling and the teacher's first epoch (--cache-teacher) stay out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA_1B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                hidden_act="silu")


def prepare(name: str, tokenizer_dir: Path, work: Path, latent: int) -> tuple[Path, Path]:
    """A random original of the model's shape and its MLA conversion, saved as folders (once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from edge_mla.calibration import collect_stats
    from edge_mla.convert import Plan, convert
    from edge_mla.mla_folder import save

    orig, mla = work / f"{name}-orig", work / f"{name}-mla{latent}"
    if (mla / "config.json").exists():
        return orig, mla
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(tokenizer_dir) if name == "135m" else LlamaConfig(
        **{k: v for k, v in LLAMA_1B.items() if k != "model_type"}, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(orig)
    tok.save_pretrained(orig)
    calib = torch.randint(0, tok.vocab_size, (4, 1024), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model.to("cuda" if torch.cuda.is_available() else "cpu"), calib)
    model.cpu()
    convert(model, Plan(selection="shared", latent=latent), stats, source=str(orig))
    save(model, tok, mla)
    params = sum(p.numel() for p in model.parameters())
    (work / f"{name}.json").write_text(json.dumps({"parameters_converted": params}))
    return orig, mla


def steady(history: list[dict], tokens_per_step: int, start_step: int) -> float | None:
    """Tokens/s between the first log read at or after start_step and the last one."""
    if not history or "elapsed_s" not in history[0]:
        return None
    # the steps of one read share its time stamp: the last step of each read is where that time was taken
    reads = [h for h, nxt in zip(history, history[1:] + [None]) if nxt is None or nxt["elapsed_s"] != h["elapsed_s"]]
    marks = [h for h in reads if h["step"] >= start_step]
    if len(marks) < 2:
        return None
    first, last = marks[0], marks[-1]
    return round((last["step"] - first["step"]) * tokens_per_step / (last["elapsed_s"] - first["elapsed_s"]))


def launch(run: str, args, folders: dict, port: int, gpu: str | None):
    name, gpus, *rest = run.split(":")
    gpus, fsdp = int(gpus), "fsdp" in rest
    orig, mla = folders[name]
    mb = args.micro_batch_1b if name == "1b" else args.micro_batch
    steps = (args.steps_1b if name == "1b" else args.steps) // (1 if name == "1b" or gpus == 1 else gpus)
    out = Path(args.work) / f"out-{run.replace(':', '-')}"
    flags = ([] if args.eager else ["--compile"]) + ["--distill", "0.5"] + (["--cache-teacher"] if name != "1b" else []) + (
        ["--fsdp"] if fsdp else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", str(port),
           "-m", "edge_mla.cli", "finetune", str(mla), "--out", str(out), "--teacher", str(orig), "--force",
           "--tokens", str(steps * gpus * mb * args.seq_len), "--micro-batch", str(mb), "--seq-len",
           str(args.seq_len), "--lr", "2e-4", *flags]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    log = open(Path(args.work) / f"log-{run.replace(':', '-')}.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return dict(run=run, model=name, gpus=gpus, fsdp=fsdp, micro_batch_per_gpu=mb, steps=steps, flags=flags,
                out=out, proc=proc, log=log, t0=time.perf_counter(), cmd=" ".join(cmd[1:]))


def finish(job: dict, args, deadline: float) -> dict:
    try:
        rc = job["proc"].wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        job["proc"].kill()
        rc = "timeout"
    job["log"].close()
    wall = round(time.perf_counter() - job["t0"], 1)
    row = {k: job[k] for k in ("run", "model", "gpus", "fsdp", "micro_batch_per_gpu", "steps", "flags")}
    row["wall_s"] = wall
    log_file = job["out"] / "finetune_log.json"
    if rc != 0 or not log_file.exists():
        text = Path(job["log"].name).read_text(errors="replace")
        return {**row, "error": f"exit {rc}", "log_tail": text[-3000:]}
    log = json.loads(log_file.read_text())
    hist = log["history"]
    per_step = job["gpus"] * job["micro_batch_per_gpu"] * args.seq_len
    peaks = log.get("peak_gpu_bytes_per_process") or [log["peak_gpu_bytes"]]
    return {**row, "tokens_per_s_whole_run": round(hist[-1]["tokens_per_s"]),
            "tokens_per_s_steady": steady(hist, per_step, int(args.steady_from * job["steps"])),
            "steady_from_step": int(args.steady_from * job["steps"]), "teacher_passes": log.get("teacher_passes"),
            "peak_gpu_gib_per_gpu": [round(p / 2**30, 1) for p in peaks if p is not None],
            "first_loss": round(hist[0]["loss"], 4), "final_loss": round(hist[-1]["loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="SmolLM2-135M folder (config and tokenizer; no weights read)")
    ap.add_argument("--work", default="/tmp/edge-mla-gpus")
    ap.add_argument("--runs", default="135m:1,135m:2,135m:2:fsdp,1b:1,1b:2:fsdp")
    ap.add_argument("--parallel", action="store_true", help="start a one-GPU run beside the one-GPU run before it")
    ap.add_argument("--latent", type=int, default=64, help="C of the 135m model")
    ap.add_argument("--latent-1b", type=int, default=256, help="C of the 1b model")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--micro-batch-1b", type=int, default=16)
    ap.add_argument("--steps", type=int, default=110, help="steps of a one-GPU 135m run (N GPUs: steps / N)")
    ap.add_argument("--steps-1b", type=int, default=30, help="steps of every 1b run (same per-GPU batch)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steady-from", type=float, default=0.5)
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything; later runs are skipped")
    ap.add_argument("--eager", action="store_true", help="no --compile (a CPU check of this script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    deadline = time.time() + args.budget
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    names = sorted({r.split(":")[0] for r in runs})
    cuda = torch.cuda.is_available()
    result = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "args": vars(args), "rows": []}
    # the models: each prepared on its own GPU at the same time
    preps = []
    for i, name in enumerate(names):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import finetune_gpus as f; "
                f"from pathlib import Path; f.prepare({name!r}, Path({args.tokenizer!r}), Path({args.work!r}), "
                f"{args.latent_1b if name == '1b' else args.latent})")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % max(1, torch.cuda.device_count())))
        preps.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    t0 = time.perf_counter()
    for p in preps:
        if p.wait() != 0:
            raise SystemExit("preparing the models failed")
    result["prepare_s"] = round(time.perf_counter() - t0, 1)
    for name in names:
        result[f"model_{name}"] = json.loads((work / f"{name}.json").read_text())
    folders = {name: (work / f"{name}-orig", work / f"{name}-mla{args.latent_1b if name == '1b' else args.latent}")
               for name in names}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)

    def report(row):
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        if row.get("error"):
            print(row["log_tail"], flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))

    i, port = 0, 29600
    while i < len(runs):
        if time.time() > deadline - 30:
            report({"run": runs[i], "error": "skipped: no time left"})
            i += 1
            continue
        pair = (args.parallel and i + 1 < len(runs) and runs[i].split(":")[1] == "1"
                and runs[i + 1].split(":")[1] == "1" and torch.cuda.device_count() > 1)
        jobs = [launch(runs[i], args, folders, port, "0" if pair else None)]
        if pair:
            jobs.append(launch(runs[i + 1], args, folders, port + 1, "1"))
        for job in jobs:
            row = finish(job, args, deadline)
            row["beside"] = [j["run"] for j in jobs if j is not job]
            row["command"] = job["cmd"]
            report(row)
        i, port = i + len(jobs), port + 2
    by = {r["run"]: r for r in result["rows"] if r.get("tokens_per_s_steady")}
    for model in names:
        one = by.get(f"{model}:1")
        for run, row in by.items():
            if one and run.startswith(f"{model}:") and row["gpus"] > 1:
                row["speedup_steady_vs_one_gpu"] = round(row["tokens_per_s_steady"] / one["tokens_per_s_steady"], 2)
                print(f"{run}: {row['speedup_steady_vs_one_gpu']}x one GPU", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
