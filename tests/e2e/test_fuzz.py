"""Random and malformed requests against the real service (``hypothesis``): every one gets a
clear status — never INTERNAL or UNKNOWN — and the router and the workers keep serving, with
every block free afterwards. The workers' KV API gets random frames too."""

from __future__ import annotations

import grpc
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer import wire
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc
from tests.e2e.conftest import SECRET, TOKEN, start, wait_no_leaks

pytestmark = pytest.mark.timeout(900)
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MD = (("authorization", f"Bearer {TOKEN}"),)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run (CI is no place for flaky discoveries)
)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start(tmp_path_factory.mktemp("fuzz"), 1, 1)
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(service.address)
    yield strata_pb2_grpc.GenerationStub(channel), channel
    channel.close()


ids = st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 300), max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
requests = st.builds(
    pb.GenerateRequest,
    prompt=st.none() | st.text(max_size=60),
    prompt_token_ids=ids,
    messages=st.lists(
        st.builds(
            pb.ChatMessage,
            role=st.sampled_from(["user", "system", "x", ""]),
            content=st.text(max_size=30),
        ),
        max_size=3,
    ),
    max_tokens=st.none() | st.integers(-5, 5000),
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.integers(-(2**31), 2**31 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop_token_ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
    cache_salt=st.text(max_size=20),
    request_id=st.text(max_size=20),
    ignore_eos=st.booleans(),
)


def _drain(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@FUZZ
@given(req=requests)
def test_random_requests_get_clear_statuses(stub, req) -> None:
    if req.HasField("max_tokens") and req.max_tokens > 8:
        req.max_tokens = 8  # valid ones stay short: the fuzz is about the input, not the output
    code = _drain(stub[0].Generate(req, metadata=MD, timeout=60))
    assert code in CLEAR, (code, req)


@FUZZ
@given(data=st.binary(max_size=200))
def test_malformed_bytes_get_invalid_argument(stub, data) -> None:
    call = stub[1].unary_stream(
        "/strata.v1.Generation/Generate", request_serializer=None, response_deserializer=None
    )(data, metadata=MD, timeout=60)
    code = _drain(call)
    assert code in CLEAR, code
    try:
        pb.GenerateRequest.FromString(data)
    except Exception:  # not a message: the reason is stated
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(frames=st.lists(st.binary(max_size=120), min_size=1, max_size=4))
def test_random_kv_frames_are_refused(service, frames) -> None:
    info = ray.get(service.decode[0].info.remote(), timeout=60)
    with grpc.insecure_channel(info.kv_address) as ch:
        push = ch.stream_stream(wire.PUSH_METHOD)
        call = push(iter(frames), metadata=((wire.SECRET_METADATA_KEY, SECRET),), timeout=30)
        code = _drain(call)
    assert code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}, code


def test_the_service_still_serves_and_nothing_leaked(service, stub) -> None:
    res = list(
        stub[0].Generate(
            pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=3, temperature=0.0),
            metadata=MD,
            timeout=60,
        )
    )
    assert sum(len(r.token_ids) for r in res) == 3 and res[-1].finish_reason == "length"
    wait_no_leaks(service)
