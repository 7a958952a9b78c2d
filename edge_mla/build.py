"""`edge-mla build`: source -> convert -> (fine-tune) -> ONNX + GGUF -> budget report, all or nothing."""
from __future__ import annotations

import copy
import os
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_mla import budget as bud
from edge_mla import precision, recover, shape, timebudget, timeplan
from edge_mla.convert import check_saving, named_plan, resolve_plan
from edge_mla.data import spread_windows
from edge_mla.plans import (EXPECTED_COST, RECOVER_LENGTH, RECOVER_LR, RECOVER_STEPS, RECOVER_WINDOWS, Calibration,
                            Plan)
from edge_mla.publish import refuse_existing, staged_folder

# Teacher text for the CPU recovery: 48 x 512 calibration tokens, balanced over the kinds of the calibration mixture
# (or the user's --calib-text files) and spread over each, and up to 600 Adam steps per layer (as many as
# --time-budget buys) at a peak learning rate of 2e-4, under bf16 autocast where the CPU has it
# (recover.native_bf16: 1.25x faster on 2 threads, the same error). Per layer on held-out Wikipedia and news,
# more articles, more steps and 2e-4 rather than 1e-4 all cut the block's error; the first 16 windows (a few
# articles) at 300 steps left it under-fitted, and 4e-4 over-shoots at late layers (docs/recovery.md). Held-out text
# is never used; the quality target's check windows (the split's end) are left out.
# (RECOVER_WINDOWS, RECOVER_LENGTH, RECOVER_STEPS and RECOVER_LR live in plans.py.)
LONG_SPEED_PROMPT = 4  # speed is also measured after a prompt this many times --speed-prompt (speedmodel.py)
QUALITY_WINDOWS, SPEED_PROMPT = 4, 256  # the defaults of --quality-windows and --speed-prompt


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


def finetune_texts(tokenizer, user_texts: tuple[str, ...] = ()) -> list[str]:
    """What the GPU fine-tune trains on: the texts the conversion calibrates on (the user's, or the built-in mixture
    of prose, code, docs and chat), and with the built-in mixture the public-domain books of the fine-tuning corpus
    too (more distinct text for the same steps). Never a battery text (edge_mla.texts)."""
    from edge_mla.data import BOOKS, book_text, calibration_texts

    return calibration_texts(tokenizer, user_texts or None) + ([] if user_texts else [book_text(b) for b in BOOKS])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step(t0: float, i: int, n: int, what: str) -> None:
    """Progress: the step, with the time and peak memory so far (where the time and memory go)."""
    print(f"[{i}/{n}] {what}  ({time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_mb():.0f} MB so far)", flush=True)


@dataclass
class Job:
    """Every decision of a build, made once before any work: what to build, for which device, how."""
    model: str
    device: bud.Device
    bits: int
    kv_bits: int
    out: Path
    context: int
    limit: int  # the model's longest context
    config: object  # the source model's config (transformers), before the conversion
    plan: Plan
    formats: tuple[str, ...]
    calibration: Calibration
    recover_steps: int
    finetune_tokens: int
    quality_windows: int
    quality_length: int
    speed_prompts: tuple[int, ...]  # prompt lengths the speed runs measure after (none: no speed runs)
    max_quality_loss: float | None
    time_budget: float | None
    threads: int | None
    thresholds: object
    t0: float
    steps: int  # progress steps shown
    speed_repeats: int = 2
    time_plan: dict | None = None  # timeplan.Fitted.as_dict: what the budget bought, estimated per part
    marks: dict = field(default_factory=dict)  # progress step -> when it began (what each part took)

    @property
    def weights(self) -> str:  # llama.cpp's names
        return precision.gguf_weight_type(self.bits)

    @property
    def cache(self) -> str:
        return precision.gguf_cache_type(self.kv_bits)

    def step(self, i: int, what: str) -> None:
        self.marks[i] = time.perf_counter()
        step(self.t0, i, self.steps, what)


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


