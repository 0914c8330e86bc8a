"""Checkpoints of a job, kept by its coordinator: ``<home>/jobs/<job>/checkpoints/step-000123/``.

    model.safetensors      the weights (fp32, transformers' parameter names; a tied head is omitted)
    optimizer.safetensors  AdamW's exp_avg / exp_avg_sq per parameter
    config.json            the model's config, so the directory (plus a tokenizer) loads in transformers
    state.json             step, AdamW step count, data cursor (seed, epoch), job spec, RNG state, last metrics
    manifest.json          sha256 and size of every file above, signed by the node: manifest.sig

A checkpoint is written into ``.partial-step-N``, fsynced, then renamed: it either exists whole or
not at all. Reading checks the signature and every hash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dllmd.models.store import sha256_file
from dllmd.net.identity import Identity, verify_signature
from dllmd.storage import fsync_dir

FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing or fails verification."""


def _dirname(step: int) -> str:
    return f"step-{step:06d}"


class Checkpoints:
    def __init__(self, root: Path, identity: Identity):
        self.root = root
        self.identity = identity

    def write(self, step: int, tensors: dict[str, torch.Tensor], config_json: bytes, state: dict) -> dict:
        """Write the checkpoint after ``step`` completed steps; returns its description."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / _dirname(step)
        work = self.root / f".partial-{_dirname(step)}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        model = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items() if k.startswith("model.")}
        optim = {k.removeprefix("optim."): v.contiguous() for k, v in tensors.items() if k.startswith("optim.")}
        save_file(model, str(work / "model.safetensors"), metadata={"format": "pt"})
        save_file(optim, str(work / "optimizer.safetensors"))
        (work / "config.json").write_bytes(config_json)
        (work / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        manifest = {"step": step, "files": {name: {"sha256": sha256_file(work / name),
                                                   "bytes": (work / name).stat().st_size} for name in FILES},
                    "signer": self.identity.public_key}
        blob = json.dumps(manifest, sort_keys=True).encode()
        (work / "manifest.json").write_bytes(blob)
        (work / "manifest.sig").write_text(self.identity.sign(blob).hex())
        for name in (*FILES, "manifest.json", "manifest.sig"):
            with open(work / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(work)
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
        fsync_dir(self.root)
        return self.describe(step)

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if p.name.split("-")[1].isdigit())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        path = self.root / _dirname(step)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at step {step}; steps with one: {self.steps() or 'none'}")
        return path

    def manifest(self, step: int) -> dict:
        path = self.path(step)
        blob = (path / "manifest.json").read_bytes()
        try:
            signature = bytes.fromhex((path / "manifest.sig").read_text().strip())
        except (OSError, ValueError):
            raise CheckpointError(f"checkpoint {path} has no readable signature") from None
        manifest = json.loads(blob)
        if not verify_signature(manifest.get("signer", ""), blob, signature):
            raise CheckpointError(f"checkpoint {path} has an invalid manifest signature")
        if manifest["signer"] != self.identity.public_key:
            raise CheckpointError(f"checkpoint {path} was signed by another node ({manifest['signer'][:16]}...)")
        return manifest

    def describe(self, step: int) -> dict:
        path = self.path(step)
        state = json.loads((path / "state.json").read_text())
        return {"step": step, "path": str(path), "bytes": sum(f.stat().st_size for f in path.iterdir()),
                "created": path.stat().st_mtime, "loss": state.get("metrics", {}).get("loss")}

    def read(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The verified tensors (``model.*``, ``optim.*``) and state of a checkpoint."""
        path = self.path(step)
        manifest = self.manifest(step)
        for name, entry in manifest["files"].items():
            if sha256_file(path / name) != entry["sha256"]:
                raise CheckpointError(f"{path / name} does not match its signed sha256: the checkpoint is corrupt")
        tensors = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
        tensors.update({f"optim.{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()})
        return tensors, json.loads((path / "state.json").read_text())

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

