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
    if mode == "sketch":  # concurrent sketch requests through the batcher (the text mode's: the test below)
        cmd += ["--clients", "2"]
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
    if mode == "sketch":
        # the upstream demo serves one request at a time: no clients figures; the engine's sketch answers are its own
        clients = report["rows"]["torch"]["clients"]
        assert "clients" not in upstream and clients["forwards"] >= 1 and clients["vs_solo_max_abs_diff"] <= 2
    table = (tmp_path / "bench-table.md").read_text()
    assert "(a) upstream demo" in table and "(d) peer" in table and "not run" in table


def test_bench_gpu_path_flags_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The GPU rows' measurements, run on the CPU: a batch in micro-batches, concurrent clients through
    the request batcher vs the same requests alone, and the compiled row that has no stage times."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sdxs.bench", "--model", str(tiny_model_dir), "--rows", "torch,torch-compile", "--runs", "1",
           "--batch", "5", "--micro-batch", "2", "--clients", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["dtype"], report["matmul_peak_dtype"], report["batch"], report["micro_batch"], report["clients"]) == ("fp32", "fp32", 5, 2, 3)
    rounds = report["client_rounds"]
    assert rounds == 4  # the CPU's rounds
    eager, compiled = report["rows"]["torch"], report["rows"]["torch-compile"]
    assert set(eager["stages_s"]) == {"text_encoder", "unet", "decoder", "total"}
    assert set(compiled["stages_s"]) == {"total"}  # one fused region: no stage times
    assert compiled["agreement"]["max_abs_diff"] <= 1  # the compiled path gives the eager image (to 1/255)
    requests = 3 * rounds
    for row in (eager, compiled):
        # 5 images made in forwards of 2 (the engine got --micro-batch), in fp32
        assert row["images_per_s_batch5"] > 0 and row["batched_images"] == 5 and row["micro_batch"] == 2 and row["dtype"] == "fp32"
        assert row["first_call_batch5_s"] > 0
        clients = row["clients"]
        assert (clients["clients"], clients["rounds"], clients["requests"], clients["vs_solo_compared"]) == (3, rounds, requests, requests)
        assert 1 <= clients["forwards"] <= requests  # the requests went through the batcher
        # each figure from its own run: batched through the batcher, solo one after another
        assert clients["batched_s"] != clients["solo_s"]
        assert clients["images_per_s"] == pytest.approx(requests / clients["batched_s"])
        assert clients["images_per_s_solo"] == pytest.approx(requests / clients["solo_s"])
        # each batched answer is its own request's image: the solo image up to batched-matmul rounding (test_engine)
        assert clients["vs_solo_max_abs_diff"] <= 2
    table = (tmp_path / "bench-table.md").read_text()
    assert "fp32 matmul peak" in table and "| img/s 3 clients (solo) |" in table
    compiled_line = next(line for line in table.splitlines() if line.startswith("| (c) this engine, torch.compile"))
    cells = [cell.strip() for cell in compiled_line.strip("|").split("|")]
    assert cells[1:4] == ["fused"] * 3 and cells[11].startswith("≥ ") and cells[12].startswith("≥ ")
    c = compiled["clients"]
    assert cells[8] == f"**{c['images_per_s']:.2f}** (solo {c['images_per_s_solo']:.2f}: {c['images_per_s'] / c['images_per_s_solo']:.1f}x)"
    eager_line = next(line for line in table.splitlines() if line.startswith("| (b) this engine, PyTorch eager"))
    eager_cells = [cell.strip() for cell in eager_line.strip("|").split("|")]
    assert eager_cells[2] == f"{eager['stages_s']['unet']['median'] * 1000:.0f} ms" and not eager_cells[11].startswith("≥")
    assert f"max diff {eager['clients']['vs_solo_max_abs_diff']}/255 over {requests} images" in table


