"""OpenAI-compatible request and response bodies: JSON <-> the service's own request.

A ``/v1/completions`` or ``/v1/chat/completions`` body becomes a ``GenerateRequest``, which then
goes through the same validation and backend path as a gRPC call (``router/servicer.py``).
What the service cannot honour is refused with a ``ValueError`` (-> 400) that says so, never
ignored: ``n`` > 1, ``stop`` strings, ``logprobs``, ``echo``, penalties, tools, ...

Defaults follow the OpenAI API: unset ``temperature`` is 1.0 (sampling; send 0 for greedy),
unset ``max_tokens`` is the router's ``default_max_tokens`` (256, shortened to fit the context).
Extra fields the service understands (as vLLM does): ``top_k``, ``stop_token_ids``,
``ignore_eos``, ``cache_salt``, ``seed``.
"""

from __future__ import annotations

import time
from typing import Any

from proto import strata_pb2
from router.validation import check_field, check_token_ids

_FIELD = {"max_completion_tokens": "max_tokens"}  # OpenAI's name -> the request field

_UNSUPPORTED = {
    "stop": "stop strings are not supported; use stop_token_ids",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "logit_bias": "logit_bias is not supported",
    "tools": "tools are not supported",
    "functions": "functions are not supported",
    "presence_penalty": "presence_penalty is not supported (only 0)",
    "frequency_penalty": "frequency_penalty is not supported (only 0)",
}
_IGNORED = {"user", "stream", "stream_options", "model", "prompt", "messages", "n", "best_of"}
_ACCEPTED = {
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "top_k",
    "stop_token_ids", "ignore_eos", "cache_salt", "tool_choice", "response_format",
    "parallel_tool_calls", "metadata", "store",
}  # fmt: skip


def _number(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{key} must be {'a number' if kind is float else 'an integer'}")
    check_field(_FIELD.get(key, key), kind(value))
    return kind(value)


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise ValueError(f"{key} must be a list of integers")
    check_token_ids(value, key)
    return value


def _check_common(body: dict[str, Any], served_model: str) -> None:
    for key, why in _UNSUPPORTED.items():
        value = body.get(key)
        if value not in (None, False, 0, 0.0, [], {}):
            raise ValueError(why)
    unknown = sorted(set(body) - _IGNORED - _ACCEPTED - set(_UNSUPPORTED))
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    model = body.get("model")
    if model is not None and model != served_model:
        raise ValueError(
            f"model {model!r} is not served here; this service serves {served_model!r}"
        )
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise ValueError(f"{key} must be 1 (one completion per request)")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ValueError("response_format other than text is not supported")


def _fill_sampling(req: strata_pb2.GenerateRequest, body: dict[str, Any]) -> None:
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    if max_tokens is not None:
        req.max_tokens = max_tokens
    temperature = _number(body, "temperature", float)
    if temperature is not None:
        req.temperature = temperature
    top_p = _number(body, "top_p", float)
    if top_p is not None:
        req.top_p = top_p
    seed = _number(body, "seed", int)
    if seed is not None:
        if seed < 0:
            raise ValueError("seed must be >= 0")
        req.seed = seed
    req.top_k = _number(body, "top_k", int) or 0
    if body.get("stop_token_ids") is not None:
        req.stop_token_ids.extend(_int_list(body["stop_token_ids"], "stop_token_ids"))
    req.ignore_eos = bool(body.get("ignore_eos", False))
    salt = body.get("cache_salt", "")
    if not isinstance(salt, str):
        raise ValueError("cache_salt must be a string")
    req.cache_salt = salt


def completion_request(body: Any, served_model: str) -> strata_pb2.GenerateRequest:
    """``/v1/completions``: ``prompt`` is a string or a list of token ids (one prompt)."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    _check_common(body, served_model)
    req = strata_pb2.GenerateRequest()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        req.prompt_token_ids.extend(_int_list(prompt, "prompt"))
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ValueError("one prompt per request (batches of prompts are not supported)")
    else:
        raise ValueError("prompt must be a string or a list of token ids")
    _fill_sampling(req, body)
    return req


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts")


def chat_request(body: Any, served_model: str) -> strata_pb2.GenerateRequest:
    """``/v1/chat/completions``: ``messages`` rendered by the model's chat template."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    _check_common(body, served_model)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    req = strata_pb2.GenerateRequest()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role must be a string")
        req.messages.add(role=role, content=_content_text(m.get("content"), i))
    _fill_sampling(req, body)
    return req


def usage_json(usage: strata_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        # the service's own details: where the cached prefix came from, server-side TTFT
        "strata": {
            "cached_tokens_by_tier": dict(usage.cached_tokens_by_tier),
            "ttft_ms": usage.ttft_ms,
            "prefill_worker": usage.prefill_worker,
            "decode_worker": usage.decode_worker,
        },
    }


def error_json(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def chunk_json(
    chat: bool, rid: str, model: str, created: int, text: str, finish: str | None, first: bool
) -> dict[str, Any]:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def full_json(
    chat: bool, rid: str, model: str, created: int, text: str, finish: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """A whole (not streamed) answer."""
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def now_s() -> int:
    return int(time.time())
