"""Signed JSON documents (model manifests, checkpoint manifests), one format for all of them:
the document is stored as its canonical JSON bytes (sorted keys, no spaces, ASCII), and an Ed25519
signature over exactly those bytes is stored as hex in a ``.sig`` file next to it.

Only the canonical encoding is accepted, so one document has exactly one signed form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from dllmd.net.identity import verify_signature


class Signer(Protocol):
    public_key: str

    def sign(self, data: bytes) -> bytes: ...


def canonical_json(document: Any) -> bytes:
    """The bytes a document is stored and signed as."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def json_object(blob: bytes, what: str, error: type[Exception]) -> dict:
    """``blob`` parsed as a JSON object, or ``error`` saying why it is not one (hostile input included:
    nesting too deep for the parser is refused like any other malformed document)."""
    try:
        data = json.loads(blob)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} is malformed: not a JSON object")
    return data


def write_signed(json_path: Path, sig_path: Path, document: Any, signer: Signer) -> bytes:
    """Write ``document`` canonically and its signature by ``signer``; returns the signed bytes. The
    caller makes them durable (they are written into a directory that is published whole)."""
    blob = canonical_json(document)
    Path(json_path).write_bytes(blob)
    Path(sig_path).write_text(signer.sign(blob).hex())
    return blob


def read_signature(sig_path: Path) -> bytes:
    """The signature stored in ``sig_path``; raises OSError or ValueError when missing or not hex."""
    return bytes.fromhex(Path(sig_path).read_text().strip())


def signed_by(blob: bytes, signature: bytes, public_key: str, document: Any) -> bool:
    """True when ``blob`` is the canonical encoding of ``document`` and ``signature`` over it was made by
    the holder of ``public_key``."""
    return blob == canonical_json(document) and verify_signature(public_key, blob, signature)