def build(model: str, device_name: str, bits: int, out: str | Path, *, context: int | None = None,
          finetune_tokens: int = 0, plan: Plan | None = None, force: bool = False,
          devices_file: str | None = None, kv_bits: int | None = None, quality_windows: int | None = None,
          quality_length: int = 512, recover_steps: int = RECOVER_STEPS, speed_prompt: int | None = None,
          max_quality_loss: float | None = None, formats: tuple[str, ...] = ("onnx", "gguf"),
          threads: int | None = None, calibration: Calibration = Calibration(),
          time_budget: float | None = None, thresholds=None) -> dict:
    """prepare -> originals -> convert (-> fine-tune) -> export -> measure -> assess -> report, in a staging folder
    published whole at the end (an interrupted build leaves nothing). quality_windows and speed_prompt left None
    are the defaults (QUALITY_WINDOWS, SPEED_PROMPT), which the time budget may shrink; given, they are kept."""
    job, src = decide(model, device_name, bits, out, context, finetune_tokens, plan, force, devices_file, kv_bits,
                      quality_windows, quality_length, recover_steps, speed_prompt, max_quality_loss, formats,
                      threads, calibration, time_budget, thresholds)
    with staged_folder(job.out) as staging:
        battery, budget_start = prepare(job, src)
        originals = export_originals(job, src, staging / ".original", battery)
        if max_quality_loss is None:
            converted = convert_once(job, src, staging / "mla", originals, battery, budget_start)
        else:
            converted = convert_to_target(job, src, staging / "mla")
        if finetune_tokens:
            converted = finetune_converted(job, src, staging, converted)
        exports = export_mla(job, src, staging, converted)
        measured = measure(job, src, exports, originals, battery)
        from edge_mla.assess import summarize
        summary, footprints, budgets = summarize(job, converted, exports, originals, measured)
        summary["build_seconds"] = round(time.perf_counter() - job.t0, 1)
        summary["one_off_seconds"] = round(budget_start - job.t0, 1)  # fetching and preparing, outside the budget
        if job.time_plan:
            summary["time_plan"] = {**job.time_plan, "took_seconds": took(job)}
            summary["key_figures"]["time budget"] = timeplan.bought(job.time_plan, job.time_budget,
                                                                    summary["build_seconds"])
        shutil.rmtree(originals.folder, ignore_errors=True)
        if not any(b.fits for b in budgets if not b.model.startswith("original")):
            from edge_mla.assess import no_fit_message
            raise ValueError(no_fit_message(budgets, job.device, job.context))  # a device/context to change: exit 2
        from edge_mla.report import write_reports
        write_reports(staging, summary, footprints, budgets, job.device, job.limit)
    from edge_mla.assess import print_outcome
    print_outcome(job, summary, budgets)
    return summary


