"""The receiving end of worker-to-worker KV transfer: a gRPC ``KVTransfer`` server.

A prefill worker pushes the blocks of one request (``PushBlocks``, after ``QueryBlocks`` told it
which ones are already here); another worker may pull blocks (``PullBlocks``). The server knows
nothing of tensors or tiers: it talks to a ``BlockSink`` (the decode worker's store adapter).

Contract with the sink (called from gRPC server threads, concurrently: it must be thread-safe):
- every push stream whose first chunk arrived ends in exactly one ``transfer_done(req_id, ok)``;
  ``ok`` is False when the stream broke (cancel, deadline, protocol error, a sink failure). Whole
  blocks already handed to ``write_blocks`` are valid (hash-keyed) and the sink may keep them;
  a block cut off half-way is dropped, never written.
- blocks reach ``write_blocks`` in batches (``batch_blocks`` blocks or ``batch_bytes`` bytes) so
  memory stays bounded by one batch, not by the whole request.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Protocol

import grpc

from kvstore.errors import StrataError
from kvstore.keys import BlockHash
from proto import kv_wire, strata_pb2, strata_pb2_grpc

logger = logging.getLogger(__name__)

PULL_READ_BATCH = 8  # blocks read from the sink at a time when serving a pull


class BlockSink(Protocol):
    def has_blocks(self, hashes: Sequence[BlockHash]) -> list[bool]: ...

    def write_blocks(
        self, req_id: str, hashes: list[BlockHash], payloads: list[bytes | memoryview]
    ) -> int: ...

    def read_blocks(self, hashes: Sequence[BlockHash]) -> Sequence[bytes | memoryview | None]: ...

    def transfer_done(self, req_id: str, ok: bool) -> None: ...


class _ProtocolError(Exception):
    """The peer broke the chunk protocol (reported as INVALID_ARGUMENT)."""


class _Assembler:
    """Reassembles chunks into whole blocks and hands them to the sink in batches."""

    def __init__(self, sink: BlockSink, req_id: str, batch_blocks: int, batch_bytes: int) -> None:
        self.sink = sink
        self.req_id = req_id
        self.batch_blocks = batch_blocks
        self.batch_bytes = batch_bytes
        self.num_blocks = 0  # blocks written to the sink so far
        self.nbytes = 0  # payload bytes written to the sink so far
        self._hashes: list[BlockHash] = []
        self._payloads: list[bytes | memoryview] = []
        self._pending_bytes = 0
        self._cur_hash = b""  # block being reassembled from several chunks
        self._cur_buf: bytearray | None = None
        self._cur_filled = 0

    def add(self, chunk: strata_pb2.BlockChunk) -> None:
        if not chunk.block_hash:
            if chunk.data or chunk.total_nbytes:
                raise _ProtocolError("a chunk without block_hash must carry no data")
            return
        total, offset, data = chunk.total_nbytes, chunk.offset, chunk.data
        if not 0 < total <= kv_wire.MAX_BLOCK_BYTES:
            raise _ProtocolError(f"total_nbytes={total} outside (0, {kv_wire.MAX_BLOCK_BYTES}]")
        if offset + len(data) > total:
            raise _ProtocolError(f"chunk [{offset}, {offset + len(data)}) overruns block {total}")
        if self._cur_buf is None:
            if offset != 0:
                raise _ProtocolError(f"block {chunk.block_hash.hex()} starts at offset {offset}")
            if len(data) == total:  # the common case: one chunk holds the whole block, no copy
                self._complete(BlockHash(chunk.block_hash), data)
                return
            self._cur_hash, self._cur_buf, self._cur_filled = chunk.block_hash, bytearray(total), 0
        elif chunk.block_hash != self._cur_hash or offset != self._cur_filled:
            raise _ProtocolError(
                f"expected block {self._cur_hash.hex()} at offset {self._cur_filled}, got "
                f"{chunk.block_hash.hex()} at {offset} (chunks must arrive in order)"
            )
        if len(self._cur_buf) != total:
            raise _ProtocolError("total_nbytes changed within one block")
        self._cur_buf[offset : offset + len(data)] = data
        self._cur_filled += len(data)
        if self._cur_filled == total:
            buf, self._cur_buf = self._cur_buf, None
            self._complete(BlockHash(self._cur_hash), memoryview(buf))

    def _complete(self, block_hash: BlockHash, payload: bytes | memoryview) -> None:
        self._hashes.append(block_hash)
        self._payloads.append(payload)
        self._pending_bytes += len(payload)
        if len(self._hashes) >= self.batch_blocks or self._pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._hashes:
            return
        num = self.sink.write_blocks(self.req_id, self._hashes, self._payloads)
        self.num_blocks += num
        self.nbytes += self._pending_bytes
        self._hashes, self._payloads, self._pending_bytes = [], [], 0

    def finish(self) -> None:
        if self._cur_buf is not None:
            raise _ProtocolError(
                f"stream closed with block {self._cur_hash.hex()} incomplete "
                f"({self._cur_filled}/{len(self._cur_buf)} bytes)"
            )
        self.flush()


class KVReceiverServicer(strata_pb2_grpc.KVTransferServicer):
    """``KVTransfer`` over a ``BlockSink``; refuses other fingerprints and wrong secrets."""

    def __init__(
        self,
        sink: BlockSink,
        fingerprint: bytes,
        secret: str | None = None,
        batch_blocks: int = 64,
        batch_bytes: int = 16 << 20,
        chunk_bytes: int = kv_wire.DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be the model fingerprint (non-empty bytes)")
        if batch_blocks < 1 or batch_bytes < 1:
            raise ValueError("batch_blocks and batch_bytes must be >= 1")
        kv_wire.check_chunk_bytes(chunk_bytes)
        self.sink = sink
        self.fingerprint = fingerprint
        self.secret = secret
        self.batch_blocks = batch_blocks
        self.batch_bytes = batch_bytes
        self.chunk_bytes = chunk_bytes

    def _check_secret(self, context: grpc.ServicerContext) -> None:
        if self.secret is None:
            return
        given = dict(context.invocation_metadata()).get(kv_wire.SECRET_METADATA_KEY, "")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), self.secret.encode()
        ):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-strata-secret")

    def _check_fingerprint(self, fingerprint: bytes, context: grpc.ServicerContext) -> None:
        if fingerprint != self.fingerprint:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model fingerprint {fingerprint.hex()} does not match this worker's "
                f"{self.fingerprint.hex()} (different weights, dtype, block_size or layout)",
            )

    def QueryBlocks(
        self, request: strata_pb2.QueryBlocksRequest, context: grpc.ServicerContext
    ) -> strata_pb2.QueryBlocksResponse:
        self._check_secret(context)
        self._check_fingerprint(request.fingerprint, context)
        held = self.sink.has_blocks([BlockHash(h) for h in request.block_hashes])
        assert len(held) == len(request.block_hashes), "sink.has_blocks returned a wrong count"
        leading = next((i for i, h in enumerate(held) if not h), len(held))
        return strata_pb2.QueryBlocksResponse(held=held, num_leading_held=leading)

    def PushBlocks(
        self, request_iterator: Iterator[strata_pb2.BlockChunk], context: grpc.ServicerContext
    ) -> strata_pb2.PushBlocksResponse:
        self._check_secret(context)
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty push stream")
            return strata_pb2.PushBlocksResponse()  # not reached: abort raises
        req_id = first.req_id
        if first.fingerprint != self.fingerprint:
            self.sink.transfer_done(req_id, False)
            self._check_fingerprint(first.fingerprint, context)
        asm = _Assembler(self.sink, req_id, self.batch_blocks, self.batch_bytes)
        ok = False
        try:
            chunk = first
            while True:
                if chunk.req_id != req_id:
                    raise _ProtocolError(f"req_id changed: {req_id!r} -> {chunk.req_id!r}")
                if chunk.fingerprint and chunk.fingerprint != self.fingerprint:
                    raise _ProtocolError("fingerprint changed mid-stream")
                try:
                    parts = kv_wire.unpacked(chunk)
                except ValueError as e:
                    raise _ProtocolError(str(e)) from None
                for part in parts:
                    asm.add(part)
                if chunk.last:
                    break
                nxt = next(request_iterator, None)
                if nxt is None:
                    raise _ProtocolError("stream ended without a chunk marked last (cut off)")
                chunk = nxt
            asm.finish()
            ok = True
        except _ProtocolError as e:
            logger.warning("push %s from %s refused: %s", req_id, context.peer(), e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except grpc.RpcError:  # the sender cancelled or its deadline passed
            logger.info(
                "push %s from %s broke off after %d blocks", req_id, context.peer(), asm.num_blocks
            )
            return strata_pb2.PushBlocksResponse()
        except StrataError as e:  # the sink could not store the blocks
            logger.warning("push %s: sink failed: %s", req_id, e)
            context.abort(grpc.StatusCode.INTERNAL, f"receiver could not store blocks: {e}")
        finally:
            self.sink.transfer_done(req_id, ok)
        logger.debug("push %s: %d blocks, %d bytes", req_id, asm.num_blocks, asm.nbytes)
        return strata_pb2.PushBlocksResponse(num_blocks=asm.num_blocks, nbytes=asm.nbytes)

    def PullBlocks(
        self, request: strata_pb2.PullBlocksRequest, context: grpc.ServicerContext
    ) -> Iterator[strata_pb2.BlockChunk]:
        self._check_secret(context)
        self._check_fingerprint(request.fingerprint, context)
        chunk_bytes = request.chunk_bytes or self.chunk_bytes
        kv_wire.check_chunk_bytes(chunk_bytes)
        hashes = [BlockHash(h) for h in request.block_hashes]
        for start in range(0, len(hashes), PULL_READ_BATCH):
            batch = hashes[start : start + PULL_READ_BATCH]
            payloads = self.sink.read_blocks(batch)
            assert len(payloads) == len(batch), "sink.read_blocks returned a wrong count"
            held = ((batch[i], start + i, p) for i, p in enumerate(payloads) if p is not None)
            yield from kv_wire.block_messages(request.req_id, self.fingerprint, held, chunk_bytes)
        yield strata_pb2.BlockChunk(req_id=request.req_id, last=True)


def start_kv_server(
    sink: BlockSink,
    fingerprint: bytes,
    host: str = "127.0.0.1",
    port: int = 0,
    secret: str | None = None,
    max_workers: int = 8,
    **servicer_kwargs: int,
) -> tuple[grpc.Server, int]:
    """Start a ``KVTransfer`` server; returns it and the bound port (``port=0`` picks one)."""
    servicer = KVReceiverServicer(sink, fingerprint, secret=secret, **servicer_kwargs)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-receiver"),
        options=kv_wire.channel_options(),
    )
    strata_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the KV transfer server to {host}:{port}")
    server.start()
    logger.info("KV transfer server on %s:%d", host, bound)
    return server, bound
