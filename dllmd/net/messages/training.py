"""Training's operations: what a coordinator asks of its workers (``train.*``, peers and admins) and what
a client asks of a coordinator (``jobs.*``, ``checkpoints.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import NoArgs, Op, bounded

PARALLELISMS_BUILT = ("data", "model", "hybrid", "federated")
STRATEGIES = ("fedavg", "fedavgm", "fedadam")  # federated: how the coordinator applies the mean update
BACKENDS = ("zmq", "torch")
SCHEDULES = ("gpipe", "1f1b")  # pipeline schedules (dllmd.train.pipeline.schedule)
PIPE_KINDS = ("activation", "gradient", "evaluation")  # across a stage boundary: forward, backward, forward only
EVAL_FRACTION_MAX = 0.5  # of a dataset's rows a job may hold out (dllmd.train.heldout)


@dataclass
class NodeRef:
    name: str = bounded(max_len=64)
    address: str = bounded(max_len=256)
    public_key: str = bounded(max_len=64)


@dataclass
class ShardRef:
    id: str = bounded(max_len=64)  # the public key of the node the shard was pushed to
    node: str = bounded(max_len=64)
    rows: int = bounded(lo=0, hi=2**40)
    sha256: str = bounded("", max_len=64)


@dataclass
class StageSpan:
    """Decoder layers ``[start, end)`` of one pipeline stage; the first also holds the embeddings, the
    last the final norm, the head and the loss."""

    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=1, hi=100_000)


@dataclass
class JobSpec:
    model: str = bounded(max_len=128)
    dataset: str = bounded(max_len=128)
    nodes: list[NodeRef] = bounded(max_len=256)
    shards: list[ShardRef] = bounded(max_len=256)
    batch_size: int = bounded(8, lo=1, hi=1_000_000)  # rows (sequences) per global step
    micro_batch_size: int = bounded(1, lo=1, hi=65536)
    epochs: int = bounded(1, lo=0, hi=100_000)
    max_steps: int = bounded(0, lo=0, hi=100_000_000)  # 0: run the epochs
    lr: float = bounded(1e-4, lo=0.0, hi=10.0)
    warmup_steps: int = bounded(0, lo=0, hi=100_000_000)
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e9)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)
    checkpoint_every: int = bounded(0, lo=0, hi=100_000_000)  # 0: only at the end and on stop
    seed: int = bounded(0, lo=0, hi=2**32 - 1)
    dtype: str = bounded("float32", max_len=16)
    plaintext: bool = False
    backend: str = bounded("zmq", max_len=8)
    parallelism: str = bounded("data", max_len=16)  # data, model (a pipeline) or hybrid (replicas of one)
    # model / hybrid: the stages' layer spans, the same in every replica; ``nodes`` are replica-major:
    # node r * len(stages) + s runs stage s of replica r.
    stages: list[StageSpan] = bounded([], max_len=256)
    replicas: int = bounded(1, lo=1, hi=256)
    schedule: str = bounded("1f1b", max_len=8)
    recompute: bool = False  # keep only each stage's inputs; run the forward again in the backward
    # Spare copies of each shard's rows, on disk on the owner's next ring members (data parallelism) or
    # the next replicas' first stages (hybrid): the job survives that many nodes lost at once.
    shard_copies: int = bounded(2, lo=1, hi=16)
    # Nodes a resume moved the job's stages away from (--replace): their checkpoint signatures still count.
    retired: list[NodeRef] = bounded([], max_len=256)
    # federated: rounds of local training on every client's own data (``nodes``; the first coordinates)
    rounds: int = bounded(0, lo=0, hi=10_000_000)
    local_steps: int = bounded(1, lo=1, hi=1_000_000)  # each client's AdamW steps per round
    clients_per_round: int = bounded(0, lo=0, hi=256)  # 0: every client
    min_clients: int = bounded(1, lo=1, hi=256)  # a round closes with at least this many updates
    round_timeout: float = bounded(600.0, lo=0.1, hi=86400.0)  # seconds; stragglers after it are left out
    strategy: str = bounded("fedavg", max_len=16)  # one of STRATEGIES
    server_lr: float = bounded(1.0, lo=0.0, hi=100.0)
    server_momentum: float = bounded(0.9, lo=0.0, hi=0.9999)  # fedavgm's momentum, fedadam's beta1
    proximal_mu: float = bounded(0.0, lo=0.0, hi=1e6)  # FedProx: mu/2 ||w - w_global||^2 in the local loss
    update_clip: float = bounded(0.0, lo=0.0, hi=1e9)  # L2 bound on each client's update (0: none)
    secure_aggregation: bool = False  # the coordinator learns only the sum of the round's updates
    # Differential privacy (DP-SGD, data parallelism; dllmd.train.privacy): each example's gradient
    # clipped to dp_clip, N(0, (dp_noise_multiplier * dp_clip)^2) added to the sum; rows Poisson-sampled.
    dp_clip: float = bounded(0.0, lo=0.0, hi=1e9)  # 0: differential privacy off
    dp_noise_multiplier: float = bounded(0.0, lo=0.0, hi=1e6)
    dp_delta: float = bounded(1e-5, lo=0.0, hi=1.0)
    dp_epsilon_budget: float = bounded(0.0, lo=0.0, hi=1e6)  # 0: no budget; else the job ends before exceeding it
    dp_seed: int = bounded(0, lo=0, hi=2**63 - 1)  # secret: sampling and noise; drawn by the coordinator at submit
    # Communicating less (data parallelism; dllmd.train.lowcomm): DiLoCo's local steps between syncs,
    # compressed all-reduces, all-reduces overlapped with the backward pass.
    sync_every: int = bounded(0, lo=0, hi=1_000_000)  # DiLoCo: inner steps per outer step (0: sync every step)
    outer_lr: float = bounded(0.7, lo=0.0, hi=100.0)  # DiLoCo's outer Nesterov SGD
    outer_momentum: float = bounded(0.9, lo=0.0, hi=0.9999)
    compress: str = bounded("none", max_len=24)  # none, fp16, int8 or powersgd:RANK
    overlap: bool = False  # all-reduce gradient buckets during the last micro-batch's backward
    overlap_bucket_bytes: int = bounded(25 * 2**20, lo=1024, hi=2**34)
    # A held-out text's token ids, scored on the coordinator's replica at every checkpoint and at the end:
    # the metrics' heldout_loss (data parallelism; dllmd.inference.perplexity, windows of eval_window).
    eval_tokens: list[int] = bounded([], max_len=12288)  # msgpack: up to 3 bytes each, in a 64 KiB header
    eval_window: int = bounded(256, lo=2, hi=512)
    # Held-out rows (dllmd.train.heldout): a seeded fraction of every shard, never trained on, or every row
    # of another sharded dataset (its shards, on the job's nodes); scored every eval_every steps (0: at
    # every checkpoint) and at the end: the metrics' eval_loss, eval_perplexity, eval_accuracy.
    eval_fraction: float = bounded(0.0, lo=0.0, hi=1.0)  # 0: none; the coordinator refuses more than EVAL_FRACTION_MAX
    eval_dataset: str = bounded("", max_len=128)
    eval_shards: list[ShardRef] = bounded([], max_len=256)
    eval_every: int = bounded(0, lo=0, hi=100_000_000)


@dataclass
class PrivacyPlan:
    """What a DP-SGD worker needs: the clip, the noise multiplier, the divisor of the noised sum
    (the expected batch size), and the job's secret seed of the noise."""

    clip: float = bounded(lo=0.0, hi=1e9)
    noise_multiplier: float = bounded(lo=0.0, hi=1e6)
    expected_batch_size: int = bounded(lo=1, hi=1_000_000)
    seed: int = bounded(lo=0, hi=2**63 - 1)