def decide(model, device_name, bits, out, context, finetune_tokens, plan, force, devices_file, kv_bits,
           quality_windows, quality_length, recover_steps, speed_prompt, max_quality_loss, formats, threads,
           calibration, time_budget, thresholds) -> tuple[Job, object]:
    """Validate the request and make every decision (cache bits, device, context, plan), then load the source
    (step 1): what preflight can refuse from a file's header is refused before any tensor is read."""
    from edge_mla import preflight
    from edge_mla.source import load_source

    precision.check_bits(bits)
    if kv_bits is not None:
        precision.check_bits(kv_bits, "--kv-bits")
    calibration.check()
    recover_steps = 0 if finetune_tokens else recover_steps  # the fine-tune recovers more, and on the GPU
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
    t0 = time.perf_counter()
    n = 6 if recover_steps or finetune_tokens else 5
    step(t0, 1, n, f"loading {model}")
    # A folder's weights stay on disk and are read a layer at a time (layerwise.py) by the conversion and by both
    # exporters, except for the quality target's retries, which re-convert a pristine in-memory copy.
    preflight.check_gguf_header(model, formats)  # a GGUF's header and tensor list decide before any de-quantizing
    src = load_source(model, lazy=max_quality_loss is None)
    if max_quality_loss is not None:
        from edge_mla import target
        target.check_calibration(src.tokenizer, *calibration.sizes("convert"))
    config = src.model.config
    limit = int(config.max_position_embeddings)
    context = context or min(limit, 4096)
    if context > limit:
        raise ValueError(f"--context {context} is beyond what {model} allows ({limit}); use {limit} or less")
    plan, given_plan = planned(config, plan, formats, src, finetune_tokens, recover_steps), plan
    prompt = min(SPEED_PROMPT if speed_prompt is None else speed_prompt, limit - 32)
    sizes = timeplan.defaults(QUALITY_WINDOWS if quality_windows is None else quality_windows, quality_length,
                              tuple(sorted({prompt, min(LONG_SPEED_PROMPT * prompt, limit - 32)})) if prompt > 0
                              else (), bool(recover_steps), calibration)
    time_plan = None
    if time_budget and not finetune_tokens and max_quality_loss is None:
        fixed = frozenset(name for name, given in (("calibration", calibration.windows or calibration.length),
                                                   ("quality", quality_windows is not None),
                                                   ("speed", speed_prompt is not None)) if given)
        sizes, time_plan = afford(src, sizes, time_budget, formats, recover_steps, fixed)
        calibration = replace(calibration, planned=sizes.calibration)
        if recover_steps and not sizes.recover:  # the budget buys no recovery here: a training-free width
            recover_steps = 0
            plan = planned(config, given_plan, formats, src, finetune_tokens, recover_steps)
    kv_bits = kv_bits or precision.default_cache_bits(bits, bool(finetune_tokens or recover_steps))
    n = 6 if finetune_tokens or recover_steps else 5
    job = Job(model, device, bits, kv_bits, out, context, limit, copy.deepcopy(config), plan, formats, calibration,
              recover_steps, finetune_tokens, sizes.quality_windows, sizes.quality_length, sizes.speed_prompts,
              max_quality_loss, time_budget, threads, thresholds, t0, n, sizes.speed_repeats, time_plan)
    job.marks[1] = t0  # (printed before the job existed)
    return job, src


def planned(config, plan, formats, src, finetune_tokens: int, recover_steps: int):
    """The conversion plan for how the build recovers (its width follows), checked by every exporter before any
    work (preflight)."""
    from edge_mla import preflight

    plan_name = "finetuned" if finetune_tokens else "recovered" if recover_steps else "training-free"
    plan = named_plan(plan_name, config, plan)
    check_saving(config, plan, EXPECTED_COST[plan_name])
    plan, notes = preflight.check(src.model, plan, formats, originals=True, checkpoint=src.checkpoint)
    for note in notes:
        print("      " + note)
    return plan


def afford(src, wanted, time_budget: float, formats, recover_steps: int, fixed: frozenset):
    """What the time budget affords on this machine (timeplan.py): a probe of the model, then the sizes, said."""
    probe = timeplan.measure(src.model, src.checkpoint)
    fitted = timeplan.fit(time_budget, probe, wanted, formats, timebudget.MLA_SCORING, recover_steps, fixed)
    for line in timeplan.describe(fitted, probe, time_budget, wanted):
        print("      " + line, flush=True)
    return fitted.sizes, fitted.as_dict(probe)


def took(job: Job) -> dict:
    """Seconds each progress step took, by its number (the last ran until now)."""
    marks = sorted(job.marks.items())
    ends = [t for _, t in marks[1:]] + [time.perf_counter()]
    return {str(i): round(end - start, 1) for (i, start), end in zip(marks, ends)}


