"""What each `edge-mla` command does, once cli.py has parsed its arguments: one handler per command, each
returning the exit code."""
from __future__ import annotations

import time
from pathlib import Path

from edge_mla import plans, precision, timebudget
from edge_mla.publish import refuse_existing
from edge_mla.source import DEFAULT_MODEL

# Exit codes (README): 0 done, 1 an unexpected error, 2 bad input (the message says what to change),
# 3 the model does not fit the device, 4 the runtime (llama.cpp) crashed, 130 interrupted.
EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_RUNTIME_CRASHED = 2, 3, 4


def onnx_export_folder(path: Path) -> bool:
    from edge_mla.runtimes.onnxruntime import is_export

    return path.is_dir() and is_export(path)


def _kv_type(args) -> str | None:
    """The llama.cpp cache type asked for (--kv-type, or --kv-bits); None: the one the file records."""
    return args.kv_type or (precision.GGUF_CACHE_TYPE[args.kv_bits] if args.kv_bits else None)


def default_out(model: str, device: str) -> str:
    """build-<the model's whole name>-<device>: a hub id keeps its name (dots included), a .gguf its stem."""
    from edge_mla.provenance import model_name

    return f"build-{model_name(model) if model != DEFAULT_MODEL else DEFAULT_MODEL}-{device}"


def _plan_from(args, config):
    from edge_mla.convert import check_saving, latent_for_share, latent_from_rank

    plan = plans.Plan(args.selection, args.rope_pairs, None, args.svd, args.weighting)
    if args.rank is not None:
        plan.latent = latent_from_rank(config, args.rank)
    elif args.latent is not None:
        plan.latent = args.latent
    elif not args.full_rank:
        plan.latent = latent_for_share(config, plan, plans.CACHE_SHARE["training-free"])
    if not args.full_rank:  # an exact, uncompressed conversion is a choice of its own
        check_saving(config, plan, plans.EXPECTED_COST["training-free"])
    return plan


def cmd_convert(args) -> int:
    from edge_mla.convert import convert_source, describe
    from edge_mla.source import load_source

    out = refuse_existing(args.out, args.force)  # before the slow load
    src = load_source(args.model, lazy=True)  # a folder's layers are read, converted and written one at a time
    plan = _plan_from(args, src.model.config)
    t0 = time.perf_counter()
    path, mla = convert_source(src, plan, out, calib_windows=args.calib_windows, calib_length=args.calib_length,
                               text=args.calib_text, overwrite=args.force)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    print(describe(mla, src.model.config))
    return 0


def cmd_eval(args) -> int:
    from edge_mla.mla_folder import load_any
    from edge_mla.data import CORPUS_ABOUT, load_text, read_text_file, token_windows
    from edge_mla.eval import generate_text, perplexity
    from edge_mla.mla import set_absorbed

    src = load_any(args.model)
    model, tokenizer = src.model, src.tokenizer
    set_absorbed(model, args.absorbed)
    if args.windows > 0:
        text = read_text_file(args.text, tokenizer) if args.text else load_text(None, "heldout")
        windows = token_windows(tokenizer, text, args.length, args.windows)
        ppl = perplexity(model, windows)
        where = args.text or CORPUS_ABOUT
        print(f"perplexity {ppl:.2f} on {windows.numel()} tokens ({windows.shape[0]} x {args.length}; {where})")
    for prompt in args.prompt or []:
        print(f"{prompt!r} -> {generate_text(model, tokenizer, prompt, args.max_new_tokens, args.chat)!r}")
    return 0


def verdict_thresholds(args):
    from edge_mla.target import parse_share
    from edge_mla.verdict import Thresholds

    if not 0 < args.verdict_min_speed <= 10:
        raise ValueError(f"--verdict-min-speed {args.verdict_min_speed}: give a speed ratio such as 0.85")
    return Thresholds(parse_share(args.verdict_min_saving, "--verdict-min-saving"),
                      parse_share(args.verdict_max_loss, "--verdict-max-loss"), args.verdict_min_speed)


