"""report.html's sections from hand-made build results: the quality table, the verdict table with the speed at
each context, the speed plot, and report.json as the summary itself."""
from __future__ import annotations

import json
import re

import pytest

from edge_mla import report, speed
from edge_mla.budget import MB, Budget, Device, Footprint
from edge_mla.speed import SpeedRow
from edge_mla.speedmodel import Line

DEVICE = Device("dev", "Dev board", 8000, 7000, 17.0, "4 cores", ["llama.cpp", "onnxruntime"], "test")
DECODE = {"mla": Line(10.0, 0.008), "original": Line(7.0, 0.003)}  # ms per token against the context


def runtimes() -> dict:
    rows = [SpeedRow(model, runtime, prompt, 32, 500.0, round(DECODE[model].tokens_per_s(prompt + 16), 3), 2, "q4_0")
            for model in DECODE for runtime in ("llama.cpp", "onnxruntime") for prompt in (256, 1024)]
    return speed.by_runtime(rows, [512, 4096])


def summary() -> dict:
    from edge_mla.verdict import verdicts

    mla = Footprint("model.gguf", "llama.cpp", "mla", 100 * MB, 3000, 8192)
    original = Footprint("original", "llama.cpp", "original", 90 * MB, 6000, 8192)
    speeds = runtimes()
    quality = [{"model": m, "runtime": "llama.cpp", "text": t, "perplexity": p, "cache": "q4_0", "tokens": 100,
                "top1_agreement": 0.75 if m == "mla" else None}
               for m, t, p in (("mla", "news", 22.0), ("original", "news", 20.0), ("mla", "code", 9.0),
                               ("original", "code", 10.0))]
    rows = verdicts([mla, original], DEVICE, [512, 4096], {"llama.cpp, news": 1.1, "llama.cpp, code": 0.9}, speeds)
    return {"verdict": "a verdict", "model": "m", "context": 4096, "key_figures": {"a": "b"}, "quality": quality,
            "runtimes": speeds, "verdicts": rows, "recommendation": "use the original",
            "verdict_thresholds": {"min_saved_share": 0.1, "max_quality_loss": 0.1, "min_speed": 0.85}}


def test_quality_table_gives_each_text_its_ratio_and_agreement():
    page = report.quality_table(summary()["quality"])
    assert "22.00 (1.10x)" in page and "9.00 (0.90x)" in page and "75% same next token" in page
    assert page.count("<tr>") == 3  # the header, MLA and the original


def test_verdict_table_shows_the_decode_speed_modelled_at_each_context():
    s = summary()
    page = report.verdict_section(s)
    for context in (512, 4096):
        mla, original = (DECODE[m].tokens_per_s(context) for m in ("mla", "original"))
        assert f"{mla:.0f} / {original:.0f} ({mla / original:.2f}x)" in page
    assert "<td>256</td>" in page and "<td>1024</td>" in page  # the measured prompts, in the speed table
    v = next(v for v in s["verdicts"] if v["context"] == 4096)
    assert v["decode_ratio_from"] == "modelled" and "at 4096 tokens (on the build machine, modelled" in v["text"]


def test_verdict_table_gives_the_devices_predicted_speed_where_its_rates_are_known():
    from dataclasses import replace

    from edge_mla.speedmodel import Rates, device_rates, on_machine
    from edge_mla.verdict import verdicts

    machine = Rates(30.0, 100.0)
    rows = [SpeedRow(model, "llama.cpp", prompt, 32, 500.0, round(DECODE[model].tokens_per_s(prompt + 16), 3), 2,
                     "q4_0") for model in DECODE for prompt in (256, 1024)]
    speeds = speed.by_runtime(rows, [4096], machine)
    assert speeds["llama.cpp"]["machine"] == {"bandwidth_gbs": 30.0, "gmacs": 100.0}
    device = replace(DEVICE, gmacs=40.0)
    mla = Footprint("model.gguf", "llama.cpp", "mla", 100 * MB, 3000, 8192)
    original = Footprint("original", "llama.cpp", "original", 90 * MB, 6000, 8192)
    v = verdicts([mla, original], device, [4096], {"llama.cpp, news": 1.05}, speeds)[0]
    lines = {"decode": {m: speedmodel_line(speeds, "decode", m) for m in DECODE},
             "prefill": {m: speedmodel_line(speeds, "prefill", m) for m in DECODE}}
    moved = on_machine(lines, machine, device_rates(device))["decode"]
    want = {m: moved[m].tokens_per_s(4096) for m in DECODE}
    assert v["decode_ratio_from"] == "device"
    page = report.verdict_section({"verdicts": [v], "runtimes": speeds, "recommendation": "r"})
    assert f"{want['mla']:.0f} / {want['original']:.0f} ({want['mla'] / want['original']:.2f}x)" in page
    assert "30 GB/s and 100 GMAC/s measured at the build" in page


