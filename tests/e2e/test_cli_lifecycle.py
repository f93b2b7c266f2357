"""The life cycle as a user meets it, through the installed command line: every sequence ends
with a one-line message and the exit code it promises, never a traceback.

- mistakes (a bad model path, a busy port, out-of-range numbers) fail before Ray starts;
- `down` and `scale` with nothing running;
- `up --detach`, then `ray status`, `up` twice, a foreground `up`, `demo` (its own Ray),
  `scale` past the machine's resources, `down` twice, `down --stop-ray`.

The detached test starts a Ray head on 127.0.0.1:6379 and stops it (and checks that none of
its processes is left).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.timeout(900)
SMALL = ("--device-capacity", "16M", "--host-capacity", "16M")


def strata(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``strata ARGS`` through the installed entry point's module, in the project root."""
    return subprocess.run(
        [sys.executable, "-m", "strata.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **env},
    )


def _stderr(res: subprocess.CompletedProcess) -> str:
    """stderr less Ray's C++ warning that it cannot reach 8.8.8.8 to pick this node's address
    (a machine without a route outside, as the test sandbox is, gets it from every process
    that talks to Ray; a machine with a network does not)."""
    lines = res.stderr.strip().splitlines()
    return "\n".join(ln for ln in lines if "Failed to determine local IP" not in ln)


def one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The process exited ``code`` with one line on stderr holding every needle."""
    err = _stderr(res)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.slow  # some twenty processes, one of them importing torch
def test_mistakes_fail_before_ray_with_one_line(tmp_path) -> None:
    one_line_error(strata("up", "--model", "/no/such/model"), 2, "--model /no/such/model")
    one_line_error(strata("up", "--model", "gpt-7"), 2, "unknown model", "smollm2-135m")
    one_line_error(strata("demo", "--model", "/no/such/model"), 2, "--model /no/such/model")
    empty = tmp_path / "ckpt"
    empty.mkdir()
    one_line_error(strata("up", "--model", str(empty)), 2, "config.json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(strata("up", "--disk-path", str(blocker / "kv")), 2, "--disk-path")
    with socket.socket() as s:  # a busy port
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        one_line_error(strata("up", "--port", port), 2, f"--port {port}", "in use")
        one_line_error(strata("up", "--metrics-port", port), 2, "--metrics-port")
        one_line_error(strata("up", STRATA_PORT=port), 2, f"--port {port}")
    err = one_line_error(strata("up", "--port", "70000"), 2, "--port must be in [0, 65535]")
    assert err.startswith("strata up: error:"), err  # the command that failed, then why
    one_line_error(strata("up", STRATA_PORT="http"), 2, "STRATA_PORT")
    one_line_error(strata("up", "--decode", "0"), 2, "--decode")
    gen = ("generate", "--server", "127.0.0.1:1", "--prompt", "hi")
    one_line_error(strata(*gen, "--max-tokens", "99999999999"), 2, "--max-tokens must be in")
    one_line_error(strata(*gen, "--seed", "-1"), 2, "--seed")
    one_line_error(strata(*gen, "--top-p", "0"), 2, "--top-p")
    one_line_error(strata(*gen, "--temperature", "nan"), 2, "--temperature")
    one_line_error(strata(*gen), 2, "UNAVAILABLE")  # nothing listens there
    bad_ids = ("generate", "--server", "127.0.0.1:1", "--prompt-ids", "1,-2")
    one_line_error(strata(*bad_ids), 2, "--prompt-ids")
    one_line_error(
        strata("bench", "ttft", "--model", "tiny", "--lengths", "20000"), 2, "context of 16384"
    )


def test_down_and_scale_with_nothing_running() -> None:
    for args in (("down",), ("down", "--stop-ray")):
        res = strata(*args)
        assert res.returncode == 0, res.stderr
        assert "nothing to stop" in res.stdout and "Traceback" not in res.stderr
    one_line_error(strata("scale", "--prefill", "2"), 1, "no detached service runs")
    one_line_error(strata("scale"), 2, "--prefill N and/or --decode M")


def _head_processes() -> list:
    from cluster.lifecycle import head_processes

    return head_processes("127.0.0.1:6379")


@pytest.mark.slow
def test_detached_service_life_cycle(tmp_path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.skip("port 6379 is taken: a Ray head of this machine already runs")
    try:
        up = strata("up", "--detach", *SMALL, "--metrics-port", "0", "--token", "t0k")
        assert up.returncode == 0, up.stderr
        assert "strata: serving gRPC on 127.0.0.1:50051" in up.stdout
        assert "Prometheus metrics on http://127.0.0.1:" in up.stdout
        assert "Traceback" not in up.stderr and "Token authentication" not in up.stderr
        status = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "status"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0 and "prefill" in status.stdout, status.stderr

        # up twice, and a foreground up on the same port: where it listens, how to stop it
        again = strata("up", "--detach", *SMALL)
        one_line_error(again, 1, "already runs", "127.0.0.1:50051", "strata down")
        fg = strata("up", *SMALL)
        one_line_error(fg, 1, "already runs", "127.0.0.1:50051")

        # `make run` beside it: the demo runs on its own embedded Ray, not the head's
        demo = strata("demo", "--model", "tiny", *SMALL, timeout=600)
        assert demo.returncode == 0, demo.stderr
        assert "service stopped" in demo.stdout and "Traceback" not in demo.stderr

        # scale beyond the machine: the missing resource, at once, and nothing left pending
        scale = strata("scale", "--prefill", "2")
        one_line_error(scale, 1, "'prefill'", "ray start --address")
        gen = strata(
            "generate", "--prompt-ids", "1,2,3", "--max-tokens", "2", "--json",
            STRATA_SERVER="127.0.0.1:50051", STRATA_TOKEN="t0k",
        )
        assert gen.returncode == 0, gen.stderr
        stats = strata("stats", "--token", "t0k")
        assert stats.returncode == 0, stats.stderr
        rows = [ln.split() for ln in stats.stdout.splitlines() if ln.startswith("prefill-")]
        assert [r[0] for r in rows] == ["prefill-0"]  # no pending prefill-1
        assert rows[0][-1] != "-" and float(rows[0][-1]) > 0  # prefill tok/s

        first = strata("down")
        assert first.returncode == 0 and "stopped the service" in first.stdout, first.stderr
        assert "Ray head still runs" in first.stdout
        second = strata("down")
        assert second.returncode == 0 and "nothing to stop" in second.stdout, second.stderr
        from cluster.lifecycle import head_sessions

        sessions = head_sessions("127.0.0.1:6379")
        assert len(sessions) == 1, sessions
        head_tree = _head_processes()  # with the raylet's agents and workers
        assert any(p.name() == "raylet" for p in head_tree)
        assert any("DashboardAgent" in " ".join(p.cmdline()) for p in head_tree), head_tree
        last = strata("down", "--stop-ray")
        assert last.returncode == 0 and "stopped its Ray head" in last.stdout, last.stderr
        assert not _head_processes()
        # nothing of that head is left: its monitors and raylet carry the machine's network
        # address, not 127.0.0.1, but every one names its session directory
        [session] = sessions
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if session in " ".join(p.info["cmdline"] or ())]
        assert not left, left
        assert not [p.pid for p in head_tree if p.is_running()], "the head's children remain"
        after = strata("down", "--stop-ray")
        assert after.returncode == 0 and "nothing to stop" in after.stdout
    finally:
        from cluster.lifecycle import stop_head

        stop_head("127.0.0.1:6379")
    assert not _head_processes()


@pytest.mark.slow
def test_make_run_answers_from_the_document() -> None:
    """`make run` (`strata demo`): exit 0, and each answer of smollm2-135m holds what the
    document says (the demo prints it beside the answer)."""
    from textproc.gguf_models import find_gguf

    try:
        find_gguf("smollm2-135m")
    except ValueError as e:
        pytest.skip(str(e))
    demo = strata("demo", timeout=900)
    assert demo.returncode == 0, demo.stderr
    assert "Traceback" not in demo.stderr + demo.stdout
    lines = [ln.strip() for ln in demo.stdout.splitlines()]
    answers = [ln[3:] for ln in lines if ln.startswith("A: ")]
    facts = [ln[len("(the document says: "):-1] for ln in lines if ln.startswith("(the document")]
    assert len(answers) == len(facts) == 5
    for answer, fact in zip(answers, facts, strict=True):
        assert fact.removeprefix("about ").lower() in answer.lower(), (answer, fact)
    assert "identical answer tokens" in demo.stdout and "service stopped" in demo.stdout
