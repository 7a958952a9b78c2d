"""Before any conversion: will every chosen exporter take this model? `edge-mla build` asks right after loading,
so a model that GGUF (or ONNX) cannot express stops at once with the reason and the fix, instead of after the
conversion and the other export. The checks are the exporters' own functions (export/gguf.py, gguf_tensors.py,
export/onnx_weights.py), applied to what the conversion will produce: the kept rope frequencies, the biases, the FFN.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_mla import families, shape

FORMATS = ("onnx", "gguf")
MLA, ORIGINAL = "the MLA model", "the original, exported to compare"


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--formats onnx,gguf` -> ("onnx", "gguf"), in FORMATS order; an unknown name is a ValueError."""
    names = [t.strip().lower() for t in (text or ",".join(FORMATS)).split(",") if t.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"--formats {text!r}: choose one or more of {', '.join(FORMATS)}, comma-separated "
                         "(e.g. --formats onnx)")
    return tuple(f for f in FORMATS if f in names)


def refusal(fmt: str, what: str, err: Exception) -> ValueError:
    """The one-line refusal: which format cannot carry what, the exporter's reason, and the fix (the other format)."""
    other = next(f for f in FORMATS if f != fmt)
    return ValueError(f"{fmt.upper()} cannot carry {what}: {str(err).rstrip('.')}. Fix: build {other} only "
                      f"with --formats {other} (docs/models.md)")


def check_gguf_header(model: str | Path, formats: tuple[str, ...]) -> None:
    """For a .gguf source, what its header and tensor list decide, before transformers de-quantizes every tensor
    (call before source.load_source; any other source: nothing to do): the source checks (source.check_gguf_source:
    architecture, what the GGUF loader would drop), then for GGUF the attention biases, read alone (a few KB), with
    check()'s refusal. What depends on the plan (NoPE width, rope grid per selection) is left to check()."""
    path = Path(str(model)).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return
    import gguf
    import torch

    from edge_mla.export.gguf_tensors import check_attention_biases
    from edge_mla.source import check_gguf_source

    arch, keys, tensors = check_gguf_source(path)
    if "gguf" not in formats:
        return

    def bias(i: int, name: str):
        t = tensors.get(f"blk.{i}.{name}.bias")
        return None if t is None else torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    try:
        for i in range(int(keys.get(f"{arch}.block_count", 0))):
            check_attention_biases(i, {proj: bias(i, name) for proj, name in (
                ("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"))})
    except ValueError as err:
        raise refusal("gguf", MLA, err) from None


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


def check_gguf(model, plan, align: int, checkpoint=None) -> None:
    """llama.cpp's deepseek2, for the model this plan will make. A lazy model's biases are read from its
    checkpoint (layerwise.Checkpoint), nothing else."""
    from edge_mla.export.gguf_tensors import check_attention_biases, check_ffn, check_nope_dim, rope_layout

    config = model.config
    check_ffn(config)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        prefix = f"model.layers.{i}.self_attn."
        check_attention_biases(i, {name: (checkpoint.tensor(f"{prefix}{name}.bias") if f"{prefix}{name}.bias"
                                          in checkpoint else None) if checkpoint is not None else
                                   getattr(getattr(attn, name, None), "bias", None)
                                   for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
    d = families.head_dim(config)
    check_nope_dim(d if plan.selection == "shared" else d - 2 * plan.rope_pairs)
    rope_layout(kept_frequencies(model, plan), shape.rope_base(config), 2 * families.rotary_pairs(config), plan.latent,
                align, plan.selection)


def fit_rope_key(model, plan, formats: tuple[str, ...]) -> tuple[object, list[str]]:
    """For GGUF, a shared rope key keeps only the leading frequencies on llama.cpp's grid: under llama3 scaling the
    unscaled high frequencies; the scaled low ones go to the latent (position-free), as every frequency past
    --rope-pairs does. Returns (plan, notes)."""
    from dataclasses import replace

    from edge_mla.convert import resolve_plan

    plan = resolve_plan(model.config, plan)
    if "gguf" not in formats or plan.selection != "shared":
        return plan, []
    inv = model.model.rotary_emb.inv_freq.detach()
    on_grid = families.grid_pairs(inv[:families.rotary_pairs(model.config)], shape.rope_base(model.config),
                                  2 * families.rotary_pairs(model.config))
    if 1 <= on_grid < plan.rope_pairs:
        return replace(plan, rope_pairs=on_grid), [
            f"rope key: the {on_grid} highest frequencies keep RoPE (the others are scaled, which llama.cpp's "
            f"deepseek2 cannot express, and move to the latent); --formats onnx keeps {plan.rope_pairs}"]
    return plan, []


def check(model, plan, formats: tuple[str, ...], *, originals: bool = False,
          align: int = 32, checkpoint=None) -> tuple[object, list[str]]:
    """Raise ValueError (one line: the problem, then the fix) if an exporter in `formats` cannot take the
    converted model, or, with `originals` (the build), the original exported the same way to compare.
    Returns the plan (its rope key fitted to GGUF, fit_rope_key) and notes on what the conversion approximates."""
    from edge_mla.export import gguf as gguf_export
    from edge_mla.export import onnx_weights

    plan, notes = fit_rope_key(model, plan, formats)
    mla, original = MLA, ORIGINAL
    steps = []  # (format, what it would carry, the exporter's check)
    if "onnx" in formats:
        steps.append(("onnx", mla, lambda: onnx_weights.check_config(model.config)))
        if originals:
            steps.append(("onnx", original, lambda: onnx_weights.check_original(model)))
    if "gguf" in formats:
        steps.append(("gguf", mla, lambda: check_gguf(model, plan, align, checkpoint)))
        if originals:
            steps.append(("gguf", original, lambda: gguf_export.check_plain(model)))
    for fmt, what, fn in steps:
        try:
            fn()
        except ValueError as err:
            raise refusal(fmt, what, err) from None
    if families.has_qk_norm(model):
        notes.append("q/k norms: approximated by calibrated per-head constants (docs/models.md)")
    return plan, notes
