"""The ONNX latent cache codecs (export/onnx_cache_codecs.py), each alone in onnxruntime: what `write` stores and
`read` gives back is the row quantized by the codec's rule; the bodies built from them are checked against PyTorch
in test_onnx.py."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_mla.export.onnx_cache_codecs import codec_for
from edge_mla.export.onnx_latent_attention import OPSET, _Body, _dedupe

LATENT, ROPE, ROWS = 24, 8, 5


def round_trip(kv_bits: int, entry: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the stored rows, the rows read back) of `entry` [1, S, W] through the codec, in onnxruntime."""
    codec = codec_for(kv_bits, LATENT, ROPE)
    body = _Body()
    codec.prepare(body, decode=False)
    stored = codec.write(body)
    body.node("Unsqueeze", [stored, body.const("one1", [1])], "cached")
    rows = codec.read(body, "cached")
    width = LATENT + ROPE
    inputs = [helper.make_tensor_value_info("entry", TensorProto.FLOAT, [1, ROWS, width]),
              helper.make_tensor_value_info("cache_scale", TensorProto.FLOAT, [1, 1, 1, width]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 1, ROWS, width]),
              helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, ROWS, width])]
    stored_type = {0: TensorProto.FLOAT, 8: TensorProto.INT8, 4: TensorProto.UINT8}[kv_bits]
    outputs = [helper.make_tensor_value_info(stored, stored_type, None),
               helper.make_tensor_value_info(rows, TensorProto.FLOAT, None)]
    graph = helper.make_graph(_dedupe(body.nodes), "codec", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"entry": entry, "cache_scale": scale.reshape(1, 1, 1, -1), "past": np.zeros((1, 1, ROWS, width), np.float32),
             "query": entry}
    names = [i.name for i in session.get_inputs()]
    return tuple(session.run(None, {k: v for k, v in feeds.items() if k in names}))


@pytest.mark.parametrize("kv_bits", [0, 8, 4])
def test_each_codec_reads_back_the_row_it_wrote_quantized_by_its_rule(kv_bits):
    rng = np.random.default_rng(kv_bits)
    width = LATENT + ROPE
    entry = rng.normal(size=(1, ROWS, width)).astype(np.float32)
    scale = (0.05 + rng.random(width)).astype(np.float32) / (7 if kv_bits == 4 else 127)
    stored, rows = round_trip(kv_bits, entry, scale)
    if kv_bits == 0:
        np.testing.assert_array_equal(rows[0], entry)
        return
    lo, hi = (-8, 7) if kv_bits == 4 else (-128, 127)
    codes = np.clip(np.round(entry / scale), lo, hi)
    np.testing.assert_allclose(rows[0], codes * scale, rtol=1e-6, atol=1e-7)
    assert (codes == lo).any() or (codes == hi).any()  # the clip is exercised
    if kv_bits == 4:  # code + 8, two per byte, low nibble first: what GroupQueryAttention writes
        nibbles = (codes + 8).astype(np.uint8)
        assert stored.dtype == np.uint8 and stored.shape == (1, ROWS, width // 2)
        np.testing.assert_array_equal(stored, nibbles[..., 0::2] + 16 * nibbles[..., 1::2])
    else:
        assert stored.dtype == np.int8
        np.testing.assert_array_equal(stored, codes.astype(np.int8))


def test_a_cache_the_codecs_do_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match="no ONNX latent cache of 2 bits"):
        codec_for(2, LATENT, ROPE)
    with pytest.raises(ValueError, match="made for the int4 cache"):
        codec_for(8, LATENT, ROPE, "q4_0")
    with pytest.raises(ValueError, match="static per-channel scales only"):
        codec_for(4, LATENT, ROPE, "row").prepare(_Body(), decode=False)
    assert onnx.__version__  # the graph above is plain ai.onnx