@dataclass
class CommPlan:
    """How a data-parallel worker communicates: the gradient of every step, or DiLoCo's pseudo-gradient
    every ``sync_every`` inner steps; exact or compressed; after the backward pass or during it."""

    sync_every: int = bounded(0, lo=0, hi=1_000_000)  # 0: every step
    outer_lr: float = bounded(0.7, lo=0.0, hi=100.0)
    outer_momentum: float = bounded(0.9, lo=0.0, hi=0.9999)
    compress: str = bounded("none", max_len=16)  # none, fp16, int8, powersgd
    rank: int = bounded(0, lo=0, hi=4096)  # powersgd
    block: int = bounded(64, lo=1, hi=65536)  # int8: values per scale
    seed: int = bounded(0, lo=0, hi=2**32 - 1)  # PowerSGD's first Q, the same on every worker
    overlap: bool = False
    bucket_bytes: int = bounded(25 * 2**20, lo=1024, hi=2**34)  # overlap: gradient bytes per all-reduce


@dataclass
class StagePlan:
    """What one node is in a pipeline job: stage ``index`` of ``count`` in replica ``replica``."""

    index: int = bounded(lo=0, hi=255)
    count: int = bounded(lo=1, hi=256)
    replica: int = bounded(lo=0, hi=255)
    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=1, hi=100_000)
    schedule: str = bounded("1f1b", max_len=8)
    recompute: bool = False
    micro_batches: int = bounded(1, lo=1, hi=1_000_000)  # the most a step runs: what memory is checked for


