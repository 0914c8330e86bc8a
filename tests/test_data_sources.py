"""Reading DATA_URIs: a repository with .gitignore files and bad files, JSONL with bad lines, paragraphs."""

from __future__ import annotations

import json
import os

import pytest

from dllmd.data import DataError, read_samples
from dllmd.data.ignore import PathPatterns

LIMIT = 4096


def write(path, content: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    write(root / ".gitignore", "# build output\n*.log\n!keep.log\nbuild/\n/top-only.txt\n")
    write(root / "README.md", "# Demo\n\nA small repository.\n")
    write(root / "debug.log", "ignored by *.log\n")
    write(root / "keep.log", "re-included by !keep.log\n")
    write(root / "top-only.txt", "ignored: /top-only.txt is anchored to the root\n")
    write(root / "docs" / "top-only.txt", "kept: the anchored pattern does not reach here\n")
    write(root / "build" / "out.txt", "ignored with its directory\n")
    write(root / "src" / ".gitignore", "generated/\n*.tmp\n")
    write(root / "src" / "app.py", "def main():\n    return 42\n")
    write(root / "src" / "scratch.tmp", "ignored by the nested .gitignore\n")
    write(root / "src" / "generated" / "table.py", "TABLE = []\n")
    write(root / "src" / "empty.py", "\n")
    write(root / ".git" / "config", "[core]\n")
    write(root / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    write(root / "huge.txt", "x" * (LIMIT + 1))
    os.symlink(root / "README.md", root / "link.md")
    os.symlink(root / "src", root / "linked-dir")
    return root


def test_a_repository_gives_one_sample_per_text_file_and_reports_the_rest(repo):
    result = read_samples(str(repo), max_sample_bytes=LIMIT)

    assert [s.id for s in result.samples] == [
        ".gitignore", "README.md", "keep.log", "docs/top-only.txt", "src/.gitignore", "src/app.py"]
    assert result.samples[5].text == "def main():\n    return 42\n"
    assert {(s.where, s.kind) for s in result.skipped} == {
        ("huge.txt", "too-large"), ("latin1.txt", "not-utf8"), ("link.md", "not-regular"),
        ("linked-dir", "not-regular"), ("logo.png", "binary"), ("src/empty.py", "empty")}
    assert "convert it to UTF-8" in next(s.reason for s in result.skipped if s.kind == "not-utf8")
    assert "4.0 KiB sample limit" in next(s.reason for s in result.skipped if s.kind == "too-large")


def test_include_and_exclude_are_gitignore_style_patterns(repo):
    assert [s.id for s in read_samples(str(repo), include=["*.py"]).samples] == ["src/app.py"]
    assert [s.id for s in read_samples(str(repo), include=["docs/**"]).samples] == ["docs/top-only.txt"]
    ids = [s.id for s in read_samples(str(repo), exclude=["src/", "*.md"], max_sample_bytes=LIMIT).samples]
    assert ids == [".gitignore", "keep.log", "docs/top-only.txt"]


def test_reading_is_deterministic_and_file_uris_name_the_same_path(repo):
    first = read_samples(str(repo), max_sample_bytes=LIMIT)
    again = read_samples(f"file://{repo}", max_sample_bytes=LIMIT)
    assert first == again


@pytest.mark.parametrize("pattern, path, is_dir, expected", [
    ("*.py", "a/b/c.py", False, True),
    ("*.py", "a/b/c.pyc", False, None),
    ("build/", "build", True, True),
    ("build/", "build", False, None),  # a trailing slash matches directories only
    ("/top", "top", False, True),
    ("/top", "a/top", False, None),  # anchored to the file's directory
    ("a/*.txt", "a/x.txt", False, True),
    ("a/*.txt", "a/b/x.txt", False, None),  # * does not cross a slash
    ("**/cache", "x/y/cache", True, True),
    ("**/cache", "cache", True, True),
    ("a/**/z", "a/z", False, True),
    ("a/**/z", "a/b/c/z", False, True),
    ("docs/**", "docs/x/y.md", False, True),
    ("docs/**", "docs", True, None),
    ("file?.[ch]", "file1.c", False, True),
    ("file?.[!ch]", "file1.c", False, None),
    ("\\#notes", "#notes", False, True),
    ("# a comment", "# a comment", False, None),
])
def test_ignore_patterns_follow_git(pattern, path, is_dir, expected):
    assert PathPatterns([pattern]).match(path, is_dir) is expected


def test_a_directory_is_judged_as_itself_not_by_its_contents():
    patterns = PathPatterns(["docs/**", "!docs/keep.md"])  # docs stays walked, so keep.md comes back
    assert patterns.match("docs", True) is None and patterns.match("docs/sub", True) is True
    assert patterns.match("docs/keep.md", False) is False and patterns.match("docs/other.md", False) is True
    assert not PathPatterns(["# only a comment", ""]) and PathPatterns(["*.py"])


def test_the_last_matching_ignore_pattern_wins():
    patterns = PathPatterns(["*.log", "!keep.log", "keep.log"])
    assert patterns.match("keep.log", False) is True
    assert PathPatterns(["*.log", "!keep.log"]).match("keep.log", False) is False


def jsonl(tmp_path, *lines, name="data.jsonl"):
    return str(write(tmp_path / name, "\n".join(lines) + "\n"))


def test_jsonl_records_become_samples_and_bad_lines_are_reported_with_their_line_numbers(tmp_path):
    path = jsonl(
        tmp_path,
        json.dumps({"text": "first"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 17}),
        "",
        json.dumps({"id": "doc-a", "text": "with its own id"}),
        json.dumps({"id": "doc-a", "text": "the same id again"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "y" * LIMIT}),
        json.dumps({"id": 9, "text": "last"}),
    )
    result = read_samples(path, max_sample_bytes=LIMIT)

    assert [(s.id, s.text) for s in result.samples] == [
        ("data.jsonl:1", "first"), ("doc-a", "with its own id"), ("9", "last")]
    assert [(s.where, s.kind) for s in result.skipped] == [
        ("data.jsonl:2", "invalid-json"), ("data.jsonl:3", "missing-field"), ("data.jsonl:4", "bad-field"),
        ("data.jsonl:7", "duplicate-id"), ("data.jsonl:8", "bad-field"), ("data.jsonl:9", "too-large")]
    assert "line 4: 'text' is a JSON number, not a string" in result.skipped[2].reason
    assert "of line 6" in result.skipped[3].reason


def test_strict_makes_a_bad_jsonl_line_an_error_naming_its_line(tmp_path):
    path = jsonl(tmp_path, json.dumps({"text": "fine"}), json.dumps({"text": "fine too"}), "{oops")
    with pytest.raises(DataError, match=r"data.jsonl:3: line 3 is not valid JSON .*--strict"):
        read_samples(path, strict=True)


def test_another_field_can_hold_the_text(tmp_path):
    path = jsonl(tmp_path, json.dumps({"content": "a"}), json.dumps({"content": "b"}))
    assert [s.text for s in read_samples(path, field="content").samples] == ["a", "b"]
    with pytest.raises(DataError, match="no 'text' field: choose the text field with --field"):
        read_samples(path)


def test_an_enormous_line_is_skipped_while_streaming(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "before"}\n{"text": "')
        f.write(b"z" * (8 * 2**20))  # 8 MiB on one line, against a 64 KiB limit
        f.write(b'"}\n{"text": "after"}\n')
    result = read_samples(str(path), max_sample_bytes=64 * 2**10)
    assert [s.text for s in result.samples] == ["before", "after"]
    assert [(s.where, s.kind) for s in result.skipped] == [("big.jsonl:2", "too-large")]


def test_a_text_file_gives_one_sample_per_paragraph(tmp_path):
    path = write(tmp_path / "notes.txt", "First paragraph,\ntwo lines.\n\n\nSecond.\n   \nThird\nand last.")
    result = read_samples(f"file://{path}")
    assert [(s.id, s.text) for s in result.samples] == [
        ("notes.txt:#1", "First paragraph,\ntwo lines."), ("notes.txt:#5", "Second."),
        ("notes.txt:#7", "Third\nand last.")]


def test_an_oversized_paragraph_is_reported_with_its_lines(tmp_path):
    path = write(tmp_path / "notes.txt", "short\n\n" + "long line\n" * 100 + "\nshort again\n")
    result = read_samples(str(path), max_sample_bytes=500)
    assert [s.id for s in result.samples] == ["notes.txt:#1", "notes.txt:#104"]
    assert [(s.where, s.kind) for s in result.skipped] == [("notes.txt:#3", "too-large")]
    assert "lines 3-102" in result.skipped[0].reason


@pytest.mark.parametrize("setup, uri, message", [
    (lambda tmp: (tmp / "empty").mkdir(), "{tmp}/empty", "no text samples in .*empty: it holds no file"),
    (lambda tmp: write(tmp / "bin" / "a.bin", b"\x00\x01"), "{tmp}/bin", r"1 binary\), e.g. a.bin: a binary file"),
    (lambda tmp: write(tmp / "blob.txt", b"\x00\x01"), "{tmp}/blob.txt", "no text samples .*binary"),
    (lambda tmp: None, "{tmp}/missing", "does not exist"),
    (lambda tmp: None, "https://example.com/data.jsonl", "only local paths and file:// URIs"),
    (lambda tmp: None, "file://otherhost/data.jsonl", "must be local"),
])
def test_unusable_input_raises_a_clear_data_error(tmp_path, setup, uri, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        read_samples(uri.format(tmp=tmp_path))


def test_a_file_removed_while_the_walk_reads_the_source_is_reported_as_vanished(tmp_path, monkeypatch):
    from dllmd.data import sources

    root = tmp_path / "repo"
    for name in ("a.py", "b.py", "c.py"):
        write(root / name, f"# {name}\n")
    read_file = sources._read_file

    def removed_first(path, rel, limit):  # another process deletes b.py after the walk listed it
        if rel == "b.py":
            path.unlink()
        return read_file(path, rel, limit)

    monkeypatch.setattr(sources, "_read_file", removed_first)
    result = read_samples(str(root))
    assert [s.id for s in result.samples] == ["a.py", "c.py"]
    [skipped] = result.skipped
    assert (skipped.where, skipped.kind) == ("b.py", "vanished") and "counts as removed" in skipped.reason
