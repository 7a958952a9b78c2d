"""The build's decisions, made once before any work: the request checked, the device, context, plan, cache bits and
what the time budget affords, in one Job that every stage reads (build.py)."""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_mla import budget as bud
from edge_mla import precision, timebudget, timeplan
from edge_mla.convert import check_saving, named_plan
from edge_mla.plans import EXPECTED_COST, RECOVER_STEPS, Calibration, Plan
from edge_mla.publish import refuse_existing

LONG_SPEED_PROMPT = 4  # speed is also measured after a prompt this many times --speed-prompt (speedmodel.py)
QUALITY_WINDOWS, SPEED_PROMPT = 4, 256  # the defaults of --quality-windows and --speed-prompt


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


def decide(model: str, device_name: str, bits: int, out: str | Path, *, context: int | None = None,
           finetune_tokens: int = 0, plan: Plan | None = None, force: bool = False, devices_file: str | None = None,
           kv_bits: int | None = None, quality_windows: int | None = None, quality_length: int = 512,
           recover_steps: int = RECOVER_STEPS, speed_prompt: int | None = None,
           max_quality_loss: float | None = None, formats: tuple[str, ...] = ("onnx", "gguf"),
           threads: int | None = None, calibration: Calibration = Calibration(), time_budget: float | None = None,
           thresholds=None) -> tuple[Job, object]:
    """Validate the request and make every decision (cache bits, device, context, plan), then load the source
    (step 1): what preflight can refuse from a file's header is refused before any tensor is read. quality_windows
    and speed_prompt left None are the defaults (QUALITY_WINDOWS, SPEED_PROMPT), which the time budget may shrink;
    given, they are kept."""
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
        sizes, time_plan = afford(src, sizes, time_budget, t0, formats, recover_steps, fixed)
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


def afford(src, wanted, time_budget: float, t0: float, formats, recover_steps: int, fixed: frozenset):
    """What the time budget affords on this machine (timeplan.py): a probe of the model, then the sizes, said. The
    budget counts from the command's start (t0): loading is spent, and the recovery ends MARGIN early."""
    probe = timeplan.measure(src.model, src.checkpoint)
    spent = time.perf_counter() - t0
    fitted = timeplan.fit(time_budget * (1 - timebudget.MARGIN) - spent, probe, wanted, formats,
                          timebudget.MLA_SCORING, recover_steps, fixed)
    fitted.spent = spent
    for line in timeplan.describe(fitted, probe, time_budget, wanted):
        print("      " + line, flush=True)
    return fitted.sizes, fitted.as_dict(probe)


def took(job: Job) -> dict:
    """Seconds each progress step took, by its number (the last ran until now)."""
    marks = sorted(job.marks.items())
    ends = [t for _, t in marks[1:]] + [time.perf_counter()]
    return {str(i): round(end - start, 1) for (i, start), end in zip(marks, ends)}
