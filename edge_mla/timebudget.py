"""The build's time budget (`--time-budget`): how long the steps after the recovery will take on this machine,
and how many Adam steps each layer's recovery gets so that the whole build ends in time. Measured, not assumed:
the same build's recovery ran at 33 s a layer on one host and 20 s on another, and 1.5x slower on the Intel one."""
from __future__ import annotations

import time

# The steps after the recovery, from what the same build measured before it on this machine (the originals are
# exported and scored on the battery first). On the built-in model, 2-core AMD EPYC, 2026-12-06: the MLA exports
# took 0.7-1.1x the original's same-bits exports; scoring the MLA file took 1.6-2.0x the original's time in
# llama.cpp (124 s against 70 at C + R = 224: its attention does more work per token, and llama.cpp's flash
# attention converts the q4_0 latent per head) and 0.74x in onnxruntime (34 s against 46: it reads prompts in the
# expanded form, docs/speed.md; 1.8-2.0x before it did, which left 1.3 minutes of a 15-minute build unused); the
# speed runs of four files after 256- and 1024-token prompts (speedmodel.py), twice each, the GGUFs once more with
# an f16 cache (runsettings.py), and the report 6.3x the exports (the fresh builds of cff1f17 and df68646 ended 31 s
# and 24 s inside their 15 minutes; 3.0x, the figure of the morning, ended one 50 s over).
MLA_EXPORTS = 1.1
MLA_SCORING = {"llama.cpp": 1.8, "onnxruntime": 0.8}
SPEED_AND_REPORT = 6.3
PROBE_STEPS = 8  # timed on a copy of the first block: the seconds per step of this machine, today
# The share of the budget the recovery leaves unspent: what the steps after it take is estimated, and the
# estimate's error on the fresh builds of 2026-12-06/07 was -31 s to +50 s of ~150 s, so a 15-minute build aims to
# end ~20 s early rather than half its runs ending late.
MARGIN = 0.02
MIN_BUDGET_STEPS = 50  # below this a block barely moves; a budget too small for it is overrun, and the build says so


def parse_duration(text: str) -> float:
    """'15m', '900s', '1.5h' or plain seconds -> seconds."""
    value = text.strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(value[-1:], None)
    try:
        seconds = float(value[:-1] if unit else value) * (unit or 1)
    except ValueError:
        raise ValueError(f"--time-budget {text!r} is not a duration: write it as 15m, 900s or 1.5h") from None
    if seconds <= 0:
        raise ValueError(f"--time-budget {text}: give a positive duration, e.g. 15m")
    return seconds

def after_recovery(original_export_seconds: float, original_scoring_seconds: dict[str, float],
                   speed_share: float = 1.0) -> dict[str, float]:
    """Seconds the steps after the recovery are expected to take, by step, from the original's measured ones:
    its same-bits exports (the MLA exports repeat them) and its scoring per runtime (the MLA file's is slower by
    MLA_SCORING); speed_share: the share of the default speed runs the time plan kept (timeplan.Fitted)."""
    expected = {"exports": MLA_EXPORTS * original_export_seconds,
                "speed and report": SPEED_AND_REPORT * speed_share * original_export_seconds}
    for runtime, seconds in original_scoring_seconds.items():
        expected[f"perplexity in {runtime}"] = MLA_SCORING.get(runtime, 2.0) * seconds
    return expected


def recovery_deadline(t0: float, budget: float, after: dict[str, float]) -> float:
    """When the recovery must end for the build (started at t0) to end within `budget`: what is left after the
    time the steps after it are expected to take (after_recovery) and the MARGIN. Says what it expects."""
    total = sum(after.values())
    deadline = t0 + budget * (1 - MARGIN) - total
    left = deadline - time.perf_counter()
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in after.items())
    print(f"      time budget {budget / 60:.1f} min: the recovery gets {max(left, 0) / 60:.1f} min; the steps after it "
          f"are expected to take {total / 60:.1f} min ({parts}, from the original's on this machine)", flush=True)
    return deadline


class StepBudget:
    """How many Adam steps each remaining layer gets so that the recovery ends by `deadline` (time.perf_counter()):
    the time left shared evenly over the layers left, less what a layer costs besides its training steps (its
    calibration, conversion, teacher pass and evaluation, as last measured), at the seconds per step measured so far
    (a short probe on the first layer), between MIN_BUDGET_STEPS and the plan's steps. The machine's speed is
    measured, not assumed: the same build took 33 s a layer on one host and 20 s on another."""

    def __init__(self, deadline: float, layers: int):
        self.deadline, self.layers = deadline, layers
        self.seconds_per_step, self.other_seconds, self.chosen = None, 0.0, []
        self.last_call, self.last_train = None, 0.0

    def steps_for(self, i: int, most: int, probe) -> int:
        now = time.perf_counter()
        if self.last_call is not None:  # the wall time since the last layer's call, less its training loop
            self.other_seconds = max(now - self.last_call - self.last_train, 0.0)
        if self.seconds_per_step is None:
            self.seconds_per_step = probe(PROBE_STEPS)
        self.last_call = time.perf_counter()
        left = max(self.deadline - self.last_call, 0.0) / max(self.layers - i, 1) - self.other_seconds
        steps = int(min(most, max(MIN_BUDGET_STEPS, left / self.seconds_per_step)))
        if steps == MIN_BUDGET_STEPS and MIN_BUDGET_STEPS not in self.chosen:
            print(f"      warning: the time budget leaves too little for the recovery on this machine: every layer "
                  f"from {i + 1} gets the least, {MIN_BUDGET_STEPS} steps, and the build will run over its budget; "
                  "give a longer --time-budget for a better model", flush=True)
        self.chosen.append(steps)
        return steps

    def spent(self, stats: dict, steps: int) -> None:
        """The layer's training loop: its pace from now on."""
        self.last_train = stats["train_seconds"]
        if steps:
            self.seconds_per_step = stats["train_seconds"] / steps

    def describe(self) -> str:
        return (f"{min(self.chosen)}-{max(self.chosen)} steps a layer at {1000 * self.seconds_per_step:.0f} ms a step"
                if self.chosen else "unused")
