"""The `edge-mla` command: its arguments, and main() (commands.py does the work)."""
from __future__ import annotations

import argparse
import sys

from edge_mla import plans, precision
from edge_mla.commands import (EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_RUNTIME_CRASHED, cmd_budget, cmd_build,
                               cmd_convert, cmd_devices, cmd_eval, cmd_finetune, cmd_run)
from edge_mla.source import DEFAULT_MODEL


class HELP(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already states it (required/flag options
    have none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {str(action.default).replace('%', '%%')})"  # argparse %-formats the help


def _plan_args(p: argparse.ArgumentParser) -> None:
    _model_arg(p)
    p.add_argument("--selection", default=plans.PLANS["training-free"].selection, choices=plans.SELECTIONS,
                   help="which RoPE frequencies survive: per-KV-head selections of the paper, partition (disjoint "
                        "across KV heads), or shared (one rope key, TransMLA's RoRoPE)")
    p.add_argument("--rope-pairs", "-r", type=int, default=None,
                   help="r: frequency pairs kept per KV head (default head_dim/16), or by the shared head "
                        "(default head_dim/2, every frequency)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, default=None, help="latent width per KV head (total = rank * n_kv)")
    rank.add_argument("--latent", type=int, default=None,
                      help=f"total latent width C (default: C + R = "
                           f"{100 * plans.CACHE_SHARE['training-free']:.0f}%% of the "
                           "original's cache, in whole 32-number blocks; SmolLM2-135M: 256)")
    p.add_argument("--full-rank", action="store_true", help="no low-rank compression (exact NoPE/V)")
    p.add_argument("--svd", default="joint", choices=plans.SVD_METHODS,
                   help="joint: one SVD of keys and values together (MHA2MLA's SVD_joint); split: one each")
    p.add_argument("--weighting", default="attention", choices=plans.WEIGHTINGS,
                   help="weights: the paper's plain SVD; activations/balanced/attention: calibrated on text, "
                        "each losing less than the one before (docs/conversion_quality.md)")
    windows, length = plans.CALIBRATION_DEFAULTS["convert"]
    p.add_argument("--calib-windows", type=int, default=windows, help="calibration windows of --calib-length tokens")
    p.add_argument("--calib-length", type=int, default=length, help="tokens per calibration window")
    p.add_argument("--calib-text", "--text", dest="calib_text", nargs="+", default=None, metavar="FILE",
                   help="text or JSONL files of your own domain to calibrate on, each one kind of text (JSONL: "
                        "\"text\" or chat \"messages\" a line; default: the built-in mixture of prose, code, "
                        "technical docs and chat, docs/texts.md)")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"built-in name ({DEFAULT_MODEL}), Hugging Face folder, .gguf file, or hub id (online)")


def _kv_args(p: argparse.ArgumentParser, help_default: str) -> None:
    p.add_argument("--kv-bits", type=int, default=None, choices=precision.BITS,
                   help=f"cache bits: 4 = q4_0, 8 = q8_0, 16 = f16 (default: {help_default})")
    p.add_argument("--kv-type", default=None, choices=tuple(precision.CACHE_BITS_OF_TYPE),
                   help="the same as llama.cpp names it (-ctk/-ctv), instead of --kv-bits")


def build_parser() -> argparse.ArgumentParser:
    from edge_mla import __version__

    parser = argparse.ArgumentParser(prog="edge-mla", description="Convert a RoPE decoder LLM to Multi-head "
                                     "Latent Attention and ship it to edge runtimes (ONNX, GGUF) with a memory "
                                     "budget per device.", formatter_class=HELP)
    parser.add_argument("--version", action="version", version=f"edge-mla {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, formatter_class=HELP, **k)  # defaults shown in every --help

    p = sub.add_parser("convert", help="convert a RoPE decoder to MLA (MHA2MLA) and save it as a folder")
    _plan_args(p)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="held-out perplexity (and sample generations) of a model or converted folder")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="a source model (built-in name, folder, .gguf, hub id) or a converted folder")
    p.add_argument("--windows", type=int, default=8, help="held-out windows to score (0: none)")
    p.add_argument("--length", type=int, default=1024, help="tokens per window")
    p.add_argument("--text", default=None, help="text file to score (default: held-out Wikipedia sample)")
    p.add_argument("--prompt", action="append", help="also generate from this prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per --prompt")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--absorbed", action="store_true", help="run MLA layers in the absorbed (decode) form")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("build", help="the whole job: convert, (fine-tune), export ONNX + GGUF, budget for a device")
    _model_arg(p)
    p.add_argument("--device", required=True, help="target device, required (`edge-mla devices` lists them)")
    p.add_argument("--bits", type=int, default=4, choices=precision.BITS, help="weight bits")
    p.add_argument("--kv-bits", type=int, default=None, choices=precision.BITS,
                   help="cache bits (default: --bits; but 8 under 4-bit weights with --recover-steps 0: a 4-bit cache "
                        "breaks a training-free conversion, docs/recovery.md)")
    p.add_argument("--recover-steps", type=int, default=plans.RECOVER_STEPS,
                   help="CPU recovery: steps per attention block of layer-wise distillation towards the original, "
                        "through the chosen cache (0: a training-free build, C + R = 83%% of the original's cache, "
                        "docs/recovery.md)")
    p.add_argument("--time-budget", default=plans.DEFAULT_TIME_BUDGET,
                   help="wall time the build aims for (15m, 900s, 1.5h), priced at its start by a probe of this "
                        "machine: the CPU recovery gets what the other steps leave, up to --recover-steps a layer; "
                        "where the defaults do not fit, less calibration and quality text, and no recovery where "
                        "not even 50 steps a layer fit ('none': the defaults, always --recover-steps)")
    p.add_argument("--context", type=int, default=None, help="context to budget for (default: min(model max, 4096))")
    p.add_argument("-o", "--out", default=None, help="output folder (default: build-<model>-<device>)")
    p.add_argument("--finetune-tokens", type=int, default=0, help="fine-tune on this many tokens first (GPU)")
    p.add_argument("--latent", type=int, default=None, help="latent width C (default: the build's plan)")
    p.add_argument("--selection", default=None, choices=plans.SELECTIONS,
                   help="RoPE selection (default: the build's plan, shared)")
    p.add_argument("--quality-windows", type=int, default=None,
                   help="held-out windows per text for the perplexity of both builds in both runtimes (0: skip; "
                        "default 4, fewer where --time-budget is short for the model)")
    p.add_argument("--quality-length", type=int, default=512, help="tokens per quality window")
    p.add_argument("--max-quality-loss", default=None,
                   help="pick the latent width: the narrowest (from the plan's, in steps of 64) whose perplexity on "
                        "held-out calibration text is within this of the original's, e.g. 10%% (each try costs a "
                        "conversion and recovery)")
    p.add_argument("--speed-prompt", type=int, default=None,
                   help="prompt tokens for the prefill/decode speed of both builds on this machine, also measured "
                        "after 4 times as many (0: skip; default 256, that one alone where --time-budget is short)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the build and its measurements (default: all cores). With other work on the "
                        "machine give the free cores: a busy core makes the recovery's threads wait, up to 10x slower")
    p.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows of the conversion, ONNX cache scales and GGUF latent check "
                        "(default: each's own: "
                        + ", ".join(f"{k} {w}" for k, (w, _) in plans.CALIBRATION_DEFAULTS.items())
                        + "); fewer shorten a big model's build (docs/scale.md)")
    p.add_argument("--calib-length", type=int, default=None,
                   help="tokens per calibration window (default: each step's own: "
                        + ", ".join(f"{k} {n}" for k, (_, n) in plans.CALIBRATION_DEFAULTS.items()) + ")")
    p.add_argument("--calib-text", "--text", dest="calib_text", nargs="+", default=None, metavar="FILE",
                   help="text or JSONL files of your own domain to calibrate and recover on, each one kind of text (JSONL: "
                        "\"text\" or chat \"messages\" a line; default: the built-in mixture of prose, code, "
                        "technical docs and chat, docs/texts.md)")
    p.add_argument("--verdict-min-saving", default="10%",
                   help="where both fit, recommend MLA only if it saves at least this share of the device's usable "
                        "memory (docs/verdict.md)")
    p.add_argument("--verdict-max-loss", default="10%",
                   help="... and its perplexity on the worst text of the battery is within this of the original's")
    p.add_argument("--verdict-min-speed", type=float, default=0.85,
                   help="... and it decodes at least this fraction of the original's speed")
    p.add_argument("--devices", default=None, help="extra device catalog (TOML)")
    p.add_argument("--formats", default="onnx,gguf",
                   help="outputs, comma-separated: onnx, gguf or both; checked against the model before any work "
                        "(docs/models.md)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("budget", help="memory budget of an exported model (.gguf, ONNX folder) or an original; "
                                      f"exits {EXIT_DOES_NOT_FIT} when it does not fit")
    p.add_argument("model", help=".gguf file, ONNX export folder, or a source model (estimated at --bits)")
    p.add_argument("--device", required=True, help="target device (`edge-mla devices` lists them)")
    p.add_argument("--context", type=int, default=4096, help="context to budget for")
    _kv_args(p, "a .gguf's recorded cache type, else 16")
    p.add_argument("--bits", type=int, default=16, choices=precision.BITS, help="weight bits assumed for a source model")
    p.add_argument("--devices", default=None, help="extra device catalog (TOML)")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("devices", help="list the device catalog")
    p.add_argument("--devices", default=None, help="extra device catalog (TOML)")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("finetune", help="recover quality: full-parameter fine-tuning of a converted model "
                                        "(run under torchrun for several GPUs)")
    p.add_argument("model_dir", help="converted model folder")
    p.add_argument("-o", "--out", required=True, help="output folder for the fine-tuned model")
    p.add_argument("--data", nargs="*", default=None,
                   help="text files, .jsonl files (field 'text'), datasets folders, or 'builtin' for the built-in "
                        "corpus (the default when none is given)")
    p.add_argument("--tokens", type=int, required=True, help="training budget in tokens")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per process per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of KL to the original model's logits (0: plain next-token loss)")
    p.add_argument("--teacher", default=None, help="original model for --distill (default: the conversion's source)")
    p.add_argument("--cache-bits", type=int, choices=(16, 4), default=16,
                   help="train through this cache: 4 = llama.cpp's q4_0 round trip of the cached row (straight-through)")
    p.add_argument("--self-distill-tokens", type=int, default=0,
                   help="add this many tokens of text sampled from the original model to the training text (GPU)")
    p.add_argument("--cache-teacher", action="store_true",
                   help="keep the original model's hidden states of every training row on the GPU after its first "
                        "pass, so later epochs skip its forward pass (bf16: 2 x hidden size bytes per token)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state (torch's fully_shard) "
                        "instead of replicating them (DDP); no checkpoints")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of --out")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student, the teacher and the head loss (GPU)")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="export a converted (or original) model for an edge runtime")
    formats = p.add_subparsers(dest="format", required=True)
    for name in ("onnx", "gguf"):
        module = _export_module(name)
        q = formats.add_parser(name, help=module.__doc__.strip().splitlines()[0], formatter_class=HELP)
        module.add_arguments(q)
        q.set_defaults(func=module.main)

    web = _export_module("web")
    p = sub.add_parser("web", help="a static web page that runs an ONNX export in the browser (onnxruntime-web)")
    web.add_arguments(p)
    p.set_defaults(func=web.main)

    p = sub.add_parser("run", help="run an exported model: a .gguf file (llama.cpp) or an ONNX folder (onnxruntime)")
    p.add_argument("path", help="exported .gguf file or ONNX export folder")
    p.add_argument("-p", "--prompt", default="The capital of France is", help="text to continue")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--context", type=int, default=None, help="context length to allocate (default: prompt + new tokens)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="ONNX: prompt tokens per run (default: the export's own, 256 for an MLA export); chunks "
                        "shorter than the export's prefill.from_tokens (30 on SmolLM2) read the prompt in the "
                        "absorbed form: slower, without the expanded form's working memory (docs/onnx.md)")
    _kv_args(p, "the cache the file was built for: a .gguf records it, an ONNX export fixes it")
    p.add_argument("--flash-attn", choices=("on", "off"), default=None,
                   help="llama.cpp's flash attention (default: on for a quantized cache, which needs it, else off); "
                        "report.json's run_settings says which is faster for the file")
    p.set_defaults(func=cmd_run)
    return parser


def _export_module(name: str):
    import importlib

    return importlib.import_module(f"edge_mla.export.{name}")


def _interrupt_on_sigterm() -> None:
    """A killed build (SIGTERM: `kill`, a CI timeout) cleans up like Ctrl-C does: no half-written output."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _interrupt_on_sigterm()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"edge-mla: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as err:
        if type(err).__name__ != "RuntimeCrash":
            raise
        print(f"edge-mla: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME_CRASHED


if __name__ == "__main__":
    sys.exit(main())
