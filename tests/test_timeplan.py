"""The build's plan of its own time (timeplan.py): the probe measures this machine with the model at hand, and the
sizes fitted to a budget keep to it, keep what the user gave, never go under their floors, and give up the recovery
only where not even its least fits. Probes here are made up (no timing in tests) except the one test that
measures a tiny model."""
from __future__ import annotations

import pytest
import torch

from edge_mla import timeplan
from edge_mla.plans import Calibration

FORMATS = ("onnx", "gguf")
MLA_SCORING = {"llama.cpp": 2.1, "onnxruntime": 2.0}


def wanted(recover: bool = True, calibration: Calibration = Calibration()) -> timeplan.Sizes:
    return timeplan.defaults(4, 512, (256, 1024), recover, calibration)


def probe(token_ms: float, layers: int = 30, eig_s: float = 0.01) -> timeplan.Probe:
    return timeplan.Probe(token_ms / 1000 / layers, eig_s, layers)


def total(fitted: timeplan.Fitted) -> float:
    return sum(fitted.estimate.values())


def test_a_generous_budget_keeps_the_defaults_and_gives_the_rest_to_the_recovery():
    p = probe(1.5)  # the built-in model on a fast host
    fitted = timeplan.fit(900.0, p, wanted(), FORMATS, MLA_SCORING, most_steps=600)
    assert fitted.sizes == wanted()
    assert timeplan.KEEP_STEPS < fitted.recover_steps <= 600
    assert total(fitted) <= 900.0 * 1.001  # the recovery's steps fill what is left, no more
    roomy = timeplan.fit(1e6, p, wanted(), FORMATS, MLA_SCORING, most_steps=600)
    assert roomy.recover_steps == 600 and total(roomy) < 1e6  # at most the steps asked for
    assert fitted.speed_share == roomy.speed_share == 1.0  # the default speed runs


def test_the_whole_build_is_what_it_had_spent_when_it_planned_and_the_parts_after():
    """--time-budget is the command's wall time: the start-of-build estimate says the whole."""
    p = probe(1.5)
    fitted = timeplan.fit(900.0 - 40.0, p, wanted(), FORMATS, MLA_SCORING, most_steps=600)
    fitted.spent = 40.0  # loading the model and the probe (job.afford)
    assert fitted.total() == pytest.approx(40.0 + total(fitted)) and fitted.total() <= 900.0 * 1.001
    assert fitted.as_dict(p)["estimate_total_seconds"] == round(fitted.total(), 1)
    said = timeplan.describe(fitted, p, 900.0, wanted())[0]
    assert f"about {fitted.total() / 60:.1f} min in all (40 s of loading so far" in said


def test_the_share_of_the_speed_runs_kept_is_what_the_time_after_the_recovery_is_scaled_by():
    p = probe(3.0)  # a host 2x slower than the fast one: the speed runs shrink to one pass of both prompts (the
    fitted = timeplan.fit(900.0, p, wanted(), FORMATS, MLA_SCORING, most_steps=600)  # line needs both)
    assert fitted.sizes.speed_repeats == 1 and fitted.sizes.speed_prompts == (256, 1024)
    default = timeplan.estimate(wanted(), p, FORMATS, MLA_SCORING)["speed"]
    assert fitted.speed_share == pytest.approx(fitted.estimate["speed"] / default) and fitted.speed_share < 0.75
    assert fitted.as_dict(p)["speed_share"] == round(fitted.speed_share, 3)
    slower = timeplan.fit(900.0, probe(6.2), wanted(), FORMATS, MLA_SCORING, most_steps=600)  # at the floors:
    assert slower.sizes.speed_prompts == (256,) and slower.speed_share < fitted.speed_share  # the short prompt only


