"""report.json and a self-contained report.html (inline SVG plot of memory against context, no extra dependency)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from edge_mla.budget import MB, Budget, Device, Footprint
from edge_mla.speedmodel import DEVICE_ERROR, LINE_ERROR

COLORS = {("mla", "llama.cpp"): "#1f77b4", ("mla", "onnxruntime"): "#2ca02c",
          ("original", "llama.cpp"): "#ff7f0e", ("original", "onnxruntime"): "#d62728"}
FP16_COLOR = "#9467bd"


class _Chart:
    """An SVG chart of values against the context: white frame, grid and axis labels, a legend on the right."""
    PAD_L, PAD_R, PAD_T, PAD_B = 70, 330, 20, 45

    def __init__(self, width: int, height: int, max_context: int, top: float, y_label: str):
        self.width, self.height, self.max_context, self.top = width, height, max_context, top
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
        right, bottom = width - self.PAD_R, height - self.PAD_B
        for i in range(6):  # grid and axes labels
            v, c = top * i / 5, max_context * i / 5
            self.parts.append(f'<line x1="{self.PAD_L}" x2="{right}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" '
                              'stroke="#eee"/>')
            self.parts.append(f'<text x="{self.PAD_L - 6}" y="{self.y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
            self.parts.append(f'<text x="{self.x(c):.1f}" y="{bottom + 16}" text-anchor="middle">{c:.0f}</text>')
        self.parts.append(f'<text x="{(right + self.PAD_L) / 2}" y="{height - 8}" text-anchor="middle">context '
                          '(tokens)</text>')
        self.parts.append(f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
                          f'text-anchor="middle">{y_label}</text>')

    def x(self, context: float) -> float:
        return self.PAD_L + (self.width - self.PAD_L - self.PAD_R) * context / self.max_context

    def y(self, value: float) -> float:
        return self.height - self.PAD_B - (self.height - self.PAD_T - self.PAD_B) * value / self.top

    def curve(self, values, color: str, dashed: bool) -> None:
        """values: a function of the context, drawn at 65 points from 0 to max_context."""
        xs = [int(self.max_context * i / 64) for i in range(65)]
        points = " ".join(f"{self.x(c):.1f},{self.y(values(c)):.1f}" for c in xs)
        dash = ' stroke-dasharray="3 3"' if dashed else ""
        self.parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')

    def legend(self, entries: list[tuple[str, str, bool]]) -> None:
        for i, (label, color, dashed) in enumerate(entries):
            ly = self.PAD_T + 14 + 18 * i
            left = self.width - self.PAD_R
            dash = ' stroke-dasharray="4 3"' if dashed else ""
            self.parts.append(f'<line x1="{left + 10}" x2="{left + 34}" y1="{ly - 4}" y2="{ly - 4}" '
                              f'stroke="{color}" stroke-width="2"{dash}/>')
            self.parts.append(f'<text x="{left + 40}" y="{ly}">{html.escape(label)}</text>')

    def svg(self) -> str:
        return "\n".join(self.parts + ["</svg>"])


def memory_plot(footprints: list[Footprint], device: Device, max_context: int, width: int = 860,
                height: int = 360) -> str:
    highest = max(fp.memory_bytes(max_context) / MB for fp in footprints)
    # A device far above every curve would flatten them: then the budget is stated, not drawn.
    top = max(device.usable_mb * 1.15, highest * 1.05) if device.usable_mb < 3 * highest else highest * 1.25
    chart = _Chart(width, height, max_context, top, "memory (MB)")
    if device.usable_mb <= top:
        y = chart.y(device.usable_mb)
        chart.parts.append(f'<line x1="{chart.PAD_L}" x2="{width - chart.PAD_R}" y1="{y:.1f}" y2="{y:.1f}" '
                           'stroke="black" stroke-dasharray="6 4"/>')
        legend = [(f"{device.name}: {device.usable_mb:.0f} MB usable", "black", True)]
    else:
        legend = [(f"{device.name}: {device.usable_mb:.0f} MB usable (off the chart)", "white", False)]
    for fp in footprints:
        color = FP16_COLOR if "fp16" in fp.name else COLORS.get((fp.kind, fp.runtime), "#777")
        chart.curve(lambda c, fp=fp: fp.memory_bytes(c) / MB, color, fp.kind == "original")
        legend.append((f"{'MLA' if fp.kind == 'mla' else fp.name} ({fp.runtime})", color, fp.kind == "original"))
    chart.legend(legend)
    return chart.svg()


def speed_plot(runtimes: dict, max_context: int, width: int = 860, height: int = 300) -> str:
    """Decode tokens/s against context on the build machine, both models in each runtime: the lines of time per
    token through the measured prompts (speedmodel.py), the measured points as dots."""
    curves = {(m, r): e["lines"]["decode"][m] for r, e in runtimes.items() if e.get("lines") for m in ("mla", "original")}
    if not curves:
        return ""
    speed = lambda line, c: 1e3 / (line["fixed_ms"] + line["per_token_ms"] * c)  # noqa: E731
    chart = _Chart(width, height, max_context, 1.1 * max(speed(line, 0) for line in curves.values()),
                   "decode tokens/s")
    legend = []
    for (model, runtime), line in curves.items():
        color = COLORS.get((model, runtime), "#777")
        chart.curve(lambda c, line=line: speed(line, c), color, model == "original")
        for prompt, at in runtimes[runtime]["by_prompt"].items():
            context = int(prompt) + runtimes[runtime]["decode_tokens"] / 2
            if at["decode"].get(model) and context <= max_context:
                chart.parts.append(f'<circle cx="{chart.x(context):.1f}" cy="{chart.y(at["decode"][model]):.1f}" '
                                   f'r="3" fill="{color}"/>')
        legend.append((f"{'MLA' if model == 'mla' else 'original'} ({runtime})", color, model == "original"))
    chart.legend(legend)
    return chart.svg()


def quality_table(rows: list[dict]) -> str:
    """Perplexity per text (columns) for each model and runtime (rows), the MLA build's ratio to the original."""
    if not rows:
        return ""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    ppl = {(r["model"], r["runtime"], r["text"]): r for r in rows}
    lines = []
    for model, runtime in dict.fromkeys((r["model"], r["runtime"]) for r in rows):
        cells = []
        for text in texts:
            r = ppl.get((model, runtime, text))
            base = ppl.get(("original", runtime, text))
            ratio = f" ({r['perplexity'] / base['perplexity']:.2f}x)" if r and base and model == "mla" else ""
            if r and r.get("top1_agreement") is not None:
                ratio += f"<br><small>{100 * r['top1_agreement']:.0f}% same next token</small>"
            cells.append(f"<td>{r['perplexity']:.2f}{ratio}</td>" if r else "<td>-</td>")
        cache = next(r["cache"] for r in rows if (r["model"], r["runtime"]) == (model, runtime))
        lines.append(f"<tr><td>{'MLA' if model == 'mla' else html.escape(model)}</td><td>{runtime}</td><td>{cache}</td>"
                     + "".join(cells) + "</tr>")
    head = "".join(f"<th>{html.escape(t)}</th>" for t in texts)
    return (f"<h2>Quality: held-out perplexity through the runtimes (lower is better)</h2><table><tr><th>model</th>"
            f"<th>runtime</th><th>cache</th>{head}</tr>{''.join(lines)}</table><p>Both builds at the same bits, "
            f"scored on the same token windows of every kind of text (none of them fitted on); in brackets the MLA build's "
            f"perplexity over the original's, below it the share of positions where its most likely next token is "
            f"the original's.</p>")


