"""Perplexity through the runtimes: the runtime's numbers are the model's own (an fp32 ONNX export scores what
PyTorch scores), and the arithmetic is the usual cross-entropy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB
from edge_mla import quality
from conftest import converted, export


def test_nll_sum_is_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 50)).astype(np.float32) * 4
    ids = rng.integers(0, 50, 20)
    expected = F.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]), reduction="sum")
    assert math.isclose(quality._nll_sum(logits, ids), float(expected), rel_tol=1e-6)  # float32 arithmetic


def test_onnx_perplexity_equals_pytorch(tmp_path):
    model = converted("llama-gqa")
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    windows = np.random.default_rng(1).integers(3, VOCAB, (3, 40))
    nll, n, top1 = quality.onnx_scores(str(folder), {"some-text": windows}, threads=1)["some-text"]
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.from_numpy(windows[:, 1:]).reshape(-1),
                               reduction="sum")
    assert n == 3 * 39
    assert math.isclose(nll, float(expected), rel_tol=1e-4)
    agree = (top1 == logits[:, :-1].argmax(-1).numpy()).mean()
    assert top1.shape == (3, 39) and agree > 0.97  # fp32 export: the same next token (ties aside)


def test_a_big_export_is_scored_in_a_child_process_with_the_same_numbers(tmp_path, monkeypatch):
    """Above IN_CHILD_ABOVE bytes of weights onnxruntime runs in a child (its copy of an 8B is 7 GB): the numbers
    are those of the same scoring in this process."""
    import os

    from edge_mla.runtimes import onnxruntime as ort_runtime

    folder = export(converted("llama-gqa"), tmp_path / "onnx", weight_bits=32, kv_bits=32)
    windows = {"some-text": np.random.default_rng(2).integers(3, VOCAB, (2, 24))}
    here = ort_runtime.run_sized(folder, quality.onnx_scores, str(folder), windows, 1)
    monkeypatch.setattr(ort_runtime, "IN_CHILD_ABOVE", 0)
    in_child = ort_runtime.run_sized(folder, _scores_and_pid, str(folder), windows)
    assert in_child[1] != os.getpid()  # it did run elsewhere
    (nll, n, top1), (nll_child, n_child, top1_child) = here["some-text"], in_child[0]["some-text"]
    assert n == n_child and nll == nll_child and (top1 == top1_child).all()


def _scores_and_pid(folder, windows):
    import os
    return quality.onnx_scores(folder, windows, 1), os.getpid()


def test_ratios_pair_each_mla_row_with_the_original_on_the_same_runtime_and_text():
    rows = [quality.QualityRow("mla", "llama.cpp", "abc-news", 12.0, 100, "q4_0"),
            quality.QualityRow("original", "llama.cpp", "abc-news", 10.0, 100, "q4_0"),
            quality.QualityRow("mla", "onnxruntime", "abc-news", 30.0, 100, "int4")]
    assert quality.ratios(rows) == {"llama.cpp, abc-news": 1.2}


def test_agreement_is_the_share_of_positions_with_the_originals_next_token(tmp_path, monkeypatch):
    """measure() pairs each MLA file with the original in the same runtime, position by position."""
    original = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    mla = np.array([[1, 2, 0, 4], [5, 0, 7, 8]])  # 6 of 8 positions agree
    scored = {"original": original, "mla": mla}
    monkeypatch.setattr(quality, "text_windows", lambda tok, text, count, length: np.zeros((2, 5), np.int64))
    monkeypatch.setattr(quality, "onnx_scores", lambda folder, windows, threads=None: {
        text: (8 * math.log(2.0), 8, scored[folder]) for text in windows})
    rows = quality.measure({"mla": {"onnx": "mla"}, "original": {"onnx": "original"}}, None, kv_type="q4_0",
                           onnx_cache="int4", texts=("chat", "python-code"), progress=lambda *_: None)
    assert {(r.model, r.text) for r in rows} == {(m, t) for m in ("mla", "original") for t in ("chat", "python-code")}
    assert quality.agreement(rows) == {"onnxruntime, chat": 0.75, "onnxruntime, python-code": 0.75}
    assert all(r.perplexity == 2.0 for r in rows)


def test_the_original_scored_first_and_the_mla_build_later_still_pair_up(monkeypatch):
    """The build scores the originals before its recovery and the MLA files after it: one Battery, two calls."""
    original = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    mla = np.array([[1, 2, 3, 4], [0, 0, 7, 8]])  # 6 of 8 agree
    scored = {"original": original, "mla": mla}
    monkeypatch.setattr(quality, "text_windows", lambda tok, text, count, length: np.zeros((2, 5), np.int64))
    monkeypatch.setattr(quality, "onnx_scores", lambda folder, windows, threads=None: {
        text: (8 * math.log(3.0), 8, scored[folder]) for text in windows})
    battery = quality.Battery(None, kv_type="q4_0", onnx_cache="int4", texts=("math",), progress=lambda *_: None)
    first = battery.score({"original": {"onnx": "original"}})
    later = battery.score({"mla": {"onnx": "mla"}})
    assert [r.model for r in first] == ["original"] and [r.model for r in later] == ["mla"]
    assert later[0].top1_agreement == 0.75 and battery.rows == first + later
    assert quality.ratios(battery.rows) == {"onnxruntime, math": 1.0}
    assert set(battery.seconds) == {("original", "onnxruntime"), ("mla", "onnxruntime")}


def test_the_originals_scores_are_kept_by_the_files_content_and_the_windows(tmp_path, monkeypatch):
    """A second build of the same original at the same bits reads its scores back instead of scoring again, with
    the seconds scoring took then (the time budget plans the MLA files' scoring from them); a file with other bytes,
    other windows or the MLA file are scored."""
    monkeypatch.setenv("EDGE_MLA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "original"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx.data").write_bytes(b"weights")
    calls = []

    def fake_scores(path, windows, threads=None):
        calls.append(path)
        return {text: (4 * math.log(2.0), 4, np.array([[1, 2], [3, 4]], np.int32)) for text in windows}

    monkeypatch.setattr(quality, "onnx_scores", fake_scores)
    windows = {"math": np.arange(6).reshape(2, 3)}
    monkeypatch.setattr(quality, "text_windows", lambda tok, text, count, length: windows[text])

    def battery():
        return quality.Battery(None, kv_type="q4_0", onnx_cache="int4", texts=("math",), progress=lambda *_: None)

    first = battery()
    rows = first.score({"original": {"onnx": folder}})
    again = battery()
    assert again.score({"original": {"onnx": folder}}) == rows and len(calls) == 1
    key = ("original", "onnxruntime")
    assert again.seconds[key] == pytest.approx(first.seconds[key], abs=0.01) and np.array_equal(again.argmax[("original", "onnxruntime", "math")],
                                                              first.argmax[("original", "onnxruntime", "math")])
    (folder / "model.onnx.data").write_bytes(b"other weights")
    battery().score({"original": {"onnx": folder}})
    windows["math"] = np.arange(6).reshape(2, 3) + 1
    battery().score({"original": {"onnx": folder}})
    battery().score({"mla": {"onnx": folder}})
    assert len(calls) == 4


def test_a_runtime_of_unknown_version_is_scored_and_nothing_is_kept(tmp_path, monkeypatch):
    import importlib.metadata

    def unknown(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", unknown)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert quality.score_key(tmp_path / "model.gguf", "llama.cpp", "q4_0", {"math": np.zeros((1, 2))}) is None
