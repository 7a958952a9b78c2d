"""The ONNX export streams: its weights are packed by the graph builder on llama.cpp's grids and written to
model.onnx.data as each layer is read.

- MatMulNBits and GatherBlockQuantized weights, dequantized by onnxruntime itself, are gguf-py's q4_0 / q8_0 blocks
  bit for bit;
- the export gives the logits of the exporter before (the float graph quantized whole by onnxruntime.quantization)
  within the rounding of the block scales to float16;
- an export read a layer at a time from a bf16 sharded folder is byte for byte the export of the model loaded whole;
- the rows the layer walk records for the static cache scales are the ones the whole model caches.
(tests/test_memory_cap.py runs the export under a memory cap.)
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import prompt, stats_for, tiny_model
from edge_mla.convert import Plan, convert, convert_source
from edge_mla.mla_folder import load_any
from edge_mla.export import onnx as onnx_export
from edge_mla.export import onnx_weights
from edge_mla.export import onnx_decoder, onnx_graph, onnx_matmul
from edge_mla.runtimes.onnxruntime import META, OnnxDecoder
from edge_mla.source import load_source
from conftest import word_tokenizer
from conftest import bf16_folder


def run_graph(g: onnx_graph.Graph, out: str, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for name, v in feeds.items()]
    model = helper.make_model(
        helper.make_graph(g.nodes, "t", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          g.initializers),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def gguf_grid(w: np.ndarray, bits: int) -> np.ndarray:
    """w [N, K] through gguf-py's q4_0 / q8_0 (rows zero-padded to whole blocks of 32)."""
    from gguf import GGMLQuantizationType as QT
    from gguf.quants import dequantize, quantize

    qtype = QT.Q4_0 if bits == 4 else QT.Q8_0
    padded = np.pad(w, ((0, 0), (0, -w.shape[1] % 32)))
    return dequantize(quantize(padded, qtype), qtype)[:, :w.shape[1]].astype(np.float32)


def weights(seed: int, n: int, k: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: every block's scale is 0
    w[5, :32] *= 1e-3  # a block far smaller than the others
    return w


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal float32 bits (+0 and -0 counted equal: an all-zero block's 0 x (code - 8) may come out either way)."""
    return a.shape == b.shape and np.array_equal((a + 0.0).view(np.uint32), (b + 0.0).view(np.uint32))


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_weights_are_the_gguf_grids(bits):
    """x @ W^T with x = I: onnxruntime's MatMulNBits (float compute) returns the dequantized weight itself."""
    w = weights(0, 48, 80)  # K = 80: a partial last block
    g = onnx_graph.Graph()
    y = onnx_matmul.matmul(g, "x", [w[:20], w[20:]], "m", onnx_graph.Options(weight_bits=bits, accuracy_level=0))
    assert [n.op_type for n in g.nodes] == ["MatMulNBits"]
    got = run_graph(g, y, {"x": np.eye(80, dtype=np.float32)})
    assert bit_equal(np.ascontiguousarray(got.T), gguf_grid(w, bits))


@pytest.mark.parametrize("tied,head_bits", [(True, 4), (True, 8), (False, 8)])
def test_embedding_tables_are_the_gguf_grids(tied, head_bits):
    """Every row of the embedding through GatherBlockQuantized: a tied table is the head's MatMulNBits blocks at the
    head's bits, an untied one int4 (q4_0) blocks."""
    w = weights(1, 40, 96)
    dec = onnx_graph.Decoder(kind="mla", vocab_size=40, hidden_size=96, num_heads=1, head_dim=1, eps=1e-5, embed=w,
                             final_norm=np.ones(96, np.float32), lm_head=w, tied=tied)
    g = onnx_graph.Graph()
    x, head = onnx_matmul.embedding(g, dec, onnx_graph.Options(weight_bits=4, head_bits=head_bits), "ids")
    ops = [n.op_type for n in g.nodes]
    assert "GatherBlockQuantized" in ops and (head is not None) == tied
    got = run_graph(g, x, {"ids": np.arange(40, dtype=np.int64)[None]})[0]
    assert bit_equal(got, gguf_grid(w, head_bits if tied else 4))


def onnxruntime_quantized(model, folder, bits: int, accuracy_level: int) -> None:
    """The exporter before: the float graph quantized whole by onnxruntime.quantization (symmetric round to
    nearest, blocks of 32; every 2D MatMul, and at 4 bits the embedding Gather), written over `folder`'s model."""
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    proto = onnx_decoder.build_model(onnx_weights.decoder_from_mla(model), onnx_graph.Options(kv_bits=32, up_bits=8))
    absorbed = [n.name for n in proto.graph.node if ".absorb_" in n.name]
    for ops in (("MatMul",), ("Gather",)) if bits == 4 else (("MatMul",),):
        config = q.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=accuracy_level,
                                                bits=bits, op_types_to_quantize=ops)
        quantizer = q.MatMulNBitsQuantizer(proto, bits=bits, block_size=32, is_symmetric=True,
                                           accuracy_level=accuracy_level, nodes_to_exclude=absorbed,
                                           op_types_to_quantize=ops, algo_config=config)
        quantizer.process()
        proto = quantizer.model.model
    (folder / "model.onnx.data").unlink()
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def test_packed_weights_give_the_logits_of_onnxruntimes_quantizer(tmp_path):
    """4-bit weights, float compute (accuracy level 1) and a float cache, so that only the weights differ: the
    q4_0 blocks differ from onnxruntime's symmetric blocks only by their scales' rounding to float16."""
    import shutil

    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="shared", latent=24), stats_for(model))
    ids = prompt()[0].numpy()
    ours = onnx_export.export("tiny", tmp_path / "ours", model=model, tokenizer=word_tokenizer(), weight_bits=4,
                              kv_bits=32, accuracy_level=1)
    shutil.copytree(ours, tmp_path / "before")
    onnxruntime_quantized(model, tmp_path / "before", 4, accuracy_level=1)
    a = OnnxDecoder(ours, threads=1, context=64).forward(ids, keep=len(ids))
    b = OnnxDecoder(tmp_path / "before", threads=1, context=64).forward(ids, keep=len(ids))
    assert np.abs(a - b).max() < 5e-3 * np.abs(b).max(), np.abs(a - b).max()  # measured 1.5e-3 of the range
    with torch.no_grad():
        reference = model(prompt()).logits[0].numpy()
    assert np.corrcoef(a.ravel(), reference.ravel())[0, 1] > 0.8  # still the model, quantized