def test_matmul_peak_is_measured_in_the_rows_dtype(tiny_model_dir, tmp_path):
    """A GPU's fp16/bf16 peak is ~50x its fp32 one: GFLOP/s are compared with the peak in the rows' dtype."""
    from sdxs.bench import client_rounds, default_batch, main, matmul_peak, rows_dtype

    assert [rows_dtype("cuda", None), rows_dtype("cuda:0", "bf16"), rows_dtype("cpu", None), rows_dtype("cpu", "bf16")] == ["fp16", "bf16", "fp32", "bf16"]
    assert [default_batch("cuda"), default_batch("cuda:1"), default_batch("cpu")] == [64, 64, 4]
    assert [client_rounds("cuda:0"), client_rounds("cpu")] == [16, 4]
    peak = matmul_peak("cpu", "bf16", n=128, repeats=1)
    assert peak["dtype"] == "bf16" and peak["gflops"] > 0 and peak["n"] == 128
    # what main() does with --dtype: the peak in bf16, said in the JSON and the table's header
    out = tmp_path / "bench"
    assert main(["--model", str(tiny_model_dir), "--rows", "torch", "--runs", "1", "--batch", "1", "--dtype", "bf16", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["dtype"], report["matmul_peak_dtype"], report["rows"]["torch"]["dtype"]) == ("bf16", "bf16", "bf16")
    assert "--dtype bf16" in report["command"]
    assert "bf16 matmul peak measured in this run" in (tmp_path / "bench-table.md").read_text()
    assert main(["--model", str(tiny_model_dir), "--rows", "peer", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["batch"] == 4  # the CPU default
    with pytest.raises(SystemExit, match="fp16 is not supported on the CPU"):
        main(["--model", str(tiny_model_dir), "--rows", "peer", "--dtype", "fp16", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_dir), "--micro-batch", "0", "--out", str(out)])


def gpu_report(rows: dict) -> dict:
    """A report as run_parent writes it for `--device cuda --clients 16` (constructed: no GPU here)."""
    return {
        "command": "python -m sdxs.bench --device cuda --clients 16", "date": "2026-01-01", "model": "IDKiro/sdxs-512-dreamshaper",
        "mode": "text", "device": "cuda", "dtype": "fp16", "runs": 5, "batch": 64, "micro_batch": None, "clients": 16, "client_rounds": 4,
        "machine": {"cpu": "x", "cores": 16, "torch_threads": 16, "cpu_features": [], "torch": "2.11", "gpu": "NVIDIA H200"},
        "matmul_peak_gflops": 700_000.0, "matmul_peak_dtype": "fp16", "matmul_peak_n": 8192, "unet_gflop": 359.0,
        "fp32_weights_bytes": 2**31, "rows": rows,
    }


def gpu_row(stages: dict, peak_gpu_bytes: int, clients: dict | None = None) -> dict:
    stats = {key: {"median": value, "min": value, "max": value} for key, value in stages.items()}
    row = {"first_call_s": 20.0, "first_call_batch64_s": 30.0, "stages_s": stats, "images_per_s_batch1": 1 / stages["total"], "images_per_s_batch64": 1000.0,
           "batched_images": 64, "peak_rss_bytes": 7 * 2**30, "peak_gpu_bytes": peak_gpu_bytes}
    if clients:
        row["clients"] = clients
    return row


def test_gpu_table_shows_gpu_memory_and_fused_rows():
    from sdxs.bench import markdown

    clients = {"clients": 16, "rounds": 4, "requests": 64, "forwards": 8, "batched_s": 0.1, "solo_s": 0.5, "images_per_s": 640.0,
               "images_per_s_solo": 128.0, "vs_solo_max_abs_diff": 1, "vs_solo_compared": 64}
    rows = {
        "upstream": gpu_row({"text_encoder": 0.006, "unet": 0.016, "decoder": 0.003, "total": 0.046}, 3 * 2**30),
        "torch": gpu_row({"text_encoder": 0.008, "unet": 0.0359, "decoder": 0.006, "total": 0.039}, 4 * 2**30, clients),
        "torch-compile": gpu_row({"total": 0.00718}, 5 * 2**30, clients),
        "openvino": {"not_run": "CPU only"},
    }
    table = markdown(gpu_report(rows))
    lines = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| (")}
    header = next(line for line in table.splitlines() if line.startswith("| row"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert "fp16 matmul peak measured in this run: 700000 GFLOP/s" in table and "GPU NVIDIA H200" in table
    assert columns[9:13] == ["first call", "peak GPU memory", "U-Net GFLOP/s b1 (% peak)", "U-Net GFLOP/s b64 (% peak)"]
    compiled = lines["(c) this engine, torch.compile + channels_last (GPU path)"]
    eager = lines["(b) this engine, PyTorch eager"]
    upstream = lines["(a) upstream demo: diffusers pipeline, `pipe.to()` + VAE swap per request"]
    assert len(compiled) == len(eager) == len(columns) == len(lines["(c) this engine, OpenVINO fp32 (static shapes)"])
    assert [compiled[10], eager[10], upstream[10]] == ["5.00 GiB", "4.00 GiB", "3.00 GiB"]  # GPU memory, not the RSS
    # the compiled row: no stage times; its U-Net rate from the end-to-end time, as a lower bound
    assert compiled[1:4] == ["fused"] * 3 and compiled[11] == "≥ 50000 (7%)"
    assert eager[11] == "10000 (1%)" and eager[12] == "≥ 359000 (51%)"  # 359 GFLOP / 35.9 ms; 359 GFLOP x 1000 img/s
    assert compiled[8] == "**640.00** (solo 128.00: 5.0x)" and upstream[8] == "n/a"
    assert compiled[9] == "20.0 s (b64: 30.0 s)"  # first calls: batch 1, then the batched shape
    assert "64 requests in 8 forwards (8.0 images per forward)" in table and "fused: the compiled path" in table


# --- the SDXL family (issue 17): sdxs-1024 at its native 1024x1024 -----------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from sdxs.build import make_tiny

    return make_tiny(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", family="sdxl")


def test_bench_on_a_tiny_sdxl_model_runs_the_sdxl_pipeline_and_says_which_rows_cannot(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "sdxs.bench", "--model", str(tiny_sdxl_dir), "--rows", "upstream,torch,openvino,peer",
           "--runs", "1", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert "no SDXL path" in report["rows"].pop("openvino")["not_run"] and "SD-1.x/2.x" in report["rows"].pop("peer")["not_run"]
    assert report["sdxl"] and report["unet_gflop"] > 0
    upstream, torch_row = report["rows"]["upstream"], report["rows"]["torch"]
    assert upstream["size"] == torch_row["size"] == 128  # the model's native size, not 512
    assert upstream["agreement"]["max_abs_diff"] <= 1  # StableDiffusionXLPipeline and the engine: the same image
    assert all(row["stages_s"]["text_encoder"]["median"] > 0 for row in (upstream, torch_row))
    table = (tmp_path / "bench-table.md").read_text()
    assert "text-to-image at 128x128" in table and "both text encoders" in table

    proc = subprocess.run(cmd[:-2] + ["--mode", "sketch", "--out", str(tmp_path / "sketch")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no sketch ControlNet" in proc.stderr and "Traceback" not in proc.stderr


def test_the_sdxs_1024_id_builds_both_text_encoders_and_matches_the_sdxl_pipeline(monkeypatch):
    """`--model sdxs-1024` builds the reference architecture with random weights (here swapped for the tiny
    SDXL one: the real one is 1.6 B parameters): both text encoders, the second tokenizer padding with "!",
    and the upstream row's StableDiffusionXLPipeline computes the engine's image."""
    import dataclasses

    import numpy as np

    from sdxs import bench, registry
    from sdxs.build import TINY_SDXL

    spec = registry.REFERENCE_MODELS[registry.SDXS_1024]
    monkeypatch.setitem(registry.REFERENCE_MODELS, registry.SDXS_1024, dataclasses.replace(spec, architecture=TINY_SDXL))
    assert bench.known_spec("sdxs-1024") is not None and bench.is_sdxl_model("sdxs-1024")
    assert bench.known_spec(registry.SDXL_BASE) is None  # a multi-step teacher is no bench model
    engine = bench._build_engine("sdxs-1024", "torch", "cpu", None)
    components = engine.torch_components
    assert components.is_sdxl and components.text_encoder_2 is not None and components.tokenizer_2.pad_token == "!"
    assert engine.native_size == 128
    noise = engine.initial_noise([0], 128, 128)
    upstream = np.asarray(bench._upstream_call(engine, bench.upstream_pipeline(engine), noise)[0], dtype=int)
    ours = np.asarray(engine.text_to_image(bench.PROMPT, seed=0).images[0], dtype=int)
    assert np.abs(upstream - ours).max() <= 1