CHOICE_LABELS = {"mla": "MLA", "original": "original", "neither": "neither fits",
                 "unmeasured": "MLA saves memory; quality not measured"}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _over(speeds: dict) -> float | None:
    return speeds["mla"] / speeds["original"] if speeds.get("mla") and speeds.get("original") else None


def verdict_section(summary: dict) -> str:
    """Which model to pick, per runtime and context; the measured speeds; the commands that run the files."""
    verdicts = summary.get("verdicts") or []
    if not verdicts:
        return ""
    def modelled(v: dict, phase: str) -> str:
        speeds = v.get(f"{phase}_tokens_per_s")
        if not speeds:
            ratio = v.get(f"{phase}_ratio")
            return _ratio(ratio) + (" (measured)" if ratio else "")
        where = {"device": "", "modelled": " (build machine)"}.get(v.get("decode_ratio_from"), "")
        return f"{speeds['mla']:.0f} / {speeds['original']:.0f} ({v[f'{phase}_ratio']:.2f}x){where}"

    lines = "".join(
        f"<tr><td>{v['runtime']}</td><td>{v['context']}</td><td>{v['mla_mb']:.0f}</td><td>{v['original_mb']:.0f}</td>"
        f"<td>{_ratio(v.get('perplexity_ratio'))}</td><td>{modelled(v, 'decode')}</td><td>{modelled(v, 'prefill')}</td>"
        f"<td><b>{CHOICE_LABELS[v['choice']]}</b></td></tr>" for v in verdicts)
    speed = "".join(
        f"<tr><td>{runtime}</td><td>{prompt}</td><td>{at['prefill'].get('mla', 0):.0f} / "
        f"{at['prefill'].get('original', 0):.0f} ({_ratio(_over(at['prefill']))})</td>"
        f"<td>{at['decode'].get('mla', 0):.1f} / {at['decode'].get('original', 0):.1f} "
        f"({_ratio(_over(at['decode']))})</td></tr>"
        for runtime, s in (summary.get("runtimes") or {}).items() for prompt, at in s.get("by_prompt", {}).items())
    if speed:
        first = next(iter(summary["runtimes"].values()))
        speed = (f"<h3>Speed measured on the build machine (prompt, then 32 tokens, {first['threads']} threads; "
                 f"MLA / original)</h3><table><tr><th>runtime</th><th>prompt tokens</th><th>prefill tok/s</th>"
                 f"<th>decode tok/s</th></tr>{speed}</table><p>Speeds at other contexts (the table above) follow "
                 "the line of time per token against the context through the two prompt lengths (edge_mla/"
                 "speedmodel.py; checked in docs/speed.md); measured points as dots. On the device each line is scaled "
                 "by its rates against the build machine's (" + machine_rates(summary["runtimes"]) + "): the "
                 "decode's weights by memory bandwidth, the rest by multiply-adds (docs/speed.md). Checked on the build "
                 f"machine: the lines predict a 4096-token prompt within {LINE_ERROR:.0%}, and moved between 2 "
                 f"threads and 1 by the probed rates within {DEVICE_ERROR:.0%}; no device was measured.</p>"
                 + speed_plot(summary["runtimes"], max(v["context"] for v in verdicts)))
    commands = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>"
                       for k, v in (summary.get("run_commands") or {}).items())
    texts = "".join(f"<li>{html.escape(v['text'])}</li>" for v in verdicts)
    t = summary.get("verdict_thresholds")
    rule = (f"<p>Where both fit, MLA is recommended only if it saves at least {100 * t['min_saved_share']:.0f}% of "
            f"the device's usable memory, loses at most {100 * t['max_quality_loss']:.0f}% perplexity on its worst "
            f"text and decodes at {t['min_speed']:.2f}x the original's speed or better (--verdict-min-saving, "
            f"--verdict-max-loss, --verdict-min-speed).</p>") if t else ""
    pays = "".join(f"<li>{p['runtime']}: " + html.escape(
        f"from {p['context']} tokens ({p['reason']}: {p['mla_mb']:.0f} MB against {p['original_mb']:.0f} MB)"
        if p["context"] else p["reason"]) + "</li>" for p in summary.get("mla_pays_from") or [])
    if pays:
        share = summary["mla_pays_from"][0]["share"]
        pays = (f"<p>Memory alone: where the MLA build saves {share:.0%} of the memory or is the only one that "
                f"fits</p><ul>{pays}</ul>")
    return (f"<h2>Which to use</h2><p><b>{html.escape(summary.get('recommendation', ''))}</b></p>{rule}{pays}"
            f"<table><tr><th>runtime</th><th>context</th><th>MLA MB</th><th>original MB</th><th>perplexity MLA / "
            f"original (worst text)</th><th>decode tok/s at this context on the device (MLA / original; predicted from "
            f"the speeds measured below)</th><th>prompt tok/s at this context on the device</th><th>choice</th>"
            f"</tr>{lines}</table><ul>{texts}</ul>"
            f"{speed}{settings_section(summary)}<h3>Run the files</h3><ul>{commands}</ul>")


