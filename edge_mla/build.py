"""`edge-mla build`: source -> convert -> (fine-tune) -> ONNX + GGUF -> budget report, all or nothing."""
from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from edge_mla import budget as bud
from edge_mla import precision, provenance, recover, timebudget
from edge_mla.convert import check_saving, named_plan, original_cache_width, resolve_plan
from edge_mla.data import spread_windows
from edge_mla.plans import EXPECTED_COST, RECOVER_LR, RECOVER_STEPS, Calibration, Plan
from edge_mla.publish import refuse_existing, staged_folder

# Teacher text for the CPU recovery: 48 x 512 calibration tokens, balanced over the kinds of the calibration mixture
# (or the user's --calib-text files) and spread over each, and up to 600 Adam steps per layer (as many as
# --time-budget buys) at a peak learning rate of 2e-4, under bf16 autocast where the CPU has it
# (recover.native_bf16: 1.25x faster on 2 threads, the same error). Per layer on held-out Wikipedia and news,
# more articles, more steps and 2e-4 rather than 1e-4 all cut the block's error; the first 16 windows (a few
# articles) at 300 steps left it under-fitted, and 4e-4 over-shoots at late layers (docs/recovery.md). Held-out text
# is never used; the quality target's check windows (the split's end) are left out.
RECOVER_WINDOWS, RECOVER_LENGTH = 48, 512  # steps: plans.RECOVER_STEPS


def recovery_windows(tokenizer, texts: tuple[str, ...] = ()):
    """The recovery's teacher windows, from the same texts the conversion calibrates on (the built-in mixture of
    kinds or the user's files)."""
    from edge_mla.target import CHECK_LENGTH, CHECK_WINDOWS

    return spread_windows(tokenizer, texts or None, count=RECOVER_WINDOWS, length=RECOVER_LENGTH,
                          hold_out_tokens=0 if texts else CHECK_WINDOWS * CHECK_LENGTH)


def recovery_options(bits: int, kv_bits: int) -> dict:
    """How the build recovers: through the cache and the 4-bit projections it ships, with a learned latent norm,
    which lets the GGUF store kv_a at 4 bits too; onnxruntime's int4 shares q4_0's grid. The per-head
    up-projections stay 8-bit: 4-bit ones, trained through, saved 2.8 MB of GGUF for +5% perplexity in llama.cpp
    (docs/recovery.md, benchmarks/recovery_runtimes.py). Each block learns from the original's inputs: training it
    on the converted model's own stream towards the original's (LayerRecovery(corrects_drift=True)) won in PyTorch
    at a float cache (worst text 1.39x -> 1.30x at 300 steps) but lost through the runtimes' 4-bit formats at the
    15-minute budget (docs/quality.md)."""
    return dict(cache_bits=kv_bits, weight_bits=bits, latent_norm=True, up_projections=False, lr=RECOVER_LR)


def recovery_step(recover_steps: int, bits: int, kv_bits: int, budgeted: bool = False) -> str:
    steps = f"{'up to ' if budgeted else ''}{recover_steps} steps"
    return (f"recovering on the CPU: each attention block trained {steps} towards the original's outputs"
            f"{', through the 4-bit cache' if kv_bits == 4 else ''}{' and 4-bit weights' if bits == 4 else ''}, "
            "with a learned latent norm")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(t0: float, i: int, n: int, what: str) -> None:
    """Progress: the step, with the time and peak memory so far (where the time and memory go)."""
    print(f"[{i}/{n}] {what}  ({time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mb():.0f} MB so far)", flush=True)


