"""Checks run before Ray starts anything: the model path, the ports and the disk path. Each
failure is a ``UsageError`` (or ``ServiceRunningError`` when the port belongs to a running
Strata service) with one line naming the problem; together they take well under a second and
import neither torch nor Ray."""

from __future__ import annotations

import errno
import os
import socket

from cluster.errors import ServiceRunningError, UsageError

# engine.loader.BUILTIN_MODELS (random-weight shapes) and textproc.gguf_models.GGUF_MODELS,
# by name, without importing torch (a test keeps this list equal to theirs).
BUILTIN_MODEL_NAMES = ("tiny", "llama-3.2-1b", "llama-3.1-8b", "smollm2-135m")


def check_model(model: str) -> None:
    """A built-in name, a checkpoint directory with config.json, or a *.gguf file."""
    if model in BUILTIN_MODEL_NAMES:
        from textproc.gguf_models import GGUF_MODELS, find_gguf

        if model in GGUF_MODELS:
            try:
                find_gguf(model)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return
    if model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise UsageError(f"--model {model}: no such GGUF file")
        return
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UsageError(
                f"--model {model}: the directory has no config.json (a Hugging Face checkpoint "
                "directory needs config.json and *.safetensors)"
            )
        return
    if os.path.exists(model):
        raise UsageError(f"--model {model}: not a directory nor a *.gguf file")
    looks_like_path = os.sep in model or model.startswith((".", "~"))
    raise UsageError(
        f"--model {model}: no such directory"
        if looks_like_path
        else f"--model {model}: unknown model; built-in names: {', '.join(BUILTIN_MODEL_NAMES)}, "
        "or give a checkpoint directory or a *.gguf file"
    )


def check_port(host: str, port: int | None, flag: str) -> None:
    """``port`` can be bound on ``host`` (0 and None always pass)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                running = strata_service_at(f"{_client_host(host)}:{port}")
                if running is not None:
                    raise ServiceRunningError(running) from None
                raise UsageError(
                    f"{flag} {port}: the port is in use on {host} by another program; choose "
                    f"another with {flag}"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
                raise UsageError(f"--host {host}: not an address of this machine") from None
            raise UsageError(f"{flag} {port}: cannot listen on {host}: {e.strerror}") from None


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "", "::", "[::]") else bind_host


def strata_service_at(address: str, timeout_s: float = 1.0) -> str | None:
    """A sentence about the Strata service answering at ``address``, or None when nothing
    there speaks Strata's gRPC API."""
    from router.client import StrataClient
    from router.errors import RemoteError

    try:
        with StrataClient(address) as client:
            info = client.health_info(timeout=timeout_s)
    except RemoteError as e:
        if e.code != "UNAUTHENTICATED":
            return None
        model = "a token-protected model"
    else:
        model = f"model {info.model}" if info.model else "its model"
    return (
        f"a Strata service already runs: gRPC on {address} ({model}); stop it with "
        "`strata down` (or Ctrl-C in the terminal of a foreground `strata up`)"
    )


def check_disk_path(path: str | None) -> None:
    """The disk tier's directory exists or can be made, and is writable."""
    if not path:
        return
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"--disk-path {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--disk-path {path}: {probe} is not writable")


def check_service(model: str, host: str, ports: dict[str, int | None], disk: str | None) -> None:
    """Everything ``strata up`` can check before Ray starts."""
    check_model(model)
    for flag, port in ports.items():
        check_port(host, port, flag)
    check_disk_path(disk)
