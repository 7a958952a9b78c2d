"""A torch model's tensors as the ONNX graph builder reads them (onnx_graph.Decoder), one layer at a time, and the
static cache scales fitted on what each layer caches. export/onnx.py drives it; onnx_decoder.py writes the graph."""
from __future__ import annotations

import numpy as np

from edge_mla import shape
from edge_mla.export import onnx_graph, onnx_quant


def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy()


def check_config(cfg) -> None:
    """What the decoder graph cannot express, from the configuration alone (the preflight calls it too)."""
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"activation '{cfg.hidden_act}' is not supported by the ONNX export (SiLU MLPs only)")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("MLP biases are not supported by the ONNX export")


def check_original(model) -> None:
    """What the baseline (original attention, GroupQueryAttention) export cannot express."""
    from edge_mla import families

    check_config(model.config)
    scaled = abs(float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)) - 1.0) > 1e-6
    if scaled and families.rotary_pairs(model.config) * 2 != families.head_dim(model.config):
        raise ValueError("RoPE attention scaling with a partial rotary: the baseline's rotary table would scale the "
                         "position-free dims too")


def _common(model, checkpoint) -> dict:
    """The tensors outside the layers: the vocabulary matrices as torch tensors, or, on a lazy model, as row slices
    of the checkpoint (onnx_graph writes them in pieces)."""
    import torch

    from edge_mla.layerwise import weight

    cfg = model.config
    check_config(cfg)
    embed, lm_head = weight(model, checkpoint, "model.embed_tokens.weight"), weight(model, checkpoint, "lm_head.weight")
    tied = bool(cfg.tie_word_embeddings) if checkpoint is not None else (
        embed is lm_head or torch.equal(embed, lm_head))
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                eps=float(cfg.rms_norm_eps), embed=embed, lm_head=lm_head, tied=tied,
                final_norm=_np(weight(model, checkpoint, "model.norm.weight")),
                max_positions=int(cfg.max_position_embeddings))


