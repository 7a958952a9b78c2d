"""Unit tests of the small shared modules: precision (one vocabulary of bits), speed (best of interleaved passes,
ratios per runtime). No model, no runtime: the measurements are replaced by scripted ones."""
from __future__ import annotations

import pytest

from edge_mla import precision, speed


def test_bits_name_the_same_precision_in_both_runtimes():
    for bits in precision.BITS:
        gguf, onnx = precision.gguf_cache_type(bits), precision.ONNX_CACHE_DTYPE[bits]
        assert precision.CACHE_BITS_OF_TYPE[gguf] == precision.ONNX_CACHE_BITS[onnx] == bits
    assert precision.gguf_weight_type(4) == "q4_0" and precision.gguf_cache_type(8) == "q8_0"
    with pytest.raises(ValueError, match="--kv-bits 3 is not supported: use 4, 8, 16"):
        precision.gguf_cache_type(3)


def test_cache_default_follows_the_weights_except_an_untrained_4_bit_build():
    assert precision.default_cache_bits(4, trained=True) == 4
    assert precision.default_cache_bits(4, trained=False) == 8  # a 4-bit cache breaks a training-free conversion
    assert precision.default_cache_bits(8, trained=False) == 8 and precision.default_cache_bits(16, False) == 16
    assert precision.head_bits(4) == 8 and precision.head_bits(8) is None


def test_speed_keeps_each_files_best_pass_and_ratios_are_mla_over_original(monkeypatch):
    from edge_mla.runtimes import gguf_file, llamacpp

    passes = {"mla.gguf": [(100.0, 20.0), (120.0, 18.0)], "orig.gguf": [(200.0, 40.0), (150.0, 44.0)]}
    onnx_passes = {"mla-onnx": [(300.0, 30.0), (290.0, 33.0)], "orig-onnx": [(310.0, 60.0), (330.0, 50.0)]}
    calls = []

    def fake_isolated(fn, path, prompts, n, settings, threads):
        calls.append((path, tuple(settings)))
        (cache, flash), = settings  # no other llama.cpp setting asked for
        return [(cache, flash, len(prompt), *passes[path].pop(0)) for prompt in prompts]

    monkeypatch.setattr(llamacpp, "run_isolated", fake_isolated)
    monkeypatch.setattr(gguf_file, "check_gguf", lambda path: path)
    monkeypatch.setattr(gguf_file, "runnable_cache_type", lambda info, kv: kv)
    monkeypatch.setattr(speed, "onnx_speed", lambda path, prompt, n, threads: onnx_passes[path].pop(0))
    files = {"mla": {"gguf": "mla.gguf", "onnx": "mla-onnx"}, "original": {"gguf": "orig.gguf", "onnx": "orig-onnx"}}
    rows = speed.measure(files, [list(range(64))], kv_type="q4_0", onnx_cache="int4", threads=2, repeats=2,
                         progress=lambda *_: None)
    assert [path for path, _ in calls] == ["mla.gguf", "orig.gguf", "mla.gguf", "orig.gguf"]  # interleaved passes
    assert {settings for _, settings in calls} == {(("q4_0", True),)}  # the priced cache, with flash attention
    got = {(r.model, r.runtime): (r.prefill_tokens_per_s, r.decode_tokens_per_s, r.cache) for r in rows}
    assert got[("mla", "llama.cpp")] == (120.0, 20.0, "q4_0")  # the best of each measure, pass by pass
    assert got[("original", "onnxruntime")] == (330.0, 60.0, "int4")
    table = speed.by_runtime(rows)
    assert table["llama.cpp"]["decode_ratio"] == round(20.0 / 44.0, 3)
    assert table["onnxruntime"]["prefill_ratio"] == round(300.0 / 330.0, 3)
    assert table["onnxruntime"]["prompt_tokens"] == 64 and table["llama.cpp"]["threads"] == 2


