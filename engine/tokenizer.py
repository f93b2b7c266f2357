"""Tokenizers. Torch-free on purpose: the router imports this module to tokenize requests.

- ``ByteTokenizer``: the built-in models' byte-level tokenizer (ids 0-255 are bytes, then BOS
  and EOS).
- ``HFTokenizer``: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import os
from typing import Protocol


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; BOS = 256, EOS = 257."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # the library raises plain Exceptions with its reason
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = None
        self.eos_token_id: int | None = None
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
            for attr, key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
                tok = cfg.get(key)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if isinstance(tok, str):
                    setattr(self, attr, self._tok.token_to_id(tok))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model: str) -> Tokenizer | None:
    """The tokenizer of a built-in model name or checkpoint directory; None if it has none."""
    if not os.path.isdir(model):
        return ByteTokenizer()
    path = os.path.join(model, "tokenizer.json")
    return HFTokenizer(path) if os.path.exists(path) else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, new_ids: list[int]) -> str:
        if self._tok is None:
            return ""
        self._ids.extend(new_ids)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else text
        self._emitted = text
        return delta
