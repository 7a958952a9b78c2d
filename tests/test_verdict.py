"""The report's verdict: which model a user should pick per runtime and context, from memory, quality and speed."""
from __future__ import annotations

import pytest

from edge_mla.budget import MB, RUNTIME_BASE_BYTES, RUNTIME_BYTES_PER_TOKEN, Device, Footprint
from edge_mla.verdict import Thresholds, contexts_for, recommendation, verdict, verdicts

RUNTIME = "llama.cpp"


def device(usable_mb: float) -> Device:
    return Device("d", "Dev", usable_mb * 2, usable_mb, 10.0, "cpu", [RUNTIME], "test")


def footprint(kind: str, weights_mb: float, kv_per_token: float) -> Footprint:
    return Footprint("original" if kind == "original" else "model.gguf", RUNTIME, kind, int(weights_mb * MB),
                     kv_per_token, 8192)


def memory_mb(fp: Footprint, context: int) -> float:
    return (RUNTIME_BASE_BYTES[RUNTIME] + fp.weights_bytes + context * (fp.kv_bytes_per_token
                                                                      + RUNTIME_BYTES_PER_TOKEN[RUNTIME])) / MB


MLA, ORIGINAL = footprint("mla", 103, 3240), footprint("original", 92, 6480)  # SmolLM2's shape at 4 bits


def test_both_fit_and_mla_is_worse_then_the_original_is_the_choice_but_the_saving_is_stated():
    v = verdict(MLA, ORIGINAL, device(8000), 8192, (1.17, "abc-news"), {"decode_ratio": 0.8})
    saved = memory_mb(ORIGINAL, 8192) - memory_mb(MLA, 8192)
    assert saved > 0 and v["saves_mb"] == round(saved, 1)
    assert v["choice"] == "original" and f"saves only {saved:.0f} MB" in v["text"] and "+17% perplexity" in v["text"]
    assert "0.80x the decode speed" in v["text"]


def test_short_context_mla_needs_more_memory():
    v = verdict(MLA, ORIGINAL, device(8000), 512, (1.17, "abc-news"), None)
    assert v["saves_mb"] < 0 and v["choice"] == "original" and "needs" in v["text"]


def test_only_mla_fits():
    context = 8192
    usable = (memory_mb(MLA, context) + memory_mb(ORIGINAL, context)) / 2
    v = verdict(MLA, ORIGINAL, device(usable), context, (1.17, "abc-news"), None)
    assert v["mla_fits"] and not v["original_fits"] and v["choice"] == "mla" and "only the MLA build fits" in v["text"]
    assert verdict(MLA, ORIGINAL, device(10), context, None, None)["choice"] == "neither"


def test_a_saving_too_small_to_notice_keeps_the_original_whatever_the_quality():
    v = verdict(MLA, ORIGINAL, device(8000), 8192, (1.01, "chat"), {"decode_ratio": 0.95})
    saved = memory_mb(ORIGINAL, 8192) - memory_mb(MLA, 8192)
    assert 0 < v["saves_mb"] < 0.10 * 8000 and v["choice"] == "original" and "saves only" in v["text"]
    assert "from 10%" in v["text"] and v["saved_share_of_device"] == round(saved / 8000, 4)


# A bigger model's cache (10x SmolLM2's a token) and weights of 1 MB: the cache is most of the memory, so MLA's
# halved cache is a saving a device notices.
BIG_CACHE_MLA, BIG_CACHE_ORIGINAL = footprint("mla", 1, 32400), footprint("original", 1, 64800)


def roomy_device(context: int) -> Device:
    """A device both fit on with 5% to spare."""
    return device(1.05 * memory_mb(BIG_CACHE_ORIGINAL, context))


def test_a_noticeable_saving_is_an_mla_win_only_within_the_quality_and_speed_thresholds():
    context = 8192
    dev = roomy_device(context)
    win = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.08, "python-code"), {"decode_ratio": 0.9})
    assert win["mla_fits"] and win["original_fits"] and win["saved_share_of_device"] > 0.10
    assert win["choice"] == "mla" and "% of the" in win["text"] and "python-code" in win["text"]
    worse = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.15, "python-code"), {"decode_ratio": 0.9})
    assert worse["choice"] == "original" and "worst text loses more than 10%" in worse["text"]
    slower = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.05, "chat"), {"decode_ratio": 0.7})
    assert slower["choice"] == "original" and "decodes slower than 0.85x" in slower["text"]
    lenient = Thresholds(max_quality_loss=0.2, min_speed=0.5)
    assert verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.15, "chat"), {"decode_ratio": 0.7},
                   lenient)["choice"] == "mla"
    strict = Thresholds(min_saved_share=0.9)
    assert verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.0, "chat"), None, strict)["choice"] == "original"


def test_the_recommendation_names_where_mla_starts_to_pay():
    rows = verdicts([BIG_CACHE_MLA, BIG_CACHE_ORIGINAL], roomy_device(8192), contexts_for(4096, 8192),
                    {"llama.cpp, wiki": 1.01}, {})
    by_context = {r["context"]: r for r in rows}
    assert sorted(by_context) == [512, 2048, 4096, 8192]
    assert by_context[512]["choice"] == "original" and by_context[8192]["choice"] == "mla"
    first = min(c for c, r in by_context.items() if r["choice"] == "mla")
    assert recommendation(rows).startswith(f"The MLA build is the better choice from {first} tokens")
    assert "original model at the same bits is the better choice" in recommendation(rows[:1])


