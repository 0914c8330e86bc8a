"""The storage primitives: chunked, sha256-checked, resumable receives; atomic directory replacement
(with renameat2 and with the rename-aside fallback), including crashes between the steps."""

from __future__ import annotations

import hashlib
import os

import pytest

from dllmd.net.identity import Identity
from dllmd.storage import (DigestMismatch, StagedFile, StagingError, TooManyBytes, WrongOffset, atomic_write,
                           recover_directories, remove_directory, replace_directory, sha256_file, swap)
from dllmd.storage.signed import canonical_json, read_signature, signed_by, write_signed

BLOB = bytes(range(256)) * 20
SHA = hashlib.sha256(BLOB).hexdigest()


def staged_file(tmp_path, blob=BLOB, sha=SHA) -> StagedFile:
    return StagedFile(tmp_path / ".incoming" / "f.part", tmp_path / "sub" / "f.bin", len(blob), sha, "f.bin")


def test_chunks_are_published_only_when_complete_and_verified(tmp_path):
    staged = staged_file(tmp_path)
    assert staged.received == 0 and not staged.published
    assert staged.append(0, BLOB[:1000]) == 1000
    assert not staged.target.exists()
    assert staged.append(1000, BLOB[1000:]) == len(BLOB)
    assert staged.target.read_bytes() == BLOB and not staged.part.exists()
    assert staged.published and sha256_file(staged.target) == SHA


def test_a_receive_resumes_from_the_bytes_already_there(tmp_path):
    staged_file(tmp_path).append(0, BLOB[:700])
    again = staged_file(tmp_path)  # e.g. after a restart: the part file is the only state
    assert again.resume() == 700
    assert again.append(700, BLOB[700:]) == len(BLOB)


def test_a_complete_part_left_by_a_crash_is_published_on_resume(tmp_path):
    staged = staged_file(tmp_path)
    staged.part.parent.mkdir(parents=True)
    staged.part.write_bytes(BLOB)  # the last byte arrived, the rename did not happen
    assert staged.resume() == len(BLOB) and staged.target.read_bytes() == BLOB


def test_an_empty_file_is_published_on_resume(tmp_path):
    empty = StagedFile(tmp_path / "e.part", tmp_path / "e", 0, hashlib.sha256(b"").hexdigest(), "e")
    assert empty.resume() == 0 and empty.target.read_bytes() == b""


def test_a_wrong_offset_says_where_to_resume(tmp_path):
    staged = staged_file(tmp_path)
    staged.append(0, BLOB[:100])
    for offset in (0, 50, 101):
        with pytest.raises(WrongOffset, match="resume from 100") as exc:
            staged.append(offset, BLOB[offset:offset + 10])
        assert exc.value.have == 100
    assert staged.received == 100
    with pytest.raises(StagingError, match="empty chunk"):
        staged.append(100, b"")


def test_bytes_beyond_the_declared_size_are_refused(tmp_path):
    staged = staged_file(tmp_path)
    with pytest.raises(TooManyBytes, match=f"more bytes than the {len(BLOB)}"):
        staged.append(0, BLOB + b"x")
    assert staged.received == 0


def test_a_sha256_mismatch_deletes_the_bytes(tmp_path):
    bad = bytearray(BLOB)
    bad[7] ^= 1
    staged = staged_file(tmp_path)
    with pytest.raises(DigestMismatch, match="f.bin does not match its sha256"):
        staged.append(0, bytes(bad))
    assert staged.received == 0 and not staged.target.exists()
    signed = StagedFile(tmp_path / "s.part", tmp_path / "s", len(BLOB), SHA, "s", signed=True)
    with pytest.raises(DigestMismatch, match="s does not match its signed sha256"):
        signed.append(0, bytes(bad))


# --- directory replacement -------------------------------------------------------------------------

def make_dir(path, content: str):
    path.mkdir(parents=True)
    (path / "data").write_text(content)
    (path / "nested").mkdir()
    (path / "nested" / "more").write_text(content * 2)
    return path


def content(path) -> str | None:
    if not path.exists():
        return None
    assert (path / "nested" / "more").read_text() == (path / "data").read_text() * 2  # never a mix
    return (path / "data").read_text()


