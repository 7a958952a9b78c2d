"""`edge-mla build`: source -> convert -> (fine-tune) -> ONNX + GGUF -> budget report, all or nothing."""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_mla import precision, recover, shape, timebudget, timeplan
from edge_mla.convert import resolve_plan
from edge_mla.job import Job, decide, step, took
from edge_mla.plans import Calibration, Plan, finetune_texts, recovery_options, recovery_step, recovery_windows
from edge_mla.publish import staged_folder


@dataclass
class Originals:
    """The original model exported the same way as the MLA build, to compare against."""
    folder: Path
    onnx: Path | None = None
    onnx_int8: Path | None = None  # its int8 cache, scored for quality only (what a user of onnxruntime keeps)
    gguf: Path | None = None
    export_seconds: float = 0.0  # its same-bits exports: what the MLA exports will take, the time budget's unit


@dataclass
class Converted:
    mla: dict  # the MLA section of the converted model's config, with its recovery and checks
    folder: Path
    streamed: bool  # the weights stay on disk (read a layer at a time), not in src.model
    next_step: int  # the progress step that comes next


@dataclass
class Exports:
    onnx: Path | None = None
    gguf: Path | None = None


@dataclass
class Measured:
    quality_rows: list = field(default_factory=list)
    speed_rows: list = field(default_factory=list)
    speeds: dict = field(default_factory=dict)  # speed.by_runtime


def build(model: str, device_name: str, bits: int, out: str | Path, **options) -> dict:
    """prepare -> originals -> convert (-> fine-tune) -> export -> measure -> assess -> report, in a staging folder
    published whole at the end (an interrupted build leaves nothing). options: job.decide's keywords. Returns
    report.json's content (assess.Summary)."""
    job, src = decide(model, device_name, bits, out, **options)
    with staged_folder(job.out) as staging:
        battery, one_off_seconds = prepare(job, src)
        originals = export_originals(job, src, staging / ".original", battery)
        if job.max_quality_loss is None:
            converted = convert_once(job, src, staging / "mla", originals, battery)
        else:
            converted = convert_to_target(job, src, staging / "mla")
        if job.finetune_tokens:
            converted = finetune_converted(job, src, staging, converted)
        exports = export_mla(job, src, staging, converted)
        measured = measure(job, src, exports, originals, battery)
        from edge_mla.assess import summarize
        summary, footprints, budgets = summarize(job, converted, exports, originals, measured)
        summary.build_seconds = round(time.perf_counter() - job.t0, 1)
        summary.one_off_seconds = round(one_off_seconds, 1)
        if job.time_plan:
            summary.time_plan = {**job.time_plan, "took_seconds": took(job)}
            summary.key_figures["time budget"] = timeplan.bought(job.time_plan, job.time_budget,
                                                                 summary.build_seconds)
        shutil.rmtree(originals.folder, ignore_errors=True)
        if not any(b.fits for b in budgets if not b.model.startswith("original")):
            from edge_mla.assess import no_fit_message
            raise ValueError(no_fit_message(budgets, job.device, job.context))  # a device/context to change: exit 2
        from edge_mla.report import write_reports
        report = summary.as_json()
        write_reports(staging, report, footprints, budgets, job.device, job.limit)
    from edge_mla.assess import print_outcome
    print_outcome(job, summary, budgets)
    return report


def prepare(job: Job, src):
    """One-off work first: a machine's first build fetches the texts (calibration and battery) and tokenizes them,
    which later builds skip. It is inside the time budget (the budget is the command's wall time), so it comes out
    of the recovery, which is measured against its deadline as it goes (56 s, ~10% of a 15-minute build's recovery,
    on the fresh clone of 2026-12-07). Returns the quality battery (None without --quality-windows) and its seconds."""
    t, budgeted = time.perf_counter(), job.time_budget and job.recover_steps
    if budgeted:  # (without a budget to keep, each step fetches its own when it needs it)
        from edge_mla.data import calibration_windows
        calibration_windows(src.tokenizer, job.calibration.texts or None, count=1,
                            length=job.calibration.sizes("onnx")[1])
    battery = None
    if job.quality_windows:
        from edge_mla.quality import Battery
        battery = Battery(src.tokenizer, kv_type=job.cache, onnx_cache=precision.ONNX_CACHE_DTYPE[job.kv_bits],
                          count=job.quality_windows, length=job.quality_length, threads=job.threads)
    seconds = time.perf_counter() - t
    if budgeted and seconds > 30:
        print(f"      fetched and prepared the texts in {seconds:.0f} s (once per machine; inside the "
              "time budget, so this build's recovery gets that much less)")
    return battery, seconds