def build(model: str, device_name: str, bits: int, out: str | Path, context: int | None = None,
          finetune_tokens: int = 0, plan: Plan | None = None, force: bool = False,
          devices_file: str | None = None, kv_bits: int | None = None, quality_windows: int = 4,
          quality_length: int = 512, recover_steps: int = RECOVER_STEPS, speed_prompt: int = 256,
          max_quality_loss: float | None = None, formats: tuple[str, ...] = ("onnx", "gguf"),
          threads: int | None = None, calibration: Calibration = Calibration(),
          time_budget: float | None = None, thresholds=None) -> dict:
    from edge_mla import preflight
    from edge_mla.source import load_source

    precision.check_bits(bits)
    calibration.check()
    recover_steps = 0 if finetune_tokens else recover_steps  # the fine-tune recovers more, and on the GPU
    trained = bool(finetune_tokens or recover_steps)
    kv_bits = precision.check_bits(kv_bits or precision.default_cache_bits(bits, trained), "--kv-bits")
    device = bud.find_device(device_name, bud.load_devices(devices_file))
    out = refuse_existing(out, force)
    if finetune_tokens:
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--finetune-tokens needs a CUDA GPU and none is visible; build without fine-tuning here "
                             "and fine-tune on a GPU machine with `edge-mla finetune`")
    if not device.runtimes:
        raise ValueError(f"no LLM fits {device.name}: {device.usable_mb} MB usable and no runtime that runs an LLM "
                         "there; even a 135M-parameter model at 4 bits needs about 90 MB. Pick a device with at least "
                         "256 MB of RAM (e.g. rpi-zero-2w)")
    n = 6 if trained else 5
    t0 = time.perf_counter()
    step(t0, 1, n, f"loading {model}")
    # A folder's weights stay on disk and are read a layer at a time (layerwise.py) by the conversion and by both
    # exporters, except for the quality target's retries, which re-convert a pristine in-memory copy.
    preflight.check_gguf_header(model, formats)  # a GGUF's header and tensor list decide before any de-quantizing
    src = load_source(model, lazy=max_quality_loss is None)
    if max_quality_loss is not None:
        from edge_mla import target
        target.check_calibration(src.tokenizer, *calibration.sizes("convert"))
    streamed = src.checkpoint is not None
    config = src.model.config
    limit = int(config.max_position_embeddings)
    context = context or min(limit, 4096)
    if context > limit:
        raise ValueError(f"--context {context} is beyond what {model} allows ({limit}); use {limit} or less")
    plan_name = "finetuned" if finetune_tokens else "recovered" if recover_steps else "training-free"
    plan = named_plan(plan_name, config, plan)
    check_saving(config, plan, EXPECTED_COST[plan_name])
    plan, notes = preflight.check(src.model, plan, formats, originals=True,  # every exporter, before any work
                                  checkpoint=src.checkpoint)
    for note in notes:
        print("      " + note)

    from edge_mla.convert import calibrate_and_convert, describe, load, save
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import onnx as onnx_export

    weights, cache = precision.gguf_weight_type(bits), precision.gguf_cache_type(kv_bits)
    with staged_folder(out) as staging:
        # The original first, through the same exporters at the same bits: the conversion then changes the
        # loaded model in place, so the source is read from disk once.
        # One-off work first: a machine's first build fetches the model and the texts (calibration and battery) and
        # tokenizes them, minutes that later builds skip. The time budget starts after it, so a first build recovers
        # as much as any other (the fresh-clone build of 2026-12-06 spent 7.7 min before its recovery and got 50 steps
        # a layer instead of ~200).
        if time_budget and recover_steps:  # (without a budget to keep, each step fetches its own when it needs it)
            from edge_mla.data import calibration_windows
            calibration_windows(src.tokenizer, calibration.texts or None, count=1,
                                length=calibration.sizes("onnx")[1])
        battery = None
        if quality_windows:
            from edge_mla.quality import Battery
            battery = Battery(src.tokenizer, kv_type=cache, onnx_cache=precision.ONNX_CACHE_DTYPE[kv_bits],
                              count=quality_windows, length=quality_length, threads=threads)
        budget_start = time.perf_counter()
        if time_budget and recover_steps and budget_start - t0 > 30:
            print(f"      prepared the model and texts in {budget_start - t0:.0f} s (fetching them is once per machine; "
                  "not counted in --time-budget)")
        step(t0, 2, n, f"exporting the original at the same bits and scoring it, to compare ({weights} weights, "
                       f"{cache} cache)")
        original, t_original = staging / ".original", time.perf_counter()
        orig_onnx = orig_gguf = onnx_dir = gguf_file = None
        if "onnx" in formats:
            orig_onnx = onnx_export.export(model, original / "onnx", weight_bits=bits, kv_bits=kv_bits, original=True,
                                           head_bits=precision.head_bits(bits), model=src.model,
                                           tokenizer=src.tokenizer, checkpoint=src.checkpoint,
                                           **calibration.of("onnx"))
        same_bits_exports = time.perf_counter() - t_original  # the MLA exports repeat these: the time unit below
        orig_onnx_int8 = None
        if "onnx" in formats and kv_bits == 4 and quality_windows:
            # onnxruntime's int4 cache (static scales) costs the original ~28%: a user there would keep its int8
            # cache, so the report scores that too (quality only; the verdict compares the same bits)
            orig_onnx_int8 = onnx_export.export(model, original / "onnx-int8", weight_bits=bits, kv_bits=8,
                                                original=True, head_bits=precision.head_bits(bits), model=src.model,
                                                tokenizer=src.tokenizer, checkpoint=src.checkpoint,
                                                **calibration.of("onnx"))
        if "gguf" in formats:
            t_gguf = time.perf_counter()
            orig_gguf = original / "original.gguf"
            gguf_export.export(src, orig_gguf, weights=weights, cache_type=cache)
            same_bits_exports += time.perf_counter() - t_gguf

        if battery:  # the originals are scored now: what they take tells the time budget what the MLA's will
            from edge_mla.quality import ORIGINAL_INT8
            print(f"      perplexity of the original through llama.cpp and onnxruntime ({quality_windows} x "
                  f"{quality_length} tokens per text)")
            battery.score(runnable_files({"original": {"gguf": orig_gguf, "onnx": orig_onnx},
                                          **({ORIGINAL_INT8: {"onnx": orig_onnx_int8}} if orig_onnx_int8 else {})}))
        if max_quality_loss is None:  # one pass, layer by layer: calibrate, convert, recover, write
            deadline = None
            if time_budget and recover_steps:
                measured = battery.seconds if battery else {}
                scoring = {runtime: seconds for (model, runtime), seconds in measured.items() if model == "original"}
                deadline = timebudget.recovery_deadline(budget_start, time_budget,
                                                        timebudget.after_recovery(same_bits_exports, scoring))
            mla, mla_dir = convert_layerwise(src, plan, staging / "mla", recover_steps, bits, kv_bits, t0, n,
                                             calibration, deadline)
            k = 4 + bool(recover_steps)
        elif recover_steps:  # the original's attention inputs and outputs, before the conversion replaces it
            teacher = recover.collect_attention_io(
                src.model, recovery_windows(src.tokenizer, calibration.texts),
                desc="      teacher pass (original attention on calibration text)")
        attempts = []  # the quality target's tries, each converted from a pristine in-memory copy
        if max_quality_loss is not None:
            import copy

            from edge_mla import target
            from edge_mla.eval import perplexity
            held_out = target.check_windows(src.tokenizer)
            reference = perplexity(src.model, held_out, desc="quality check")
            attempts = target.widths(plan, resolve_plan(config, replace(plan, latent=None)).latent,
                                     original_cache_width(config))
            pristine = copy.deepcopy(src.model)  # each wider try converts the original again
            tried = []
        for i, plan in enumerate(attempts):
            last = i == len(attempts) - 1
            step(t0, 3, n, f"converting to MLA ({plan.selection} rope head, latent {plan.latent})")
            mla = calibrate_and_convert(src, plan, **calibration.of("convert"))
            print("      " + describe(mla, config))
            k = 4
            if recover_steps:
                step(t0, k, n, recovery_step(recover_steps, bits, kv_bits))
                # A later, wider try needs the teacher again: it gets copies of the lists.
                io = teacher if last else (list(teacher[0]), list(teacher[1]))
                mla["recovery"] = recover.recover_converted(src.model, io, steps=recover_steps,
                                                            **recovery_options(bits, kv_bits))
                k += 1
            ratio = target.perplexity_ratio(src.model, reference, held_out, kv_bits)
            tried.append({"latent": plan.latent, "rope": 2 * (plan.rope_pairs or 0), "perplexity_ratio": round(ratio, 4)})
            met = ratio <= 1 + max_quality_loss
            print(f"      quality check: perplexity {100 * (ratio - 1):+.1f}% over the original on held-out "
                  f"calibration text (target {100 * max_quality_loss:+.0f}%): {'met' if met else 'missed'}")
            if met or last:
                if not met:
                    print(f"      no latent width up to {plan.latent} reached the target; keeping the widest. A GPU "
                          "fine-tune (--finetune-tokens) recovers more")
                mla["quality_target"] = {"max_loss": max_quality_loss, "met": met, "tried": tried,
                                         "check_text": f"last {len(held_out)} x {held_out.shape[1]} tokens of the "
                                                       "built-in Wikipedia calibration split (read by no other step)"}
                break
            src.model = copy.deepcopy(pristine)
        if max_quality_loss is not None:
            if recover_steps:
                del teacher
            del pristine
            mla_dir = save(src.model, src.tokenizer, staging / "mla")
        if finetune_tokens:
            import torch

            from edge_mla.finetune import build_config, finetune
            step(t0, k, n, f"fine-tuning on {finetune_tokens:,} tokens (distilled from the original"
                           f"{', through the 4-bit cache' if kv_bits == 4 else ''})")
            cfg = build_config(finetune_tokens, kv_bits, cuda=torch.cuda.is_available())
            finetune(mla_dir, staging / "mla-ft", cfg, teacher=model)
            shutil.rmtree(mla_dir)
            os.replace(staging / "mla-ft", mla_dir)
            src.model, src.tokenizer = load(mla_dir)
            streamed = False
            k += 1
        step(t0, k, n, f"exporting ONNX ({bits}-bit weights, {kv_bits}-bit latent cache) and GGUF ({weights} "
                       f"weights, {cache} cache)")
        if "onnx" in formats:  # + onnxruntime-genai's files (docs/phones.md)
            onnx_dir = onnx_export.export(str(mla_dir), staging / "onnx", weight_bits=bits, kv_bits=kv_bits,
                                          head_bits=precision.head_bits(bits), model=None if streamed else src.model,
                                          tokenizer=src.tokenizer, genai=True, **calibration.of("onnx"))
        if "gguf" in formats:  # streamed: read back from mla/ a layer at a time
            gguf_file = staging / "model.gguf"
            gguf_export.export(str(mla_dir) if streamed else src, gguf_file, weights=weights, cache_type=cache,
                               **calibration.of("gguf"))
        step(t0, k + 1, n, f"budgeting for {device.name}" + (
            f"; perplexity of the MLA build through llama.cpp and onnxruntime ({quality_windows} x {quality_length} "
            "tokens per text, the same windows as the original's)" if quality_windows else "")
            + ("; their speed" if speed_prompt else ""))
        files = runnable_files({"mla": {"gguf": gguf_file, "onnx": onnx_dir},
                                "original": {"gguf": orig_gguf, "onnx": orig_onnx}})
        if battery:
            battery.score({"mla": files["mla"]})
            quality_rows = battery.rows
        speeds = {}
        speed_prompt = min(speed_prompt, limit - 32)  # a tiny model's context bounds the prompt
        if speed_prompt > 0:
            from edge_mla import speed
            from edge_mla.quality import text_windows
            print(f"      speed of both builds on this machine ({speed_prompt}-token prompt, then 32 tokens)")
            prompt = text_windows(src.tokenizer, "wikipedia-heldout", 1, speed_prompt)[0].tolist()
            speed_rows = speed.measure(files, prompt, kv_type=cache, onnx_cache=precision.ONNX_CACHE_DTYPE[kv_bits],
                                       threads=threads)
            speeds = speed.by_runtime(speed_rows)
        summary, footprints, budgets = assess(model, config, mla, onnx_dir, gguf_file, device, kv_bits, context,
                                              orig_onnx, orig_gguf)
        if quality_windows:
            from edge_mla.quality import ORIGINAL_INT8, agreement, as_dicts, ratios, texts_about
            from edge_mla.verdict import worst_ratio
            summary["quality"] = as_dicts(quality_rows)
            summary["quality_texts"] = texts_about()
            summary["quality_ratio"] = ratios(quality_rows)
            summary["quality_agreement"] = agreement(quality_rows)
            if orig_onnx_int8:
                summary["quality_ratio_vs_original_int8_cache"] = ratios(quality_rows, ORIGINAL_INT8)
            for runtime in ("llama.cpp", "onnxruntime"):
                worst = worst_ratio(summary["quality_ratio"], runtime)
                if worst:
                    summary["key_figures"][f"perplexity MLA / original, worst text ({runtime})"] = (
                        f"{worst[0]:.2f}x ({worst[1]})")
                chat = summary["quality_agreement"].get(f"{runtime}, chat")
                if chat is not None:
                    summary["key_figures"][f"next token as the original's, chat ({runtime})"] = f"{100 * chat:.1f}%"
        summary["bits"], summary["kv_bits"] = bits, kv_bits
        if speeds:
            summary["speed"] = speed.as_dicts(speed_rows)
        summary["runtimes"] = speeds
        from edge_mla import verdict
        thresholds = thresholds or verdict.Thresholds()
        summary["verdict_thresholds"] = asdict(thresholds)
        summary["verdicts"] = verdict.verdicts(footprints, device, verdict.contexts_for(context, limit),
                                               summary.get("quality_ratio", {}), speeds, thresholds)
        summary["recommendation"] = verdict.recommendation(summary["verdicts"])
        summary["mla_pays_from"] = [verdict.pays_from(m, o, device) for m, o in verdict.pairs(footprints)]
        fast_extra = None
        if gguf_file:
            fast = bud.footprint_gguf(gguf_file, verdict.FAST_LLAMA_CACHE)
            priced = next(fp for fp in footprints if fp.kind == "mla" and fp.runtime == "llama.cpp")
            fast_extra = (fast.memory_bytes(context) - priced.memory_bytes(context)) / bud.MB
        summary["run_commands"] = verdict.run_commands(gguf_file.name if gguf_file else None,
                                                       onnx_dir.name if onnx_dir else None, cache, context, fast_extra)
        shutil.rmtree(original, ignore_errors=True)
        summary["plan"] = asdict(plan)
        summary["provenance"] = provenance.record(model, mla=mla, bits=bits, kv_bits=kv_bits,
                                                  calibration=mla["calibration_text"])
        summary["finetune_tokens"] = finetune_tokens
        summary["recovery"] = mla.get("recovery")
        summary["build_seconds"] = round(time.perf_counter() - t0, 1)
        summary["time_budget_seconds"] = time_budget
        summary["one_off_seconds"] = round(budget_start - t0, 1)  # fetching and preparing, outside the budget
        fits = [b for b in budgets if b.fits and not b.model.startswith("original")]
        if not fits:
            raise ValueError(no_fit_message(budgets, device, context))  # a device/context to change: exit 2
        from edge_mla.report import write_reports
        write_reports(staging, summary, footprints, budgets, device, limit)
    print(summary["verdict"])
    for b in budgets:
        print("  " + bud.format_budget(b))
    for v in summary["verdicts"]:
        if v["context"] == context:
            print("  " + v["text"])
    print(summary["recommendation"])
    for pays in summary["mla_pays_from"]:
        print(f"  memory alone, {pays['runtime']}: " + (f"MLA pays from {pays['context']} tokens ({pays['reason']})"
                                                        if pays["context"] else pays["reason"]))
    written = [*(["onnx/"] if "onnx" in formats else []), *(["model.gguf"] if "gguf" in formats else [])]
    print(f"wrote {out}/ (report.html, report.json, {', '.join(written)}, mla/) in {summary['build_seconds']:.0f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB")
    return summary


