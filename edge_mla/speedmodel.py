"""Speed at any context from the speeds the build measures at two prompt lengths.

Per token, a decoder reads its weights and runs its ops (the same at every context) and attends over the cached
rows (in proportion to them). So the time of a decode step at context T is a line, fixed + per_token * T; so is
the time per token of a T-token prompt (its tokens attend over T / 2 rows on average). Two measured prompt lengths
give each model's line in each runtime, and the line gives its speed at the contexts the verdict prices. The line is
the build machine's own: it holds the runtime's real kernels (llama.cpp's flash attention converting each
quantized row once per head, onnxruntime's per-op overhead), which a count of bytes and multiply-adds alone misses:
MLA's absorbed attention does 4x the original's multiply-adds per cached row and costs 2.6x (onnxruntime) to
2.3x (llama.cpp, q4_0 cache) the time per row here, because a score costs as much as ~100 multiply-adds
(benchmarks/speed_model.py splits each runtime's cost per row into the two and checks the lines; docs/speed.md).

On another machine (the target device) the line is scaled part by part by what bounds it: the decode's fixed part
streams the weights once a token (memory bandwidth), the prefill's fixed part multiplies every prompt token by them
(arithmetic), and the part per cached row is arithmetic in both (MLA's absorbed attention reads a few MB of cache and
does 3-4x the original's multiply-adds a row). Each machine's rates: the build machine's measured by `probe`, a
device's from its catalog entry (peak bandwidth and multiply-adds, times the share programs sustain). So a device's
speed keeps the runtime's real kernels measured here and takes the device's own bandwidth and arithmetic
(benchmarks/device_speed.py checks the rule across thread counts on the build machine; docs/speed.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

# The largest errors measured, which the report states (docs/speed.md). LINE_ERROR: the lines through 256 and 1024
# tokens predicting 4096, at the caches the build prices (onnxruntime int4, llama.cpp q4_0; benchmarks/speed_model.py,
# docs/results/speed_model.json; llama.cpp's f16 MLA decode is no line: 47% there). DEVICE_ERROR: the lines moved
# between this machine at 2 threads and at 1 by the probed rates, every file, runtime, cache, phase and prompt
# (benchmarks/device_speed.py, docs/results/device_speed.json). Both SmolLM2-135M, AMD EPYC, 2026-12-06.
LINE_ERROR = 0.26
DEVICE_ERROR = 0.22


@dataclass(frozen=True)
class Line:
    """Milliseconds per token = fixed_ms + per_token_ms * context."""
    fixed_ms: float
    per_token_ms: float

    def tokens_per_s(self, context: float) -> float:
        return 1e3 / (self.fixed_ms + self.per_token_ms * context)


@dataclass(frozen=True)
class Rates:
    """What a machine sustains: GB/s read from memory and billions of float32 multiply-adds a second."""
    bandwidth_gbs: float
    gmacs: float


# The share of a device's peak rates (devices.toml) that programs sustain. Bandwidth: STREAM copy on a Raspberry
# Pi 4, 5.5 of its 12.8 GB/s (sci-pi.org.uk/bench/stream.html); arithmetic: a float32 matrix product reaches ~90%
# of the FMA peak (this build machine's probe: 95-98 GMAC/s on 2 Zen 4 cores, 2 x 16 lanes a cycle at ~3 GHz).
SUSTAINED_BANDWIDTH = 0.45
SUSTAINED_ARITHMETIC = 0.9
PROBE_BYTES = 256 * 2**20  # far beyond any cache: the read is from memory


def probe(threads: int) -> Rates:
    """This machine's rates on `threads` threads: a sum over 256 MB (read bandwidth) and a 512 x 512 float32 matrix
    product (multiply-adds), the best of a few runs; about a second."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def best(fn, runs: int) -> float:
            fn()
            return min(_timed(fn) for _ in range(runs))
        big = torch.ones(PROBE_BYTES // 4)
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        return Rates(round(PROBE_BYTES / best(big.sum, 5) / 1e9, 1), round(512 ** 3 / best(lambda: a @ b, 10) / 1e9, 1))
    finally:
        torch.set_num_threads(saved)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def device_rates(device) -> Rates | None:
    """A catalog device's sustained rates (budget.Device); None where its entry gives no multiply-add rate."""
    if not getattr(device, "gmacs", None):
        return None
    return Rates(device.bandwidth_gbs * SUSTAINED_BANDWIDTH, device.gmacs * SUSTAINED_ARITHMETIC)


def on_machine(lines: dict, measured_on: Rates, target: Rates) -> dict:
    """{phase: {model: Line}} measured on a machine of rates `measured_on`, as they would be on one of `target`:
    the decode's fixed part scaled by bandwidth, the prefill's fixed part and every per-row part by arithmetic."""
    memory = measured_on.bandwidth_gbs / target.bandwidth_gbs
    arithmetic = measured_on.gmacs / target.gmacs
    return {phase: {model: Line(found.fixed_ms * (memory if phase == "decode" else arithmetic),
                                found.per_token_ms * arithmetic) for model, found in by_model.items()}
            for phase, by_model in lines.items()}


def on_device(entry: dict, device, contexts: list[int]) -> dict:
    """modelled()'s speeds at `contexts` on a catalog device, from a speed.by_runtime entry's lines and the build
    machine's probed rates ("machine"); empty where either is missing or the device gives no multiply-add rate."""
    target = device_rates(device)
    if target is None or not entry.get("lines") or not entry.get("machine"):
        return {}
    lines = {phase: {m: Line(**found) for m, found in by_model.items()} for phase, by_model in entry["lines"].items()}
    return speeds_at(on_machine(lines, Rates(**entry["machine"]), target), contexts)


def line(speeds: dict[float, float]) -> Line | None:
    """The least-squares line through {context: tokens/s} (time per token against context); None from fewer than
    two contexts. Noise can tilt two close points downwards: the time never falls with the context, so a negative
    slope is taken as flat."""
    if len(speeds) < 2:
        return None
    xs = list(speeds)
    ys = [1e3 / speeds[x] for x in xs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope <= 0:
        return Line(my, 0.0)
    return Line(my - slope * mx, slope)


def decode_context(prompt_tokens: int, decode_tokens: int) -> float:
    """The mean context of the decode steps measured after a prompt."""
    return prompt_tokens + decode_tokens / 2


def lines_of(by_prompt: dict, decode_tokens: int) -> dict:
    """{phase: {model: Line}} through speed.by_runtime's "by_prompt" ({prompt_tokens: {"decode": {model: tok/s},
    "prefill": {model: tok/s}}}); empty unless both models were measured at two prompt lengths or more."""
    lines: dict = {}
    for phase in ("decode", "prefill"):
        for model in ("mla", "original"):
            points = {(decode_context(int(p), decode_tokens) if phase == "decode" else int(p)): m[phase][model]
                      for p, m in by_prompt.items() if m[phase].get(model)}
            found = line(points)
            if found is None:
                return {}
            lines.setdefault(phase, {})[model] = found
    return lines


def modelled(by_prompt: dict, contexts: list[int], decode_tokens: int) -> dict:
    """{context: {"decode": {"mla", "original", "ratio"}, "prefill": {...}}} at each context, from lines_of."""
    return speeds_at(lines_of(by_prompt, decode_tokens), contexts)


def speeds_at(lines: dict, contexts: list[int]) -> dict:
    """modelled()'s speeds from lines already drawn ({phase: {model: Line}}; empty: none)."""
    out = {}
    for context in contexts if lines else ():
        entry = {}
        for phase in ("decode", "prefill"):
            speeds = {m: lines[phase][m].tokens_per_s(context) for m in ("mla", "original")}
            entry[phase] = {m: round(v, 1) for m, v in speeds.items()} | {
                "ratio": round(speeds["mla"] / speeds["original"], 3)}
        out[context] = entry
    return out