def export_originals(job: Job, src, folder: Path, battery) -> Originals:
    """The original through the same exporters at the same bits, scored on the battery: the conversion then
    changes the loaded model in place, so the source is read from disk once; and what the originals take tells the
    time budget what the MLA files will."""
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import onnx as onnx_export

    job.step(2, f"exporting the original at the same bits and scoring it, to compare ({job.weights} weights, "
                f"{job.cache} cache)")
    originals, t = Originals(folder), time.perf_counter()
    common = dict(weight_bits=job.bits, original=True, head_bits=precision.head_bits(job.bits), model=src.model,
                  tokenizer=src.tokenizer, checkpoint=src.checkpoint, **job.calibration.of("onnx"))
    if "onnx" in job.formats:
        originals.onnx = onnx_export.export(job.model, folder / "onnx", kv_bits=job.kv_bits, **common)
    originals.export_seconds = time.perf_counter() - t
    if "onnx" in job.formats and job.kv_bits == 4 and job.quality_windows:
        # onnxruntime's int4 cache (static scales) costs the original ~28%: a user there would keep its int8
        # cache, so the report scores that too (quality only; the verdict compares the same bits)
        originals.onnx_int8 = onnx_export.export(job.model, folder / "onnx-int8", kv_bits=8, **common)
    if "gguf" in job.formats:
        t = time.perf_counter()
        originals.gguf = folder / "original.gguf"
        gguf_export.export(src, originals.gguf, weights=job.weights, cache_type=job.cache)
        originals.export_seconds += time.perf_counter() - t
    if battery:
        from edge_mla.quality import ORIGINAL_INT8
        print(f"      perplexity of the original through llama.cpp and onnxruntime ({job.quality_windows} x "
              f"{job.quality_length} tokens per text)")
        battery.score(runnable_files({"original": {"gguf": originals.gguf, "onnx": originals.onnx},
                                      **({ORIGINAL_INT8: {"onnx": originals.onnx_int8}} if originals.onnx_int8
                                         else {})}))
    return originals


def convert_once(job: Job, src, folder: Path, originals: Originals, battery) -> Converted:
    """One pass, layer by layer: calibrate, convert, recover (within the time budget), write."""
    deadline = None
    if job.time_budget and job.recover_steps:
        measured = battery.seconds if battery else {}
        scoring = {runtime: seconds for (model, runtime), seconds in measured.items() if model == "original"}
        share = job.time_plan["speed_share"] if job.time_plan else 1.0
        deadline = timebudget.recovery_deadline(job.t0, job.time_budget,
                                                timebudget.after_recovery(originals.export_seconds, scoring, share))
    job.marks[3] = time.perf_counter()  # convert_layerwise prints steps 3 (and 4, the recovery, as it goes)
    mla, mla_dir = convert_layerwise(src, job.plan, folder, job.recover_steps, job.bits, job.kv_bits, job.t0,
                                     job.steps, job.calibration, deadline)
    return Converted(mla, mla_dir, src.checkpoint is not None, 4 + bool(job.recover_steps))


def convert_to_target(job: Job, src, folder: Path) -> Converted:
    """--max-quality-loss: the plan's width first, then wider ones, each converted (and recovered) from a pristine
    in-memory copy, until the held-out check meets the target (target.py)."""
    from edge_mla import target
    from edge_mla.convert import calibrate_and_convert, describe
    from edge_mla.mla_folder import save
    from edge_mla.eval import perplexity

    config = src.model.config
    if job.recover_steps:  # the original's attention inputs and outputs, before the conversion replaces them
        teacher = recover.collect_attention_io(src.model, recovery_windows(src.tokenizer, job.calibration.texts),
                                               desc="      teacher pass (original attention on calibration text)")
    held_out = target.check_windows(src.tokenizer)
    reference = perplexity(src.model, held_out, desc="quality check")
    attempts = target.widths(job.plan, resolve_plan(config, replace(job.plan, latent=None)).latent,
                             shape.cache_width(config))
    pristine, tried, k = copy.deepcopy(src.model), [], 4  # each wider try converts the original again
    for i, plan in enumerate(attempts):
        last = i == len(attempts) - 1
        job.step(3, f"converting to MLA ({plan.selection} rope head, latent {plan.latent})")
        mla = calibrate_and_convert(src, plan, **job.calibration.of("convert"))
        print("      " + describe(mla, config))
        k = 4
        if job.recover_steps:
            job.step(k, recovery_step(job.recover_steps, job.bits, job.kv_bits))
            io = teacher if last else (list(teacher[0]), list(teacher[1]))  # a wider try needs the teacher again
            mla["recovery"] = recover.recover_converted(src.model, io, steps=job.recover_steps,
                                                        **recovery_options(job.bits, job.kv_bits))
            k += 1
        ratio = target.perplexity_ratio(src.model, reference, held_out, job.kv_bits)
        tried.append({"latent": plan.latent, "rope": 2 * (plan.rope_pairs or 0), "perplexity_ratio": round(ratio, 4)})
        met = ratio <= 1 + job.max_quality_loss
        print(f"      quality check: perplexity {100 * (ratio - 1):+.1f}% over the original on held-out "
              f"calibration text (target {100 * job.max_quality_loss:+.0f}%): {'met' if met else 'missed'}")
        if met or last:
            if not met:
                print(f"      no latent width up to {plan.latent} reached the target; keeping the widest. A GPU "
                      "fine-tune (--finetune-tokens) recovers more")
            mla["quality_target"] = {"max_loss": job.max_quality_loss, "met": met, "tried": tried,
                                     "check_text": f"last {len(held_out)} x {held_out.shape[1]} tokens of the "
                                                   "built-in Wikipedia calibration split (read by no other step)"}
            job.plan = plan
            break
        src.model = copy.deepcopy(pristine)
    del pristine
    return Converted(mla, save(src.model, src.tokenizer, folder), False, k)


