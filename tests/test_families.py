"""The families edge users deploy, on tiny random models built from each family's own transformers configuration
class (its real architecture flags, tiny widths): converted at full rank with every rope component kept, the MLA
model equals the original (Phi-3, Phi-4-mini's partial rotary, SmolLM3's NoPE layers) or stays within the stated
bound (Qwen3's q/k norms, approximated); the ONNX export equals the PyTorch MLA model; the GGUF export equals it in
llama.cpp; what an exporter cannot express is refused by the preflight, exit 2, before any work."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import calibration_windows, corpus, prompt, prompt_ids, torch_logits_and_greedy
from edge_mla import cli, families, preflight
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.source import Source, SourceError, _finish, check_architecture

TOL = 1e-4
# Qwen3 on the tiny random model: the per-head 1/rms of q and k varies ~20% over tokens (16-dim heads), so the
# calibrated constants move logits by up to this share of the largest logit (measured 0.83; docs/models.md).
QWEN3_BOUND = 0.9
FAMILIES = ["phi3", "phi4-mini", "smollm3", "qwen3"]


def family_model(kind: str, vocab: int = 96, seed: int = 0):
    """A tiny random model of the family's own configuration class (original, not normalized)."""
    from transformers import AutoModelForCausalLM, Phi3Config, Qwen3Config, SmolLM3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.15,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    config = {"phi3": lambda: Phi3Config(**common),  # Phi-3-mini: fused qkv_proj and gate_up_proj
              "phi4-mini": lambda: Phi3Config(partial_rotary_factor=0.75, **common),  # rotates 3/4 of each head
              "smollm3": lambda: SmolLM3Config(**common),  # every 4th layer without RoPE (no_rope_layers)
              "qwen3": lambda: Qwen3Config(head_dim=16, **common)}[kind]()  # per-head q/k RMSNorm
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kind == "qwen3":
        with torch.no_grad():  # norm weights away from 1, as trained ones are
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def full_plan(model) -> Plan:
    """Full rank, every rope frequency and every rope component kept: the conversion must be exact."""
    return Plan("shared", None, None, rope_components=model.config.num_key_value_heads)


def converted(kind: str, vocab: int = 96, windows=None, plan=None):
    """(original logits on the prompt, converted MLA model); Qwen3's norms folded first, as the converter does."""
    original = family_model(kind, vocab)
    ids = prompt(seed=7) % vocab
    want = logits(original, ids)
    model = _finish(Source(copy.deepcopy(original), None, kind, None)).model
    windows = calibration_windows() if windows is None else windows
    if families.has_qk_norm(model):
        families.fold_qk_norms(model, windows)
    # (named by number: llama.cpp's vocab loader special-cases names with "phi3" in them and looks up <|end|>,
    # which a real Phi-3 tokenizer has and the tests' tiny one does not)
    convert(model, plan or full_plan(model), collect_stats(model, windows), source=f"tiny-{FAMILIES.index(kind)}")
    return want, model


@pytest.mark.parametrize("kind", ["phi3", "phi4-mini", "smollm3"])
def test_exact_families_convert_to_the_original(kind):
    want, model = converted(kind)
    assert (logits(model, prompt(seed=7)) - want).abs().max() < TOL
    mla = model.config.mla
    if kind == "phi4-mini":  # 6 of 8 pairs rotate: the other 2 are NoPE, never in the rope key
        assert mla["rotary_dim"] == 12 and mla["rope_dim"] == 2 * 6 * 2
    if kind == "smollm3":
        assert mla["nope_layers"] == [3]
        assert model.model.layers[3].self_attn.kv_a_proj.weight[mla["latent_dim"]:].abs().max() == 0


def test_phi3_becomes_an_equal_llama_and_smollm3_keeps_its_nope_layers():
    original = family_model("phi4-mini")
    model = _finish(Source(copy.deepcopy(original), None, "phi4", None)).model
    assert type(model).__name__ == "LlamaForCausalLM" and families.rotary_pairs(model.config) == 6
    assert (logits(model, prompt()) - logits(original, prompt())).abs().max() < 1e-5
    assert families.rope_layers(family_model("smollm3").config) == [True, True, True, False]


def test_qwen3_norms_are_approximated_within_the_stated_bound():
    want, model = converted("qwen3")
    err = float((logits(model, prompt(seed=7)) - want).abs().max() / want.abs().max())
    print(f"qwen3 tiny model: max logit error {err:.3f} of the largest logit")
    assert err < QWEN3_BOUND
    # the approximation is all of it: the MLA conversion of the folded model is exact
    folded = _finish(Source(family_model("qwen3"), None, "qwen3", None)).model
    families.fold_qk_norms(folded, calibration_windows())
    ref = logits(folded, prompt(seed=7))
    assert (ref - logits(model, prompt(seed=7))).abs().max() < TOL * ref.abs().max()


