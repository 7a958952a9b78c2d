"""Fine-tuning on CPU with a tiny converted model: the loss falls, resume continues exactly, and two processes
(torchrun, gloo) follow the single-process loss curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.finetune import TrainConfig, batch_rows, finetune, lr_at
from conftest import word_tokenizer


@pytest.fixture
def mla_dir(tmp_path):
    model = tiny_model("llama-gqa")
    convert(model, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    return save(model, word_tokenizer(), tmp_path / "mla")


@pytest.fixture
def text_file(tmp_path):
    # a learnable text: a few fixed phrases in a pseudo-random order
    phrases = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(12)) for i in range(6)]
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(phrases), (400,), generator=g).tolist()
    path = tmp_path / "train.txt"
    path.write_text(" ".join(phrases[i] for i in order))
    return path


def test_loss_falls(tmp_path, mla_dir, text_file):
    cfg = TrainConfig(tokens=40 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, warmup=0.1)
    summary = finetune(mla_dir, tmp_path / "ft", cfg, data=[str(text_file)])
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses
    reloaded, _ = load(tmp_path / "ft")  # the result is a converted-model folder again
    assert reloaded.config.mla["finetune"]["steps"] == 40
    assert not (tmp_path / "ft.checkpoints").exists()


def test_texts_given_directly_train_as_the_same_text_read_from_a_file(tmp_path, mla_dir, text_file):
    """The build hands its mixture of kinds to the fine-tune as texts; they must be what it trains on."""
    cfg = TrainConfig(tokens=4 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3)
    from_file = [h["loss"] for h in finetune(mla_dir, tmp_path / "a", cfg, data=[str(text_file)])["history"]]
    given = [h["loss"] for h in finetune(mla_dir, tmp_path / "b", cfg, texts=[text_file.read_text()])["history"]]
    other = [h["loss"] for h in finetune(mla_dir, tmp_path / "c", cfg, texts=[text_file.read_text()[::-1]])["history"]]
    assert given == from_file and other != from_file


def test_the_builds_fine_tune_reads_the_calibration_mixture_or_the_users_texts(tmp_path, monkeypatch):
    from edge_mla import data, plans

    monkeypatch.setattr(data, "calibration_texts", lambda tok, texts: [f"calibration:{texts}"])
    monkeypatch.setattr(data, "book_text", lambda name: f"book:{name}")
    assert plans.finetune_texts(None) == ["calibration:None"] + [f"book:{b}" for b in data.BOOKS]
    assert plans.finetune_texts(None, ("mine.txt",)) == ["calibration:('mine.txt',)"]  # the user's domain only


def test_resume_continues_where_it_stopped(tmp_path, mla_dir, text_file):
    cfg = TrainConfig(tokens=6 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3)
    straight = finetune(mla_dir, tmp_path / "a", cfg, data=[str(text_file)])
    partial = finetune(mla_dir, tmp_path / "b", cfg, data=[str(text_file)], stop_after=3)
    assert partial["stopped"] and not (tmp_path / "b").exists()
    assert (tmp_path / "b.checkpoints" / "latest" / "trainer.pt").exists()
    resumed = finetune(mla_dir, tmp_path / "b", cfg, data=[str(text_file)], resume=True)
    a = [h["loss"] for h in straight["history"]]
    b = [h["loss"] for h in resumed["history"]]
    assert len(b) == 6 and b[:3] == partial_losses(partial)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa, _ = load(tmp_path / "a")
    wb, _ = load(tmp_path / "b")
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def partial_losses(summary):
    return [h["loss"] for h in summary["history"]]


def one_and_two_processes(tmp_path, mla_dir, text_file, steps: int, port: int, *two_only: str,
                          both: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The same fine-tune (steps of 4 x 32 tokens, plus `both` flags) in one process and in two gloo processes
    (torchrun, micro-batch 2 each, plus `two_only` flags); returns both finetune_log.json records (outputs in
    tmp_path/one and /two)."""
    common = [str(mla_dir), "--data", str(text_file), "--tokens", str(steps * 4 * 32), "--seq-len", "32",
              "--lr", "3e-3", *both]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one = subprocess.run([sys.executable, "-m", "edge_mla.cli", "finetune", *common, "--micro-batch", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), "-m", "edge_mla.cli", "finetune", *common, *two_only,
                          "--micro-batch", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    return tuple(json.loads((tmp_path / run / "finetune_log.json").read_text()) for run in ("one", "two"))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, mla_dir, text_file):
    log1, log2 = one_and_two_processes(tmp_path, mla_dir, text_file, 5, 29533)
    assert log2["world_size"] == 2 and log1["world_size"] == 1
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 5
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)


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


