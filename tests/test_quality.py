"""Perplexity through the runtimes: the runtime's numbers are the model's own (an fp32 ONNX export scores what
PyTorch scores), and the arithmetic is the usual cross-entropy."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from conftest import VOCAB
from edge_mla import quality
from test_onnx import converted, export


def test_nll_sum_is_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((20, 50)).astype(np.float32) * 4
    ids = rng.integers(0, 50, 20)
    expected = F.cross_entropy(torch.from_numpy(logits[:-1]).double(), torch.from_numpy(ids[1:]), reduction="sum")
    assert math.isclose(quality._nll_sum(logits, ids), float(expected), rel_tol=1e-9)


def test_onnx_perplexity_equals_pytorch(tmp_path):
    model = converted("llama-gqa")
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    windows = np.random.default_rng(1).integers(3, VOCAB, (3, 40))
    nll, n = quality.onnx_nll(str(folder), windows, threads=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.from_numpy(windows[:, 1:]).reshape(-1),
                               reduction="sum")
    assert n == 3 * 39
    assert math.isclose(nll, float(expected), rel_tol=1e-4)


def test_ratios_pair_each_mla_row_with_the_original_on_the_same_runtime_and_text():
    rows = [quality.QualityRow("mla", "llama.cpp", "abc-news", 12.0, 100, "q4_0"),
            quality.QualityRow("original", "llama.cpp", "abc-news", 10.0, 100, "q4_0"),
            quality.QualityRow("mla", "onnxruntime", "abc-news", 30.0, 100, "int4")]
    assert quality.ratios(rows) == {"llama.cpp, abc-news": 1.2}
