"""Self-distillation text: what the original model itself writes, to fine-tune its converted copy on.

Text of one domain teaches that domain (docs/finetune.md); text the original model samples from its own
distribution teaches the model back. Three kinds of prompt, in equal shares: a chat turn in the model's own chat
template (a task from TASKS about a topic from TOPICS), a short snippet of the training corpus to continue, and
nothing at all (the document separator alone: the model writes whatever it writes). Continuations are sampled
(temperature 1, nucleus 0.95) in large left-padded batches on the GPU.
"""
from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from edge_mla.publish import staged_file

TASKS = (
    "Explain {} to a curious teenager.", "Write a short story that involves {}.", "What should everyone know about {}?",
    "Write three questions and answers about {}.", "Write a short poem about {}.", "Summarize the history of {}.",
    "What are the pros and cons of {}?", "Describe {} in simple words.", "Write a dialogue between two friends about {}.",
    "How would you teach {} to a child?", "Write an email to a colleague about {}.",
    "List common misconceptions about {}.", "Write a news report about {}.", "Give practical tips about {}.",
    "Write a persuasive paragraph about {}.", "What is the future of {}?",
)
TOPICS = (
    "the ocean", "volcanoes", "photosynthesis", "the stock market", "inflation", "football", "tennis", "chess",
    "the Roman Empire", "the printing press", "electricity", "black holes", "vaccines", "sleep", "coffee", "bread",
    "gardening", "climate change", "recycling", "elections", "the court system", "taxes", "city planning", "trains",
    "airplanes", "electric cars", "smartphones", "the internet", "Python programming", "databases", "encryption",
    "artificial intelligence", "robots", "music theory", "jazz", "painting", "photography", "film making",
    "learning a language", "grammar", "poetry", "mathematics", "prime numbers", "probability", "statistics",
    "chemistry", "DNA", "evolution", "the immune system", "nutrition", "running", "meditation", "friendship",
    "job interviews", "starting a business", "marketing", "farming", "weather forecasts", "earthquakes", "rivers",
    "deserts", "forests", "birds", "cats", "dogs", "insects", "the Moon", "Mars", "space travel", "the human brain",
    "memory", "happiness", "money", "banks", "insurance", "hospitals", "schools", "universities", "libraries",
    "museums", "cooking pasta", "a birthday party", "a rainy day", "moving to a new city", "a lost wallet",
)


def chat_prompt(tokenizer, rng: random.Random) -> list[int]:
    message = rng.choice(TASKS).format(rng.choice(TOPICS))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    return tokenizer(message + "\n", add_special_tokens=False).input_ids


def snippet_prompt(tokenizer, corpus: list[str], rng: random.Random) -> list[int]:
    """16 to 48 tokens from a random place of the corpus, from a word start."""
    text = rng.choices(corpus, weights=[len(t) for t in corpus])[0]
    start = rng.randrange(max(1, len(text) - 400))
    start = text.find(" ", start) + 1
    ids = tokenizer(text[start:start + 400], add_special_tokens=False).input_ids
    return ids[: rng.randint(16, 48)] or [tokenizer.eos_token_id]


def make_prompts(tokenizer, corpus: list[str], n: int, rng: random.Random) -> list[list[int]]:
    sep = tokenizer.eos_token_id  # the document separator of fine-tuning's packed rows (finetune.pack)
    kinds = [lambda: chat_prompt(tokenizer, rng), lambda: snippet_prompt(tokenizer, corpus, rng), lambda: [sep]]
    return [kinds[i % 3]() for i in range(n)]


@torch.no_grad()
def generate_texts(model, tokenizer, tokens: int, corpus: list[str], *, batch: int = 1024, new_tokens: int = 512,
                   top_p: float = 0.95, seed: int = 0) -> list[str]:
    """Sample continuations from `model` until `tokens` new tokens are written; each text is its prompt (the chat
    turn or snippet) and continuation up to the end-of-turn token (which pack() adds back as the separator),
    decoded with special tokens so that tokenizing it again gives the chat template's tokens back."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    batch = min(batch, 3 * -(-tokens // new_tokens))  # no larger than the text asked for needs
    texts, made = [], 0
    while made < tokens:
        prompts = make_prompts(tokenizer, corpus, batch, rng)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=top_p,
                                 top_k=0, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
        for prompt, seq in zip(prompts, out[:, width:].tolist()):
            end = seq.index(eos) if eos in seq else len(seq)
            made += min(end + 1, len(seq))
            body = [] if prompt == [eos] else prompt
            # the end-of-turn token is left off: pack() puts that very token between texts
            texts.append(tokenizer.decode(body + seq[:end], skip_special_tokens=False))
        print(f"\rself-distillation text: {made:,} / {tokens:,} tokens", end="", flush=True)
    print()
    return texts


def write_jsonl(path: str | Path, texts: list[str]) -> Path:
    """One {"text": ...} per line, as `--data` reads it; written whole or not at all."""
    with staged_file(path) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return Path(path)
