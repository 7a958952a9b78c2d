"""Write a random-weight checkpoint with a real model's shape, laid out like a hub download, to test scale.

bf16 sharded safetensors + model.safetensors.index.json + config.json (the real model's configuration) + a tokenizer
that the pipeline accepts: the built-in SmolLM2's BPE tokenizer, its vocabulary padded with reserved tokens up to
the model's vocab_size (so embeddings, GGUF tokenizer and llama.cpp agree). The weights are noise: the checkpoint
measures memory and time, never quality. Never commit one (an 8B is 16 GB); write it under /tmp or ~/.cache.

    python benchmarks/make_checkpoint.py llama-3.1-8b /tmp/edge-mla-ckpt/llama-3.1-8b
    python benchmarks/make_checkpoint.py qwen2.5-7b /tmp/edge-mla-ckpt/qwen2.5-7b
    python benchmarks/make_checkpoint.py llama-3.2-1b /tmp/edge-mla-ckpt/llama-3.2-1b
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The published config.json of each model (values copied from the models' hub pages; licences of the real
# models do not apply: no weights are copied).
LLAMA_ROPE_31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3", "rope_theta": 500000.0}
SHAPES = {
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_parameters=LLAMA_ROPE_31, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.02),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_parameters={**LLAMA_ROPE_31, "factor": 32.0},
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu",
                         initializer_range=0.02),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
                       tie_word_embeddings=False, hidden_act="silu", sliding_window=None, use_sliding_window=False,
                       max_window_layers=28, initializer_range=0.02),
}
SHARD_BYTES = 2 << 30  # hub downloads use 4-5 GB shards; smaller ones keep this script's own memory small


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama/Qwen2 checkpoint, in the order the hub files list them."""
    E, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or E // H
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias")
    shapes = {"model.embed_tokens.weight": (V, E)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,),
                       p + "self_attn.q_proj.weight": (H * d, E), p + "self_attn.k_proj.weight": (n_kv * d, E),
                       p + "self_attn.v_proj.weight": (n_kv * d, E), p + "self_attn.o_proj.weight": (E, H * d),
                       p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E),
                       p + "mlp.down_proj.weight": (E, F)})
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (H * d,), p + "self_attn.k_proj.bias": (n_kv * d,),
                           p + "self_attn.v_proj.bias": (n_kv * d,)})
    shapes["model.norm.weight"] = (E,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, E)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], std: float, generator):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    t = torch.empty(shape, dtype=torch.bfloat16)
    return t.normal_(0, std, generator=generator)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """The built-in SmolLM2 tokenizer, its vocabulary padded with unreachable reserved tokens to vocab_size."""
    from edge_mla.source import DEFAULT_MODEL, _materialize_builtin

    folder = _materialize_builtin(DEFAULT_MODEL)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    for name in ("tokenizer_config.json",):
        (out / name).write_text((folder / name).read_text())


def make_checkpoint(shape: str, out: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    import torch
    from safetensors.torch import save_file

    from edge_mla.publish import refuse_existing, staged_folder

    # bos/eos: the ids of the tokenizer written beside the weights (SmolLM2's), not the real model's
    cfg = {**SHAPES[shape], "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    out = refuse_existing(out, False)
    g = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(cfg)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    t0 = time.perf_counter()
    with staged_folder(out) as staging:
        groups, current, size = [], [], 0
        for name, s in shapes.items():
            nbytes = 2 * torch.Size(s).numel()
            if current and size + nbytes > shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        groups.append(current)
        weight_map = {}
        for k, names in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: random_tensor(n, shapes[n], cfg["initializer_range"], g) for n in names},
                      staging / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in names})
            print(f"  {file}: {len(names)} tensors ({time.perf_counter() - t0:.0f} s)", flush=True)
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, indent=2))
        (staging / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(staging, cfg["vocab_size"])
    print(f"wrote {out}: {shape}, {total / 1e9:.2f}B parameters, bf16, {len(groups)} shards, "
          f"{time.perf_counter() - t0:.0f} s")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / (1 << 30))
    args = parser.parse_args(argv)
    make_checkpoint(args.shape, args.out, args.seed, int(args.shard_gb * (1 << 30)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
