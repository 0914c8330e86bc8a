"""Text as tokens arrive: deltas to stream, and the stop strings that end a generation.

Decoding token by token would be wrong: byte-level BPE splits a character such as an emoji over
several tokens, and one token alone decodes to U+FFFD. So the whole sequence is decoded each
time, and text is handed out only when it does not end in U+FFFD (a character still incomplete)
and extends what was handed out. For tokenizers whose decoding of a prefix is a prefix of the
decoding (byte-level BPE, SentencePiece), the deltas joined equal the final text.

Stop strings are looked for in that decoded text, since a string may span tokens or cover part of
one: generation ends once the text contains one, and the text ends just before it (the stop string
itself is never handed out). While the text ends in what could still become a stop string, that
tail is held back, so a client never receives half of one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

log = logging.getLogger("dllmctl.generation")

MAX_STOPS = 4  # OpenAI's limit, for every front end
MAX_STOP_CHARS = 256


class TextStream:
    """The generated text so far minus what was already handed out; ``stopped`` once it holds a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.stopped:
            return ""
        text = self._text()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return self._hand_out(text[:min(cuts)])
        if text.endswith("\ufffd"):
            return ""
        return self._hand_out(text[:len(text) - self._held(text)])

    def finish(self) -> str:
        """What is left once generation ended (an incomplete character, a held-back tail at the very end)."""
        return "" if self.stopped else self._hand_out(self._text(), final=True)

    def _hand_out(self, text: str, final: bool = False) -> str:
        if not text.startswith(self.sent):
            if final:
                log.warning("this tokenizer's decoding changed text already streamed; the final text differs")
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that begin some stop string (a proper prefix of it)."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def check_stops(stop: Sequence[str]) -> str | None:
    """What is wrong with a request's stop strings, or None."""
    if len(stop) > MAX_STOPS:
        return f"at most {MAX_STOPS} stop strings, got {len(stop)}"
    for s in stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            return f"each stop string must be 1-{MAX_STOP_CHARS} characters"
    return None
