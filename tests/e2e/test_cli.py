"""The command line against a real service: `strata up` in the foreground, `strata generate
--server`, `strata stats`, then Ctrl-C stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.config import ServiceConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.timeout(600)


def _strata(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def test_up_generate_stats_and_stop(tmp_path):  # noqa: ANN001
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "up",
            "--port",
            "0",
            "--device-capacity",
            "16M",
            "--host-capacity",
            "16M",
            "--disk-path",
            str(tmp_path / "kv"),
            "--token",
            "t0k",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        address = None
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("strata: serving gRPC on "):
                address = line.split()[4]
        assert address, "strata up did not print its address"
        ids = ",".join(str(i % 200) for i in range(100))
        outs = []
        for _ in range(2):
            res = _strata(
                "generate",
                "--server",
                address,
                "--token",
                "t0k",
                "--prompt-ids",
                ids,
                "--max-tokens",
                "5",
                "--json",
            )
            assert res.returncode == 0, res.stderr
            outs.append(json.loads(res.stdout))
        assert outs[0]["output_token_ids"] == outs[1]["output_token_ids"]
        assert len(outs[0]["output_token_ids"]) == 5
        assert outs[1]["cached_tokens_by_tier"] == {"device": 96}
        bad = _strata(
            "generate",
            "--server",
            address,
            "--token",
            "t0k",
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "0",
        )
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
        stats = _strata("stats", "--server", address, "--token", "t0k")
        assert stats.returncode == 0, stats.stderr
        assert "prefill-0" in stats.stdout and "decode-0" in stats.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "strata: stopped" in out


def test_service_config_yaml(tmp_path):  # noqa: ANN001
    cfg = ServiceConfig.from_yaml(os.path.join(ROOT, "cluster", "deploy", "service.yaml"))
    assert cfg.engine.kv_cache_bytes == 256 << 20 and cfg.store.host_capacity_bytes == 1 << 30
    assert cfg.store_for("decode-0").disk_path == "/tmp/strata-kv/decode-0"
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {modell: tiny}\n")
    with pytest.raises(ValueError, match="unknown engine keys"):
        ServiceConfig.from_yaml(str(bad))
