"""DP-SGD's Gaussian noise, drawn alike on every replica and in the one-process reference.

Every worker adds the same noise to the same all-reduced sum, so the replicas stay identical with
no noise on the wire. The draw comes from a CPU ``torch.Generator`` (CUDA generators differ by
device) seeded by a 63-bit hash of (seed, step, salt): no two steps, and no two uses of one seed
(``salt``), share a stream. The seed is the job's secret DP seed: who knows it can subtract the
noise (``dllmd.train.privacy.settings``).

torch's generator is a Mersenne Twister, not a cryptographic generator: as Opacus without its
``secure_mode``, the guarantee assumes an adversary who cannot predict the draws without the seed.
"""

from __future__ import annotations

import hashlib

import torch


def generator_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from (seed, step, salt), none of them folded."""
    digest = hashlib.sha256(f"dllm.dp-noise:{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def gaussian_noise(numel: int, std: float, seed: int, step: int, salt: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` fp32 draws of N(0, std^2): the same values on every machine for the same arguments."""
    generator = torch.Generator(device="cpu").manual_seed(generator_seed(seed, step, salt))
    noise = torch.randn(numel, generator=generator, dtype=torch.float32).mul_(std)
    return noise.to(device)
