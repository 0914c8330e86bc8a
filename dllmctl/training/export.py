"""A job's checkpoint as a transformers model directory on this machine (``dllmctl checkpoints export``).

A data-parallel checkpoint is one model file; a pipeline job's has one part per stage, each signed
by the node that wrote it: the parts' weights are merged into one file (a tied embedding, which the
first and last stage both hold, must be the same in both)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dllmd.net.client import RpcClient
from dllmd.net.messages import training as S
from dllmd.net.identity import Identity
from dllmd.train.checkpoint import CheckpointError, copy_checkpoint_file
from dllmctl.cluster.registry import NodeEntry
from dllmctl.training.jobs import CONFIG_FILES, TrainError

EXPORTED = ("model.safetensors", "config.json")


async def export_checkpoint(user: Identity, node: NodeEntry, job: str, step: int | None, base_model_dir: Path,
                            target: Path, part_signers: Collection[str] = ()) -> dict:
    """Download a checkpoint's model and config (sha256 checked against its manifest, whose signature is
    checked against the coordinator's pinned key, or for a pipeline job's parts against the pinned
    keys of the job's nodes, ``part_signers``) into a transformers directory, with the base model's
    tokenizer and generation config."""
    async with RpcClient(user, node.address, node.public_key) as client:
        listing, _ = await client.invoke(S.CHECKPOINTS_LIST, S.JobArgs(job=job), timeout=30)
        by_step = {c.step: c for c in listing.checkpoints}
        if not by_step:
            raise TrainError(f"job {job} has no checkpoint yet")
        chosen = max(by_step) if step is None else step
        if chosen not in by_step:
            raise TrainError(f"job {job} has no checkpoint at step {chosen}; it has {sorted(by_step)}")
        parts = by_step[chosen].parts
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            if not parts:
                for name in EXPORTED:
                    await _download(client, job, chosen, name, work / name, -1, {node.public_key})
            else:
                await _merge_parts(client, job, chosen, parts, work, set(part_signers))
            for name in CONFIG_FILES:
                if (base_model_dir / name).exists():
                    shutil.copy2(base_model_dir / name, work / name)
            if target.exists():
                shutil.rmtree(target)
            work.rename(target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return {"job": job, "step": chosen, "directory": str(target), "parts": parts}


async def _merge_parts(client: RpcClient, job: str, step: int, parts: int, work: Path, trusted: set[str]) -> None:
    """Every stage's weights into one ``model.safetensors``, and the first part's config."""
    merged: dict[str, torch.Tensor] = {}
    for stage in range(parts):
        path = work / f".part-{stage}.safetensors"
        await _download(client, job, step, "model.safetensors", path, stage, trusted)
        for name, tensor in load_file(str(path)).items():
            if name in merged and not torch.equal(merged[name], tensor):
                raise TrainError(f"stages disagree on {name} in checkpoint {step} of {job}: the tied copies diverged")
            merged[name] = tensor
        path.unlink()
    save_file(merged, str(work / "model.safetensors"), metadata={"format": "pt"})
    await _download(client, job, step, "config.json", work / "config.json", 0, trusted)


async def _download(client: RpcClient, job: str, step: int, name: str, path: Path, stage: int,
                    trusted: Collection[str]) -> None:
    """One checkpoint file into ``path``, checked against its signed manifest (by a ``trusted`` key)."""
    async def read(file: str, offset: int):
        reply, tensors = await client.invoke(S.CHECKPOINTS_READ, S.CheckpointReadArgs(
            job=job, step=step, file=file, offset=offset, stage=stage), timeout=120)
        return reply, tensors[0].numpy().tobytes() if len(tensors) == 1 else b""

    try:
        await copy_checkpoint_file(read, name, path, step, trusted)
    except CheckpointError as exc:
        raise TrainError(f"checkpoint {step} from {client.address} cannot be trusted: {exc}") from None
