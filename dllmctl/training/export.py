"""A job's checkpoint as a transformers model directory on this machine (``dllmctl checkpoints export``)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import NodeEntry
from dllmctl.training.jobs import CONFIG_FILES, TrainError


async def export_checkpoint(user: Identity, node: NodeEntry, job: str, step: int | None, base_model_dir: Path,
                            target: Path) -> dict:
    """Download a checkpoint's model and config (sha256 checked against its signed manifest) into a
    transformers directory, with the base model's tokenizer and generation config."""
    async with RpcClient(user, node.address, node.public_key) as client:
        listing, _ = await client.call("checkpoints.list", {"job": job}, timeout=30)
        steps = [c["step"] for c in listing["checkpoints"]]
        if not steps:
            raise TrainError(f"job {job} has no checkpoint yet")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise TrainError(f"job {job} has no checkpoint at step {chosen}; it has {steps}")
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=target.parent))
        try:
            for name in ("model.safetensors", "config.json"):
                digest, offset = hashlib.sha256(), 0
                with open(work / name, "wb") as f:
                    while True:
                        result, tensors = await client.call("checkpoints.read", {"job": job, "step": chosen,
                                                                                 "file": name, "offset": offset},
                                                            timeout=120)
                        chunk = tensors[0].numpy().tobytes()
                        f.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        if not chunk or offset >= result["size"]:
                            break
                if digest.hexdigest() != result["manifest"]["files"][name]["sha256"]:
                    raise TrainError(f"{name} of checkpoint {chosen} arrived corrupted (sha256 mismatch)")
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
