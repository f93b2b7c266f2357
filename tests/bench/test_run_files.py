"""A run's files: a small summary JSON, the per-request samples in an ignored compressed file
beside it, plots from either (``bench.run_files``, ``bench.common.report``)."""

from __future__ import annotations

import copy
import glob
import gzip
import json
import os
import random
import shutil
import subprocess

import pytest

from bench import common, run_files, trace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_RUNS = os.path.join(ROOT, "bench", "results", "cpu-2core")
TRACE_RUN = os.path.join(CPU_RUNS, "trace-20261123-111047.json")  # a replay with a baseline
NUM_REQUESTS = 20_000


def _requests(rng: random.Random) -> list[dict]:
    """Per-request records in the trace replay's shape."""
    out = []
    for i in range(NUM_REQUESTS):
        prompt = rng.randrange(64, 4096)
        out.append({"req_id": i, "submit_s": i * 0.01, "prompt_len": prompt, "output_len": 8,
                    "ttft_s": rng.uniform(0.005, 2.0) if i % 97 else None,
                    "num_cached_tokens": rng.randrange(0, prompt),
                    "tbt_s": [rng.uniform(0.001, 0.05) for _ in range(4)]})
    return out


@pytest.fixture(scope="module")
def trace_result() -> dict:
    """A committed trace summary with request records put back in: a run of the replay's
    shape whose whole JSON would be megabytes."""
    with open(TRACE_RUN, encoding="utf-8") as f:
        result = json.load(f)
    for key in ("sample_file", "sample_lists", "versions"):
        result.pop(key, None)
    rng = random.Random(0)
    result["requests"] = _requests(rng)
    result["baseline"]["requests"] = _requests(rng)
    return result


def test_report_writes_a_small_summary_and_the_samples_beside_it(tmp_path, trace_result,
                                                                 capsys) -> None:
    whole = len(json.dumps(trace_result, indent=1))
    assert whole > 2_000_000
    common.report(str(tmp_path), "trace", trace_result, trace.render_table, trace.plot)
    [path] = glob.glob(os.path.join(tmp_path, "trace-*.json"))
    spath = run_files.samples_path(path)
    assert spath.endswith(".samples.json.gz") and os.path.exists(spath)
    assert os.path.exists(common.png_path(path))
    assert spath in capsys.readouterr().out

    assert os.path.getsize(path) < 64 * 1024  # tens of KB, from megabytes
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)

    def lists_under_sample_keys(node: object) -> int:
        if isinstance(node, dict):
            return sum((k in run_files.SAMPLE_KEYS and isinstance(v, list))
                       + lists_under_sample_keys(v) for k, v in node.items())
        if isinstance(node, list):
            return sum(lists_under_sample_keys(v) for v in node)
        return 0

    assert lists_under_sample_keys(summary) == 0
    assert summary["sample_file"] == os.path.basename(spath)
    stats = summary["sample_lists"]["requests"]
    assert stats["count"] == NUM_REQUESTS
    ttfts = sorted(r["ttft_s"] for r in trace_result["requests"] if r["ttft_s"] is not None)
    assert stats["ttft_s"]["max"] == ttfts[-1]
    assert ttfts[0] <= stats["ttft_s"]["p50"] <= stats["ttft_s"]["p90"] <= stats["ttft_s"]["p99"]
    assert summary["sample_lists"]["baseline/requests"]["count"] == NUM_REQUESTS
    assert "torch" in summary["versions"]
    # The summary keeps what the tables are made of.
    assert summary["ttft_s"] == trace_result["ttft_s"]
    assert summary["hit_rate"] == trace_result["hit_rate"]

    with gzip.open(spath, "rt", encoding="utf-8") as f:
        assert json.load(f)["format"] == run_files.SAMPLES_FORMAT
    loaded = run_files.load(path)
    assert run_files.has_samples(loaded)
    assert loaded == {**trace_result, "versions": summary["versions"]}


def test_plots_from_a_summary_and_from_its_samples(tmp_path, trace_result) -> None:
    # Plots drawn from tables: a summary alone is enough.
    for name in ("decode-20261124-034324", "ttft-20261124-034848",
                 "transfer-20261124-034951", "trace-20261124-012641"):
        shutil.copy(os.path.join(CPU_RUNS, name + ".json"), tmp_path)
        summary = run_files.load(os.path.join(tmp_path, name + ".json"))
        png = os.path.join(tmp_path, name + ".png")
        run_files.draw(summary, png)
        assert os.path.getsize(png) > 1000

    # A plot of single requests needs the samples file: with it the plot is drawn, without
    # it the error names the file.
    path = os.path.join(tmp_path, "trace-1.json")
    run_files.save(path, trace_result)
    assert run_files.main(["plot", path, str(tmp_path / "with.png")]) == 0
    assert os.path.getsize(tmp_path / "with.png") > 1000
    os.remove(run_files.samples_path(path))
    summary = run_files.load(path)
    assert not run_files.has_samples(summary)
    with pytest.raises(ValueError, match=r"trace-1\.samples\.json\.gz"):
        run_files.draw(summary, str(tmp_path / "without.png"))
    assert run_files.main(["plot", path, str(tmp_path / "without.png")]) == 1


def test_resave_turns_a_whole_json_into_a_summary_losing_nothing(tmp_path, trace_result) -> None:
    old = copy.deepcopy(trace_result)
    old["requests"] = old["requests"][:200]
    old["baseline"]["requests"] = old["baseline"]["requests"][:200]
    old["rounds"] = [{"round": 0, "requests": [{"ttft_s": 0.5}, {"ttft_s": 0.25}]}]
    old["rows"] = [{"batch": 1, "step_s": [0.01, 0.03, 0.02], "tokens_per_s": 50.0}]
    old["config"]["samples"] = 3  # a count under a sample key stays in the summary
    path = os.path.join(tmp_path, "trace-20260101-000000.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(old, f, indent=1)
    assert run_files.main(["resave", path]) == 0
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["config"]["samples"] == 3
    assert "step_s" not in summary["rows"][0] and summary["rows"][0]["tokens_per_s"] == 50.0
    assert summary["sample_lists"]["rows/0/step_s"] == {
        "count": 3, "value": {"p50": 0.02, "p90": 0.03, "p99": 0.03, "max": 0.03}}
    assert summary["sample_lists"]["rounds/0/requests"]["count"] == 2
    assert run_files.load(path) == old
    first = open(path, "rb").read()
    assert run_files.main(["resave", path]) == 0  # a summary resaved is the same summary
    assert open(path, "rb").read() == first
    assert run_files.load(path) == old


def test_samples_files_are_ignored_and_machine_folders_are_not() -> None:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and \
            not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        res = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", rel],
                             capture_output=True, timeout=30)
        assert res.returncode in (0, 1), res.stderr
        return res.returncode == 0

    assert ignored("bench/results/cpu-2core/trace-20261123-111047.samples.json.gz")
    assert ignored("bench/results/some-machine/decode-20270101-000000.samples.json.gz")
    assert ignored("bench/results/decode-20270101-000000.json")  # a run not filed under a machine
    assert not ignored("bench/results/some-machine/decode-20270101-000000.json")
    assert not ignored("bench/results/some-machine/decode-20270101-000000.png")
    assert not ignored("bench/results/h200/README.md")
