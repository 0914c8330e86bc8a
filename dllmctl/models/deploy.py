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
from dllmd.net.messages import models as M
from dllmd.net.messages import tensor as T
from dllmd.net.messages.node import PING
from dllmd.net.schema import to_wire
from dllmd.storage.signed import read_signature
from dllmctl.cluster.registry import NodeEntry
from dllmctl.placement.layout import Span, groups_of
from dllmctl.transfer import upload

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
        loaded, _ = await client.invoke(M.SPAN_LOAD, M.LoadArgs(model=manifest.name, start=span.start, end=span.end,
                                                                embed=span.embed, head=span.head, dtype=dtype,
                                                                tensor_slice=span.tensor_slice),
                                        timeout=LOAD_TIMEOUT_S)
    return {**to_wire(loaded.span), "device": loaded.device, "rss_bytes": loaded.rss_bytes, "node": node.name,
            "bytes_sent": sent}


async def ship_files(client: RpcClient, node_name: str, model_dir: Path, files: list[str],
                     progress: Progress = lambda *_: None) -> int:
    """Offer the signed manifest, then send the listed files the node lacks (resuming partial
    ones); returns the bytes sent."""
    blob = (model_dir / MANIFEST).read_bytes()
    manifest = Manifest.from_bytes(blob)
    offer, _ = await client.invoke(M.MODEL_OFFER, M.OfferArgs(model=manifest.name, manifest=blob,
                                                              signature=read_signature(model_dir / SIGNATURE)),
                                   timeout=60)
    sent = 0
    for rel in files:
        entry = manifest.files[rel]
        if offer.have.get(rel) == entry.sha256:
            progress(node_name, entry.bytes)
            continue
        offset = offer.partial.get(rel, 0)
        progress(node_name, offset)
        with open(model_dir / rel, "rb") as f:
            sent += await upload(client, M.MODEL_PUT, manifest.name, f, entry.bytes, offset, rel,
                                 lambda n: progress(node_name, n))
    return sent


async def deploy(user: Identity, nodes: dict[str, NodeEntry], model_dir: Path, spans: list[Span],
                 progress: Progress = lambda *_: None, dtype: str = "") -> list[dict]:
    """Deploy every span concurrently (one connection per node), then link each tensor-parallel group."""
    reports = list(await asyncio.gather(*(deploy_span(user, nodes[s.node], model_dir, s, progress, dtype)
                                          for s in spans)))
    ports = {r["node"]: r["group_port"] for r in reports}
    for group, members in groups_of(spans).items():
        await connect_group(user, [nodes[m.node] for m in members], reports[0]["model"], group,
                            [ports[m.node] for m in members])
    return reports


def group_endpoint(node: NodeEntry, port: int) -> str:
    """A member's group socket: the host the client knows the node by, the port the node reported."""
    return f"{node.address.rsplit(':', 1)[0]}:{port}"


async def connect_group(user: Identity, members: list[NodeEntry], model: str, group: str, ports: list[int]) -> None:
    """Tell every member of ``group`` (in rank order) who the others are and where to reach them."""
    args = T.ConnectArgs(model=model, group=group, members=[
        T.GroupMemberArgs(public_key=node.public_key, endpoint=group_endpoint(node, port))
        for node, port in zip(members, ports)])

    async def one(node: NodeEntry) -> None:
        async with RpcClient(user, node.address, node.public_key) as client:
            await client.invoke(T.GROUP_CONNECT, args, timeout=30)

    await asyncio.gather(*(one(node) for node in members))


async def undeploy(user: Identity, nodes: list[NodeEntry], model: str, remove_files: bool = False) -> dict[str, str]:
    """Unload ``model`` everywhere it is served (and optionally delete its files); per-node outcome."""

    async def one(node: NodeEntry) -> tuple[str, str]:
        async with RpcClient(user, node.address, node.public_key) as client:
            try:
                await client.invoke(PING, timeout=5)  # a node that is down answers nothing: do not wait a minute
                if remove_files:
                    await client.invoke(M.MODEL_REMOVE, M.ModelArgs(model=model), timeout=60)
                    return node.name, "removed"
                await client.invoke(M.SPAN_UNLOAD, M.ModelArgs(model=model), timeout=60)
                return node.name, "unloaded"
            except Exception as exc:  # one node's failure must not hide the others' outcome
                return node.name, f"error: {exc}"

    return dict(await asyncio.gather(*(one(n) for n in nodes)))
