"""The report's answer to the user's question: on this device, at this context, is the MLA build the better choice
than the original model at the same bits? One verdict per runtime and context, from the memory model, the measured
perplexities (quality.py) and the measured speeds (speed.py); and the commands that run each file with the settings
that were priced.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_mla import speedmodel
from edge_mla.budget import MB, Device, Footprint

# Priced up to the model's limit: a big model's cache decides at 32K-128K tokens, not at 4K.
CONTEXTS = (512, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class Thresholds:
    """When both fit, MLA is recommended only if it saves a share of the device's usable memory a user would notice,
    its worst text of the battery is within max_quality_loss of the original's perplexity, and it decodes at
    min_speed of the original's speed or better (the build's flags --verdict-*; docs/verdict.md)."""
    min_saved_share: float = 0.10
    max_quality_loss: float = 0.10
    min_speed: float = 0.85


def contexts_for(context: int, limit: int) -> list[int]:
    return sorted({c for c in CONTEXTS if c <= limit} | {context})


def worst_ratio(quality_ratio: dict, runtime: str) -> tuple[float, str] | None:
    """The largest MLA / original perplexity ratio over the texts measured in `runtime`, and its text."""
    found = [(ratio, key.split(", ", 1)[1]) for key, ratio in quality_ratio.items() if key.startswith(runtime + ",")]
    return max(found) if found else None


def verdict(mla: Footprint, original: Footprint, device: Device, context: int, quality: tuple | None,
            speed: dict | None, thresholds: Thresholds = Thresholds()) -> dict:
    usable = device.usable_mb
    mla_mb, orig_mb = mla.memory_bytes(context) / MB, original.memory_bytes(context) / MB
    saves = orig_mb - mla_mb
    mla_fits, orig_fits = mla_mb <= usable, orig_mb <= usable
    row = {"runtime": mla.runtime, "context": context, "mla_mb": round(mla_mb, 1), "original_mb": round(orig_mb, 1),
           "saves_mb": round(saves, 1), "saved_share_of_device": round(saves / usable, 4) if usable else None,
           "mla_fits": mla_fits, "original_fits": orig_fits}
    costs, misses = [], []
    if quality:
        ratio, text = quality
        row["perplexity_ratio"], row["perplexity_text"] = ratio, text
        costs.append(f"{100 * (ratio - 1):+.0f}% perplexity on its worst text ({text})")
        if ratio > 1 + thresholds.max_quality_loss:
            misses.append(f"its worst text loses more than {100 * thresholds.max_quality_loss:.0f}%")
    # the decode speed at this context: on the device (the build machine's lines scaled to its rates,
    # speedmodel.py), else on the build machine (the lines), else the ratio measured after the short prompt
    on_device = speedmodel.on_device(speed or {}, device, [context]).get(context)
    modelled = on_device or ((speed or {}).get("modelled") or {}).get(context)
    decode = modelled["decode"]["ratio"] if modelled else (speed or {}).get("decode_ratio")
    if decode is not None:
        row["decode_ratio"] = decode
        row["decode_ratio_from"] = "device" if on_device else "modelled" if modelled else "measured"
        if modelled:
            row["decode_tokens_per_s"] = {m: modelled["decode"][m] for m in ("mla", "original")}
            row["prefill_tokens_per_s"] = {m: modelled["prefill"][m] for m in ("mla", "original")}
            row["prefill_ratio"] = modelled["prefill"]["ratio"]
        where = (f"on {device.name}, predicted from the speeds measured on the build machine" if on_device else
                 "on the build machine, modelled from the speeds measured there")
        costs.append(f"{decode:.2f}x the decode speed at {context} tokens ({where})" if modelled else
                     f"{decode:.2f}x the decode speed (measured on the build machine after a "
                     f"{(speed or {}).get('prompt_tokens', 256)}-token prompt)")
        if decode < thresholds.min_speed:
            misses.append(f"it decodes slower than {thresholds.min_speed:.2f}x")
    cost = ", ".join(costs)
    share = f"{saves:.0f} MB, {100 * saves / max(usable, 1e-9):.1f}% of the {usable:.0f} MB usable"
    where = f"at {context} tokens in {mla.runtime}"
    if not mla_fits and not orig_fits:
        row["choice"], text = "neither", f"{where} neither fits {device.name} ({mla_mb:.0f} / {orig_mb:.0f} MB of " \
                                         f"{usable:.0f} MB usable)"
    elif mla_fits and not orig_fits:
        row["choice"], text = "mla", f"{where} only the MLA build fits: {mla_mb:.0f} MB against {orig_mb:.0f} MB " \
                                     f"({usable:.0f} MB usable)" + (f"; it costs {cost}" if cost else "") \
                                     + ("" if quality else "; its quality was not measured")
    elif orig_fits and not mla_fits:
        row["choice"], text = "original", f"{where} only the original fits ({orig_mb:.0f} MB against {mla_mb:.0f} MB)"
    elif saves <= 0:
        row["choice"], text = "original", f"{where} the original is the better choice: it needs {-saves:.0f} MB " \
                                          f"less" + (f", and MLA would cost {cost}" if cost else "")
    elif saves / max(usable, 1e-9) < thresholds.min_saved_share:
        row["choice"] = "original"
        text = (f"{where} both fit and MLA saves only {share} (a saving is worth it from "
                f"{100 * thresholds.min_saved_share:.0f}%): the original is the better choice" +
                (f"; MLA would cost {cost}" if cost else ""))
    elif not quality:  # not measured in this runtime: memory alone cannot say which model is better
        row["choice"] = "unmeasured"
        text = (f"{where} both fit; MLA saves {share}, but its quality was not measured in {mla.runtime}: compare "
                "the two builds' perplexity before choosing" + (f"; {cost}" if cost else ""))
    elif misses:
        row["choice"] = "original"
        text = (f"{where} both fit; MLA saves {share} but {' and '.join(misses)} ({cost}): the original is the "
                "better choice unless that memory is needed elsewhere")
    else:
        row["choice"], text = "mla", f"{where} MLA saves {share} at {cost}"
    row["text"] = text
    return row


def pairs(footprints: list[Footprint]) -> list[tuple[Footprint, Footprint]]:
    """(MLA file, the original exported the same way) per runtime."""
    return [(mla, next(fp for fp in footprints if fp.kind == "original" and fp.runtime == mla.runtime
                       and fp.name == "original")) for mla in footprints if mla.kind == "mla"]


def verdicts(footprints: list[Footprint], device: Device, contexts: list[int], quality_ratio: dict,
             speeds: dict, thresholds: Thresholds = Thresholds()) -> list[dict]:
    """One verdict per runtime (the MLA file against the original exported the same way) and context."""
    rows = []
    for mla, original in pairs(footprints):
        for context in contexts:
            if context <= min(mla.max_context or context, original.max_context or context):
                rows.append(verdict(mla, original, device, context, worst_ratio(quality_ratio, mla.runtime),
                                    speeds.get(mla.runtime), thresholds))
    return rows


def recommendation(rows: list[dict]) -> str:
    """One sentence over every runtime and context: where (if anywhere) the MLA build is the better choice."""
    wins = [r for r in rows if r["choice"] == "mla"]
    open_rows = [r for r in rows if r["choice"] == "unmeasured"]
    if not wins and open_rows:
        first = min(open_rows, key=lambda r: r["context"])
        return (f"The MLA build needs less memory from {first['context']} tokens in {first['runtime']}, but its "
                "quality was not measured there (--quality-windows 0, or the runtime is not installed): measure "
                "both builds' perplexity before choosing.")
    if not wins:
        return ("On this device the original model at the same bits is the better choice at every context priced: "
                "where both fit, the MLA build saves too little of the device's memory for what it costs (or costs too "
                "much); it pays where memory is short (longer contexts, smaller devices, larger models).")
    first = min(wins, key=lambda r: r["context"])
    return f"The MLA build is the better choice from {first['context']} tokens in {first['runtime']}: {first['text']}."


# Memory alone: from which context the MLA file saves at least this share of the original's memory (docs/verdict.md)
PAYS_SHARE = 0.25
CONTEXT_STEP = 256


def pays_from(mla: Footprint, original: Footprint, device: Device, share: float = PAYS_SHARE) -> dict:
    """The smallest context (a multiple of CONTEXT_STEP, up to the files' limit) at which the MLA file fits the
    device and needs at least `share` less memory than the original, or is the only one of the two that fits;
    memory only (quality and speed: verdict()). {"context": None} where neither happens."""
    limit = min(mla.max_context or 1 << 20, original.max_context or 1 << 20)
    usable = device.usable_mb * MB
    found = []
    # saves(c) >= share * original(c) is linear in c: solved, then rounded up to the step
    at_zero = original.memory_bytes(0) - mla.memory_bytes(0)
    per_token = (original.memory_bytes(1) - original.memory_bytes(0)) - (mla.memory_bytes(1) - mla.memory_bytes(0))
    original_per_token = original.memory_bytes(1) - original.memory_bytes(0)
    slope, need = per_token - share * original_per_token, share * original.memory_bytes(0) - at_zero
    if need <= 0 or slope > 0:
        context = CONTEXT_STEP if need <= 0 else -(-int(need / slope) // CONTEXT_STEP) * CONTEXT_STEP
        if context <= limit and mla.memory_bytes(context) <= usable:
            found.append((context, f"saves {share:.0%} or more of the original's memory"))
    context = CONTEXT_STEP  # the first step at which the original no longer fits and MLA still does
    while context <= limit and original.memory_bytes(context) <= usable:
        context += CONTEXT_STEP
    if context <= limit and mla.memory_bytes(context) <= usable:
        found.append((context, f"only the MLA build fits {device.name}"))
    if not found:
        return {"runtime": mla.runtime, "context": None, "share": share,
                "reason": f"at no context up to {limit} that it fits does it save {share:.0%} or fit where the "
                          "original does not"}
    context, reason = min(found)
    return {"runtime": mla.runtime, "context": context, "share": share, "reason": reason,
            "mla_mb": round(mla.memory_bytes(context) / MB, 1),
            "original_mb": round(original.memory_bytes(context) / MB, 1)}


def run_commands(gguf_name: str | None, onnx_name: str | None, cache_type: str, context: int,
                 chosen: dict | None = None, original: dict | None = None) -> dict:
    """The commands that run each file the build wrote: llama.cpp with the setting chosen by measurement
    (runsettings.choose's choice for the MLA file; without one, the priced cache), and the priced cache's command
    beside it where that differs: the smallest cache, slower for long prompts. original ({"model", "bits",
    "chosen"}): how to get and run the original at its own fastest setting (the build does not keep it)."""
    from edge_mla.precision import default_flash_attention
    from edge_mla.runsettings import flags

    commands = {}
    if gguf_name:
        priced = {"cache": cache_type, "flash_attention": default_flash_attention(cache_type)}
        use = chosen or priced
        llama, flash = f"-m {gguf_name} -c {context} {flags(use)}", "on" if use["flash_attention"] else "off"
        commands.update({"llama.cpp": f"llama-cli {llama}", "llama.cpp server": f"llama-server {llama}",
                         "edge-mla (llama.cpp)": f"edge-mla run {gguf_name} --context {context} "
                                                 f"--kv-type {use['cache']} --flash-attn {flash}"})
        if (use["cache"], use["flash_attention"]) != (priced["cache"], priced["flash_attention"]):
            commands[f"llama.cpp, smallest cache ({cache_type}, as the budget prices it; slower for long prompts)"] = (
                f"llama-cli -m {gguf_name} -c {context} {flags(priced)}")
    if onnx_name:
        commands["edge-mla (onnxruntime)"] = f"edge-mla run {onnx_name} --context {context}"
    if original and original.get("chosen"):
        commands["the original at the same bits (llama.cpp, its fastest setting that fits; the build does not keep "
                 "it)"] = (f"edge-mla export gguf {original['model']} --bits {original['bits']} -o original.gguf && "
                           f"llama-cli -m original.gguf -c {context} {flags(original['chosen'])}")
    return commands
