"""Ray workers keep the user's ``PYTHONPATH`` beside the repository root."""

from __future__ import annotations

import os
import sys

import ray

from cluster.config import ServiceConfig
from cluster.launcher import _ROOT, connect, worker_env


def test_root_first_then_the_users_entries() -> None:
    env = worker_env({"PYTHONPATH": os.pathsep.join(["/opt/a", "", _ROOT, "/opt/b"])})
    assert env["PYTHONPATH"].split(os.pathsep) == [_ROOT, "/opt/a", "/opt/b"]
    assert worker_env({})["PYTHONPATH"] == _ROOT


def test_a_worker_imports_a_module_from_the_users_pythonpath(tmp_path, monkeypatch) -> None:
    (tmp_path / "strata_user_pkg.py").write_text("VALUE = 'from the user path'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert not ray.is_initialized()
    assert connect(None, ServiceConfig())
    try:

        @ray.remote(num_cpus=0)
        def probe() -> tuple[str, bool]:
            import strata_user_pkg  # only on the user's PYTHONPATH

            import engine  # the repository root is there too  # noqa: F401

            return strata_user_pkg.VALUE, _ROOT in sys.path

        assert ray.get(probe.remote(), timeout=120) == ("from the user path", True)
    finally:
        ray.shutdown()
