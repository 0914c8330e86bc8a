"""What secure aggregation refuses, as codes a caller branches on (never on the message text).

Two kinds: :class:`SecAggRejected` says one message (or one call) was refused and nothing changed, so
the caller may carry on without it (the coordinator treats that client as dropped); :class:`SecAggAborted`
says the round cannot finish for this party (a client that aborts never answers another request of
the round, so a misbehaving coordinator gets nothing more out of it).
"""

from __future__ import annotations


class SecAggCode:
    BAD_CONFIG = "bad_config"  # the round's configuration is inconsistent
    WRONG_STATE = "wrong_state"  # a step out of order, or one taken twice
    BAD_MESSAGE = "bad_message"  # malformed: sizes, indices, senders, recipients, share points
    DUPLICATE = "duplicate"  # a second message from one sender, or about one (client, secret)
    BAD_SIGNATURE = "bad_signature"  # not signed by the node key of the client it claims to come from
    BAD_CIPHERTEXT = "bad_ciphertext"  # an encrypted share that does not decrypt under its context
    BAD_INPUT = "bad_input"  # an encoded or masked vector of the wrong dtype, length or range
    TOO_FEW_CLIENTS = "too_few_clients"  # fewer clients left than the threshold allows to go on
    TOO_FEW_NEIGHBOURS = "too_few_neighbours"  # a client has fewer live neighbours than the threshold
    BOTH_SHARES = "both_shares"  # an unmask request that would reveal both secrets of one client
    TOO_FEW_SHARES = "too_few_shares"  # a secret with fewer revealed shares than the threshold
    BAD_SHARES = "bad_shares"  # the revealed shares rebuild a secret that does not match its commitment


class SecAggError(Exception):
    """A secure-aggregation failure: ``code`` (a :class:`SecAggCode`) and, where one is to blame or could
    not be recovered, the index of that ``client``."""

    def __init__(self, code: str, message: str, client: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.client = client


class SecAggRejected(SecAggError):
    """One message or call was refused; the state is as it was before."""


class SecAggAborted(SecAggError):
    """The round cannot finish for this party; its object answers nothing more."""
