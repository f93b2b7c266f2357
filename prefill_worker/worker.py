"""``PrefillWorker``: computes a prompt's missing KV and samples the first token, streaming the
prompt's blocks to the chosen decode worker while it computes.

The push stream opens before the prefill starts (the decode worker answers at once which blocks
it already holds); after every engine step, the request's newly computed full blocks are copied
out of the pool (into a shared-memory slot when the decode worker shares this host, else into a
buffer that goes in the gRPC frame) and queued on the stream, so when the first token is sampled
only the last chunk's blocks are still to send. The first token goes back to the router at once.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

from kvstore.keys import BlockHash
from kvtransfer.sender import KVSender
from kvtransfer.session import PushSession
from proto.errors import StrataError
from proto.vocab import FinishReason, Role
from proto.worker_api import PrefillRequest, PrefillResult
from worker.base import WorkerBase, bytes_tensor
from worker.spec import WorkerSpec

logger = logging.getLogger(__name__)


class PrefillWorker(WorkerBase):
    role = Role.PREFILL

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.transfer = spec.transfer
        self.sender = KVSender(
            secret=spec.secret,
            owner=spec.worker_id,
            block_nbytes=self.engine.layout.block_nbytes,
            frame_bytes=self.transfer.frame_bytes,
            shm_bytes=self.transfer.shm_bytes,
            num_channels=self.transfer.num_channels,
        )
        self._sessions: dict[str, PushSession] = {}
        self._lock = threading.Lock()
        self.push_stats = {
            "push_blocks": 0.0,
            "push_bytes": 0.0,
            "push_shm_bytes": 0.0,
            "push_frames": 0.0,
            "push_seconds": 0.0,  # putting frames on the wire (not waiting for the prefill)
            "push_failures": 0.0,
            "pull_blocks": 0.0,
        }

    def prefill(self, req: PrefillRequest) -> PrefillResult:
        t0 = time.perf_counter()
        prompt = list(req.prompt_token_ids)
        num_pulled = 0
        if req.pull_from and req.num_pull_blocks > 0:
            num_pulled = self._pull(req.pull_from, prompt, req.cache_salt, req.num_pull_blocks)
        hashes = self.engine.block_hashes(prompt, req.cache_salt)
        session = None
        if req.decode_kv_address and req.sampling.max_tokens > 1 and hashes:
            session = self._open_push(req, hashes)
        first = dataclasses.replace(req.sampling, max_tokens=1)
        try:
            on_blocks = (self._block_listener(session), len(hashes)) if session else None
            stream = self.loop.submit(req.req_id, prompt, first, req.cache_salt, on_blocks)
            out = stream.get(timeout=req.timeout_s)
        except queue.Empty:
            self.loop.abort(req.req_id)
            if session is not None:
                session.abort()
            raise TimeoutError(
                f"prefill of {req.req_id} took longer than {req.timeout_s:.0f} s"
            ) from None
        except BaseException:
            if session is not None:
                session.abort()
            raise
        token = out.new_token_ids[0]
        stop = out.finish_reason == FinishReason.STOP
        finished = stop or req.sampling.max_tokens == 1
        if session is not None:
            if finished:
                session.abort()  # nothing will decode it
            else:  # the stream's last frame carries it (the listener closes the stream)
                session.set_first_token(token)
        return PrefillResult(
            req_id=req.req_id,
            first_token=token,
            finished=finished,
            finish_reason=(
                (FinishReason.STOP if stop else FinishReason.LENGTH) if finished else None
            ),
            prompt_tokens=len(prompt),
            cached_tokens=out.num_cached_tokens,
            cached_by_tier=out.cached_by_tier,
            prefill_ms=(time.perf_counter() - t0) * 1000.0,
            num_blocks_to_push=len(hashes) if session is not None and not finished else 0,
            num_pulled_blocks=num_pulled,
        )

    # ---- the push --------------------------------------------------------------------------
    def _open_push(self, req: PrefillRequest, hashes: list[BlockHash]) -> PushSession | None:
        assert req.decode_kv_address is not None
        try:
            session = self.sender.open_push(
                req.decode_kv_address,
                req.req_id,
                self.engine.fingerprint,
                hashes,
                deadline_s=self.transfer.deadline_s,
                on_done=self._push_done,
                with_first_token=True,
            )
        except (StrataError, ValueError) as e:
            logger.warning("push of %s not opened: %s", req.req_id, e)
            return None
        with self._lock:
            old = self._sessions.pop(req.req_id, None)
            self._sessions[req.req_id] = session
        if old is not None:
            old.abort()
        return session

    def _block_listener(self, session: PushSession):  # engine.BlockListener
        """Runs on the loop thread after each step: copies the request's new full blocks out of
        the pool (the decode worker's held ones skipped) and queues them on the stream; the
        last ones (reported after the first token went out) close it."""
        kv = self.engine.kv
        nbytes = self.engine.layout.block_nbytes
        per_frame = self.sender.frame_blocks
        segment = self.sender.segment

        total = len(session.hashes)

        def on_blocks(first: int, block_ids: list[int]) -> None:
            if first + len(block_ids) >= total:  # the last of them: close the stream after
                try:
                    send(first, block_ids)
                finally:
                    session.finish()
                return
            send(first, block_ids)

        def send(first: int, block_ids: list[int]) -> None:
            if session.failed:
                return
            todo = [(first + k, b) for k, b in enumerate(block_ids) if session.wanted(first + k)]
            for start in range(0, len(todo), per_frame):
                part = todo[start : start + per_frame]
                indices = [i for i, _ in part]
                ids = [b for _, b in part]
                size = len(part) * nbytes
                slot = session.try_slot()
                if slot is not None and segment is not None:
                    view = segment.begin_write(slot, size)
                    kv.read_pool_blocks_into(ids, bytes_tensor(view, nbytes))
                    session.add_shm(indices, slot, segment.end_write(slot), size)
                    continue
                message, payload = session.new_frame(indices)  # copied straight into it
                kv.read_pool_blocks_into(ids, bytes_tensor(payload, nbytes))
                session.add_frame(indices, message)

        return on_blocks

    def _push_done(self, session: PushSession) -> None:
        with self._lock:
            if self._sessions.get(session.req_id) is session:
                del self._sessions[session.req_id]
            res = session.result
            if session.error is not None or res is None:
                self.push_stats["push_failures"] += 1
                if session.error is not None and session.error.code != "CANCELLED":
                    logger.warning("push of %s failed: %s", session.req_id, session.error)
                return
            self.push_stats["push_blocks"] += res.num_sent
            self.push_stats["push_bytes"] += res.nbytes
            self.push_stats["push_shm_bytes"] += res.shm_nbytes
            self.push_stats["push_frames"] += res.num_frames
            self.push_stats["push_seconds"] += res.send_seconds

    # ---- pulling a prefix from another worker -------------------------------------------
    def _pull(self, address: str, prompt: list[int], cache_salt: str, num_blocks: int) -> int:
        """Fetch up to ``num_blocks`` leading prompt blocks this worker lacks from another one."""
        hashes = self.engine.block_hashes(prompt, cache_salt)[:num_blocks]
        held = self.loop.call(lambda eng: eng.has_blocks(hashes))
        first = next((i for i, ok in enumerate(held) if not ok), len(hashes))
        todo = hashes[first:]
        if not todo:
            return 0
        try:
            n, data = self.sender.pull(
                address, self.engine.fingerprint, todo, self.transfer.deadline_s
            )
        except (StrataError, TimeoutError) as e:
            logger.warning("pull from %s failed, recomputing: %s", address, e)
            return 0
        if n == 0:
            return 0
        tensor = bytes_tensor(memoryview(data), self.engine.layout.block_nbytes)
        self.loop.call(lambda eng: eng.write_blocks(todo[:n], tensor))
        with self._lock:
            self.push_stats["pull_blocks"] += n
        return n

    def abort(self, req_id: str) -> None:
        super().abort(req_id)
        with self._lock:
            session = self._sessions.pop(req_id, None)
        if session is not None:
            session.abort()

    def stats(self) -> dict[str, float]:
        with self._lock:
            push = dict(self.push_stats)
        return {**super().stats(), **push}

    def shutdown(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.abort()
        self.sender.close()
        super().shutdown()
