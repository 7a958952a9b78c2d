"""The build's time budget: a duration parsed or refused clearly, and the recovery's steps chosen so that it ends by
its deadline at the pace measured (a fake clock: no timing in tests)."""
from __future__ import annotations

import pytest

from edge_mla import timebudget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("deadline, most", [(100.0, 10_000), (1_000.0, 600), (10.0, 600)])
def test_step_budget_ends_the_recovery_by_its_deadline_at_the_measured_pace(monkeypatch, deadline, most):
    """Layers cost 2 s besides training and 0.1 s a step (0.12 s in the probe); the budget shares what is left."""
    clock = FakeClock()
    monkeypatch.setattr(timebudget.time, "perf_counter", clock)
    budget = timebudget.StepBudget(deadline, layers=4)
    chosen = []
    for i in range(4):
        clock.now += 2.0  # calibration, conversion, teacher pass of the layer
        steps = budget.steps_for(i, most, lambda n: 0.12)
        clock.now += 0.1 * steps
        budget.spent({"train_seconds": 0.1 * steps, "seconds": 0.1 * steps}, steps)
        chosen.append(steps)
    assert all(timebudget.MIN_BUDGET_STEPS <= s <= most for s in chosen)
    if 4 * (2.0 + 0.1 * most) <= deadline:  # the plan's steps fit: every layer gets them
        assert chosen == [most] * 4
    elif deadline > 4 * (2.0 + 0.1 * timebudget.MIN_BUDGET_STEPS):  # the budget binds and is kept, nearly used up
        assert clock.now <= deadline + 2.0 and clock.now >= 0.8 * deadline
    else:  # too small for the least a block needs: the minimum, overrun, and said by describe()
        assert chosen == [timebudget.MIN_BUDGET_STEPS] * 4
    assert "steps a layer" in budget.describe()


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("900s", 900), ("1.5h", 5400), ("120", 120)])
def test_durations(text, seconds):
    assert timebudget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_bad_durations_name_the_flag_and_the_form(text):
    with pytest.raises(ValueError, match="--time-budget"):
        timebudget.parse_duration(text)


def test_the_steps_after_the_recovery_are_priced_from_the_originals_measured_times(capsys):
    after = timebudget.after_recovery(30.0, {"llama.cpp": 70.0, "onnxruntime": 36.0})
    assert after == {"exports": pytest.approx(30.0 * timebudget.MLA_EXPORTS),
                     "speed and report": pytest.approx(30.0 * timebudget.SPEED_AND_REPORT),
                     "perplexity in llama.cpp": pytest.approx(70.0 * timebudget.MLA_SCORING["llama.cpp"]),
                     "perplexity in onnxruntime": pytest.approx(36.0 * timebudget.MLA_SCORING["onnxruntime"])}
    assert set(timebudget.after_recovery(30.0, {})) == {"exports", "speed and report"}  # --quality-windows 0
    shrunk = timebudget.after_recovery(30.0, {}, speed_share=0.25)  # the time plan kept a quarter of the speed runs
    assert shrunk["speed and report"] == pytest.approx(0.25 * after["speed and report"])
    import time
    t0 = time.perf_counter()
    deadline = timebudget.recovery_deadline(t0, 900.0, after)
    assert deadline == pytest.approx(t0 + 900.0 * (1 - timebudget.MARGIN) - sum(after.values()))
    said = capsys.readouterr().out
    assert f"perplexity in llama.cpp {70.0 * timebudget.MLA_SCORING['llama.cpp']:.0f} s" in said
    assert "the recovery gets" in said