def test_unmeasured_quality_is_said_not_guessed_and_long_contexts_are_priced():
    long_mla, long_orig = (Footprint(fp.name, fp.runtime, fp.kind, fp.weights_bytes, fp.kv_bytes_per_token, 131072)
                           for fp in (MLA, ORIGINAL))
    assert contexts_for(4096, 131072) == [512, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    assert contexts_for(4096, 8192) == [512, 2048, 4096, 8192]
    usable = (memory_mb(long_mla, 131072) + memory_mb(long_orig, 131072)) / 2
    any_saving = Thresholds(min_saved_share=0.0)  # unmeasured is said wherever MLA saves anything at all
    rows = {r["context"]: r for r in verdicts([long_mla, long_orig], device(usable), contexts_for(4096, 131072), {},
                                              {}, any_saving)}
    assert rows[512]["choice"] == "original"  # MLA needs more memory there: no quality needed to say so
    assert rows[8192]["choice"] == "unmeasured" and "not measured" in rows[8192]["text"]
    assert rows[131072]["choice"] == "mla" and "only the MLA build fits" in rows[131072]["text"]
    assert "quality was not measured" in rows[131072]["text"]
    assert recommendation([rows[512], rows[8192]]).startswith("The MLA build needs less memory from 8192 tokens")
    assert "better choice from 131072" in recommendation(list(rows.values()))


def test_mla_pays_from_the_first_context_that_saves_a_quarter_of_the_memory():
    from edge_mla.verdict import CONTEXT_STEP, pays_from

    big_cache = footprint("original", 92, 64_000)  # a cache that dominates: MLA halves it
    mla = footprint("mla", 103, 32_000)
    got = pays_from(mla, big_cache, device(100_000))
    c = got["context"]
    assert c is not None and c % CONTEXT_STEP == 0 and "25%" in got["reason"]
    saved = lambda n: memory_mb(big_cache, n) - memory_mb(mla, n)  # noqa: E731
    assert saved(c) >= 0.25 * memory_mb(big_cache, c)  # pays here ...
    assert saved(c - CONTEXT_STEP) < 0.25 * memory_mb(big_cache, c - CONTEXT_STEP)  # ... and not one step before
    assert got["mla_mb"] == round(memory_mb(mla, c), 1)


def test_mla_pays_where_only_it_fits_even_below_the_share_and_never_when_it_saves_too_little():
    from edge_mla.verdict import pays_from

    # SmolLM2's shape saves at most ~20% of its memory at any context (the weights dominate): never by share ...
    never = pays_from(MLA, ORIGINAL, device(100_000))
    assert never["context"] is None and "at no context" in never["reason"]
    # ... but on a device the original outgrows first, MLA pays where only it fits
    usable = (memory_mb(MLA, 4096) + memory_mb(ORIGINAL, 4096)) / 2
    got = pays_from(MLA, ORIGINAL, device(usable))
    assert "only the MLA build fits" in got["reason"]
    assert memory_mb(ORIGINAL, got["context"]) > usable >= memory_mb(MLA, got["context"])
    assert memory_mb(ORIGINAL, got["context"] - 256) <= usable


def test_speed_is_judged_at_the_context_priced_where_it_was_modelled():
    context = 8192
    dev = roomy_device(context)
    slow_there = {"decode_ratio": 0.95, "prompt_tokens": 256,
                  "modelled": {context: {"decode": {"mla": 7.0, "original": 10.0, "ratio": 0.7},
                                         "prefill": {"mla": 20.0, "original": 10.0, "ratio": 2.0}}}}
    v = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.05, "chat"), slow_there)
    assert v["choice"] == "original" and "decodes slower than 0.85x" in v["text"]
    assert v["decode_ratio"] == 0.7 and v["decode_ratio_from"] == "modelled" and v["prefill_ratio"] == 2.0
    assert f"0.70x the decode speed at {context} tokens (on the build machine, modelled" in v["text"]
    # a context the model did not price falls back to the ratio measured after the short prompt
    other = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, roomy_device(4096), 4096, (1.05, "chat"), slow_there)
    assert other["decode_ratio"] == 0.95 and other["decode_ratio_from"] == "measured" and other["choice"] == "mla"
    assert "after a 256-token prompt" in other["text"]


def test_speed_is_judged_on_the_device_where_its_rates_and_the_build_machines_are_known():
    from dataclasses import asdict, replace

    from edge_mla.speedmodel import Line, Rates, device_rates, on_machine

    context = 8192
    dev = replace(roomy_device(context), gmacs=20.0)
    lines = {"decode": {"mla": Line(6.0, 0.02), "original": Line(6.2, 0.008)},
             "prefill": {"mla": Line(1.6, 0.01), "original": Line(1.5, 0.004)}}
    machine = Rates(30.0, 100.0)
    speed = {"decode_ratio": 0.95, "prompt_tokens": 256, "machine": asdict(machine),
             "lines": {p: {m: asdict(x) for m, x in by.items()} for p, by in lines.items()},
             "modelled": {context: {"decode": {"mla": 7.0, "original": 10.0, "ratio": 0.7},
                                    "prefill": {"mla": 20.0, "original": 10.0, "ratio": 2.0}}}}
    v = verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.05, "chat"), speed)
    moved = on_machine(lines, machine, device_rates(dev))
    want = moved["decode"]["mla"].tokens_per_s(context) / moved["decode"]["original"].tokens_per_s(context)
    assert v["decode_ratio_from"] == "device" and v["decode_ratio"] == pytest.approx(want, abs=1e-3)
    assert v["decode_tokens_per_s"]["mla"] == pytest.approx(moved["decode"]["mla"].tokens_per_s(context), abs=0.05)
    assert f"on {dev.name}, predicted" in v["text"]
    # without the build machine's rates, the build machine's modelled speed decides, as before
    del speed["machine"]
    assert verdict(BIG_CACHE_MLA, BIG_CACHE_ORIGINAL, dev, context, (1.05, "chat"), speed)["decode_ratio"] == 0.7