@dataclass
class WorkerPrepareArgs:
    job: str = bounded(max_len=64)
    model: str = bounded(max_len=128)
    dataset: str = bounded(max_len=128)
    dtype: str = bounded("float32", max_len=16)
    micro_batch_size: int = bounded(1, lo=1, hi=65536)
    lr: float = bounded(1e-4, lo=0.0, hi=10.0)
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e9)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)
    plaintext: bool = False
    backend: str = bounded("zmq", max_len=8)
    stage: StagePlan | None = None  # a pipeline stage's span (None: a data-parallel replica)
    privacy: PrivacyPlan | None = None  # DP-SGD (None: exact training)
    comm: CommPlan | None = None  # None: every step's gradient, exact, after the backward
    eval_dataset: str = bounded("", max_len=128)  # held-out rows: this node's shard of it, if it has one


@dataclass
class RingArgs:
    job: str = bounded(max_len=64)
    generation: int = bounded(lo=0, hi=2**62)
    rank: int = bounded(lo=0, hi=255)
    members: list[NodeRef] = bounded(max_len=256)  # address = the member's ring endpoint


@dataclass
class ReleaseArgs:
    job: str = bounded(max_len=64)
    keep_spares: bool = False  # an interrupted job may resume: its spare shard copies stay on disk


@dataclass
class ProbeArgs:
    """Which of ``members`` this node can reach (a step failed with every node answering the
    coordinator: a link between two of them may be cut)."""
    job: str = bounded(max_len=64)
    members: list[NodeRef] = bounded(max_len=256)


@dataclass
class Probed:
    unreachable: list[str] = bounded([], max_len=256)  # public keys that did not answer a ping


@dataclass
class BackupArgs:
    job: str = bounded(max_len=64)
    shard: str = bounded(max_len=64)
    holder: NodeRef  # a node that holds the shard's rows now


@dataclass
class RowsArgs:
    job: str = bounded(max_len=64)
    shard: str = bounded(max_len=64)
    start: int = bounded(0, lo=0, hi=2**40)
    count: int = bounded(1, lo=1, hi=2**24)


@dataclass
class StepArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    shards: list[str] = bounded(max_len=256)  # the rows tensor's shard column indexes this list


@dataclass
class EvaluateArgs:
    """Score rows forward only: one int64 ``[rows, 2]`` tensor of (shard number in ``shards``, row), of the
    training dataset's shards or (``eval_data``) of the held-out dataset's."""

    job: str = bounded(max_len=64)
    step: int = bounded(0, lo=0, hi=2**40)  # the steps trained so far: keys a pipeline's messages
    shards: list[str] = bounded([], max_len=256)
    eval_data: bool = False
    micro_batches: int = bounded(0, lo=0, hi=1_000_000)  # pipeline stages after the first: how many arrive


@dataclass
class Evaluated:
    """A scorer's sums (dllmd.train.heldout.EvalSums): the coordinator adds them up and divides once."""

    nll: float
    tokens: int
    correct: int


@dataclass
class ApplyArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    lr: float = bounded(lo=0.0, hi=10.0)


@dataclass
class InnerStepArgs:
    """A DiLoCo inner step: this worker's rows of global batch ``step``, applied here at once."""

    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    lr: float = bounded(lo=0.0, hi=10.0)
    shards: list[str] = bounded(max_len=256)  # the rows tensor's shard column indexes this list


@dataclass
class InnerStepped:
    step: int
    rows: int
    tokens: int  # this worker's target tokens in the step
    loss: float | None  # this worker's mean loss (None: it had no rows)
    grad_norm: float | None  # of its local mean gradient, before clipping
    compute_s: float


