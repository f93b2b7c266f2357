"""Turn a wire ``GenerateRequest`` into a validated ``GenRequest`` (or a ``ValueError`` saying
what is wrong; the servicer maps it to INVALID_ARGUMENT)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Protocol

from proto import strata_pb2
from proto.worker_api import SamplingParams
from router.config import RouterConfig
from router.types import GenRequest

MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_LEN = 128
MAX_CACHE_SALT_LEN = 256
INT32_MAX = (1 << 31) - 1
UINT64_MAX = (1 << 64) - 1
# The numeric fields of a request and their bounds on the wire (the client checks them before
# sending, the HTTP API before building the request; the servicer checks the rest below).
FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    "max_tokens": (1, INT32_MAX),
    "top_k": (0, INT32_MAX),
    "seed": (0, UINT64_MAX),
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
}


def check_field(name: str, value: float | None) -> None:
    """``value`` of request field ``name`` is a finite number within its bounds (None: unset);
    ValueError naming the field otherwise."""
    if value is None:
        return
    lo, hi = FIELD_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if name in ("max_tokens", "top_k", "seed") and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    if name == "top_p" and not 0.0 < value <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {value}")
    if not lo <= value <= hi:
        bound = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def check_token_ids(ids: Sequence[int], name: str) -> None:
    """Token ids fit the wire's int32 and are not negative (the vocabulary is checked by the
    servicer)."""
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= INT32_MAX:
            raise ValueError(f"{name} must hold token ids in [0, {INT32_MAX}], got {i!r}")


class Tokenizer(Protocol):
    vocab_size: int
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (ValueError
        when the model has none)."""
        ...


def validate_request(
    request: strata_pb2.GenerateRequest, tokenizer: Tokenizer, config: RouterConfig
) -> GenRequest:
    """Check every field; tokenize a text prompt or render a conversation. Raises
    ``ValueError`` with the reason."""
    forms = {
        "prompt": request.HasField("prompt"),
        "prompt_token_ids": len(request.prompt_token_ids) > 0,
        "messages": len(request.messages) > 0,
    }
    given = [name for name, present in forms.items() if present]
    if len(given) > 1:
        raise ValueError(
            f"set exactly one of prompt, prompt_token_ids and messages; got {' and '.join(given)}"
        )
    if not given:
        raise ValueError("empty prompt: set prompt (text), prompt_token_ids or messages (chat)")
    if forms["prompt"]:
        if not request.prompt:
            raise ValueError("empty prompt: prompt is an empty string")
        ids = tuple(tokenizer.encode(request.prompt))
        if not ids:
            raise ValueError("empty prompt: the text tokenizes to no tokens")
    elif forms["messages"]:
        chat = [{"role": m.role, "content": m.content} for m in request.messages]
        ids = tuple(tokenizer.encode_chat(chat))
    else:
        ids = tuple(request.prompt_token_ids)
    vocab = tokenizer.vocab_size
    _check_ids(ids, vocab, "prompt_token_ids")
    if len(ids) > config.prompt_limit:
        raise ValueError(f"prompt too long: {len(ids)} tokens, the limit is {config.prompt_limit}")

    max_tokens = (
        request.max_tokens
        if request.HasField("max_tokens")
        else min(config.default_max_tokens, config.max_model_len - len(ids))
    )
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(ids) + max_tokens > config.max_model_len:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds max_model_len "
            f"({config.max_model_len}); lower max_tokens to at most "
            f"{config.max_model_len - len(ids)}"
        )

    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if request.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {request.top_k}")

    stop_ids = tuple(request.stop_token_ids)
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(stop_ids)}")
    _check_ids(stop_ids, vocab, "stop_token_ids")
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        raise ValueError(f"request_id longer than {MAX_REQUEST_ID_LEN} characters")
    if len(request.cache_salt) > MAX_CACHE_SALT_LEN:
        raise ValueError(f"cache_salt longer than {MAX_CACHE_SALT_LEN} characters")

    return GenRequest(
        req_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=ids,
        sampling=SamplingParams(
            max_tokens=max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=request.top_k,
            seed=request.seed if request.HasField("seed") else None,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
        ),
        cache_salt=request.cache_salt,
    )


def _check_ids(ids: tuple[int, ...], vocab_size: int, what: str) -> None:
    if not ids:
        return
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} contains {bad}, outside the vocabulary [0, {vocab_size})")
