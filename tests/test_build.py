"""`edge-mla build` end to end on a tiny model: every promised file exists and loads in its runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_mla import cli, timeplan
from edge_mla.runtimes.gguf_file import check_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="the llama extra (llama-cpp-python) is not installed")

pytestmark = pytest.mark.usefixtures("llama_cpp_runs")


@pytest.mark.slow
def test_build_writes_every_promised_file_and_they_load(tmp_path, tiny_source, capsys):
    out = tmp_path / "build"
    threads = torch.get_num_threads()
    code = cli.main(["build", "--model", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4",
                     "--context", "256", "--out", str(out), "--recover-steps", "0", "--speed-prompt", "0",
                     "--threads", "1"])  # training-free
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert torch.get_num_threads() == threads  # --threads holds for the build only
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["bits"] == 4 and report["context"] == 256 and report["device"]["key"] == "rpi-zero-2w"
    assert report["kv_bits"] == 8  # no fine-tune: the cache keeps 8 bits by default
    assert {b["runtime"] for b in report["budgets"]} == {"llama.cpp", "onnxruntime"}
    assert all(b["fits"] for b in report["budgets"] if not b["model"].startswith("original"))
    html = (out / "report.html").read_text()
    assert "<svg" in html and "polyline" in html and "usable" in html
    assert (out / "mla" / "config.json").exists()

    # ONNX: loads in onnxruntime and decodes
    from edge_mla.runtimes.onnxruntime import OnnxDecoder
    dec = OnnxDecoder(out / "onnx", threads=1, context=32)
    logits = dec.forward(np.array([[5, 6, 7, 8]], dtype=np.int64))
    assert np.isfinite(logits).all()
    assert (out / "onnx" / "genai_config.json").exists() and (out / "onnx" / "genai.onnx").exists()  # phones.md

    # GGUF: loads in llama.cpp with its 4-bit cache and generates
    from edge_mla.runtimes import llamacpp
    model = llamacpp.open_model(out / "model.gguf", n_ctx=64, threads=1, kv_type="q8_0")
    tokens, _ = llamacpp.greedy(model, [5, 6, 7, 8], 4)
    assert len(tokens) == 4
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.slow
def test_a_budget_too_short_for_any_recovery_builds_at_the_least_and_says_so(tmp_path, tiny_source, capsys):
    """--time-budget 1s: the probe prices even the floors over it, so the build reads the least text, recovers
    nothing (a training-free width, its 8-bit cache), says so at its start, and reports the plan beside what each
    step took."""
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--context", "256",
                     "--out", str(out), "--time-budget", "1s", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "no recovery" in captured.out and "runs at the least" in captured.out
    report = json.loads((out / "report.json").read_text())
    plan = report["time_plan"]
    assert plan["sizes"]["recover"] is False and plan["recover_steps_planned"] == 0
    assert report["recovery"] is None and report["kv_bits"] == 8 and "[5/5]" in captured.out
    assert plan["sizes"]["calibration"] == [[step, *floor] for step, floor in timeplan.FLOORS.items()]
    assert {r["tokens"] for r in report["quality"]} == {timeplan.QUALITY_FLOOR[1] - 1}  # one window per text
    assert plan["sizes"]["speed_prompts"] == [256] and {r["prompt_tokens"] for r in report["speed"]} == {256}
    assert set(plan["took_seconds"]) == {"1", "2", "3", "4", "5"} and plan["estimate_total_seconds"] > 1
    assert "time budget" in report["key_figures"]


@pytest.mark.slow
def test_build_that_cannot_fit_writes_nothing(tmp_path, tiny_source, capsys):
    devices = tmp_path / "tiny.toml"
    devices.write_text('[speck]\nname = "Speck"\nram_mb = 1.5\nusable_mb = 1.0\nbandwidth_gbs = 1.0\ncpu = "none"\n'
                       'runtimes = ["llama.cpp"]\nsource = "a made-up device for this test, far too small"\n')
    out = tmp_path / "build"
    code = cli.main(["build", "--model", str(tiny_source), "--device", "speck", "--devices", str(devices),
                     "--context", "256", "--out", str(out), "--recover-steps", "5", "--quality-windows", "0",
                     "--speed-prompt", "0", "--threads", "1"])  # the refusal, not the measurements
    err = capsys.readouterr().err
    assert code == 2 and "nothing fits Speck" in err and "MB more than" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_threads_must_be_positive(tmp_path, tiny_source, capsys):
    code = cli.main(["build", "--model", str(tiny_source), "--device", "rpi5", "--threads", "0",
                     "--out", str(tmp_path / "b")])
    assert code == 2 and "--threads 0" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_calibration_flags_reach_every_step_that_reads_text(tmp_path, tiny_source, capsys, monkeypatch):
    from edge_mla import data

    calls = []
    real = data.calibration_windows
    monkeypatch.setattr(data, "calibration_windows",
                        lambda tok, text=None, *, count, length: calls.append((count, length)) or real(
                            tok, text, count=count, length=length))
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--kv-bits", "4",
                     "--context", "256", "-o", str(out), "--recover-steps", "0", "--quality-windows", "0",
                     "--speed-prompt", "0", "--threads", "1", "--calib-windows", "2", "--calib-length", "48"])
    assert code == 0, capsys.readouterr().err[-3000:]
    # the conversion, both ONNX exports' int4 cache scales and the MLA GGUF's latent check: each read 2 x 48
    assert len(calls) == 4 and set(calls) == {(2, 48)}
    report = json.loads((out / "report.json").read_text())
    assert report["mla"]["calibration_tokens"] == 96
    # no perplexity runs: where MLA needs less memory the verdict says quality was not measured, and the page too
    for v in report["verdicts"]:
        if v["mla_fits"] and v["original_fits"] and v["saves_mb"] > 0:
            assert v["choice"] == "unmeasured" and "not measured" in v["text"]
    assert "nan" not in (out / "report.html").read_text()
    calls.clear()
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--kv-bits", "4",
                     "--context", "256", "-o", str(tmp_path / "b1"), "--recover-steps", "0", "--quality-windows",
                     "0", "--speed-prompt", "0", "--threads", "1", "--calib-length", "40"])
    assert code == 0, capsys.readouterr().err[-3000:]
    # each step keeps its own windows: conversion 16, the two ONNX exports 8, the GGUF latent check 4
    assert sorted(calls) == [(4, 40), (8, 40), (8, 40), (16, 40)]
    calls.clear()
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--kv-bits", "4",
                     "--context", "256", "-o", str(tmp_path / "b2"), "--recover-steps", "0", "--quality-windows",
                     "0", "--speed-prompt", "0", "--threads", "1", "--calib-windows", "3", "--formats", "gguf"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert calls == [(3, 1024), (3, 512)]  # a length not given stays each step's own
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi5", "--calib-length", "0",
                     "-o", str(tmp_path / "b3")])
    assert code == 2 and "--calib-length 0" in capsys.readouterr().err and not (tmp_path / "b3").exists()
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi5", "--max-quality-loss", "10%",
                     "--calib-windows", "10000000", "-o", str(tmp_path / "b4")])
    assert code == 2 and "would read them" in capsys.readouterr().err and not (tmp_path / "b4").exists()
    code = cli.main(["convert", "-m", str(tiny_source), "--calib-length", "0", "-o", str(tmp_path / "c")])
    assert code == 2 and "give --calib-windows and --calib-length of 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_calib_text_reaches_every_step_that_reads_text_and_the_report_names_it(tmp_path, tiny_source, capsys,
                                                                               monkeypatch):
    """--calib-text FILE...: the conversion, the recovery's teacher, both ONNX cache scales and the GGUF latent
    check all read the user's files (each a kind of its own), never the built-in mixture."""
    from edge_mla import data, texts
    from conftest import corpus

    files = []
    for i in range(2):
        files.append(tmp_path / f"domain{i}.txt")
        files[-1].write_text(corpus(4000, seed=10 + i))
    files.append(tmp_path / "chats.jsonl")
    files[-1].write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": corpus(40, seed=j)},
                                                            {"role": "assistant", "content": corpus(80, seed=j)}]})
                                   for j in range(40)))
    monkeypatch.setattr(texts, "fit_texts", lambda tok: pytest.fail("the built-in mixture was read"))
    read = []
    real = data.spread_windows
    recording = lambda tok, text=None, **kw: read.append(text) or real(tok, text, **kw)  # noqa: E731
    monkeypatch.setattr(data, "spread_windows", recording)
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--kv-bits", "4",
                     "--context", "256", "-o", str(out), "--recover-steps", "2", "--quality-windows", "0",
                     "--speed-prompt", "0", "--threads", "1", "--calib-length", "48", "--calib-text", *map(str, files)])
    assert code == 0, capsys.readouterr().err[-3000:]
    # conversion, recovery teacher, two ONNX cache scales, GGUF latent check (absent with a learned latent norm)
    assert len(read) >= 4 and all(tuple(text) == tuple(map(str, files)) for text in read), read
    report = json.loads((out / "report.json").read_text())
    assert report["mla"]["calibration_text"] == ", ".join(map(str, files))
    assert report["provenance"]["calibration"] == ", ".join(map(str, files))
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi5", "--calib-text", str(tmp_path / "none.txt"),
                     "-o", str(tmp_path / "b")])
    assert code == 2 and "--calib-text" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_context_beyond_model_limit(tmp_path, tiny_source, capsys):
    code = cli.main(["build", "--model", str(tiny_source), "--device", "rpi5", "--context", "100000",
                     "--out", str(tmp_path / "b")])
    assert code == 2 and "beyond what" in capsys.readouterr().err