def prepare(job: Job, src):
    """One-off work first: a machine's first build fetches the model and the texts (calibration and battery) and
    tokenizes them, minutes that later builds skip. The time budget starts after it, so a first build recovers as
    much as any other (the fresh-clone build of 2026-12-06 spent 7.7 min before its recovery and got 50 steps a
    layer instead of ~200). Returns the quality battery (None without --quality-windows) and when the budget starts."""
    budgeted = job.time_budget and job.recover_steps
    if budgeted:  # (without a budget to keep, each step fetches its own when it needs it)
        from edge_mla.data import calibration_windows
        calibration_windows(src.tokenizer, job.calibration.texts or None, count=1,
                            length=job.calibration.sizes("onnx")[1])
    battery = None
    if job.quality_windows:
        from edge_mla.quality import Battery
        battery = Battery(src.tokenizer, kv_type=job.cache, onnx_cache=precision.ONNX_CACHE_DTYPE[job.kv_bits],
                          count=job.quality_windows, length=job.quality_length, threads=job.threads)
    budget_start = time.perf_counter()
    if budgeted and budget_start - job.t0 > 30:
        print(f"      prepared the model and texts in {budget_start - job.t0:.0f} s (fetching them is once per "
              "machine; not counted in --time-budget)")
    return battery, budget_start


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


def convert_once(job: Job, src, folder: Path, originals: Originals, battery, budget_start: float) -> Converted:
    """One pass, layer by layer: calibrate, convert, recover (within the time budget), write."""
    deadline = None
    if job.time_budget and job.recover_steps:
        measured = battery.seconds if battery else {}
        scoring = {runtime: seconds for (model, runtime), seconds in measured.items() if model == "original"}
        deadline = timebudget.recovery_deadline(budget_start, job.time_budget,
                                                timebudget.after_recovery(originals.export_seconds, scoring))
    job.marks[3] = time.perf_counter()  # convert_layerwise prints steps 3 (and 4, the recovery, as it goes)
    mla, mla_dir = convert_layerwise(src, job.plan, folder, job.recover_steps, job.bits, job.kv_bits, job.t0,
                                     job.steps, job.calibration, deadline)
    return Converted(mla, mla_dir, src.checkpoint is not None, 4 + bool(job.recover_steps))


def convert_to_target(job: Job, src, folder: Path) -> Converted:
    """--max-quality-loss: the plan's width first, then wider ones, each converted (and recovered) from a pristine
    in-memory copy, until the held-out check meets the target (target.py)."""
    from edge_mla import target
    from edge_mla.convert import calibrate_and_convert, describe, save
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

    from edge_mla.convert import load
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
                           cache_type=job.cache, **job.calibration.of("gguf"))
    job.step(converted.next_step + 1, f"budgeting for {job.device.name}" + (
        f"; perplexity of the MLA build through llama.cpp and onnxruntime ({job.quality_windows} x "
        f"{job.quality_length} tokens per text, the same windows as the original's)" if job.quality_windows else "")
        + ("; their speed" if job.speed_prompts else ""))
    return exports


def measure(job: Job, src, exports: Exports, originals: Originals, battery) -> Measured:
    """The MLA files on the battery (the originals were scored before the conversion), and the speed of all four
    after two prompt lengths: the line through them gives each file's speed at the contexts the verdict prices."""
    files = runnable_files({"mla": {"gguf": exports.gguf, "onnx": exports.onnx},
                            "original": {"gguf": originals.gguf, "onnx": originals.onnx}})
    measured = Measured()
    if battery:
        battery.score({"mla": files["mla"]})
        measured.quality_rows = battery.rows
    if job.speed_prompts:
        from edge_mla import speed, verdict
        from edge_mla.quality import text_windows
        lengths = list(job.speed_prompts)
        print(f"      speed of both builds on this machine ({' and '.join(map(str, lengths))}-token prompts, "
              "then 32 tokens)")
        prompt = text_windows(src.tokenizer, "wikipedia-heldout", 1, lengths[-1])[0].tolist()
        measured.speed_rows = speed.measure(files, [prompt[:n] for n in lengths], kv_type=job.cache,
                                            onnx_cache=precision.ONNX_CACHE_DTYPE[job.kv_bits], threads=job.threads,
                                            repeats=job.speed_repeats)
        measured.speeds = speed.by_runtime(measured.speed_rows, verdict.contexts_for(job.context, job.limit))
    return measured


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