def _layer_common(layer) -> dict:
    mlp = layer.mlp
    if any(getattr(p, "bias", None) is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        raise ValueError("MLP biases are not supported by the ONNX export")
    return dict(input_norm=_np(layer.input_layernorm.weight), post_norm=_np(layer.post_attention_layernorm.weight),
                gate=_np(mlp.gate_proj.weight), up=_np(mlp.up_proj.weight), down=_np(mlp.down_proj.weight))


class Layers:
    """The decoder's layers as onnx_decoder.build_model reads them, one in memory at a time: each is read (a lazy
    model's from its checkpoint), run over the calibration windows when the cache needs static scales (`calibrate`:
    the hidden states carried on to the next layer), turned into the graph's arrays by `entry`, and released when
    the graph has written its tensors. The large matrices are views of the layer's weights, not copies."""

    def __init__(self, model, checkpoint, entry):
        self.model, self.checkpoint, self.entry = model, checkpoint, entry
        self.walk = self.scales_of = self.scales = None

    def calibrate(self, walk, scales_of, scales: list) -> None:
        """While the layers are read, append scales_of(what layer i caches on the walk's windows) to `scales`."""
        self.walk, self.scales_of, self.scales = walk, scales_of, scales

    def __len__(self) -> int:
        return len(self.model.model.layers)

    def __iter__(self):
        from edge_mla.layerwise import layers

        for i, layer in layers(self.model, self.checkpoint, "ONNX tensors" if self.checkpoint is not None else None):
            if self.walk is not None:
                self.scales.append(self.scales_of(cached_rows(self.walk, i)))
            entry = self.entry(layer)
            yield entry
            entry.clear()  # the graph has written them: nothing holds the layer's weights once it is released


def latent_padding(latent: int, rope: int) -> int:
    """Zero channels appended to the latent so that C + R is a multiple of 8, as GroupQueryAttention needs.
    They are zero in the cache and in every weight that touches them, so the result is unchanged."""
    return -(latent + rope) % 8


def hadamard(n: int) -> np.ndarray:
    """An orthogonal n x n matrix that spreads every direction over all channels: Sylvester's Hadamard matrix
    when n is a power of two, else a fixed random rotation."""
    if n & (n - 1) == 0:
        h = np.ones((1, 1))
        while len(h) < n:
            h = np.block([[h, h], [h, -h]])
        return h / np.sqrt(n)
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def decoder_from_mla(model, rotate_latent: bool = False, checkpoint=None) -> onnx_graph.Decoder:
    """The MLA model's weights; the latent zero-padded for the kernel and, when `rotate_latent`, turned by an
    orthogonal matrix Q (cache Q c; k_up and v_up times Q^T), which leaves every score and output unchanged but
    evens out the channels that a quantized cache must represent. The layers are read as the graph needs them."""
    mla = model.config.mla
    C, R = mla["latent_dim"], mla["rope_dim"]
    pad = latent_padding(C, R)
    norm_eps = mla.get("latent_norm_eps")
    if rotate_latent and norm_eps is not None:
        raise ValueError("rotate_latent: this model has a learned latent norm, whose per-channel weight does not "
                         "commute with a rotation; export it without rotate_latent")
    rot = hadamard(C + pad) if rotate_latent else np.eye(C + pad)

    def entry_of(layer) -> dict:
        a = layer.self_attn
        kv_a = _np(a.kv_a_proj.weight)
        entry = _layer_common(layer)
        latent_rows = rot @ np.concatenate([kv_a[:C], np.zeros((pad, kv_a.shape[1]), np.float32)])
        entry.update(
            q=_np(a.q_proj.weight), q_bias=_np(a.q_proj.bias),
            kv_a=np.concatenate([latent_rows, kv_a[C:]]).astype(np.float32),
            # k_up_bias cancels in softmax: dropped
            k_up=(np.pad(_np(a.k_up), ((0, 0), (0, 0), (0, pad))) @ rot.T).astype(np.float32),
            v_up=(np.pad(_np(a.v_up), ((0, 0), (0, 0), (0, pad))) @ rot.T).astype(np.float32),
            v_up_bias=_np(a.v_up_bias), o=_np(a.o_proj.weight), o_bias=_np(a.o_proj.bias), inv_freq=_np(a.inv_freq))
        if norm_eps is not None:
            entry["latent_norm"] = np.pad(_np(a.latent_norm.weight), (0, pad))
        if a.q_proj.bias is not None:
            b = _np(a.kv_a_proj.bias)
            latent_bias = rot @ np.concatenate([b[:C], np.zeros(pad)])
            entry["kv_a_bias"] = np.concatenate([latent_bias, b[C:]]).astype(np.float32)
        return entry

    return onnx_graph.Decoder(kind="mla", head_dim=mla["head_dim"], layers=Layers(model, checkpoint, entry_of),
                              latent_rotation=rot if rotate_latent else None, latent_norm_eps=norm_eps,
                              latent_channels=C,
                              softmax_scale=mla["softmax_scale"], rope_scaling=mla.get("rope_attention_scaling", 1.0),
                              num_groups=mla["num_groups"], nope_dim=mla["nope_dim"], rope_dim=R,
                              latent_dim=C + pad, **_common(model, checkpoint))


def decoder_from_original(model, checkpoint=None) -> onnx_graph.Decoder:
    from edge_mla import families

    cfg = model.config
    check_original(model)
    d = shape.head_dim(cfg)
    qk_norm = families.has_qk_norm(model)  # Qwen3: per-head RMSNorm of q and k before RoPE

    def entry_of(layer) -> dict:
        a = layer.self_attn
        entry = _layer_common(layer)
        entry.update(q=_np(a.q_proj.weight), k=_np(a.k_proj.weight), v=_np(a.v_proj.weight), o=_np(a.o_proj.weight),
                     q_bias=_np(a.q_proj.bias), k_bias=_np(a.k_proj.bias), v_bias=_np(a.v_proj.bias),
                     o_bias=_np(a.o_proj.bias), rotary=bool(getattr(a, "use_rope", True)))  # SmolLM3: NoPE layers
        if qk_norm:
            entry.update(q_norm=_np(a.q_norm.weight), k_norm=_np(a.k_norm.weight))
        return entry

    rotary = model.model.rotary_emb
    return onnx_graph.Decoder(kind="baseline", head_dim=d, layers=Layers(model, checkpoint, entry_of),
                              softmax_scale=d ** -0.5, rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
                              kv_heads=cfg.num_key_value_heads, inv_freq=_np(rotary.inv_freq),
                              **_common(model, checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# cache scales

class _CacheRecorder:
    """Stands in for the transformers cache while a layer runs: keeps the rows the layer would cache."""

    def __init__(self):
        self.rows = []

    def update(self, keys, values, *args, **kwargs):
        self.rows.append((keys, values))
        return keys, values

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0


def cached_rows(walk, i: int) -> list[np.ndarray]:
    """What decoder layer i (loaded) caches on the walk's windows, as it runs them (the hidden states move on to
    layer i + 1): MLA [[tokens, 1, C+R]]; baseline [K [tokens, kvH, d], V [tokens, kvH, d]]."""
    import inspect

    recorder = _CacheRecorder()

    def attach(key, layer):
        attn = layer.self_attn
        name = "cache" if "cache" in inspect.signature(attn.forward).parameters else "past_key_values"
        return [attn.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, name: recorder}),
                                               with_kwargs=True)]

    walk.run(i, attach)
    keys = np.concatenate([k[0].transpose(0, 1).float().numpy() for k, _ in recorder.rows])  # [T, heads, width]
    if recorder.rows[0][1].shape[-1] == 0:
        return [keys]
    return [keys, np.concatenate([v[0].transpose(0, 1).float().numpy() for _, v in recorder.rows])]


def layer_scales(dec: onnx_graph.Decoder, bits: int, parts: list[np.ndarray]):
    """Static per-channel dequantization scales of one layer's cache, fitted to what it caches on text."""
    if dec.kind == "mla":
        C = dec.latent_channels
        x = parts[0][:, 0]
        latent = np.concatenate([x[:, :C], np.zeros((len(x), dec.latent_dim - C), np.float32)], 1)
        if dec.latent_rotation is not None:
            latent = latent @ dec.latent_rotation.T
        x = np.concatenate([latent, x[:, C:]], 1)
        groups = onnx_quant.pair_groups(dec.cache_width, dec.latent_dim, dec.rope_dim)
        return onnx_quant.channel_scales(x, bits, groups).reshape(1, 1, 1, -1)
    d, heads = dec.head_dim, dec.kv_heads
    k_groups = np.concatenate([onnx_quant.pair_groups(d, 0, d) + h * d for h in range(heads)])
    k = onnx_quant.channel_scales(parts[0].reshape(len(parts[0]), -1), bits, k_groups)
    v = onnx_quant.channel_scales(parts[1].reshape(len(parts[1]), -1), bits, np.arange(heads * d))
    return k.reshape(1, heads, 1, d), v.reshape(1, heads, 1, d)