@pytest.mark.parametrize("token_ms", [30.0, 90.0, 400.0])
def test_a_short_budget_reads_less_and_keeps_to_it_where_the_floors_allow(token_ms):
    p = probe(token_ms, layers=32, eig_s=5.0)
    budget = 5400.0
    fitted = timeplan.fit(budget, p, wanted(), FORMATS, MLA_SCORING)
    floors = timeplan.fit(budget, p, wanted(), FORMATS, MLA_SCORING)  # deterministic
    assert fitted.sizes == floors.sizes
    least = timeplan.estimate(timeplan.shrink(wanted(recover=False), 0.0), p, FORMATS, MLA_SCORING)
    if sum(least.values()) <= budget:
        assert total(fitted) <= budget * 1.001
    else:  # not even the least fits: the least, said
        assert fitted.sizes == timeplan.shrink(wanted(recover=False), 0.0)
        assert any("runs at the least" in line for line in timeplan.describe(fitted, p, budget, wanted()))
    for step, windows, length in fitted.sizes.calibration:
        floor = timeplan.FLOORS[step]
        assert windows >= floor[0] and length >= floor[1]
        assert windows * length <= dict((s, w * n) for s, w, n in wanted().calibration)[step]
    assert 1 <= fitted.sizes.quality_windows <= 4
    if fitted.sizes.recover:
        assert fitted.recover_steps >= timeplan.MIN_RECOVER_STEPS
    else:
        assert fitted.recover_steps == 0 and "recovery" not in fitted.estimate
        assert any("no recovery" in line for line in timeplan.describe(fitted, p, budget, wanted()))


def test_slower_machines_and_bigger_models_never_get_more():
    """Among builds that recover, the text never grows as the machine slows, and the recovery keeps at least its
    least; once a machine is too slow to recover, so is every slower one (a build that gives up its recovery may
    read more: the recovery's time is free then). The steps themselves may rise a little where the text is cut by
    whole windows."""
    budget = 900.0
    fits = [timeplan.fit(budget, probe(ms), wanted(), FORMATS, MLA_SCORING)
            for ms in (1.0, 2.5, 3.0, 4.0, 6.0, 10.0, 30.0, 100.0)]
    steps = [f.recover_steps for f in fits]
    assert steps[0] > timeplan.KEEP_STEPS and steps[-1] == 0
    recovers = [s > 0 for s in steps]
    assert recovers == sorted(recovers, reverse=True)
    assert all(s >= timeplan.MIN_RECOVER_STEPS for s in steps if s)
    recovering = [f for f in fits if f.sizes.recover]
    tokens = [sum(w * n for _, w, n in f.sizes.calibration) + f.sizes.quality_windows * f.sizes.quality_length
              for f in recovering]
    assert len(recovering) >= 3 and tokens == sorted(tokens, reverse=True)
    assert fits[0].sizes == wanted() and fits[-1].sizes == timeplan.shrink(wanted(recover=False), 0.0)


def test_what_the_user_gave_is_kept_whatever_the_budget():
    given = Calibration(windows=3, length=700)
    w = wanted(calibration=given)
    fitted = timeplan.fit(60.0, probe(100.0), w, FORMATS, MLA_SCORING,
                          fixed=frozenset({"calibration", "quality", "speed"}))
    assert fitted.sizes.calibration == w.calibration == tuple((s, 3, 700) for s in ("convert", "onnx", "gguf"))
    assert fitted.sizes.quality_windows == 4 and fitted.sizes.speed_prompts == (256, 1024)
    assert Calibration(planned=fitted.sizes.calibration).sizes("onnx") == (3, 700)


def test_no_budget_means_the_defaults():
    fitted = timeplan.fit(None, probe(100.0), wanted(), FORMATS, MLA_SCORING, most_steps=600)
    assert fitted.sizes == wanted() and fitted.recover_steps == 600
    assert fitted.unbudgeted == pytest.approx(total(fitted))


def test_shrinking_goes_by_whole_windows_then_shorter_ones():
    assert timeplan._scaled((16, 1024), (2, 512), 1.0) == (16, 1024)
    assert timeplan._scaled((16, 1024), (2, 512), 0.5) == (8, 1024)
    assert timeplan._scaled((16, 1024), (2, 512), 0.0) == (2, 512)
    assert timeplan._scaled((8, 512), (1, 256), 0.1) == (1, 384)  # 410 tokens: one window, rounded to 64


@pytest.mark.parametrize("lazy", [False, True])
def test_the_probe_measures_a_real_layer_and_leaves_a_lazy_one_on_disk(tmp_path, tokenizer, lazy):
    from conftest import tiny

    from edge_mla.layerwise import is_lazy
    from edge_mla.source import load_source

    folder = tmp_path / "tiny"
    tiny("llama-gqa", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    src = load_source(str(folder), lazy=lazy)
    p = timeplan.measure(src.model, src.checkpoint)
    assert p.layer_token_seconds > 0 and p.eig_seconds > 0 and p.layers == src.model.config.num_hidden_layers
    assert p.token_seconds == pytest.approx(p.layer_token_seconds * p.layers)
    assert is_lazy(src.model.model.layers[0]) == lazy  # released again when it was read for the probe
    assert torch.is_grad_enabled()