@pytest.fixture(scope="module")
def mistral_folders(tmp_path_factory):
    """A tiny Mistral (tied embeddings) saved like a hub download, and its MLA conversion, written layer by layer."""
    from conftest import bpe_tokenizer, corpus

    root = tmp_path_factory.mktemp("stream")
    folder = bf16_folder(root, "mistral", bpe_tokenizer())
    text = root / "calibration.txt"
    text.write_text(corpus())  # short: tokenizing the built-in text costs more than the export
    convert_source(load_source(str(folder), lazy=True), Plan(selection="partition", rope_pairs=2, latent=32),
                   root / "mla", calib_windows=2, calib_length=48, text=str(text))
    return folder, root / "mla", text


def files(folder):
    meta = json.loads((folder / META).read_text())
    meta.pop("provenance")  # holds a timestamp
    return (folder / "model.onnx").read_bytes(), (folder / "model.onnx.data").read_bytes(), meta


@pytest.mark.parametrize("original", [False, True])
def test_streamed_export_equals_in_memory(tmp_path, mistral_folders, original):
    """The export read a layer at a time from the folder (cache scales calibrated on the layer walk, vocabulary in
    pieces) is byte for byte the export of the model loaded whole, for the MLA model and the original."""
    folder = mistral_folders[1 if not original else 0]
    options = dict(weight_bits=4, kv_bits=4, head_bits=8, original=original, calib_windows=2, calib_length=32,
                   calib_text=str(mistral_folders[2]))
    streamed = onnx_export.export(str(folder), tmp_path / "streamed", **options)
    src = load_any(folder)
    assert src.checkpoint is None
    in_memory = onnx_export.export(str(folder), tmp_path / "memory", model=src.model, tokenizer=src.tokenizer,
                                   **options)
    a, b = files(streamed), files(in_memory)
    assert a[2] == b[2] and a[0] == b[0] and a[1] == b[1]
    ids = np.arange(3, 20)
    assert np.isfinite(OnnxDecoder(streamed, threads=1, context=32).forward(ids, keep=len(ids))).all()


@pytest.mark.parametrize("original", [False, True])
def test_walk_records_what_the_whole_model_caches(original):
    from conftest import calibration_windows

    from edge_mla.layerwise import Walk
    from edge_mla.mla import cached_tensors, forward_with_cache

    model = tiny_model("qwen2")  # biases reach the cache
    if not original:
        convert(model, Plan(selection="shared", latent=24), stats_for(model))
    windows = calibration_windows(n=2, length=24)
    walk = Walk(model, None, {"cache": windows})
    with torch.no_grad():
        whole = [cached_tensors(forward_with_cache(model, w[None])[1]) for w in windows]
    for i in range(model.config.num_hidden_layers):
        got = onnx_weights.cached_rows(walk, i)
        expected = [np.concatenate([cache[i][part][0].transpose(0, 1).numpy() for cache in whole])
                    for part in range(len(got))]
        assert len(got) == (2 if original else 1)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and np.abs(g - e).max() < 1e-6
