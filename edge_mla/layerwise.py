"""One decoder layer at a time: how a model bigger than RAM is calibrated, converted and written.

A source folder of safetensors is opened as a `Checkpoint` (tensors read one by one from the memory-mapped files,
each file mapped only while a tensor is copied out, so its pages do not stay in this process's RSS) and a model
skeleton on the meta device (`lazy_model`): only the rotary tables are resident. `Walk` carries
token windows through the layers as hidden states: each layer is loaded, run over every window (hooks gather what
a later step needs), and handed back; the caller converts it, writes it and releases it before the next is read.
A model already in memory walks the same way (loading and releasing are then no-ops), so there is one path.
"""
from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def rss_mb() -> float:
    """Current resident memory (VmRSS) in MB; the peak is peak_rss_mb()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Checkpoint:
    """The tensors of a Hugging Face folder (sharded or not), read one at a time."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.dtypes = {}  # name -> dtype as stored, for the tensors read so far
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(file, "pt") as f:
                    self.files.update({name: file for name in f.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One tensor: a float32 copy by default, as the in-memory load gives it; dtype=None: as stored, backed by
        the file's memory map (pages are read, and count in RSS, only as they are touched; unmapped when the
        tensor is freed). Treat that one as read-only."""
        from safetensors import safe_open

        from edge_mla.source import SourceError

        if name not in self.files:
            raise SourceError(f"{self.folder} has no tensor '{name}', which its config.json calls for: the folder is "
                              "incomplete or not this architecture's checkpoint")
        with safe_open(self.files[name], "pt") as f:
            t = f.get_tensor(name)
        self.dtypes[name] = t.dtype
        if dtype is None:
            return t
        return t.clone() if t.dtype == dtype else t.to(dtype)

    def sliced(self, name: str) -> "Rows":
        """The tensor as row slices read on demand (each read maps the file only while it copies the rows out):
        a vocabulary-sized matrix converted piece by piece without its pages piling up in RSS."""
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            shape = tuple(f.get_slice(name).get_shape())
        return Rows(self, name, shape)

    def rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """tensor(name)[ids], touching only those rows (the embedding lookup)."""
        return self.tensor(name, None)[ids].to(dtype)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
FREED_BLOCKS_RETURNED = 1 << 20  # blocks of 1 MiB or more go back to the system when freed
HEAP_BLOCKS = 32 << 20  # glibc's own largest dynamic threshold
_threshold = None  # what this process set last (None: glibc's dynamic default)


def _mmap_threshold(size: int | None) -> None:
    global _threshold
    _threshold = size
    if size is None:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def give_back_freed_memory() -> None:
    """Make glibc return every freed block of 1 MiB or more to the system at once. By default its mmap threshold
    grows to the largest block freed (up to 32 MiB), after which a layer's tensors come from the heap, which does
    not shrink: measured on a 16-layer test model, RSS then grew 40-50 MB with every layer read; with a fixed
    threshold it stays flat (tests/test_memory_cap.py). No-op where libc is not glibc."""
    _mmap_threshold(FREED_BLOCKS_RETURNED)


@contextmanager
def heap_allocations():
    """Blocks up to 32 MiB from the heap while the body runs, where give_back_freed_memory is in force: a training
    loop (the recovery) allocates and frees the same few-MB tensors thousands of times, and under that threshold
    each is an mmap, page faults and an munmap (measured: the build's recovery 1.5-1.8x slower, half its CPU time
    in the kernel). The heap's blocks are reused from step to step, so it does not grow with the layers."""
    before = _threshold
    if before is not None:
        _mmap_threshold(HEAP_BLOCKS)
    try:
        yield
    finally:
        if before is not None:
            _mmap_threshold(before)


class Rows:
    """A checkpoint tensor read by row slices: rows[a:b] is a torch tensor as stored."""

    def __init__(self, checkpoint: Checkpoint, name: str, shape: tuple[int, ...]):
        self.checkpoint, self.name, self.shape, self.ndim = checkpoint, name, shape, len(shape)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.checkpoint.files[self.name], "pt") as f:
            return f.get_slice(self.name)[rows]


