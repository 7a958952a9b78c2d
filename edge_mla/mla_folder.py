"""A converted model on disk: the MLA folder (config.json with its `mla` section, safetensors, tokenizer) written
all or nothing and read back without the source model, whole or with its weights left on disk (layerwise.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_mla.mla import install_mla
from edge_mla.publish import refuse_existing, staged_folder
from edge_mla.source import SourceError


def save(model, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write config (with its `mla` section), safetensors and tokenizer; all or nothing."""
    out = refuse_existing(out, overwrite)
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out


def is_converted(path: str | Path) -> bool:
    """A folder written by `save`: a config.json with an `mla` section."""
    config = Path(path) / "config.json"
    return config.is_file() and "mla" in json.loads(config.read_text())


def load_any(spec: str | Path, lazy: bool = False):
    """A converted folder (MLA layers; named after its source model) or any source model, as a source.Source.
    lazy=True leaves a folder's weights on disk, to be read a layer at a time (layerwise.py)."""
    from edge_mla.source import Source, load_source, source_gguf

    if is_converted(spec):
        checkpoint = None
        if lazy:
            model, tokenizer, checkpoint = load_lazy(spec)
        else:
            model, tokenizer = load(spec)
        mla = model.config.mla
        return Source(model, tokenizer, mla.get("source") or Path(spec).name, Path(spec),
                      source_gguf(mla.get("source_gguf") or mla.get("source")), checkpoint)
    return load_source(str(spec), lazy=lazy)


def load_lazy(folder: str | Path):
    """A converted folder's model with its weights left on disk: (model on the meta device, tokenizer,
    layerwise.Checkpoint)."""
    from transformers import AutoConfig, AutoTokenizer

    from edge_mla.layerwise import Checkpoint, lazy_model

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    model = lazy_model(config)
    with torch.device("meta"):
        install_mla(model, config.mla)
    return model.eval(), AutoTokenizer.from_pretrained(folder), Checkpoint(folder)


def load(folder: str | Path):
    """Load a converted model folder: no source model is needed. Returns (model, tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise SourceError(f"{folder} is not a model folder (no config.json); give the --out folder of "
                          "`edge-mla convert`")
    config = AutoConfig.from_pretrained(folder)
    mla = getattr(config, "mla", None)
    if not mla:
        raise SourceError(f"{folder} is not an MLA model (its config.json has no 'mla' section); "
                          "convert it first with `edge-mla convert`")
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    install_mla(model, mla)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise SourceError(f"{folder} holds no .safetensors weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SourceError(f"{folder}: weights do not match its config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)
