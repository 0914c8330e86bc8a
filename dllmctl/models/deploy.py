"""Sending each node the files of its span, then telling it to load them.

Files travel in chunks over the node's encrypted channel; the node verifies each file's sha256
against the signed manifest before accepting it. Files a node already holds are skipped, and a
file cut off half-way resumes from where the node says it stopped.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

from dllmd.models.store import MANIFEST, SIGNATURE, Manifest
from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import NodeEntry
from dllmctl.placement.layout import Span

CHUNK_BYTES = 4 * 1024 * 1024
LOAD_TIMEOUT_S = 600.0

Progress = Callable[[str, int], None]  # (node name, bytes just sent or skipped)


def span_files(manifest: Manifest, span: Span) -> list[str]:
    return manifest.span_files(span.start, span.end, span.embed, span.head)


def bytes_to_send(manifest: Manifest, span: Span) -> int:
    return sum(manifest.files[f].bytes for f in span_files(manifest, span))


async def deploy_span(user: Identity, node: NodeEntry, model_dir: Path, span: Span,
                      progress: Progress = lambda *_: None, dtype: str = "") -> dict:
    """Ship one node its files (skipping what it has) and load its span; returns the node's report."""
    manifest = Manifest.from_bytes((model_dir / MANIFEST).read_bytes())
    async with RpcClient(user, node.address, node.public_key) as client:
        sent = await ship_files(client, node.name, model_dir, span_files(manifest, span), progress)
        report, _ = await client.call("span.load", {"model": manifest.name, "start": span.start, "end": span.end,
                                                    "embed": span.embed, "head": span.head, "dtype": dtype},
                                      timeout=LOAD_TIMEOUT_S)
    return {**report, "node": node.name, "bytes_sent": sent}


async def ship_files(client: RpcClient, node_name: str, model_dir: Path, files: list[str],
                     progress: Progress = lambda *_: None) -> int:
    """Offer the signed manifest, then send the listed files the node lacks (resuming partial
    ones); returns the bytes sent."""
    import torch

    blob = (model_dir / MANIFEST).read_bytes()
    manifest = Manifest.from_bytes(blob)
    signature = bytes.fromhex((model_dir / SIGNATURE).read_text().strip())
    offer, _ = await client.call("model.offer", {"model": manifest.name, "manifest": blob, "signature": signature},
                                 timeout=60)
    sent = 0
    for rel in files:
        entry = manifest.files[rel]
        if offer["have"].get(rel) == entry.sha256:
            progress(node_name, entry.bytes)
            continue
        offset = int(offer["partial"].get(rel, 0))
        progress(node_name, offset)
        with open(model_dir / rel, "rb") as f:
            f.seek(offset)
            while offset < entry.bytes:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    raise OSError(f"{model_dir / rel} is shorter than its manifest says; re-import the model")
                data = torch.frombuffer(bytearray(chunk), dtype=torch.int8)
                await client.call("model.put", {"model": manifest.name, "path": rel, "offset": offset}, [data],
                                  timeout=120)
                offset += len(chunk)
                sent += len(chunk)
                progress(node_name, len(chunk))
    return sent


async def deploy(user: Identity, nodes: dict[str, NodeEntry], model_dir: Path, spans: list[Span],
                 progress: Progress = lambda *_: None, dtype: str = "") -> list[dict]:
    """Deploy every span concurrently (one connection per node)."""
    return list(await asyncio.gather(*(deploy_span(user, nodes[s.node], model_dir, s, progress, dtype) for s in spans)))


async def undeploy(user: Identity, nodes: list[NodeEntry], model: str, remove_files: bool = False) -> dict[str, str]:
    """Unload ``model`` everywhere it is served (and optionally delete its files); per-node outcome."""

    async def one(node: NodeEntry) -> tuple[str, str]:
        async with RpcClient(user, node.address, node.public_key) as client:
            try:
                await client.call("ping", timeout=5)  # a node that is down answers nothing: do not wait a minute
                if remove_files:
                    await client.call("model.remove", {"model": model}, timeout=60)
                    return node.name, "removed"
                await client.call("span.unload", {"model": model}, timeout=60)
                return node.name, "unloaded"
            except Exception as exc:  # one node's failure must not hide the others' outcome
                return node.name, f"error: {exc}"

    return dict(await asyncio.gather(*(one(n) for n in nodes)))
