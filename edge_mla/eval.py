"""Held-out perplexity and a quick generation check."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, desc: str = "perplexity") -> float:
    """exp(mean NLL) over non-overlapping windows [n, T]; every token after the first of a window is scored,
    with no BOS added (the protocol of the numbers in docs/)."""
    nll, count = 0.0, 0
    for window in tqdm(windows, desc=desc, unit="window", leave=False):
        window = window.to(model.device)
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, chat: bool = False) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