def test_gemma3_is_refused_with_its_reason(capsys, tmp_path):
    from transformers import Gemma3TextConfig

    with pytest.raises(SourceError, match="GeGLU"):
        check_architecture(Gemma3TextConfig())


@pytest.mark.parametrize("kind", FAMILIES)
def test_onnx_export_equals_pytorch_mla(tmp_path, kind):
    from edge_mla.export import onnx as onnx_export
    from edge_mla.runtimes.onnxruntime import OnnxDecoder
    from conftest import word_tokenizer

    _, model = converted(kind)
    folder = onnx_export.export("tiny", tmp_path / "onnx", model=model, tokenizer=word_tokenizer(), weight_bits=32,
                                kv_bits=32)
    ids = prompt()
    expected = logits(model, ids)[0].numpy()
    got = OnnxDecoder(folder, threads=1, context=64).forward(ids[0].numpy(), keep=ids.shape[1])
    assert np.abs(got - expected).max() < 1e-3


def test_formats_are_parsed_and_checked():
    assert preflight.parse_formats(None) == ("onnx", "gguf")
    assert preflight.parse_formats("gguf, onnx") == ("onnx", "gguf")
    assert preflight.parse_formats("onnx") == ("onnx",)
    with pytest.raises(ValueError, match="choose one or more of onnx, gguf"):
        preflight.parse_formats("onnx,tflite")


# --- GGUF: llama.cpp, or the preflight's refusal ---------------------------------------------------------------

@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_in_llama_cpp_equals_pytorch_mla(tmp_path, kind, tokenizer, llama_cpp_runs):
    from edge_mla.export import gguf as export_gguf
    from edge_mla.runtimes import llamacpp

    vocab = len(tokenizer)
    ids = tokenizer(corpus(600, seed=2), return_tensors="pt").input_ids[0]
    # one rope component (llama.cpp's one rope key holds each frequency once), every frequency, full rank
    _, model = converted(kind, vocab, ids[: 4 * 48].view(4, 48), Plan("shared"))
    folder = tmp_path / kind
    save(model, tokenizer, folder)
    text = tmp_path / "calib.txt"
    text.write_text(corpus(2000, seed=1))
    info, _ = export_gguf.export(folder, tmp_path / "m.gguf", weights="f32", text=str(text), calib_windows=2,
                                 calib_length=64)
    mla, _ = load(folder)
    ids = prompt_ids(info.n_vocab)
    want, _ = torch_logits_and_greedy(mla, ids, 1)
    lm = llamacpp.open_model(info.path, n_ctx=256, threads=2, kv_type="f32", logits_all=True)
    got = llamacpp.prompt_logits(lm, ids)
    assert np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1.0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_original_exports_equal_the_original(tmp_path, kind, tokenizer, llama_cpp_runs):
    """The baselines the build compares against: the original through ONNX (GroupQueryAttention) and GGUF
    (llama.cpp's own llama / qwen3 / smollm3), each equal to the original in PyTorch."""
    from edge_mla.export import gguf as export_gguf
    from edge_mla.export import onnx as onnx_export
    from edge_mla.runtimes import llamacpp
    from edge_mla.runtimes.onnxruntime import OnnxDecoder

    model = _finish(Source(family_model(kind, len(tokenizer)), tokenizer, f"tiny-{FAMILIES.index(kind)}",
                           None)).model
    ids = prompt_ids(len(tokenizer))
    want = logits(model, torch.tensor([ids]))[0].numpy()
    folder = onnx_export.export("tiny", tmp_path / "onnx", model=model, tokenizer=tokenizer, weight_bits=32,
                                kv_bits=32, original=True)
    got = OnnxDecoder(folder, threads=1, context=128).forward(np.array(ids), keep=len(ids))
    assert np.abs(got - want).max() < 1e-3
    src = Source(model, tokenizer, f"tiny-{FAMILIES.index(kind)}", None)
    info, _ = export_gguf.export(src, tmp_path / "o.gguf", weights="f32")
    assert info.arch == {"qwen3": "qwen3", "smollm3": "smollm3"}.get(kind, "llama")
    lm = llamacpp.open_model(info.path, n_ctx=256, threads=2, kv_type="f32", logits_all=True)
    assert np.abs(llamacpp.prompt_logits(lm, ids) - want).max() <= 1e-4 * max(np.abs(want).max(), 1.0)


