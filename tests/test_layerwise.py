"""The layer-by-layer (streamed) path gives what the in-memory path gives: same statistics, same converted weights."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import bf16_folder, bpe_tokenizer, calibration_windows, tiny, tiny_model
from edge_mla.calibration import collect_stats, new_stats, stats_hook
from edge_mla.convert import Plan, convert_source
from edge_mla.mla_folder import load
from edge_mla.layerwise import layer_arguments
from edge_mla.source import load_source


def whole_model_stats(model, windows):
    """Statistics the way main gathered them before the layer walk: hooks on whole-model forwards, window by window."""
    stats = [new_stats(model.config) for _ in model.model.layers]
    handles = [layer.self_attn.register_forward_pre_hook(stats_hook(s, layer.self_attn, model.config), with_kwargs=True)
               for s, layer in zip(stats, model.model.layers)]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "llama-bias"])
def test_layer_walk_statistics_equal_whole_model_hooks(kind):
    model, windows = tiny_model(kind), calibration_windows()
    for a, b in zip(collect_stats(model, windows), whole_model_stats(model, windows)):
        assert a.count == b.count
        for name in ("xx_sum", "x_sum", "q_pair_norm_sum", "k_pair_norm_sum"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name  # bit for bit


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.mark.slow
@pytest.mark.parametrize("kind,plan", [("llama-gqa", Plan(selection="shared", latent=32)),
                                       ("qwen2", Plan(selection="partition-2norm", rope_pairs=2, latent=24)),
                                       ("mistral", Plan(selection="high", rope_pairs=2, weighting="weights"))])
def test_streamed_conversion_equals_in_memory(tmp_path, tokenizer, kind, plan):
    folder = bf16_folder(tmp_path, kind, tokenizer)
    in_memory = load_source(str(folder))
    streamed = load_source(str(folder), lazy=True)
    assert in_memory.checkpoint is None and streamed.checkpoint is not None
    assert all(p.is_meta for p in streamed.model.model.layers.parameters())  # nothing read yet
    options = {"calib_windows": 2, "calib_length": 48}
    _, mla_a = convert_source(in_memory, plan, tmp_path / "a", **options)
    _, mla_b = convert_source(streamed, plan, tmp_path / "b", **options)
    assert mla_a == mla_b
    a, b = load(tmp_path / "a")[0].state_dict(), load(tmp_path / "b")[0].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit


def gguf_contents(path):
    """Every tensor's type, shape and bytes, and every key but the provenance record (it holds a timestamp)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    tensors = {t.name: (int(t.tensor_type), list(t.shape), np.asarray(t.data).view(np.uint8).tobytes())
               for t in reader.tensors}
    keys = {k: f.contents() for k, f in reader.fields.items() if k != "edge_mla.provenance"}
    return tensors, keys


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral"])  # tied embeddings: the output head comes from the embedding
def test_streamed_gguf_equals_in_memory(tmp_path, tokenizer, kind, monkeypatch):
    """The GGUF written from a folder read a layer at a time (and its vocabulary matrices 100 rows at a time) is
    byte for byte the one written from the loaded model in one piece, for the MLA model and for the original (the
    build's side-by-side baseline)."""
    from edge_mla.mla_folder import load_any
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import gguf_tensors

    folder = bf16_folder(tmp_path, kind, tokenizer)
    convert_source(load_source(str(folder), lazy=True), Plan(selection="partition", rope_pairs=2, latent=32),
                   tmp_path / "mla", calib_windows=2, calib_length=48)
    for model in (tmp_path / "mla", folder):
        for weights in ("q4_0",):
            streamed, in_memory = tmp_path / f"streamed-{weights}.gguf", tmp_path / f"memory-{weights}.gguf"
            with monkeypatch.context() as patch:
                patch.setattr(gguf_tensors, "ROWS_PER_PIECE", 100)  # the vocabulary (320 rows) in 4 pieces
                gguf_export.export(str(model), streamed, weights=weights, force=True)
            src = load_any(model)
            assert src.checkpoint is None
            gguf_export.export(src, in_memory, weights=weights, force=True)
            a, b = gguf_contents(streamed), gguf_contents(in_memory)
            assert a[0].keys() == b[0].keys() and a == b
            assert streamed.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_layerwise_recovery_equals_recover_converted(tmp_path, tokenizer):
    """The build's one pass (each layer calibrated, converted, recovered and written in turn, read from disk) gives
    the weights of main's order: teacher pass on the whole original, convert, then recover_converted."""
    from edge_mla import recover
    from edge_mla.convert import calibrate_and_convert
    from edge_mla.layerwise import FolderWriter

    folder = bf16_folder(tmp_path, "llama-gqa", tokenizer)
    plan, options = Plan(selection="shared", rope_pairs=4, latent=32), {"calib_windows": 2, "calib_length": 48}
    teacher = calibration_windows(seed=3, n=2, length=32)

    reference = load_source(str(folder))
    io = recover.collect_attention_io(reference.model, teacher)
    calibrate_and_convert(reference, plan, **options)
    summary = recover.recover_converted(reference.model, io, steps=5, latent_norm=True)

    streamed = load_source(str(folder), lazy=True)
    (tmp_path / "out").mkdir()
    writer = FolderWriter(tmp_path / "out", streamed.checkpoint, streamed.model.config.num_hidden_layers)
    recovery = recover.LayerRecovery(steps=5, latent_norm=True)
    mla = calibrate_and_convert(streamed, plan, written=writer.layer, teacher=teacher, converted=recovery, **options)
    layerwise_summary = recovery.summary(mla)
    writer.finish(streamed.model.config, streamed.tokenizer)
    assert len(recovery.stats) == 2 and layerwise_summary.keys() == summary.keys()
    assert mla["latent_norm_eps"] == reference.model.config.mla["latent_norm_eps"]
    expected, got = reference.model.state_dict(), load(tmp_path / "out")[0].state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    # and its GGUF (a learned latent norm: llama.cpp's attn_kv_a_norm), streamed = in memory
    from edge_mla.mla_folder import load_any
    from edge_mla.export import gguf as gguf_export

    gguf_export.export(str(tmp_path / "out"), tmp_path / "streamed.gguf", weights="q8_0")
    gguf_export.export(load_any(tmp_path / "out"), tmp_path / "memory.gguf", weights="q8_0")
    assert gguf_contents(tmp_path / "streamed.gguf") == gguf_contents(tmp_path / "memory.gguf")


