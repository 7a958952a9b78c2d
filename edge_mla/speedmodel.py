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
"""
from __future__ import annotations

from dataclasses import dataclass

# benchmarks/speed_model.py, lines through 256 and 1024 tokens predicting 4096 (SmolLM2-135M, C + R = 224 + 32
# and 192 + 32 and their originals, 4-bit weights and cache, 2 threads, AMD EPYC, 2026-12-06;
# docs/results/speed_model.json): the largest error of a predicted decode or prefill speed at 4096 tokens.
CHECKED_ERROR = None


@dataclass(frozen=True)
class Line:
    """Milliseconds per token = fixed_ms + per_token_ms * context."""
    fixed_ms: float
    per_token_ms: float

    def tokens_per_s(self, context: float) -> float:
        return 1e3 / (self.fixed_ms + self.per_token_ms * context)


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
