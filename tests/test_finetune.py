"""Fine-tuning on CPU with a tiny converted model: the loss falls, resume continues exactly, the schedule,
the chunked head loss, training through llama.cpp's q4_0 cache, and the build's own settings."""
from __future__ import annotations

import pytest
import torch

from conftest import word_tokenizer
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.finetune import TrainConfig, batch_rows, finetune, lr_at


def partial_losses(summary):
    return [h["loss"] for h in summary["history"]]


def test_loss_falls(tmp_path, mla_dir, phrases_file):
    cfg = TrainConfig(tokens=40 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, warmup=0.1)
    summary = finetune(mla_dir, tmp_path / "ft", cfg, data=[str(phrases_file)])
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    reloaded, _ = load(tmp_path / "ft")  # the result is a converted-model folder again
    assert reloaded.config.mla["finetune"]["steps"] == 40
    assert not (tmp_path / "ft.checkpoints").exists()


def test_texts_given_directly_train_as_the_same_text_read_from_a_file(tmp_path, mla_dir, phrases_file):
    """The build hands its mixture of kinds to the fine-tune as texts; they must be what it trains on."""
    cfg = TrainConfig(tokens=4 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3)
    from_file = [h["loss"] for h in finetune(mla_dir, tmp_path / "a", cfg, data=[str(phrases_file)])["history"]]
    given = [h["loss"] for h in finetune(mla_dir, tmp_path / "b", cfg, texts=[phrases_file.read_text()])["history"]]
    other = [h["loss"] for h in finetune(mla_dir, tmp_path / "c", cfg, texts=[phrases_file.read_text()[::-1]])["history"]]
    assert given == from_file and other != from_file


def test_the_builds_fine_tune_reads_the_calibration_mixture_or_the_users_texts(tmp_path, monkeypatch):
    from edge_mla import data, plans

    monkeypatch.setattr(data, "calibration_texts", lambda tok, texts: [f"calibration:{texts}"])
    monkeypatch.setattr(data, "book_text", lambda name: f"book:{name}")
    assert plans.finetune_texts(None) == ["calibration:None"] + [f"book:{b}" for b in data.BOOKS]
    assert plans.finetune_texts(None, ("mine.txt",)) == ["calibration:('mine.txt',)"]  # the user's domain only


