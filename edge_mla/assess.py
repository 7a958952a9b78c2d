"""The build's assessment: what the files cost on the device (memory budget), how good and how fast they are beside
the original (measured), which to use (verdict) and the commands that run them; report.json's content."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edge_mla import budget as bud
from edge_mla import provenance


@dataclass
class Summary:
    """report.json, typed: what the build wrote and measured, the verdict and the commands. The measurements a
    build can skip (MEASURED, left None) are left out of the JSON; every other field is always there (recovery:
    null when the build did not recover)."""
    model: str
    device: dict
    context: int
    verdict: str  # the one-line fit of the MLA build
    mla: dict  # the MLA section of the converted model's config
    files: dict
    footprints: list
    budgets: list
    key_figures: dict
    bits: int
    kv_bits: int
    plan: dict
    provenance: dict
    finetune_tokens: int
    quality: list | None = None  # quality.QualityRow dicts: perplexity of every file on every text
    quality_texts: dict | None = None
    quality_ratio: dict | None = None  # "runtime, text" -> MLA / original at the same bits
    quality_agreement: dict | None = None  # "runtime, text" -> share of next tokens as the original's
    quality_ratio_vs_original_int8_cache: dict | None = None
    speed: list | None = None  # speed.SpeedRow dicts
    runtimes: dict = field(default_factory=dict)  # speed.by_runtime
    verdict_thresholds: dict | None = None
    verdicts: list = field(default_factory=list)
    recommendation: str = ""
    mla_pays_from: list = field(default_factory=list)
    run_settings: dict | None = None  # runsettings.choose, by runtime
    run_commands: dict = field(default_factory=dict)
    recovery: dict | None = None
    time_budget_seconds: float | None = None
    build_seconds: float | None = None
    one_off_seconds: float | None = None  # fetching and preparing the texts (inside the time budget)
    time_plan: dict | None = None

    MEASURED = ("quality", "quality_texts", "quality_ratio", "quality_agreement",
                "quality_ratio_vs_original_int8_cache", "speed", "run_settings", "time_plan")

    def as_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in self.MEASURED}


def summarize(job, converted, exports, originals, measured) -> tuple[Summary, list, list]:
    """report.json's summary, the footprints and the budgets, from the build's stages (build.py's dataclasses)."""
    from edge_mla import speed, verdict

    summary, footprints, budgets = budgets_and_figures(job, converted, exports, originals)
    if measured.quality_rows:
        add_quality(summary, measured.quality_rows, with_int8=originals.onnx_int8 is not None)
    if measured.speed_rows:
        summary.speed = speed.as_dicts(measured.speed_rows)
    summary.runtimes = measured.speeds
    for runtime, entry in measured.speeds.items():
        at = (entry.get("modelled") or {}).get(job.context)
        if at:  # the speed a user of this context gets, from the line through the measured prompts
            summary.key_figures[f"decode at {job.context} tokens on this machine, MLA / original ({runtime})"] = (
                f"{at['decode']['mla']:.0f} / {at['decode']['original']:.0f} tok/s ({at['decode']['ratio']:.2f}x; "
                f"prompt {at['prefill']['ratio']:.2f}x)")
    thresholds = job.thresholds or verdict.Thresholds()
    summary.verdict_thresholds = asdict(thresholds)
    summary.verdicts = verdict.verdicts(footprints, job.device, verdict.contexts_for(job.context, job.limit),
                                        summary.quality_ratio or {}, measured.speeds, thresholds)
    for v in summary.verdicts:
        if v["context"] == job.context and v.get("decode_ratio_from") == "device":
            summary.key_figures[f"decode at {job.context} tokens on {job.device.name}, predicted, MLA / original "
                                f"({v['runtime']})"] = (
                f"{v['decode_tokens_per_s']['mla']:.0f} / {v['decode_tokens_per_s']['original']:.0f} tok/s "
                f"({v['decode_ratio']:.2f}x; prompt {v['prefill_ratio']:.2f}x)")
    summary.recommendation = verdict.recommendation(summary.verdicts)
    summary.mla_pays_from = [verdict.pays_from(m, o, job.device) for m, o in verdict.pairs(footprints)]
    chosen = original = None
    ggufs = {model: path for model, path in (("mla", exports.gguf), ("original", originals.gguf)) if path}
    if any(r.runtime == "llama.cpp" for r in measured.speed_rows) and ggufs:
        from edge_mla import runsettings
        settings = runsettings.choose(measured.speed_rows, ggufs, job.device, job.context)
        summary.run_settings = {"llama.cpp": settings}
        chosen = settings["chosen"].get("mla")
        original = {"model": job.model, "bits": job.bits, "chosen": settings["chosen"].get("original")}
        line = runsettings.summary_line(settings)
        if line:
            summary.key_figures[f"{settings['workload']} on this machine, llama.cpp at each file's fastest "
                                   "setting that fits"] = line
    summary.run_commands = verdict.run_commands(exports.gguf.name if exports.gguf else None,
                                                   exports.onnx.name if exports.onnx else None, job.cache,
                                                   job.context, chosen, original)
    summary.recovery = converted.mla.get("recovery")
    summary.time_budget_seconds = job.time_budget
    return summary, footprints, budgets


def add_quality(summary: Summary, rows: list, with_int8: bool) -> None:
    """The battery's perplexities, the MLA / original ratios and the next-token agreement, and the worst text of
    each runtime among the key figures."""
    from edge_mla.quality import ORIGINAL_INT8, agreement, as_dicts, ratios, texts_about
    from edge_mla.verdict import worst_ratio

    summary.quality = as_dicts(rows)
    summary.quality_texts = texts_about()
    summary.quality_ratio = ratios(rows)
    summary.quality_agreement = agreement(rows)
    if with_int8:
        summary.quality_ratio_vs_original_int8_cache = ratios(rows, ORIGINAL_INT8)
    for runtime in ("llama.cpp", "onnxruntime"):
        worst = worst_ratio(summary.quality_ratio, runtime)
        if worst:
            summary.key_figures[f"perplexity MLA / original, worst text ({runtime})"] = f"{worst[0]:.2f}x ({worst[1]})"
        chat = summary.quality_agreement.get(f"{runtime}, chat")
        if chat is not None:
            summary.key_figures[f"next token as the original's, chat ({runtime})"] = f"{100 * chat:.1f}%"


def budgets_and_figures(job, converted, exports, originals) -> tuple[Summary, list, list]:
    """Each file's footprint (read once from the file) and its budget on the device at the build's context; the
    start of the summary with the key figures."""
    from edge_mla.runtimes.gguf_file import check_gguf, runnable_cache_type

    # --formats may leave one runtime out: its rows are then absent
    mla_onnx = bud.footprint_onnx(exports.onnx) if exports.onnx else None
    mla_gguf = bud.footprint_gguf(exports.gguf) if exports.gguf else None  # the cache type the file records
    orig_gguf_fp = orig_onnx_fp = None
    if originals.gguf:
        orig_info = check_gguf(originals.gguf)
        orig_gguf_fp = bud.footprint_gguf(originals.gguf, runnable_cache_type(orig_info, orig_info.cache_type))
    if originals.onnx:
        orig_onnx_fp = bud.footprint_onnx(originals.onnx)
    footprints = [fp for fp in (mla_gguf, mla_onnx) if fp]
    for fp in (orig_gguf_fp, orig_onnx_fp):
        if fp:
            fp.name = "original"
            footprints.append(fp)
    if orig_gguf_fp:  # llama.cpp's usual f16 cache, for scale
        plain = {k: v for k, v in job.config.to_dict().items() if k != "mla"}
        fp16 = bud.footprint_estimate(type(job.config).from_dict(plain), 16, 2.0, "llama.cpp")
        footprints.append(bud.Footprint("original, fp16 cache", "llama.cpp", "original", orig_gguf_fp.weights_bytes,
                                        fp16.kv_bytes_per_token, fp16.max_context,
                                        "same weights, llama.cpp's default f16 cache"))
    budgets = [bud.budget(fp, job.device, job.context) for fp in footprints]
    best = max((b for b in budgets if not b.model.startswith("original")), key=lambda b: b.max_context)
    orig = max((b for b in budgets if b.model.startswith("original")), key=lambda b: b.max_context)
    verdict = (f"{'Fits' if best.fits else 'Does not fit'}: {job.model} as MLA on {job.device.name}, "
               f"{best.memory_mb:.0f} MB at {job.context} tokens ({best.runtime}); longest context {best.max_context}")
    files = {"onnx": exports.onnx.name if exports.onnx else None, "gguf": exports.gguf.name if exports.gguf else None}
    key_figures = {}
    if mla_gguf:
        per_token_orig = orig_gguf_fp.kv_bytes_per_token
        key_figures["KV cache per token (GGUF, MLA)"] = (
            f"{mla_gguf.kv_bytes_per_token:.0f} B vs {per_token_orig:.0f} B original "
            f"({100 * mla_gguf.kv_bytes_per_token / per_token_orig:.0f}%)")
    if mla_onnx:
        key_figures["KV cache per token (ONNX, MLA)"] = f"{mla_onnx.kv_bytes_per_token:.0f} B"
    if mla_gguf:
        key_figures["KV cache per token, original with its usual fp16 cache"] = (
            f"{fp16.kv_bytes_per_token:.0f} B ({fp16.kv_bytes_per_token / mla_gguf.kv_bytes_per_token:.1f}x the "
            "MLA GGUF's)")
    weights = {"GGUF": mla_gguf, "ONNX": mla_onnx}
    key_figures[f"weights ({' / '.join(k for k, fp in weights.items() if fp)})"] = " / ".join(
        f"{fp.weights_bytes / bud.MB:.0f} MB" for fp in weights.values() if fp)
    key_figures["longest context that fits (MLA / original)"] = f"{best.max_context} / {orig.max_context}"
    mla = converted.mla
    summary = Summary(job.model, asdict(job.device), job.context, verdict, mla, {k: v for k, v in files.items() if v},
                      [asdict(fp) for fp in footprints], [b.as_dict() for b in budgets], key_figures, job.bits,
                      job.kv_bits, asdict(job.plan),
                      provenance.record(job.model, mla=mla, bits=job.bits, kv_bits=job.kv_bits,
                                        calibration=mla["calibration_text"]), job.finetune_tokens)
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


def print_outcome(job, summary: Summary, budgets: list) -> None:
    from edge_mla.job import peak_rss_mb

    print(summary.verdict)
    for b in budgets:
        print("  " + bud.format_budget(b))
    for v in summary.verdicts:
        if v["context"] == job.context:
            print("  " + v["text"])
    print(summary.recommendation)
    for pays in summary.mla_pays_from:
        print(f"  memory alone, {pays['runtime']}: " + (f"MLA pays from {pays['context']} tokens ({pays['reason']})"
                                                        if pays["context"] else pays["reason"]))
    written = [*(["onnx/"] if "onnx" in job.formats else []), *(["model.gguf"] if "gguf" in job.formats else [])]
    print(f"wrote {job.out}/ (report.html, report.json, {', '.join(written)}, mla/) in {summary.build_seconds:.0f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB")
