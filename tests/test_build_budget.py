"""--time-budget on a tiny model, end to end: the build keeps to a budget of seconds that binds (the recovery could
train far longer), and its start-of-build estimate (timeplan: a probe of the machine prices every step) is within
half of what it took. A mechanism's check with wide bounds, not a speed claim: the recovery is measured against its
deadline as it goes, so a slow or busy machine gets fewer steps, not a late build."""
from __future__ import annotations

import json

import pytest

from edge_mla import cli

pytest.importorskip("llama_cpp", reason="the llama extra (llama-cpp-python) is not installed")
pytestmark = pytest.mark.usefixtures("llama_cpp_runs")

BUDGET_SECONDS = 90
MOST_STEPS = 50_000  # far more than the budget buys: the budget, not the steps asked for, ends the recovery


@pytest.mark.slow
def test_a_budget_of_seconds_is_kept_and_the_estimate_is_within_half_of_what_the_build_took(tmp_path, tiny_source,
                                                                                          capsys):
    out = tmp_path / "build"
    code = cli.main(["build", "-m", str(tiny_source), "--device", "rpi-zero-2w", "--bits", "4", "--context", "256",
                     "--out", str(out), "--time-budget", f"{BUDGET_SECONDS}s", "--recover-steps", str(MOST_STEPS),
                     "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    plan, took = report["time_plan"], report["build_seconds"]
    print(json.dumps({"took": took, "estimate": plan["estimate_seconds"], "took_by_step": plan["took_seconds"],
                      "recovery": report["recovery"]["steps_per_layer"]}))
    assert plan["sizes"]["recover"] and "steps a layer" in report["recovery"]["time_budget"]
    assert str(MOST_STEPS) not in str(report["recovery"]["steps_per_layer"])  # the budget ended the recovery
    assert 0.5 * BUDGET_SECONDS <= took <= 1.5 * BUDGET_SECONDS
    assert 0.5 * took <= plan["estimate_total_seconds"] <= 1.5 * took
