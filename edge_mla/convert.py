"""MHA2MLA: turn a loaded RoPE decoder into an MLA model (partial RoPE, then a low-rank latent); mla_folder.py
writes and reads it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from edge_mla import families, lowrank, rope, shape
from edge_mla.calibration import LayerStats
from edge_mla.mla import MLAAttention
from edge_mla.mla_folder import save
# Plan is re-exported: convert.Plan is what callers import with convert()
from edge_mla.plans import CACHE_SHARE, CALIBRATION_DEFAULTS, MAX_CACHE_SHARE, PLANS, ROW_BLOCK, Plan  # noqa: F401
from edge_mla.publish import refuse_existing, staged_folder
from edge_mla.source import SourceError, check_architecture


def resolve_plan(config, plan: Plan) -> Plan:
    """Fill defaults and check every number against the model, before any work is done."""
    check_architecture(config)
    d, n_kv, E = shape.head_dim(config), config.num_key_value_heads, config.hidden_size
    rotary = families.rotary_pairs(config)  # partial rotary: only these pairs can keep RoPE
    r = plan.rope_pairs if plan.rope_pairs is not None else min(rope.default_rope_pairs(plan.selection, d), rotary)
    rope.check_rope_pairs(plan.selection, r, 2 * rotary, n_kv)
    if plan.selection == "shared":
        if not 1 <= plan.rope_components <= n_kv:
            raise ValueError(f"rope components must be between 1 and the number of KV heads ({n_kv})")
        nope = d
    else:
        nope = d - 2 * r
    if plan.weighting not in lowrank.WEIGHTINGS:
        raise ValueError(f"unknown weighting '{plan.weighting}': choose one of {', '.join(lowrank.WEIGHTINGS)}")
    rows_k, rows_v = n_kv * nope, n_kv * d
    if plan.selection == "shared" and all(families.rope_layers(config)):
        rows_k -= 2 * r * plan.rope_components  # the rope components are taken out of the keys: that much less rank
    top = lowrank.full_rank(rows_k, rows_v, E, plan.svd) if plan.svd in lowrank.METHODS else 0
    latent = plan.latent if plan.latent is not None else top
    lowrank.check_latent(latent, rows_k, rows_v, E, plan.svd)
    return Plan(plan.selection, r, latent, plan.svd, plan.weighting, plan.rope_components)


def rope_key_width(config, plan: Plan) -> int:
    """R: the rope key's numbers per token per layer (the plan's rope pairs filled, resolve_plan)."""
    r = resolve_plan(config, replace(plan, latent=None)).rope_pairs  # its default where the plan gives none
    return 2 * r * (plan.rope_components if plan.selection == "shared" else config.num_key_value_heads)


def latent_for_share(config, plan: Plan, share: float) -> int:
    """C such that C + R is `share` of the original's cache, C + R rounded down to whole q4_0/q8_0 blocks where
    the cache is that wide, at least one block of latent, and at most the model's full rank."""
    total, rope_width = share * shape.cache_width(config), rope_key_width(config, plan)
    block = ROW_BLOCK if total >= 2 * ROW_BLOCK else 2
    latent = max(int(total // block) * block - rope_width, block)
    return min(latent, resolve_plan(config, replace(plan, latent=None)).latent)


def named_plan(name: str, config, plan: Plan | None = None) -> Plan:
    """One of plans.PLANS (or `plan`, the user's variant of it) fitted to this model: a rope key no wider than its
    heads, and where no latent width is given, the named plan's share of its cache (plans.CACHE_SHARE)."""
    plan = plan or PLANS[name]
    if plan.rope_pairs is not None:  # a model with narrower heads keeps all its frequencies
        plan = replace(plan, rope_pairs=min(plan.rope_pairs, families.rotary_pairs(config)))
    if plan.latent is None:
        plan = replace(plan, latent=latent_for_share(config, plan, CACHE_SHARE[name]))
    return plan


def check_saving(config, plan: Plan, expected_cost: str | None = None) -> None:
    """Refuse, before any work, a plan whose cache keeps more than plans.MAX_CACHE_SHARE of the original's: the
    conversion would cost quality and time and save (almost) nothing. Says which width would save memory."""
    original, rope_width = shape.cache_width(config), rope_key_width(config, plan)
    latent = resolve_plan(config, plan).latent  # the plan's own errors (a width past full rank) come first
    kept = (latent + rope_width) / original
    if kept <= MAX_CACHE_SHARE:
        return
    half = latent_for_share(config, plan, 0.5)
    cost = f"; expected cost: {expected_cost}" if expected_cost else ""
    fix = (f"--latent {half} (C + R = {half + rope_width}, {1 - (half + rope_width) / original:.0%} of the cache "
           f"saved{cost})" if half + rope_width < original * MAX_CACHE_SHARE else
           "a narrower rope key (--rope-pairs) and latent, or keep the original model: its cache is already small")
    raise ValueError(f"latent {latent} + rope key {rope_width} = {latent + rope_width} numbers per token per layer "
                     f"keeps {kept:.0%} of the original's {original}: it saves less than "
                     f"{1 - MAX_CACHE_SHARE:.0%} of the cache and would only cost quality. Use {fix}")


def latent_from_rank(config, rank_per_kv_head: int) -> int:
    """MHA2MLA gives the latent per KV head (d_kv); the total is d_kv * n_kv."""
    if rank_per_kv_head <= 0:
        raise ValueError(f"rank per KV head must be positive, got {rank_per_kv_head}")
    return rank_per_kv_head * config.num_key_value_heads


def needs_calibration(plan: Plan) -> bool:
    return plan.weighting != "weights" or plan.selection in ("2norm", "partition-2norm", "shared")


def layer_maps(plan: Plan, attn, stats: LayerStats | None, config, uses_rope: bool = True) -> rope.RopeMaps:
    d, n_kv = shape.head_dim(config), config.num_key_value_heads
    heads_per_group = config.num_attention_heads // n_kv
    rotary = families.rotary_pairs(config)
    if plan.selection == "shared" and not uses_rope:  # a NoPE layer: zero rope rows, every dim in the latent
        like = rope.shared_head_maps(torch.eye(n_kv, dtype=torch.float64).expand(d // 2, n_kv, n_kv), plan.rope_pairs,
                                     d, plan.rope_components)
        return rope.position_free_maps(like, d)
    if plan.selection == "shared":
        b_k = attn.k_proj.bias.detach() if attn.k_proj.bias is not None else None
        cov = rope.key_pair_covariance(attn.k_proj.weight.detach(), b_k, stats.second_moment, stats.mean, n_kv, d)
        return rope.shared_head_maps(rope.shared_head_rotations(cov), plan.rope_pairs, d, plan.rope_components)
    scores = stats.pair_scores(heads_per_group)[:, :rotary] if stats is not None else None
    kept = rope.kept_pairs(plan.selection, plan.rope_pairs, n_kv, rotary, scores)
    return rope.per_head_maps(kept, d)


@torch.no_grad()
def convert_layer(attn, maps: rope.RopeMaps, plan: Plan, stats: LayerStats | None, config, mla: dict,
                  inv_freq: torch.Tensor, layer_idx: int) -> MLAAttention:
    d, n_kv, H = shape.head_dim(config), config.num_key_value_heads, config.num_attention_heads
    group = torch.arange(H) // (H // n_kv)
    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    w_q, b_q = f64(attn.q_proj.weight).view(H, d, -1), f64(attn.q_proj.bias)
    w_k, b_k = f64(attn.k_proj.weight), f64(attn.k_proj.bias)
    w_v, b_v = f64(attn.v_proj.weight), f64(attn.v_proj.bias)

    # Queries: per head [nope | rope] rows, mapped by the head's KV group.
    q_rows = torch.cat([torch.einsum("hnd,hde->hne", maps.q_nope[group], w_q),
                        torch.einsum("hrd,hde->hre", maps.q_rope[group], w_q)], 1)
    k_nope = torch.einsum("gnk,ke->gne", maps.k_nope, w_k).reshape(-1, w_k.shape[1])
    k_rope = maps.k_rope @ w_k
    xx = stats.second_moment if stats is not None else None
    key_metric = value_metric = None
    if plan.weighting == "attention":
        key_metric, value_metric = attention_metrics(q_rows[:, :maps.nope_dim], attn.o_proj.weight.detach().double(),
                                                     xx, group, n_kv, d)
    down, up_k, up_v = lowrank.factorize(k_nope, w_v, plan.latent, plan.svd, plan.weighting, xx,
                                         key_metric, value_metric)

    new = MLAAttention(config, mla, layer_idx)
    new.q_proj.weight.copy_(q_rows.reshape(-1, w_k.shape[1]))
    new.kv_a_proj.weight.copy_(torch.cat([down, k_rope]))
    new.k_up.copy_(up_k.view(n_kv, maps.nope_dim, plan.latent))
    new.v_up.copy_(up_v.view(n_kv, d, plan.latent))
    if b_q is not None:
        b_q = b_q.view(H, d)
        new.q_proj.bias.copy_(torch.cat([torch.einsum("hnd,hd->hn", maps.q_nope[group], b_q),
                                         torch.einsum("hrd,hd->hr", maps.q_rope[group], b_q)], 1).flatten())
        new.kv_a_proj.bias.copy_(torch.cat([torch.zeros(plan.latent, dtype=torch.float64), maps.k_rope @ b_k]))
        new.k_up_bias.copy_(torch.einsum("gnk,k->gn", maps.k_nope, b_k))
        new.v_up_bias.copy_(b_v.view(n_kv, d))
    new.o_proj.load_state_dict(attn.o_proj.state_dict())
    # A NoPE layer under a per-head selection keeps its rope rows unrotated: frequency 0, the identity. (Under
    # the shared head its rope rows are zero and it keeps the others' frequencies: one grid for llama.cpp.)
    rotated = getattr(attn, "use_rope", True) or plan.selection == "shared"
    new.inv_freq.copy_(inv_freq[maps.freq_index] if rotated else torch.zeros(len(maps.freq_index)))
    return new.to(attn.o_proj.weight.dtype)


def keep_io(io: tuple[list, list]):
    """A forward hook on an attention block that keeps its inputs and outputs (float32, on the CPU), as
    recover.collect_attention_io does for every layer at once."""
    def hook(module, args, kwargs, output):
        x = kwargs.get("hidden_states", args[0] if args else None)
        io[0].append(x.detach().float().cpu())
        io[1].append(output[0].detach().float().cpu())
    return hook


def attention_metrics(q_nope_rows, w_o, xx, group, n_kv: int, d: int):
    """Block-diagonal metrics for the `attention` weighting: per KV group, the second moment of its query heads'
    nope queries (key errors only matter along queries) and W_o^T W_o of its heads (value errors matter through
    the output projection)."""
    H, N, _ = q_nope_rows.shape
    key_metric = torch.zeros(n_kv * N, n_kv * N, dtype=torch.float64)
    value_metric = torch.zeros(n_kv * d, n_kv * d, dtype=torch.float64)
    w_o = w_o.view(w_o.shape[0], H, d)
    for h in range(H):
        g = int(group[h])
        key_metric[g * N:(g + 1) * N, g * N:(g + 1) * N] += q_nope_rows[h] @ xx @ q_nope_rows[h].T
        value_metric[g * d:(g + 1) * d, g * d:(g + 1) * d] += w_o[:, h].T @ w_o[:, h]
    return key_metric, value_metric


def mla_section(config, plan: Plan, nope_dim: int, rope_dim: int, rope_scaling: float, source: str) -> dict:
    d = shape.head_dim(config)
    return {
        "format": "edge-mla/1",
        "source": source,
        "num_groups": config.num_key_value_heads,
        "head_dim": d,
        "nope_dim": nope_dim,
        "rope_dim": rope_dim,
        "latent_dim": plan.latent,
        "softmax_scale": d ** -0.5,
        "rope_attention_scaling": rope_scaling,
        "qkv_bias": False,  # set from the weights by convert()
        "o_bias": False,
        "plan": asdict(plan),
        "cache_numbers_per_token_per_layer": plan.latent + rope_dim,
        "rotary_dim": 2 * families.rotary_pairs(config),  # the rope grid's width: freq = base^(-2k/rotary_dim)
        "source_architecture": families.source_architecture(config),
        "nope_layers": [i for i, on in enumerate(families.rope_layers(config)) if not on],
    }


@contextmanager
def torch_threads(count: int | None):
    """torch's CPU threads set to `count` (None: unchanged) for the block, and restored after it."""
    threads = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread():
    """The conversion's linear algebra (SVDs, eigendecompositions of matrices of a few hundred rows) on one thread:
    threading buys nothing at that size, and when the cores are busy OpenMP's spin-waits made one SVD 100x slower
    (measured on 2 cores with another job running: 20 s against 0.15 s)."""
    return torch_threads(1)


@torch.no_grad()
def convert(model, plan: Plan, stats: list[LayerStats] | None = None, source: str = "", walk=None,
            written=None, converted=None) -> dict:
    """Convert `model` in place, layer by layer; returns the MLA section that its config now carries. Statistics
    come from `stats`, or, with `walk` (a layerwise.Walk over "calibration" windows), are gathered layer by layer
    as the conversion goes: each layer is loaded, calibrated and converted, then handed to `written(i, layer)`,
    which may write it out and release it before the next layer is read. When the walk also carries "teacher"
    windows, the original attention's inputs and outputs on them are handed with the converted block to
    `converted(i, attn, inputs, outputs)` (the recovery) before the layer is written."""
    from edge_mla.calibration import new_stats, stats_hook
    from edge_mla.layerwise import Progress, heap_allocations

    config = model.config
    if getattr(config, "mla", None):
        raise SourceError("this model is already converted to MLA")
    plan = resolve_plan(config, plan)
    calibrate = needs_calibration(plan)
    if calibrate and stats is None and walk is None:
        raise ValueError(f"selection '{plan.selection}' with weighting '{plan.weighting}' needs calibration "
                         "statistics (calibration.collect_stats)")
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().double()
    rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    layers = model.model.layers
    uses_rope = families.rope_layers(config)
    progress = Progress(len(layers), walk.tokens if walk and calibrate else 0, "converting")
    mla = None
    # With a recovery that corrects drift, the teacher windows also run through the converted layers (the
    # student's stream): each block then learns from the inputs it will see and towards the original's residual
    # stream, making up for what earlier blocks lost instead of passing it on.
    student = None
    if walk is not None and getattr(converted, "corrects_drift", False) and "teacher" in walk.hidden:
        student = [h.clone() for h in walk.hidden["teacher"]]
    for i, layer in enumerate(layers):
        s = stats[i] if stats is not None and calibrate else None
        io = ([], [])
        original_stream = walk.hidden.get("teacher") if student is not None else None
        if walk is not None:
            walk.load(i)
            s = new_stats(config) if calibrate else None

            def attach(key, layer):
                if key == "calibration" and s is not None:
                    return [layer.self_attn.register_forward_pre_hook(stats_hook(s, layer.self_attn, config),
                                                                      with_kwargs=True)]
                if key == "teacher":
                    return [layer.self_attn.register_forward_hook(keep_io(io), with_kwargs=True)]
                return []
            walk.run(i, attach)
        with one_thread():
            maps = layer_maps(plan, layer.self_attn, s, config, uses_rope[i])
            if mla is None:
                mla = mla_section(config, plan, maps.nope_dim, maps.rope_dim, rope_scaling, source)
                mla["qkv_bias"] = layer.self_attn.q_proj.bias is not None  # Qwen2, or Llama with attention_bias
                mla["o_bias"] = layer.self_attn.o_proj.bias is not None  # Llama with attention_bias
            layer.self_attn = convert_layer(layer.self_attn, maps, plan, s, config, mla, inv_freq, i)
        if converted is not None and io[0]:
            ins, outs = torch.cat(io[0]), torch.cat(io[1])
            if student is not None:  # the student's inputs; the target closes the gap to the original's stream
                ins = torch.cat([layer.input_layernorm(h).float() for h in student])
                outs = outs + torch.cat(original_stream).float() - torch.cat(student).float()
            with heap_allocations():
                converted(i, layer.self_attn, ins, outs)
            if student is not None:
                student = [layer(h, **walk.arguments["teacher"][i]) for h in student]
        if written is not None:
            written(i, layer)
        if walk is not None:
            progress.layer_done(i)
    config.mla = mla
    return mla


def describe(mla: dict, config) -> str:
    layers = config.num_hidden_layers
    per_token = mla["latent_dim"] + mla["rope_dim"]
    original = 2 * config.num_key_value_heads * mla["head_dim"]
    approximated = "".join(f"; approximated: {what}" for what in (mla.get("approximations") or {}).values()
                           if isinstance(what, str))
    return (f"MLA: latent {mla['latent_dim']} + rope key {mla['rope_dim']} = {per_token} numbers per token per layer "
            f"(original {original}, {100 * per_token / original:.1f}%); {layers} layers, "
            f"{per_token * layers * 2} bytes/token at fp16{approximated}")


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0




def calibrate_and_convert(src, plan: Plan, *, calib_windows: int = CALIBRATION_DEFAULTS["convert"][0],
                          calib_length: int = CALIBRATION_DEFAULTS["convert"][1],
                          text: str | None = None, written=None, teacher: torch.Tensor | None = None,
                          converted=None) -> dict:
    """Calibrate on text and convert a `source.Source` in place, layer by layer (layerwise.Walk: a lazily loaded
    source is read one layer at a time, and `written(i, layer)` may write and release each converted layer);
    `teacher` windows [n, T] and `converted`: the recovery, layer by layer (convert()). Returns the MLA section."""
    from edge_mla.data import calibration_label, calibration_windows
    from edge_mla.layerwise import Walk

    plan = resolve_plan(src.model.config, plan)
    approximations = None
    if families.has_qk_norm(src.model):  # Qwen3: the q/k norms become calibrated constants (an approximation)
        windows = calibration_windows(src.tokenizer, text, count=calib_windows, length=calib_length)
        approximations = families.fold_qk_norms(src.model, windows)
    windows = None
    if needs_calibration(plan):
        windows = calibration_windows(src.tokenizer, text, count=calib_windows, length=calib_length)
    walk = Walk(src.model, src.checkpoint, {"calibration": windows, "teacher": teacher})
    mla = convert(src.model, plan, source=src.name, walk=walk, written=written, converted=converted)
    if approximations:
        mla["approximations"] = approximations
    if src.gguf is not None:
        mla["source_gguf"] = str(src.gguf)
    mla["calibration_tokens"] = 0 if windows is None else int(windows.numel())
    mla["calibration_text"] = calibration_label(text)
    return mla


def convert_source(src, plan: Plan, out: str | Path, *, calib_windows: int = CALIBRATION_DEFAULTS["convert"][0],
                   calib_length: int = CALIBRATION_DEFAULTS["convert"][1],
                   text: str | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    """Calibrate -> convert -> save a `source.Source`. Checks plan and output path before slow steps. A lazily
    loaded source is written layer by layer as it is converted (one layer resident at a time)."""
    from edge_mla.layerwise import FolderWriter

    out = refuse_existing(out, overwrite)
    if src.checkpoint is None:
        mla = calibrate_and_convert(src, plan, calib_windows=calib_windows, calib_length=calib_length, text=text)
        return save(src.model, src.tokenizer, out, overwrite=overwrite), mla
    with staged_folder(out) as staging:
        writer = FolderWriter(staging, src.checkpoint, src.model.config.num_hidden_layers)
        mla = calibrate_and_convert(src, plan, calib_windows=calib_windows, calib_length=calib_length, text=text,
                                    written=writer.layer)
        writer.finish(src.model.config, src.tokenizer)
    return out, mla
