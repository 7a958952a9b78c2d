"""What an output is: the source model, the conversion plan, the bits, the calibration text and the versions of
everything that made it. Written into the GGUF (general.* and edge_mla.* keys), the ONNX metadata file and
report.json, so a file found later says where it came from."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

PACKAGES = ("edge-mla", "torch", "transformers", "onnx", "onnxruntime", "gguf", "llama-cpp-python")


def versions() -> dict:
    """Installed versions (None when a package is absent), read without importing anything heavy."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def model_name(source: str | None) -> str:
    """A model's own name: the built-in's released name, a hub id's or folder's last part, a .gguf file's stem."""
    from edge_mla.source import BUILTIN

    if not source:
        return "unknown"
    if source in BUILTIN:
        return BUILTIN[source]["name"]
    name = Path(str(source).rstrip("/")).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def record(source: str | None, *, mla: dict | None = None, bits: int | None = None, kv_bits: int | None = None,
           calibration: str | None = None) -> dict:
    return {"source": source, "model_name": model_name(source), "plan": (mla or {}).get("plan"),
            "latent_dim": (mla or {}).get("latent_dim"), "rope_dim": (mla or {}).get("rope_dim"),
            "bits": bits, "kv_bits": kv_bits, "calibration": calibration, "versions": versions()}
