"""Prefill and decode workers as plain classes (no Ray), over real gRPC on loopback: the
streamed handoff (a prompt prefilled in several chunks, its blocks pushed chunk by chunk, through
shared memory or in gRPC frames) gives the same tokens as one engine; a push that never comes or
stalls is waited for only until the deadline; and every block is free afterwards."""

from __future__ import annotations

import pytest

from decode_worker.worker import DecodeWorker, continuation
from engine.config import EngineConfig
from kvstore.config import StoreConfig
from kvstore.keys import hash_prompt_blocks
from kvtransfer.config import TransferConfig
from prefill_worker.worker import PrefillWorker
from proto.worker_api import DecodeRequest, PrefillRequest, SamplingParams
from router.index import GlobalBlockIndex
from tests.workers.sync_outputs import SyncOutputs
from worker.spec import WorkerSpec

SECRET = "s3"
CHUNK = 128  # tokens per engine step: prompts below are prefilled in 3-6 chunks


@pytest.fixture(scope="module")
def workers():
    cfg = EngineConfig(
        model="tiny", kv_cache_bytes=16 << 20, max_model_len=4096, max_num_batched_tokens=CHUNK
    )
    store = StoreConfig(host_capacity_bytes=8 << 20)
    p_shm = PrefillWorker(WorkerSpec("prefill-shm", cfg, store, secret=SECRET))
    p_grpc = PrefillWorker(
        WorkerSpec("prefill-grpc", cfg, store, secret=SECRET, transfer=TransferConfig(shm_bytes=0))
    )
    d = DecodeWorker(WorkerSpec("decode-0", cfg, store, secret=SECRET))
    out = SyncOutputs("decode-0", d.outputs_address, SECRET)
    assert out.wait_connected(30)
    yield {"shm": p_shm, "grpc": p_grpc}, d, out
    out.close()
    try:
        for w in (p_shm, p_grpc, d):
            assert w.check_no_leaks()
    finally:
        for w in (p_shm, p_grpc, d):
            w.shutdown()


def _decode(out: SyncOutputs, d: DecodeWorker, req: DecodeRequest) -> tuple[list[int], dict]:
    q = out.register(req.req_id)
    d.start(req)
    tokens: list[int] = []
    cached = None
    while True:
        item = q.get(timeout=60)
        tokens.extend(item.token_ids)
        cached = cached or item.cached_by_tier
        if item.finish_reason:
            assert item.finish_reason == "length"
            return tokens, cached or {}


def _handoff(
    p: PrefillWorker,
    d: DecodeWorker,
    out: SyncOutputs,
    req_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    salt: str = "",
):
    res = p.prefill(
        PrefillRequest(req_id, tuple(prompt), sampling, salt, decode_kv_address=d.kv_address)
    )
    rest, cached = _decode(
        out, d, DecodeRequest(req_id, (*prompt, res.first_token), continuation(sampling), salt)
    )
    return res, [res.first_token, *rest], cached


@pytest.mark.parametrize("path", ["shm", "grpc"])
def test_streamed_handoff_matches_single_engine(workers, path) -> None:
    prefills, d, out = workers
    p = prefills[path]
    prompt = [(i * 13 + len(path)) % 250 for i in range(600)]  # 5 chunks of 128 tokens
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="ref"))[0]
    before = p.stats()
    res, tokens, cached = _handoff(p, d, out, f"h-{path}", prompt, sampling)
    assert tokens == expected.output_token_ids
    assert res.num_blocks_to_push == 600 // 16
    # Every full prompt block came over the push: the decode worker computed only the tail.
    assert cached == {"device": 600 // 16 * 16}
    after = p.stats()
    assert after["push_blocks"] - before["push_blocks"] == 600 // 16
    assert after["push_frames"] - before["push_frames"] >= 5  # a frame per chunk, at least
    shm_bytes = after["push_shm_bytes"] - before["push_shm_bytes"]
    assert (
        (shm_bytes == 600 // 16 * d.engine.layout.block_nbytes)
        if path == "shm"
        else (shm_bytes == 0)
    )


def test_seeded_sampling_survives_the_handoff(workers) -> None:
    prefills, d, out = workers
    p = prefills["shm"]
    prompt = [(i * 7) % 250 for i in range(300)]
    sampling = SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=11, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="x"))[0]
    _, tokens, _ = _handoff(p, d, out, "seeded", prompt, sampling)
    assert tokens == expected.output_token_ids


def test_missing_push_is_waited_for_until_the_deadline(workers) -> None:
    prefills, d, out = workers
    p = prefills["shm"]
    prompt = [(i * 3) % 250 for i in range(90)]
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="y"))[0]
    first = expected.output_token_ids[0]
    before = d.stats()["transfers_timed_out"]
    rest, cached = _decode(
        out,
        d,
        DecodeRequest("late", (*prompt, first), continuation(sampling), "y", True, 0.2),
    )
    assert [first, *rest] == expected.output_token_ids
    assert cached == {}  # nothing arrived: the decode worker computed the whole prompt
    assert d.stats()["transfers_timed_out"] == before + 1