@dataclass
class SyncArgs:
    """DiLoCo's outer step ``step``: all-reduce the pseudo-gradient since the last one (kept, not applied)."""

    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)


@dataclass
class Synced:
    step: int
    tokens: int  # every worker's target tokens since the last outer step: the weights of the mean
    loss: float | None  # their mean inner loss
    pseudo_grad_norm: float  # of the token-weighted mean pseudo-gradient (outer weights - inner weights)
    comm_s: float
    bytes_sent: int  # by this worker, for this all-reduce


@dataclass
class OuterApplied:
    step: int  # the outer step every worker now continues from


@dataclass
class LinksArgs:
    """A stage's neighbours in its pipeline (None at the ends), and for a model with tied embeddings,
    the two-member ring of its replica's first and last stage that sums their embedding gradients."""

    job: str = bounded(max_len=64)
    generation: int = bounded(lo=0, hi=2**62)
    previous: NodeRef | None = None
    next: NodeRef | None = None
    tied_rank: int = bounded(-1, lo=-1, hi=1)  # -1: no tied ring on this stage
    tied_members: list[NodeRef] = bounded([], max_len=2)  # address = the member's tied-ring endpoint


@dataclass
class PipeArgs:
    """Micro-batch ``micro``'s activations (tensors: hidden states, labels) to the next stage, or their
    gradient (tensors: the gradient) back to the previous one."""

    job: str = bounded(max_len=64)
    generation: int = bounded(lo=0, hi=2**62)
    step: int = bounded(lo=0, hi=2**40)
    micro: int = bounded(lo=0, hi=1_000_000)
    kind: str = bounded(max_len=16)  # one of PIPE_KINDS


@dataclass
class StageStepArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    micro_batches: int = bounded(lo=0, hi=1_000_000)  # this replica's, this step
    shards: list[str] = bounded([], max_len=256)  # the first stage's rows tensor indexes this list


@dataclass
class StageStepped:
    """A stage's step: its gradients are summed over the replicas (and the tied pair) and kept, not
    applied. ``squared_norm`` is of this stage's part of the mean gradient (a tied copy counted once,
    on the first stage): the coordinator adds the stages' up into the global norm."""

    step: int
    micro_batches: int
    rows: int  # this replica's rows (first stage; 0 elsewhere)
    tokens: int  # target tokens in the global batch
    loss: float | None  # the global batch's mean loss (last stage)
    squared_norm: float
    compute_s: float  # forward and backward passes
    wait_s: float  # waiting for the neighbours' activations and gradients (the bubble, and transfers)
    pipeline_s: float  # from the step's start to the last backward sent
    comm_s: float  # the all-reduce over the replicas and the tied sum
    bytes_sent: int  # activations or gradients to the neighbours
    activation_bytes: int  # the most bytes of saved activations held at once


@dataclass
class StageApplyArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    lr: float = bounded(lo=0.0, hi=10.0)
    grad_norm: float = bounded(lo=0.0, hi=1e30)  # of the whole model's mean gradient


@dataclass
class SavePartArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    state: dict = bounded({}, max_len=64)  # the job's part of state.json: data cursor, spec, metrics


@dataclass
class PartArgs:
    """Stage ``stage``'s part of checkpoint ``step``."""

    job: str = bounded(max_len=64)
    stage: int = bounded(lo=0, hi=255)
    step: int = bounded(lo=0, hi=2**40)


@dataclass
class PartReadArgs:
    job: str = bounded(max_len=64)
    stage: int = bounded(lo=0, hi=255)
    step: int = bounded(lo=0, hi=2**40)
    file: str = bounded(max_len=64)
    signer: str = bounded(max_len=64)  # the node that wrote the part
    offset: int = bounded(0, lo=0, hi=2**44)


@dataclass
class FetchPartArgs:
    """Copy a part from ``holder``, checking it was signed by ``signer`` (the node that wrote it)."""

    job: str = bounded(max_len=64)
    stage: int = bounded(lo=0, hi=255)
    step: int = bounded(lo=0, hi=2**40)
    holder: NodeRef
    signer: str = bounded(max_len=64)