def tiny_folder(tmp_path, tokenizer, config_class, **extra):
    from transformers import AutoModelForCausalLM

    from conftest import randomize_biases

    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=None, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_biases(model)
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # Llama 3.2's, context scaled down


@pytest.mark.parametrize("family,message", [
    ("llama3", "GGUF cannot carry the MLA model: layer 0: the rope frequencies are not on the plain RoPE grid"),  # partition
    ("qwen2.5", "GGUF cannot carry the MLA model: layer 0 has a nonzero q_proj bias"),
    ("smollm3", ("GGUF cannot carry the original, exported to compare: the original model's layers without RoPE "
                 "are not every 4th layer")),
])
def test_build_refuses_before_any_work(tmp_path, tokenizer, capsys, monkeypatch, family, message):
    from transformers import LlamaConfig, Qwen2Config, SmolLM3Config

    from edge_mla import convert as convert_module

    config_class, extra = {"llama3": (LlamaConfig, {"rope_parameters": LLAMA3}),
                           "qwen2.5": (Qwen2Config, {}), "smollm3": (SmolLM3Config, {"no_rope_layers": [1, 0]})}[family]
    folder = tiny_folder(tmp_path, tokenizer, config_class, **extra)
    monkeypatch.setattr(convert_module, "calibrate_and_convert", lambda *a, **k: pytest.fail("conversion ran"))
    capsys.readouterr()
    out = tmp_path / "build"
    selection = ["--selection", "partition"] if family == "llama3" else []  # (shared keeps the unscaled pairs)
    code = cli.main(["build", "--model", str(folder), "--device", "rpi5", "--out", str(out), "--recover-steps", "0",
                     *selection])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Fix:" in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_llama3_rope_key_keeps_the_unscaled_frequencies_for_gguf(tmp_path, tokenizer):
    from transformers import LlamaConfig

    from edge_mla.source import load_source

    model = load_source(str(tiny_folder(tmp_path, tokenizer, LlamaConfig, rope_parameters=LLAMA3))).model
    inv = model.model.rotary_emb.inv_freq.double()
    assert families.grid_pairs(inv, 500000.0, 16) == 1  # only the highest frequency is unscaled at this size
    plan, notes = preflight.check(model, Plan("shared"), ("onnx", "gguf"))
    assert plan.rope_pairs == 1 and "the 1 highest frequencies keep RoPE" in notes[0]
    plan, notes = preflight.check(model, Plan("shared"), ("onnx",))
    assert plan.rope_pairs == 8 and not notes  # ONNX carries every scaled frequency


def test_export_gguf_refuses_a_converted_llama3_before_any_work(tmp_path, tokenizer, capsys, monkeypatch):
    from transformers import LlamaConfig

    from edge_mla.convert import convert_source
    from edge_mla.source import load_source

    folder = tiny_folder(tmp_path, tokenizer, LlamaConfig, rope_parameters=LLAMA3)
    src = load_source(str(folder))
    mla_dir, _ = convert_source(src, Plan("shared", None, 24, weighting="weights"), tmp_path / "mla",
                                calib_windows=2, calib_length=64)
    from edge_mla import data
    monkeypatch.setattr(data, "calibration_windows", lambda *a, **k: pytest.fail("calibration ran"))
    capsys.readouterr()
    code = cli.main(["export", "gguf", str(mla_dir), "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "not on the plain RoPE grid" in err and "--rope-pairs 1" in err and "Traceback" not in err
    assert not list(tmp_path.glob("x.gguf*"))


def test_qwen3_builds_onnx_only(tmp_path, tokenizer, capsys):
    """The build with --formats onnx on a family that needs the new pieces: q/k norms folded during the conversion,
    the original exported with its norms to compare; no GGUF is written, the report prices ONNX only."""
    import json

    from transformers import Qwen3Config

    folder = tiny_folder(tmp_path, tokenizer, Qwen3Config, head_dim=16)
    out = tmp_path / "build"
    code = cli.main(["build", "--model", str(folder), "--device", "rpi5", "--out", str(out), "--recover-steps", "0",
                     "--quality-windows", "0", "--context", "256", "--bits", "16", "--kv-bits", "16",
                     "--formats", "onnx"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "q/k norms: approximated" in captured.out
    assert (out / "onnx").is_dir() and not (out / "model.gguf").exists()
    report = json.loads((out / "report.json").read_text())
    assert "qk_norm" in report["mla"]["approximations"] and report["files"] == {"onnx": "onnx"}
    assert {b["runtime"] for b in report["budgets"]} == {"onnxruntime"}