def finetune_converted(job: Job, src, staging: Path, converted: Converted) -> Converted:
    """The GPU fine-tune, distilled from the original, on the texts the conversion calibrated on."""
    import torch

    from edge_mla.mla_folder import load
    from edge_mla.finetune import build_config, finetune

    job.step(converted.next_step, f"fine-tuning on {job.finetune_tokens:,} tokens (distilled from the original"
                                  f"{', through the 4-bit cache' if job.kv_bits == 4 else ''})")
    cfg = build_config(job.finetune_tokens, job.kv_bits, cuda=torch.cuda.is_available())
    finetune(converted.folder, staging / "mla-ft", cfg, teacher=job.model,
             texts=finetune_texts(src.tokenizer, job.calibration.texts))
    shutil.rmtree(converted.folder)
    os.replace(staging / "mla-ft", converted.folder)
    src.model, src.tokenizer = load(converted.folder)
    return Converted(converted.mla, converted.folder, False, converted.next_step + 1)


def export_mla(job: Job, src, staging: Path, converted: Converted) -> Exports:
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import onnx as onnx_export

    job.step(converted.next_step, f"exporting ONNX ({job.bits}-bit weights, {job.kv_bits}-bit latent cache) and GGUF "
                                  f"({job.weights} weights, {job.cache} cache)")
    exports = Exports()
    if "onnx" in job.formats:  # + onnxruntime-genai's files (docs/phones.md)
        exports.onnx = onnx_export.export(str(converted.folder), staging / "onnx", weight_bits=job.bits,
                                          kv_bits=job.kv_bits, head_bits=precision.head_bits(job.bits),
                                          model=None if converted.streamed else src.model, tokenizer=src.tokenizer,
                                          genai=True, **job.calibration.of("onnx"))
    if "gguf" in job.formats:  # streamed: read back from mla/ a layer at a time
        exports.gguf = staging / "model.gguf"
        gguf_export.export(str(converted.folder) if converted.streamed else src, exports.gguf, weights=job.weights,
                           cache_type=job.cache, tokenizer=src.tokenizer, **job.calibration.of("gguf"))
    job.step(converted.next_step + 1, f"budgeting for {job.device.name}" + (
        f"; perplexity of the MLA build through llama.cpp and onnxruntime ({job.quality_windows} x "
        f"{job.quality_length} tokens per text, the same windows as the original's)" if job.quality_windows else "")
        + ("; their speed" if job.speed_prompts else ""))
    return exports


def measure(job: Job, src, exports: Exports, originals: Originals, battery) -> Measured:
    """The MLA files on the battery (the originals were scored before the conversion), and the speed of all four
    after two prompt lengths: the line through them gives each file's speed at the contexts the verdict prices; each
    GGUF also with the other llama.cpp settings (runsettings.py), once."""
    files = runnable_files({"mla": {"gguf": exports.gguf, "onnx": exports.onnx},
                            "original": {"gguf": originals.gguf, "onnx": originals.onnx}})
    measured = Measured()
    if battery:
        battery.score({"mla": files["mla"]})
        measured.quality_rows = battery.rows
    if job.speed_prompts:
        from edge_mla import runsettings, speed, speedmodel, verdict
        from edge_mla.quality import text_windows
        lengths = list(job.speed_prompts)
        print(f"      speed of both builds on this machine ({' and '.join(map(str, lengths))}-token prompts, "
              "then 32 tokens)")
        prompt = text_windows(src.tokenizer, "wikipedia-heldout", 1, lengths[-1])[0].tolist()
        measured.speed_rows = speed.measure(files, [prompt[:n] for n in lengths], kv_type=job.cache,
                                            onnx_cache=precision.ONNX_CACHE_DTYPE[job.kv_bits], threads=job.threads,
                                            repeats=job.speed_repeats, llama_settings=runsettings.SETTINGS)
        machine = speedmodel.probe(measured.speed_rows[0].threads) if measured.speed_rows else None
        measured.speeds = speed.by_runtime(measured.speed_rows, verdict.contexts_for(job.context, job.limit), machine)
    return measured


def convert_layerwise(src, plan: Plan, out: Path, recover_steps: int, bits: int, kv_bits: int, t0: float,
                      n: int, calibration: Calibration = Calibration(), deadline: float | None = None):
    """Calibrate, convert and (with recover_steps) recover the source one layer at a time, then write it to `out`:
    each layer as it is done when the source stays on disk (streamed), the whole model after otherwise. Returns
    (the MLA section, out)."""
    from edge_mla.convert import calibrate_and_convert, describe
    from edge_mla.mla_folder import save
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