@dataclass
class LoadPartArgs:
    """Load this stage's part of checkpoint ``step``: from this node's copy, else from ``holder``'s."""

    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    holder: NodeRef
    signer: str = bounded(max_len=64)


@dataclass
class PartInfo:
    stage: int
    step: int
    bytes: int
    signer: str


@dataclass
class JobArgs:
    job: str = bounded(max_len=64)


@dataclass
class Replacement:
    """A stage moved at resume: the node that held it (its key) and the node that takes it over."""
    old: str = bounded(max_len=64)
    new: NodeRef


@dataclass
class ResumeArgs:
    job: str = bounded(max_len=64)
    nodes: list[NodeRef] = bounded([], max_len=256)  # current addresses (a restarted node may have moved)
    replace: list[Replacement] = bounded([], max_len=256)  # pipeline and hybrid jobs: stages moved to other nodes


@dataclass
class StateArgs:
    job: str = bounded(max_len=64)
    names: list[str] = bounded(max_len=4096)
    local: bool = False  # without names: the names of this worker's own state (not the replicas' shared)


@dataclass
class LoadStateArgs:
    job: str = bounded(max_len=64)
    names: list[str] = bounded(max_len=4096)
    optimizer_step: int = bounded(0, lo=0, hi=2**40)


@dataclass
class MetricsArgs:
    job: str = bounded(max_len=64)
    after_step: int = bounded(-1, lo=-1, hi=2**40)
    limit: int = bounded(1000, lo=1, hi=10000)


@dataclass
class CheckpointReadArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    file: str = bounded(max_len=64)
    offset: int = bounded(0, lo=0, hi=2**44)
    stage: int = bounded(-1, lo=-1, hi=255)  # a pipeline job's part (-1: a data-parallel checkpoint)


# --- replies of the coordinator -------------------------------------------------------------------

@dataclass
class Submitted:
    job: str
    total_steps: int
    coordinator: str


@dataclass
class JobSummary:
    job: str
    state: str  # queued, running, stopping, stopped, interrupted, failed, done
    model: str
    dataset: str
    nodes: list[str]
    step: int  # steps completed
    total_steps: int
    created: float
    updated: float
    error: str | None


@dataclass
class JobList:
    jobs: list[JobSummary]


@dataclass
class Event:
    time: float
    kind: str  # submitted, checkpoint, node_lost, shard_moved, step_failed, resumed, stopped, failed, done ...
    message: str


@dataclass
class CheckpointInfo:
    step: int
    path: str
    bytes: int
    created: float
    loss: float | None = None
    parts: int = 0  # a pipeline job's: one per stage, each signed by the node that wrote it
    signers: list[str] = bounded([], max_len=256)  # per part


@dataclass
class StageNode:
    """One node of a pipeline job: which stage of which replica, its layers, and how it fared."""

    node: str
    replica: int
    stage: int
    start: int
    end: int  # exclusive
    live: bool  # it computed the latest step
    memory_needed: int | None = None  # its estimate when the job (last) started here
    compute_s: float | None = None  # of the latest step: forward and backward passes
    busy: float | None = None  # the share of the latest step's pipeline phase spent computing
    activation_bytes: int | None = None  # the most saved activations it held at once


@dataclass
class FederatedClient:
    """One client of a federated job and how it took part."""

    node: str
    rows: int  # its FedAvg weight
    rounds: int  # rounds whose mean included its update
    last_round: int | None  # the latest of them
    last_loss: float | None  # the global model's loss on its data at that round's start


@dataclass
class FederationStatus:
    round: int  # rounds completed
    rounds: int
    strategy: str
    clients: list[FederatedClient]
    stragglers: int  # times a client missed a round's deadline
    dropouts: int  # times a client failed in a round
    failed_rounds: int  # rounds tried again for fewer than --min-clients updates
    secure_aggregation: bool


@dataclass
class PrivacySpent:
    """A DP job's guarantee so far: (epsilon, delta)-DP for each row of the dataset after ``steps`` steps."""

    epsilon: float
    delta: float
    steps: int
    clip: float
    noise_multiplier: float
    sample_rate: float  # each row's chance to be in a step's batch: batch size / rows
    epsilon_budget: float  # 0: none


