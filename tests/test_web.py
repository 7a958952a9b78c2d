"""`edge-mla web`: the static page runs the ONNX export in headless Chromium (onnxruntime-web, WebAssembly) and gives
the same greedy tokens as edge-mla's own onnxruntime runner. (The real SmolLM2 build's page answers with Paris in
benchmarks/phones.py, docs/phones.md: converting SmolLM2 inside a test would cost minutes.)"""
from __future__ import annotations

import json
import shutil

import pytest

from edge_mla import cli
from edge_mla.export import web
from edge_mla.runtimes.onnxruntime import OnnxDecoder, Tokenizer, generate, read_meta
from test_onnx import converted, export

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("npm") is None,
                                reason="needs Chromium and npm (.ci/run installs them: apt-get install chromium)")
PROMPT = "w50 w60 w70"


def runner(folder, text: str, new: int, chat: bool = False) -> dict:
    tokenizer = Tokenizer(folder, read_meta(folder))
    ids = tokenizer.encode(text, chat=chat)
    result = generate(OnnxDecoder(folder, threads=1, context=len(ids) + new), tokenizer, ids, new)
    return {"prompt_ids": ids, **result}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """int4 weights (accuracy level 1: fp32 activations, what the WASM kernel computes) and an int4 latent cache:
    MatMulNBits, GatherBlockQuantized and GroupQueryAttention's packed int4 cache all run in the browser."""
    root = tmp_path_factory.mktemp("web")
    folder = export(converted("llama-gqa"), root / "onnx", weight_bits=4, kv_bits=4, accuracy_level=1)
    assert cli.main(["web", str(folder), "--out", str(root / "site")]) == 0
    return folder, root / "site"


def test_page_generates_the_runners_greedy_tokens(site):
    folder, site_dir = site
    got = web.headless_run(site_dir, {"prompt": PROMPT, "tokens": 24, "threads": 1}, timeout=120)
    expected = runner(folder, PROMPT, 24)
    assert got["prompt_ids"] == expected["prompt_ids"]
    assert len(expected["tokens"]) >= 8 and got["tokens"] == expected["tokens"]
    assert got["text"] == expected["text"] and got["tokens_per_second"] > 0
    meta = read_meta(folder)
    assert got["cache_bytes"] == (len(expected["prompt_ids"]) + len(got["tokens"]) - 1) * meta["cache"]["bytes_per_token"]


def test_site_is_self_contained_with_licenses(site):
    _, site_dir = site
    listed = json.loads((site_dir / "site.json").read_text())
    assert all((site_dir / f).is_file() for f in listed["files"])
    assert "int4 latent cache" in listed["runs"]
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
