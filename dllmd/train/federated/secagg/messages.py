"""The round's configuration and messages as wire dataclasses (``dllmd.net.schema``): plain ints, bytes,
strings and lists, so a daemon passes them straight into RPC arguments and ``parse_args`` bounds them.

``bounded`` caps sizes; exact sizes (keys, signatures) and everything that depends on the round (indices
in range, neighbours, share points) are checked by the protocol itself (``round.py``, ``client.py``,
``server.py``). The masked vectors travel as tensors, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import bounded

MAX_CLIENTS = 4096
MAX_NEIGHBOURS = 256  # Shamir sharing is pure Python (pycryptodome): work grows with neighbours squared
MAX_LENGTH = 2**34  # elements of one update vector

KEY_BYTES = 32  # X25519 public and secret keys
SEED_BYTES = 16  # the self-mask seed b: one Shamir block
SIGNATURE_BYTES = 64  # Ed25519
COMMITMENT_BYTES = 32


@dataclass
class SecAggConfig:
    """What the coordinator announces for one round, and every client checks it agrees to. Each field is
    bound into everything signed or encrypted in the round (``Round.digest``)."""

    job: str = bounded(max_len=128)
    round: int = bounded(lo=0, hi=2**53)
    clients: list[str] = bounded(max_len=MAX_CLIENTS)  # node public keys (hex), in index order
    graph_seed: bytes = bounded(max_len=32)  # exactly 32 random bytes: picks the SecAgg+ neighbour graph
    length: int = bounded(lo=1, hi=MAX_LENGTH)  # elements of every client's update vector
    bits: int = bounded(32, lo=8, hi=32)  # sums are taken modulo 2**bits
    neighbours: int = bounded(0, lo=0, hi=MAX_NEIGHBOURS)  # 0: everyone up to complete_up_to, else 2*ceil(log2 n)
    threshold: int = bounded(0, lo=0, hi=MAX_NEIGHBOURS)  # shares that rebuild a secret; 0: half the neighbours + 1
    complete_up_to: int = bounded(8, lo=3, hi=MAX_NEIGHBOURS + 1)  # rounds this small use classic SecAgg


@dataclass
class Advertisement:
    """A client's two fresh X25519 public keys for the round, and a commitment to its self-mask seed,
    signed with its node identity."""

    index: int = bounded(lo=0, hi=MAX_CLIENTS - 1)
    c_public: bytes = bounded(max_len=KEY_BYTES)  # encrypts the shares sent to this client
    s_public: bytes = bounded(max_len=KEY_BYTES)  # agrees the pairwise masks
    b_commitment: bytes = bounded(max_len=COMMITMENT_BYTES)  # lets the coordinator check a rebuilt seed
    signature: bytes = bounded(max_len=SIGNATURE_BYTES)


@dataclass
class EncryptedShare:
    """Shares of ``sender``'s secrets (s key, self-mask seed) for ``recipient`` only: AEAD-encrypted between
    their c keys and signed by the sender's node identity. The coordinator only routes it."""

    sender: int = bounded(lo=0, hi=MAX_CLIENTS - 1)
    recipient: int = bounded(lo=0, hi=MAX_CLIENTS - 1)
    ciphertext: bytes = bounded(max_len=256)  # nonce, then the sealed share
    signature: bytes = bounded(max_len=SIGNATURE_BYTES)


@dataclass
class UnmaskRequest:
    """Who sent a masked input (``survivors``: reveal their seed shares) and who shared keys but did not
    (``dropped``: reveal their s-key shares). A client answers one request a round."""

    survivors: list[int] = bounded(max_len=MAX_CLIENTS)
    dropped: list[int] = bounded(max_len=MAX_CLIENTS)


SEED = "b"  # kinds of revealed share
S_KEY = "s"


@dataclass
class RevealedShare:
    """A survivor's share of one neighbour's secret, for the coordinator: of ``owner``'s self-mask seed
    (kind ``"b"``) or of its s secret key (kind ``"s"``), at the Shamir point ``owner`` gave this holder."""

    owner: int = bounded(lo=0, hi=MAX_CLIENTS - 1)
    kind: str = bounded(max_len=1)
    point: int = bounded(lo=1, hi=MAX_NEIGHBOURS)
    share: bytes = bounded(max_len=KEY_BYTES)