@pytest.mark.slow
def test_build_reads_the_source_once_and_run_uses_the_priced_cache(tmp_path, tiny_source, capsys, monkeypatch):
    from edge_mla import source

    loads = []
    real = source._load_folder
    monkeypatch.setattr(source, "_load_folder", lambda folder, lazy=False: loads.append(folder) or real(folder, lazy))
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "8", "--context", "256",
                     "-o", str(out), "--quality-windows", "1", "--quality-length", "64"])
    assert code == 0, capsys.readouterr().err
    assert len(loads) == 1  # one read of the source; both exporters and the baseline get the loaded objects
    report = json.loads((out / "report.json").read_text())
    priced = [f for f in report["footprints"] if f["runtime"] == "llama.cpp" and f["kind"] == "mla"][0]
    assert "cache q8_0" in priced["detail"]
    capsys.readouterr()
    assert cli.main(["run", str(out / "model.gguf"), "-n", "2", "--threads", "1"]) == 0
    assert "KV cache q8_0" in capsys.readouterr().err  # the cache type report.json priced
    assert report["provenance"]["source"] == str(tiny_source) and report["provenance"]["versions"]["torch"]
    # perplexity of both builds through both runtimes on every text of the battery, side by side
    from edge_mla.texts import BATTERY

    rows = {(r["model"], r["runtime"], r["text"]): r for r in report["quality"]}
    assert len(rows) == 2 * 2 * len(BATTERY) and all(r["perplexity"] > 1 and r["tokens"] == 63 for r in rows.values())
    assert rows[("mla", "llama.cpp", "abc-news")]["cache"] == "q8_0"
    pairs = {f"{runtime}, {text}" for runtime in ("llama.cpp", "onnxruntime") for text in BATTERY}
    assert set(report["quality_ratio"]) == pairs and set(report["quality_agreement"]) == pairs
    assert all(0 <= a <= 1 for a in report["quality_agreement"].values())
    assert set(report["quality_texts"]) == set(BATTERY)
    assert "Quality: held-out perplexity" in (out / "report.html").read_text()
    # speed of both builds in both runtimes, measured side by side, and a verdict per runtime and context
    assert {(r["model"], r["runtime"]) for r in report["speed"]} == {(m, r) for m in ("mla", "original")
                                                                    for r in ("llama.cpp", "onnxruntime")}
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in report["speed"])
    for runtime in ("llama.cpp", "onnxruntime"):
        speeds = report["runtimes"][runtime]
        assert speeds["decode_ratio"] == pytest.approx(
            speeds["decode_tokens_per_s"]["mla"] / speeds["decode_tokens_per_s"]["original"], rel=1e-2)
    verdicts = {(v["runtime"], v["context"]): v for v in report["verdicts"]}
    assert {c for _, c in verdicts} >= {256} and {r for r, _ in verdicts} == {"llama.cpp", "onnxruntime"}
    assert all(v["choice"] in ("mla", "original", "neither") and v["text"] for v in verdicts.values())  # measured
    assert report["recommendation"]
    # llama.cpp's settings: each file's priced cache (q8_0; the tiny original's head of 16 takes f16, without flash
    # attention) and f16 with flash attention (and, for the original, without), each timed on a long prompt and a
    # reply; the one printed is the fastest that fits
    settings = report["run_settings"]["llama.cpp"]
    tried = lambda model: {(s["cache"], s["flash_attention"]) for s in settings["settings"] if s["model"] == model}  # noqa: E731
    assert tried("mla") == {("q8_0", True), ("f16", True)} and tried("original") == {("f16", False), ("f16", True)}
    chosen = settings["chosen"]["mla"]
    assert chosen["seconds"] == min(s["seconds"] for s in settings["settings"] if s["model"] == "mla" and s["fits"])
    assert f"-ctk {chosen['cache']} -ctv {chosen['cache']}" in report["run_commands"]["llama.cpp"]
    assert "Which to use" in (out / "report.html").read_text()


