"""Shared by the test modules (none imports another): tiny random models built inside the tests (no download:
Llama MHA and GQA, Mistral, Qwen2 with q/k/v biases), their tokenizers and text, the llama.cpp probe fixture, and
the converters and exporters' tiny-model shortcuts."""
from __future__ import annotations

import random

import pytest
import numpy as np
import torch

from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.export import gguf as export_gguf
from edge_mla.export import onnx as onnx_export
from edge_mla.mla_folder import save
from edge_mla.runtimes import llamacpp
from edge_mla.source import _finish, Source

VOCAB = 96
PROMPT, NEW = 64, 32  # the GGUF tests' prompt and greedy tokens


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
                  initializer_range=0.15, tie_word_embeddings=False)
    if kind == "llama-mha":
        config = LlamaConfig(num_key_value_heads=4, **common)
    elif kind == "llama-gqa":
        config = LlamaConfig(num_key_value_heads=2, **common)
    elif kind == "mistral":
        config = MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    elif kind == "qwen2":
        config = Qwen2Config(num_key_value_heads=2, **common)
    elif kind == "llama-bias":  # Llama with attention_bias=True: q/k/v and o biases
        config = LlamaConfig(num_key_value_heads=2, attention_bias=True, **common)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so the bias paths are really exercised
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    return _finish(Source(model, None, kind, None)).model


KINDS = ["llama-mha", "llama-gqa", "mistral", "qwen2"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def calibration_windows(seed: int = 1, n: int = 4, length: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def stats_for(model):
    return collect_stats(model, calibration_windows())


def prompt(length: int = 40, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, length), generator=g)


def with_latent_norms(model, seed: int = 0):
    """Give a converted model learned-looking latent norms: installed as the recovery does but far from linear (eps
    a tenth of the latent's median mean square, not the recovery's 10x), then each channel's weight spread by a
    random factor in [0.5, 1.5] (a uniform weight would hide a channel mix-up)."""
    from edge_mla import latent
    from edge_mla.mla import mla_layers

    g = torch.Generator().manual_seed(seed)
    E = model.config.hidden_size
    latent.install_latent_norms(model, [torch.randn(2, 16, E, generator=g) for _ in mla_layers(model)], softness=0.1)
    with torch.no_grad():
        for attn in mla_layers(model):
            attn.latent_norm.weight.mul_(0.5 + torch.rand(attn.latent_dim, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by test modules: tokenizers, text, tiny models for llama.cpp and onnxruntime.

try:
    import llama_cpp  # noqa: F401  (is llama.cpp installed?)
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which this be "
         "city river music school house paper water light garden window market summer winter table").split()


def corpus(n_words: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(6, 14)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)) + rng.choice([".", ",", "!", "?"]))
        n_words -= k
    return "\n".join(lines)


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 style) tokenizer trained on the test corpus: llama.cpp can load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def randomize_biases(model) -> None:
    """q/k/v biases, where the architecture has them, large enough that dropping one would show."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)


def tiny(kind: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.15,
                  tie_word_embeddings=kind == "mistral", bos_token_id=1, eos_token_id=2)
    config = {"llama-mha": lambda: LlamaConfig(num_key_value_heads=4, **common),
              "llama-gqa": lambda: LlamaConfig(num_key_value_heads=2, **common),
              "mistral": lambda: MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
              "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **common)}[kind]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_biases(model)
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def llama_cpp_runs(tmp_path_factory, tokenizer):
    if not HAVE_LLAMA:
        pytest.skip("llama-cpp-python (llama.cpp) is not installed; ./install.sh llama to run the GGUF tests")
    folder = tmp_path_factory.mktemp("probe") / "tiny-llama"
    tiny("llama-gqa", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = folder.parent / "probe.gguf"
    export_gguf.export(folder, path, weights="f32")
    try:
        llamacpp.run_isolated(llamacpp.smoke, path)
    except llamacpp.RuntimeCrash as err:
        pytest.fail(f"llama.cpp does not run on this machine: {err}")


def prompt_ids(vocab: int, n: int = PROMPT, seed: int = 3) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def torch_logits_and_greedy(model, ids: list[int], n: int):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    return logits, out


def bf16_folder(root, kind, tokenizer):
    """A tiny model saved like a hub download: bf16, sharded, with an index."""
    folder = root / kind
    tiny(kind, len(tokenizer)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


LATENT = 24  # with the shared rope head of the tiny models (R = 16): cache 40 numbers per token per layer


def converted(kind: str, latent: int = LATENT):
    model = tiny_model(kind)
    convert(model, Plan(selection="shared", latent=latent), stats_for(model))
    return model


def export(model, out, **kw):
    return onnx_export.export("tiny", out, model=model, tokenizer=word_tokenizer(), **kw)


@pytest.fixture(scope="module")
def mla_model():
    return converted("llama-gqa")


@pytest.fixture
def text_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{i}" for i in rng.integers(3, VOCAB, 3000)))
    return path


# --- fine-tune fixtures (tests/test_finetune*.py, tests/test_selfdistill.py) ---

@pytest.fixture
def mla_dir(tmp_path):
    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    return save(model, word_tokenizer(), tmp_path / "mla")


@pytest.fixture
def phrases_file(tmp_path):
    # a learnable text: a few fixed phrases in a pseudo-random order
    phrases = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(12)) for i in range(6)]
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(phrases), (400,), generator=g).tolist()
    path = tmp_path / "train.txt"
    path.write_text(" ".join(phrases[i] for i in order))
    return path


@pytest.fixture
def q4_dir(tmp_path):
    """A tiny converted model whose cached row fits q4_0 blocks: C = 32, R = 32 (head width 64)."""
    from transformers import AutoModelForCausalLM, LlamaConfig


    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=False)
    model = _finish(Source(AutoModelForCausalLM.from_config(config), None, "tiny", None)).model
    convert(model, Plan(selection="shared", rope_pairs=16, latent=32), stats_for(model))
    return save(model, word_tokenizer(), tmp_path / "mla-q4")


@pytest.fixture
def original_and_mla(tmp_path):
    original = tiny_model("llama-gqa")
    original.save_pretrained(tmp_path / "orig")
    word_tokenizer().save_pretrained(tmp_path / "orig")
    convert(original, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    return tmp_path / "orig", save(original, word_tokenizer(), tmp_path / "mla")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, tokenizer):
    """A tiny Llama (GQA) folder with the tests' tokenizer: what `edge-mla build` is given in the build tests."""
    folder = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny("llama-gqa", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
