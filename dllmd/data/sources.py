"""Text samples from a DATA_URI: a directory (a code repository), a JSONL file or a plain text file.

* A directory: every file is one sample, id = its path relative to the root (posix). Files are
  visited in sorted order (each directory's files, then its subdirectories), so the same tree always
  gives the same samples in the same order. ``.git`` (and ``.hg``, ``.svn``) is never entered;
  ``.gitignore`` files are honoured at the root and below; symbolic links are not followed.
* ``*.jsonl`` / ``*.ndjson``: one sample per record, its text in ``field``; id = the record's ``id``
  (a string or an integer) or ``NAME:LINE``.
* Any other file: one sample per paragraph (lines separated by blank lines), id ``NAME:#LINE`` with
  the paragraph's first line.

Every file the patterns select, record and paragraph either becomes a sample or is listed in
``SourceResult.skipped`` with why: nothing is printed, and nothing is dropped silently. ``strict``
makes a malformed record or paragraph (invalid JSON, a missing or non-string field, a duplicate id,
an oversized or undecodable line) an error instead; files a directory walk passes over (binaries,
oversized files) are never errors, since a repository is expected to hold some.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence
from urllib.parse import unquote, urlparse

from dllmd.data.errors import DataError, PathForbidden
from dllmd.data.ignore import PathPatterns

DEFAULT_MAX_SAMPLE_BYTES = 10 * 2**20
BINARY_SNIFF_BYTES = 8192  # git's own heuristic: a NUL byte early in the file means binary
VCS_DIRS = frozenset({".git", ".hg", ".svn"})
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DRAIN_CHUNK = 2**20


@dataclass(frozen=True)
class Sample:
    id: str
    """Stable across runs: a relative path, a record id, ``NAME:LINE`` or ``NAME:#LINE``."""
    text: str


@dataclass(frozen=True)
class Skipped:
    where: str
    """A path relative to the root, or ``NAME:LINE`` in a JSONL or text file."""
    kind: str
    """binary, not-utf8, too-large, empty, unreadable, vanished (removed while being read), not-regular
    (a link, a device ...), invalid-json, missing-field, bad-field (not a string, or a record that is
    no object), duplicate-id."""
    reason: str
    """A sentence for the user: what is wrong and what to do."""


@dataclass
class SourceResult:
    samples: list[Sample]
    skipped: list[Skipped] = dataclass_field(default_factory=list)


def read_samples(uri: str, *, field: str = "text", include: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), strict: bool = False,
                 max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> SourceResult:
    """The samples at ``uri`` (a path or a ``file://`` URI) and the items skipped, with reasons.

    ``include`` / ``exclude`` are gitignore-style patterns relative to a directory root (``*.py``,
    ``src/**/*.rs``, ``tests/``); without ``include`` every text file is read. ``field`` names the text
    of a JSONL record. No sample may be larger than ``max_sample_bytes``: a bigger file, line or
    paragraph is skipped without being read into memory. Raises :class:`DataError` when ``uri``
    cannot be read or yields no sample at all.
    """
    if max_sample_bytes < 1:
        raise DataError(f"the sample size limit must be positive, not {max_sample_bytes}")
    path = local_path(uri)
    report = _Report(strict)
    if path.is_dir():
        samples = _read_directory(path, include, exclude, max_sample_bytes, report)
    elif path.is_file():
        with _open(path) as stream:
            if path.suffix.lower() in JSONL_SUFFIXES:
                samples = list(_read_jsonl(stream, path.name, field, max_sample_bytes, report))
            else:
                samples = list(_read_paragraphs(stream, path.name, max_sample_bytes, report))
    elif path.exists():
        raise DataError(f"{path} is neither a directory nor a regular file")
    else:
        raise DataError(f"{path} does not exist; give a directory, a .jsonl file or a text file")
    if not samples:
        raise _no_samples(uri, report.skipped, field)
    return SourceResult(samples, report.skipped)


