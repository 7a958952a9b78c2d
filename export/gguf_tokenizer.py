"""GGUF tokenizer keys: every tokenizer.* key, copied from the GGUF the model came from (the vocab loader does not
depend on the architecture) or built from a Hugging Face tokenizer with gguf-py's vocab helpers."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf
from gguf import GGUFValueType

# Split patterns of byte-level BPE tokenizers, and the names llama.cpp gives their pre-tokenizers.
KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


Field = tuple  # (key, value, GGUFValueType, sub_type or None)


def tokenizer_fields_from_gguf(path: Path, n_vocab: int) -> list[Field]:
    """Every tokenizer.* key of a GGUF, values and types as they are (the vocab loader ignores the arch)."""
    reader = gguf.GGUFReader(path)
    fields = []
    for name, f in reader.fields.items():
        if name.startswith("tokenizer."):
            main = f.types[0]
            fields.append((name, f.contents(), main, f.types[-1] if main == GGUFValueType.ARRAY else None))
    tokens = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.ggml.tokens); give another --tokenizer-gguf")
    if len(tokens) != n_vocab:
        raise ValueError(f"the tokenizer in {path} has {len(tokens)} tokens but the model's embedding has {n_vocab} "
                         "rows: it is not this model's tokenizer; give the right --tokenizer-gguf")
    return fields


def guess_pre(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, when its pre-tokenizer is a known one."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return KNOWN_SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def tokenizer_fields_from_hf(folder: Path, n_vocab: int, pre: str | None = None) -> list[Field]:
    """tokenizer.* keys from HF tokenizer files, the way llama.cpp's converter builds them for byte-level BPE."""
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except FileNotFoundError:
        raise ValueError(f"{folder}: only byte-level BPE (GPT-2 style) HF tokenizers can be written to GGUF here. "
                         "Give --tokenizer-gguf FILE, a GGUF of the source model, to copy its tokenizer") from None
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = pre or guess_pre(tokenizer_json)
    if pre is None:
        raise ValueError(f"{folder}: cannot tell which llama.cpp pre-tokenizer this tokenizer uses; pass "
                         "--tokenizer-pre NAME (the name llama.cpp's convert_hf_to_gguf.py gives it) or "
                         "--tokenizer-gguf FILE")
    tokens, types = [], []
    for text, _score, token_type in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        types.append(int(token_type))
    # Added tokens that duplicate vocab entries come out NORMAL; llama.cpp needs specials as CONTROL.
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special")
                                     else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_vocab:
        raise ValueError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than the model's {n_vocab} "
                         "embedding rows")
    for i in range(len(tokens), n_vocab):  # embedding rows past the tokenizer (padding), as llama.cpp does
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.USER_DEFINED))
    scratch = gguf.GGUFWriter(None, "llama")
    scratch.add_tokenizer_model(vocab.tokenizer_model)
    scratch.add_tokenizer_pre(pre)
    scratch.add_token_list(tokens)
    scratch.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab).add_to_gguf(scratch, quiet=True)
    return [(k, v.value, v.type, v.sub_type) for k, v in scratch.kv_data[0].items() if k.startswith("tokenizer.")]


def tokenizer_fields(loaded, n_vocab: int, tokenizer_gguf: str | None, pre: str | None) -> list[Field]:
    if tokenizer_gguf:
        return tokenizer_fields_from_gguf(Path(tokenizer_gguf), n_vocab)
    if loaded.tokenizer_gguf is not None:
        return tokenizer_fields_from_gguf(loaded.tokenizer_gguf, n_vocab)
    if loaded.folder is not None and (loaded.folder / "tokenizer.json").exists():
        return tokenizer_fields_from_hf(loaded.folder, n_vocab, pre)
    if loaded.tokenizer is None:
        raise ValueError("the model has no tokenizer; give --tokenizer-gguf FILE")
    with tempfile.TemporaryDirectory() as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        return tokenizer_fields_from_hf(Path(tmp), n_vocab, pre)
