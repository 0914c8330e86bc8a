"""Gitignore-style path patterns, for ``.gitignore`` files and for ``--include`` / ``--exclude``:
``pathspec``'s git-compatible matcher (``GitIgnoreSpec``), judged one path at a time.

Git's rules, as ``pathspec`` implements them: ``*`` and ``?`` never cross a ``/``; ``**`` spans
directories; a pattern with a ``/`` at its start or middle is anchored to its file's directory; a
trailing ``/`` matches directories only; ``!`` re-includes; the last matching pattern wins.

A path inside an excluded directory cannot be re-included (git does not descend there either):
walkers prune excluded directories, so a directory is judged as itself, never by its contents:
``docs/**`` matches everything inside ``docs`` but not ``docs``, so ``!docs/keep.md`` still works.
"""

from __future__ import annotations

from pathspec import GitIgnoreSpec


class PathPatterns:
    """Patterns of one file (or one command line), relative to one directory."""

    def __init__(self, lines: list[str] | tuple[str, ...]):
        lines = list(lines)
        self._files = GitIgnoreSpec.from_lines(lines)
        # A directory is asked about by its name without a trailing "/", so that patterns for its
        # contents ("docs/**") do not match it; directory-only patterns lose their "/" to match it.
        self._dirs = GitIgnoreSpec.from_lines([_for_directories(line) for line in lines])

    def __bool__(self) -> bool:
        return any(p.include is not None for p in self._files.patterns)  # comments and blanks are None

    def match(self, rel_path: str, is_dir: bool) -> bool | None:
        """True when the last matching pattern excludes ``rel_path`` (posix, relative to the patterns'
        directory), False when it is a ``!`` pattern, None when no pattern matches."""
        return (self._dirs if is_dir else self._files).check_file(rel_path).include


def _for_directories(line: str) -> str:
    stripped = line.rstrip("\r\n").rstrip(" ")
    if stripped.endswith("/") and not stripped.startswith("#"):
        return stripped.rstrip("/")
    return line