@pytest.mark.slow
def test_default_build_recovers_on_the_cpu_and_ships_a_4_bit_cache(tmp_path, tiny_source, capsys):
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--context", "256", "-o", str(out),
                     "--recover-steps", "20", "--quality-windows", "1", "--quality-length", "64", "--speed-prompt", "0",
                     "--max-quality-loss", "1000%", "--latent", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "[4/6] recovering on the CPU" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["bits"] == 4 and report["kv_bits"] == 4  # --bits 4 means a 4-bit cache too
    recovery = report["recovery"]
    assert recovery["steps_per_layer"] == 20 and recovery["relative_mse_after"] < recovery["relative_mse_before"]
    # trained through the 4-bit weights it ships, with a learned latent norm: the GGUF's kv_a is 4-bit too
    assert "4-bit" in recovery["trained_through"] and recovery["latent_norm"]
    assert check_gguf(out / "model.gguf").tensor_types["blk.0.attn_kv_a_mqa.weight"].name == "Q4_0"
    assert llama_cpp_gguf_cache(out / "model.gguf") == "q4_0"
    assert json.loads((out / "onnx" / "edge_mla_onnx.json").read_text())["cache"]["dtype"] == "int4"
    # the quality target was checked on held-out calibration text and met at the first width
    checked = report["mla"]["quality_target"]
    assert checked["met"] and checked["max_loss"] == 10 and len(checked["tried"]) == 1
    assert "quality check: perplexity" in captured.out
    # the ratio recorded is the shipped model's (4-bit cache) over the original's on the check windows
    from edge_mla import target
    from edge_mla.mla_folder import load
    from edge_mla.eval import perplexity
    from edge_mla.source import load_source

    original = load_source(str(tiny_source))
    held_out = target.check_windows(original.tokenizer)
    shipped, _ = load(out / "mla")
    ratio = target.perplexity_ratio(shipped, perplexity(original.model, held_out), held_out, 4)
    assert checked["tried"][0]["perplexity_ratio"] == pytest.approx(ratio, rel=1e-3)


def llama_cpp_gguf_cache(path) -> str:
    return check_gguf(path).cache_type
