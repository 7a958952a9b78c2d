"""The streamed conversion runs in a process whose memory is capped well below the model's size.

A child process imports everything and warms up the one-off costs that do not grow with the model (a tokenizer
pass over the calibration text, the linear-algebra libraries' buffers), then caps its data segment
(RLIMIT_DATA: heap and private mappings) at what it holds plus HEADROOM_MB, and converts a 16-layer model whose
float32 weights (833 MiB) are 5.5 times the headroom: streamed it fits; loaded whole (the same cap) it cannot.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_gguf import bpe_tokenizer, corpus

HEADROOM_MB = 150

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


def run_capped(folder, out, mode):
    return subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), mode, str(HEADROOM_MB),
                           str(folder.parent / "calibration.txt")],
                          capture_output=True, text=True, timeout=600)


def test_streamed_conversion_fits_under_a_memory_cap(tmp_path, big_folder):
    streamed = run_capped(big_folder, tmp_path / "streamed", "streamed")
    assert streamed.returncode == 0, streamed.stderr[:2000]
    assert "converted under the cap" in streamed.stdout
    assert (tmp_path / "streamed" / "config.json").exists()
    whole = run_capped(big_folder, tmp_path / "whole", "whole")  # the cap bites: the in-memory load cannot fit
    assert whole.returncode != 0 and not (tmp_path / "whole").exists()
    assert "memory" in whole.stderr.lower()
