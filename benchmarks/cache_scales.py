"""What each way of scaling a 4-bit MLA cache costs, emulated in PyTorch on a converted model (float weights).

    edge-mla build --device rpi5 --bits 4                      # or any `edge-mla convert` folder
    python benchmarks/cache_scales.py build-smollm2-135m-rpi5/mla --json cache_scales.json

Every MLA layer's cached row [c | k_rope] passes through the round trip of each scheme, then held-out perplexity is
measured on Wikipedia and ABC news (edge_mla.quality's windows, 4 x 512 tokens each, as the build scores its files).
The static per-channel scales are fitted as the ONNX exporter fits them (onnx_quant.channel_scales on the rows the
layer caches over the calibration windows). Schemes:

- float: no quantization;
- static: onnxruntime's static per-channel int4 (GroupQueryAttention's, the gqa body's);
- row: the matmul body's `--kv-scales row` (onnx_quant.group_fake_quantize: channels evened out by the static
  scales, one float16 scale per row by q4_0's rule, y[argmax |y|] / -8);
- row-absmax: one scale per row, s = max |y| / 7 (the code -8 unused);
- row-unscaled-channels: the row rule without the static scales;
- q4_0: the matmul body's `--kv-scales q4_0`: q4_0 blocks of 32 over the ONNX row (rope key in NEOX order);
- q4_0-llama.cpp: llama.cpp's cache (its rope key interleaved), what the CPU recovery trains through; the same
  blocks as q4_0 when R = 32.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

SCHEMES = ("float", "static", "row", "row-absmax", "row-unscaled-channels", "q4_0", "q4_0-llama.cpp")


def fitted_scales(model, layers, tokenizer, windows: int, length: int) -> list[np.ndarray]:
    """Each layer's static per-channel int4 scales, fitted on what it caches over the calibration windows."""
    from edge_mla.data import calibration_windows
    from edge_mla.export import onnx_quant

    width = layers[0].latent_dim + layers[0].rope_dim
    rows = [[] for _ in layers]
    for i, attn in enumerate(layers):
        attn.cache_quant = (lambda i: lambda e: (rows[i].append(e.reshape(-1, width).clone()), e)[1])(i)
    with torch.no_grad():
        for window in calibration_windows(tokenizer, count=windows, length=length):
            model(window[None], use_cache=False)
    groups = onnx_quant.pair_groups(width, layers[0].latent_dim, layers[0].rope_dim)
    return [onnx_quant.channel_scales(torch.cat(r).numpy(), 4, groups) for r in rows]


def round_trip(scheme: str, channel: np.ndarray, latent_dim: int):
    from edge_mla import q4_0
    from edge_mla.export import onnx_quant

    width = len(channel)
    numpy = {
        "static": lambda x: onnx_quant.fake_quantize(x, channel, 4),
        "row": lambda x: onnx_quant.group_fake_quantize(x, width, channel),
        "row-absmax": lambda x: _row_absmax(x, channel),
        "row-unscaled-channels": lambda x: onnx_quant.group_fake_quantize(x, width),
        "q4_0": lambda x: onnx_quant.group_fake_quantize(x, 32),  # the ONNX row (NEOX rope) in blocks of 32
    }
    if scheme == "float":
        return None
    if scheme == "q4_0-llama.cpp":
        return q4_0.mla_cache(latent_dim)
    return lambda entry: torch.from_numpy(numpy[scheme](entry.numpy()).astype(np.float32))


def _row_absmax(x: np.ndarray, channel: np.ndarray) -> np.ndarray:
    y = x / channel
    s = np.abs(y).max(-1, keepdims=True) / 7
    s = np.where(s == 0, 1, s)
    return np.clip(np.rint(y / s), -8, 7) * s * channel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mla", help="converted MLA folder (a build's mla/)")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=8, help="as `edge-mla export onnx` (8 x 512)")
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from edge_mla.mla_folder import load
    from edge_mla.eval import perplexity
    from edge_mla.mla import mla_layers
    from edge_mla.quality import text_windows
    from edge_mla.texts import BATTERY

    model, tokenizer = load(args.mla)
    layers = mla_layers(model)
    channel = fitted_scales(model, layers, tokenizer, args.calib_windows, args.calib_length)
    texts = {text: torch.from_numpy(text_windows(tokenizer, text, args.windows, args.length)) for text in BATTERY}
    rows = []
    for scheme in args.schemes:
        for i, attn in enumerate(layers):
            attn.cache_quant = round_trip(scheme, channel[i], attn.latent_dim)
        t0 = time.perf_counter()
        with torch.no_grad():
            row = {"scheme": scheme, **{text: round(perplexity(model, w), 3) for text, w in texts.items()}}
        rows.append(row)
        print(f"{scheme:24s} " + " ".join(f"{row[t]:8.3f}" for t in texts) + f"  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    base = rows[0] if rows[0]["scheme"] == "float" else None
    print("\n| scheme | " + " | ".join(texts) + " |\n|---|" + "---|" * len(texts))
    for row in rows:
        cells = [f"{row[t]:.2f}" + (f" ({row[t] / base[t] - 1:+.1%})" if base else "") for t in texts]
        print(f"| {row['scheme']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mla": args.mla, "windows": args.windows, "length": args.length,
                       "calibration": [args.calib_windows, args.calib_length], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
