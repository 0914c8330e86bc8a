"""A job's checkpoint as a transformers model directory on this machine (``dllmctl checkpoints export``)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S
from dllmd.train.checkpoint import CheckpointError, CheckpointManifest, verify_checkpoint_manifest
from dllmctl.cluster.registry import NodeEntry
from dllmctl.training.jobs import CONFIG_FILES, TrainError

EXPORTED = ("model.safetensors", "config.json")


async def export_checkpoint(user: Identity, node: NodeEntry, job: str, step: int | None, base_model_dir: Path,
                            target: Path) -> dict:
    """Download a checkpoint's model and config (sha256 checked against its manifest, whose signature is
    checked against the coordinator's pinned key) into a transformers directory, with the base model's
    tokenizer and generation config."""
    async with RpcClient(user, node.address, node.public_key) as client:
        listing, _ = await client.invoke(S.CHECKPOINTS_LIST, S.JobArgs(job=job), timeout=30)
        steps = [c.step for c in listing.checkpoints]
        if not steps:
            raise TrainError(f"job {job} has no checkpoint yet")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise TrainError(f"job {job} has no checkpoint at step {chosen}; it has {steps}")
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            for name in EXPORTED:
                await _download(client, node, job, chosen, name, work / name)
            for name in CONFIG_FILES:
                if (base_model_dir / name).exists():
                    shutil.copy2(base_model_dir / name, work / name)
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return {"job": job, "step": chosen, "directory": str(target)}


async def _download(client: RpcClient, node: NodeEntry, job: str, step: int, name: str, path: Path) -> None:
    """One checkpoint file into ``path``, its sha256 checked against the signed manifest."""
    digest, offset, blob, manifest = hashlib.sha256(), 0, b"", None
    with open(path, "wb") as f:
        while True:
            reply, tensors = await client.invoke(S.CHECKPOINTS_READ, S.CheckpointReadArgs(job=job, step=step,
                                                                                        file=name, offset=offset),
                                                 timeout=120)
            if manifest is None:
                blob, manifest = reply.manifest, _trusted_manifest(reply, node, step, name)
            elif reply.manifest != blob:
                raise TrainError(f"checkpoint {step} of job {job} changed during the download; export it again")
            chunk = tensors[0].numpy().tobytes() if len(tensors) == 1 else b""
            f.write(chunk)
            digest.update(chunk)
            offset += len(chunk)
            if not chunk or offset >= reply.size:
                break
    entry = manifest.files[name]
    if offset != entry.bytes or digest.hexdigest() != entry.sha256:
        raise TrainError(f"{name} of checkpoint {step} arrived corrupted (sha256 mismatch)")


def _trusted_manifest(reply: S.CheckpointChunk, node: NodeEntry, step: int, name: str) -> CheckpointManifest:
    """The reply's manifest, once its signature by the node we connected to (its pinned key) checks out:
    only then are its sha256 values worth comparing against."""
    try:
        manifest = verify_checkpoint_manifest(reply.manifest, reply.signature, node.public_key)
    except CheckpointError as exc:
        raise TrainError(f"checkpoint {step} from {node.name} cannot be trusted: {exc}") from None
    if manifest.step != step or name not in manifest.files:
        raise TrainError(f"checkpoint {step} from {node.name} has a manifest for another checkpoint")
    return manifest
