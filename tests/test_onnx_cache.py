"""The ONNX latent cache: int4 caches whose scales travel with the rows as round trips, q4_0's rule, chunked prefill,
one buffer updated in place, and the cache settings refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import LATENT, VOCAB, converted, export, prompt
from edge_mla import cli
from edge_mla.export import onnx_quant
from edge_mla.mla import mla_layers
from edge_mla.runtimes.onnxruntime import META, OnnxDecoder


@pytest.mark.parametrize("scales", ["row", "q4_0"])
def test_int4_cache_with_scales_per_row_is_its_round_trip(tmp_path, text_file, scales):
    """The matmul body's int4 caches whose scales are kept with the rows (float16, q4_0's rule: one per row over
    the static per-channel scales, or per 32 values) give the logits of the PyTorch model whose cached rows pass
    through the same round trip (onnx_quant.group_fake_quantize, which is gguf-py's q4_0 on groups of 32), in one
    prefill, in chunks and token by token; the stored scales are q4_0's d."""
    model = converted("llama-gqa", latent=16)  # C + R = 32: one q4_0 block per row
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=4, body="matmul", kv_scales=scales,
                    calib_text=str(text_file), calib_windows=4, calib_length=64)
    meta = json.loads((folder / META).read_text())
    width, layers = 16 + model.config.mla["rope_dim"], model.config.num_hidden_layers
    names = [t["past"] for t in meta["cache"]["tensors"]]
    assert names[:2] == ["past.0", "past_group_scale.0"] and len(names) == 2 * layers
    assert meta["cache"]["bytes_per_token"] == layers * (width // 2 + 2)  # one float16 scale per row here
    channel = [np.asarray(s, np.float32) if scales == "row" else None for s in meta["cache"]["scales"]["layers"]]
    group = width if scales == "row" else 32
    rows = {}

    def round_trip(i):
        def apply(entry):
            rows.setdefault(i, entry.detach().numpy()[0, 0])
            return torch.from_numpy(onnx_quant.group_fake_quantize(entry.numpy(), group, channel[i]))
        return apply

    layers_ = mla_layers(model)
    ids = prompt()
    for i, attn in enumerate(layers_):
        attn.cache_quant = round_trip(i)
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    ids = ids[0].numpy()
    for chunk in (0, 7):
        decoder = OnnxDecoder(folder, threads=1, context=64, prefill_chunk=chunk)
        got = np.concatenate([decoder.forward(ids[:20], keep=20)] +
                             [decoder.forward(ids[t:t + 1]) for t in range(20, len(ids))])
        assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    # the q4_0 body's prefill scratch is a score matrix per 32 values: its export asks the runner for short chunks
    assert meta["cache"].get("prefill_chunk") == (32 if scales == "q4_0" else None)
    assert OnnxDecoder(folder, threads=1, context=8).prefill_chunk == meta["cache"].get("prefill_chunk", 128)
    stored = decoder.buffers["past_group_scale.1"].numpy()[0, 0, :len(ids), 0].astype(np.float32)
    y = rows[1] / channel[1] if scales == "row" else rows[1]
    want = np.take_along_axis(y, np.abs(y).argmax(-1)[:, None], -1)[:, 0] / -8
    assert np.allclose(stored, want.astype(np.float16).astype(np.float32), rtol=2e-3)  # float16, from the graph's rows


def test_q4_0_cache_round_trip_is_gguf_py_and_the_recovery_s():
    """The reference of the q4_0 cache scales is gguf-py's q4_0 bit for bit, and the CPU recovery's emulation."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from edge_mla.q4_0 import roundtrip as q4_0_roundtrip

    x = (np.random.default_rng(0).standard_normal((64, 96)) * np.logspace(-3, 2, 96)).astype(np.float32)
    x[3] = 0  # a zero row: d = 0, codes 8
    want = dequantize(quantize(x, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert np.array_equal(onnx_quant.group_fake_quantize(x, 32), want)
    assert np.array_equal(q4_0_roundtrip(torch.from_numpy(x)).numpy(), want)


def test_web_page_refuses_a_matmul_body_export_before_any_work(capsys, tmp_path, mla_model):
    """The page feeds a growing cache; the matmul body writes into a preallocated buffer (no browser needed)."""
    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32, body="matmul")
    assert cli.main(["web", str(folder), "--out", str(tmp_path / "site")]) == cli.EXIT_BAD_INPUT
    assert "--attention gqa" in capsys.readouterr().err and not (tmp_path / "site").exists()


def test_scales_per_row_need_the_matmul_body_int4_and_whole_blocks(tmp_path, mla_model):
    with pytest.raises(ValueError, match="matmul body"):
        export(mla_model, tmp_path / "a", weight_bits=32, kv_bits=4, body="gqa", kv_scales="row")
    with pytest.raises(ValueError, match="int4 cache"):
        export(mla_model, tmp_path / "b", weight_bits=32, kv_bits=8, body="matmul", kv_scales="q4_0")
    with pytest.raises(ValueError, match="multiple of 32"):  # C + R = 40
        export(mla_model, tmp_path / "c", weight_bits=32, kv_bits=4, body="matmul", kv_scales="q4_0")
    assert not any(tmp_path.iterdir())
    default = export(mla_model, tmp_path / "d", weight_bits=32, kv_bits=4, body="matmul")
    assert json.loads((default / META).read_text())["cache"]["scales"]["kind"].startswith("static per channel")


@pytest.mark.parametrize("body", ["gqa", "matmul"])
def test_chunked_prefill_equals_one_piece(tmp_path, mla_model, body):
    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32, body=body)
    ids = prompt()[0].numpy()
    whole = OnnxDecoder(folder, threads=1, context=64, prefill_chunk=0)
    chunked = OnnxDecoder(folder, threads=1, context=64, prefill_chunk=6)  # 6 does not divide the prompt
    for keep in (len(ids), 9, 1):
        whole.reset(64), chunked.reset(64)
        a, b = whole.forward(ids, keep=keep), chunked.forward(ids, keep=keep)
        assert a.shape == b.shape == (keep, VOCAB) and np.abs(a - b).max() < 1e-4
    cache = [d.buffers["past.1"].numpy()[:, :, :len(ids)] for d in (whole, chunked)]
    assert np.abs(cache[0] - cache[1]).max() < 1e-4
    token = np.array([int(a[-1].argmax())])
    assert np.abs(whole.forward(token) - chunked.forward(token)).max() < 1e-4


def test_cache_is_one_buffer_updated_in_place(tmp_path, mla_model):
    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    decoder = OnnxDecoder(folder, threads=1, context=32)
    buffers = {name: value for name, value in decoder.buffers.items()}
    decoder.forward(np.arange(3, 10))
    decoder.forward(np.array([4]))
    assert all(decoder.buffers[name] is value for name, value in buffers.items())
    cache = buffers["past.0"].numpy()
    assert cache.shape == (1, 1, 32, LATENT + 16)
    assert np.abs(cache[0, 0, :8]).sum(-1).min() > 0  # the 8 tokens were written into the preallocated buffer
    used, allocated = decoder.cache_bytes()
    assert used == 8 * decoder.bytes_per_token and allocated == 32 * decoder.bytes_per_token