def local_path(uri: str) -> Path:
    """The path a DATA_URI names: a plain path or ``file://[localhost]/path``; anything else is refused."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"{uri} names the host {parsed.netloc!r}; a file:// URI must be local (file:///path)")
        return Path(unquote(parsed.path))
    if len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise DataError(f"cannot read {uri}: only local paths and file:// URIs are supported; "
                        "download the data first and give its path")
    return Path(uri).expanduser()


def path_under(uri: str, roots: Sequence[Path]) -> Path:
    """The real path ``uri`` names (symlinks and ``..`` resolved) if it lies under one of ``roots``
    (already resolved); :class:`PathForbidden` otherwise, whether or not it exists, so a refusal
    says nothing about what is outside. A node reads what its owner allowed, not what its process can."""
    path = local_path(uri)
    if not path.is_absolute():  # relative to the daemon's working directory: nobody means that
        raise PathForbidden(f"{uri} is not an absolute path; give the full path on the node")
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none: data_roots = []"
        raise PathForbidden(f"{uri} is outside the directories this node reads data from ({allowed}); its owner "
                            f"can add one to data_roots in node.toml")
    return real


class _Report:
    """Collects what was skipped; in strict mode a malformed record is an error instead."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped: list[Skipped] = []

    def skip(self, where: str, kind: str, reason: str) -> None:
        self.skipped.append(Skipped(where, kind, reason))

    def malformed(self, where: str, kind: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason}; fix or remove it, or leave out --strict to skip such records")
        self.skip(where, kind, reason)


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None


# -- a directory: one sample per file -------------------------------------------------------------

def _read_directory(root: Path, include: Sequence[str] | None, exclude: Sequence[str], limit: int,
                    report: _Report) -> list[Sample]:
    included = PathPatterns(list(include)) if include else None
    excluded = PathPatterns(list(exclude))
    gitignores: dict[str, PathPatterns] = {}

    def ignored(rel: str, is_dir: bool) -> bool:
        return excluded.match(rel, is_dir) is True or _gitignored(rel, is_dir, gitignores)

    def unreadable(exc: OSError) -> None:
        report.skip(_relative(root, exc.filename) or ".", "unreadable", f"cannot read this directory: {exc.strerror}")

    samples = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        rel_dir = _relative(root, dirpath)
        gitignores[rel_dir] = _load_gitignore(Path(dirpath))
        kept = []
        for name in sorted(dirnames):
            rel = _join(rel_dir, name)
            if name in VCS_DIRS or ignored(rel, is_dir=True):
                continue
            if os.path.islink(os.path.join(dirpath, name)):  # os.walk lists them but does not enter them
                report.skip(rel, "not-regular", "a symbolic link (not followed, so the walk stays inside the root)")
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = _join(rel_dir, name)
            if ignored(rel, is_dir=False) or (included is not None and included.match(rel, False) is not True):
                continue
            read = _read_file(Path(dirpath, name), rel, limit)
            if isinstance(read, Sample):
                samples.append(read)
            else:
                report.skipped.append(read)
    return samples


def _gitignored(rel: str, is_dir: bool, gitignores: dict[str, PathPatterns]) -> bool:
    """Git's precedence: every .gitignore from the root down to the path's directory, the deepest last."""
    parts = rel.split("/")
    verdict = None
    for depth in range(len(parts)):
        patterns = gitignores.get("/".join(parts[:depth]))
        if patterns:
            match = patterns.match("/".join(parts[depth:]), is_dir)
            verdict = match if match is not None else verdict
    return verdict is True


