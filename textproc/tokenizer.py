"""Tokenizers. Torch-free on purpose: the router imports this module to tokenize requests.

- ``ByteTokenizer``: the built-in random models' byte-level tokenizer (ids 0-255 are bytes, then
  BOS and EOS); no chat template.
- ``HFTokenizer``: a ``tokenizer.json`` through the ``tokenizers`` library, with the special
  tokens and chat template of the ``tokenizer_config.json`` beside it.
- ``load_tokenizer``: the tokenizer of a model name, checkpoint directory or GGUF file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from textproc.chat import ChatTemplate


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def chat_template(self) -> ChatTemplate | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; BOS = 256, EOS = 257."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    chat_template: ChatTemplate | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """``tokenizer.json`` (+ ``tokenizer_config.json``: BOS, EOS, chat template)."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # the library raises plain Exceptions with its reason
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = None
        self.eos_token_id: int | None = None
        self.chat_template: ChatTemplate | None = None
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{cfg_path}: cannot read: {e}") from None
            self._configure(cfg, cfg_path)

    def _configure(self, cfg: Mapping[str, object], where: str) -> None:
        for attr, key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                setattr(self, attr, self._tok.token_to_id(tok))
        template = cfg.get("chat_template")
        if isinstance(template, str) and template:
            self.chat_template = ChatTemplate(
                template,
                bos_token=_token_text(cfg.get("bos_token")),
                eos_token=_token_text(cfg.get("eos_token")),
                source=where,
            )

    def encode(self, text: str) -> list[int]:
        # Special tokens written in the text (a rendered chat template) stay whole; nothing is
        # added around the text.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _token_text(tok: object) -> str:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else ""


def load_tokenizer(model: str) -> Tokenizer | None:
    """The tokenizer of a built-in name, a checkpoint directory or a GGUF file (by path or
    built-in name); None if a checkpoint directory has none (it serves token ids only)."""
    from textproc.gguf_models import find_gguf

    gguf_path = find_gguf(model)
    if gguf_path is not None:
        from textproc.gguf_cache import gguf_tokenizer_dir

        return HFTokenizer(os.path.join(gguf_tokenizer_dir(gguf_path), "tokenizer.json"))
    if not os.path.isdir(model):
        return ByteTokenizer()
    path = os.path.join(model, "tokenizer.json")
    return HFTokenizer(path) if os.path.exists(path) else None


def render_chat(tokenizer: Tokenizer | None, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (ValueError when the
    model has none or the template refuses the conversation)."""
    template = tokenizer.chat_template if tokenizer is not None else None
    if tokenizer is None or template is None:
        raise ValueError(
            "this model has no chat template: send prompt (text) or prompt_token_ids instead "
            "of chat messages"
        )
    return tokenizer.encode(template.render(messages))
