"""Run an ONNX export of edge-mla (MLA with a latent cache, or a baseline with K/V caches) with onnxruntime.

Needs onnxruntime, tokenizers and numpy only. The cache lives in one preallocated buffer per cache tensor, bound by
IOBinding to the past input and to the present outputs, so onnxruntime appends each new token in place.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_mla.precision import ONNX_CACHE_BITS

META = "edge_mla_onnx.json"


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / META).is_file()


def read_meta(folder: str | Path) -> dict:
    """The export's metadata file (written by export/onnx.py): the one place its name and reading live."""
    folder = Path(folder)
    if not (folder / META).exists():
        raise ValueError(f"{folder} is not an ONNX export of edge-mla (no {META}); make one with "
                         "`edge-mla export onnx MODEL_DIR --out DIR`")
    return json.loads((folder / META).read_text())


IN_CHILD_ABOVE = 1 << 30  # bytes of weights above which a measurement runs onnxruntime in a child process


def run_sized(folder: str | Path, fn, *args):
    """fn(*args) in this process for a small export; for one above IN_CHILD_ABOVE bytes of weights in a child
    process, so that onnxruntime's copy of a big model (an 8B: 7 GB) never adds to the build's own memory."""
    data = Path(folder) / "model.onnx.data"
    if not data.exists() or data.stat().st_size <= IN_CHILD_ABOVE:
        return fn(*args)
    from edge_mla.runtimes.llamacpp import run_isolated
    return run_isolated(fn, *args, runtime="onnxruntime")


PREFILL_CHUNK = 128  # prompt tokens per run: attention scratch grows with chunk x context, not prompt x context
# (an export may name its own in its metadata: the matmul body's q4_0 cache keeps a score matrix per 32 values)


class OnnxDecoder:
    """One onnxruntime session and its cache. `forward(ids)` appends ids to the cache and returns their logits.
    Long inputs run in chunks of `prefill_chunk` tokens (0: in one piece; None: the export's own, else
    PREFILL_CHUNK), so prefill memory grows linearly."""

    def __init__(self, folder: str | Path, threads: int | None = None, context: int | None = None,
                 prefill_chunk: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = read_meta(folder)
        need = self.meta["min_onnxruntime"]
        if _version(ort.__version__) < _version(need):
            raise ValueError(f"this export keeps a {self.meta['cache']['dtype']} cache, which needs onnxruntime >= "
                             f"{need} (installed {ort.__version__}): pip install -U onnxruntime, or re-export with "
                             "--kv-bits 16")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # fold DequantizeLinear of constants (the int4/int8 MLA up-projections) into float weights once, at load
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(self.folder / self.meta["model"]), options,
                                            providers=["CPUExecutionProvider"])
        self.cache = self.meta["cache"]
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None else self.cache.get("prefill_chunk",
                                                                                              PREFILL_CHUNK)
        self.reset(context or self.meta["max_context"])

    def reset(self, context: int) -> None:
        """Empty the cache and (in-place mode) allocate room for `context` tokens."""
        import onnxruntime as ort

        limit = self.meta["max_context"]
        if context > limit:
            raise ValueError(f"context {context} is longer than the model allows ({limit} tokens); use a shorter "
                             "prompt or fewer new tokens")
        self.context, self.length = context, 0
        self.buffers = {}
        for t in self.cache["tensors"]:
            self.buffers[t["past"]] = ort.OrtValue.ortvalue_from_shape_and_type(
                [1, t["heads"], context, t["width"]], np.dtype(t["dtype"]))

    @property
    def bytes_per_token(self) -> int:
        return self.cache["bytes_per_token"]

    def cache_bytes(self) -> tuple[int, int]:
        """(bytes holding tokens now, bytes allocated)."""
        allocated = sum(int(np.prod(v.shape())) * np.dtype(t["dtype"]).itemsize
                        for t, v in zip(self.cache["tensors"], self.buffers.values()))
        return self.length * self.bytes_per_token, allocated

    def forward(self, ids: np.ndarray, keep: int = 1) -> np.ndarray:
        """Run `ids` (1-D int64) after what the cache holds; logits [keep, vocab] of the last `keep` positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        total = self.length + len(ids)
        if total > self.context:
            raise ValueError(f"{total} tokens do not fit the cache of {self.context}; reset with a longer context")
        step = self.prefill_chunk or len(ids)
        logits = []
        for start in range(0, len(ids), step):
            piece = ids[start:start + step]
            wanted = keep - (len(ids) - start - len(piece))  # of the last `keep` positions, those in this piece
            got = self._run(piece, min(len(piece), max(wanted, 1)))  # the graph gives at least one row
            if wanted > 0:
                logits.append(got)
        return np.concatenate(logits)

    def _run(self, piece: np.ndarray, keep: int) -> np.ndarray:
        import onnxruntime as ort

        ids = piece.reshape(1, -1)
        total = self.length + ids.shape[1]
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        io.bind_cpu_input("logits_to_keep", np.array(keep, np.int64))
        logits = ort.OrtValue.ortvalue_from_shape_and_type([1, keep, self.meta["vocab_size"]], np.float32)
        io.bind_ortvalue_output("logits", logits)
        for t in self.cache["tensors"]:
            io.bind_ortvalue_input(t["past"], self.buffers[t["past"]])
            for name in t["present"]:
                io.bind_ortvalue_output(name, self.buffers[t["past"]])
        self.session.run_with_iobinding(io)
        self.length = total
        return logits.numpy()[0]


def nll(decoder: OnnxDecoder, window: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one window (fresh cache), and the count of scored tokens."""
    window = np.asarray(window, dtype=np.int64)
    decoder.reset(len(window))
    logits = decoder.forward(window, keep=len(window))[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum()), len(window) - 1


