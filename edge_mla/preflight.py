"""Before any conversion: will every chosen exporter take this model? `edge-mla build` asks right after loading,
so a model that GGUF (or ONNX) cannot express stops at once with the reason and the fix, instead of after the
conversion and the other export. The checks are the exporters' own functions (export/gguf.py, gguf_tensors.py,
export/onnx.py), applied to what the conversion will produce: the kept rope frequencies, the biases, the FFN.
"""
from __future__ import annotations

import numpy as np

from edge_mla import families

FORMATS = ("onnx", "gguf")


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--formats onnx,gguf` -> ("onnx", "gguf"), in FORMATS order; an unknown name is a ValueError."""
    names = [t.strip().lower() for t in (text or ",".join(FORMATS)).split(",") if t.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"--formats {text!r}: choose one or more of {', '.join(FORMATS)}, comma-separated "
                         "(e.g. --formats onnx)")
    return tuple(f for f in FORMATS if f in names)


def kept_frequencies(model, plan) -> list[np.ndarray]:
    """Per layer, the rope frequencies the conversion's rope key will carry (one entry per rope pair), predicted
    from the plan before calibration: the score-based selections pick among the same frequencies as their
    fixed counterparts (partition-2norm's union is partition's; 2norm, like high, keeps the same pairs in every
    KV head)."""
    from edge_mla import rope

    config = model.config
    n_kv, rotary = config.num_key_value_heads, families.rotary_pairs(config)
    inv = model.model.rotary_emb.inv_freq.detach().double().cpu().numpy()
    if plan.selection == "shared":
        index = np.repeat(np.arange(plan.rope_pairs), plan.rope_components)
    else:
        like = {"2norm": "high", "partition-2norm": "partition"}.get(plan.selection, plan.selection)
        index = rope.kept_pairs(like, plan.rope_pairs, n_kv, rotary).flatten().numpy()
    uses_rope = families.rope_layers(config)
    return [inv[index] if on or plan.selection == "shared" else np.zeros(len(index)) for on in uses_rope]


def check_gguf(model, plan, align: int) -> None:
    """llama.cpp's deepseek2, for the model this plan will make."""
    from edge_mla.export.gguf import _rope_base
    from edge_mla.export.gguf_tensors import check_attention_biases, check_ffn, check_nope_dim, rope_layout

    config = model.config
    check_ffn(config)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        check_attention_biases(i, {name: getattr(getattr(attn, name, None), "bias", None)
                                   for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
    d = families.head_dim(config)
    check_nope_dim(d if plan.selection == "shared" else d - 2 * plan.rope_pairs)
    rope_layout(kept_frequencies(model, plan), _rope_base(config), 2 * families.rotary_pairs(config), plan.latent,
                align, plan.selection)


def check(model, plan, formats: tuple[str, ...], *, originals: bool = False, align: int = 32) -> list[str]:
    """Raise ValueError (one line: the problem, then the fix) if an exporter in `formats` cannot take the
    converted model, or, with `originals` (the build), the original exported the same way to compare.
    Returns notes on what the conversion approximates."""
    from edge_mla.convert import resolve_plan
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import onnx as onnx_export

    plan = resolve_plan(model.config, plan)
    others = [f for f in FORMATS if f != "gguf" and f in formats] or ["onnx"]
    checks = {"onnx": [onnx_export.check_config] + ([onnx_export.check_original] if originals else []),
              "gguf": [lambda m: check_gguf(m, plan, align)] + ([gguf_export.check_plain] if originals else [])}
    baselines = (onnx_export.check_original, gguf_export.check_plain)
    for fmt in formats:
        for fn in checks[fmt]:
            try:
                fn(model.config if fn is onnx_export.check_config else model)
            except ValueError as err:
                if fn in baselines:
                    what, fix = ("the original, exported to compare", "convert with `edge-mla convert` and export "
                                 "the MLA model alone with `edge-mla export`")
                else:
                    what = "the MLA model"
                    fix = (f"build only {', '.join(others)} with --formats {','.join(others)}" if fmt == "gguf"
                           else "none yet for ONNX")
                raise ValueError(f"{fmt.upper()} cannot carry {what}: {str(err).rstrip('.')}. Fix: {fix} "
                                 "(docs/models.md)") from None
    notes = []
    if families.has_qk_norm(model):
        notes.append("q/k norms: approximated by calibrated per-head constants (docs/models.md)")
    return notes