def test_stalled_push_is_cancelled_on_both_sides(workers) -> None:
    prefills, d, out = workers
    p = prefills["grpc"]
    prompt = [(i * 5) % 250 for i in range(200)]
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="z"))[0]
    hashes = p.engine.block_hashes(prompt, "z")
    stalled = p.sender.open_push(d.kv_address, "stall", p.engine.fingerprint, hashes, 60)
    assert stalled.wait_answer(10)  # open, and then nothing more: a stuck prefill worker
    first = expected.output_token_ids[0]
    rest, _ = _decode(
        out, d, DecodeRequest("stall", (*prompt, first), continuation(sampling), "z", True, 0.3)
    )
    assert [first, *rest] == expected.output_token_ids
    with pytest.raises(Exception) as err:
        stalled.wait(10)
    assert getattr(err.value, "code", "") == "CANCELLED"


def test_abort_while_waiting_for_the_push(workers) -> None:
    _, d, out = workers
    q = out.register("gone")
    d.start(DecodeRequest("gone", (1, 2, 3), SamplingParams(max_tokens=3), "", True, 30.0))
    d.abort("gone")
    item = q.get(timeout=10)
    assert item.finish_reason == "abort" and item.token_ids == ()
    assert d.stats()["admissions_waiting"] == 0


def test_prefill_pulls_a_prefix_from_another_worker(workers) -> None:
    prefills, d, out = workers
    p = prefills["shm"]
    prompt = [(i * 11) % 250 for i in range(260)]
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    _, first, _ = _handoff(p, d, out, "r4", prompt, sampling)  # d now holds every full block
    other_tenant = p.prefill(
        PrefillRequest(
            "r5", tuple(prompt), sampling, "other", pull_from=d.kv_address, num_pull_blocks=16
        )
    )
    assert other_tenant.num_pulled_blocks == 0  # another tenant's salt never matches
    d.evict_cached("host")
    p.loop.call(lambda eng: eng.evict_cached("disk"))
    p.loop.call(lambda eng: eng.store.remove(eng.block_hashes(prompt)))
    res = p.prefill(
        PrefillRequest("r6", tuple(prompt), sampling, pull_from=d.kv_address, num_pull_blocks=16)
    )
    assert res.num_pulled_blocks == 16
    assert res.cached_tokens == 16 * 16  # the pulled blocks were loaded, not recomputed
    rest, _ = _decode(
        out, d, DecodeRequest("r6", (*prompt, res.first_token), continuation(sampling), "", False)
    )
    assert [res.first_token, *rest] == first


@pytest.mark.parametrize("path", ["shm", "grpc"])
def test_decode_request_sent_first_takes_the_first_token_from_the_push(workers, path) -> None:
    """As the router does it: the decode request arrives before the prefill starts; the push's
    last frame carries the first token, so it is admitted without a word from the router."""
    prefills, d, out = workers
    p = prefills[path]
    prompt = [(i * 17 + len(path)) % 250 for i in range(500)]
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = p.loop.call(lambda eng: eng.generate([prompt], sampling, cache_salt="ref"))[0]
    rid = f"early-{path}"
    q = out.register(rid)
    d.start(DecodeRequest(rid, tuple(prompt), continuation(sampling), "", True, 30.0, True))
    res = p.prefill(PrefillRequest(rid, tuple(prompt), sampling, decode_kv_address=d.kv_address))
    tokens = [res.first_token]
    while True:
        item = q.get(timeout=60)
        tokens.extend(item.token_ids)
        if item.finish_reason:
            break
    assert tokens == expected.output_token_ids
    assert d.stats()["transfers_ok"] >= 1


def test_events_and_snapshots_are_numbered_within_one_start(workers) -> None:
    prefills, _, _ = workers
    p = prefills["grpc"]
    before = p.drain_events()
    prompt = [(i * 7 + 3) % 256 for i in range(300)]
    p.prefill(PrefillRequest("numbered", tuple(prompt), SamplingParams(max_tokens=1)))
    batch = p.drain_events()
    snap = p.snapshot_blocks()
    assert before.epoch == batch.epoch == snap.epoch == p.info().epoch > 0
    assert (batch.seq, snap.seq) == (before.seq + 1, before.seq + 2) and not batch.lost
    hashes = hash_prompt_blocks(prompt, p.engine.block_size, p.engine.fingerprint)
    assert set(hashes) <= {h for e in batch.events if e.kind == "stored" for h in e.block_hashes}
    # the router's index fed the snapshot credits the prompt's blocks; a batch drained before
    # the snapshot is already in it, the next one applies on top
    index = GlobalBlockIndex()
    assert index.replace_worker(p.worker_id, snap.blocks, snap.epoch, snap.seq)
    assert len(index.leading_tiers(p.worker_id, hashes)) == len(hashes)
    assert index.apply_batch(p.worker_id, batch) and index.apply_batch(p.worker_id,
                                                                       p.drain_events())
    assert len(index.leading_tiers(p.worker_id, hashes)) == len(hashes)
