"""CPU recovery of a converted model, and the 4-bit cache it must survive.

- Layer-wise teacher-forced distillation: the original model runs once over calibration text and its attention
  inputs and outputs are kept; then each MLA attention block is trained alone (Adam) to reproduce the original
  block's output from the original block's input. No backward pass through the model, no logits: cheap enough for
  a CPU build.
- Which cache the build's file will run with (shipped_cache_quant: llama.cpp's q4_0 over the cached row as llama.cpp
  lays it out, q4_0.py), emulated inside MLAAttention (its `cache_quant` hook), straight-through during recovery;
  and the original model's quantized K/V cache for the same-bits reference (original_cache_quant).
- Before training, the latent's exact transforms (latent.py): a Hadamard within each 32-block and a learned latent
  norm. Per-pair scales of the rope key (exact too: a scale commutes with each pair's rotation) that even out its
  pairs' magnitudes were measured to hurt, so they are not here (docs/recovery.md).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

from edge_mla import q4_0
from edge_mla.latent import block_hadamard, install_latent_norm, rotate_latent
from edge_mla.mla import MLAAttention, latent_row_scale, mla_layers

# ----------------------------------------------------------------------------- q4_0 cache emulation

def shipped_cache_quant(attn: MLAAttention, cache_bits: int):
    """The round trip of the cache llama.cpp runs the build's GGUF with, for MLA block `attn`, or None: a float or
    8-bit cache (8-bit costs nothing measurable, docs/recovery.md), or a row whose latent or rope key does not fill
    whole q4_0 blocks (the GGUF zero-pads those; not emulated)."""
    if cache_bits != 4 or attn.latent_dim % q4_0.BLOCK or attn.rope_dim % q4_0.BLOCK:
        return None
    return q4_0.mla_cache(attn.latent_dim)


@contextlib.contextmanager
def original_cache_quant(model, key_fn=q4_0.rope_roundtrip, value_fn=q4_0.roundtrip):
    """The original (non-MLA) model with its K (after RoPE, per head) and V passed through key_fn / value_fn, as a
    quantized K/V cache does: the same-bits reference (llama.cpp caches K with interleaved rope pairs, hence
    q4_0.rope_roundtrip). transformers Llama-style models only."""
    import importlib

    module = importlib.import_module(type(model.model).__module__)
    rotary = module.apply_rotary_pos_emb

    def quantized_rotary(q, k, *args, **kwargs):
        q, k = rotary(q, k, *args, **kwargs)
        return q, key_fn(k)

    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, a, out: value_fn(out))
             for layer in model.model.layers]
    module.apply_rotary_pos_emb = quantized_rotary
    try:
        yield model
    finally:
        module.apply_rotary_pos_emb = rotary
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- layer-wise distillation

@torch.no_grad()
def collect_attention_io(model, windows: torch.Tensor, desc: str = "teacher pass") -> tuple[list, list]:
    """One pass of the original model over windows [n, T]: per layer, its attention inputs (after the input norm)
    and outputs, each [n, T, E] float32 on the CPU."""
    layers = model.model.layers
    ins = [[] for _ in layers]
    outs = [[] for _ in layers]

    def make_hook(i):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            ins[i].append(x.detach().float().cpu())
            outs[i].append(output[0].detach().float().cpu())
        return hook

    handles = [layer.self_attn.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for i, window in enumerate(windows):
            model(window[None].to(model.device), use_cache=False)
            print(f"\r{desc}: {i + 1}/{len(windows)} windows", end="", flush=True)
        print()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(t) for t in ins], [torch.cat(t) for t in outs]


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return (F.mse_loss(pred, target) / target.pow(2).mean()).item()


# The projections the runtimes store at 4 bits under --bits 4 (blocks of 32 along the input dimension, in llama.cpp's
# q4_0 and onnxruntime's MatMulNBits alike). kv_a joins them once the latent norm is learned (no eps-dominance
# scaling to keep), and the up-projections when the recovery trains through them (`up_projections`).
FOUR_BIT_WEIGHTS = ("q_proj.weight", "o_proj.weight")


def q4_0_weights(attn: MLAAttention, up_projections: bool = False) -> dict:
    """Straight-through q4_0 round trips of the block's 4-bit weights, blocked as llama.cpp stores them, for
    torch.func.functional_call: projections along their input rows; k_up [G, N, C] as attn_k_b rows of N; v_up
    [G, d, C] as attn_v_b rows of C."""
    ste = q4_0.straight_through(q4_0.roundtrip)
    out = {name: ste(p) for name, p in attn.named_parameters()
           if name in FOUR_BIT_WEIGHTS and p.shape[-1] % q4_0.BLOCK == 0}  # other rows stay 16-bit in the GGUF
    w = attn.kv_a_proj.weight
    if attn.latent_norm is not None and w.shape[-1] % q4_0.BLOCK == 0:
        # the GGUF stores the latent rows times latent_row_scale (tiny: its q4_0 scales may be fp16 subnormals)
        s = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
        s[:attn.latent_dim] = latent_row_scale(attn)
        out["kv_a_proj.weight"] = ste(w * s) / s
    if up_projections:
        if attn.nope_dim % q4_0.BLOCK == 0:
            out["k_up"] = ste(attn.k_up.transpose(1, 2)).transpose(1, 2)
        if attn.latent_dim % q4_0.BLOCK == 0:
            out["v_up"] = ste(attn.v_up)
    return out


# Windows the before/after error is measured on: what the report shows, not what the training uses, so a sample
# (the build's teacher windows are spread over the whole text) keeps it cheap.
EVAL_WINDOWS = 16


CONTENTION_MIN_SECONDS = 5.0  # shorter recoveries (tiny models) are not worth a warning


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        fields = open("/proc/stat").readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX512-BF16 or AMX): there bf16 autocast makes the
    recovery 1.25x faster on 2 threads, 1.4x on one (docs/recovery.md); elsewhere it would be emulated, and slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def train_attention(attn: MLAAttention, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float,
                    batch: int = 1, params: str = "all", seed: int = 0, weight_bits: int = 16,
                    up_projections: bool = False, bf16: bool = False) -> dict:
    """Adam on one MLA block so that attn(x) matches the original block's output y (x, y: [n, T, E]), with a cosine
    learning rate. Keeps float32 weights whatever the model's dtype; bf16: the forward under bfloat16 autocast
    (native_bf16). The block's cache_quant (e.g. a straight_through quantizer) is used as set. Returns relative MSE
    (over the first EVAL_WINDOWS windows, in float32) before and after, and seconds."""
    t0 = time.perf_counter()
    dtype = attn.o_proj.weight.dtype
    attn.float()
    chosen = [p for name, p in attn.named_parameters() if params == "all" or name.split(".")[0] in params.split(",")]
    flags = [p.requires_grad for p in attn.parameters()]
    for p in attn.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    def shipped():  # the weights the runtimes will hold: 4-bit ones where they will be 4-bit
        return q4_0_weights(attn, up_projections) if weight_bits == 4 else None

    before = evaluate_attention(attn, x[:EVAL_WINDOWS], y[:EVAL_WINDOWS], shipped())
    start = {k: v.detach().clone() for k, v in attn.state_dict().items()}
    opt = torch.optim.Adam(chosen, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    scale = y.pow(2).mean()  # normalized loss: the same learning rate suits every layer
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)
    t_train = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        with autocast, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mismatch dtype")  # the latent norm's fp32 weight on bf16 input
            if weight_bits == 4:  # train through the 4-bit weights the runtimes will hold
                out = torch.func.functional_call(attn, q4_0_weights(attn, up_projections), (x[idx],))[0]
            else:
                out = attn(x[idx])[0]
        loss = F.mse_loss(out.float(), y[idx]) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    t_train = time.perf_counter() - t_train
    for p, flag in zip(attn.parameters(), flags):
        p.requires_grad_(flag)
    after = evaluate_attention(attn, x[:EVAL_WINDOWS], y[:EVAL_WINDOWS], shipped())
    kept = after > before  # training made the shipped block worse (too few steps, a step too large): undo it
    if kept:
        attn.load_state_dict(start)
        after = before
    attn.to(dtype)
    return {"mse_before": before, "mse_after": after, "seconds": time.perf_counter() - t0, "train_seconds": t_train,
            "kept_conversion": kept}


@torch.no_grad()
def evaluate_attention(attn: MLAAttention, x: torch.Tensor, y: torch.Tensor, weights: dict | None = None) -> float:
    """Relative squared error of the block's output against y, with `weights` (a functional_call mapping, e.g. the
    4-bit weights) in place of its own where given."""
    def run(inputs):
        return (torch.func.functional_call(attn, weights, (inputs,)) if weights else attn(inputs))[0]
    err = sum(F.mse_loss(run(x[i:i + 1]), y[i:i + 1], reduction="sum").item() for i in range(x.shape[0]))
    return err / y.pow(2).sum().item()


def recover_layerwise(original, mla_model, windows: torch.Tensor | None, steps: int = 300, lr: float = 1e-4,
                      batch: int = 1, params: str = "all", cache_quant=None, io: tuple | None = None,
                      weight_bits: int = 16, up_projections: bool = False) -> list[dict]:
    """Layer-wise teacher-forced distillation of every MLA attention block of `mla_model` towards the same layer of
    `original`, on calibration token windows [n, T]. With cache_quant (e.g. q4_0.straight_through(q4_0.mla_cache(C)))
    the blocks train through that cache quantizer, so they learn a row that survives it. `io` (from
    collect_attention_io, taken before an in-place conversion) replaces `original` and `windows` (and is consumed, layer
    by layer): no second copy of the model is needed. Returns one stats dict per layer."""
    ins, outs = io if io is not None else collect_attention_io(original, windows)
    layers = mla_layers(mla_model)
    stats = []
    t0 = time.perf_counter()
    for i, attn in enumerate(layers):
        saved = attn.cache_quant
        attn.cache_quant = cache_quant
        s = train_attention(attn, ins[i], outs[i], steps, lr, batch, params, seed=i, weight_bits=weight_bits,
                            up_projections=up_projections)
        attn.cache_quant = saved
        ins[i] = outs[i] = None  # free as we go
        stats.append({"layer": i, **s})
        print(f"recovering layer {i + 1}/{len(layers)}: relative MSE {s['mse_before']:.4f} -> {s['mse_after']:.4f} "
              f"({s['seconds']:.1f}s, {time.perf_counter() - t0:.0f}s total)", flush=True)
    return stats


def recover_converted(model, io: tuple, *, steps: int = 300, lr: float = 1e-4, cache_bits: int = 16,
                      weight_bits: int = 16, latent_norm: bool = False, up_projections: bool = False,
                      bf16: bool | None = None, corrects_drift: bool = False) -> dict:
    """What the build runs after converting in place, on every layer (LayerRecovery): the latent turned by a
    Hadamard within each 32-block (exact; a 4-bit cache then loses less, docs/recovery.md), then the block trained
    towards the original's outputs `io` (collect_attention_io, taken before the conversion; consumed layer by
    layer), through llama.cpp's q4_0 cache when cache_bits is 4 and through the 4-bit weights when weight_bits is 4
    (the up-projections too with up_projections: recorded in config.mla, so the exporters store them at 4 bits).
    latent_norm: a learned latent RMSNorm, which llama.cpp's deepseek2 has; GGUF kv_a is then 4-bit too. Returns a
    summary for report.json."""
    if corrects_drift:
        raise ValueError("recover_converted trains on inputs gathered before the conversion: it cannot follow the "
                         "converted model's stream; use LayerRecovery(corrects_drift=True) in the conversion")
    recovery = LayerRecovery(steps=steps, lr=lr, cache_bits=cache_bits, weight_bits=weight_bits,
                             latent_norm=latent_norm, up_projections=up_projections, bf16=bf16)
    ins, outs = io
    for i, attn in enumerate(mla_layers(model)):
        recovery(i, attn, ins[i], outs[i])
        ins[i] = outs[i] = None  # free as we go
    return recovery.summary(model.config.mla)


class LayerRecovery:
    """recover_converted, one layer at a time: what the layer-by-layer build (convert.convert's `converted`
    callback) runs on each block as soon as it is converted, with that layer's teacher inputs and outputs. The
    blocks train independently (and a latent norm's eps depends on its own layer only), so the result is the same
    as recover_converted's (tests/test_layerwise.py). summary(mla) records in the MLA section what the exporters
    need (latent_norm_eps, four_bit_up_projections): call it before the config is written."""

    def __init__(self, *, steps: int = 300, lr: float = 1e-4, cache_bits: int = 16, weight_bits: int = 16,
                 latent_norm: bool = False, up_projections: bool = False, bf16: bool | None = None,
                 budget=None, corrects_drift: bool = False):
        self.steps, self.lr, self.cache_bits, self.weight_bits = steps, lr, cache_bits, weight_bits
        self.budget = budget  # None: `steps` on every layer; else as many as the time left buys, at most `steps`
        # convert() reads this: train each block on the converted model's own inputs towards the original's stream
        self.corrects_drift = corrects_drift
        self.bf16 = native_bf16() if bf16 is None else bf16
        self.latent_norm, self.up_projections = latent_norm, up_projections and weight_bits == 4
        self.stats, self.eps, self.four_bit, self.tokens, self.aligned, self.quant = [], [], [], 0, False, None
        self.contended = False

    def __call__(self, i: int, attn: MLAAttention, ins: torch.Tensor, outs: torch.Tensor) -> None:
        C = attn.latent_dim
        self.aligned = C % q4_0.BLOCK == 0
        if self.aligned:
            rotate_latent(attn, block_hadamard(C))
        # the GGUF's norm would average over a padded latent; after the rotation, which a one-weight norm commutes with
        self.latent_norm = self.latent_norm and self.aligned
        if self.latent_norm:
            self.eps.append(install_latent_norm(attn, ins))
        self.quant = shipped_cache_quant(attn, self.cache_bits)
        saved, attn.cache_quant = attn.cache_quant, self.quant and q4_0.straight_through(self.quant)
        busy, cpu = machine_busy_seconds(), time.process_time()
        steps = self.steps
        with torch.enable_grad():  # called from inside the conversion's no_grad
            if self.budget is not None:
                steps = self.budget.steps_for(i, self.steps, lambda n: self._probe(attn, ins, outs, n))
            s = train_attention(attn, ins, outs, steps, self.lr, 1, "all", seed=i, weight_bits=self.weight_bits,
                                up_projections=self.up_projections, bf16=self.bf16)
        s["steps"] = steps
        if self.budget is not None:
            self.budget.spent(s, steps)
        if busy is not None:
            ours = time.process_time() - cpu
            self._check_cores(i, machine_busy_seconds() - busy - ours, s["seconds"])
        attn.cache_quant = saved
        self.four_bit = sorted(q4_0_weights(attn, self.up_projections)) if self.weight_bits == 4 else []
        self.tokens = int(ins.shape[0] * ins.shape[1])
        self.stats.append({"layer": i, **s})
        print(f"      recovering layer {i + 1}: relative MSE {s['mse_before']:.4f} -> {s['mse_after']:.4f} "
              f"({steps} steps, {s['seconds']:.1f}s"
              f"{'; training did not help, kept the conversion' if s.get('kept_conversion') else ''})", flush=True)

    def _probe(self, attn: MLAAttention, ins: torch.Tensor, outs: torch.Tensor, steps: int) -> float:
        """Seconds per training step of this block on this machine, timed on a throw-away copy."""
        import copy
        s = train_attention(copy.deepcopy(attn), ins[:1], outs[:1], steps, self.lr, 1, "all",
                            weight_bits=self.weight_bits, up_projections=self.up_projections, bf16=self.bf16)
        return s["train_seconds"] / steps

    def _check_cores(self, i: int, others_s: float, wall_s: float) -> None:
        """Say so, once, when other processes kept cores busy (others_s: their CPU seconds) while this layer trained
        on more threads than the cores left free: the recovery's many small multi-threaded ops then wait for a
        preempted thread at every step (measured: 2.7x slower with one busy core of two, up to 10x)."""
        threads, cores = torch.get_num_threads(), os.cpu_count() or 1
        others = others_s / max(wall_s, 1e-9)  # cores the other processes used, on average
        if self.contended or threads == 1 or wall_s < CONTENTION_MIN_SECONDS or threads + others < cores + 0.5:
            return
        self.contended = True
        free = max(1, round(cores - others))
        print(f"      warning: other processes kept {others:.1f} of this machine's {cores} cores busy while layer "
              f"{i + 1} trained on {threads} threads, which then wait for each other: the recovery runs several times "
              f"slower. Free the cores, or run the build with --threads {free}", flush=True)

    def summary(self, mla: dict) -> dict:
        if self.latent_norm:
            mla["latent_norm_eps"] = self.eps
        if self.up_projections:
            mla["four_bit_up_projections"] = True
        stats = self.stats
        steps = [s["steps"] for s in stats]
        return {"steps_per_layer": self.steps if not steps else steps[0] if min(steps) == max(steps) else
                f"{min(steps)}-{max(steps)} (mean {sum(steps) / len(steps):.0f})",
                "time_budget": self.budget and self.budget.describe(), "lr": self.lr, "teacher_tokens": self.tokens,
                "inputs": ("the converted model's own stream, towards the original's residual stream"
                           if self.corrects_drift else "the original's stream"),
                "compute": "bfloat16 autocast" if self.bf16 else "float32",
                "latent_rotation": "block Hadamard (32)" if self.aligned else None, "latent_norm": self.latent_norm,
                "trained_through": ("q4_0 cache" if self.quant else "float cache") + (
                    f", 4-bit {', '.join(self.four_bit)}" if self.four_bit else "") + " (straight-through)",
                "seconds": round(sum(s["seconds"] for s in stats), 1),
                "relative_mse_before": round(sum(s["mse_before"] for s in stats) / max(len(stats), 1), 5),
                "relative_mse_after": round(sum(s["mse_after"] for s in stats) / max(len(stats), 1), 5),
                "layers_kept_as_converted": [s["layer"] for s in stats if s.get("kept_conversion")]}
