"""GGUF export, checked in llama.cpp itself: the deepseek2 (MLA) file of a converted model gives the PyTorch
MLA model's logits and greedy tokens, runs with q8_0/q4_0 caches of exactly layers x (C + R) per token, and
our own checks refuse broken files first. Tiny random models with a tiny byte-level BPE tokenizer (no
download); one slow test on the real SmolLM2-135M."""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest

from conftest import NEW, PROMPT, corpus, prompt_ids, tiny, torch_logits_and_greedy
from edge_mla import cli
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.export import gguf as export_gguf
from edge_mla.runtimes import llamacpp

# Every llama.cpp test first needs a llama.cpp that runs here: a build for another CPU dies with SIGILL, and a dead
# pytest process would hide every other result; the probe runs in a child process and fails these tests instead.
needs_llama = pytest.mark.usefixtures("llama_cpp_runs")



@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(corpus(4000, seed=1))
    return path


def converted_folder(tmp_path, tokenizer, kind: str, plan: Plan):
    model = tiny(kind, len(tokenizer))
    ids = tokenizer(corpus(600, seed=2), return_tensors="pt").input_ids[0]
    stats = collect_stats(model, ids[: 4 * 48].view(4, 48))
    convert(model, plan, stats, source=kind)
    folder = tmp_path / f"{kind}-{plan.selection}"
    save(model, tokenizer, folder)
    return folder


def export(folder, out, text_file, **kw):
    kw.setdefault("calib_windows", 2)
    kw.setdefault("calib_length", 64)
    return export_gguf.export(folder, out, text=str(text_file), **kw)


def assert_llama_cpp_matches_pytorch(path, model, n_vocab: int) -> None:
    """F32 weights and cache: llama.cpp's logits within 1e-4 of PyTorch's, and the same NEW greedy tokens."""
    ids = prompt_ids(n_vocab)
    want_logits, want_tokens = torch_logits_and_greedy(model, ids, NEW)
    lm = llamacpp.open_model(path, n_ctx=256, threads=2, kv_type="f32", logits_all=True)
    got = llamacpp.prompt_logits(lm, ids)
    assert np.abs(got - want_logits).max() <= 1e-4 * max(np.abs(want_logits).max(), 1.0)
    assert llamacpp.greedy(lm, ids, NEW)[0] == want_tokens


# --- no llama.cpp needed --------------------------------------------------------------------------------------

def test_rope_layout_partition_and_shared_are_exact_prefixes():
    base, d = 10000.0, 16
    inv = base ** (-np.arange(0, d, 2) / d)
    part = export_gguf.rope_layout([inv[:4], inv[:4]], base, d, latent_dim=24, align=32)
    assert (part.stride, part.latent_dim, part.rope_dim) == (1, 32, 32)  # C 24 -> 32, R 8 -> 32 (exact zeros)
    assert math.isclose(part.freq_base, base ** (32 / d))
    assert part.channel_of[0].tolist() == [0, 1, 2, 3]
    # channel j must have the folder's frequency: freq_base^(-2j/R') = inv[j]
    assert np.allclose(part.freq_base ** (-2 * np.arange(4) / part.rope_dim), inv[:4])
    shared = export_gguf.rope_layout([inv], base, d, latent_dim=32, align=1)
    assert (shared.rope_dim, shared.freq_base) == (16, base)
    strided = export_gguf.rope_layout([inv[[0, 2, 4, 6]]], base, d, latent_dim=8, align=1)
    assert (strided.stride, strided.rope_dim) == (2, 8)
    assert np.allclose(strided.freq_base ** (-2 * np.arange(4) / 8), inv[[0, 2, 4, 6]])


def test_rope_layout_refuses_frequencies_shared_across_kv_heads():
    inv = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    with pytest.raises(ValueError, match="partition.*shared"):
        export_gguf.rope_layout([inv[[0, 1, 0, 1]]], 10000.0, 16, 16, 32, "high")
    with pytest.raises(ValueError, match="plain RoPE grid"):
        export_gguf.rope_layout([inv[:4] / 3.7], 10000.0, 16, 16, 32)


