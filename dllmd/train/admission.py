"""What a coordinator checks of a job before it exists, beyond the common checks in
:mod:`dllmd.train.coordinator`: a pipeline's stages, how the job communicates, its held-out text.
Each check raises :class:`JobError` saying what to change; nothing here does I/O."""

from __future__ import annotations

from dllmd.net.messages import training as S
from dllmd.train import heldout
from dllmd.train.jobs import JobError
from dllmd.train.lowcomm import LowCommError, LowCommSettings
from dllmd.train.privacy.settings import PrivacySettings


def check_stages(spec: S.JobSpec, config: dict) -> None:
    """Stages that cover the model's layers once, in order, on replicas x stages nodes."""
    if spec.schedule not in S.SCHEDULES:
        raise JobError(f"schedule must be one of {', '.join(S.SCHEDULES)}, not {spec.schedule!r}")
    if len(spec.stages) < 2:
        raise JobError("a pipeline needs at least two stages (one node holding every layer is --parallelism data)")
    if spec.parallelism == "model" and spec.replicas != 1:
        raise JobError("--parallelism model runs one pipeline; replicas of it are --parallelism hybrid")
    if len(spec.nodes) != spec.replicas * len(spec.stages):
        raise JobError(f"{spec.replicas} replica(s) of {len(spec.stages)} stages need "
                       f"{spec.replicas * len(spec.stages)} nodes, not {len(spec.nodes)}")
    layers, start = int(config["num_hidden_layers"]), 0
    for i, stage in enumerate(spec.stages):
        if stage.start != start or stage.end <= stage.start:
            raise JobError(f"stage {i} holds layers [{stage.start}, {stage.end}); stages must cover the layers "
                           f"in order, each at least one (the previous ended at {start})")
        start = stage.end
    if start != layers:
        raise JobError(f"the stages end at layer {start}, but {spec.model} has {layers} layers")


def check_communication(spec: S.JobSpec) -> LowCommSettings:
    """DiLoCo, compression and overlap only where they are built (:mod:`dllmd.train.lowcomm` says why)."""
    try:
        settings = LowCommSettings.of(spec)
        settings.check(spec.parallelism, spec.backend, PrivacySettings.of(spec).enabled)
    except LowCommError as exc:
        raise JobError(str(exc)) from None
    return settings


def check_heldout(spec: S.JobSpec, config: dict) -> None:
    """Held-out settings that make sense together, and a held-out text the coordinator's replica can score."""
    refused = heldout.refusal(spec, config)
    if refused:
        raise JobError(refused)
