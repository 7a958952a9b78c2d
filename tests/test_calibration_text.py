"""What calibration reads: windows balanced over kinds of text (the built-in mixture or the user's files), spread
over each, any prefix balanced; JSONL read as text or as chat in the model's template; bad files refused clearly."""
from __future__ import annotations

import json

import pytest

from edge_mla import data
from conftest import bpe_tokenizer, corpus


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def kind_files(tmp_path, tokenizer, sizes=(2000, 6000, 900)):
    """One text file per kind, each of a vocabulary of its own (told apart by its first word), different lengths."""
    files = []
    for i, n_words in enumerate(sizes):
        words = corpus(n_words, seed=i).split()
        files.append(tmp_path / f"kind{i}.txt")
        files[-1].write_text(" ".join(f"{w}" for w in words))
    return [str(f) for f in files]


def source_of(window, tokenizer, files) -> int:
    """Which file a window was cut from: the one whose token ids contain it."""
    ids = window.tolist()
    for i, f in enumerate(files):
        whole = tokenizer(open(f).read(), add_special_tokens=False).input_ids
        if any(whole[j:j + len(ids)] == ids for j in range(0, len(whole) - len(ids) + 1)):
            return i
    raise AssertionError("window from no file")


def test_windows_are_balanced_over_the_files_and_any_prefix_too(tmp_path, tokenizer):
    files = kind_files(tmp_path, tokenizer)
    windows = data.calibration_windows(tokenizer, files, count=6, length=64)
    assert windows.shape == (6, 64)
    sources = [source_of(w, tokenizer, files) for w in windows]
    assert sorted(sources) == [0, 0, 1, 1, 2, 2]
    assert sorted(sources[:3]) == [0, 1, 2]  # interleaved: the first windows already cover every kind
    fewer = data.calibration_windows(tokenizer, files, count=3, length=64)
    assert sorted(source_of(w, tokenizer, files) for w in fewer) == [0, 1, 2]


def test_a_short_text_gives_what_it_holds_and_the_others_fill_the_count(tmp_path, tokenizer):
    files = kind_files(tmp_path, tokenizer, sizes=(3000, 3000, 60))  # the last holds at most one window
    held = len(tokenizer(open(files[2]).read(), add_special_tokens=False).input_ids) // 64
    windows = data.calibration_windows(tokenizer, files, count=9, length=64)
    sources = [source_of(w, tokenizer, files) for w in windows]
    assert len(windows) == 9 and sources.count(2) == held and sources.count(0) + sources.count(1) == 9 - held


def test_windows_spread_over_a_long_text_not_its_first_pages(tmp_path, tokenizer):
    files = kind_files(tmp_path, tokenizer, sizes=(8000,))
    everything = data.token_windows(tokenizer, open(files[0]).read(), 64)
    picked = data.calibration_windows(tokenizer, files, count=4, length=64)
    rows = [next(i for i, w in enumerate(everything) if w.tolist() == p.tolist()) for p in picked]
    assert rows[0] == 0 and rows[-1] == len(everything) - 1 and rows == sorted(rows)


def test_jsonl_lines_are_text_or_chat_in_the_models_template(tmp_path, tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}")
    file = tmp_path / "mine.jsonl"
    file.write_text(json.dumps({"text": "plain words here"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "what is two and two"},
                      {"role": "assistant", "content": "four"}]}) + "\n")
    text = data.read_text_file(str(file), tokenizer)
    assert "plain words here" in text
    assert "<s>user\nwhat is two and two</s>\n<s>assistant\nfour</s>" in text


@pytest.mark.parametrize("line, expected", [("{not json", "is not JSON"), ('{"other": 1}', '"text"'),
                                            ('["a list"]', '"messages"')])
def test_bad_jsonl_names_the_line_and_the_fix(tmp_path, tokenizer, line, expected):
    file = tmp_path / "bad.jsonl"
    file.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2.*{expected}"):
        data.read_text_file(str(file), tokenizer)


def test_a_missing_file_and_too_little_text_are_refused(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.calibration_windows(tokenizer, [str(tmp_path / "nope.txt")], count=2, length=64)
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(ValueError, match="no window of 64 tokens.*--calib-length"):
        data.calibration_windows(tokenizer, [str(short)], count=2, length=64)


def test_the_built_in_mixture_leaves_the_quality_targets_check_windows_out(tmp_path, tokenizer, monkeypatch):
    """--max-quality-loss checks on the last windows of the built-in prose: no calibration window may hold them."""
    from edge_mla import target, texts

    prose, code = corpus(6000, seed=1), corpus(3000, seed=2)
    monkeypatch.setattr(texts, "fit_texts", lambda tok: {"prose": prose, "code": code})
    monkeypatch.setattr(target, "CHECK_WINDOWS", 3)
    monkeypatch.setattr(target, "CHECK_LENGTH", 64)
    prose_windows = data.token_windows(tokenizer, prose, 64)
    checked = {tuple(w.tolist()) for w in prose_windows[-3:]}
    picked = data.calibration_windows(tokenizer, None, count=len(prose_windows) * 2, length=64)
    assert not checked & {tuple(w.tolist()) for w in picked}
    assert {tuple(w.tolist()) for w in prose_windows[:-3]} <= {tuple(w.tolist()) for w in picked}