def convert_layerwise(src, plan: Plan, out: Path, recover_steps: int, bits: int, kv_bits: int, t0: float,
                      n: int, calibration: Calibration = Calibration(), deadline: float | None = None):
    """Calibrate, convert and (with recover_steps) recover the source one layer at a time, then write it to `out`:
    each layer as it is done when the source stays on disk (streamed), the whole model after otherwise. Returns
    (the MLA section, out)."""
    from edge_mla.convert import calibrate_and_convert, describe, save
    from edge_mla.layerwise import FolderWriter

    step(t0, 3, n, f"converting to MLA ({plan.selection} rope head, latent {plan.latent}), layer by layer")
    recovery = teacher = None
    if recover_steps:
        step(t0, 4, n, recovery_step(recover_steps, bits, kv_bits, budgeted=deadline is not None)
             + ", as each layer is converted")
        budget = None if deadline is None else timebudget.StepBudget(deadline, src.model.config.num_hidden_layers)
        recovery = recover.LayerRecovery(steps=recover_steps, budget=budget, **recovery_options(bits, kv_bits))
        teacher = recovery_windows(src.tokenizer, calibration.texts)
    config = src.model.config
    if src.checkpoint is not None:
        out.mkdir()
        writer = FolderWriter(out, src.checkpoint, config.num_hidden_layers)
        mla = calibrate_and_convert(src, plan, written=writer.layer, teacher=teacher, converted=recovery,
                                    **calibration.of("convert"))
    else:
        mla = calibrate_and_convert(src, plan, teacher=teacher, converted=recovery, **calibration.of("convert"))
    if recovery is not None:
        mla["recovery"] = recovery.summary(mla)  # before the config is written: it may add to the MLA section
    if src.checkpoint is not None:
        writer.finish(config, src.tokenizer)
    else:
        save(src.model, src.tokenizer, out)
    print("      " + describe(mla, config))
    return mla, out


