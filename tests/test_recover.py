"""CPU recovery and 4-bit cache emulation: exact transforms are exact, q4_0 matches gguf-py, recovery helps."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from conftest import calibration_windows, prompt, stats_for, tiny_model
from edge_mla import latent, q4_0, recover
from edge_mla.convert import Plan, convert
from edge_mla.mla import mla_layers, set_cache_quant


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def converted(kind, latent=32, rope_pairs=4, components=1):
    model = tiny_model(kind)
    original = copy.deepcopy(model)
    convert(model, Plan(selection="shared", rope_pairs=rope_pairs, latent=latent, rope_components=components),
            stats_for(original))
    return original, model


def test_q4_0_roundtrip_equals_gguf_py_bit_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 2, 256)  # blocks of very different magnitudes
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = 1.5  # ties: every value has the largest magnitude
    x[2, 0], x[2, 1] = -3.0, 3.0  # a tie of opposite signs: the first one sets the sign of the scale
    x[3, 32:64] = torch.arange(-16, 16) / 2.0  # values on exact half steps (the trunc(x / d + 8.5) rounding)
    ref = dequantize(quantize(x.numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    ours = q4_0.roundtrip(x).numpy()
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_straight_through_passes_gradients_through():
    x = torch.randn(3, 64, requires_grad=True)
    y = q4_0.straight_through(q4_0.roundtrip)(x)
    assert torch.equal(y.detach(), q4_0.roundtrip(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_q4_0_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_0.roundtrip(torch.zeros(2, 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_0.mla_cache(48)


def test_rope_q4_0_uses_llama_cpp_interleaved_blocks():
    x = torch.randn(5, 64)
    assert torch.equal(q4_0.interleaved_to_neox(q4_0.neox_to_interleaved(x)), x)
    assert torch.equal(q4_0.neox_to_interleaved(torch.arange(8.0)), torch.tensor([0., 4, 1, 5, 2, 6, 3, 7]))
    x[:, 0] = 100.0  # an outlier in pair 0: in llama.cpp's layout it shares a block with pairs 0..15 only
    q = q4_0.rope_roundtrip(x)
    y = x.clone()
    y[:, 0] = 0.0
    late = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])  # NEOX dims of pairs 16..31
    assert torch.equal(q[:, late], q4_0.rope_roundtrip(y)[:, late])  # their block never saw the outlier
    assert not torch.equal(q[:, 1:16], q4_0.rope_roundtrip(y)[:, 1:16])
    row = torch.randn(2, 3, 96)
    q = q4_0.mla_cache(32)(row)
    assert torch.equal(q[..., :32], q4_0.roundtrip(row[..., :32]))
    assert torch.equal(q[..., 32:], q4_0.rope_roundtrip(row[..., 32:]))
    assert torch.equal(q4_0.mla_cache(32, rope=False)(row)[..., 32:], row[..., 32:])


@pytest.mark.parametrize("rotation", ["hadamard", "block", "random"])
def test_latent_rotation_is_exact(kind, rotation):
    _, model = converted(kind, latent=32)
    ids = prompt()
    before = logits(model, ids)
    q = {"hadamard": latent.hadamard(32), "block": latent.block_hadamard(32, block=8),
         "random": latent.random_orthogonal(32, seed=3)}[rotation]
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=q.dtype), atol=1e-12)
    cached = []
    for layer in mla_layers(model):
        latent.rotate_latent(layer, q)
        layer.cache_quant = lambda e: cached.append(e) or e
    after = logits(model, ids)
    assert (after - before).abs().max() < 1e-5
    assert cached, "the rotation must reach the cached row"


def test_cache_quant_changes_the_model_and_goes_away():
    _, model = converted("llama-mha", latent=32, rope_pairs=8, components=2)  # C + R = 64: two q4_0 blocks
    ids = prompt()
    before = logits(model, ids)
    set_cache_quant(model, q4_0.mla_cache(32))
    quantized = logits(model, ids)
    assert (quantized - before).abs().max() > 1e-3
    set_cache_quant(model, q4_0.mla_cache(32, rope=False))
    latent_only = logits(model, ids)
    assert not torch.equal(latent_only, quantized) and not torch.equal(latent_only, before)
    set_cache_quant(model, None)
    assert torch.equal(logits(model, ids), before)


def test_original_cache_quant_is_a_reference_and_restores():
    model = tiny_model("llama-gqa")  # head_dim 16 is less than a q4_0 block: any quantizer shows the hook works
    ids = prompt()
    before = logits(model, ids)
    with recover.original_cache_quant(model, torch.round, torch.round):
        changed = logits(model, ids)
    assert (changed - before).abs().max() > 1e-3
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("ste", [False, True])
def test_layerwise_recovery_lowers_the_attention_error(ste):
    original, model = converted("llama-mha", latent=32, rope_pairs=8, components=2)
    windows = calibration_windows(n=4, length=32)
    flags = [p.requires_grad for p in model.parameters()]
    quant = q4_0.straight_through(q4_0.mla_cache(32)) if ste else None
    stats = recover.recover_layerwise(original, model, windows, steps=60, lr=3e-3, cache_quant=quant)
    assert len(stats) == len(mla_layers(model))
    for s in stats:
        assert s["mse_after"] < 0.8 * s["mse_before"]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(layer.cache_quant is None for layer in mla_layers(model))


def test_recovery_from_teacher_io_taken_before_an_in_place_conversion():
    model = tiny_model("llama-mha")
    stats = stats_for(model)
    io = recover.collect_attention_io(model, calibration_windows(n=4, length=32))
    convert(model, Plan(selection="shared", rope_pairs=8, latent=32, rope_components=2), stats)
    out = recover.recover_layerwise(None, model, None, steps=60, lr=3e-3, io=io)
    assert all(s["mse_after"] < 0.8 * s["mse_before"] for s in out)


def first_block_and_its_teacher_io():
    """A tiny GQA model's first attention block, converted (C = 32), with the original block's inputs and outputs."""
    model = tiny_model("llama-gqa")
    stats = stats_for(model)
    x, y = (t[0] for t in recover.collect_attention_io(model, calibration_windows(n=4, length=32)))
    convert(model, Plan(selection="shared", latent=32), stats)
    return mla_layers(model)[0], x, y


def test_training_through_4_bit_weights_lowers_the_error_the_runtime_sees():
    attn, x, y = first_block_and_its_teacher_io()

    def error_with_4_bit_weights():
        with torch.no_grad():
            out = torch.func.functional_call(attn, recover.q4_0_weights(attn), (x,))[0]
        return float(((out - y) ** 2).mean() / (y ** 2).mean())

    assert set(recover.q4_0_weights(attn)) == {"q_proj.weight", "o_proj.weight"}
    before = error_with_4_bit_weights()
    recover.train_attention(attn, x, y, steps=60, lr=3e-3, weight_bits=4)
    assert error_with_4_bit_weights() < 0.8 * before


def test_training_that_makes_the_shipped_block_worse_is_undone():
    attn, x, y = first_block_and_its_teacher_io()
    start = {k: v.clone() for k, v in attn.state_dict().items()}
    wild = recover.train_attention(attn, x, y, steps=20, lr=5.0, weight_bits=4)  # a step far too large
    assert wild["kept_conversion"] and wild["mse_after"] == wild["mse_before"]
    assert all(torch.equal(v, start[k]) for k, v in attn.state_dict().items())
    sane = recover.train_attention(attn, x, y, steps=60, lr=3e-3, weight_bits=4)
    assert not sane["kept_conversion"] and sane["mse_after"] < 0.8 * sane["mse_before"]
    # before/after are scored through the 4-bit weights the runtime holds
    with torch.no_grad():
        out = torch.func.functional_call(attn, recover.q4_0_weights(attn), (x[:recover.EVAL_WINDOWS],))[0]
    shipped = float(((out - y[:recover.EVAL_WINDOWS]) ** 2).sum() / (y[:recover.EVAL_WINDOWS] ** 2).sum())
    assert shipped == pytest.approx(sane["mse_after"], rel=1e-4)


def test_bf16_training_runs_its_forward_in_bfloat16_keeps_float32_weights_and_still_learns():
    attn, x, y = first_block_and_its_teacher_io()
    seen = set()
    hook = attn.q_proj.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    stats = recover.train_attention(attn, x, y, steps=60, lr=3e-3, weight_bits=4, bf16=True)
    hook.remove()
    assert torch.bfloat16 in seen  # the training forward ran under autocast
    assert torch.float32 in seen  # the before/after scoring did not
    assert all(p.dtype == torch.float32 for p in attn.parameters())
    assert stats["mse_after"] < 0.8 * stats["mse_before"]


def test_gguf_keeps_the_per_head_up_projections_at_8_bits_under_q4_0():
    from gguf import GGMLQuantizationType as QT

    from edge_mla.export.gguf_tensors import tensor_type

    assert tensor_type("blk.0.attn_k_b.weight", (9, 160, 64), "q4_0") == QT.Q8_0
    assert tensor_type("blk.0.attn_v_b.weight", (9, 64, 160), "q4_0") == QT.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (864, 576), "q4_0") == QT.Q4_0
    trained = {"latent_norm_eps": [40.0], "four_bit_up_projections": True}  # recovered through their q4_0 round trip
    assert tensor_type("blk.0.attn_k_b.weight", (9, 160, 64), "q4_0", trained) == QT.Q4_0
    assert tensor_type("blk.0.attn_kv_a_mqa.weight", (192, 576), "q4_0", trained) == QT.Q4_0
    assert tensor_type("blk.0.attn_kv_a_mqa.weight", (192, 576), "q4_0", {}) == QT.BF16  # neutralised norm
    assert tensor_type("blk.0.attn_kv_a_mqa.weight", (192, 576), "q8_0", trained) == QT.BF16  # q8_0 scales underflow


def test_up_projection_round_trips_are_blocked_as_the_gguf_stores_them():
    """k_up [G, N, C] is stored as attn_k_b rows of N (W_uk^T per head), v_up [G, d, C] as attn_v_b rows of C: the
    straight-through round trips must quantize the same blocks, bit for bit."""
    from types import SimpleNamespace

    from edge_mla.mla import MLAAttention

    config = SimpleNamespace(hidden_size=64, num_attention_heads=2, rms_norm_eps=1e-5)
    mla = dict(num_groups=1, head_dim=64, nope_dim=32, rope_dim=32, latent_dim=64, softmax_scale=0.125,
               qkv_bias=False, latent_norm_eps=[1e-5])
    attn = MLAAttention(config, mla, 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * torch.logspace(-2, 1, p.shape[-1]))
    emulated = recover.q4_0_weights(attn, up_projections=True)
    assert set(emulated) == {"q_proj.weight", "o_proj.weight", "kv_a_proj.weight", "k_up", "v_up"}
    q4 = GGMLQuantizationType.Q4_0
    k_b = attn.k_up.detach().transpose(1, 2).numpy()  # [G, C, N]: rows of N
    assert np.array_equal(emulated["k_up"].detach().transpose(1, 2).numpy(), dequantize(quantize(k_b, q4), q4))
    v_b = attn.v_up.detach().numpy()  # [G, d, C]: rows of C
    assert np.array_equal(emulated["v_up"].detach().numpy(), dequantize(quantize(v_b, q4), q4))


def test_recovery_says_once_when_other_work_takes_the_cores(capsys, monkeypatch):
    """Other processes that kept a core of two busy while a long layer trained on 2 threads are reported once, with
    the fix; a machine otherwise idle, a short layer, or a 1-thread run are not."""
    recovery = recover.LayerRecovery(steps=1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(recover.os, "cpu_count", lambda: 2)
    recovery._check_cores(0, others_s=0.5, wall_s=20.0)  # the machine was ours
    recovery._check_cores(0, others_s=2.0, wall_s=2.0)  # too short to judge
    assert capsys.readouterr().out == ""
    recovery._check_cores(1, others_s=9.0, wall_s=10.0)
    recovery._check_cores(2, others_s=9.0, wall_s=10.0)
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "layer 2" in out and "--threads 1" in out
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    recover.LayerRecovery(steps=1)._check_cores(0, others_s=9.0, wall_s=10.0)
    assert capsys.readouterr().out == ""
    assert recover.machine_busy_seconds() is None or recover.machine_busy_seconds() > 0

