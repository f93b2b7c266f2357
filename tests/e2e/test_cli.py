"""The command line against a real service: `strata up` in the foreground, `strata generate
--server`, `strata stats`, its Prometheus metrics (every metric the Grafana dashboard queries is
there), then Ctrl-C stops it cleanly."""

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
def test_up_generate_stats_and_stop(tmp_path):
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
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        address = metrics = None
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        while metrics is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("strata: serving gRPC on "):
                address = line.split()[4]
            if line.startswith("strata: Prometheus metrics on "):
                metrics = line.split()[4]
        assert address, "strata up did not print its address"
        assert metrics and metrics.endswith("/metrics"), "strata up did not print its metrics"
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
            "1,99999",  # outside the model's vocabulary: the service refuses it
        )
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
        assert "vocabulary" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        early = strata_cli(
            "generate", "--server", address, "--prompt-ids", "1", "--max-tokens", "0"
        )
        assert early.returncode == 2 and "--max-tokens must be in [1, " in early.stderr
        stats = strata_cli("stats", "--server", address, "--token", "t0k")
        assert stats.returncode == 0, stats.stderr
        assert "prefill-0" in stats.stdout and "decode-0" in stats.stdout
        prefill_row = next(ln for ln in stats.stdout.splitlines() if ln.startswith("prefill-0"))
        assert float(prefill_row.split()[-1]) > 0  # the prefill tok/s column
        _check_metrics(metrics)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "strata: stopped" in out


def _check_metrics(url: str) -> None:
    """The live exposition: conventional names, and every metric the dashboard queries."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.workers.test_worker_metrics import dashboard_metrics

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name for f in families.values() for s in f.samples}
    assert not dashboard_metrics() - samples, sorted(dashboard_metrics() - samples)
    assert families["strata_worker_store_hits"].type == "counter"
    assert "strata_worker_pid" not in families
    assert 'strata_requests_total{status="OK"} 2.0' in text


def test_service_config_yaml(tmp_path):
    cfg = ServiceConfig.from_yaml(os.path.join(ROOT, "cluster", "deploy", "service.yaml"))
    assert cfg.engine.kv_cache_bytes == 256 << 20 and cfg.store.host_capacity_bytes == 1 << 30
    assert cfg.store_for("decode-0").disk_path == "/tmp/strata-kv/decode-0"
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {modell: tiny}\n")
    with pytest.raises(ValueError, match="unknown engine keys"):
        ServiceConfig.from_yaml(str(bad))


def test_up_flags_override_the_yaml_only_when_given(tmp_path) -> None:
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


def test_settings_precedence_flag_env_yaml_default(tmp_path, monkeypatch) -> None:
    from cluster.cli import build_parser
    from cluster.up import config_from_args

    yaml_path = tmp_path / "svc.yaml"
    yaml_path.write_text(
        "secret: from-yaml\nrouter: {auth_token: yaml-token, port: 7000, metrics_port: 9100}\n"
    )
    monkeypatch.setenv("STRATA_CONFIG", str(yaml_path))
    cfg = config_from_args(build_parser().parse_args(["up"]))  # the YAML from the environment
    assert (cfg.secret, cfg.router.auth_token, cfg.router.port) == ("from-yaml", "yaml-token", 7000)
    monkeypatch.setenv("STRATA_TOKEN", "env-token")
    monkeypatch.setenv("STRATA_SECRET", "env-secret")
    monkeypatch.setenv("STRATA_PORT", "7001")
    cfg = config_from_args(build_parser().parse_args(["up"]))  # env over YAML
    assert (cfg.secret, cfg.router.auth_token, cfg.router.port) == ("env-secret", "env-token", 7001)
    assert cfg.router.metrics_port == 9100  # not in the environment: the YAML's
    argv = ["up", "--token", "flag-token", "--secret", "flag-secret", "--port", "7002"]
    cfg = config_from_args(build_parser().parse_args(argv))  # flags over env
    assert (cfg.secret, cfg.router.auth_token, cfg.router.port) == (
        "flag-secret",
        "flag-token",
        7002,
    )
    monkeypatch.delenv("STRATA_CONFIG")
    for var in ("STRATA_TOKEN", "STRATA_SECRET", "STRATA_PORT"):
        monkeypatch.delenv(var)
    cfg = config_from_args(build_parser().parse_args(["up"]))  # the defaults
    assert (cfg.secret, cfg.router.auth_token, cfg.router.port) == (None, None, 50051)