def test_drift_correcting_recovery_trains_each_block_on_the_converted_models_own_stream(tmp_path, tokenizer):
    """corrects_drift: layer 0 sees the original's inputs (nothing converted yet); layer 1 sees the input norm of
    the stream after the converted (and recovered) layer 0, not the original's; its target is the original block's
    output plus the gap between the two streams, so that the converted layer's residual meets the original's."""
    from edge_mla.convert import calibrate_and_convert
    from edge_mla.source import Source, _finish

    from conftest import corpus

    (tmp_path / "calibration.txt").write_text(corpus())
    plan = Plan(selection="shared", rope_pairs=4, latent=32)
    options = {"calib_windows": 2, "calib_length": 48, "text": str(tmp_path / "calibration.txt")}
    teacher = calibration_windows(seed=3, n=2, length=32)
    original = tiny("llama-gqa", len(tokenizer))
    with torch.no_grad():  # the original stream at layer 1, and its attention's output there
        h0 = original.model.embed_tokens(teacher)
        args = layer_arguments(original, h0[:1])[0]
        h1 = torch.cat([original.model.layers[0](h0[j:j + 1], **args) for j in range(2)])
        x1 = original.model.layers[1].input_layernorm(h1)
        y1 = torch.cat([original.model.layers[1].self_attn(x1[j:j + 1], **args)[0] for j in range(2)])
    seen = {}

    class Recording:
        corrects_drift = True

        def __call__(self, i, attn, ins, outs):
            seen[i] = (ins.clone(), outs.clone())

    model = copy.deepcopy(original)
    calibrate_and_convert(_finish(Source(model, tokenizer, "tiny", None)), plan, teacher=teacher,
                          converted=Recording(), **options)
    with torch.no_grad():
        s1 = torch.cat([model.model.layers[0](h0[j:j + 1], **args) for j in range(2)])  # the converted layer 0
    ins0, _ = seen[0]
    ins1, outs1 = seen[1]
    assert torch.allclose(ins0, original.model.layers[0].input_layernorm(h0), atol=1e-5)
    assert not torch.allclose(ins1, x1, atol=1e-3)  # not the original's inputs ...
    assert torch.allclose(ins1, model.model.layers[1].input_layernorm(s1), atol=1e-5)  # ... the student's
    assert torch.allclose(outs1, y1 + h1 - s1, atol=1e-4)