def test_latent_scale_keeps_the_norm_exact_or_says_why():
    eps = float(np.float32(1e-5))
    beta, headroom = export_gguf.latent_scale([0.5, 30.0], eps)
    assert beta <= 2.0 ** -30 and headroom >= export_gguf.HEADROOM
    assert np.float32(beta * beta * 30.0) + np.float32(eps) == np.float32(eps)  # divisor is exactly sqrt(eps)
    with pytest.raises(ValueError, match="latent's mean square"):
        export_gguf.latent_scale([1e30], eps)


def test_high_selection_with_several_kv_heads_is_refused(tmp_path, tokenizer, text_file):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("high", 2, 24, weighting="weights"))
    with pytest.raises(ValueError, match="--selection partition"):
        export(folder, tmp_path / "x.gguf", text_file)
    assert not list(tmp_path.glob("*.gguf*"))


def test_qwen2_biases_are_refused(tmp_path, tokenizer, text_file):
    folder = converted_folder(tmp_path, tokenizer, "qwen2", Plan("partition", 2, 24))
    with pytest.raises(ValueError, match="nonzero q_proj bias"):
        export(folder, tmp_path / "x.gguf", text_file)


def test_wrong_shape_is_refused_by_our_check(tmp_path, tokenizer, text_file, capsys):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    good, _ = export(folder, tmp_path / "good.gguf", text_file, weights="f32")
    bad = rewrite(good.path, tmp_path / "bad.gguf", "blk.1.attn_k_b.weight", lambda a: a[:, :-1, :])
    with pytest.raises(llamacpp.GGUFError, match=r"blk\.1\.attn_k_b\.weight has shape"):
        llamacpp.check_gguf(bad)
    code = cli.main(["run", str(bad), "--prompt", "the city"])
    assert code == 2 and "attn_k_b" in capsys.readouterr().err
    extra = rewrite(good.path, tmp_path / "extra.gguf", None, None, add=("rope_freqs.weight", np.ones(16, np.float32)))
    with pytest.raises(llamacpp.GGUFError, match="unexpected tensor rope_freqs"):
        llamacpp.check_gguf(extra)


