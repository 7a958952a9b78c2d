"""Self-distillation text: the original model writes it (chat turns, continuations, free text) with a static-cache
sampler that matches transformers, and a fine-tune trains on it across a resume."""
from __future__ import annotations

import torch

from conftest import tiny_model, word_tokenizer
from edge_mla.convert import Plan, convert
from edge_mla.mla_folder import load, save
from edge_mla.finetune import TrainConfig, finetune


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


def test_finetune_with_self_distillation_text(tmp_path, phrases_file):
    """--self-distill-tokens: the original model writes text once, kept beside the checkpoints, so that a resumed run
    trains on the same text."""
    original = tiny_model("llama-gqa")
    original.save_pretrained(tmp_path / "orig")
    word_tokenizer().save_pretrained(tmp_path / "orig")
    convert(original, Plan(selection="partition", rope_pairs=2, latent=16, weighting="weights"))
    mla = save(original, word_tokenizer(), tmp_path / "mla")
    cfg = TrainConfig(tokens=4 * 4 * 32, seq_len=32, micro_batch=4, lr=3e-3, distill=0.5, self_distill_tokens=300)
    partial = finetune(mla, tmp_path / "ft", cfg, data=[str(phrases_file)], teacher=str(tmp_path / "orig"), stop_after=2)
    generated = tmp_path / "ft.checkpoints" / "generated.jsonl"
    written = generated.read_text()
    assert partial["stopped"] and len(written.splitlines()) >= 3
    resumed = finetune(mla, tmp_path / "ft", cfg, data=[str(phrases_file)], teacher=str(tmp_path / "orig"), resume=True)
    assert len(resumed["history"]) == 4 and resumed["config"]["self_distill_tokens"] == 300
    assert not generated.exists()  # removed with the checkpoints once the run is done


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
