"""The benchmark command runs end to end (tiny model, few runs) and its rows agree on the image."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("mode", ["text", "sketch"])
def test_bench_on_the_tiny_model(tiny_model_dir, tmp_path, mode):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sdxs.bench", "--model", str(tiny_model_dir), "--mode", mode, "--rows", "upstream,torch,peer",
           "--runs", "1", "--batch", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "SDXS_PEER_PYTHON"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    # The peer row needs its own interpreter (optimum-intel); without one it says so and the rest runs.
    peer = report["rows"].pop("peer")
    assert ("--peer-python" if mode == "text" else "text-to-image only") in peer["not_run"]
    assert set(report["rows"]) == {"upstream", "torch"} and report["matmul_peak_gflops"] > 0 and report["unet_gflop"] > 0
    upstream = report["rows"]["upstream"]
    # The upstream pipeline and this engine compute the same image from the same noise.
    assert upstream["agreement"]["max_abs_diff"] <= 1
    for row in report["rows"].values():
        assert row["stages_s"]["total"]["median"] > 0 and row["peak_rss_bytes"] > 0 and row["images_per_s_batch2"] > 0
        assert row["stages_s"]["unet"]["median"] > 0  # stage timings are really measured
    table = (tmp_path / "bench-table.md").read_text()
    assert "(a) upstream demo" in table and "(d) peer" in table and "not run" in table