def test_each_version_of_a_file_is_parsed_once(tmp_path, tokenizer, text_file, monkeypatch):
    """A build reads its files' headers for the budget, quality, speed and run settings: parsed once, and again only
    when the file changed."""
    import os

    from edge_mla.runtimes import gguf_file

    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    good, _ = export(folder, tmp_path / "good.gguf", text_file, weights="f32")
    parsed = []
    real = gguf_file.GGUFReader
    monkeypatch.setattr(gguf_file, "GGUFReader", lambda path: parsed.append(path) or real(path))
    first = llamacpp.check_gguf(good.path)  # (the export checked it under its staging name)
    assert llamacpp.check_gguf(good.path) is first and llamacpp.check_gguf(str(good.path)) is first
    assert len(parsed) == 1
    stat = good.path.stat()
    os.utime(good.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten: parsed again
    again = llamacpp.check_gguf(good.path)
    assert again is not first and again == first and len(parsed) == 2
    bad = rewrite(good.path, tmp_path / "bad.gguf", "blk.1.attn_k_b.weight", lambda a: a[:, :-1, :])
    for _ in range(2):  # a refusal is never remembered as a pass
        with pytest.raises(llamacpp.GGUFError):
            llamacpp.check_gguf(bad)


def rewrite(src, dst, name, change, add=None):
    """Copy a GGUF, changing one F32 tensor (or adding one): a way to make a file llama.cpp would refuse."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "deepseek2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main = field.types[0]
        writer.add_key_value(key, field.contents(), main, field.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == name:
            data = change(data)
        writer.add_tensor(t.name, data, raw_dtype=None if t.tensor_type in (0, 1) else t.tensor_type)
    if add:
        writer.add_tensor(*add)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_hf_tokenizer_keys(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    fields = {k: v for k, v, *_ in export_gguf.tokenizer_fields_from_hf(tmp_path, len(tokenizer) + 2)}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[1] == "<s>" and tokens[-1] == f"[PAD{len(tokenizer) + 1}]"
    assert fields["tokenizer.ggml.token_type"][1] == 3  # CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="more than the model"):
        export_gguf.tokenizer_fields_from_hf(tmp_path, 10)


# --- in llama.cpp ------------------------------------------------------------------------------------------------

CASES = [("llama-gqa", Plan("partition", 2, 24)), ("mistral", Plan("shared", None, 24)),
         ("llama-mha", Plan("partition-2norm", 2, 40))]


@needs_llama
@pytest.mark.parametrize("kind,plan", CASES, ids=[f"{k}-{p.selection}" for k, p in CASES])
def test_mla_gguf_matches_pytorch_in_llama_cpp(tmp_path, tokenizer, text_file, kind, plan):
    folder = converted_folder(tmp_path, tokenizer, kind, plan)
    info, _ = export(folder, tmp_path / "m.gguf", text_file, weights="f32")
    assert info.is_mla and info.latent_dim % 32 == 0 and (info.latent_dim + info.rope_dim) % 32 == 0
    assert_llama_cpp_matches_pytorch(info.path, load(folder)[0], info.n_vocab)


@needs_llama
def test_learned_latent_norm_exports_exactly_and_frees_kv_a(tmp_path, tokenizer, text_file):
    from conftest import with_latent_norms

    model = tiny("llama-gqa", len(tokenizer))
    ids = tokenizer(corpus(600, seed=2), return_tensors="pt").input_ids[0]
    convert(model, Plan("partition", 2, 32), collect_stats(model, ids[: 4 * 48].view(4, 48)), source="llama-gqa")
    save(with_latent_norms(model), tokenizer, tmp_path / "normed")
    info, notes = export(tmp_path / "normed", tmp_path / "m.gguf", text_file, weights="f32")
    assert any("learned" in n for n in notes)
    assert "edge_mla.latent_scale" not in gguf.GGUFReader(info.path).fields
    assert_llama_cpp_matches_pytorch(info.path, load(tmp_path / "normed")[0], info.n_vocab)
    # no eps-dominance scaling to protect: kv_a is quantized like every other projection
    info, _ = export(tmp_path / "normed", tmp_path / "q.gguf", text_file, weights="q4_0")
    assert info.tensor_types["blk.0.attn_kv_a_mqa.weight"].name == "Q4_0"


@needs_llama
@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_mla_cache_in_llama_cpp_is_layers_times_latent_plus_rope(tmp_path, tokenizer, text_file, kv_type):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    info, _ = export(folder, tmp_path / "m.gguf", text_file, weights="f16")
    C, R = info.latent_dim, info.rope_dim
    lm = llamacpp.open_model(info.path, n_ctx=8192, threads=2, kv_type=kv_type, logits_all=True)
    cache = lm.kv_cache()
    block, size = {"f16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18)}[kv_type]
    per_token = info.n_layer * (C + R) // block * size
    assert per_token == info.kv_bytes_per_token(kv_type)
    assert (cache["k_type"], cache["layers"]) == (kv_type, info.n_layer)
    assert cache["v_mib"] == 0.0  # the MLA cache is K only: V is a view of its first C numbers
    assert abs(cache["k_mib"] - per_token * cache["cells"] / 2 ** 20) <= 0.005  # llama.cpp logs 2 decimals
    model, _ = load(folder)
    ids = prompt_ids(info.n_vocab)
    want, _ = torch_logits_and_greedy(model, ids, 1)
    got = llamacpp.prompt_logits(lm, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{kv_type} cache: max logit error {err:.4f} of the largest logit")
    assert err < {"f16": 0.01, "q8_0": 0.05, "q4_0": 0.6}[kv_type]  # measured 0.002, 0.022, 0.30


@needs_llama
def test_unaligned_cache_is_refused_before_llama_cpp(tmp_path, tokenizer, text_file):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    info, _ = export(folder, tmp_path / "m.gguf", text_file, weights="f16", align=1)
    assert (info.latent_dim, info.rope_dim) == (24, 8)
    with pytest.raises(ValueError, match="--align 32"):
        llamacpp.open_model(info.path, n_ctx=128, kv_type="q8_0")
    llamacpp.open_model(info.path, n_ctx=128, kv_type="f16")  # an f16 cache needs no alignment


@needs_llama
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_original_model_exports_as_plain_gguf(tmp_path, tokenizer, kind):
    model = tiny(kind, len(tokenizer))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info, _ = export_gguf.export(folder, tmp_path / "o.gguf", weights="f32")
    assert info.arch == ("qwen2" if kind == "qwen2" else "llama") and not info.is_mla
    assert_llama_cpp_matches_pytorch(info.path, model, info.n_vocab)


@needs_llama
@pytest.mark.parametrize("weights", ["q8_0", "q4_0", "q4_k"])
def test_quantized_weights_keep_what_must_stay_float(tmp_path, tokenizer, text_file, weights):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    info, _ = export(folder, tmp_path / "q.gguf", text_file, weights=weights)
    types = info.tensor_types
    assert types["blk.0.attn_kv_a_mqa.weight"].name == "BF16"  # the latent-norm trick needs an 8-bit exponent
    assert types["blk.0.attn_kv_a_norm.weight"].name == "F32"
    assert types["blk.0.attn_k_b.weight"].name == "F16"  # rows of N = 12: no multiple of 32
    quantized = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": None}[weights]
    if quantized:
        assert types["blk.0.ffn_up.weight"].name == quantized
    else:  # llama.cpp's Q4_K_M mix: rows of 64 are not a multiple of 256, so it falls back to 32-blocks
        assert types["blk.0.ffn_up.weight"].name not in ("F32", "F16")
    model, _ = load(folder)
    ids = prompt_ids(info.n_vocab)
    want, _ = torch_logits_and_greedy(model, ids, 1)
    lm = llamacpp.open_model(info.path, n_ctx=128, threads=2, kv_type="q8_0", logits_all=True)
    got = llamacpp.prompt_logits(lm, ids)
    assert np.isfinite(got).all()
    assert np.corrcoef(got[-1], want[-1])[0, 1] > 0.9  # quantized, still the same model


@needs_llama
def test_cli_export_and_run(tmp_path, tokenizer, text_file, capsys):
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    out = tmp_path / "cli.gguf"
    code = cli.main(["export", "gguf", str(folder), "--out", str(out), "--weights", "q8_0", "--text", str(text_file),
                     "--calib-windows", "2", "--calib-length", "64"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "deepseek2 MLA" in captured.out and out.exists()
    code = cli.main(["export", "gguf", str(folder), "--out", str(out)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    code = cli.main(["run", str(out), "--prompt", "the city of", "--max-new-tokens", "5", "--kv-type", "q8_0",
                     "--threads", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "bytes/token" in captured.err


# --- the real model ----------------------------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_smollm2_mla_gguf_in_llama_cpp(tmp_path):
    """The CLI's default conversion of the real SmolLM2-135M (shared rope head R=64, C=256), exported with F16
    weights: llama.cpp gives PyTorch's next-token logits and greedy text, with a cache of 30 x 320 numbers."""
    from edge_mla.convert import convert_source
    from edge_mla.source import load_source

    folder = tmp_path / "smol-mla"
    convert_source(load_source("smollm2-135m"), Plan("shared", None, 256), folder, calib_windows=2,
                   calib_length=512)
    info, _ = export_gguf.export(folder, tmp_path / "smol.gguf", weights="f16", calib_windows=2)
    assert (info.latent_dim, info.rope_dim, info.n_layer) == (256, 64, 30)
    model, tok = load(folder)
    ids = tok(EIFFEL).input_ids[:PROMPT]
    assert len(ids) == PROMPT
    want_logits, want_tokens = torch_logits_and_greedy(model, ids, NEW)
    lm = llamacpp.open_model(info.path, n_ctx=4096, threads=2, kv_type="f16", logits_all=True)
    assert lm.llm.tokenize(EIFFEL.encode(), add_bos=False)[:PROMPT] == ids  # the GGUF's own tokenizer agrees
    got = llamacpp.prompt_logits(lm, ids)
    err = np.abs(got - want_logits).max(-1)
    # F16 weights and cache through 30 layers (measured: max 0.077, median 0.028 on logits up to ~38)
    assert err.max() < 0.5 and np.median(err) < 0.1
    assert (got.argmax(-1) == want_logits.argmax(-1)).mean() >= 0.95
    assert llamacpp.greedy(lm, ids, NEW)[0] == want_tokens
    cache = lm.kv_cache()
    assert cache["v_mib"] == 0.0
    assert abs(cache["k_mib"] - 30 * 320 * 2 * cache["cells"] / 2 ** 20) <= 0.005


EIFFEL = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
          "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
          "nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the centrepiece of the "
          "1889 World's Fair, and to crown the centennial anniversary of the French Revolution.")