@dataclass
class JobDetail:
    job: str
    state: str
    model: str
    dataset: str
    nodes: list[str]
    step: int
    total_steps: int
    created: float
    updated: float
    error: str | None
    spec: dict  # the JobSpec as submitted
    events: list[Event]
    last_metrics: dict | None  # the latest step's metrics row
    checkpoints: list[CheckpointInfo]
    parallelism: str = "data"
    stages: list[StageNode] = bounded([], max_len=65536)  # pipeline jobs: every node, replica-major
    federation: FederationStatus | None = None  # federated jobs
    privacy: PrivacySpent | None = None  # DP jobs
    last_eval: dict | None = None  # the latest metrics row with a held-out evaluation (eval_loss ...)


@dataclass
class JobState:
    job: str
    state: str


@dataclass
class Resumed:
    job: str
    state: str
    from_step: int


@dataclass
class Metrics:
    job: str
    state: str
    step: int
    total_steps: int
    metrics: list[dict]  # one row per step: loss, lr, grad_norm, tokens_per_s, step_s, compute_s, comm_s,
    # comm_exposed_s, bytes_sent, nodes (DP jobs also epsilon and delta; DiLoCo jobs: a row per outer
    # step, with inner_steps)
    more: bool = False  # rows after these did not fit one reply: ask again after the last step here


@dataclass
class CheckpointList:
    job: str
    checkpoints: list[CheckpointInfo]


@dataclass
class CheckpointChunk:
    """A chunk of one checkpoint file (one int8 tensor), with the signed manifest to check it against."""

    manifest: bytes  # the manifest's exact signed bytes
    signature: bytes  # by the coordinator's node key
    size: int  # of the whole file


TRAIN_PREPARE = Op("train.prepare", WorkerPrepareArgs, dict)
TRAIN_RING = Op("train.ring", RingArgs, dict)
TRAIN_BACKUP = Op("train.backup", BackupArgs, dict)
TRAIN_ROWS = Op("train.rows", RowsArgs, dict)
TRAIN_STEP = Op("train.step", StepArgs, dict)
TRAIN_APPLY = Op("train.apply", ApplyArgs, dict)
TRAIN_RESET = Op("train.reset", JobArgs, dict)
TRAIN_PROBE = Op("train.probe", ProbeArgs, Probed)
TRAIN_STATE = Op("train.state", StateArgs, dict)
TRAIN_LOAD_STATE = Op("train.load_state", LoadStateArgs, dict)
TRAIN_RELEASE = Op("train.release", ReleaseArgs, dict)
TRAIN_EVALUATE = Op("train.evaluate", EvaluateArgs, Evaluated)
TRAIN_STAGE_EVALUATE = Op("train.stage_evaluate", EvaluateArgs, Evaluated)
TRAIN_INNER = Op("train.inner", InnerStepArgs, InnerStepped)
TRAIN_SYNC = Op("train.sync", SyncArgs, Synced)
TRAIN_OUTER = Op("train.outer", SyncArgs, OuterApplied)
TRAIN_LINKS = Op("train.links", LinksArgs, dict)
TRAIN_PIPE = Op("train.pipe", PipeArgs, dict)
TRAIN_STAGE_STEP = Op("train.stage_step", StageStepArgs, StageStepped)
TRAIN_STAGE_APPLY = Op("train.stage_apply", StageApplyArgs, dict)
TRAIN_SAVE_PART = Op("train.save_part", SavePartArgs, PartInfo)
TRAIN_READ_PART = Op("train.read_part", PartReadArgs, CheckpointChunk)
TRAIN_FETCH_PART = Op("train.fetch_part", FetchPartArgs, PartInfo)
TRAIN_LOAD_PART = Op("train.load_part", LoadPartArgs, PartInfo)

JOBS_SUBMIT = Op("jobs.submit", JobSpec, Submitted)
JOBS_LIST = Op("jobs.list", NoArgs, JobList)
JOBS_SHOW = Op("jobs.show", JobArgs, JobDetail)
JOBS_STOP = Op("jobs.stop", JobArgs, JobState)
JOBS_RESUME = Op("jobs.resume", ResumeArgs, Resumed)
JOBS_METRICS = Op("jobs.metrics", MetricsArgs, Metrics)
CHECKPOINTS_LIST = Op("checkpoints.list", JobArgs, CheckpointList)
CHECKPOINTS_READ = Op("checkpoints.read", CheckpointReadArgs, CheckpointChunk)
