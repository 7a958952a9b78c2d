"""Model families beyond plain Llama, brought to the one form the converter and the exporters read.

- Phi-3 / Phi-3.5 / Phi-4-mini: a Llama with fused qkv_proj and gate_up_proj. Rebuilt at load time as a
  LlamaForCausalLM with split projections (exact: the same norms, SiLU gate/up/down FFN and RoPE). Partial
  rotary (Phi-4-mini rotates the first 3/4 of each head) becomes full NEOX rotary over a permuted head in which
  the position-free dims are pairs of frequency 0 (a rotation by angle 0 is the identity): exact.
- SmolLM3: Llama whose `no_rope_layers[i] == 0` layers use no RoPE. Converted with zero rope rows in those
  layers (everything is NoPE there), so llama.cpp's one rope width serves every layer.
- Qwen3: per-head RMSNorm of q and k before RoPE. The normalized key is not linear in a latent, so each head's
  1/rms is replaced by a constant calibrated on text (the least-squares fit, norm_scales), folded with the norm
  weight into q_proj/k_proj. An approximation: its cost is measured (docs/models.md) and recoverable by fine-tuning.
- Gemma 3: refused, with the reason (REFUSED).
"""
from __future__ import annotations

import torch

from edge_mla.shape import head_dim

# What each family needs; shown by `docs/models.md` and by the errors below.
REFUSED = {
    "gemma3_text": "Gemma 3 has a GeGLU FFN with pre/post feed-forward norms, (1 + w) RMSNorms, scaled embeddings, "
                   "per-head q/k norms and sliding-window layers with their own rope base: neither llama.cpp's "
                   "deepseek2 GGUF nor edge-mla's ONNX decoder graph can express these",
    "gemma3": "Gemma 3 (multimodal) is not supported: see gemma3_text; its text part has a GeGLU FFN, four norms "
              "per layer, scaled embeddings and sliding-window layers that no edge-mla exporter expresses",
    "gemma2": "Gemma 2 has a GeGLU FFN, four norms per layer, logit soft-capping and sliding-window layers that no "
              "edge-mla exporter expresses",
}
ROTARY_PAIRS_KEY = "edge_mla_rotary_pairs"  # config attribute: pairs with nonzero frequency (partial rotary)
SOURCE_ARCH_KEY = "edge_mla_source_architecture"  # config attribute: the family a rebuilt model came from


