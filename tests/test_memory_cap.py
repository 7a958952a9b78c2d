"""The streamed conversion and ONNX export run in a process whose memory is capped well below the model's size.

A child process imports everything and warms up the one-off costs that do not grow with the model (a tokenizer
pass over the calibration text, the linear-algebra libraries' buffers), then caps its data segment
(RLIMIT_DATA: heap and private mappings) at what it holds plus HEADROOM_MB, and converts a 16-layer model whose
float32 weights (833 MiB) are 5.5 times the headroom: streamed it fits; loaded whole (the same cap) it cannot.
The converted model is then exported to ONNX (4-bit weights, int4 cache with calibrated scales) under a cap of
EXPORT_HEADROOM_MB (4.2 times less than the model), the same way; onnxruntime's check of the file, which holds the
whole model, runs in a child of its own.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_gguf import bpe_tokenizer, corpus

HEADROOM_MB = 150
EXPORT_HEADROOM_MB = 200  # the export also holds the tokenizer, the walk's windows and the packing's row pieces

CHILD = r"""
import resource, sys
import torch
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401
from edge_mla import data, layerwise
from edge_mla.convert import Plan, convert_source
from edge_mla.source import load_source

folder, out, lazy, headroom, text = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed", int(sys.argv[4]), sys.argv[5]
data.calibration_windows(AutoTokenizer.from_pretrained(folder), text, count=2, length=64)
a = torch.randn(256, 256, dtype=torch.float64)
torch.linalg.eigh(a @ a.T), torch.linalg.svd(a), a.float() @ a.float()
vm_data = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) << 10
cap = vm_data() + (headroom << 20)
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
src = load_source(folder, lazy=lazy)
convert_source(src, Plan(selection="shared", latent=128), out, calib_windows=2, calib_length=64, text=text)
print(f"converted under the cap, peak RSS {layerwise.peak_rss_mb():.0f} MB")
"""


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    folder = tmp_path_factory.mktemp("capped") / "llama-16x512"
    model.save_pretrained(folder, max_shard_size="50MB")
    tokenizer.save_pretrained(folder)
    (folder.parent / "calibration.txt").write_text(corpus())  # short: the cap is not spent on tokenizing a corpus
    float32_mb = 4 * sum(p.numel() for p in model.parameters()) / 2 ** 20
    assert float32_mb > 5 * HEADROOM_MB  # the model is several times what the child may add
    return folder


EXPORT_CHILD = r"""
import resource, sys
import numpy as np
import onnxruntime  # noqa: F401
import torch
from transformers import AutoTokenizer
from edge_mla import data, layerwise
from edge_mla.convert import load_any
from edge_mla.export import onnx as onnx_export, onnx_quant

folder, out, lazy, headroom, text = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed", int(sys.argv[4]), sys.argv[5]
data.calibration_windows(AutoTokenizer.from_pretrained(folder), text, count=2, length=64)
onnx_quant.block_codes(np.ones((64, 64), np.float32), 4, 32)
a = torch.randn(256, 256)
a @ a, torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None], is_causal=True)
vm_data = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1]) << 10
cap = vm_data() + (headroom << 20)
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
onnx_export.SMOKE_TEST_IN_CHILD = 0  # onnxruntime's check holds the whole model: a process of its own
src = None if lazy else load_any(folder)
onnx_export.export(folder, out, weight_bits=4, kv_bits=4, head_bits=8, calib_text=text, calib_windows=2,
                   calib_length=64, model=src and src.model, tokenizer=src and src.tokenizer)
print(f"exported under the cap, peak RSS {layerwise.peak_rss_mb():.0f} MB")
"""


def run_capped(folder, out, mode, child=CHILD, headroom=HEADROOM_MB):
    return subprocess.run([sys.executable, "-c", child, str(folder), str(out), mode, str(headroom),
                           str(folder.parent / "calibration.txt")],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def streamed_conversion(tmp_path_factory, big_folder):
    out = tmp_path_factory.mktemp("converted") / "mla"
    return run_capped(big_folder, out, "streamed"), out


def test_streamed_conversion_fits_under_a_memory_cap(tmp_path, big_folder, streamed_conversion):
    streamed, out = streamed_conversion
    assert streamed.returncode == 0, streamed.stderr[:2000]
    assert "converted under the cap" in streamed.stdout
    assert (out / "config.json").exists()
    whole = run_capped(big_folder, tmp_path / "whole", "whole")  # the cap bites: the in-memory load cannot fit
    assert whole.returncode != 0 and not (tmp_path / "whole").exists()
    assert "memory" in whole.stderr.lower()


def test_streamed_onnx_export_fits_under_a_memory_cap(tmp_path, big_folder, streamed_conversion):
    import numpy as np

    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    converted = streamed_conversion[1]
    (converted.parent / "calibration.txt").write_text((big_folder.parent / "calibration.txt").read_text())
    streamed = run_capped(converted, tmp_path / "onnx", "streamed", EXPORT_CHILD, EXPORT_HEADROOM_MB)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert "exported under the cap" in streamed.stdout
    logits = OnnxDecoder(tmp_path / "onnx", threads=1, context=16).forward(np.arange(3, 11), keep=8)
    assert logits.shape[0] == 8 and np.isfinite(logits).all()
    whole = run_capped(converted, tmp_path / "whole", "whole", EXPORT_CHILD, EXPORT_HEADROOM_MB)  # loaded whole
    assert whole.returncode != 0 and not (tmp_path / "whole").exists()
    assert "memory" in whole.stderr.lower()
