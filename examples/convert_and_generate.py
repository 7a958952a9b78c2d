"""Convert the built-in SmolLM2-135M to MLA from Python, then generate with the latent cache (absorbed form).

    python examples/convert_and_generate.py
"""
from edge_mla.calibration import collect_stats
from edge_mla.convert import Plan, convert, describe
from edge_mla.data import split_text, token_windows
from edge_mla.eval import generate_text
from edge_mla.mla import cache_bytes, forward_with_cache, set_absorbed
from edge_mla.source import load_source

src = load_source("smollm2-135m")
stats = collect_stats(src.model, token_windows(src.tokenizer, split_text("calibration"), 1024, 8))
mla = convert(src.model, Plan(selection="shared", latent=256), stats)
print(describe(mla, src.model.config))

set_absorbed(src.model, True)  # decode form: attention runs over the cached latent directly
print(generate_text(src.model, src.tokenizer, "What is the capital of France?", 24, chat=True))

ids = src.tokenizer("Edge devices have little memory, so", return_tensors="pt").input_ids
_, cache = forward_with_cache(src.model, ids)
print(f"cache: {cache_bytes(cache) / ids.shape[1]:.0f} bytes per token (fp32)")