def test_other_llama_settings_run_once_in_the_same_child_and_stay_out_of_the_same_bits_comparison(monkeypatch):
    from edge_mla.runtimes import gguf_file, llamacpp

    calls = []

    def fake_isolated(fn, path, prompts, n, settings, threads):
        calls.append(tuple(settings))
        return [(c, flash, len(p), 500.0 if c == "f16" else 100.0, 50.0) for c, flash in settings for p in prompts]

    monkeypatch.setattr(llamacpp, "run_isolated", fake_isolated)
    monkeypatch.setattr(gguf_file, "check_gguf", lambda path: path)
    monkeypatch.setattr(gguf_file, "runnable_cache_type", lambda info, kv: kv)
    files = {"mla": {"gguf": "mla.gguf"}, "original": {"gguf": "orig.gguf"}}
    others = {"mla": (("f16", True), ("q4_0", True)),  # the priced one among them: not run twice
              "original": (("f16", True), ("f16", False))}
    rows = speed.measure(files, [list(range(64)), list(range(128))], kv_type="q4_0", onnx_cache="int4", threads=2,
                         repeats=2, llama_settings=others, progress=lambda *_: None)
    assert calls == [(("q4_0", True), ("f16", True)), (("q4_0", True), ("f16", True), ("f16", False))] + [
        (("q4_0", True),)] * 2
    assert {(r.cache, r.flash_attention) for r in rows if r.priced} == {("q4_0", True)}
    assert {(r.model, r.cache, r.flash_attention, r.prompt_tokens) for r in rows if not r.priced} == {
        (m, "f16", flash, n) for m, flash in (("mla", True), ("original", True), ("original", False))
        for n in (64, 128)}
    table = speed.by_runtime(rows)  # the same-bits comparison sees the priced cache only
    assert table["llama.cpp"]["prefill_tokens_per_s"] == {"mla": 100.0, "original": 100.0}


def test_two_prompt_lengths_give_each_runtime_its_speeds_at_every_context(monkeypatch):
    """Scripted: time per token = fixed + slope * context exactly; the table models the verdict's contexts."""
    from edge_mla.runtimes import gguf_file, llamacpp

    lines = {"mla": (10.0, 0.008), "original": (7.0, 0.003)}  # ms, ms per token of context (decode)

    def measured(path, prompt, n, *_):
        fixed, slope = lines["mla" if path.startswith("mla") else "original"]
        return 1e3 / (2.0 + 0.001 * len(prompt)), 1e3 / (fixed + slope * (len(prompt) + n / 2))

    monkeypatch.setattr(llamacpp, "run_isolated", lambda fn, path, prompts, n, settings, threads: [
        (cache, flash, len(prompt), *measured(path, prompt, n)) for cache, flash in settings for prompt in prompts])
    monkeypatch.setattr(gguf_file, "check_gguf", lambda path: path)
    monkeypatch.setattr(gguf_file, "runnable_cache_type", lambda info, kv: kv)
    monkeypatch.setattr(speed, "onnx_speed", measured)
    files = {"mla": {"gguf": "mla.gguf", "onnx": "mla-onnx"}, "original": {"gguf": "orig.gguf", "onnx": "orig-onnx"}}
    rows = speed.measure(files, [list(range(256)), list(range(1024))], kv_type="q4_0", onnx_cache="int4",
                         threads=2, repeats=1, progress=lambda *_: None)
    table = speed.by_runtime(rows, [4096])
    for runtime in ("llama.cpp", "onnxruntime"):
        entry = table[runtime]
        assert entry["prompt_tokens"] == 256 and set(entry["by_prompt"]) == {256, 1024}
        at = entry["modelled"][4096]
        expected = {m: 1e3 / (fixed + slope * 4096) for m, (fixed, slope) in lines.items()}
        assert at["decode"]["mla"] == pytest.approx(expected["mla"], abs=0.1)
        assert at["decode"]["ratio"] == pytest.approx(expected["mla"] / expected["original"], abs=1e-3)
        assert at["prefill"]["ratio"] == pytest.approx(1.0, abs=1e-3)  # both files prefill alike here


def test_one_cache_default_for_every_command():
    """The cache follows the weights, except a training-free conversion under 4-bit weights (8 bits)."""
    assert precision.default_cache_bits_for(4, None) == 4  # an original model: no conversion to break
    assert precision.default_cache_bits_for(4, {"latent_dim": 64}) == 8  # training-free conversion
    assert precision.default_cache_bits_for(4, {"recovery": {"steps_per_layer": 300}}) == 4
    assert precision.default_cache_bits_for(4, {"finetune": {"steps": 10}}) == 4
    assert precision.default_cache_bits_for(8, {}) == 8 and precision.default_cache_bits_for(16, {}) == 16
