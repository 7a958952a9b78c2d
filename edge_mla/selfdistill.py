"""Self-distillation text: what the original model itself writes, to fine-tune its converted copy on.

Text of one domain teaches that domain (docs/finetune.md); text the original model samples from its own
distribution teaches the model back. Three kinds of prompt, in equal shares: a chat turn in the model's own chat
template (a task from TASKS about a topic from TOPICS), a short snippet of the training corpus to continue, and
nothing at all (the document separator alone: the model writes whatever it writes). Continuations are sampled
(temperature 1, nucleus 0.95) in large left-padded batches, on a GPU with a static KV cache and a CUDA-graphed
decode step (Sampler).
"""
from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

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


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering, transformers' TopPLogitsWarper's arithmetic (what generate(top_p=...) does): the tokens
    whose probability mass counted from the least likely stays within 1 - top_p are set to -inf; the most likely
    token always stays."""
    sorted_logits, order = torch.sort(logits, descending=False)
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))


GROUPED_DECODE = "edge_mla_grouped_decode"  # the attention Sampler switches its model to


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' SDPA attention, except that a one-token query attends to the key/value heads as they are: the
    query heads of a group become query rows of their key/value head ([b, h, 1, d] -> [b, kv, h / kv, d]; the padding
    mask [b, 1, 1, slots] broadcasts over both). transformers does this only outside torch.compile; compiled, it
    repeats every cached key and value for each query head, writing and reading the whole cache h / kv times more
    each decode step (SmolLM2-135M: 3x, 40 GB a step at 1024 rows)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    if q_len != 1 or groups == 1 or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(b, h // groups, groups, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def _register_grouped_decode() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)  # the same boolean padding mask as sdpa's


class Sampler:
    """Batched sampling with a static KV cache (transformers' StaticCache: allocated once, written in place) and,
    on a GPU, the decode step compiled into a CUDA graph (torch.compile's reduce-overhead mode): one graph replay per
    token for the whole batch, instead of generate()'s growing cache and per-step Python. Prompts are left-padded to
    a multiple of `width_step` tokens, so every batch of the same size reuses the same cache and graph. Greedy
    decoding gives generate()'s tokens; sampling is generate()'s arithmetic (temperature, top-p, multinomial).
    A model with SDPA attention is switched to grouped_decode_attention (the same attention, without the repeated
    keys and values): the caller's model is changed, so pass a copy if it is used elsewhere."""

    def __init__(self, model, batch: int, new_tokens: int, *, compile: bool | None = None, width_step: int = 64):
        self.model, self.batch, self.new_tokens, self.width_step = model, batch, new_tokens, width_step
        self.device = next(model.parameters()).device
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            _register_grouped_decode()
            model.config._attn_implementation = GROUPED_DECODE
        compile = self.device.type == "cuda" if compile is None else compile
        self.decode = torch.compile(self._decode, mode="reduce-overhead", dynamic=False) if compile else self._decode
        self.caches: dict[int, object] = {}  # one static cache per padded prompt width
        # transformers 5.24 calls the cache argument `cache` and drops `cache_position` (the cache counts)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.with_position = "cache_position" in params

    def _forward(self, tokens, mask, positions, cache, start):
        """The next-token logits (float32) of the last position; `start`: the cache slot of the first token."""
        extra = {self.cache_arg: cache}
        if self.with_position:
            extra["cache_position"] = start + torch.arange(tokens.shape[1], device=tokens.device)
        return self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **extra).logits[:, -1].float()

    def _decode(self, tokens, mask, positions, start, cache, temperature: float, top_p: float | None):
        """One token for the whole batch: the next-token probabilities (or, greedy, the logits), in float32."""
        logits = self._forward(tokens, mask, positions, cache, start)
        if top_p is None:
            return logits
        logits = logits / temperature if temperature != 1.0 else logits
        return top_p_filter(logits, top_p).softmax(-1)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], eos: int, pad: int, *, temperature: float = 1.0,
                 top_p: float | None = 0.95) -> torch.Tensor:
        """[batch, new_tokens] continuations (pad after each row's eos, as generate() writes them); top_p None:
        greedy."""
        from transformers import StaticCache

        if len(prompts) != self.batch:
            raise ValueError(f"this sampler takes batches of {self.batch} prompts, got {len(prompts)}")
        width = -(-max(len(p) for p in prompts) // self.width_step) * self.width_step
        total = width + self.new_tokens
        if width not in self.caches:
            self.caches[width] = StaticCache(config=self.model.config, max_cache_len=total)
        cache = self.caches[width]
        cache.reset()
        dev = self.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        # left padding masked everywhere; later slots are open (causality hides the ones not written yet)
        mask = torch.ones(self.batch, total, dtype=torch.long, device=dev)
        for row, p in enumerate(prompts):
            mask[row, : width - len(p)] = 0
        positions = mask[:, :width].cumsum(-1) - 1  # generate()'s positions under left padding
        positions.masked_fill_(mask[:, :width] == 0, 1)
        logits = self._forward(ids, mask, positions, cache, torch.zeros((), dtype=torch.long, device=dev))
        if top_p is not None:
            logits = top_p_filter(logits / temperature if temperature != 1.0 else logits, top_p).softmax(-1)
        next_pos = positions[:, -1:] + 1
        out = torch.full((self.batch, self.new_tokens), pad, dtype=torch.long, device=dev)
        done = torch.zeros(self.batch, dtype=torch.bool, device=dev)
        starts = torch.arange(width, total, device=dev)  # each step's cache slot, on the device: no copy per step
        for t in range(self.new_tokens):
            token = logits.argmax(-1) if top_p is None else torch.multinomial(logits, 1).squeeze(1)
            token = token.masked_fill(done, pad)
            out[:, t] = token
            done |= token == eos
            if t == self.new_tokens - 1 or (t % 32 == 31 and bool(done.all())):  # one wait for the GPU per 32
                break
            logits = self.decode(token[:, None], mask, next_pos + t, starts[t], cache, temperature, top_p)
        return out


@torch.no_grad()
def generate_texts(model, tokenizer, tokens: int, corpus: list[str], *, batch: int = 1024, new_tokens: int = 512,
                   top_p: float = 0.95, seed: int = 0, compile: bool | None = None) -> list[str]:
    """Sample continuations from `model` until `tokens` new tokens are written; each text is its prompt (the chat
    turn or snippet) and continuation up to the end-of-turn token (which pack() adds back as the separator),
    decoded with special tokens so that tokenizing it again gives the chat template's tokens back. On a GPU the
    model samples in bf16 (a copy), with Sampler's CUDA-graphed decode step."""
    import copy

    rng = random.Random(seed)
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    model = copy.deepcopy(model)  # the sampler changes its model's attention
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    batch = min(batch, 3 * -(-tokens // new_tokens))  # no larger than the text asked for needs
    sampler = Sampler(model, batch, new_tokens, compile=compile)
    texts, made = [], 0
    while made < tokens:
        prompts = make_prompts(tokenizer, corpus, batch, rng)
        out = sampler(prompts, eos, pad, top_p=top_p)
        for prompt, seq in zip(prompts, out.tolist()):
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