def _load_gitignore(directory: Path) -> PathPatterns:
    try:
        return PathPatterns((directory / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        return PathPatterns([])


def _read_file(path: Path, rel: str, limit: int) -> Sample | Skipped:
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            return Skipped(rel, "not-regular", "a symbolic link (not followed, so the walk stays inside the root)")
        if not stat.S_ISREG(info.st_mode):
            return Skipped(rel, "not-regular", "not a regular file")
        if info.st_size > limit:
            return Skipped(rel, "too-large", f"{_size(info.st_size)}, over the {_size(limit)} sample limit; "
                                             "exclude it or raise the limit")
        data = path.read_bytes()
    except FileNotFoundError:
        # Listed by the walk, gone when read: removed meanwhile. It is treated as removed (an update
        # takes its pieces off the nodes), so say so rather than call it unreadable.
        return Skipped(rel, "vanished", "removed while shard-data was reading the source; it counts as removed "
                                        "(run shard-data again if it comes back)")
    except OSError as exc:
        return Skipped(rel, "unreadable", f"cannot read it: {exc.strerror}")
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        return Skipped(rel, "binary", "a binary file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Skipped(rel, "not-utf8", f"not UTF-8 (invalid byte at offset {exc.start}); "
                                        "convert it to UTF-8 or exclude it")
    if not text.strip():
        return Skipped(rel, "empty", "no text")
    return Sample(rel, text)


def _relative(root: Path, path: str | os.PathLike) -> str:
    rel = Path(path).relative_to(root).as_posix()
    return "" if rel == "." else rel


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


# -- JSONL and plain text: streamed line by line, so that one huge line never sits in memory -------

def _read_jsonl(stream: BinaryIO, name: str, field: str, limit: int, report: _Report) -> Iterator[Sample]:
    first_line_of: dict[str, int] = {}
    for lineno, raw in _lines(stream, limit):
        where = f"{name}:{lineno}"
        if raw is None:
            report.malformed(where, "too-large", f"line {lineno} is over the {_size(limit)} sample limit")
            continue
        if not raw.strip():
            continue  # blank lines between records are harmless
        try:
            record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            report.malformed(where, "not-utf8", f"line {lineno} is not UTF-8 (invalid byte at column {exc.start + 1})")
            continue
        except json.JSONDecodeError as exc:
            report.malformed(where, "invalid-json", f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})")
            continue
        text = _record_text(record, field, where, lineno, report)
        if text is None:
            continue
        sample_id = _record_id(record, where)
        if sample_id in first_line_of:
            report.malformed(where, "duplicate-id", f"line {lineno} repeats the id {sample_id!r} "
                                                    f"of line {first_line_of[sample_id]}")
            continue
        first_line_of[sample_id] = lineno
        yield Sample(sample_id, text)


def _record_text(record: object, field: str, where: str, lineno: int, report: _Report) -> str | None:
    if not isinstance(record, dict):
        report.malformed(where, "bad-field", f"line {lineno} is a JSON {type(record).__name__}, not an object")
        return None
    if field not in record:
        report.malformed(where, "missing-field", f"line {lineno} has no {field!r} field "
                                                 "(choose the text field with --field)")
        return None
    text = record[field]
    if not isinstance(text, str):
        report.malformed(where, "bad-field", f"line {lineno}: {field!r} is a JSON "
                                             f"{_json_type(text)}, not a string")
        return None
    if not text.strip():
        report.skip(where, "empty", f"line {lineno}: {field!r} holds no text")
        return None
    return text


def _record_id(record: dict, where: str) -> str:
    record_id = record.get("id")
    if (isinstance(record_id, str) and record_id) or (isinstance(record_id, int) and not isinstance(record_id, bool)):
        return str(record_id)
    return where


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _read_paragraphs(stream: BinaryIO, name: str, limit: int, report: _Report) -> Iterator[Sample]:
    if b"\0" in stream.read(BINARY_SNIFF_BYTES):
        report.skip(name, "binary", "a binary file, not text")
        return
    stream.seek(0)
    paragraph = _Paragraph(name, limit)
    for lineno, raw in _lines(stream, limit):
        if raw is not None and not raw.strip():
            yield from paragraph.close(report)
        else:
            paragraph.add(lineno, raw)
    yield from paragraph.close(report)


class _Paragraph:
    """The lines of the paragraph being read; forgets their text once it cannot become a sample."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self._reset()

    def _reset(self) -> None:
        self.first = self.last = 0
        self.lines: list[str] = []
        self.size = 0
        self.problem: tuple[str, str] | None = None  # (kind, reason) once the paragraph is lost

    def add(self, lineno: int, raw: bytes | None) -> None:
        self.first = self.first or lineno
        self.last = lineno
        if self.problem:
            return
        self.size += len(raw) if raw is not None else self.limit + 1
        if self.size > self.limit:
            self.problem = ("too-large", f"over the {_size(self.limit)} sample limit; "
                                         "separate it with blank lines or raise the limit")
            self.lines = []
            return
        try:
            self.lines.append(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            self.problem = ("not-utf8", f"line {lineno} is not UTF-8 (invalid byte at column {exc.start + 1})")
            self.lines = []

    def close(self, report: _Report) -> Iterator[Sample]:
        if self.first:
            where = f"{self.name}:#{self.first}"
            if self.problem:
                kind, reason = self.problem
                report.malformed(where, kind, f"the paragraph at lines {self.first}-{self.last} is {reason}"
                                 if kind == "too-large" else reason)
            else:
                yield Sample(where, "".join(self.lines).rstrip("\r\n"))
        self._reset()


def _lines(stream: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line with its newline), or None for a line over ``limit`` bytes, which is read
    through in chunks and dropped: a multi-gigabyte line costs time, not memory."""
    for lineno in itertools.count(1):
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit:
            yield lineno, line
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(_DRAIN_CHUNK)
        yield lineno, None


def _no_samples(uri: str, skipped: list[Skipped], field: str) -> DataError:
    if not skipped:
        return DataError(f"no text samples in {uri}: it holds no file or record to read "
                         "(check --include, --exclude and .gitignore)")
    kinds = Counter(item.kind for item in skipped)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    hint = (f"; the records have no {field!r} field: choose the text field with --field"
            if set(kinds) == {"missing-field"} else "")
    first = skipped[0]
    return DataError(f"no text samples in {uri}: all {len(skipped)} items were skipped ({summary}), "
                     f"e.g. {first.where}: {first.reason}{hint}")


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"
