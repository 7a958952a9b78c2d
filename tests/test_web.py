"""`edge-mla web`: the static page runs the ONNX export in headless Chromium (onnxruntime-web, WebAssembly) and gives
the same greedy tokens as edge-mla's own onnxruntime runner; and (slow) the real SmolLM2, converted, answers with
Paris in the page (benchmarks/phones.py measures the full build's page, docs/phones.md)."""
from __future__ import annotations

import json
import shutil

import pytest

from edge_mla import cli
from edge_mla.export import web
from edge_mla.runtimes.onnxruntime import OnnxDecoder, Tokenizer, generate, read_meta
from conftest import converted, export

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("npm") is None,
                                reason="needs Chromium and npm (.ci/run installs them: apt-get install chromium)")
PROMPT = "w50 w60 w70"


def runner(folder, text: str, new: int, chat: bool = False) -> dict:
    tokenizer = Tokenizer(folder, read_meta(folder))
    ids = tokenizer.encode(text, chat=chat)
    result = generate(OnnxDecoder(folder, threads=1, context=len(ids) + new), tokenizer, ids, new)
    return {"prompt_ids": ids, **result}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """int4 weights (accuracy level 1: fp32 activations, what the WASM kernel computes) and an int4 latent cache."""
    root = tmp_path_factory.mktemp("web")
    return export(converted("llama-gqa"), root / "onnx", weight_bits=4, kv_bits=4, accuracy_level=1)


@pytest.fixture(scope="module")
def site(exported):
    """The default site: MatMulNBits weights dequantized to float16; GatherBlockQuantized and GroupQueryAttention's
    packed int4 cache run in the browser as exported."""
    assert cli.main(["web", str(exported), "--out", str(exported.parent / "site")]) == 0
    return exported, exported.parent / "site"


@pytest.mark.parametrize("weights", ["float16", "as-exported"])
def test_page_generates_the_runners_greedy_tokens(exported, site, weights):
    folder, site_dir = site
    if weights == "as-exported":  # MatMulNBits itself in the browser
        site_dir = web.build_site(exported, exported.parent / "site-as-exported", weights="as-exported")
    got = web.headless_run(site_dir, {"prompt": PROMPT, "tokens": 24, "threads": 1}, timeout=120)
    expected = runner(site_dir / "model", PROMPT, 24)  # the page's own model files, run natively
    assert got["prompt_ids"] == expected["prompt_ids"]
    assert len(expected["tokens"]) >= 8 and got["tokens"] == expected["tokens"]
    assert got["text"] == expected["text"] and got["tokens_per_second"] > 0
    meta = read_meta(folder)
    assert got["cache_bytes"] == (len(expected["prompt_ids"]) + len(got["tokens"]) - 1) * meta["cache"]["bytes_per_token"]


def test_page_works_offline_once_loaded(tmp_path, site):
    folder, site_dir = site
    server = web.serve(site_dir)
    try:
        query = {"prompt": PROMPT, "tokens": 8, "threads": 1}
        online = web.headless_run(site_dir, query, timeout=120, profile=tmp_path / "profile", server=server)
        assert online["offline_ready"]
        offline = web.headless_run(site_dir, query, timeout=120, profile=tmp_path / "profile", server=server,
                                   offline=True)
    finally:
        server.shutdown()
        server.server_close()
    assert offline["tokens"] == online["tokens"] == runner(folder, PROMPT, 8)["tokens"]


def test_dequantized_weights_are_the_exported_values(tmp_path, exported):
    """MatMulNBits -> MatMul over the dequantized weight: exact in float32 (float16, the site's default, rounds)."""
    import numpy as np
    import onnx

    model, count = web.dequantized_weights(onnx.load(str(exported / "model.onnx")), dtype="float32")
    assert count == 9 and not any(n.op_type == "MatMulNBits" for n in model.graph.node)  # 4 per layer + head
    shutil.copytree(exported, tmp_path / "f32")
    onnx.save_model(model, str(tmp_path / "f32" / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    ids = np.array([5, 9, 17, 33, 12, 40, 7, 50, 60, 70])
    expected = OnnxDecoder(exported, threads=1, context=16).forward(ids, keep=len(ids))
    assert np.abs(OnnxDecoder(tmp_path / "f32", threads=1, context=16).forward(ids, keep=len(ids)) - expected).max() < 1e-4


def test_site_is_self_contained_with_licenses(site):
    _, site_dir = site
    listed = json.loads((site_dir / "site.json").read_text())
    assert all((site_dir / f).is_file() for f in listed["files"])
    assert "int4 latent cache" in listed["runs"] and "dequantized to float16" in listed["weights"]
    pages = (site_dir / "index.html").read_text() + (site_dir / "app.js").read_text()
    assert "http://" not in pages.replace("http://www.apache.org", "") and "https://" not in pages  # no CDN
    licenses = (site_dir / "THIRD_PARTY_LICENSES.txt").read_text()
    assert "onnxruntime-web 1.30.0 (MIT)" in licenses and "@huggingface/tokenizers 0.2.0 (Apache-2.0)" in licenses


def test_not_an_export_and_existing_out_are_refused(capsys, tmp_path, site):
    folder, site_dir = site
    assert cli.main(["web", str(tmp_path), "--out", str(tmp_path / "s")]) == cli.EXIT_BAD_INPUT
    assert "not an ONNX export" in capsys.readouterr().err
    assert cli.main(["web", str(folder), "--out", str(site_dir)]) == cli.EXIT_BAD_INPUT
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_real_smollm2_page_answers_paris(tmp_path):
    """The real default model, converted (training-free, the build's latent 256) and exported with 8-bit weights and
    cache, answers in the browser as it does natively."""
    from edge_mla.convert import calibrate_and_convert
    from edge_mla.export import onnx as onnx_export
    from edge_mla.convert import named_plan
    from edge_mla.source import load_source

    src = load_source("smollm2-135m")
    calibrate_and_convert(src, named_plan("training-free", src.model.config), calib_windows=4, calib_length=512)
    folder = onnx_export.export("smollm2-135m", tmp_path / "onnx", weight_bits=8, kv_bits=8, model=src.model,
                                tokenizer=src.tokenizer)
    site_dir = web.build_site(folder, tmp_path / "site")
    got = web.headless_run(site_dir, {"prompt": "The capital of France is", "tokens": 8, "threads": 2}, timeout=600)
    assert "Paris" in got["text"], got["text"]
    # float32 in the browser, int8 activations natively: the first tokens agree (they drift apart later, docs/phones.md)
    assert got["tokens"][:4] == runner(site_dir / "model", "The capital of France is", 8)["tokens"][:4]
