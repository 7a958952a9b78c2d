"""onnxruntime-genai runs the genai files of an ONNX export (export/onnx_genai.py): the same greedy tokens as
edge-mla's own onnxruntime runner, for the MLA latent cache (float and int4) and for an original model's K/V cache."""
from __future__ import annotations

import json

import onnx
import pytest

from conftest import tiny_model
from edge_mla.export.onnx_genai import CONFIG, MODEL
from edge_mla.runtimes.onnxruntime import OnnxDecoder, generate
from conftest import word_tokenizer
from conftest import converted, export

og = pytest.importorskip("onnxruntime_genai", reason="pip install -e '.[phones]' (onnxruntime-genai)")

PROMPT = [5, 9, 17, 33, 12, 40, 7]
NEW = 16


def genai_greedy(folder, prompt: list[int], new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def runner_greedy(folder, prompt: list[int], new: int) -> list[int]:
    decoder = OnnxDecoder(folder, threads=1, context=len(prompt) + new)
    tokens = generate(decoder, None, prompt, new)["tokens"]
    stopped = len(tokens) < new  # genai also returns the end-of-text token it stopped at
    return tokens + decoder.meta["eos_token_ids"][:1] if stopped else tokens


@pytest.fixture(scope="module")
def mla_model():
    return converted("llama-gqa")


@pytest.mark.parametrize("bits,body,scales", [(32, "gqa", "channel"), (4, "gqa", "channel"), (4, "matmul", "channel"),
                                              (4, "matmul", "row")])
def test_genai_generates_the_runners_tokens_with_the_latent_cache(tmp_path, mla_model, bits, body, scales):
    """genai runs the gqa body whichever body model.onnx carries (the matmul body's cache is the same bytes); a
    row-scaled export's genai.onnx keeps the static per-channel scales alone: the tokens of a gqa-body export."""
    folder = export(mla_model, tmp_path / "onnx", weight_bits=bits, kv_bits=bits, genai=True, body=body,
                    kv_scales=scales)
    reference = folder if scales != "row" else export(mla_model, tmp_path / "static", weight_bits=bits,
                                                      kv_bits=bits)
    config = json.loads((folder / CONFIG).read_text())
    meta = json.loads((folder / "edge_mla_onnx.json").read_text())
    assert config["model"]["decoder"]["filename"] == MODEL and config["search"]["past_present_share_buffer"]
    onnx.checker.check_model(str(folder / MODEL), full_check=True)
    # genai's key and value caches both hold the latent row: twice the runner's single buffer
    row_scales = 2 * mla_model.config.num_hidden_layers if scales == "row" else 0  # float16 per row and layer
    assert meta["genai"]["cache_bytes_per_token"] == 2 * (meta["cache"]["bytes_per_token"] - row_scales)
    expected = runner_greedy(reference, PROMPT, NEW)
    assert len(expected) >= 8  # enough tokens before any end-of-text to be a real comparison
    assert genai_greedy(folder, PROMPT, NEW) == expected
    # a prompt long enough for the expanded prefill (the gqa body's genai.onnx keeps both forms)
    threshold = meta["cache"]["prefill"]["from_tokens"] or 24  # (a row-scaled export keeps the absorbed form)
    long_prompt = [3 + (7 * i) % 90 for i in range(threshold + 10)]
    forms = {n.op_type for n in onnx.load(str(folder / MODEL), load_external_data=False).graph.node}
    assert ("If" in forms) == (body == "gqa")
    expected = runner_greedy(reference, long_prompt, NEW)
    assert len(expected) >= 8 and genai_greedy(folder, long_prompt, NEW) == expected


def test_genai_runs_the_original_model_export(tmp_path):
    from edge_mla.export import onnx as onnx_export

    folder = onnx_export.export("tiny", tmp_path / "onnx", model=tiny_model("llama-gqa"), tokenizer=word_tokenizer(),
                                weight_bits=32, kv_bits=32, original=True, genai=True)
    expected = runner_greedy(folder, PROMPT, NEW)
    assert len(expected) >= 8
    assert genai_greedy(folder, PROMPT, NEW) == expected
