"""The speed model: a line of time per token against the context, through the speeds measured at two prompts."""
from __future__ import annotations

import pytest

from edge_mla.speedmodel import Line, decode_context, line, modelled


def test_a_line_through_two_or_more_measured_speeds():
    truth = Line(8.0, 0.003)
    got = line({c: truth.tokens_per_s(c) for c in (272, 1040)})
    assert got.fixed_ms == pytest.approx(8.0) and got.per_token_ms == pytest.approx(0.003)
    assert got.tokens_per_s(4112) == pytest.approx(truth.tokens_per_s(4112))
    noisy = line({272: truth.tokens_per_s(272) * 1.02, 1040: truth.tokens_per_s(1040) * 0.98,
                  4112: truth.tokens_per_s(4112)})
    assert noisy.per_token_ms == pytest.approx(0.003, rel=0.1)
    assert line({256: 100.0}) is None


def test_noise_never_makes_a_longer_context_faster():
    flat = line({272: 100.0, 1040: 101.0})
    assert flat.per_token_ms == 0 and flat.tokens_per_s(100_000) == pytest.approx(1e3 / flat.fixed_ms)


def test_decode_is_placed_at_the_mean_context_of_its_steps_and_prefill_at_the_prompt():
    decode = {"mla": Line(10.0, 0.008), "original": Line(7.0, 0.003)}
    prefill = {"mla": Line(1.0, 0.0002), "original": Line(1.5, 0.0006)}
    by_prompt = {p: {"decode": {m: lin.tokens_per_s(decode_context(p, 32)) for m, lin in decode.items()},
                     "prefill": {m: lin.tokens_per_s(p) for m, lin in prefill.items()}} for p in (256, 1024)}
    got = modelled(by_prompt, [4096, 16384], decode_tokens=32)
    for context in (4096, 16384):
        for phase, lines in (("decode", decode), ("prefill", prefill)):
            want = {m: lin.tokens_per_s(context) for m, lin in lines.items()}
            assert got[context][phase]["mla"] == pytest.approx(want["mla"], abs=0.05)
            assert got[context][phase]["ratio"] == pytest.approx(want["mla"] / want["original"], abs=1e-3)
    assert got[4096]["prefill"]["ratio"] > 1 > got[4096]["decode"]["ratio"]
    assert modelled({256: by_prompt[256]}, [4096], 32) == {}  # one prompt length: nothing to model from
