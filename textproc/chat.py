"""Chat templates: a model's Jinja template that turns chat messages into prompt text.

Rendered the way Hugging Face chat templates expect (a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, a ``tojson`` that keeps non-ASCII
text, ``bos_token`` / ``eos_token`` and ``add_generation_prompt`` in scope). Templates come from
model files, so they run sandboxed: no attribute access to Python internals, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str  # the message text


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """ValueError saying what is wrong with a conversation (empty, unknown role, ...)."""
    if not messages:
        raise ValueError("empty conversation: messages needs at least one message")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


class ChatTemplate:
    """One compiled template; ``render`` returns the prompt text (ends with the assistant's
    turn opened, ready for generation)."""

    def __init__(
        self, source_text: str, bos_token: str = "", eos_token: str = "", source: str = ""
    ) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.text = source_text
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source_text)
        except jinja2.TemplateError as e:
            raise ValueError(f"{source or 'chat template'}: cannot compile: {e}") from None

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        import jinja2

        check_messages(messages)
        try:
            return self._template.render(
                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the conversation: {e}") from None


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,  # any JSON value
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