def leftovers(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


@pytest.fixture(params=["exchange", "fallback"])
def mode(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(swap, "_renameat2", None)
    elif swap._renameat2 is None:
        pytest.skip("renameat2 is not available here")
    return request.param


def test_a_new_directory_is_published_and_an_old_one_replaced(tmp_path, mode):
    target = tmp_path / "root" / "ds"
    replace_directory(make_dir(tmp_path / "stage" / "a", "old"), target)
    assert content(target) == "old"
    replace_directory(make_dir(tmp_path / "stage" / "b", "new"), target)
    assert content(target) == "new"
    assert leftovers(tmp_path / "root") == [] and not (tmp_path / "stage" / "b").exists()


def test_exchange_is_used_where_available(tmp_path):
    if swap._renameat2 is None:
        pytest.skip("renameat2 is not available here")
    a, b = make_dir(tmp_path / "a", "A"), make_dir(tmp_path / "b", "B")
    assert swap.exchange(a, b) and content(a) == "B" and content(b) == "A"


def test_an_unsupported_exchange_falls_back(tmp_path, monkeypatch):
    import errno

    def refuse(*_args):
        swap.ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(swap, "_renameat2", refuse)
    target = make_dir(tmp_path / "t", "old")
    replace_directory(make_dir(tmp_path / "s", "new"), target)
    assert content(target) == "new" and leftovers(tmp_path) == []


class Crash(Exception):
    pass


def crash_on_rename(monkeypatch, number: int):
    """Make the ``number``-th os.rename inside swap.py raise (a crash at that point)."""
    real, calls = os.rename, [0]

    def rename(src, dst):
        calls[0] += 1
        if calls[0] == number:
            raise Crash(f"crash before rename {number}")
        real(src, dst)

    monkeypatch.setattr(swap.os, "rename", rename)
    return lambda: monkeypatch.setattr(swap.os, "rename", real)


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_a_crash_at_any_step_keeps_the_old_or_the_new_directory(tmp_path, monkeypatch, mode, step):
    # Renames: exchange mode: staged -> trash, (exchange); fallback: staged -> trash, target -> aside,
    # trash -> target, aside -> trash.
    target = make_dir(tmp_path / "root" / "ck", "old")
    restore = crash_on_rename(monkeypatch, step)
    try:
        replace_directory(make_dir(tmp_path / "stage", "new"), target)
        crashed = False
    except Crash:
        crashed = True
    restore()
    if crashed and mode == "fallback" and step == 3:
        assert not target.exists()  # the one window where the name is empty ...
    recover_directories(tmp_path / "root")  # ... until the next use puts the old directory back
    assert content(target) in ("old", "new")
    if not crashed:
        assert content(target) == "new"
    assert leftovers(tmp_path / "root") == []


def test_a_crash_inside_the_exchange_keeps_the_old_directory(tmp_path, monkeypatch):
    def fail(*_args):
        raise Crash("power cut")

    monkeypatch.setattr(swap, "exchange", fail)
    target = make_dir(tmp_path / "root" / "ck", "old")
    with pytest.raises(Crash):
        replace_directory(make_dir(tmp_path / "stage", "new"), target)
    assert content(target) == "old"
    assert recover_directories(tmp_path / "root") == ["ck"] and leftovers(tmp_path / "root") == []


def test_a_removal_is_never_undone_by_recovery(tmp_path):
    target = make_dir(tmp_path / "ds", "v1")
    make_dir(tmp_path / ".ds.old", "v0")  # left by a crash after a fallback swap had completed
    assert remove_directory(target) and not remove_directory(target)
    recover_directories(tmp_path)
    assert not target.exists() and leftovers(tmp_path) == []


def test_an_aside_directory_is_put_back_when_the_name_is_empty(tmp_path):
    make_dir(tmp_path / ".ds.old", "old")
    make_dir(tmp_path / ".ds.swap-0a1b2c3d", "half")
    assert recover_directories(tmp_path) == ["ds"]
    assert content(tmp_path / "ds") == "old" and leftovers(tmp_path) == []


# --- signed documents ------------------------------------------------------------------------------

def test_a_signed_document_verifies_only_in_its_canonical_form(tmp_path):
    key = Identity.generate()
    document = {"b": [1, 2], "a": {"z": "é", "y": 1.5}}
    blob = write_signed(tmp_path / "m.json", tmp_path / "m.sig", document, key)
    assert blob == canonical_json(document) == (tmp_path / "m.json").read_bytes()
    signature = read_signature(tmp_path / "m.sig")
    assert signed_by(blob, signature, key.public_key, document)
    assert not signed_by(blob, signature, Identity.generate().public_key, document)
    assert not signed_by(blob, signature, key.public_key, {**document, "b": [1]})
    spaced = b'{"a": {"y": 1.5, "z": "\\u00e9"}, "b": [1, 2]}'
    assert not signed_by(spaced, key.sign(spaced), key.public_key, document)


def test_atomic_write_still_works_from_the_package(tmp_path):
    atomic_write(tmp_path / "x" / "y", b"data")
    assert (tmp_path / "x" / "y").read_bytes() == b"data"
