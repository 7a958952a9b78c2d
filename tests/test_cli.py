"""The CLI on tiny model folders: convert, save, reload without the source, eval; and every bad input gives a
clear error (exit 2, a message naming the problem), never a traceback, and leaves nothing half-written."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import VOCAB, prompt, tiny_model, word_tokenizer
from edge_mla import cli
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save


@pytest.fixture
def model_dir(tmp_path):
    # (Qwen2's bias paths are covered in test_convert; AutoTokenizer would swap our word tokenizer for Qwen2's)
    folder = tmp_path / "tiny-mistral"
    tiny_model("mistral").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(2000)))
    return path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def small(text_file):
    return ["--calib-windows", 4, "--calib-length", 32, "--text", text_file]


def test_convert_then_reload_without_source_and_eval(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "mla"
    code, stdout, err = run(capsys, "convert", "--model", model_dir, "--out", out, "--selection", "partition",
                            "-r", 2, "--rank", 6, *small(text_file))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["mla"]["latent_dim"] == 12 and config["mla"]["rope_dim"] == 8
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()
    # reload: the source folder is gone, the converted folder alone is enough, and gives the same logits
    import shutil
    original = tiny_model("mistral")
    shutil.rmtree(model_dir)
    reloaded, tokenizer = load(out)
    assert tokenizer.convert_tokens_to_ids("w5") == 5
    code, stdout, err = run(capsys, "eval", out, "--text", text_file, "--windows", 2, "--length", 32,
                            "--prompt", "w3 w4 w5", "--max-new-tokens", 4)
    assert code == 0, err
    assert "perplexity" in stdout and "w3 w4 w5" in stdout
    ids = prompt()
    with torch.no_grad():
        got, reference = reloaded(ids).logits, original(ids).logits
    assert torch.isfinite(got).all()
    # compressed (rank 6 of 16 per KV head of a random model, measured 1.05 relative error): not the original's
    # logits, and not blown up either
    error = ((got - reference).norm() / reference.norm()).item()
    assert 1e-3 < error < 5.0


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="high", rope_pairs=2, latent=20, weighting="weights"))
    save(model, word_tokenizer(), tmp_path / "m")
    reloaded, _ = load(tmp_path / "m")
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("args,message", [
    (["--rank", 0], "must be positive"),
    (["--latent", 10_000], "above the full rank"),
    (["--latent", 13, "--svd", "split"], "must be even"),
    (["-r", 0], "out of range"),
    (["-r", 9], "out of range"),
    (["--selection", "partition", "-r", 5], "its own 5 frequency pairs"),
])
def test_impossible_plans_are_refused_before_any_work(capsys, tmp_path, model_dir, text_file, args, message):
    out = tmp_path / "mla"
    code, _, err = run(capsys, "convert", "--model", model_dir, "--out", out, *args, *small(text_file))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_bad_model_inputs(capsys, tmp_path, model_dir):
    missing = tmp_path / "nope.gguf"
    code, _, err = run(capsys, "convert", "--model", missing, "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    code, _, err = run(capsys, "convert", "--model", fake, "--out", tmp_path / "o")
    assert code == 2 and "not a GGUF model" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "convert", "--model", empty, "--out", tmp_path / "o")
    assert code == 2 and "no config.json" in err
    code, _, err = run(capsys, "convert", "--model", "./no/such/folder", "--out", tmp_path / "o")
    assert code == 2 and "not found" in err
    assert not (tmp_path / "o").exists()


def test_non_rope_architecture_is_refused(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(folder)
    code, _, err = run(capsys, "convert", "--model", folder, "--out", tmp_path / "o")
    assert code == 2 and "'gpt2'" in err and "not supported" in err


def test_existing_output_needs_force(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "mla"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", "--model", model_dir, "--out", out, *small(text_file))
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, _, err = run(capsys, "convert", "--model", model_dir, "--out", out, "--force", *small(text_file))
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_not_a_converted_model_for_load(tmp_path, model_dir):
    with pytest.raises(ValueError, match="not an MLA model"):
        load(model_dir)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, failure):
    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="high", rope_pairs=2, latent=20, weighting="weights"))
    tokenizer = word_tokenizer()

    def boom(*a, **k):
        raise failure("stopped while writing")
    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(failure):
        save(model, tokenizer, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_in_cli_exits_cleanly(capsys, tmp_path, model_dir, text_file, monkeypatch):
    import edge_mla.convert as conv

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(conv, "convert", interrupted)
    out = tmp_path / "mla"
    code, _, err = run(capsys, "convert", "--model", model_dir, "--out", out, *small(text_file))
    assert code == 130 and "nothing was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".mla")] == []


@pytest.mark.parametrize("command", [["build"], ["convert"], ["eval"], ["budget"], ["devices"], ["finetune"],
                                     ["export", "onnx"], ["export", "gguf"], ["run"], ["web"]])
def test_every_commands_help_renders_with_its_defaults(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and ("(default:" in out or command == ["devices"])
    if command == ["build"]:
        assert "--time-budget" in out and "(default: 10%)" in out and "--calib-text" in out
