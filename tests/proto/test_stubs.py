"""The committed stubs must match what proto/generate.py produces from strata.proto."""

from __future__ import annotations

from pathlib import Path

from proto import generate, strata_pb2, strata_pb2_grpc


def test_committed_stubs_match_regeneration(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    for path in fresh:
        committed = generate.PROTO_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run `python proto/generate.py`"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} is stale: strata.proto changed without regenerating; "
            "run `python proto/generate.py` and commit the result"
        )


def test_grpc_stub_imports_the_package_relative_module() -> None:
    text = (generate.PROTO_DIR / "strata_pb2_grpc.py").read_text()
    assert "from proto import strata_pb2 as" in text
    assert "\nimport strata_pb2" not in text
    assert strata_pb2_grpc.strata__pb2 is strata_pb2


def test_messages_roundtrip() -> None:
    req = strata_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3], max_tokens=4, seed=7, cache_salt="t1", top_k=5
    )
    back = strata_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert list(back.prompt_token_ids) == [1, 2, 3]
    assert back.HasField("max_tokens") and back.max_tokens == 4
    assert back.HasField("seed") and not back.HasField("prompt")
    assert not back.HasField("temperature")
    usage = strata_pb2.Usage(cached_tokens_by_tier={"host": 32, "disk": 16})
    assert dict(strata_pb2.Usage.FromString(usage.SerializeToString()).cached_tokens_by_tier) == {
        "host": 32,
        "disk": 16,
    }
    header = strata_pb2.FrameHeader(req_id="r", block_indices=[3, 4], block_nbytes=8, shm_gen=2)
    assert strata_pb2.FrameHeader.FromString(header.SerializeToString()) == header
    out = strata_pb2.StepOutputs(seq=3, req_ids=["a", "b"], num_tokens=[1, 2], token_ids=[7, 8, 9])
    out.errors["b"].code = "INTERNAL"
    assert strata_pb2.StepOutputs.FromString(out.SerializeToString()) == out


def test_services_declared() -> None:
    services = strata_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {"Generation", "KVTransfer", "WorkerOutputs"}
    assert set(services["Generation"].methods_by_name) == {"Generate", "Stats", "Health"}
    assert set(services["KVTransfer"].methods_by_name) == {"QueryBlocks"}
    sub = services["WorkerOutputs"].methods_by_name["Subscribe"]
    assert sub.server_streaming and not sub.client_streaming
