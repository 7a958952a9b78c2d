"""Where MLA pays, by memory alone, for the popular edge models' shapes: the cache each keeps per token (original
and the default MLA width, both at q4_0), and per device the smallest context at which the MLA build saves 25% of
the memory or is the only one that fits (verdict.pays_from). From published configs only: no weights, so nothing
here says what the conversion costs in quality on these models (that needs their weights and a build).

    python benchmarks/edge_models.py --out docs/results/edge_models.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from edge_mla import budget as bud
from edge_mla.plans import CACHE_SHARE, ROW_BLOCK
from edge_mla.verdict import PAYS_SHARE, pays_from

# Published config.json values: hidden, layers, heads, KV heads, head_dim, MLP, vocabulary, tied, max context,
# rotary share (Phi-4-mini rotates 3/4 of each head).
MODELS = {
    "SmolLM2-135M": (576, 30, 9, 3, 64, 1536, 49152, True, 8192, 1.0),
    "SmolLM2-360M": (960, 32, 15, 5, 64, 2560, 49152, True, 8192, 1.0),
    "SmolLM2-1.7B": (2048, 24, 32, 32, 64, 8192, 49152, True, 8192, 1.0),
    "Qwen2.5-0.5B": (896, 24, 14, 2, 64, 4864, 151936, True, 32768, 1.0),
    "Qwen2.5-1.5B": (1536, 28, 12, 2, 128, 8960, 151936, True, 32768, 1.0),
    "Qwen3-0.6B": (1024, 28, 16, 8, 128, 3072, 151936, True, 40960, 1.0),
    "Qwen3-1.7B": (2048, 28, 16, 8, 128, 6144, 151936, True, 40960, 1.0),
    "Llama-3.2-1B": (2048, 16, 32, 8, 64, 8192, 128256, True, 131072, 1.0),
    "Llama-3.2-3B": (3072, 28, 24, 8, 128, 8192, 128256, True, 131072, 1.0),
    "Phi-4-mini": (3072, 32, 24, 8, 128, 8192, 200064, True, 131072, 0.75),
    "Gemma-3-1B": (1152, 26, 4, 1, 256, 6912, 262144, True, 32768, 1.0),
}
REFUSED = {"Gemma-3-1B": "the converter refuses Gemma 3 (docs/models.md); memory shown for its shape"}
DEVICES = ("rpi-zero-2w", "rpi5-4gb", "rpi5", "android-8gb", "laptop-16gb")
Q4_0_BITS, Q4_0_CACHE_BYTES = 4.5, 0.5625  # 18 bytes per 32 numbers
ROPE_PAIRS = 16  # the recovered plan's rope key: its 16 highest frequencies (R = 32)


def config_of(shape) -> SimpleNamespace:
    hidden, layers, heads, kv, head_dim, mlp, vocab, tied, max_pos, _ = shape
    return SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv, head_dim=head_dim, intermediate_size=mlp, vocab_size=vocab,
                           tie_word_embeddings=tied, max_position_embeddings=max_pos)


def mla_width(shape, share: float) -> tuple[int, int]:
    """(C, R) at `share` of the original's cache in whole blocks, with the recovered plan's rope key (the rule of
    convert.latent_for_share, which needs a transformers config)."""
    _, _, _, kv, head_dim, *_, rotary = shape
    rope = 2 * min(ROPE_PAIRS, int(head_dim * rotary) // 2)
    total = int(share * 2 * kv * head_dim) // ROW_BLOCK * ROW_BLOCK
    return total - rope, rope


def footprints(config, shape, share: float):
    latent, rope = mla_width(shape, share)
    original = bud.footprint_estimate(config, Q4_0_BITS, Q4_0_CACHE_BYTES, "llama.cpp")
    mla_config = SimpleNamespace(**vars(config), mla={"latent_dim": latent, "rope_dim": rope})
    return original, bud.footprint_estimate(mla_config, Q4_0_BITS, Q4_0_CACHE_BYTES, "llama.cpp", name="model.gguf")


SAVED_AT = (4096, 32768, 131072)  # contexts at which the saved share of memory is shown (up to each model's limit)
WIDTHS = {"build (2/3 of the cache)": CACHE_SHARE["recovered"], "GPU fine-tune (1/2)": CACHE_SHARE["finetuned"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    devices = bud.load_devices()
    rows = []
    for name, shape in MODELS.items():
        config = config_of(shape)
        latent, rope = mla_width(shape, CACHE_SHARE["recovered"])
        original, mla = footprints(config, shape, CACHE_SHARE["recovered"])
        row = {"model": name, "original_cache_numbers": 2 * shape[3] * shape[4], "mla_latent": latent,
               "mla_rope": rope, "original_kv_bytes_per_token": original.kv_bytes_per_token,
               "mla_kv_bytes_per_token": mla.kv_bytes_per_token, "weights_mb": round(original.weights_bytes / 1e6),
               "max_context": shape[8], "note": REFUSED.get(name, ""), "pays_from": {}, "saved_share": {}}
        for label, share in WIDTHS.items():
            o, m = footprints(config, shape, share)
            row["saved_share"][label] = {c: round(1 - m.memory_bytes(c) / o.memory_bytes(c), 3)
                                         for c in SAVED_AT if c <= shape[8]}
        for device in DEVICES:
            row["pays_from"][device] = pays_from(mla, original, devices[device])
        rows.append(row)
    head = ("| model | weights MB (q4_0) | cache numbers/token/layer: original -> MLA (C + R) | "
            + " | ".join(devices[d].name for d in DEVICES) + " |")
    lines = [head, "|" + "---|" * (3 + len(DEVICES))]
    for r in rows:
        cells = []
        for d in DEVICES:
            got = r["pays_from"][d]
            cells.append("never" if got["context"] is None else
                         f"{got['context']:,}" + (" (only MLA fits)" if "only" in got["reason"] else ""))
        lines.append(f"| {r['model']}{' *' if r['note'] else ''} | {r['weights_mb']:,} | "
                     f"{r['original_cache_numbers']} -> {r['mla_latent']} + {r['mla_rope']} | " + " | ".join(cells)
                     + " |")
    saved = ["| model | cache numbers/token/layer | " + " | ".join(
        f"{label}: saved at {c // 1024}K" for label in WIDTHS for c in SAVED_AT) + " |", "|" + "---|" * (2 + 6)]
    for r in rows:
        cells = [f"{100 * r['saved_share'][label][c]:.0f}%" if c in r["saved_share"][label] else "-"
                 for label in WIDTHS for c in SAVED_AT]
        saved.append(f"| {r['model']}{' *' if r['note'] else ''} | {r['original_cache_numbers']} | "
                     + " | ".join(cells) + " |")
    print("Share of the original's memory (weights + cache + runtime) the MLA build saves, q4_0 weights and cache, "
          "llama.cpp's memory model ('-': beyond the model's context)")
    print("\n".join(saved))
    print()
    print(f"Smallest context at which the build's MLA file (2/3 of the cache) saves {PAYS_SHARE:.0%} of the memory "
          "or is the only one that fits ('never': not up to the model's limit)")
    print("\n".join(lines))
    for r in rows:
        if r["note"]:
            print(f"* {r['model']}: {r['note']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/edge_models.py " + " ".join(sys.argv[1:]),
                                              "pays_share": PAYS_SHARE, "models": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
