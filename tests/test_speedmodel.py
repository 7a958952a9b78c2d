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


def test_a_line_moves_to_another_machine_part_by_part():
    from edge_mla.speedmodel import Rates, on_machine

    lines = {"decode": {"mla": Line(6.0, 0.02)}, "prefill": {"mla": Line(1.5, 0.01)}}
    here, there = Rates(bandwidth_gbs=30.0, gmacs=100.0), Rates(bandwidth_gbs=10.0, gmacs=25.0)
    moved = on_machine(lines, here, there)
    # weights streamed once a decode step: bandwidth; the rest is arithmetic
    assert moved["decode"]["mla"] == Line(pytest.approx(18.0), pytest.approx(0.08))
    assert moved["prefill"]["mla"] == Line(pytest.approx(6.0), pytest.approx(0.04))
    assert on_machine(lines, here, here) == lines


def test_a_device_speed_needs_its_multiply_add_rate_and_the_build_machines_rates():
    from dataclasses import asdict

    from edge_mla.budget import Device, load_devices
    from edge_mla.speedmodel import (SUSTAINED_ARITHMETIC, SUSTAINED_BANDWIDTH, Rates, device_rates, on_device,
                                     on_machine, speeds_at)

    pi = Device("pi", "Pi", 8000, 7000, 17.1, "A76", ["llama.cpp"], "test", gmacs=76.8)
    assert device_rates(pi) == Rates(17.1 * SUSTAINED_BANDWIDTH, 76.8 * SUSTAINED_ARITHMETIC)
    assert device_rates(Device("x", "X", 8000, 7000, 17.1, "?", [], "test")) is None
    lines = {"decode": {"mla": Line(6.0, 0.02), "original": Line(6.2, 0.008)},
             "prefill": {"mla": Line(1.6, 0.01), "original": Line(1.5, 0.004)}}
    machine = Rates(28.0, 100.0)
    entry = {"lines": {p: {m: asdict(x) for m, x in by.items()} for p, by in lines.items()}, "machine": asdict(machine)}
    got = on_device(entry, pi, [4096])[4096]
    rates = device_rates(pi)
    slower_memory, slower_arithmetic = machine.bandwidth_gbs / rates.bandwidth_gbs, machine.gmacs / rates.gmacs
    want = 1e3 / (6.0 * slower_memory + 0.02 * slower_arithmetic * 4096)
    assert got["decode"]["mla"] == pytest.approx(want, abs=0.05)
    assert got == speeds_at(on_machine(lines, machine, rates), [4096])[4096]
    assert on_device({"lines": entry["lines"]}, pi, [4096]) == {}  # the build machine's rates were not measured
    for d in load_devices().values():  # every device a runtime runs on can be predicted
        assert not d.runtimes or (d.gmacs or 0) > 0, d.key
