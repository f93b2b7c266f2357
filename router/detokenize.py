"""Incremental detokenization: text deltas for a growing list of token ids.

Decoding a single token on its own can be wrong (a multi-byte character split over tokens, a
tokenizer that drops a leading space at the start of a sequence), so each step decodes a short
window ``ids[prefix_offset:]`` and emits what it adds beyond ``ids[prefix_offset:read_offset]``;
text ending in U+FFFD (an incomplete character) is held back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Decoder
    token_ids: list[int] = field(default_factory=list)  # every generated id so far
    prefix_offset: int = 0  # start of the decode window
    read_offset: int = 0  # ids before this are already emitted as text

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids``; return the text they complete (may be "")."""
        self.token_ids.extend(new_ids)
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.token_ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end is emitted as U+FFFD)."""
        prefix_text = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
