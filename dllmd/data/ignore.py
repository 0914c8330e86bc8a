"""Gitignore-style path patterns: for ``.gitignore`` files and for ``--include`` / ``--exclude``.

The rules of git's own matcher that matter for a source tree:

* ``*`` and ``?`` never cross a ``/``; ``[a-z]`` / ``[!a-z]`` are character classes;
* ``**/`` at the start or ``/**/`` inside match any number of directories, ``/**`` at the end
  everything inside;
* a pattern with a ``/`` at its start or middle is anchored to the directory of its file (a leading
  ``/`` is dropped); one without matches a name at any depth;
* a trailing ``/`` matches directories only; ``!`` re-includes what an earlier pattern excluded;
* the last matching pattern wins; ``#`` starts a comment; ``\\`` escapes ``!``, ``#``, a trailing space.

A path inside an excluded directory cannot be re-included (git does not descend there either):
walkers prune excluded directories, so this module only ever judges one path at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern
    negate: bool
    dir_only: bool
    anchored: bool  # matched against the whole relative path; otherwise against the last name only


class PathPatterns:
    """Patterns of one file (or one command line), relative to one directory."""

    def __init__(self, lines: list[str] | tuple[str, ...]):
        self._rules = [rule for rule in map(_parse, lines) if rule is not None]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, rel_path: str, is_dir: bool) -> bool | None:
        """True when the last matching pattern excludes ``rel_path`` (posix, relative to the patterns'
        directory), False when it is a ``!`` pattern, None when no pattern matches."""
        name = rel_path.rsplit("/", 1)[-1]
        verdict = None
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(rel_path if rule.anchored else name):
                verdict = not rule.negate
        return verdict


def _parse(line: str) -> _Rule | None:
    line = line.rstrip("\n").rstrip("\r")
    line = _strip_unescaped_trailing_spaces(line)
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    elif line.startswith(("\\!", "\\#")):
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchored = "/" in line
    return _Rule(re.compile(_glob_to_regex(line.lstrip("/"))), negate, dir_only, anchored)


def _strip_unescaped_trailing_spaces(line: str) -> str:
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        return stripped[:-1] + " "
    return stripped


def _glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        at_segment_start = i == 0 or glob[i - 1] == "/"
        if at_segment_start and glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif at_segment_start and glob.startswith("**", i) and i + 2 == len(glob):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (close := _class_end(glob, i)) > 0:
            out.append(_char_class(glob[i + 1:close]))
            i = close + 1
        elif glob[i] == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _class_end(glob: str, start: int) -> int:
    """Index of the ``]`` closing the class opened at ``start``, or -1 (then ``[`` is a literal)."""
    i = start + 1
    if i < len(glob) and glob[i] in "!^":
        i += 1
    if i < len(glob) and glob[i] == "]":  # a leading ] is a member, as in fnmatch
        i += 1
    return glob.find("]", i)


def _char_class(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    members = "".join(c if c == "-" else re.escape(c) for c in body)
    # Like * and ?, a class never matches the separator.
    return f"[^/{members}]" if negate else f"(?!/)[{members}]"