def lazy_model(config):
    """The model's modules with every weight on the meta device; only the rotary tables are made on the CPU (the
    model's own forward needs them to hand each layer its arguments, layer_arguments)."""
    from transformers import AutoModelForCausalLM

    give_back_freed_memory()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def is_lazy(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def load_module(module: torch.nn.Module, prefix: str, checkpoint: Checkpoint) -> torch.nn.Module:
    """Fill a meta module's weights from the checkpoint (names under `prefix`), in float32."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, slot in module.state_dict(keep_vars=True).items():  # one tensor's copy in flight at a time
            slot.copy_(checkpoint.tensor(prefix + name, None))
    return module


def release(module: torch.nn.Module) -> None:
    """Give a loaded layer's memory back (its modules stay, on the meta device)."""
    module.to("meta")


def embed(model, checkpoint: Checkpoint | None, windows: torch.Tensor) -> list[torch.Tensor]:
    """Each window's input embeddings [1, T, E], float32: the model's own lookup, or the checkpoint's rows (the same
    numbers: a bf16 row made float32 is exact either way)."""
    table = model.model.embed_tokens
    if not is_lazy(table):
        return [table(w[None].to(table.weight.device)).float() for w in windows]
    rows = checkpoint.rows("model.embed_tokens.weight", windows)
    return [r[None] for r in rows]


def layer_arguments(model, hidden: torch.Tensor) -> list[dict]:
    """The keyword arguments the model's own forward hands each decoder layer (causal mask, RoPE cos/sin, positions)
    for windows shaped like `hidden` [1, T, E]: recorded by running that forward with every layer stood in for by
    a recorder, so the layer-by-layer walk computes exactly what the whole model computes."""
    layers = model.model.layers
    seen = {}

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            seen[i] = kwargs
            return hidden_states
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    norm = model.model.norm
    was_lazy = is_lazy(norm)
    if was_lazy:  # the forward ends with the final norm, whose output is not used here
        norm.to_empty(device="cpu")
    try:
        with torch.no_grad():
            model.model(inputs_embeds=hidden, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
        if was_lazy:
            release(norm)
    return [seen[i] for i in range(len(layers))]


class Walk:
    """Sets of token windows carried through the decoder layers as hidden states, one layer at a time."""

    def __init__(self, model, checkpoint: Checkpoint | None, windows: dict[str, torch.Tensor]):
        self.model, self.checkpoint = model, checkpoint
        self.hidden = {key: embed(model, checkpoint, w) for key, w in windows.items() if w is not None}
        self.arguments = {key: layer_arguments(model, h[0]) for key, h in self.hidden.items()}
        self.tokens = sum(w.numel() for w in windows.values() if w is not None)

    def load(self, i: int) -> torch.nn.Module:
        layer = self.model.model.layers[i]
        if self.checkpoint is not None and is_lazy(layer):
            load_module(layer, f"model.layers.{i}.", self.checkpoint)
        return layer

    @torch.no_grad()
    def run(self, i: int, attach=None) -> None:
        """Layer i (loaded) over every window set; attach(key, layer) -> hook handles, hooks to hold while the
        `key` windows run. The hidden states become the layer's outputs."""
        layer = self.model.model.layers[i]
        for key, states in self.hidden.items():
            handles = attach(key, layer) if attach is not None else []
            try:
                self.hidden[key] = [layer(h, **self.arguments[key][i]) for h in states]
            finally:
                for h in handles:
                    h.remove()


@contextmanager
def resident(module: torch.nn.Module, prefix: str, checkpoint: Checkpoint | None):
    """`module` with its weights in memory for the block: read from the checkpoint and released after when it is
    lazy, as it is otherwise."""
    if checkpoint is None or not is_lazy(module):
        yield module
        return
    load_module(module, prefix, checkpoint)
    try:
        yield module
    finally:
        release(module)


def layers(model, checkpoint: Checkpoint | None, what: str | None = None):
    """(i, decoder layer) with the layer's weights in memory, one layer at a time; with `what`, a progress line
    after each."""
    progress = Progress(len(model.model.layers), 0, what) if what else None
    for i, layer in enumerate(model.model.layers):
        with resident(layer, f"model.layers.{i}.", checkpoint):
            yield i, layer
        if progress:
            progress.layer_done(i)


def weight(model, checkpoint: Checkpoint | None, name: str) -> torch.Tensor:
    """A parameter of the model by its checkpoint name ("model.embed_tokens.weight"): the resident one, or, on a
    lazy model, the checkpoint's (a matrix as `Rows`, read by whoever converts it, in pieces)."""
    param = model.get_parameter(name) if name != "lm_head.weight" or not model.config.tie_word_embeddings \
        else model.get_input_embeddings().weight
    if not param.is_meta:
        return param.detach()
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    return checkpoint.sliced(name) if len(param.shape) == 2 else checkpoint.tensor(name, None)


class FolderWriter:
    """A converted model written as it is made: one safetensors file per layer (then released), then the tensors
    outside the layers, an index, config.json and the tokenizer. Tensors the conversion did not change keep the
    checkpoint's dtype (bf16 -> float32 -> bf16 is exact); the new attention weights are float32, as `save` writes."""

    def __init__(self, folder: Path, checkpoint: Checkpoint, n_layers: int):
        self.folder, self.checkpoint, self.n = Path(folder), checkpoint, n_layers + 2
        self.weight_map, self.total_bytes = {}, 0

    def _file(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n:05d}.safetensors"

    def _write(self, k: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        save_file(tensors, self.folder / self._file(k), metadata={"format": "pt"})
        self.weight_map.update({name: self._file(k) for name in tensors})
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def layer(self, i: int, layer: torch.nn.Module) -> None:
        prefix = f"model.layers.{i}."
        tensors = {}
        for name, t in layer.state_dict().items():
            stored = self.checkpoint.dtypes.get(prefix + name) if not name.startswith("self_attn.") else None
            tensors[prefix + name] = t.detach().to(stored or t.dtype).contiguous()
        self._write(i, tensors)
        release(layer)

    def finish(self, config, tokenizer) -> None:
        # the two vocabulary-sized tensors in files of their own: one of them in memory at a time
        self._write(self.n - 2, {"model.embed_tokens.weight": self.checkpoint.tensor("model.embed_tokens.weight", None)})
        names = ["model.norm.weight"]
        if not getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in self.checkpoint:
            names.append("lm_head.weight")
        self._write(self.n - 1, {name: self.checkpoint.tensor(name, None) for name in names})
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}, indent=2))
        config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)


class Progress:
    """One line per layer: how far, how fast (calibration tokens per second), and memory now and at peak."""

    def __init__(self, n: int, tokens: int, what: str):
        self.n, self.tokens, self.what = n, tokens, what
        self.t0 = time.perf_counter()

    def layer_done(self, i: int, extra: str = "") -> None:
        seconds = time.perf_counter() - self.t0
        rate = f", {self.tokens * (i + 1) / seconds:,.0f} tokens/s through layers" if self.tokens and seconds else ""
        print(f"      {self.what}: layer {i + 1}/{self.n} ({seconds:.0f} s{rate}; RSS {rss_mb():.0f} MB, "
              f"peak {peak_rss_mb():.0f} MB){extra}", flush=True)
