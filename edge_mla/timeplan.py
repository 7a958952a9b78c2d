"""What a build can afford on this machine, decided at its start: a short probe (one decoder layer's forward over
a window of tokens, one eigendecomposition of the hidden size) prices every step of the build in seconds, and
when the defaults would not fit --time-budget, the build reads less text (calibration, quality battery, speed
prompts) and, where even the least recovery would not fit, recovers nothing and keeps a training-free width.

Every step's cost is a multiple of the probe's `token_seconds` (one token through every layer, float32 PyTorch):
the passes through the model (calibration, teacher, exporters' checks) are that directly, the runtimes' scoring and
the exports (read, quantize, write: work in proportion to the parameters, like a forward pass) are constant
multiples of it, measured on the built-in model and an 8B-shaped checkpoint (docs/scale.md); the conversion's
per-layer linear algebra grows as hidden^3 and is priced by the probe's eigendecomposition. The build records the
estimate beside what each step took (report.json `time_plan`), so the error is seen, not assumed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from edge_mla import runsettings
from edge_mla.plans import CALIBRATION_DEFAULTS, RECOVER_LENGTH, RECOVER_STEPS, RECOVER_WINDOWS
from edge_mla.timebudget import MIN_BUDGET_STEPS

PROBE_TOKENS = 256
EIG_PROBE_SIZE = 768  # a larger hidden size is priced by the cube of the ratio
PROBE_SECONDS = 0.3  # each probe repeats its run up to this long and keeps the fastest

# Cost of each step in tokens through the model (multiples of Probe.token_seconds) or through one layer (of
# Probe.layer_token_seconds), fitted on the 2-core AMD host, 2026-12-06, to the built-in model's default build
# (a token through it: 2.0 ms) and the 8B-shaped checkpoint's (96 ms; docs/scale.md), each within ~20% of both.
CONVERT_TOKEN = 2.0  # a calibration token of the conversion: the pass and its float64 statistics
EIGS_PER_LAYER = 2.0  # the conversion's hidden x hidden decompositions, per layer, in Probe.eig_seconds (the 8B:
#                       30 s a layer at 2 x 512 tokens, of which ~6 s its passes and statistics; eig 11.5 s)
# One file's export besides its calibration pass, per layer: (seconds of overhead, layer-tokens of work). SmolLM2:
# ONNX 0.2 s a layer, GGUF 0.25 s; the 8B: ONNX 3.3 s a layer (1,030 layer-tokens of 3 ms), GGUF 1.6 s.
EXPORT_PER_LAYER = {"onnx": (0.15, 1030.0), "gguf": (0.2, 500.0)}
# A token of perplexity in the runtime (the original; the MLA files' is timebudget.MLA_SCORING times it): tokens
# through the model, plus seconds a layer the runtime spends whatever the layer's size (its small matrices run
# less efficiently than PyTorch's large ones). Fitted to the built-in model (llama.cpp 5.7 ms a token with its
# q4_0 cache, onnxruntime 3.7 ms; a token through it 2.0 ms) and the 8B (106 ms and 79 ms; a token 97 ms).
SCORE_TOKEN = {"llama.cpp": (1.05, 0.12e-3), "onnxruntime": (0.8, 0.072e-3)}
DECODE_TOKEN = 4.5  # a decoded token in the speed runs (no batching: every weight read for one token)
SPEED_RUN_SECONDS = 2.0  # each speed run starts its runtime (a child process for llama.cpp) and loads the file
RECOVER_STEP_TOKENS = 850.0  # one Adam step of one block (512 tokens, forward and backward), in layer-tokens
MIN_RECOVER_STEPS = MIN_BUDGET_STEPS
# Recovery steps a layer worth more than the default text sizes. Measured on a host twice as slow as the AMD one
# (one core, --threads 1), the default 15-minute build: at 100 the text kept most of its size and the recovery got
# 56-121 steps (news 1.23x in llama.cpp, 1.21x in onnxruntime); at 200 it read less (2 windows a text, 6 x 1024
# calibration tokens) and got 135-204 steps (news 1.11x and 1.05x; docs/quality.md).
KEEP_STEPS = 200

# The least a build reads when the budget is short, per step: below these the statistics (conversion), the cache
# scales (ONNX) and the comparison (quality: one window of each kind of text) stop meaning much.
FLOORS = {"convert": (2, 512), "onnx": (1, 256), "gguf": (1, 256)}
QUALITY_FLOOR = (1, 256)  # windows per text, tokens each
QUALITY_TEXTS = 6


@dataclass(frozen=True)
class Probe:
    """This machine today, with this model: a decoder layer's float32 forward per token, and one float64
    eigendecomposition of hidden x hidden (the conversion does a few per layer)."""
    layer_token_seconds: float
    eig_seconds: float
    layers: int

    @property
    def recover_step_seconds(self) -> float:
        """One Adam step of one block in the recovery."""
        return RECOVER_STEP_TOKENS * self.token_seconds

    @property
    def token_seconds(self) -> float:
        return self.layer_token_seconds * self.layers


@dataclass(frozen=True)
class Sizes:
    """How much text each step of a build reads, and whether it recovers."""
    calibration: tuple[tuple[str, int, int], ...]  # (step, windows, tokens per window)
    quality_windows: int
    quality_length: int
    speed_prompts: tuple[int, ...]
    speed_repeats: int
    recover: bool

    def of(self, step: str) -> tuple[int, int]:
        return next((w, n) for s, w, n in self.calibration if s == step)


def measure(model, checkpoint=None) -> Probe:
    """Time layer 0 over PROBE_TOKENS tokens (read from the checkpoint and released, for a model left on disk) and a
    float64 eigendecomposition, scaled to the hidden size."""
    import torch

    from edge_mla.layerwise import layer_arguments, resident

    config = model.config
    hidden_size = config.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, PROBE_TOKENS, hidden_size, generator=g)
    arguments = layer_arguments(model, hidden)[0]
    def fastest(run) -> float:
        """The fastest of at least two runs, and of as many as fit PROBE_SECONDS (a small model's layer takes
        ~20 ms, which one noisy run of a shared machine misjudges by a third): other work only slows a run."""
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 2 or (spent < PROBE_SECONDS and runs < 20):
            t = time.perf_counter()
            run()
            took = time.perf_counter() - t
            best, spent, runs = min(best, took), spent + took, runs + 1
        return best

    with torch.no_grad(), resident(model.model.layers[0], "model.layers.0.", checkpoint) as layer:
        dtype = next(layer.parameters()).dtype
        layer(hidden.to(dtype), **arguments)  # first run: allocations, kernel choice
        layer_token_seconds = fastest(lambda: layer(hidden.to(dtype), **arguments)) / PROBE_TOKENS
    n = min(hidden_size, EIG_PROBE_SIZE)
    a = torch.randn(n, n, dtype=torch.float64, generator=g)
    a = a @ a.T
    eig_seconds = fastest(lambda: torch.linalg.eigh(a)) * (hidden_size / n) ** 3
    return Probe(layer_token_seconds, eig_seconds, config.num_hidden_layers)


def defaults(quality_windows: int, quality_length: int, speed_prompts: tuple[int, ...], recover: bool,
             calibration) -> Sizes:
    """The sizes asked for (the flags given, each step's default otherwise), before any budget."""
    return Sizes(tuple((s, *calibration.sizes(s)) for s in CALIBRATION_DEFAULTS), quality_windows, quality_length,
                 speed_prompts, 2, recover)


def estimate(sizes: Sizes, probe: Probe, formats: tuple[str, ...], mla_scoring: dict[str, float],
             recover_steps: int = 0) -> dict[str, float]:
    """Seconds per part of the build, in the order the build does them (recover_steps: a layer, when it recovers)."""
    tok = probe.token_seconds
    score = {r: a * tok + b * probe.layers for r, (a, b) in SCORE_TOKEN.items()}  # seconds a token
    runtimes = [r for r, f in (("llama.cpp", "gguf"), ("onnxruntime", "onnx")) if f in formats]
    per_layer = {f: a + b * probe.layer_token_seconds for f, (a, b) in EXPORT_PER_LAYER.items() if f in formats}
    int8_original = "onnx" in formats and sizes.quality_windows > 0 and sizes.recover  # scored with its int8 cache
    walk = sizes.of("onnx")[0] * sizes.of("onnx")[1] * tok if "onnx" in formats else 0.0
    scored = QUALITY_TEXTS * sizes.quality_windows * sizes.quality_length
    w, n = sizes.of("convert")
    out = {"original exports": probe.layers * (sum(per_layer.values()) + int8_original * per_layer.get("onnx", 0))
                               + walk * (1 + int8_original),
           "original scoring": scored * (sum(score[r] for r in runtimes) + int8_original * score["onnxruntime"]),
           "conversion": CONVERT_TOKEN * w * n * tok + EIGS_PER_LAYER * probe.eig_seconds * probe.layers}
    if sizes.recover and recover_steps:
        out["teacher pass"] = RECOVER_WINDOWS * RECOVER_LENGTH * tok
        out["recovery"] = recover_steps * probe.recover_step_seconds
    gguf_check = sizes.of("gguf")[0] * sizes.of("gguf")[1] * tok if "gguf" in formats else 0.0
    out["MLA exports"] = probe.layers * sum(per_layer.values()) + walk + gguf_check
    out["MLA scoring"] = scored * sum(score[r] * mla_scoring.get(r, 2.0) for r in runtimes)
    run = [score["llama.cpp"] * p + DECODE_TOKEN * 32 * tok for p in sizes.speed_prompts]
    out["speed"] = sizes.speed_repeats * 2 * len(runtimes) * (sum(run) + SPEED_RUN_SECONDS * len(run))
    if "gguf" in formats:  # each GGUF once more per other llama.cpp setting (runsettings.py), in the same child
        out["speed"] += sum(map(len, runsettings.SETTINGS.values())) * sum(run)
    return out


def _scaled(default: tuple[int, int], floor: tuple[int, int], share: float) -> tuple[int, int]:
    """share of the default's tokens, windows first (whole windows of the default length), then shorter windows
    down to the floor."""
    windows, length = default
    tokens = share * windows * length
    if tokens >= floor[0] * length:
        return max(floor[0], round(tokens / length)), length
    return floor[0], max(floor[1], min(length, 64 * round(tokens / floor[0] / 64)))


def shrink(sizes: Sizes, share: float, fixed: frozenset[str] = frozenset()) -> Sizes:
    """The sizes at `share` of the defaults' text, each at least its floor; steps in `fixed` (given by the user)
    are kept. The speed runs make one pass below three quarters of the text; both prompts stay above the floors,
    since the line through them is what gives the speed at the build's context (speedmodel)."""
    calibration = tuple((s, w, n) if "calibration" in fixed else (s, *_scaled((w, n), FLOORS[s], share))
                        for s, w, n in sizes.calibration)
    quality = (sizes.quality_windows, sizes.quality_length)
    if "quality" not in fixed and sizes.quality_windows:
        quality = _scaled(quality, QUALITY_FLOOR, share)
    prompts, repeats = sizes.speed_prompts, sizes.speed_repeats
    if "speed" not in fixed and prompts:
        repeats = 1 if share < 0.75 else repeats
        prompts = prompts[:1] if share <= 0 else prompts  # at the floors the long prompt goes too
    return replace(sizes, calibration=calibration, quality_windows=quality[0], quality_length=quality[1],
                   speed_prompts=prompts, speed_repeats=repeats)


@dataclass
class Fitted:
    sizes: Sizes
    estimate: dict[str, float]  # seconds by part (recovery at its planned steps)
    recover_steps: int  # a layer, as planned (the recovery's own StepBudget decides as it goes)
    unbudgeted: float  # what the defaults would take here
    speed_share: float = 1.0  # the speed runs' estimate against the defaults' (timebudget.after_recovery scales by it)
    spent: float = 0.0  # seconds the build had run when it planned (loading the model, the probe)

    def total(self) -> float:
        """The whole build's seconds: what it had spent when it planned, and the estimate of every part after."""
        return self.spent + sum(self.estimate.values())

    def as_dict(self, probe: Probe) -> dict:
        return {"probe": {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(probe).items()},
                "sizes": asdict(self.sizes), "recover_steps_planned": self.recover_steps,
                "estimate_seconds": {k: round(v, 1) for k, v in self.estimate.items()},
                "estimate_total_seconds": round(self.total(), 1), "spent_when_planned_seconds": round(self.spent, 1),
                "defaults_seconds": round(self.unbudgeted, 1),
                "speed_share": round(self.speed_share, 3)}


def fit(budget: float | None, probe: Probe, wanted: Sizes, formats: tuple[str, ...], mla_scoring: dict[str, float],
        most_steps: int = RECOVER_STEPS, fixed: frozenset[str] = frozenset()) -> Fitted:
    """The sizes and recovery steps that fit `budget` seconds. The recovery is what makes the model good, so the
    text the other steps read gives way first: the defaults while the recovery gets at least KEEP_STEPS a layer;
    else the largest share of the defaults that leaves it KEEP_STEPS; else the floors and what steps they leave,
    down to MIN_RECOVER_STEPS; below that no recovery (and the largest share without it, or the floors). What is
    left goes to the recovery, up to most_steps. No budget: the defaults."""
    def estimated(sizes: Sizes, steps: int) -> float:
        return sum(estimate(sizes, probe, formats, mla_scoring, steps).values())

    unbudgeted = estimated(wanted, most_steps if wanted.recover else 0)
    if budget is None:
        steps = most_steps if wanted.recover else 0
        return Fitted(wanted, estimate(wanted, probe, formats, mla_scoring, steps), steps, unbudgeted)
    tiers = []
    if wanted.recover and most_steps:  # the steps the floors leave, up to KEEP_STEPS: text above them comes after
        step = probe.recover_step_seconds
        at_floors = estimated(shrink(wanted, 0.0, fixed), 1) - step  # the floors with the teacher pass, no steps
        least = min(KEEP_STEPS, most_steps, int((budget - at_floors) / step))
        if least >= min(MIN_RECOVER_STEPS, most_steps):
            tiers.append((wanted, least))
    tiers.append((replace(wanted, recover=False), 0))
    for i, (sizes, least) in enumerate(tiers):
        last = i == len(tiers) - 1
        if estimated(shrink(sizes, 0.0, fixed), least) > budget and not last:
            continue  # not even the floors with this much recovery
        share = 1.0
        if estimated(sizes, least) > budget:
            low, high = 0.0, 1.0
            for _ in range(20):
                mid = (low + high) / 2
                low, high = (mid, high) if estimated(shrink(sizes, mid, fixed), least) <= budget else (low, mid)
            share = low
        chosen = shrink(sizes, share, fixed) if share < 1 else sizes
        steps = 0
        if chosen.recover:  # what the rest of the budget buys, a layer
            spare = budget - estimated(chosen, 0) - RECOVER_WINDOWS * RECOVER_LENGTH * probe.token_seconds
            steps = int(max(least, min(most_steps, spare / probe.recover_step_seconds)))
        fitted = estimate(chosen, probe, formats, mla_scoring, steps)
        default_speed = estimate(wanted, probe, formats, mla_scoring, 0)["speed"]
        return Fitted(chosen, fitted, steps, unbudgeted, fitted["speed"] / default_speed if default_speed else 1.0)
    raise AssertionError("unreachable: the last tier always returns")


def describe(fitted: Fitted, probe: Probe, budget: float | None, wanted: Sizes) -> list[str]:
    """What the build will do and about how long it will take, for the progress output."""
    minutes = lambda s: f"{s / 60:.1f} min"  # noqa: E731
    parts = ", ".join(f"{k} {minutes(v)}" for k, v in fitted.estimate.items())
    lines = [f"on this machine a token through the model takes {1000 * probe.token_seconds:.1f} ms (probe: one "
             f"layer, {PROBE_TOKENS} tokens): this build should take about {minutes(fitted.total())} in all "
             f"({fitted.spent:.0f} s of loading so far; {parts})"]
    s = fitted.sizes
    if s != wanted:
        cal = ", ".join(f"{step} {w} x {n}" for step, w, n in s.calibration)
        lines.append(f"the defaults would take about {minutes(fitted.unbudgeted)} here, over the "
                     f"{minutes(budget)} budget: reading less (calibration {cal}; quality {s.quality_windows} x "
                     f"{s.quality_length} tokens per text; speed after {' and '.join(map(str, s.speed_prompts)) or 'no'}"
                     f"-token prompts, {s.speed_repeats} pass)")
    if wanted.recover and not s.recover:
        lines.append(f"not even {MIN_RECOVER_STEPS} recovery steps a layer fit the budget on this machine: no "
                     "recovery, the training-free width instead; give a longer --time-budget, or fine-tune on a GPU "
                     "(--finetune-tokens)")
    if fitted.total() > (budget or float("inf")) * 1.05:
        lines.append(f"the least this build can do here is about {minutes(fitted.total())}, more than the "
                     f"{minutes(budget)} budget: it runs at the least")
    return lines


def bought(time_plan: dict, budget: float | None, build_seconds: float) -> str:
    """One line for the report's key figures: what the budget bought, estimated against taken."""
    sizes = time_plan["sizes"]
    cal = ", ".join(f"{step} {w} x {n}" for step, w, n in sizes["calibration"])
    recovery = (f"recovery planned at {time_plan['recover_steps_planned']} steps a layer" if sizes["recover"]
                else "no recovery")
    return (f"{budget / 60:.0f} min budget: calibration {cal}; quality {sizes['quality_windows']} x "
            f"{sizes['quality_length']} tokens per text; {recovery}; estimated {time_plan['estimate_total_seconds'] / 60:.1f}"
            f" min, took {build_seconds / 60:.1f}")
