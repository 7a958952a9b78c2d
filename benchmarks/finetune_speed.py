"""Where a distilled fine-tuning step spends its time, and what each fix buys: tokens/s and peak GPU memory of
one training step (teacher forward, student forward and backward, loss, AdamW), variant by variant, on a converted
SmolLM2-135M (random weights of its shape are as good for timing and need no download).

    python benchmarks/finetune_speed.py --model random:config.json --latent 64 --profile \
        --json docs/results/finetune_speed_compiled.json

Variants: `before` is the loop as it was (output-head loss in checkpointed chunks: student and teacher logits
computed twice); then the one-pass head loss (distill.HeadLoss), larger micro-batches, torch.compile of the
student's decoder alone (`compile`) or of student, teacher and head-loss chunk (`compile-all*`), the teacher's
hidden states read from distill.Teacher's cache (`cached*`: what every epoch after the first costs with
--cache-teacher), no teacher (what distillation costs), the q4_0 cache in the forward pass (what
quantization-aware training costs). `--profile` first times the parts of a step on their own.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from edge_mla import finetune as ft
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.mla import set_cache_quant


def old_chunk_loss(hidden, weight, targets, teacher_hidden, teacher_weight, distill):
    logits = (hidden @ weight.T).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    teacher = (teacher_hidden @ teacher_weight.T).float()
    kl = F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum")
    return (1 - distill) * ce + distill * kl


class OldLossModel(ft.LossModel):
    """The loss as it was before the one-pass head loss: checkpointed chunks of 2048 tokens."""

    def forward(self, inputs, targets, teacher_hidden=None, teacher_weight=None):
        hidden = self.decoder(inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        targets, teacher_hidden = targets.flatten(), teacher_hidden.flatten(0, 1)
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, hidden.shape[0], 2048):
            total = total + checkpoint(old_chunk_loss, hidden[i:i + 2048], self.model.lm_head.weight,
                                       targets[i:i + 2048], teacher_hidden[i:i + 2048], teacher_weight, self.distill,
                                       use_reentrant=False)
        return total / targets.numel()


def source_model(spec: str):
    if spec.startswith("random:"):  # a config.json: random weights of that shape
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(spec.split(":", 1)[1])
        config._attn_implementation = "sdpa"
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    from edge_mla.source import load_source
    return load_source(spec).model


def time_steps(student, teacher, *, micro_batch, seq_len, distill, old_loss=False, compile=False,
               compile_teacher=False, cached=False, cache_quant=None, warmup=4, steps=8) -> dict:
    model = copy.deepcopy(student).cuda().train()
    set_cache_quant(model, cache_quant)
    loss_model = (OldLossModel if old_loss else ft.LossModel)(model, 4096, distill, compile=compile)
    if compile and not compile_teacher:  # the student's decoder alone, as before
        loss_model.chunk_fn = ft.head_chunk
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=g).cuda() for _ in range(4)]
    distiller = None
    if distill:  # with `cached`, each of the 4 batches is a set of rows whose hidden states are kept after 1 pass
        distiller = ft.Teacher(teacher, compile=compile_teacher, cache_rows=4 * micro_batch if cached else 0,
                               seq_len=seq_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            warm_s, t0 = time.perf_counter() - t_start, time.perf_counter()
        b = batches[i % len(batches)]
        rows = torch.arange(micro_batch) + (i % len(batches)) * micro_batch
        loss, _ = ft.train_step(loss_model, distiller, opt, b[:, :-1], b[:, 1:], 1.0, autocast, rows=rows)
        if (i + 1) % 10 == 0:  # the loop reads the loss every 10 steps
            loss.item()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tokens_per_s": round(steps * micro_batch * seq_len / dt), "step_ms": round(1000 * dt / steps, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "warmup_s": round(warm_s, 1)}


def cuda_ms(fn, steps=8, warmup=3) -> float:
    for i in range(steps + warmup):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        fn()
    torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - t0) / steps, 2)


def profile_parts(student, teacher, micro_batch, seq_len) -> dict:
    """Each part of a distilled step on its own, in ms for micro_batch x seq_len tokens."""
    out = {}
    x = torch.randint(0, teacher.config.vocab_size, (micro_batch, seq_len), device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for name, decoder in (("teacher_forward", teacher.model), ("teacher_forward_compiled", torch.compile(teacher.model))):
        with torch.no_grad(), autocast:
            out[name] = cuda_ms(lambda: decoder(x, use_cache=False))
    model = copy.deepcopy(student).cuda().train()
    hidden = torch.randn(micro_batch * seq_len, model.config.hidden_size, device="cuda", requires_grad=True)
    t_hidden = torch.randn(micro_batch * seq_len, model.config.hidden_size, device="cuda")
    targets = x.flatten()
    w = model.lm_head.weight
    for name, fn in (("head_loss", ft.head_chunk), ("head_loss_compiled", torch.compile(ft.head_chunk, dynamic=False))):
        def head():
            with autocast:
                loss = ft.HeadLoss.apply(hidden, w, targets, t_hidden, teacher.lm_head.weight, 0.5, 4096, fn)
            loss.backward()
        out[name] = cuda_ms(head)
    for name, decoder in (("student_forward_backward", model.model),
                          ("student_forward_backward_compiled", torch.compile(model.model))):
        def student_step():
            with autocast:
                h = decoder(x, use_cache=False).last_hidden_state
            h.float().square().mean().backward()
        out[name] = cuda_ms(student_step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def opt_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    out["clip_and_adamw"] = cuda_ms(opt_step)
    return {"micro_batch": micro_batch, **out}


def teacher_forward_ms(teacher, micro_batch, seq_len, steps=8) -> float:
    x = torch.randint(0, teacher.config.vocab_size, (micro_batch, seq_len), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(steps + 2):
            if i == 2:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            teacher.model(x, use_cache=False)
        torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - t0) / steps, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, or random:CONFIG_JSON")
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--variants", default="mb32,compile-all,compile-all-mb64,cached-mb64,cached-mb64-q4")
    ap.add_argument("--profile", action="store_true", help="time the parts of a step on their own first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from edge_mla.finetune import cache_quantizer

    teacher = source_model(args.model).cuda()
    calib = torch.randint(0, teacher.config.vocab_size, (4, 1024), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(teacher, calib)
    student = copy.deepcopy(teacher).cpu()
    convert(student, Plan(selection="shared", latent=args.latent), stats, source=args.model)
    teacher.requires_grad_(False)
    C = student.config.mla["latent_dim"]
    plans = {
        "before": dict(micro_batch=16, distill=0.5, old_loss=True),
        "headloss": dict(micro_batch=16, distill=0.5),
        "mb32": dict(micro_batch=32, distill=0.5),
        "mb64": dict(micro_batch=64, distill=0.5),
        "compile": dict(micro_batch=32, distill=0.5, compile=True),
        "compile-all": dict(micro_batch=32, distill=0.5, compile=True, compile_teacher=True),
        "compile-all-mb64": dict(micro_batch=64, distill=0.5, compile=True, compile_teacher=True),
        "compile-all-mb64-q4": dict(micro_batch=64, distill=0.5, compile=True, compile_teacher=True,
                                    cache_quant=cache_quantizer(4, C)),
        "cached-mb64": dict(micro_batch=64, distill=0.5, compile=True, compile_teacher=True, cached=True),
        "cached-mb64-q4": dict(micro_batch=64, distill=0.5, compile=True, compile_teacher=True, cached=True,
                               cache_quant=cache_quantizer(4, C)),
        "no-teacher-compiled-mb64": dict(micro_batch=64, distill=0.0, compile=True),
        "no-teacher": dict(micro_batch=32, distill=0.0),
        "q4-cache": dict(micro_batch=32, distill=0.5, cache_quant=cache_quantizer(4, C)),
    }
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "latent": args.latent, "seq_len": args.seq_len,
              "teacher_forward_ms_mb16": teacher_forward_ms(teacher, 16, args.seq_len), "rows": []}
    if args.profile:
        result["profile_ms"] = profile_parts(student, teacher, 32, args.seq_len)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    for name in args.variants.split(","):
        try:
            row = {"variant": name, **plans[name], **time_steps(student, teacher, seq_len=args.seq_len, **plans[name])}
        except Exception as err:  # a variant that fails (e.g. compile) is reported, not fatal
            row = {"variant": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        row.pop("cache_quant", None)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a run stopped at its time limit keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