def machine_rates(runtimes: dict) -> str:
    rates = next((s["machine"] for s in runtimes.values() if s.get("machine")), None)
    return (f"build machine {rates['bandwidth_gbs']:g} GB/s and {rates['gmacs']:g} GMAC/s measured at the build"
            if rates else "the build machine's rates were not measured")


def settings_section(summary: dict) -> str:
    """llama.cpp's settings tried on each GGUF (runsettings.py), timed on a long prompt and a reply; the chosen."""
    found = (summary.get("run_settings") or {}).get("llama.cpp")
    if not found:
        return ""
    chosen = {(c["model"], c["cache"], c["flash_attention"]) for c in found["chosen"].values()}
    rows = "".join(
        f"<tr><td>{s['model']}</td><td>{s['cache']}, flash attention {'on' if s['flash_attention'] else 'off'}</td>"
        f"<td>{s['prefill_tokens_per_s']:.0f}</td><td>{s['decode_tokens_per_s']:.1f}</td><td>{s['seconds']:.1f}</td>"
        f"<td>{s['memory_mb']:.0f}{'' if s['fits'] else ' (does not fit)'}</td>"
        f"<td>{'<b>chosen</b>' if (s['model'], s['cache'], s['flash_attention']) in chosen else ''}</td></tr>"
        for s in found["settings"])
    return (f"<h3>llama.cpp settings at {found['context']} tokens on the build machine "
            f"({html.escape(found['workload'])}; modelled from the measured prompts)</h3><table><tr><th>file</th><th>setting</th><th>prefill tok/s</th>"
            "<th>decode tok/s</th><th>seconds</th><th>MB on the device</th><th></th></tr>"
            f"{rows}</table><p>The fastest setting that fits is printed below; the verdict above compares both files "
            "at the same bits (the priced cache).</p>")


