"""A GGUF file's tokenizer as ``tokenizer.json`` + ``tokenizer_config.json``, built with the
``tokenizers`` library from the file's metadata (vocabulary, merges, token types, special token
ids, chat template).

Supported: byte-level BPE vocabularies (``tokenizer.ggml.model = "gpt2"``: SmolLM, Llama 3,
Qwen2 and most recent models). The text is split before BPE the way ``tokenizer.ggml.pre``
says, as llama.cpp does: ``smollm`` (and the StarCoder family) split every digit apart first,
then the GPT-2 pattern; ``llama-bpe`` / ``llama3`` use Llama 3's pattern; others the GPT-2
pattern. Tokens typed CONTROL (3) become special added tokens (kept whole, dropped when
decoding), USER_DEFINED (4) plain added tokens. SentencePiece vocabularies
(``tokenizer.ggml.model = "llama"``) are refused with a clear error.
"""

from __future__ import annotations

import logging
from typing import Any

from textproc.gguf_models import field_value, require_field

logger = logging.getLogger(__name__)

TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell")
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE vocabularies spell
    their tokens in it)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _pre_tokenizer(pre: str | None) -> Any:  # a tokenizers PreTokenizer
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre is not None and pre not in _GPT2:
        logger.warning("GGUF pre-tokenizer %r not known here: splitting text like GPT-2", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_files(reader: Any, path: str) -> tuple[str, dict[str, Any]]:
    """(``tokenizer.json`` text, ``tokenizer_config.json`` dict) of an open GGUF file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = field_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer type {kind!r} is not supported (only byte-level BPE, "
            "tokenizer.ggml.model = 'gpt2'); serve it by token ids from a checkpoint directory "
            "instead"
        )
    tokens: list[str] = list(require_field(reader, "tokenizer.ggml.tokens", path))
    merges_raw: list[str] = list(require_field(reader, "tokenizer.ggml.merges", path))
    types: list[int] = list(field_value(reader, "tokenizer.ggml.token_type", []))
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())

    def respell(tok: str) -> str:
        return tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode())

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # the library's own error types
        raise ValueError(f"{path}: cannot build the BPE tokenizer: {e}") from None
    tok.pre_tokenizer = _pre_tokenizer(field_value(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    by_type = list(zip(tokens, types))
    control = [t for t, k in by_type if k == TOKEN_CONTROL and set(t) <= spelled]
    user = [t for t, k in by_type if k == TOKEN_USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def special(key: str) -> str | None:
        idx = field_value(reader, f"tokenizer.ggml.{key}")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field_value(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(field_value(reader, "llama.context_length", 0) or 0) or None,
        "source": "gguf",
    }
    template = field_value(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok.to_str(), config
