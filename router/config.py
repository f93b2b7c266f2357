"""Router configuration (one frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_model_len: int = 4096  # prompt + generated tokens per request
    max_prompt_tokens: int | None = None  # None -> max_model_len - 1
    default_max_tokens: int = 256  # when a request leaves max_tokens unset
    max_in_flight: int = 128  # concurrent Generate calls; more -> RESOURCE_EXHAUSTED
    default_timeout_s: float = 600.0  # deadline of a request whose client sets none
    # threads for the blocking work the router's event loop hands off (tokenizing text prompts,
    # the Stats calls into every worker); > max_in_flight so a burst of them never queues
    max_workers: int = 160
    max_message_bytes: int = 64 << 20
    auth_token: str | None = None  # when set, clients send `authorization: Bearer <token>`
    metrics_port: int | None = None  # Prometheus HTTP exposition; None -> off
    http_port: int | None = None  # OpenAI-compatible HTTP API (0 picks a free port); None -> off

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prompt_tokens is not None and not (
            1 <= self.max_prompt_tokens < self.max_model_len
        ):
            raise ValueError("max_prompt_tokens must be in [1, max_model_len) or None")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.max_workers <= self.max_in_flight:
            raise ValueError(
                f"max_workers ({self.max_workers}) must exceed max_in_flight "
                f"({self.max_in_flight}) so Stats/Health and refusals still get a thread"
            )
        if self.default_timeout_s <= 0:
            raise ValueError("default_timeout_s must be positive")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must be non-empty (or None to turn auth off)")

    @property
    def prompt_limit(self) -> int:
        return (
            self.max_prompt_tokens
            if self.max_prompt_tokens is not None
            else (self.max_model_len - 1)
        )


@dataclass(frozen=True)
class BackendConfig:
    """How the router talks to its workers (the ``backend`` section of the service YAML)."""

    event_poll_s: float = 0.2  # how often worker events are pulled into the index
    transfer_timeout_s: float = 30.0  # decode worker's wait for pushed blocks, then recompute
    # times a request may move on after the worker serving it was lost (bounds a request that
    # takes every worker it lands on down with it; an error otherwise reaches the client only
    # when no worker of a role is alive or the deadline passes)
    max_retries: int = 8
    call_timeout_s: float = 10.0  # control calls (stats, prefetch, abort)
    max_buffered_tokens: int = 4096  # a client this far behind its decode worker is cut off
    connect_timeout_s: float = 60.0  # for a decode worker's output stream
    revive_timeout_s: float = 600.0  # how long a down worker is waited for (Ray restarts it)
    # a request that finds no worker of a role up while one restarts waits this long for it
    no_worker_wait_s: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "event_poll_s",
            "transfer_timeout_s",
            "call_timeout_s",
            "connect_timeout_s",
            "revive_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"backend.{name} must be positive")
        if self.no_worker_wait_s < 0:
            raise ValueError("backend.no_worker_wait_s must be >= 0")
        if self.max_retries < 0:
            raise ValueError("backend.max_retries must be >= 0")
        if self.max_buffered_tokens < 1:
            raise ValueError("backend.max_buffered_tokens must be >= 1")