def rotary_pairs(config) -> int:
    """Frequency pairs of each head that RoPE rotates (the rest are position-free)."""
    return int(getattr(config, ROTARY_PAIRS_KEY, None) or head_dim(config) // 2)


def rope_layers(config) -> list[bool]:
    """Per layer, whether it applies RoPE (SmolLM3's no_rope_layers: 1 = RoPE, 0 = none)."""
    flags = getattr(config, "no_rope_layers", None)
    return [bool(f) for f in flags] if flags is not None else [True] * config.num_hidden_layers


def grid_pairs(inv_freq, base: float, rotary_dim: int) -> int:
    """How many leading (highest-frequency) pairs sit on the plain RoPE grid base^(-2j/rotary_dim): all of them
    for plain RoPE; for llama3 scaling the unscaled high frequencies (Llama 3.2: 15 of 32), which llama.cpp's
    deepseek2 rope key can carry exactly."""
    inv = torch.as_tensor(inv_freq, dtype=torch.float64)
    grid = float(base) ** (-torch.arange(len(inv), dtype=torch.float64) * 2 / rotary_dim)
    off = ((inv - grid).abs() > 1e-6 * grid).nonzero()
    return int(off[0]) if len(off) else len(inv)


def has_qk_norm(model) -> bool:
    attn = model.model.layers[0].self_attn
    return hasattr(attn, "q_norm") and not isinstance(attn.q_norm, torch.nn.Identity)


def source_architecture(config) -> str:
    return getattr(config, SOURCE_ARCH_KEY, None) or config.model_type


# --- Phi-3 ----------------------------------------------------------------------------------------------------

def partial_rotary_permutation(d: int, rotary_dim: int) -> list[int]:
    """Head-dim order that turns partial NEOX rotary (pairs (f, f + rd/2) over the first rd dims, then rd..d-1
    untouched) into full NEOX rotary over d (pairs (f, f + d/2)) whose last pairs are the untouched dims."""
    h, p = rotary_dim // 2, (d - rotary_dim) // 2
    return (list(range(h)) + list(range(rotary_dim, rotary_dim + p)) + list(range(h, rotary_dim))
            + list(range(rotary_dim + p, d)))


def phi3_as_llama(model):
    """Phi-3 -> an equal LlamaForCausalLM with split projections (docstring above)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edge_mla.source import SourceError

    cfg = model.config
    params = dict(cfg.rope_parameters or {})
    if params.get("rope_type", "default") != "default":
        raise SourceError(
            f"Phi-3 with '{params.get('rope_type')}' RoPE scaling (the 128k/long-context variants) is not supported: "
            "its frequencies switch between short and long factors with the sequence length, which neither the "
            "conversion nor llama.cpp's deepseek2 rope key expresses. Use a 4k-context variant (e.g. "
            "Phi-3-mini-4k-instruct)")
    d, H, K = head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    rd = int(d * params.get("partial_rotary_factor", 1.0))
    if rd % 2 or (d - rd) % 2:
        raise SourceError(f"partial rotary over {rd} of {d} head dims: both parts must be even")
    # The sliding window (Phi-3-mini-4k: 2047) only matters beyond it: the context is capped at the window.
    context = int(cfg.max_position_embeddings)
    if getattr(cfg, "sliding_window", None):
        context = min(context, int(cfg.sliding_window))
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=H, num_key_value_heads=K, head_dim=d,
        hidden_act=cfg.hidden_act, max_position_embeddings=context, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)},
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else None,
        attention_bias=False, mlp_bias=False, **{ROTARY_PAIRS_KEY: rd // 2, SOURCE_ARCH_KEY: "phi3"})
    llama = AutoModelForCausalLM.from_config(llama_cfg, dtype=torch.float32)
    perm = torch.tensor(partial_rotary_permutation(d, rd))
    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k and ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        qkv = layer.self_attn.qkv_proj.weight.detach()
        q, k, v = qkv.split([H * d, K * d, K * d])
        prefix = f"model.layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = q.view(H, d, -1)[:, perm].reshape(H * d, -1)
        state[prefix + "self_attn.k_proj.weight"] = k.view(K, d, -1)[:, perm].reshape(K * d, -1)
        state[prefix + "self_attn.v_proj.weight"] = v
        state[prefix + "self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight.detach()
        gate, up = layer.mlp.gate_up_proj.weight.detach().chunk(2)  # Phi3MLP: gate first, then up
        state[prefix + "mlp.gate_proj.weight"] = gate
        state[prefix + "mlp.up_proj.weight"] = up
        state[prefix + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight.detach()
    missing, unexpected = llama.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise SourceError(f"Phi-3 weights do not map onto Llama: missing {missing[:4]}, extra {unexpected[:4]}")
    if cfg.tie_word_embeddings:
        llama.tie_weights()
    set_rotary_pairs(llama, rd // 2)
    return llama


def set_rotary_pairs(model, pairs: int) -> None:
    """Partial rotary over 2 * pairs dims: pair j < pairs has frequency base^(-j / pairs) (the grid of the rotated
    width, not of the head), the position-free pairs frequency 0."""
    rotary = model.model.rotary_emb
    base = float(model.config.rope_parameters["rope_theta"])
    for name in ("inv_freq", "original_inv_freq"):
        buf = getattr(rotary, name, None)
        if isinstance(buf, torch.Tensor):
            buf.zero_()
            buf[:pairs] = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)


def normalize(model):
    """The model in the form the converter reads (Phi-3 rebuilt as Llama; others unchanged)."""
    if model.config.model_type == "phi3":
        return phi3_as_llama(model)
    pairs = getattr(model.config, ROTARY_PAIRS_KEY, None)
    if pairs:  # a rebuilt model reloaded from disk: its rotary buffers are recomputed from the config
        set_rotary_pairs(model, pairs)
    return model


# --- Qwen3 ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def norm_scales(model, windows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, each head's constant in place of 1/rms as q_norm / k_norm compute it: (H,), (n_kv,). The least-
    squares one over calibration tokens, s = E[rms] / E[rms^2], which minimizes E|s y - y / rms(y)|^2 (on the tiny
    test models it moved logits 12-30% less than the mean of 1/rms, and less than the median; docs/models.md)."""
    cfg = model.config
    d = head_dim(cfg)
    sums = [[torch.zeros(n, 2, dtype=torch.float64) for n in (cfg.num_attention_heads, cfg.num_key_value_heads)]
            for _ in model.model.layers]

    def hook(i, attn):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None).reshape(-1, attn.q_proj.in_features)
            for j, (proj, norm) in enumerate(((attn.q_proj, attn.q_norm), (attn.k_proj, attn.k_norm))):
                ms = proj(x).double().view(x.shape[0], -1, d).pow(2).mean(-1) + norm.variance_epsilon
                sums[i][j] += torch.stack([ms.sqrt().sum(0), ms.sum(0)], -1).cpu()
        return fn

    handles = [layer.self_attn.register_forward_pre_hook(hook(i, layer.self_attn), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        for window in windows:
            model(window[None].to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(q[:, 0] / q[:, 1], k[:, 0] / k[:, 1]) for q, k in sums]


@torch.no_grad()
def fold_qk_norms(model, windows) -> dict:
    """Qwen3: replace each head's q/k RMSNorm by its calibrated constant (norm_scales) times the norm weight,
    folded into q_proj/k_proj rows; the norms become identities. Returns what was done, for the model's records."""
    d = head_dim(model.config)
    for layer, (s_q, s_k) in zip(model.model.layers, norm_scales(model, windows)):
        attn = layer.self_attn
        for proj, norm, s in ((attn.q_proj, attn.q_norm, s_q), (attn.k_proj, attn.k_norm, s_k)):
            gain = (s[:, None] * norm.weight.double()[None, :]).to(proj.weight.dtype)  # (heads, d)
            proj.weight.view(len(s), d, -1).mul_(gain[..., None])
            if proj.bias is not None:
                proj.bias.view(len(s), d).mul_(gain)
        attn.q_norm, attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
    return {"qk_norm": "each head's q/k RMSNorm replaced by a calibrated constant, E[rms]/E[rms^2] (folded into "
                       "q_proj/k_proj)",
            "calibration_tokens": int(sum(w.numel() for w in windows))}
