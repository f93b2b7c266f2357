"""Copy lanes in their CPU form: ordered per lane, fences complete with the copy, errors kept."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.fence import CopyEngine, DoneFence


def test_lane_runs_in_order_and_the_fence_completes_with_the_copy() -> None:
    eng = CopyEngine(torch.device("cpu"))
    gate = threading.Event()
    order: list[str] = []
    first = eng.submit("offload", lambda: (gate.wait(5), order.append("a")))
    second = eng.submit("offload", lambda: order.append("b"))
    other = eng.submit("load", lambda: order.append("load"))
    assert other.wait(5)  # another lane does not wait for a blocked one
    assert not first.done() and not second.done() and not second.wait(0.05)
    gate.set()
    second.make_compute_wait()  # blocks until the copy ran (CPU form)
    assert first.done() and second.done() and order == ["load", "a", "b"]
    assert first.error() is None
    eng.close()
    late = eng.submit("load", lambda: None)
    assert late.done() and isinstance(late.error(), RuntimeError)


def test_a_failed_copy_keeps_its_error() -> None:
    eng = CopyEngine(torch.device("cpu"))

    def boom() -> None:
        raise OSError("copy failed")

    fence = eng.submit("load", boom)
    with pytest.raises(OSError, match="copy failed"):
        fence.wait(5)
    assert fence.done() and isinstance(fence.error(), OSError)
    eng.close()
    done = DoneFence()
    assert done.done() and done.wait() and done.error() is None


def test_copies_really_move_tensors_behind_the_fence() -> None:
    eng = CopyEngine(torch.device("cpu"))
    src = torch.arange(1 << 16, dtype=torch.float32)
    dst = torch.zeros_like(src)
    fence = eng.submit("offload", lambda: dst.copy_(src))
    fence.wait()
    assert torch.equal(dst, src)
    eng.close()
