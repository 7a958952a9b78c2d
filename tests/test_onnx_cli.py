"""The ONNX export and run commands: what they write and print, and the bad input they refuse with the fix named,
leaving nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import word_tokenizer, export, tiny_model
from edge_mla import cli
from edge_mla.mla_folder import save
from edge_mla.export import onnx as onnx_export
from edge_mla.runtimes.onnxruntime import META, OnnxDecoder, Tokenizer


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, mla_model):
    folder = tmp_path_factory.mktemp("conv") / "mla"
    save(mla_model, word_tokenizer(), folder)
    return folder


def test_cli_export_and_run(capsys, tmp_path, converted_dir):
    out = tmp_path / "onnx"
    code, stdout, err = run(capsys, "export", "onnx", converted_dir, "--out", out, "--weight-bits", 32)
    assert code == 0, err
    assert "wrote" in stdout and (out / "model.onnx").exists() and (out / "tokenizer.json").exists()
    code, stdout, err = run(capsys, "run", out, "--prompt", "w3 w4 w5", "--max-new-tokens", 6, "--threads", 1)
    assert code == 0, err
    assert stdout.startswith("w3 w4 w5") and "tok/s" in err and "cache" in err and "MB in use" in err
    # a 40-word prompt read in the expanded form (one piece of 40 >= the threshold) and in the absorbed one
    # (chunks of 5): the same greedy continuation
    words = " ".join(f"w{3 + i % 90}" for i in range(40))
    texts = []
    for chunk in ([], ["--prefill-chunk", 5]):
        code, stdout, err = run(capsys, "run", out, "--prompt", words, "--max-new-tokens", 8, "--threads", 1, *chunk)
        assert code == 0, err
        texts.append(stdout)
    assert texts[0] == texts[1] and len(texts[0]) > len(words)
    code, _, err = run(capsys, "run", out, "--prompt", words, "--prefill-chunk", 0)
    assert code == 2 and "--prefill-chunk 0" in err
    code, _, err = run(capsys, "run", out, "--prompt", words, "--flash-attn", "on")
    assert code == 2 and "--flash-attn applies to .gguf files" in err


def test_runner_imports_neither_torch_nor_the_converter():
    code = ("import sys, edge_mla.runtimes.onnxruntime; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('edge_mla.convert', 'edge_mla.mla', "
            "'transformers'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("args,message", [
    (["--weight-bits", 3], "--weight-bits 3 is not supported"),
    (["--kv-bits", 2], "--kv-bits 2 is not supported"),
    (["--block-size", 24], "power of two"),
])
def test_unsupported_settings_are_refused(capsys, tmp_path, converted_dir, args, message):
    out = tmp_path / "onnx"
    code, _, err = run(capsys, "export", "onnx", converted_dir, "--out", out, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_model_that_is_not_converted_is_refused(capsys, tmp_path):
    folder = tmp_path / "original"
    tiny_model("mistral").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    code, _, err = run(capsys, "export", "onnx", folder, "--out", tmp_path / "o")
    assert code == 2 and "not a converted MLA model" in err and "edge-mla convert" in err and "--original" in err
    code, _, err = run(capsys, "export", "onnx", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_context_longer_than_the_model_allows(capsys, tmp_path, mla_model):
    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    limit = mla_model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"longer than the model allows \\({limit} tokens\\)"):
        OnnxDecoder(folder, context=limit + 1)
    code, _, err = run(capsys, "run", folder, "--prompt", "w3", "--max-new-tokens", limit + 5)
    assert code == 2 and "longer than the model allows" in err


def test_onnxruntime_too_old_for_the_int4_cache(tmp_path, mla_model, monkeypatch):
    import onnxruntime

    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    meta = json.loads((folder / META).read_text())
    meta["min_onnxruntime"], meta["cache"]["dtype"] = "1.27.0", "int4"  # as an int4 export says
    (folder / META).write_text(json.dumps(meta))
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.0")
    with pytest.raises(ValueError, match=r"needs onnxruntime >= 1.27.0 \(installed 1.26.0\): pip install -U onnxruntime"):
        OnnxDecoder(folder)
    with pytest.raises(ValueError, match="int4 cache needs onnxruntime >= 1.27.0"):
        export(mla_model, tmp_path / "onnx4", weight_bits=32, kv_bits=4)
    assert not (tmp_path / "onnx4").exists()


def test_failed_export_leaves_nothing(tmp_path, mla_model, monkeypatch):
    def broken(folder):
        raise RuntimeError("onnxruntime could not load it")
    monkeypatch.setattr(onnx_export, "smoke_test", broken)
    with pytest.raises(RuntimeError):
        export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(capsys, tmp_path, converted_dir):
    out = tmp_path / "onnx"
    out.mkdir()
    code, _, err = run(capsys, "export", "onnx", converted_dir, "--out", out, "--weight-bits", 32)
    assert code == 2 and "--force" in err


def test_chat_wrapping_is_rendered_at_export(tmp_path, mla_model):
    tokenizer = word_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}{% if add_generation_prompt %} w5{% endif %}"
    folder = onnx_export.export("tiny", tmp_path / "onnx", model=mla_model, tokenizer=tokenizer, weight_bits=32)
    tok = Tokenizer(folder, json.loads((folder / META).read_text()))
    assert tok.encode("w9", chat=True) == [3, 9, 4, 5]


# ---------------------------------------------------------------------------------------------------------------
