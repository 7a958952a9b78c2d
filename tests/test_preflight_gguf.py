"""A GGUF source is judged from its header and tensor list (preflight.check_gguf_header, source.check_gguf_source)
before transformers reads and de-quantizes it: an architecture edge-mla does not convert, what transformers' GGUF
loader would drop, and, for a GGUF build, attention biases (issue 25: Qwen2.5 was refused minutes in)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from edge_mla import cli, preflight, source
from edge_mla.plans import Plan
from conftest import tiny_model

E, H, K, F, V, LAYERS = 64, 4, 2, 96, 96, 2


def write_gguf(path, arch="llama", keys=None, biases=None, extra=()):
    """A tiny GGUF as llama.cpp lays one out: Q8_0 weights (so that reading them would mean de-quantizing), F32
    norms and `biases` ({"blk.0.attn_q.bias": array}); `keys` without the architecture prefix."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    for add, value in [(w.add_context_length, 512), (w.add_embedding_length, E), (w.add_block_count, LAYERS),
                       (w.add_feed_forward_length, F), (w.add_head_count, H), (w.add_head_count_kv, K),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0), (w.add_vocab_size, V)]:
        add(value)
    for key, value in (keys or {}).items():
        add = w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32
        add(f"{arch}.{key}", value)
    d = E // H
    shapes = {"token_embd": (V, E), "output": (V, E)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.{n}": s for n, s in [("attn_q", (H * d, E)), ("attn_k", (K * d, E)),
                                                       ("attn_v", (K * d, E)), ("attn_output", (E, H * d)),
                                                       ("ffn_gate", (F, E)), ("ffn_up", (F, E)), ("ffn_down", (E, F))]})
        for n in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{n}.weight", np.ones(E, np.float32))
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), QT.Q8_0),
                     raw_dtype=QT.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(E, np.float32))
    for name, array in [*(biases or {}).items(), *extra]:
        w.add_tensor(name, np.asarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_biases(model) -> dict:
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    return {f"blk.{i}.{gg}.bias": getattr(layer.self_attn, hf).bias.detach().numpy()
            for i, layer in enumerate(model.model.layers) for hf, gg in names.items()
            if getattr(layer.self_attn, hf).bias is not None}


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if anything loads or de-quantizes the model: transformers' GGUF path, source._load_gguf, or
    a de-quantization of anything but a bias (a few KB, read alone)."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    def fail(*a, **k):
        pytest.fail("the model was loaded")

    monkeypatch.setattr(source, "_load_gguf", fail)
    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    dequantize = gguf.quants.dequantize

    def only_biases(data, qtype):
        assert data.ndim == 1 and qtype == QT.F32, "a weight was de-quantized"
        return dequantize(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", only_biases)


def test_qwen2_biases_refused_for_gguf_before_loading_with_check_s_message(tmp_path, nothing_loaded):
    model = tiny_model("qwen2")  # Qwen2: q/k/v biases, as Qwen2.5
    path = write_gguf(tmp_path / "qwen.gguf", "qwen2", biases=model_biases(model))
    with pytest.raises(ValueError) as header:
        preflight.check_gguf_header(str(path), ("onnx", "gguf"))
    message = str(header.value)
    assert "nonzero q_proj bias" in message and message.endswith("Fix: build onnx only with --formats onnx "
                                                                 "(docs/models.md)")
    with pytest.raises(ValueError) as later:  # the refusal the build gave after loading: word for word
        preflight.check(model, Plan(), ("onnx", "gguf"), originals=True)
    assert message == str(later.value)
    preflight.check_gguf_header(str(path), ("onnx",))  # ONNX carries the biases


def test_zero_biases_and_plain_files_pass(tmp_path, nothing_loaded):
    zero = {f"blk.{i}.attn_{p}.bias": np.zeros(E if p == "q" else E // H * K) for i in range(LAYERS) for p in "qkv"}
    preflight.check_gguf_header(write_gguf(tmp_path / "zero.gguf", "qwen2", biases=zero), ("onnx", "gguf"))
    preflight.check_gguf_header(write_gguf(tmp_path / "llama.gguf"), ("onnx", "gguf"))
    # Qwen3's heads are wider than hidden / heads: the key length is the head width its RoPE covers
    qwen3 = write_gguf(tmp_path / "qwen3.gguf", "qwen3", keys={"attention.key_length": 32,
                                                               "attention.value_length": 32,
                                                               "rope.dimension_count": 32})
    preflight.check_gguf_header(qwen3, ("onnx", "gguf"))
    preflight.check_gguf_header("smollm2-135m", ("onnx", "gguf"))  # not a .gguf path: nothing to decide here
    preflight.check_gguf_header(tmp_path, ("onnx", "gguf"))


@pytest.mark.parametrize("arch, says", [("gemma2", "architecture 'gemma2' is not supported: Gemma 2 has"),
                                        ("gemma3", "architecture 'gemma3_text' is not supported: Gemma 3 has"),
                                        ("gpt2", "architecture 'gpt2' (RoPE) is not supported"),
                                        ("smollm3", "architecture 'smollm3' is not one transformers' GGUF loader")])
def test_architecture_refused_from_the_header(tmp_path, nothing_loaded, capsys, arch, says):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch)
    for formats in (("onnx", "gguf"), ("onnx",)):
        with pytest.raises(source.SourceError, match=says.replace("(", r"\(").replace(")", r"\)")):
            preflight.check_gguf_header(path, formats)
    with pytest.raises(source.SourceError, match=arch):  # `edge-mla convert -m FILE.gguf`: the same, via source.py
        source.load_source(str(path))
    assert cli.main(["convert", "--model", str(path), "--out", str(tmp_path / "o")]) == 2
    assert arch in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch, keys, biases, extra, says", [
    ("llama", {}, {}, [("rope_freqs.weight", np.ones(8))], "rope_freqs.weight tensor"),
    ("qwen2", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, {}, [], "'yarn' RoPE scaling"),
    ("phi3", {"rope.dimension_count": 12}, {}, [], "partial rotary (RoPE on 12 of 16 head dims)"),
    ("llama", {}, "llama-bias", [], "attn_k.bias, attn_output.bias, attn_q.bias, attn_v.bias tensors"),
    ("qwen2", {}, {"blk.0.attn_output.bias": np.ones(E)}, [], "attn_output.bias tensors"),
])
def test_what_transformers_would_drop_is_refused(tmp_path, nothing_loaded, arch, keys, biases, extra, says):
    biases = model_biases(tiny_model(biases)) if isinstance(biases, str) else biases
    path = write_gguf(tmp_path / "m.gguf", arch, keys, biases, extra)
    with pytest.raises(source.SourceError) as err:
        preflight.check_gguf_header(path, ("onnx",))
    assert says in str(err.value) and "Give the model's Hugging Face folder instead" in str(err.value)


def test_a_file_that_is_not_gguf(tmp_path, nothing_loaded):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(source.SourceError, match="not a GGUF model that transformers can read"):
        preflight.check_gguf_header(fake, ("onnx", "gguf"))
