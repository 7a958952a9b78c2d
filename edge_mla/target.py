"""`--max-quality-loss`: the build picks its compression from a quality target.

The conversion (and CPU recovery) is tried at the plan's latent width first, then wider, until the converted
model's perplexity on a held-out part of the calibration text is within the target of the original's. The check
runs in PyTorch with float weights on both sides and the MLA model's cache as the build ships it (the q4_0 round
trip for a 4-bit cache): the width decides the conversion's loss, the exporters then quantize both models alike.
The check windows are the Wikipedia calibration split's last ones, which neither the statistics nor the teacher
pass read (data.calibration_windows and plans.recovery_windows leave them out), and never the texts the report
scores.
"""
from __future__ import annotations

from dataclasses import replace

from edge_mla.plans import MAX_CACHE_SHARE, Plan

CHECK_WINDOWS, CHECK_LENGTH = 4, 512
WIDTH_STEP = 64  # keeps C a multiple of 32 (q4_0/q8_0 cache rows)


def parse_loss(text: str) -> float:
    """'10%' or '0.10' -> 0.10."""
    value = text.strip()
    try:
        loss = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"--max-quality-loss {text!r} is not a number: write it as 10% or 0.10") from None
    if value.endswith("%") is False and loss >= 1:
        raise ValueError(f"--max-quality-loss {text} is ambiguous: write 10% (or 0.10) for a 10% perplexity increase")
    if not 0 < loss <= 100:
        raise ValueError(f"--max-quality-loss {text} must be above 0% and at most 10000% (e.g. 10%)")
    return loss


def parse_share(text: str, flag: str) -> float:
    """'10%' or '0.10' -> 0.10, for a flag that takes a share."""
    value = text.strip()
    try:
        share = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a share: write it as 10% or 0.10") from None
    if not 0 <= share <= 1:
        raise ValueError(f"{flag} {text}: give a share between 0% and 100%, e.g. 10%")
    return share


def check_calibration(tokenizer, windows: int, length: int) -> None:
    """Refuse a conversion calibration long enough to reach the check windows (it reads the split from its start):
    the check would then score text the conversion was fitted on."""
    from edge_mla.data import split_text

    tokens = len(tokenizer(split_text("calibration"), add_special_tokens=False).input_ids)
    start = (tokens // CHECK_LENGTH - CHECK_WINDOWS) * CHECK_LENGTH  # where the check windows begin
    if windows * length > start:
        raise ValueError(f"--max-quality-loss checks on the last {CHECK_WINDOWS} x {CHECK_LENGTH} tokens of the "
                         f"calibration text, and a calibration of {windows} x {length} tokens would read them: use at "
                         f"most {start} calibration tokens (e.g. --calib-windows {max(1, start // length)})")


def widths(plan: Plan, full_latent: int, original_cache_width: int) -> list[Plan]:
    """The plan, then wider latents, while the MLA cache still saves what a conversion must (plans.MAX_CACHE_SHARE)
    and within the model's full rank."""
    rope = 2 * (plan.rope_pairs or 0)
    out, latent = [], plan.latent
    while (latent is not None and latent <= full_latent
           and (not out or latent + rope <= MAX_CACHE_SHARE * original_cache_width)):
        out.append(replace(plan, latent=latent))
        latent += WIDTH_STEP
    return out or [plan]


def check_windows(tokenizer):
    """The last CHECK_WINDOWS windows of the calibration split."""
    from edge_mla.data import split_text, token_windows

    windows = token_windows(tokenizer, split_text("calibration"), CHECK_LENGTH)
    if len(windows) < 2 * CHECK_WINDOWS:
        raise ValueError("the calibration text is too short to hold out windows for --max-quality-loss")
    return windows[-CHECK_WINDOWS:]


def perplexity_ratio(model, reference: float, windows, kv_bits: int) -> float:
    """Perplexity of a converted model with its shipped cache, over the original's `reference`."""
    from edge_mla import recover
    from edge_mla.eval import perplexity
    from edge_mla.mla import mla_layers, set_cache_quant

    set_cache_quant(model, recover.shipped_cache_quant(mla_layers(model)[0], kv_bits))
    try:
        return perplexity(model, windows, desc="quality check") / reference
    finally:
        set_cache_quant(model, None)
