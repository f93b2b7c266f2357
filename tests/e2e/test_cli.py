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
from tests.e2e.conftest import ROOT, strata_cli

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
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
            res = strata_cli(
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
        bad = strata_cli(
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
        stats = strata_cli("stats", "--server", address, "--token", "t0k")
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


def test_up_flags_override_the_yaml_only_when_given(tmp_path) -> None:  # noqa: ANN001
    from cluster.cli import build_parser
    from cluster.up import config_from_args

    yaml_path = tmp_path / "svc.yaml"
    yaml_path.write_text(
        "engine: {model: llama-3.2-1b, block_size: 32, max_num_batched_tokens: 512}\n"
        "store: {host_capacity_bytes: 3G, disk_capacity_bytes: 2G}\n"
    )
    plain = config_from_args(build_parser().parse_args(["up", "--config", str(yaml_path)]))
    assert (plain.engine.model, plain.engine.block_size) == ("llama-3.2-1b", 32)
    assert plain.engine.max_num_batched_tokens == 512
    assert (plain.store.host_capacity_bytes, plain.store.disk_capacity_bytes) == (3 << 30, 2 << 30)
    argv = ["up", "--config", str(yaml_path), "--model", "tiny", "--host-capacity", "1G"]
    flagged = config_from_args(build_parser().parse_args(argv))
    assert flagged.engine.model == "tiny" and flagged.store.host_capacity_bytes == 1 << 30
    assert flagged.engine.block_size == 32 and flagged.store.disk_capacity_bytes == 2 << 30
    bare = config_from_args(build_parser().parse_args(["up"]))  # no YAML: the defaults
    assert bare.engine.model == "tiny" and bare.engine.max_num_batched_tokens == 2048
