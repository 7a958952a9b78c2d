"""The streamed conversion and ONNX export hold a few layers, not the model: their peak RSS grows by much less
than the model's size.

A child process imports everything and warms up the one-off costs that do not grow with the model (a tokenizer
pass over the calibration text, the linear-algebra libraries' buffers), resets its peak-RSS mark
(/proc/self/clear_refs), converts a 16-layer model whose float32 weights are 833 MiB, and prints how far its peak
RSS (VmHWM) rose above where it stood. Streamed, the rise stays under HEADROOM_MB; the same child loading the
model whole rises past it, so the bound tells the two apart. The converted model is then exported to ONNX (4-bit
weights, int4 cache with calibrated scales) the same way, under EXPORT_HEADROOM_MB; onnxruntime's check of the
file, which holds the whole model, runs in a child of its own.

What is measured is resident memory, not an address-space cap: a cap (RLIMIT_DATA/AS) counts the allocator's
arenas and every thread's reservations, which differ by host (an AMX-advertising Xeon VM failed to mmap a shard
under the cap that the same code met on AMD).
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import bpe_tokenizer, corpus

# Peak-RSS rise each child may show: streamed it needs a layer or two of float32 weights (52 MiB each), the
# calibration activations and file pages of the shards being read; whole, it holds all 833 MiB.
HEADROOM_MB = 400
EXPORT_HEADROOM_MB = 400  # the export also holds the tokenizer, the walk's windows and the packing's row pieces

# Peak RSS of the child itself: the kernel's high-water mark, reset once the warm-up is done (writing 5 to
# clear_refs); where the reset is refused, the rise is counted from the current RSS to the warm-up's peak and more,
# which only over-states it.
PEAK_RSS = r"""
def _status_kb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1])

def peak_mark():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS")

def rise_mb(start_kb):
    return (_status_kb("VmHWM") - start_kb) / 1024
"""

RISE = re.compile(r"peak RSS rose (\d+) MB")

CHILD = PEAK_RSS + r"""
import sys
import torch
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401
from edge_mla import data
from edge_mla.convert import Plan, convert_source
from edge_mla.source import load_source

folder, out, lazy, text = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed", sys.argv[4]
data.calibration_windows(AutoTokenizer.from_pretrained(folder), text, count=2, length=64)
a = torch.randn(256, 256, dtype=torch.float64)
torch.linalg.eigh(a @ a.T), torch.linalg.svd(a), a.float() @ a.float()
start = peak_mark()
src = load_source(folder, lazy=lazy)
convert_source(src, Plan(selection="shared", latent=128), out, calib_windows=2, calib_length=64, text=text)
print(f"converted, peak RSS rose {rise_mb(start):.0f} MB")
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
    (folder.parent / "calibration.txt").write_text(corpus())  # short: memory is not spent on tokenizing a corpus
    float32_mb = 4 * sum(p.numel() for p in model.parameters()) / 2 ** 20
    assert float32_mb > 2 * HEADROOM_MB  # the model is several times what the child may add
    return folder


EXPORT_CHILD = PEAK_RSS + r"""
import sys
import numpy as np
import onnxruntime  # noqa: F401
import torch
from transformers import AutoTokenizer
from edge_mla import data
from edge_mla.mla_folder import load_any
from edge_mla.export import onnx as onnx_export, onnx_quant

folder, out, lazy, text = sys.argv[1], sys.argv[2], sys.argv[3] == "streamed", sys.argv[4]
data.calibration_windows(AutoTokenizer.from_pretrained(folder), text, count=2, length=64)
onnx_quant.block_codes(np.ones((64, 64), np.float32), 4, 32)
a = torch.randn(256, 256)
a @ a, torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None], is_causal=True)
start = peak_mark()
onnx_export.SMOKE_TEST_IN_CHILD = 0  # onnxruntime's check holds the whole model: a process of its own
src = None if lazy else load_any(folder)
onnx_export.export(folder, out, weight_bits=4, kv_bits=4, head_bits=8, calib_text=text, calib_windows=2,
                   calib_length=64, model=src and src.model, tokenizer=src and src.tokenizer)
print(f"exported, peak RSS rose {rise_mb(start):.0f} MB")
"""


def run_child(folder, out, mode, child=CHILD):
    return subprocess.run([sys.executable, "-c", child, str(folder), str(out), mode,
                           str(folder.parent / "calibration.txt")],
                          capture_output=True, text=True, timeout=600)


def rise(result) -> int:
    assert result.returncode == 0, result.stderr[-2000:]
    found = RISE.search(result.stdout)
    assert found, result.stdout[-2000:]
    return int(found.group(1))


@pytest.fixture(scope="module")
def streamed_conversion(tmp_path_factory, big_folder):
    out = tmp_path_factory.mktemp("converted") / "mla"
    return run_child(big_folder, out, "streamed"), out


@pytest.mark.slow
def test_streamed_conversion_peak_rss_stays_far_below_the_model(tmp_path, big_folder, streamed_conversion):
    streamed, out = streamed_conversion
    streamed_mb = rise(streamed)
    assert (out / "config.json").exists()
    assert streamed_mb < HEADROOM_MB, streamed.stdout
    whole_mb = rise(run_child(big_folder, tmp_path / "whole", "whole"))  # the bound tells the two apart
    assert whole_mb > HEADROOM_MB, (streamed_mb, whole_mb)


@pytest.mark.slow
def test_streamed_onnx_export_peak_rss_stays_far_below_the_model(tmp_path, big_folder, streamed_conversion):
    import numpy as np

    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    converted = streamed_conversion[1]
    (converted.parent / "calibration.txt").write_text((big_folder.parent / "calibration.txt").read_text())
    streamed = run_child(converted, tmp_path / "onnx", "streamed", EXPORT_CHILD)
    streamed_mb = rise(streamed)
    assert streamed_mb < EXPORT_HEADROOM_MB, streamed.stdout
    logits = OnnxDecoder(tmp_path / "onnx", threads=1, context=16).forward(np.arange(3, 11), keep=8)
    assert logits.shape[0] == 8 and np.isfinite(logits).all()
    whole_mb = rise(run_child(converted, tmp_path / "whole", "whole", EXPORT_CHILD))  # loaded whole
    assert whole_mb > EXPORT_HEADROOM_MB, (streamed_mb, whole_mb)
