"""runsettings.py: the llama.cpp setting printed for each GGUF is the fastest measured one that fits the device."""
import pytest

from edge_mla import budget as bud
from edge_mla import runsettings
from edge_mla.budget import MB, Device, Footprint
from edge_mla.speed import SpeedRow
from edge_mla.verdict import run_commands

KV_PER_TOKEN = {"q4_0": 4320, "f16": 15360}  # the MLA file's cache per token with each type (SmolLM2, C + R = 256)


def row(model, cache, flash, prompt, prefill, decode, priced=False):
    return SpeedRow(model, "llama.cpp", prompt, 32, prefill, decode, 2, cache, flash, priced)


def measured(model="mla"):
    """A quantized cache slow for long prompts, an f16 cache fast with flash attention, slow to decode without."""
    return [row(model, "q4_0", True, 256, 180.0, 70.0, True), row(model, "q4_0", True, 1024, 80.0, 33.0, True),
            row(model, "f16", True, 256, 430.0, 80.0), row(model, "f16", True, 1024, 300.0, 45.0),
            row(model, "f16", False, 256, 390.0, 60.0), row(model, "f16", False, 1024, 280.0, 25.0),
            SpeedRow(model, "onnxruntime", 256, 32, 700.0, 100.0, 2, "int4")]  # another runtime: not a candidate


@pytest.fixture
def footprints(monkeypatch):
    def footprint(path, cache):
        return Footprint(str(path), "llama.cpp", "mla", 100 * MB, KV_PER_TOKEN[cache], 8192)
    monkeypatch.setattr(bud, "footprint_gguf", footprint)


def device(usable_mb):
    return Device("d", "Dev", 2 * usable_mb, usable_mb, 10.0, "cpu", ["llama.cpp"], "test")


def test_the_fastest_setting_on_a_long_prompt_and_reply_is_chosen_where_it_fits(footprints):
    got = runsettings.choose(measured(), {"mla": "model.gguf"}, device(8000), 4096)
    settings = {(s["cache"], s["flash_attention"]): s for s in got["settings"]}
    assert set(settings) == {("q4_0", True), ("f16", True), ("f16", False)} and all(s["fits"] for s in settings.values())
    # the workload's time from the lines through the two prompts, by hand for the f16 cache with flash attention
    prompt, reply = 4096 - 256, 256
    prefill_ms = 1e3 / 430 + (1e3 / 300 - 1e3 / 430) / (1024 - 256) * (prompt - 256)
    at = lambda n: 256 + 16 + (1024 - 256) * n  # noqa: E731 (the decode steps' mean context, 0 and 1)
    slope = (1e3 / 45 - 1e3 / 80) / (at(1) - at(0))
    decode_ms = 1e3 / 80 + slope * (prompt + reply / 2 - at(0))
    assert settings[("f16", True)]["seconds"] == pytest.approx(prompt * prefill_ms / 1e3 + reply * decode_ms / 1e3,
                                                               abs=0.1)
    assert got["chosen"]["mla"]["cache"] == "f16" and got["chosen"]["mla"]["flash_attention"] is True
    assert min(s["seconds"] for s in settings.values()) == got["chosen"]["mla"]["seconds"]
    assert got["workload"] == "a 3840-token prompt, then 256 tokens"


def test_a_device_without_room_for_the_f16_cache_keeps_the_priced_one(footprints):
    # 100 MB of weights; at 4096 tokens the q4_0 cache needs ~17 MB, the f16 one ~60 MB: give room for the first only
    small = device(bud.budget(bud.footprint_gguf("m", "q4_0"), device(1e6), 4096).memory_mb + 5)
    got = runsettings.choose(measured(), {"mla": "model.gguf"}, small, 4096)
    assert got["chosen"]["mla"]["cache"] == "q4_0"
    assert not [s for s in got["settings"] if s["cache"] == "f16" and s["fits"]]


def test_with_one_prompt_measured_the_speeds_are_taken_as_they_are(footprints):
    rows = [r for r in measured() if r.prompt_tokens == 256]
    got = runsettings.choose(rows, {"mla": "model.gguf"}, device(8000), 512)
    assert not any(s["modelled"] for s in got["settings"])
    f16 = next(s for s in got["settings"] if s["cache"] == "f16" and s["flash_attention"])
    assert f16["prefill_tokens_per_s"] == 430.0 and f16["decode_tokens_per_s"] == 80.0


def test_the_report_prints_the_chosen_setting_and_the_priced_one_beside_it(footprints):
    got = runsettings.choose(measured() + measured("original"), {"mla": "model.gguf", "original": "o.gguf"},
                             device(8000), 4096)
    cmds = run_commands("model.gguf", "onnx", "q4_0", 4096, got["chosen"]["mla"])
    assert "-ctk f16 -ctv f16 -fa on" in cmds["llama.cpp"] and "-c 4096" in cmds["llama.cpp"]
    assert cmds["edge-mla (llama.cpp)"].endswith("--kv-type f16 --flash-attn on")
    (label, priced), = [(k, v) for k, v in cmds.items() if "smallest cache" in k]
    assert "-ctk q4_0 -ctv q4_0 -fa on" in priced
    assert runsettings.summary_line(got).endswith("1.00x the time")  # both files measured alike here
    cmds = run_commands("model.gguf", None, "q4_0", 4096, got["chosen"]["mla"],
                        {"model": "smollm2-135m", "bits": 4, "chosen": got["chosen"]["original"]})
    (label, original), = [(k, v) for k, v in cmds.items() if k.startswith("the original")]
    assert original == ("edge-mla export gguf smollm2-135m --bits 4 -o original.gguf && "
                        "llama-cli -m original.gguf -c 4096 -ctk f16 -ctv f16 -fa on")


def test_without_a_measured_choice_the_priced_cache_is_printed():
    cmds = run_commands("model.gguf", None, "q4_0", 4096)
    assert "-ctk q4_0 -ctv q4_0 -fa on" in cmds["llama.cpp"] and not [k for k in cmds if "smallest" in k]
    assert "-fa off" in run_commands("model.gguf", None, "f16", 512)["llama.cpp"]
