"""--max-quality-loss: parsing, the ladder of widths it tries, and the build recording what it reached."""
from __future__ import annotations

from dataclasses import replace

import pytest

from edge_mla.plans import PLANS
from edge_mla.target import parse_loss, widths


def test_parse_loss():
    assert parse_loss("10%") == pytest.approx(0.10) and parse_loss("0.1") == pytest.approx(0.10)
    for bad in ("10", "ten", "-5%", "0"):
        with pytest.raises(ValueError, match="--max-quality-loss"):
            parse_loss(bad)


def test_widths_grow_by_64_while_the_cache_row_stays_narrower_than_the_original():
    plan = replace(PLANS["recovered"], latent=160)  # C=160, R=32: SmolLM2's original caches 2 x 3 x 64 = 384 numbers per layer
    assert [p.latent for p in widths(plan, full_latent=384, original_cache_width=384)] == [160, 224, 288]
    assert [p.latent for p in widths(plan, full_latent=200, original_cache_width=384)] == [160]  # full rank caps
    assert all(p.rope_pairs == plan.rope_pairs and p.selection == plan.selection
               for p in widths(plan, 384, 384))