@needs_llama
def test_gguf_says_what_it_is_and_run_uses_its_cache_type(tmp_path, tokenizer, text_file, capsys):
    from gguf import GGUFReader

    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    out = tmp_path / "named.gguf"
    code = cli.main(["export", "gguf", str(folder), "-o", str(out), "--bits", "8", "--kv-bits", "8",
                     "--text", str(text_file), "--calib-windows", "2", "--calib-length", "64"])
    assert code == 0, capsys.readouterr().err
    fields = GGUFReader(out).fields
    # the source model's name (the converted folder only remembers it), not the folder's
    assert fields["general.name"].contents() == "llama-gqa" != folder.name
    assert fields["edge_mla.cache_type"].contents() == "q8_0"
    record = json.loads(fields["edge_mla.provenance"].contents())
    assert record["source"] == "llama-gqa" and record["kv_bits"] == 8 and record["versions"]["gguf"]
    assert llamacpp.check_gguf(out).cache_type == "q8_0"
    capsys.readouterr()
    assert cli.main(["run", str(out), "-p", "the city of", "-n", "3", "--threads", "1"]) == 0
    assert "KV cache q8_0" in capsys.readouterr().err  # no --kv-type given: the recorded one
    assert cli.main(["run", str(out), "-p", "the city of", "-n", "3", "--threads", "1", "--kv-bits", "16"]) == 0
    err = capsys.readouterr().err
    assert "KV cache f16" in err and "flash attention off" in err  # an f16 cache runs without it unless asked
    # the report's printed setting (runsettings.py): an f16 cache with flash attention on
    assert cli.main(["run", str(out), "-p", "the city of", "-n", "3", "--threads", "1", "--kv-type", "f16",
                     "--flash-attn", "on"]) == 0
    assert "KV cache f16: " in (err := capsys.readouterr().err) and "flash attention on" in err
    assert cli.main(["run", str(out), "-p", "x", "--kv-type", "q8_0", "--flash-attn", "off"]) == 2
    assert "needs flash attention" in capsys.readouterr().err


def test_export_without_kv_bits_takes_the_one_cache_policy(tmp_path, tokenizer, text_file):
    """A training-free conversion at 4-bit weights is meant for a q8_0 cache, a recovered one for q4_0, the
    original for q4_0 (precision.default_cache_bits), as `edge-mla build` and `export onnx` decide."""
    folder = converted_folder(tmp_path, tokenizer, "llama-gqa", Plan("partition", 2, 24))
    free = tmp_path / "free.gguf"
    export(folder, free, text_file, weights="q4_0")
    assert llamacpp.check_gguf(free).cache_type == "q8_0"
    model, tok = load(folder)
    model.config.mla["recovery"] = {"steps_per_layer": 1}
    recovered = save(model, tok, tmp_path / "recovered")
    export(recovered, tmp_path / "rec.gguf", text_file, weights="q4_0")
    assert llamacpp.check_gguf(tmp_path / "rec.gguf").cache_type == "q4_0"
    export(folder, tmp_path / "f16.gguf", text_file, weights="f16")
    assert llamacpp.check_gguf(tmp_path / "f16.gguf").cache_type == "f16"
