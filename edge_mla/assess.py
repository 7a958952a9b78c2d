"""The build's assessment: what the files cost on the device (memory budget), how good and how fast they are beside
the original (measured), which to use (verdict) and the commands that run them; report.json's content."""
from __future__ import annotations

from dataclasses import asdict

from edge_mla import budget as bud
from edge_mla import provenance


def summarize(job, converted, exports, originals, measured) -> tuple[dict, list, list]:
    """report.json's summary, the footprints and the budgets, from the build's stages (build.py's dataclasses)."""
    from edge_mla import speed, verdict

    summary, footprints, budgets = budgets_and_figures(job, converted.mla, exports, originals)
    if measured.quality_rows:
        add_quality(summary, measured.quality_rows, with_int8=originals.onnx_int8 is not None)
    summary["bits"], summary["kv_bits"] = job.bits, job.kv_bits
    if measured.speed_rows:
        summary["speed"] = speed.as_dicts(measured.speed_rows)
    summary["runtimes"] = measured.speeds
    for runtime, entry in measured.speeds.items():
        at = (entry.get("modelled") or {}).get(job.context)
        if at:  # the speed a user of this context gets, from the line through the measured prompts
            summary["key_figures"][f"decode at {job.context} tokens on this machine, MLA / original ({runtime})"] = (
                f"{at['decode']['mla']:.0f} / {at['decode']['original']:.0f} tok/s ({at['decode']['ratio']:.2f}x; "
                f"prompt {at['prefill']['ratio']:.2f}x)")
    thresholds = job.thresholds or verdict.Thresholds()
    summary["verdict_thresholds"] = asdict(thresholds)
    summary["verdicts"] = verdict.verdicts(footprints, job.device, verdict.contexts_for(job.context, job.limit),
                                           summary.get("quality_ratio", {}), measured.speeds, thresholds)
    summary["recommendation"] = verdict.recommendation(summary["verdicts"])
    summary["mla_pays_from"] = [verdict.pays_from(m, o, job.device) for m, o in verdict.pairs(footprints)]
    chosen = original = None
    ggufs = {model: path for model, path in (("mla", exports.gguf), ("original", originals.gguf)) if path}
    if any(r.runtime == "llama.cpp" for r in measured.speed_rows) and ggufs:
        from edge_mla import runsettings
        settings = runsettings.choose(measured.speed_rows, ggufs, job.device, job.context)
        summary["run_settings"] = {"llama.cpp": settings}
        chosen = settings["chosen"].get("mla")
        original = {"model": job.model, "bits": job.bits, "chosen": settings["chosen"].get("original")}
        line = runsettings.summary_line(settings)
        if line:
            summary["key_figures"][f"{settings['workload']} on this machine, llama.cpp at each file's fastest "
                                   "setting that fits"] = line
    summary["run_commands"] = verdict.run_commands(exports.gguf.name if exports.gguf else None,
                                                   exports.onnx.name if exports.onnx else None, job.cache,
                                                   job.context, chosen, original)
    summary["plan"] = asdict(job.plan)
    summary["provenance"] = provenance.record(job.model, mla=converted.mla, bits=job.bits, kv_bits=job.kv_bits,
                                              calibration=converted.mla["calibration_text"])
    summary["finetune_tokens"] = job.finetune_tokens
    summary["recovery"] = converted.mla.get("recovery")
    summary["time_budget_seconds"] = job.time_budget
    return summary, footprints, budgets


def add_quality(summary: dict, rows: list, with_int8: bool) -> None:
    """The battery's perplexities, the MLA / original ratios and the next-token agreement, and the worst text of
    each runtime among the key figures."""
    from edge_mla.quality import ORIGINAL_INT8, agreement, as_dicts, ratios, texts_about
    from edge_mla.verdict import worst_ratio

    summary["quality"] = as_dicts(rows)
    summary["quality_texts"] = texts_about()
    summary["quality_ratio"] = ratios(rows)
    summary["quality_agreement"] = agreement(rows)
    if with_int8:
        summary["quality_ratio_vs_original_int8_cache"] = ratios(rows, ORIGINAL_INT8)
    for runtime in ("llama.cpp", "onnxruntime"):
        worst = worst_ratio(summary["quality_ratio"], runtime)
        if worst:
            summary["key_figures"][f"perplexity MLA / original, worst text ({runtime})"] = f"{worst[0]:.2f}x ({worst[1]})"
        chat = summary["quality_agreement"].get(f"{runtime}, chat")
        if chat is not None:
            summary["key_figures"][f"next token as the original's, chat ({runtime})"] = f"{100 * chat:.1f}%"


def budgets_and_figures(job, mla: dict, exports, originals) -> tuple[dict, list, list]:
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
    key_figures["decode bound at this context"] = f"{best.decode_tokens_per_s_bound:.0f} tokens/s"
    summary = {"model": job.model, "device": asdict(job.device), "context": job.context, "verdict": verdict,
               "mla": mla, "files": {k: v for k, v in files.items() if v},
               "footprints": [asdict(fp) for fp in footprints], "budgets": [b.as_dict() for b in budgets],
               "key_figures": key_figures}
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


def print_outcome(job, summary: dict, budgets: list) -> None:
    from edge_mla.job import peak_rss_mb

    print(summary["verdict"])
    for b in budgets:
        print("  " + bud.format_budget(b))
    for v in summary["verdicts"]:
        if v["context"] == job.context:
            print("  " + v["text"])
    print(summary["recommendation"])
    for pays in summary["mla_pays_from"]:
        print(f"  memory alone, {pays['runtime']}: " + (f"MLA pays from {pays['context']} tokens ({pays['reason']})"
                                                        if pays["context"] else pays["reason"]))
    written = [*(["onnx/"] if "onnx" in job.formats else []), *(["model.gguf"] if "gguf" in job.formats else [])]
    print(f"wrote {job.out}/ (report.html, report.json, {', '.join(written)}, mla/) in {summary['build_seconds']:.0f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB")