def perplexity(decoder: OnnxDecoder, windows) -> float:
    total, count = 0.0, 0
    for window in windows:
        s, n = nll(decoder, window)
        total, count = total + s, count + n
    return float(np.exp(total / count))


class Tokenizer:
    """tokenizer.json through the `tokenizers` package, plus the chat wrapping rendered at export time."""

    def __init__(self, folder: Path, meta: dict):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.chat = meta.get("chat")

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat:
                raise ValueError("this model has no chat template; run without --chat")
            return self.tok.encode(self.chat["prefix"] + text + self.chat["suffix"], add_special_tokens=False).ids
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def generate(decoder: OnnxDecoder, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int,
             stream=None) -> dict:
    """Greedy decoding; streams text to `stream` as it comes. Returns tokens, text and timings."""
    eos = set(decoder.meta["eos_token_ids"])
    t0 = time.perf_counter()
    logits = decoder.forward(np.array(prompt_ids, np.int64))
    prefill_s = time.perf_counter() - t0
    out, shown = [], ""
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        token = int(logits[-1].argmax())
        if token in eos:
            break
        out.append(token)
        if stream is not None:
            text = tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                stream.write(text[len(shown):])
                stream.flush()
                shown = text
        if step + 1 < max_new_tokens:
            logits = decoder.forward(np.array([token], np.int64))
    decode_s = time.perf_counter() - t1
    return {"tokens": out, "text": tokenizer.decode(out) if tokenizer else None, "prompt_tokens": len(prompt_ids),
            "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": max(len(out) - 1, 0)}


def run_cli(args) -> int:
    folder = Path(args.path)
    meta = read_meta(folder)
    exported = ONNX_CACHE_BITS[meta["cache"]["dtype"]]
    asked = getattr(args, "kv_bits", None)
    if getattr(args, "kv_type", None) or (asked and asked != exported):
        raise ValueError(f"an ONNX export's cache precision is fixed when it is exported (this one: "
                         f"{meta['cache']['dtype']}); re-export with `edge-mla export onnx --kv-bits` to change it")
    tokenizer = Tokenizer(folder, meta)
    ids = tokenizer.encode(args.prompt, chat=args.chat)
    need = len(ids) + args.max_new_tokens
    context = args.context or need
    if context < need:
        raise ValueError(f"--context {context} is shorter than the prompt ({len(ids)} tokens) plus "
                         f"--max-new-tokens {args.max_new_tokens}")
    chunk = getattr(args, "prefill_chunk", None)
    if chunk is not None and chunk < 1:
        raise ValueError(f"--prefill-chunk {chunk}: give a number of prompt tokens per run, 1 or more")
    decoder = OnnxDecoder(folder, threads=args.threads, context=context, prefill_chunk=chunk)
    print(args.prompt, end="", flush=True)
    result = generate(decoder, tokenizer, ids, args.max_new_tokens, stream=sys.stdout)
    used, allocated = decoder.cache_bytes()
    steps = result["decode_steps"]
    decode = f"{steps / result['decode_s']:.1f} tok/s decode" if steps and result["decode_s"] > 0 else "no decode"
    print(f"\n\n[{meta['architecture']}, {meta['cache']['dtype']} {meta['cache']['kind']} cache] "
          f"prompt {len(ids)} tokens at {len(ids) / result['prefill_s']:.1f} tok/s; {decode}; "
          f"cache {used / 1e6:.2f} MB in use ({decoder.length} tokens x {decoder.bytes_per_token} B), "
          f"{allocated / 1e6:.2f} MB allocated", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_mla.runtimes.onnxruntime DIR --prompt ...`: the same as `edge-mla run`, without the CLI's
    other imports (torch), for devices that have only onnxruntime, tokenizers and numpy."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edge_mla.runtimes.onnxruntime", description=main.__doc__)
    p.add_argument("path")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per run (default: the export's own); see `edge-mla run --help`")
    args = p.parse_args(argv)
    args.kv_type = None
    try:
        return run_cli(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