def test_resume_continues_where_it_stopped(tmp_path, mla_dir, phrases_file):
    cfg = TrainConfig(tokens=6 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3)
    straight = finetune(mla_dir, tmp_path / "a", cfg, data=[str(phrases_file)])
    partial = finetune(mla_dir, tmp_path / "b", cfg, data=[str(phrases_file)], stop_after=3)
    assert partial["stopped"] and not (tmp_path / "b").exists()
    assert (tmp_path / "b.checkpoints" / "latest" / "trainer.pt").exists()
    resumed = finetune(mla_dir, tmp_path / "b", cfg, data=[str(phrases_file)], resume=True)
    a = [h["loss"] for h in straight["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(b) == 6 and b[:3] == partial_losses(partial)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa, _ = load(tmp_path / "a")
    wb, _ = load(tmp_path / "b")
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_schedule_and_batches():
    cfg = TrainConfig(tokens=1, lr=1.0, warmup=0.1, decay=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[50] == 1.0
    assert lrs[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    seen = torch.cat([batch_rows(s, 4, 10, 0) for s in range(5)])  # 2 epochs of 10 rows
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def reference_head_loss(hidden, weight, targets, teacher_hidden, teacher_weight, distill):
    """The loss as plain autograd computes it: full logits, cross-entropy and KL(teacher || student)."""
    import torch.nn.functional as F

    logp = (hidden @ weight.T).log_softmax(-1)
    ce = F.nll_loss(logp, targets)
    if teacher_hidden is None:
        return ce
    t_logp = (teacher_hidden @ teacher_weight.T).log_softmax(-1)
    return (1 - distill) * ce + distill * F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("distill", [0.0, 0.5, 1.0])
def test_head_loss_matches_autograd(distill):
    from edge_mla.distill import HeadLoss

    g = torch.Generator().manual_seed(0)
    n, e, v = 37, 16, 50  # 37 tokens in chunks of 8: a short last chunk
    hidden = torch.randn(n, e, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, e, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    t_hidden = torch.randn(n, e, generator=g, dtype=torch.float64) if distill else None
    t_weight = torch.randn(v, e, generator=g, dtype=torch.float64) if distill else None
    ours = HeadLoss.apply(hidden, weight, targets, t_hidden, t_weight, distill, 8)
    ours_grads = torch.autograd.grad(2.5 * ours, (hidden, weight))
    ref = reference_head_loss(hidden, weight, targets, t_hidden, t_weight, distill)
    ref_grads = torch.autograd.grad(2.5 * ref, (hidden, weight))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)  # the logits are float32, as on the GPU
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_quantization_aware_cache_is_llama_cpp_q4_0_and_straight_through():
    """The row training sees is, bit for bit, gguf-py's q4_0 of the row llama.cpp caches ([c | k_pe], k_pe with
    interleaved rope pairs); gradients pass unchanged."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from edge_mla.finetune import cache_quantizer
    from edge_mla.q4_0 import interleaved_to_neox, neox_to_interleaved

    C, R = 64, 32
    g = torch.Generator().manual_seed(3)
    row = (torch.randn(2, 1, 9, C + R, generator=g) * torch.logspace(-2, 1, C + R)).requires_grad_()
    quantized = cache_quantizer(4, C)(row)
    llama_row = torch.cat([row[..., :C], neox_to_interleaved(row[..., C:])], -1).detach().numpy()
    ref = torch.from_numpy(dequantize(quantize(llama_row, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
                           .astype(np.float32))
    expected = torch.cat([ref[..., :C], interleaved_to_neox(ref[..., C:])], -1)
    assert torch.equal(quantized.detach().view(torch.int32), expected.view(torch.int32))
    quantized.sum().backward()
    assert torch.equal(row.grad, torch.ones_like(row))
    assert cache_quantizer(16, C) is None
    with pytest.raises(ValueError, match="16 .* or 4"):
        cache_quantizer(8, C)


def test_finetune_trains_through_the_q4_0_cache(tmp_path, q4_dir, phrases_file, monkeypatch):
    """cache_bits=4 puts the quantizer in every MLA layer while training (the first loss is that of the q4_0 cache)
    and leaves none in the saved model."""
    from edge_mla import finetune as ft
    from edge_mla import q4_0
    from edge_mla.mla import set_cache_quant

    cfg = TrainConfig(tokens=2 * 4 * 32, seq_len=32, micro_batch=4, lr=1e-3, cache_bits=4)
    summary = finetune(q4_dir, tmp_path / "ft4", cfg, data=[str(phrases_file)])
    model, tok = load(q4_dir)
    batch = ft.pack(tok, ft.read_data([str(phrases_file)]), 32)
    first = batch[ft.batch_rows(0, 4, batch.shape[0], 0)]
    losses = {}
    for bits in (16, 4):
        set_cache_quant(model, q4_0.mla_cache(32) if bits == 4 else None)
        with torch.no_grad():
            losses[bits] = ft.LossModel(model, 4096, 0.0)(first[:, :-1], first[:, 1:]).item()
    assert losses[4] != losses[16]
    assert summary["history"][0]["loss"] == pytest.approx(losses[4], rel=1e-5)
    trained, _ = load(tmp_path / "ft4")
    assert trained.config.mla["finetune"]["config"]["cache_bits"] == 4
    assert all(layer.self_attn.cache_quant is None for layer in trained.model.layers)


def test_build_config_trains_on_the_cpu(tmp_path, phrases_file):
    """The build's fine-tune settings: on a GPU compiled with the teacher's states kept, through the q4_0 cache of a
    4-bit build; without a GPU (shorter rows for the tiny text) the same settings train eagerly."""
    import dataclasses

    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import VOCAB, stats_for
    from edge_mla.finetune import build_config

    gpu = build_config(10**6, kv_bits=4, cuda=True)
    assert gpu.compile and gpu.cache_teacher and gpu.cache_bits == 4 and gpu.distill > 0
    assert build_config(10**6, kv_bits=8, cuda=False).cache_bits == 16
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False)
    original = AutoModelForCausalLM.from_config(config)
    orig = tmp_path / "orig"
    original.save_pretrained(orig)
    word_tokenizer().save_pretrained(orig)
    convert(original, Plan(selection="shared", rope_pairs=16, latent=32), stats_for(original))  # a q4_0 row
    mla = save(original, word_tokenizer(), tmp_path / "mla")
    cfg = dataclasses.replace(build_config(3 * 4 * 32, kv_bits=4, cuda=False), seq_len=32, micro_batch=4)
    summary = finetune(mla, tmp_path / "ft", cfg, data=[str(phrases_file)], teacher=str(orig))
    assert len(summary["history"]) == 3 and summary["config"]["cache_bits"] == 4
    assert not summary["config"]["compile"] and summary["teacher_passes"] == 3
