"""Private sessions at a stage: hidden states in, hidden states out, never a token id or a logit.

In private mode the client holds the embeddings, the first layers and the final norm and head, so no
node sees which tokens a prompt has or which tokens come back (docs/security.md says how far that
goes). A stage of a private session therefore refuses what would reveal them: a span with the
embeddings (it would be sent token ids) or the head (it would compute logits), and any step that
carries token ids. The last stage sends its hidden states back on the session's stream instead of
sampling.
"""

from __future__ import annotations

import torch

from dllmd.models.span import LayerSpan
from dllmd.net.messages.inference import OpenArgs, StepItem
from dllmd.net.server import HandlerError, Responder
from dllmd.net.wire import ErrorCode

# Dtypes of token ids: a private session's step never carries them, whatever its encoding says.
TOKEN_DTYPES = (torch.int64, torch.int32)


def check_private_open(span: LayerSpan, args: OpenArgs) -> None:
    """Refuse a private session on a span that would see tokens or logits."""
    if span.embed or span.head:
        part = "embeddings" if span.embed else "head"
        raise HandlerError(ErrorCode.BAD_ARGS, f"a private session runs on spans without embeddings or head; this "
                                               f"node holds the {part} of {args.model} (deploy it with --private)")


def check_next_hop(span: LayerSpan, args: OpenArgs) -> None:
    """Every stage but the last pushes to a next hop. An ordinary session's last stage is the head; a
    private session's last stage has no head (its hidden states go back to the client), so only the
    client can say which stage is last: by naming no next hop."""
    if not args.private and span.head == bool(args.next_address):
        raise HandlerError(ErrorCode.BAD_ARGS, "the last stage takes no next hop; every other stage needs one")


def refuse_token_ids(parts: list[torch.Tensor]) -> None:
    """A private session's steps carry hidden states only: token ids are refused before anything runs."""
    if any(p.dtype in TOKEN_DTYPES for p in parts):
        raise HandlerError(ErrorCode.BAD_ARGS, "this session is private: it takes hidden states, never token ids")


def send_hidden(stream: Responder, item: StepItem, out: torch.Tensor, logits: str, trace: dict) -> None:
    """The last stage of a private session: its hidden states go back to the client, which runs the
    norm and head and samples. Only the last position unless the client wants every position's logits."""
    if not item.final:
        if logits == "all":
            stream.send({"step": item.step, "chunk": True, **trace}, [out[0].cpu()])
        return
    kept = out[0] if logits == "all" else out[0, -1:]
    stream.send({"step": item.step, "hidden": True, **trace}, [kept.cpu()])
