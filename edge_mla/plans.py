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
    planned: tuple[tuple[str, int, int], ...] = ()  # (step, windows, length) the time budget affords (timeplan.py)

    def sizes(self, step: str) -> tuple[int, int]:
        """(windows, tokens per window) that `step` reads."""
        for planned_step, windows, length in self.planned:
            if planned_step == step:
                return windows, length
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


# How wide each named plan's cache is, as a share of the original's (2 x KV heads x head_dim numbers per token per
# layer), so the default follows the model (convert.named_plan turns the share into C, rounded to whole 32-number
# q4_0/q8_0 blocks). On SmolLM2-135M's 384: training-free C + R = 256 + 64 = 320, the strongest compression whose
# held-out perplexity stayed within QUALITY_BOUND of the original (docs/conversion_quality.md); recovered (the
# build's 15-minute CPU recovery) 224 + 32 = 256, two thirds: the narrowest width measured within 1.10x of the
# original on all six kinds of text in both runtimes (192 + 32 had news at 1.125x in llama.cpp, 160 + 32 at 1.29x;
# docs/quality.md); fine-tuned on a GPU 128 + 64 = 192, half (docs/finetune.md).
QUALITY_BOUND = 0.40
CACHE_SHARE = {"training-free": 5 / 6, "recovered": 2 / 3, "finetuned": 1 / 2}
ROW_BLOCK = 32
# A conversion whose cache keeps more than this share of the original's saves too little to be worth its quality
# cost (a Qwen2.5-0.5B's 256 numbers at C + R = 192 + 64 saved nothing): refused before any work (convert.check_saving)
MAX_CACHE_SHARE = 0.90
# What each width is expected to cost, measured on SmolLM2-135M (MLA / original perplexity, docs/quality.md,
# docs/conversion_quality.md): said when a plan is refused.
EXPECTED_COST = {"training-free": "about 1.2-1.4x the original's perplexity on prose, 2-3x on code, with no training",
                 "recovered": "at two thirds of the cache, within 1.10x of the original's perplexity on six kinds of "
                              "text after the build's 15-minute CPU recovery; at half, up to 1.3x (docs/quality.md)",
                 "finetuned": "within a few percent of the original after a GPU fine-tune (docs/finetune.md)"}
# Teacher text for the CPU recovery: 48 x 512 calibration tokens, balanced over the kinds of the calibration mixture
# (or the user's --calib-text files) and spread over each, and up to 600 Adam steps per layer (as many as
# --time-budget buys) at a peak learning rate of 2e-4, under bf16 autocast where the CPU has it
# (recover.native_bf16: 1.25x faster on 2 threads, the same error). Per layer on held-out Wikipedia and news,
# more articles, more steps and 2e-4 rather than 1e-4 all cut the block's error; the first 16 windows (a few
# articles) at 300 steps left it under-fitted, and 4e-4 over-shoots at late layers (docs/recovery.md). Held-out text
# is never used; the quality target's check windows (the split's end) are left out.
RECOVER_STEPS = 600
RECOVER_LR = 2e-4
RECOVER_WINDOWS, RECOVER_LENGTH = 48, 512  # the recovery's teacher text: windows x tokens
# The build's default time budget: what the built-in model's build fits on a 2-core machine. The recovery takes
# what the other steps leave (timebudget.StepBudget), up to RECOVER_STEPS a layer.
DEFAULT_TIME_BUDGET = "15m"

# The named plans; their latent (None here) comes from CACHE_SHARE and the model (convert.named_plan).
PLANS = {
    "training-free": Plan(selection="shared", weighting="attention"),
    # The build's default: recovered on the CPU layer by layer, through the 4-bit cache (docs/recovery.md). The
    # rope key keeps the 16 highest frequencies (a narrow rope key suits a q4_0 row: on SmolLM2-135M measured 18.11
    # against 20.89 for C=128, R=64).
    "recovered": Plan(selection="shared", rope_pairs=16, weighting="attention"),
    # With fine-tuning the latent can shrink much further: docs/finetune.md (C=128 recovers the original).
    "finetuned": Plan(selection="shared", weighting="attention"),
}


def recovery_windows(tokenizer, texts: tuple[str, ...] = ()):
    """The recovery's teacher windows, from the same texts the conversion calibrates on (the built-in mixture of
    kinds or the user's files)."""
    from edge_mla.data import spread_windows
    from edge_mla.target import CHECK_LENGTH, CHECK_WINDOWS

    return spread_windows(tokenizer, texts or None, count=RECOVER_WINDOWS, length=RECOVER_LENGTH,
                          hold_out_tokens=0 if texts else CHECK_WINDOWS * CHECK_LENGTH)


def recovery_options(bits: int, kv_bits: int) -> dict:
    """How the build recovers: through the cache and the 4-bit projections it ships, with a learned latent norm,
    which lets the GGUF store kv_a at 4 bits too; onnxruntime's int4 shares q4_0's grid. The per-head
    up-projections stay 8-bit: 4-bit ones, trained through, saved 2.8 MB of GGUF for +5% perplexity in llama.cpp
    (docs/recovery.md, benchmarks/recovery_runtimes.py). Each block learns from the original's inputs: training it
    on the converted model's own stream towards the original's (LayerRecovery(corrects_drift=True)) won in PyTorch
    at a float cache (worst text 1.39x -> 1.30x at 300 steps) but lost through the runtimes' 4-bit formats at the
    15-minute budget (docs/quality.md)."""
    return dict(cache_bits=kv_bits, weight_bits=bits, latent_norm=True, up_projections=False, lr=RECOVER_LR)


def recovery_step(recover_steps: int, bits: int, kv_bits: int, budgeted: bool = False) -> str:
    steps = f"{'up to ' if budgeted else ''}{recover_steps} steps"
    return (f"recovering on the CPU: each attention block trained {steps} towards the original's outputs"
            f"{', through the 4-bit cache' if kv_bits == 4 else ''}{' and 4-bit weights' if bits == 4 else ''}, "
            "with a learned latent norm")


def finetune_texts(tokenizer, user_texts: tuple[str, ...] = ()) -> list[str]:
    """What the GPU fine-tune trains on: the texts the conversion calibrates on (the user's, or the built-in mixture
    of prose, code, docs and chat), and with the built-in mixture the public-domain books of the fine-tuning corpus
    too (more distinct text for the same steps). Never a battery text (edge_mla.texts)."""
    from edge_mla.data import BOOKS, book_text, calibration_texts

    return calibration_texts(tokenizer, user_texts or None) + ([] if user_texts else [book_text(b) for b in BOOKS])
