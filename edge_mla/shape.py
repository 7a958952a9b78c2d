"""A model's shape from its transformers config, derived in one place (no torch here: the budget and the CLI read
it without loading a model). Every module asks here, not the config's optional keys."""
from __future__ import annotations


def head_dim(config) -> int:
    """Numbers per attention head: the config's head_dim where it has one (Qwen3, Gemma-like configs decouple it
    from the hidden size), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_base(config) -> float:
    """RoPE's base (theta): transformers 5's rope_parameters, an older config's rope_theta, else 10,000."""
    params = getattr(config, "rope_parameters", None) or {}
    base = params.get("rope_theta") if isinstance(params, dict) else None
    return float(base or getattr(config, "rope_theta", None) or 10000.0)


def cache_width(config) -> int:
    """Numbers the original model caches per token and layer: K and V of every KV head."""
    return 2 * config.num_key_value_heads * head_dim(config)