def runnable_files(files: dict) -> dict:
    """The files this machine can measure: llama.cpp's only where llama-cpp-python is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("      (llama-cpp-python is not installed: GGUF perplexity and speed skipped; ./install.sh llama adds it)")
        return {model: {"onnx": paths["onnx"]} for model, paths in files.items()}
    return files


def assess(model: str, config, mla: dict, onnx_dir: Path, gguf_file: Path, device: bud.Device, kv_bits: int,
           context: int, orig_onnx: Path, orig_gguf: Path):
    from edge_mla.runtimes.gguf_file import check_gguf, runnable_cache_type

    # --formats may leave one runtime out: its rows are then absent
    mla_onnx = bud.footprint_onnx(onnx_dir) if onnx_dir else None
    mla_gguf = bud.footprint_gguf(gguf_file) if gguf_file else None  # the cache type the file records: the build's
    orig_gguf_fp = orig_onnx_fp = None
    if orig_gguf:
        orig_info = check_gguf(orig_gguf)
        orig_gguf_fp = bud.footprint_gguf(orig_gguf, runnable_cache_type(orig_info, orig_info.cache_type))
    if orig_onnx:
        orig_onnx_fp = bud.footprint_onnx(orig_onnx)
    footprints = [fp for fp in (mla_gguf, mla_onnx) if fp]
    for fp in (orig_gguf_fp, orig_onnx_fp):
        if fp:
            fp.name = "original"
            footprints.append(fp)
    if orig_gguf_fp:  # llama.cpp's usual f16 cache, for scale
        plain = {k: v for k, v in config.to_dict().items() if k != "mla"}
        fp16 = bud.footprint_estimate(type(config).from_dict(plain), 16, 2.0, "llama.cpp")
        footprints.append(bud.Footprint("original, fp16 cache", "llama.cpp", "original", orig_gguf_fp.weights_bytes,
                                        fp16.kv_bytes_per_token, fp16.max_context,
                                        "same weights, llama.cpp's default f16 cache"))
    budgets = [bud.budget(fp, device, context) for fp in footprints]
    best = max((b for b in budgets if not b.model.startswith("original")), key=lambda b: b.max_context)
    orig = max((b for b in budgets if b.model.startswith("original")), key=lambda b: b.max_context)
    verdict = (f"{'Fits' if best.fits else 'Does not fit'}: {model} as MLA on {device.name}, "
               f"{best.memory_mb:.0f} MB at {context} tokens ({best.runtime}); longest context {best.max_context}")
    files = {"onnx": onnx_dir.name if onnx_dir else None, "gguf": gguf_file.name if gguf_file else None}
    key_figures = {}
    if mla_gguf:
        per_token_orig = orig_gguf_fp.kv_bytes_per_token
        key_figures["KV cache per token (GGUF, MLA)"] = (
            f"{mla_gguf.kv_bytes_per_token:.0f} B vs {per_token_orig:.0f} B original "
            f"({100 * mla_gguf.kv_bytes_per_token / per_token_orig:.0f}%)")
    if mla_onnx:
        key_figures["KV cache per token (ONNX, MLA)"] = f"{mla_onnx.kv_bytes_per_token:.0f} B"
    if mla_gguf:
        fp16_orig = fp16.kv_bytes_per_token
        key_figures["KV cache per token, original with its usual fp16 cache"] = (
            f"{fp16_orig:.0f} B ({fp16_orig / mla_gguf.kv_bytes_per_token:.1f}x the MLA GGUF's)")
    weights = {"GGUF": mla_gguf, "ONNX": mla_onnx}
    key_figures[f"weights ({' / '.join(k for k, fp in weights.items() if fp)})"] = " / ".join(
        f"{fp.weights_bytes / bud.MB:.0f} MB" for fp in weights.values() if fp)
    key_figures["longest context that fits (MLA / original)"] = f"{best.max_context} / {orig.max_context}"
    key_figures["decode bound at this context"] = f"{best.decode_tokens_per_s_bound:.0f} tokens/s"
    summary = {
        "model": model, "device": asdict(device), "context": context, "verdict": verdict,
        "mla": mla, "files": {k: v for k, v in files.items() if v},
        "footprints": [asdict(fp) for fp in footprints], "budgets": [b.as_dict() for b in budgets],
        "key_figures": key_figures,
    }
    return summary, footprints, budgets


def no_fit_message(budgets: list[bud.Budget], device: bud.Device, context: int) -> str:
    best = min((b for b in budgets if not b.model.startswith("original")), key=lambda b: b.memory_mb)
    over = best.memory_mb - device.usable_mb
    hint = []
    if best.max_context > 0:
        hint.append(f"a context of {best.max_context} or less fits")
    if best.weights_mb > 0:
        hint.append("fewer bits (--bits 4)")
    hint.append("a device with more memory (`edge-mla devices`)")
    return (f"nothing fits {device.name}: the smallest build needs {best.memory_mb:.0f} MB at context {context}, "
            f"{over:.0f} MB more than the {device.usable_mb:.0f} MB usable. Try {'; or '.join(hint)}")
