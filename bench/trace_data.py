"""Mooncake-format traces: load, scale to the machine, make token ids, unbounded hit rate.

One JSON object a line: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``
(ids of the prompt's 512-token blocks; equal leading ids = a shared prefix). Scaled by
``length_scale``, each hash_id stands for a block of ``512 // length_scale`` tokens drawn from
a generator keyed by (seed, hash_id), so equal ids give equal tokens and prefixes are shared
exactly where the trace says.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

TRACE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int  # after scaling
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(
    path: str, max_requests: int | None = None, length_scale: float = 1.0,
    max_input: int | None = None, max_output: int | None = None,
) -> list[TraceRequest]:
    """The first ``max_requests`` requests, input lengths divided by ``length_scale``."""
    if length_scale <= 0 or TRACE_BLOCK_TOKENS / length_scale < 1:
        raise ValueError(f"--length-scale must be in (0, {TRACE_BLOCK_TOKENS}], got {length_scale}")
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_requests is not None and len(out) >= max_requests:
                break
            try:
                obj = json.loads(line)
                n_in = max(1, round(int(obj["input_length"]) / length_scale))
                n_out = max(1, int(obj["output_length"]))
                ids = tuple(int(h) for h in obj["hash_ids"])
                ts = float(obj["timestamp"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace record ({e})") from None
            if max_input is not None:
                n_in = min(n_in, max_input)
            if max_output is not None:
                n_out = min(n_out, max_output)
            out.append(TraceRequest(ts, n_in, n_out, ids))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def block_tokens(length_scale: float) -> int:
    return max(1, int(TRACE_BLOCK_TOKENS / length_scale))


def prompt_tokens(req: TraceRequest, req_index: int, length_scale: float, vocab_size: int,
                  seed: int = 0) -> list[int]:
    """Token ids of a request: one seeded block per hash_id, then request-private filler."""
    bt = block_tokens(length_scale)
    ids: list[int] = []
    for h in req.hash_ids:
        if len(ids) >= req.input_length:
            break
        rng = random.Random(f"{seed}:block:{h}")
        ids.extend(rng.randrange(vocab_size) for _ in range(bt))
    if len(ids) < req.input_length:
        rng = random.Random(f"{seed}:req:{req_index}")
        ids.extend(rng.randrange(vocab_size) for _ in range(req.input_length - len(ids)))
    return ids[: req.input_length]


def unbounded_hits(reqs: list[TraceRequest], length_scale: float) -> list[int]:
    """Prompt tokens of each request that an unbounded prefix cache would serve.

    A block counts as a hit when an earlier request had the same chain of hash_ids up to and
    including it; its tokens are those of this request that fall in the block.
    """
    bt = block_tokens(length_scale)
    seen: set[tuple[int, ...]] = set()
    hits: list[int] = []
    for req in reqs:
        n = 0
        chains = [req.hash_ids[: j + 1] for j in range(len(req.hash_ids))]
        for j, chain in enumerate(chains):
            tokens_in_block = max(0, min(bt, req.input_length - j * bt))
            if chain in seen:
                n += tokens_in_block
            else:
                break
        seen.update(chains)
        hits.append(n)
    return hits
