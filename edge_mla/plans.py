"""Conversion plans: what MHA2MLA keeps of RoPE and how wide the latent is, as data, with the named plans the
build chooses from. No torch here: the CLI reads the choices without loading anything."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PER_HEAD_SELECTIONS = ("high", "low", "uniform", "2norm", "partition", "partition-2norm")
SELECTIONS = PER_HEAD_SELECTIONS + ("shared",)
# Selections where no two KV heads keep the same frequency: llama.cpp's single rope key runs them exactly.
DISJOINT_SELECTIONS = ("partition", "partition-2norm", "shared")
SVD_METHODS = ("joint", "split")
WEIGHTINGS = ("weights", "activations", "balanced", "attention")


@dataclass
class Plan:
    selection: str = "shared"
    rope_pairs: int | None = None  # r; None: the selection's default
    latent: int | None = None  # total latent width C; None: full rank
    svd: str = "joint"
    weighting: str = "attention"
    rope_components: int = 1  # shared head only: principal mixes per frequency that keep RoPE


# Calibration text each step of the build reads by default, (windows, tokens per window): the conversion's
# statistics, the ONNX cache scales, the GGUF latent check (the CLI's --calib-windows/--calib-length defaults).
CALIBRATION_DEFAULTS = {"convert": (16, 1024), "onnx": (8, 512), "gguf": (4, 512)}


@dataclass(frozen=True)
class Calibration:
    """The calibration text of the conversion, the CPU recovery, the ONNX cache scales and the GGUF latent check: a
    given windows or length replaces that of each step's own default (the recovery reads its own 48 x 512), and
    given texts replace the built-in mixture in every step. On a big model and a
    small machine fewer tokens shorten every pass through the model (docs/scale.md)."""
    windows: int | None = None
    length: int | None = None
    texts: tuple[str, ...] = ()  # the user's text files (each one kind of text); empty: the built-in mixture

    def sizes(self, step: str) -> tuple[int, int]:
        """(windows, tokens per window) that `step` reads."""
        windows, length = CALIBRATION_DEFAULTS[step]
        return (windows if self.windows is None else self.windows, length if self.length is None else self.length)

    def of(self, step: str) -> dict:
        """The step's calibration as the keyword arguments of its function."""
        windows, length = self.sizes(step)
        text_argument = "calib_text" if step == "onnx" else "text"
        return {"calib_windows": windows, "calib_length": length, text_argument: self.texts or None}

    def check(self) -> "Calibration":
        for flag, value in (("--calib-windows", self.windows), ("--calib-length", self.length)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: give 1 or more (or leave it out for each step's default)")
        for path in self.texts:
            if not Path(path).is_file():
                raise ValueError(f"--calib-text {path}: no such file; give text or JSONL files of your own domain")
        return self


# The training-free default: the strongest compression whose held-out perplexity stayed within QUALITY_BOUND of
# the original in docs/conversion_quality.md (SmolLM2-135M). A shared rope head keeps every frequency (llama.cpp
# runs it exactly) and C + R = 320 is a multiple of 32 (q8_0/q4_0 caches).
QUALITY_BOUND = 0.40
DEFAULT_LATENT = 256
# Adam steps per attention block of the build's CPU recovery, and their peak learning rate (cosine to zero): build.py
# says why.
RECOVER_STEPS = 600
RECOVER_LR = 2e-4
# The build's default time budget: what the built-in model's build fits on a 2-core machine. The recovery takes
# what the other steps leave (timebudget.StepBudget), up to RECOVER_STEPS a layer.
DEFAULT_TIME_BUDGET = "15m"

PLANS = {
    "training-free": Plan(selection="shared", latent=DEFAULT_LATENT, weighting="attention"),
    # The build's default: recovered on the CPU layer by layer, through the 4-bit cache (docs/recovery.md). C + R =
    # 160 + 32 = 192 is half the original's 384 numbers per token per layer; the rope key keeps the 16 highest
    # frequencies (a narrow rope key suits a q4_0 row: measured 18.11 against 20.89 for C=128, R=64).
    "recovered": Plan(selection="shared", rope_pairs=16, latent=160, weighting="attention"),
    # With fine-tuning the latent can shrink much further: docs/finetune.md (C=128 recovers the original).
    "finetuned": Plan(selection="shared", latent=128, weighting="attention"),
}