def write_reports(folder: Path, summary: dict, footprints: list[Footprint], budgets: list[Budget],
                  device: Device, max_context: int) -> None:
    (folder / "report.json").write_text(json.dumps(summary, indent=1))
    rows = "\n".join(
        f"<tr><td>{html.escape(b.model)}</td><td>{b.runtime}</td><td>{b.weights_mb:.0f}</td><td>{b.kv_mb:.1f}</td>"
        f"<td>{b.memory_mb:.0f}</td><td>{'yes' if b.fits else '<b>no</b>'}</td><td>{b.max_context}</td>"
        f"<td>{b.decode_tokens_per_s_bound:.0f}</td></tr>" for b in budgets)
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary["key_figures"].items())
    quality = quality_table(summary.get("quality") or []) + verdict_section(summary)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edge-mla build: {html.escape(device.name)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body><h1>{html.escape(summary['verdict'])}</h1>
<p>Model <b>{html.escape(summary['model'])}</b> converted to MLA for <b>{html.escape(device.name)}</b>
({html.escape(device.cpu)}; {device.usable_mb:.0f} of {device.ram_mb:.0f} MB usable; {device.bandwidth_gbs} GB/s{f', {device.gmacs:g} GMAC/s' if device.gmacs else ''} peak).</p>
<ul>{facts}</ul>
{memory_plot(footprints, device, max_context)}
<h2>At context {summary['context']}</h2>
<table><tr><th>model</th><th>runtime</th><th>weights MB</th><th>KV MB</th><th>total MB</th><th>fits</th>
<th>longest context</th><th>decode tok/s at most (bandwidth)</th></tr>{rows}</table>
{quality}
<p>Memory = runtime base + weight files + context x (KV per token + runtime work per token); the runtime terms
were measured (docs/budget.md). The bandwidth bound divides the device's peak bandwidth by the bytes read per token: no file decodes faster,
and MLA's extra attention arithmetic makes it slower than its bound says (the speeds predicted for the device are in
the table "Which to use").
Device figures and their sources: <code>edge-mla devices</code>.</p></body></html>"""
    (folder / "report.html").write_text(page)
