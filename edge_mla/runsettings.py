"""Which llama.cpp settings the report prints for each GGUF: the fastest on the build machine at the build's context
among those whose cache fits the device, chosen from the speed runs (speed.measure), not assumed.

llama.cpp's CPU flash attention with a quantized cache converts each cached row to float once per query head, so a
long prompt into the q4_0 cache the budget prices takes minutes (the MLA file: 200 s for 4K tokens, 27 s with an
f16 cache; docs/speed.md). So each GGUF is also run with an f16 cache, and the setting that serves a long prompt
then a reply soonest, where its cache fits the device, is the one printed. The verdict still compares the two models
at the same bits (the priced cache); this says how to run the file a user ships.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# Tried beside the priced cache, per model: (cache type, flash attention), each a run after both prompts (on the
# built-in model 17 s for the MLA file's, 8 s for the original's; the time comes out of the recovery). From
# benchmarks/llamacpp_settings.py at 256 and 4K tokens: q8_0 is never the fastest (at 4K it prefilled 2.2-3.5x
# slower than f16); the MLA file without flash attention decodes 2.6x slower (llama.cpp's absorbed attention then
# materializes every head's scores), while the original without it was the fastest for this workload at both lengths
# (18.5 s against 20.7 at 4K).
SETTINGS = {"mla": (("f16", True),), "original": (("f16", True), ("f16", False))}
REPLY_TOKENS = 256  # the workload: a prompt that fills the context but this many tokens, then a reply of this many


@dataclass
class Setting:
    model: str  # "mla" or "original"
    cache: str
    flash_attention: bool
    prefill_tokens_per_s: float  # at the workload's prompt
    decode_tokens_per_s: float  # over the reply
    seconds: float  # the workload: prompt, then reply
    memory_mb: float  # the file's budget on the device at the context, with this cache
    fits: bool
    modelled: bool  # from the line through two measured prompts (False: one prompt measured, its speed as is)


def _line(points: dict[float, float]):
    from edge_mla import speedmodel

    found = speedmodel.line(points)
    if found is None and points:  # one prompt length measured: its speed, flat
        (_, tokens_per_s), = points.items()
        found = speedmodel.Line(1e3 / tokens_per_s, 0.0)
    return found


def workload(context: int) -> tuple[int, int]:
    """(prompt tokens, reply tokens) the settings are timed on at this context."""
    reply = min(REPLY_TOKENS, context // 2)
    return context - reply, reply


def candidates(rows: list, model: str, gguf: Path, device, context: int) -> list[Setting]:
    """Every llama.cpp setting measured for one model's GGUF (speed rows, priced or not), timed on the workload
    at `context` and budgeted on `device` with its cache."""
    from edge_mla import budget as bud
    from edge_mla import speedmodel

    prompt, reply = workload(context)
    by_setting: dict[tuple, dict] = {}
    for r in rows:
        if r.runtime == "llama.cpp" and r.model == model:
            by_setting.setdefault((r.cache, bool(r.flash_attention)), {})[r.prompt_tokens] = r
    out = []
    for (cache, flash), measured in by_setting.items():
        prefill = _line({n: r.prefill_tokens_per_s for n, r in measured.items()})
        decode = _line({speedmodel.decode_context(n, r.decode_tokens): r.decode_tokens_per_s
                        for n, r in measured.items()})
        p, d = prefill.tokens_per_s(prompt), decode.tokens_per_s(prompt + reply / 2)
        b = bud.budget(bud.footprint_gguf(gguf, cache), device, context)
        out.append(Setting(model, cache, flash, round(p, 1), round(d, 1), round(prompt / p + reply / d, 3),
                           round(b.memory_mb, 1), b.fits, len(measured) > 1))
    return out


def choose(rows: list, ggufs: dict[str, Path], device, context: int) -> dict:
    """report.json's run_settings["llama.cpp"]: every setting measured for each GGUF ({model: path}) and the one
    chosen for each, the fastest on the workload among those that fit (none fits: the smallest cache)."""
    prompt, reply = workload(context)
    settings, chosen = [], {}
    for model, gguf in ggufs.items():
        mine = candidates(rows, model, gguf, device, context)
        if not mine:
            continue
        settings += mine
        fitting = [s for s in mine if s.fits]
        chosen[model] = asdict(min(fitting, key=lambda s: s.seconds) if fitting else
                               min(mine, key=lambda s: s.memory_mb))
    return {"context": context, "workload": f"a {prompt}-token prompt, then {reply} tokens",
            "settings": [asdict(s) for s in settings], "chosen": chosen}


def flags(choice: dict) -> str:
    """llama-cli's flags for a chosen setting (report.json's form)."""
    return f"-ctk {choice['cache']} -ctv {choice['cache']} -fa {'on' if choice['flash_attention'] else 'off'}"


def summary_line(run_settings: dict) -> str | None:
    """The key figure: each file's workload time at its chosen setting, and the ratio."""
    chosen = run_settings.get("chosen", {})
    if not {"mla", "original"} <= set(chosen):
        return None
    m, o = chosen["mla"], chosen["original"]
    ratio = f": {m['seconds'] / o['seconds']:.2f}x the time" if o["seconds"] > 0 else ""
    return f"{m['seconds']:.1f} s MLA ({flags(m)}) / {o['seconds']:.1f} s original ({flags(o)}){ratio}"
