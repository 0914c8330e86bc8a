"""Hostile model operations over the wire: every malformed or forged manifest, misplaced chunk and
impossible span is answered with a structured ``bad_args`` (``not_found`` for a model never offered),
never ``internal``, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch

from dllmd.models.store import MANIFEST, SIGNATURE, ModelStore
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages import models as M
from dllmd.net.messages.transfer import MAX_CHUNK_BYTES, PutArgs
from dllmd.storage.signed import canonical_json
from dllmctl.cluster.registry import NodeEntry
from dllmctl.models.deploy import deploy_span, ship_files
from dllmctl.placement.layout import Span
from tests.tiny_models import make_tiny_model

NAME = "tiny"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One daemon with an admin, and a real signed model (imported from a tiny llama) to tamper with."""
    from dllmctl.models.importer import import_model
    from tests.conftest import make_home, start_daemon

    root = tmp_path_factory.mktemp("model-ops")
    make_home(root / "home", "target")
    admin = Identity.generate()
    AuthorizedKeys(root / "home" / "authorized_keys.toml").authorize(admin.public_key, Role.ADMIN)
    daemon = start_daemon(root / "home")
    store = ModelStore(root / "models")
    manifest = import_model(make_tiny_model("llama", root / "src"), store, admin, name=NAME)
    yield {"daemon": daemon, "admin": admin, "store": store, "manifest": manifest, "dir": store.path(NAME),
           "entry": NodeEntry(name="target", address=daemon.address, public_key=daemon.public_key)}
    daemon.stop()


def call(node, op, args, tensors=()):
    """``op`` on the node: its typed reply, or the RemoteError it answered."""
    async def run():
        async with RpcClient(node["admin"], node["daemon"].address, node["daemon"].public_key) as client:
            try:
                reply, _ = await client.invoke(op, args, list(tensors), timeout=30)
                return reply
            except RemoteError as exc:
                return exc

    return asyncio.run(run())


def refused(node, op, args, tensors=(), code="bad_args") -> str:
    """Assert ``op`` is refused with ``code``; returns the message."""
    outcome = call(node, op, args, tensors)
    assert isinstance(outcome, RemoteError), f"{op.name} {args} was accepted: {outcome}"
    assert outcome.code == code, outcome
    return outcome.message


def offer(node, blob: bytes, signature: bytes, model: str = NAME):
    return call(node, M.MODEL_OFFER, M.OfferArgs(model=model, manifest=blob, signature=signature))


def original(node) -> tuple[bytes, bytes]:
    directory = node["dir"]
    return (directory / MANIFEST).read_bytes(), bytes.fromhex((directory / SIGNATURE).read_text())


def resigned(node, data: dict, encode=canonical_json) -> tuple[bytes, bytes]:
    """A tampered manifest signed by the node's admin: only the tampering itself can be refused."""
    blob = encode(data)
    return blob, node["admin"].sign(blob)


def chunk(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.int8)


def edit(path: str, value=None, delete=False):
    """A manifest edit: set (or delete) the field at dotted ``path``."""
    def apply(data: dict) -> dict:
        data = copy.deepcopy(data)
        *parents, last = path.split(".")
        target = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if delete:
            del target[last]
        else:
            target[last] = value
        return data
    return apply


def add_file(rel: str):
    """A manifest edit: list one more file, at ``rel``."""
    return lambda data: {**data, "files": {**data["files"], rel: {"sha256": "0" * 64, "bytes": 1}}}