def speedmodel_line(speeds: dict, phase: str, model: str):
    from edge_mla.speedmodel import Line
    return Line(**speeds["llama.cpp"]["lines"][phase][model])


def test_speed_plot_draws_each_line_through_its_measured_points():
    page = report.speed_plot(runtimes(), 8192)
    lines = re.findall(r'<polyline points="([^"]+)"', page)
    dots = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', page)
    assert len(lines) == 4 and len(dots) == 8  # 2 models x 2 runtimes; 2 prompts each
    for polyline in lines:
        xy = [tuple(map(float, p.split(","))) for p in polyline.split()]
        assert all(y2 >= y1 for (_, y1), (_, y2) in zip(xy, xy[1:]))  # slower with a longer context (SVG y down)
    curve = [tuple(map(float, p.split(","))) for p in lines[0].split()]
    for cx, cy in dots[:2]:  # the first curve's measured points lie on it
        x, y = min(curve, key=lambda p: abs(p[0] - float(cx)))
        assert abs(x - float(cx)) < 6 and abs(y - float(cy)) < 3
    assert report.speed_plot({"llama.cpp": {"decode_ratio": 0.5}}, 8192) == ""  # one prompt: nothing to draw


def test_report_json_is_the_summary_and_the_page_has_no_missing_numbers(tmp_path):
    s = summary()
    fp = Footprint("model.gguf", "llama.cpp", "mla", 100 * MB, 3000, 8192)
    budget = Budget("dev", "model.gguf", "llama.cpp", 4096, 300.0, 7000.0, True, 8192, 150.0, 100.0, 12.0)
    report.write_reports(tmp_path, s, [fp], [budget], DEVICE, 8192)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(s))
    page = (tmp_path / "report.html").read_text()
    assert "a verdict" in page and "Which to use" in page and "decode tokens/s" in page
    assert "nan" not in page and "None" not in page


def test_summary_speed_figures_are_the_scripted_ones():
    entry = runtimes()["llama.cpp"]
    assert entry["prompt_tokens"] == 256
    assert entry["decode_ratio"] == pytest.approx(DECODE["mla"].tokens_per_s(272) / DECODE["original"].tokens_per_s(272),
                                                  abs=1e-3)
    assert entry["lines"]["decode"]["mla"]["per_token_ms"] == pytest.approx(0.008, rel=1e-3)


def test_report_json_leaves_out_only_the_measurements_a_build_skipped():
    from edge_mla.assess import Summary

    s = Summary("m", {}, 512, "Fits", {"latent_dim": 8}, {"gguf": "model.gguf"}, [], [], {}, 4, 4, {}, {}, 0)
    got = s.as_json()
    assert not set(Summary.MEASURED) & set(got)  # --quality-windows 0 --speed-prompt 0: no quality, no speed
    assert got["recovery"] is None and got["time_budget_seconds"] is None  # the schema's other keys always there
    s.quality_ratio, s.speed = {"llama.cpp, chat": 1.02}, []
    assert s.as_json()["quality_ratio"] == {"llama.cpp, chat": 1.02} and s.as_json()["speed"] == []
    assert json.loads(json.dumps(s.as_json())) == s.as_json()