@pytest.fixture
def q4_dir(tmp_path):
    """A tiny converted model whose cached row fits q4_0 blocks: C = 32, R = 32 (head width 64)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import VOCAB, stats_for
    from edge_mla.source import Source, _finish

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=False)
    model = _finish(Source(AutoModelForCausalLM.from_config(config), None, "tiny", None)).model
    convert(model, Plan(selection="shared", rope_pairs=16, latent=32), stats_for(model))
    return save(model, word_tokenizer(), tmp_path / "mla-q4")


def test_finetune_trains_through_the_q4_0_cache(tmp_path, q4_dir, text_file, monkeypatch):
    """cache_bits=4 puts the quantizer in every MLA layer while training (the first loss is that of the q4_0 cache)
    and leaves none in the saved model."""
    from edge_mla import finetune as ft
    from edge_mla import q4_0
    from edge_mla.mla import set_cache_quant

    cfg = TrainConfig(tokens=2 * 4 * 32, seq_len=32, micro_batch=4, lr=1e-3, cache_bits=4)
    summary = finetune(q4_dir, tmp_path / "ft4", cfg, data=[str(text_file)])
    model, tok = load(q4_dir)
    batch = ft.pack(tok, ft.read_data([str(text_file)]), 32)
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


def test_self_distillation_text(q4_dir):
    """The original model writes chat turns (its template), corpus continuations and free text; pack() reads them."""
    from edge_mla import finetune as ft
    from edge_mla.selfdistill import generate_texts, write_jsonl

    model, tok = load(q4_dir)
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}<s>"
    corpus = [" ".join(f"w{3 + i % 90}" for i in range(300))]
    texts = generate_texts(model, tok, 200, corpus, batch=6, new_tokens=20, seed=0)
    assert len(texts) >= 6 and sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) >= 200
    assert any(t.startswith("<s>") for t in texts)  # chat turns keep their special tokens
    assert texts == generate_texts(model, tok, 200, corpus, batch=6, new_tokens=20, seed=0)  # reproducible
    path = write_jsonl(q4_dir.parent / "gen.jsonl", texts)
    assert ft.read_data([str(path)]) == texts


def test_finetune_with_self_distillation_text(tmp_path, text_file):
    """--self-distill-tokens: the original model writes text once, kept beside the checkpoints, so that a resumed run
    trains on the same text."""
    original = tiny_model("llama-gqa")
    original.save_pretrained(tmp_path / "orig")
    word_tokenizer().save_pretrained(tmp_path / "orig")
    convert(original, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    mla = save(original, word_tokenizer(), tmp_path / "mla")
    cfg = TrainConfig(tokens=4 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, distill=0.5, self_distill_tokens=300)
    partial = finetune(mla, tmp_path / "ft", cfg, data=[str(text_file)], teacher=str(tmp_path / "orig"), stop_after=2)
    generated = tmp_path / "ft.checkpoints" / "generated.jsonl"
    written = generated.read_text()
    assert partial["stopped"] and len(written.splitlines()) >= 3
    resumed = finetune(mla, tmp_path / "ft", cfg, data=[str(text_file)], teacher=str(tmp_path / "orig"), resume=True)
    assert len(resumed["history"]) == 4 and resumed["config"]["self_distill_tokens"] == 300
    assert not generated.exists()  # removed with the checkpoints once the run is done


@pytest.fixture
def original_and_mla(tmp_path):
    original = tiny_model("llama-gqa")
    original.save_pretrained(tmp_path / "orig")
    word_tokenizer().save_pretrained(tmp_path / "orig")
    convert(original, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    return tmp_path / "orig", save(original, word_tokenizer(), tmp_path / "mla")


def test_cached_teacher_gives_the_same_training(tmp_path, original_and_mla):
    """--cache-teacher: the teacher runs once per row (its first epoch), and training is the same as without."""
    from edge_mla import finetune as ft

    orig, mla = original_and_mla
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"w{3 + (i * 13) % 90}" for i in range(10 * 33)))  # 10 rows of 33 tokens
    logs = {}
    calls = []
    real = ft.Teacher.__init__

    def counting(self, *args, **kwargs):  # count the teacher's forward passes
        real(self, *args, **kwargs)
        decoder = self.decoder
        self.decoder = lambda *a, **k: calls.append(a[0].shape[0]) or decoder(*a, **k)

    ft.Teacher.__init__ = counting
    try:
        for cached in (False, True):
            calls.clear()
            cfg = TrainConfig(tokens=6 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, distill=0.5, cache_teacher=cached)
            logs[cached] = [h["loss"] for h in finetune(mla, tmp_path / f"ft{cached}", cfg, data=[str(text)],
                                                        teacher=str(orig))["history"]]
            if cached:  # 6 steps x 4 rows = 24 rows from 10: the teacher ran only while unseen rows came in
                assert 3 <= len(calls) < 6, calls
            else:
                assert len(calls) == 6
    finally:
        ft.Teacher.__init__ = real
    assert len(logs[True]) == 6 and max(abs(a - b) for a, b in zip(logs[False], logs[True])) < 1e-6


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, mla_dir, text_file):
    """--fsdp (torch's fully_shard, two gloo processes) follows the single-process loss curve and saves the same
    model."""
    log1, log2 = one_and_two_processes(tmp_path, mla_dir, text_file, 4, 29547, "--fsdp")
    assert log2["world_size"] == 2 and log2["config"]["fsdp"]
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 4
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)
    m1, _ = load(tmp_path / "one")
    m2, _ = load(tmp_path / "two")
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-4), name


def test_fsdp_needs_several_processes(tmp_path, mla_dir, text_file):
    with pytest.raises(ValueError, match="torchrun"):
        finetune(mla_dir, tmp_path / "x", TrainConfig(tokens=128, seq_len=32, fsdp=True), data=[str(text_file)])


@pytest.mark.slow
def test_cached_teacher_two_processes(tmp_path, original_and_mla):
    """--cache-teacher in two processes: each keeps every row of the global batch (all-gathered), so the teacher
    runs only during the first epoch, as in one process (a cache of a process's own rows would miss whenever the
    next epoch hands it rows of the other), and the losses are one process's."""
    orig, mla = original_and_mla
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"w{3 + (i * 13) % 90}" for i in range(10 * 33)))  # 10 rows of 33 tokens
    log1, log2 = one_and_two_processes(tmp_path, mla, text, 6, 29561,
                                       both=("--distill", "0.5", "--cache-teacher", "--teacher", str(orig)))
    # 10 rows, 4 a step: steps 1-3 hold unseen rows (the third: the last 2 of epoch 1), steps 4-6 none
    assert log1["teacher_passes"] == log2["teacher_passes"] == 3
    l1 = [h["loss"] for h in log1["history"]]
    l2 = [h["loss"] for h in log2["history"]]
    assert len(l1) == len(l2) == 6
    assert max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4, (l1, l2)


