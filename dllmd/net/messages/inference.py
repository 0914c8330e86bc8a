"""Sessions at a stage: ``session.open`` (a stream: opened, then tokens), ``session.forward`` (one-way:
steps pushed from the client or the previous stage), ``session.close``."""

from __future__ import annotations

from dataclasses import dataclass, field

from dllmd.net.schema import Op, bounded

MAX_BATCH = 64  # sessions per batched decode pass (and steps per session.forward message)
MAX_POSITIONS = 1_048_576  # prompt + generated tokens one session may reserve
MAX_STEP_TOKENS = 4096  # tokens per step: a longer prompt is sent in chunks
# The prefix cache matches prompts in whole blocks of this many tokens, each named by a chain hash
# (block i's hash covers blocks 0..i, so one key stands for the whole prefix up to it). Small, because
# a second request runs its tail from the last whole shared block: 16-token blocks left SmolLM2 25
# tokens to run after a 218-token shared prefix, 8-token blocks leave 16 (docs/inference.md).
PREFIX_BLOCK_TOKENS = 8
PREFIX_HASH_BYTES = 16
# Hashes one session.open may carry (24576 tokens): they must fit a message header (18 bytes each
# in msgpack, 64 KiB per header by default).
MAX_PREFIX_BLOCKS = 3072
MAX_STOP_IDS = 64  # token ids that end a generation fed back at the stage (eos, end of turn, ...)


@dataclass
class SamplingParams:
    temperature: float = bounded(0.0, lo=0.0, hi=100.0)  # 0: greedy
    top_p: float = bounded(1.0, lo=1e-6, hi=1.0)
    top_k: int = bounded(0, lo=0, hi=1_000_000)  # 0: no limit
    seed: int = bounded(0, lo=0, hi=2**63 - 1)
    # Penalties (dllmd/inference/sampling.py): transformers' multiplicative one over prompt and output
    # (1: off), OpenAI's additive ones over the output (0: off).
    repetition_penalty: float = bounded(1.0, lo=0.01, hi=100.0)
    frequency_penalty: float = bounded(0.0, lo=-2.0, hi=2.0)
    presence_penalty: float = bounded(0.0, lo=-2.0, hi=2.0)


@dataclass
class OpenArgs:
    session: str = bounded(max_len=64)
    model: str = bounded(max_len=128)
    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=0, hi=100_000)
    # What the session will hold at most: the stage reserves its KV cache for this many positions
    # up front (prompt_tokens + max_new_tokens), and refuses the open when that does not fit.
    prompt_tokens: int = bounded(lo=1, hi=MAX_POSITIONS)
    max_new_tokens: int = bounded(lo=0, hi=MAX_POSITIONS)
    next_address: str = bounded("", max_len=256)
    next_public_key: str = bounded("", max_len=64)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logits: str = bounded("none", max_len=8)
    ttl_s: float = bounded(600.0, lo=1.0, hi=3600.0)
    batching: bool = True  # False: this session's steps always run alone ("model" parallelism)
    # How this stage sends hidden states on (dllmd.net.codec): fp32 (as computed, exact), fp16, or
    # blockwise int8 with blocks of activation_block values along the hidden dimension.
    activations: str = bounded("fp32", max_len=8)
    activation_block: int = bounded(64, lo=1, hi=65536)
    # The chain hashes of the prompt's whole blocks (an opaque, client-keyed digest: no stage learns
    # the tokens from them). The stage reports how many leading blocks it holds in its prefix cache,
    # and caches the blocks this session computes, for this client's later sessions.
    prefix: list[bytes] = bounded([], max_len=MAX_PREFIX_BLOCKS)
    # Private mode (dllmd/inference/private.py): the client runs the embeddings, the first layers and
    # the head itself. The stage then takes hidden states only (token ids are refused), and the last
    # stage returns its hidden states instead of sampling a token.
    private: bool = False
    # With penalties, the stage that samples (the last) gets the session's tokens so far with the open, as
    # one int64 tensor [prompt_tokens]: the prompt, then the ``replayed`` tokens an earlier session of the
    # same generation produced (a failover's replay), which the additive penalties count as generated.
    replayed: int = bounded(0, lo=0, hi=MAX_POSITIONS)
    # A stage that holds the whole model (embeddings and head, no next hop, not private) may generate
    # by itself: it feeds each token it samples back as the session's next step, up to step
    # ``feed_back_until - 1``, and stops after a token of ``stop_ids``. The client then only reads the
    # tokens (and closes the session to stop it early): no round trip per token. 0: the client sends
    # every step.
    feed_back_until: int = bounded(0, lo=0, hi=MAX_POSITIONS)
    stop_ids: list[int] = bounded([], max_len=MAX_STOP_IDS)


@dataclass
class Opened:
    """The first reply on a session's stream; tokens follow on the same stream (last stage)."""

    opened: bool
    start: int
    end: int
    reserved_bytes: int  # KV-cache memory this stage set aside for the session
    # Leading prompt tokens (whole blocks of ``prefix``) this stage holds cached: the session's first
    # step may start at any block boundary up to here, and the stage starts its cache from them.
    cached_tokens: int = 0
    # The span's dtype: what a private client must send the first stage its hidden states in.
    dtype: str = "float32"


@dataclass
class StepItem:
    session: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**31)
    start: int = bounded(lo=0, hi=2**31)
    # False for every chunk of a long prompt but the last: the last stage samples only after the last.
    final: bool = True
    # How the step's hidden state travels (dllmd.net.codec): its tensors in the message are 1 (fp32,
    # fp16) or 2 (int8: values, scales). Token ids from the client are "fp32" (sent as they are).
    encoding: str = bounded("fp32", max_len=8)
    # Filled in along the chain, returned with the token: each stage's compute time, the batch it
    # ran in, and the bytes it pushed to the next stage (what `dllmctl bench infer` reports).
    compute_ms: list[float] = bounded([], max_len=256)
    batch: list[int] = bounded([], max_len=256)
    hop_bytes: list[int] = bounded([], max_len=256)


@dataclass
class ForwardArgs:
    items: list[StepItem] = bounded(max_len=MAX_BATCH)


@dataclass
class Queued:
    queued: int


@dataclass
class SessionArgs:
    session: str = bounded(max_len=64)


@dataclass
class Closed:
    closed: bool
    steps: int


@dataclass
class KeptAlive:
    steps: int  # steps the session has run here


SESSION_OPEN = Op("session.open", OpenArgs, Opened)
SESSION_FORWARD = Op("session.forward", ForwardArgs, Queued)
SESSION_CLOSE = Op("session.close", SessionArgs, Closed)
# The opener is still there: an idle session lives ttl_s past its last step or keepalive.
SESSION_KEEPALIVE = Op("session.keepalive", SessionArgs, KeptAlive)