TAMPERINGS = {  # name: (the edit, what the refusal names)
    "parent-traversal": (add_file("../x"), "unsafe file name"),
    "deep-traversal": (add_file("layers/../../x"), "unsafe file name"),
    "absolute-path": (add_file("/abs"), "unsafe file name"),
    "hidden-file": (add_file(".hidden"), "unsafe file name"),
    "hidden-directory": (add_file(".incoming/x"), "unsafe file name"),
    "the-signature-file": (add_file("manifest.sig"), "unsafe file name"),
    "count-as-string": (edit("num_layers", "2"), "not a int"),
    "flag-as-int": (edit("tied_embeddings", 1), "not a bool"),
    "files-as-list": (edit("files", []), "not a dict"),
    "layer-as-string": (edit("layers", ["layers/00000.safetensors"]), "malformed"),
    "negative-bytes": (edit("embed.bytes", -1), "negative"),
    "sha-not-hex": (lambda d: {**d, "files": {k: {**v, "sha256": "zz"} for k, v in d["files"].items()}},
                    "not a sha256"),
    "unknown-dtype": (edit("dtype", "int4"), "dtype"),
    "missing-layers": (edit("layers", delete=True), "'layers' is missing"),
    "missing-files": (edit("files", delete=True), "'files' is missing"),
    "missing-embed-file": (edit("embed.file", delete=True), "'file' is missing"),
    "layers-out-of-order": (lambda d: {**d, "layers": list(reversed(d["layers"]))}, "layers must be listed"),
    "unlisted-layer-file": (edit("layers.0.file", "layers/99999.safetensors"), "not listed in files"),
    "another-name": (edit("name", "other"), "names 'other'"),
    "unsafe-name": (edit("name", "../x"), "invalid model name"),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_malformed_manifests_are_bad_args(node, tampering):
    blob, _ = original(node)
    change, reason = TAMPERINGS[tampering]
    tampered, signature = resigned(node, change(json.loads(blob)))
    assert reason in refused(node, M.MODEL_OFFER, M.OfferArgs(model=NAME, manifest=tampered, signature=signature))


@pytest.mark.parametrize("blob", [b"", b"{not json", b"[]", b'"a string"', b"\xff\xfe", b"[" * 20000 + b"]" * 20000],
                         ids=["empty", "not-json", "a-list", "a-string", "not-utf8", "nested-too-deep"])
def test_manifests_that_are_not_json_objects_are_bad_args(node, blob):
    refused(node, M.MODEL_OFFER, M.OfferArgs(model=NAME, manifest=blob, signature=node["admin"].sign(blob)))


def test_forged_and_foreign_signatures_are_bad_args(node):
    blob, signature = original(node)
    data = json.loads(blob)
    # The same content encoded differently: one manifest has exactly one signed form.
    spaced, spaced_signature = resigned(node, data, lambda d: json.dumps(d, indent=1).encode())
    assert "canonical" in refused(node, M.MODEL_OFFER, M.OfferArgs(NAME, spaced, spaced_signature))
    # Changed after signing, or a signature that is not one.
    changed = canonical_json({**data, "source": "elsewhere"})
    for forged, sig in ((changed, signature), (blob, bytes(64)), (blob, signature[:10]), (blob, b"")):
        assert "signature does not verify" in refused(node, M.MODEL_OFFER, M.OfferArgs(NAME, forged, sig))
    # Validly signed by a key this node does not trust.
    mallory = Identity.generate()
    foreign = canonical_json({**data, "importer": mallory.public_key})
    assert "not a trusted key" in refused(node, M.MODEL_OFFER, M.OfferArgs(NAME, foreign, mallory.sign(foreign)))
    # The right manifest offered under another (or an impossible) name.
    refused(node, M.MODEL_OFFER, M.OfferArgs("other", blob, signature))
    refused(node, M.MODEL_OFFER, M.OfferArgs("../x", blob, signature))
    assert isinstance(offer(node, blob, signature), M.Offer)  # the genuine one is still accepted


def test_misplaced_chunks_are_bad_args(node):
    call(node, M.MODEL_REMOVE, M.ModelArgs(NAME))
    offered = offer(node, *original(node))
    assert offered.have == {} and offered.partial == {}
    rel = node["manifest"].layers[0].file
    data = (node["dir"] / rel).read_bytes()

    def put(offset: int, tensors: list, path: str = rel) -> str:
        return refused(node, M.MODEL_PUT, PutArgs(NAME, offset, path), tensors)

    assert "not part of" in put(0, [chunk(b"x")], "layers/99999.safetensors")
    for path in ("../manifest.json", "/etc/passwd", ".incoming/x.part", "", MANIFEST):
        put(0, [chunk(b"x")], path)
    assert "resume from 0" in put(5, [chunk(data[5:10])])
    assert "more bytes than" in put(0, [chunk(data + b"extra")])
    assert "empty chunk" in put(0, [torch.zeros(0, dtype=torch.int8)])
    put(0, [])
    put(0, [chunk(data[:5]), chunk(data[5:10])])
    put(0, [torch.zeros(4)])
    put(0, [chunk(data[:8]).view(2, 4)])
    assert refused(node, M.MODEL_PUT, PutArgs(NAME, 0, rel), [torch.zeros(MAX_CHUNK_BYTES + 1, dtype=torch.int8)],
                   code="too_large")
    # Part of the file, then the wrong offset, then the rest with one byte flipped.
    assert call(node, M.MODEL_PUT, PutArgs(NAME, 0, rel), [chunk(data[:100])]).received == 100
    assert "resume from 100" in put(0, [chunk(data[:100])])
    assert offer(node, *original(node)).partial == {rel: 100}
    flipped = bytearray(data[100:])
    flipped[-1] ^= 0xFF
    assert "does not match its signed sha256" in put(100, [chunk(bytes(flipped))])
    after = offer(node, *original(node))
    assert rel not in after.have and rel not in after.partial  # the bad bytes are gone
    # Now the genuine bytes are accepted.
    assert call(node, M.MODEL_PUT, PutArgs(NAME, 0, rel), [chunk(data)]) == M.PutReply(len(data), True)
    assert offer(node, *original(node)).have[rel] == node["manifest"].files[rel].sha256


def test_a_model_never_offered_is_not_found(node):
    refused(node, M.MODEL_PUT, PutArgs("ghost", 0, "config.json"), [chunk(b"{}")], code="not_found")
    refused(node, M.SPAN_LOAD, M.LoadArgs("ghost", 0, 1, embed=True), code="not_found")
    refused(node, M.SPAN_UNLOAD, M.ModelArgs("ghost"), code="not_found")
    assert call(node, M.MODEL_REMOVE, M.ModelArgs("ghost")) == M.Removed(False)
    refused(node, M.MODEL_REMOVE, M.ModelArgs("../x"))


def test_impossible_spans_are_bad_args(node):
    layers = node["manifest"].num_layers
    call(node, M.MODEL_REMOVE, M.ModelArgs(NAME))
    offer(node, *original(node))
    assert "missing" in refused(node, M.SPAN_LOAD, M.LoadArgs(NAME, 0, layers, embed=True, head=True))

    async def send_all():
        async with RpcClient(node["admin"], node["daemon"].address, node["daemon"].public_key) as client:
            await ship_files(client, "target", node["dir"], node["manifest"].span_files(0, layers, True, True))

    asyncio.run(send_all())
    for start, end, embed, head in ((0, 999, True, False), (0, layers + 1, False, False), (3, 1, False, False),
                                    (1, 2, True, False), (0, 1, False, True), (2, 2, False, False)):
        refused(node, M.SPAN_LOAD, M.LoadArgs(NAME, start, end, embed=embed, head=head))
    refused(node, M.SPAN_LOAD, M.LoadArgs(NAME, 0, layers, embed=True, head=True, dtype="int4"))
    # A file changed on the node's disk is found, refused and removed before anything loads it.
    layer = node["store"].root.parent / "home" / "models" / NAME / node["manifest"].layers[1].file
    layer.write_bytes(layer.read_bytes()[:-1] + b"\0")
    assert "does not match its signed sha256" in refused(node, M.SPAN_LOAD, M.LoadArgs(NAME, 1, 2))
    assert not layer.exists()


def test_the_node_still_deploys_and_never_answered_internal(node):
    layers = node["manifest"].num_layers
    report = asyncio.run(deploy_span(node["admin"], node["entry"], node["dir"], Span("target", 0, layers, True, True)))
    assert {"model", "start", "end", "embed", "head", "dtype", "param_bytes", "device", "rss_bytes", "node",
            "bytes_sent"} <= set(report)
    assert (report["model"], report["start"], report["end"], report["node"]) == (NAME, 0, layers, "target")
    assert call(node, M.SPAN_UNLOAD, M.ModelArgs(NAME)) == M.Unloaded(True)
    assert call(node, M.MODEL_REMOVE, M.ModelArgs(NAME)) == M.Removed(True)
    assert node["daemon"].proc.poll() is None
    assert "operation failed" not in node["daemon"].log()  # what the server logs for an internal error