def cmd_build(args) -> int:
    from edge_mla.build import build
    from edge_mla.preflight import parse_formats

    formats = parse_formats(args.formats)
    calibration = plans.Calibration(args.calib_windows, args.calib_length, tuple(args.calib_text or ())).check()
    plan = None
    if args.latent is not None or args.selection is not None:
        import dataclasses
        base = plans.PLANS["finetuned" if args.finetune_tokens else "recovered" if args.recover_steps
                           else "training-free"]
        plan = dataclasses.replace(base, latent=args.latent, selection=args.selection or base.selection)
    out = args.out or default_out(args.model, args.device)
    from edge_mla.target import parse_loss
    loss = parse_loss(args.max_quality_loss) if args.max_quality_loss is not None else None
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: give 1 or more (the cores the build may use)")
    from edge_mla.convert import torch_threads
    with torch_threads(args.threads):  # the build's own work; its measurements' runtimes get the count too
        build(args.model, args.device, args.bits, out, context=args.context, finetune_tokens=args.finetune_tokens,
              plan=plan, force=args.force, devices_file=args.devices, kv_bits=args.kv_bits,
              quality_windows=args.quality_windows, quality_length=args.quality_length,
              recover_steps=args.recover_steps, speed_prompt=args.speed_prompt, max_quality_loss=loss,
              formats=formats, threads=args.threads, calibration=calibration,
              time_budget=None if args.time_budget.lower() == "none" else timebudget.parse_duration(args.time_budget),
              thresholds=verdict_thresholds(args))
    return 0


def cmd_budget(args) -> int:
    from edge_mla import budget as bud

    device = bud.find_device(args.device, bud.load_devices(args.devices))
    path = Path(args.model)
    if path.suffix == ".gguf":
        fp = bud.footprint_gguf(path, _kv_type(args))
    elif onnx_export_folder(path):
        fp = bud.footprint_onnx(path)
    else:
        from transformers import AutoConfig
        from edge_mla.source import load_source
        config = AutoConfig.from_pretrained(path) if (path / "config.json").exists() else load_source(args.model).model.config
        fp = bud.footprint_estimate(config, args.bits, args.bits / 8, "llama.cpp", name=path.name)
    result = bud.budget(fp, device, args.context)
    print(bud.format_budget(result))
    return 0 if result.fits else EXIT_DOES_NOT_FIT


def cmd_devices(args) -> int:
    from edge_mla import budget as bud

    for d in bud.load_devices(args.devices).values():
        aliases = f" (also: {', '.join(d.aliases)})" if d.aliases else ""
        runtimes = ", ".join(d.runtimes) or "none: no LLM fits"
        print(f"{d.key}{aliases}\n  {d.name}: {d.ram_mb:g} MB RAM, {d.usable_mb:g} MB usable, {d.bandwidth_gbs} GB/s, "
              f"{f'{d.gmacs:g} GMAC/s, ' if d.gmacs else ''}{d.cpu}; runtimes: {runtimes}\n  source: {d.source}")
    return 0


def cmd_finetune(args) -> int:
    from edge_mla.finetune import TrainConfig, finetune

    cfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, micro_batch=args.micro_batch, lr=args.lr,
                      distill=args.distill, save_every=args.save_every, seed=args.seed,
                      grad_checkpointing=args.grad_checkpointing, compile=args.compile, cache_bits=args.cache_bits,
                      self_distill_tokens=args.self_distill_tokens, cache_teacher=args.cache_teacher,
                      fsdp=args.fsdp)
    summary = finetune(args.model_dir, args.out, cfg, data=args.data, teacher=args.teacher, resume=args.resume,
                       overwrite=args.force)
    last = summary["history"][-1] if summary["history"] else {}
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"wrote {args.out}: {summary['steps']} steps x {summary['world_size']} processes, final loss "
              f"{last.get('loss', float('nan')):.3f}, {last.get('tokens_per_s', 0):.0f} tokens/s")
    return 0


def cmd_run(args) -> int:
    if str(args.path).endswith(".gguf"):
        from edge_mla.runtimes import llamacpp
        if args.prefill_chunk is not None:
            raise ValueError("--prefill-chunk applies to ONNX exports; llama.cpp takes its batch as -ub")
        return llamacpp.run_cli(args)
    if args.flash_attn is not None:
        raise ValueError("--flash-attn applies to .gguf files (llama.cpp); onnxruntime chooses its attention kernels")
    from edge_mla.runtimes import onnxruntime
    return onnxruntime.run_cli(args)