def test_sampler_greedy_is_generate_and_top_p_is_transformers():
    """The static-cache sampler: greedy continuations of left-padded prompts of different lengths are generate()'s,
    eos and the padding after it included; its nucleus filter is transformers' TopPLogitsWarper's, bit for bit."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from edge_mla.selfdistill import GROUPED_DECODE, Sampler, top_p_filter

    torch.manual_seed(0)
    model = tiny_model("llama-gqa").eval()
    prompts = [[5, 9, 3, 7, 11], [4], [8, 8, 2, 6], [12, 3, 5, 7, 9, 11, 13, 15]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    for i, p in enumerate(prompts):
        mask[i, width - len(p):] = 1

    def reference(eos):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                 eos_token_id=eos, pad_token_id=0)
        return out[:, width:]

    free = reference(eos=model.config.vocab_size + 1)  # an eos it cannot write: 10 tokens each
    eos = int(free[1, 3])  # one that row 1 writes: it stops there, the others maybe later
    expected = reference(eos)
    sampler = Sampler(model, len(prompts), 10, compile=False, width_step=8)
    assert model.config._attn_implementation == GROUPED_DECODE  # the references above ran transformers' SDPA
    got = sampler(prompts, eos, 0, top_p=None)
    assert (got[:, : expected.shape[1]] == expected).all(), (got, expected)
    assert (got[:, expected.shape[1]:] == 0).all() and got[1, 3] == eos and (got[1, 4:] == 0).all()

    logits = torch.randn(16, 500) * 3
    for p in (0.5, 0.9, 0.95):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_grouped_decode_attention_is_repeated_kv_attention():
    """The sampler's decode attention (query heads as rows of their key/value head) equals attention over keys and
    values repeated for every query head, as transformers' eager attention computes it, padding mask included; a
    query of several tokens goes to transformers' SDPA path unchanged."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    from edge_mla.selfdistill import grouped_decode_attention

    torch.manual_seed(0)
    b, kv, groups, slots, d = 3, 2, 3, 11, 8
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
    key, value = torch.randn(b, kv, slots, d, dtype=torch.float64), torch.randn(b, kv, slots, d, dtype=torch.float64)
    mask = torch.ones(b, 1, 1, slots, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of rows 0 and 2
    mask[2, ..., :1] = False
    query = torch.randn(b, kv * groups, 1, d, dtype=torch.float64)
    scores = query @ repeat_kv(key, groups).transpose(-1, -2) * 0.3
    expected = (scores.masked_fill(~mask, -float("inf")).softmax(-1) @ repeat_kv(value, groups)).transpose(1, 2)
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.3)
    assert got.shape == (b, 1, kv * groups, d)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    prefill = torch.randn(b, kv * groups, 4, d, dtype=torch.float64)
    causal = torch.ones(b, 1, 4, slots, dtype=torch.bool).tril(slots - 4)
    scores = prefill @ repeat_kv(key, groups).transpose(-1, -2) * 0.3
    expected = (scores.masked_fill(~causal, -float("inf")).softmax(-1) @ repeat_kv(value, groups)).transpose(1, 2)
    got, _ = grouped_decode_attention(module, prefill, key, value, causal, scaling=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_build_config_trains_on_the_cpu(tmp_path, text_file):
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
    summary = finetune(mla, tmp_path / "ft", cfg, data=[str(text_file)], teacher=str(orig))
    assert len(summary["history"]) == 3 and summary["config"]["cache_bits"] == 4
    assert not summary["config"]["compile"] and summary["teacher_passes"] == 3
