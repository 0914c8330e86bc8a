"""What every node answers: ``ping``, ``echo``, ``info`` (hardware and what it serves), ``node.stats`` (what it
is doing now: load, traffic, jobs), ``keys.*``, and ``peers.ping`` (round trips to its peers, measured and
remembered)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dllmd.net.messages.tensor import TensorSlice
from dllmd.net.schema import NoArgs, Op, bounded


@dataclass
class Pong:
    pong: bool
    time: float


@dataclass
class Gpu:
    index: int
    name: str
    memory_total: int
    memory_free: int


@dataclass
class Hardware:
    """What the machine has; memory and disk are read at each ``info``."""

    platform: str
    cpu_cores: int
    ram_total: int
    ram_available: int
    device: str  # where it computes: cuda, mps or cpu
    disk_free: int
    matmul_gflops: float  # measured once per machine (dllmd.hardware)
    torch: str
    gpus: list[Gpu] = field(default_factory=list)
    stream_gbps: float = 0.0  # weight bytes a one-row matmul reads per second (0: a node that predates it)


@dataclass
class ServedSpan:
    """One span a node serves, with its load and its measured speed (what routing weighs)."""

    model: str
    start: int
    end: int
    embed: bool
    head: bool
    dtype: str
    param_bytes: int
    sessions: int = 0
    kv_bytes: int = 0  # held by the sessions' caches now
    kv_reserved_bytes: int = 0  # reserved by the open sessions (what admission counts)
    queued: int = 0
    step_ms: float = 0.0  # recent decode pass time (a moving average)
    busy_s: float = 0.0
    passes: int = 0
    tokens: int = 0
    prefix_cache_bytes: int = 0  # cached prompt blocks of this model (shared by a client's sessions)
    prefix_cache_blocks: int = 0
    tensor_slice: TensorSlice | None = None  # a tensor-parallel member's part of each layer
    group_port: int = 0  # where the other members of its group reach it (on this node's host)
    group_ready: bool = False  # linked to every other member (group.connect)
    group_broken: str = ""  # why the group cannot run passes any more ("" while it can)
    reductions: int = 0
    reduce_s: float = 0.0  # time in reductions, of which waiting for slower members:
    reduce_wait_s: float = 0.0


@dataclass
class NodeLimits:
    """What the machine's owner lets dllm use of it (node.toml's ``[limits]``; 0 or None: no cap)."""

    memory_bytes: int = 0  # weights + KV caches + activations, RAM or VRAM
    threads: int = 0  # compute threads; 0: torch's default
    gpus: list[int] | None = None  # the GPUs it may use; []: CPU only; None: all


MAX_PEERS_PINGED = 64  # peers one peers.ping measures (a group's members, or a small cluster's nodes)


@dataclass
class PeerArgs:
    public_key: str = bounded(max_len=64)
    endpoint: str = bounded(max_len=256)  # where this node reaches it, tcp://host:port


@dataclass
class PingPeersArgs:
    peers: list[PeerArgs] = bounded(max_len=MAX_PEERS_PINGED)
    count: int = bounded(5, lo=1, hi=50)  # round trips timed per peer, after one that connects
    max_age_s: float = bounded(0.0, lo=0.0, hi=86_400.0)  # a remembered round trip this young is answered as is


@dataclass
class PeerRtt:
    """A round trip from this node to a peer: the median of ``samples`` pings, measured at
    ``measured_at`` (unix time); ``error`` is an error code where it could not be measured."""

    public_key: str
    endpoint: str
    rtt_ms: float = 0.0
    samples: int = 0
    measured_at: float = 0.0
    error: str = ""  # "" measured; forbidden: not a peer of this node (never connected); unavailable
    message: str = ""


@dataclass
class PeerRtts:
    peers: list[PeerRtt] = field(default_factory=list)


@dataclass
class Info:
    node_id: str
    name: str
    public_key: str
    version: str
    protocol_version: int
    role: str  # the caller's role on this node
    endpoint: str
    uptime_s: float
    rss_bytes: int
    hardware: Hardware
    serving: list[ServedSpan] = field(default_factory=list)
    kv_budget_bytes: int = 0  # what this node lets sessions' KV caches reserve in all
    limits: NodeLimits = field(default_factory=NodeLimits)
    memory_used_bytes: int = 0  # weights held and loading + KV caches reserved: what limits.memory_bytes caps
    prefix_cache_limit_bytes: int = 0  # the most the prefix cache holds (within what sessions leave unreserved)
    peer_rtts: list[PeerRtt] = field(default_factory=list)  # the round trips peers.ping measured last


@dataclass
class GpuLoad:
    """One GPU's load now; ``util_percent`` is None where the driver's counters cannot be read (no NVML)."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    util_percent: float | None = None


@dataclass
class RunningJob:
    """A training job this node coordinates that has not finished, with its latest step's figures."""

    job: str
    state: str
    step: int  # steps completed
    total_steps: int
    loss: float | None = None
    tokens_per_s: float | None = None
    step_s: float | None = None


@dataclass
class NodeStats:
    """What a node is doing now (``node.stats``): the same counters its Prometheus endpoint exports
    (dllmd/observe/), so a live view and a scrape never disagree."""

    name: str
    uptime_s: float
    cpu_percent: float  # the whole machine, over the last sampling second
    cpu_cores: int
    ram_used_bytes: int  # the whole machine
    ram_total_bytes: int
    rss_bytes: int  # this daemon
    gpus: list[GpuLoad] = field(default_factory=list)  # empty on a CPU-only node
    serving: list[ServedSpan] = field(default_factory=list)  # what 'nodes list' shows (spans, tensor slices, load)
    sessions: int = 0  # open inference sessions
    queued: int = 0  # steps waiting for a pass
    tokens_generated: int = 0  # sampled by this node's last stages since it started
    tokens_per_s: float = 0.0  # of those, over the last ~10 s
    tokens_processed: int = 0  # token positions run through this node's layers (prefill and decode)
    processed_per_s: float = 0.0  # of those, over the last ~10 s
    requests: int = 0  # answered since start
    errors: int = 0  # of those, answered with an error
    jobs: list[RunningJob] = field(default_factory=list)
    train_workers: list[str] = field(default_factory=list)  # jobs this node holds a replica or stage of


@dataclass
class KeyArgs:
    public_key: str = bounded(max_len=64)


@dataclass
class AuthorizeArgs:
    public_key: str = bounded(max_len=64)
    role: str = bounded(max_len=16)
    name: str = bounded("", max_len=64)
    models: list[str] | None = bounded(None, max_len=256)  # the models it may run here (None: all)


@dataclass
class KeyEntry:
    public_key: str
    role: str
    name: str
    models: list[str] | None = None  # the models it may run (None: every model)


@dataclass
class KeyList:
    keys: list[KeyEntry]


@dataclass
class Revoked:
    revoked: bool


PING = Op("ping", NoArgs, Pong)
ECHO = Op("echo", NoArgs, NoArgs)  # the tensors come back as they went
INFO = Op("info", NoArgs, Info)
NODE_STATS = Op("node.stats", NoArgs, NodeStats)
KEYS_LIST = Op("keys.list", NoArgs, KeyList)
KEYS_AUTHORIZE = Op("keys.authorize", AuthorizeArgs, KeyEntry)
KEYS_REVOKE = Op("keys.revoke", KeyArgs, Revoked)
PEERS_PING = Op("peers.ping", PingPeersArgs, PeerRtts)
