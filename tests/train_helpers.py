"""Helpers for the training-stage tests: a tiny teacher, in-process runs of a stage's main(), log.csv."""

import csv
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one CPU thread, and far faster than on two when another job shares
    the cores (OpenMP then waits on the busy one); restored afterwards for the other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_teacher(tmp_path_factory) -> Path:
    from train.tiny_teacher import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-teacher")


def run_stage(module, output_dir: Path, *args: str, teacher: Path | None = None, cache_dir: Path | None = None,
              preset: str = "smoke") -> int:
    """Run `module.main` with --preset smoke (or `preset`) in this process (no re-import: fast), then reset
    accelerate's process-wide state and torch's thread count so the next run (or test) starts
    clean, as a new process would."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    argv = ["--preset", preset, "--output_dir", str(output_dir), *args]
    if teacher is not None:
        argv += ["--teacher", str(teacher)]
    if cache_dir is not None:
        argv += ["--cache_dir", str(cache_dir)]
    try:
        return module.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def read_log(output_dir: Path) -> list[dict]:
    with (Path(output_dir) / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], name: str) -> list[float]:
    values = [float(r[name]) for r in rows if r[name] != ""]
    assert values and all(math.isfinite(v) for v in values), (name, values)
    return values


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sdxs_engine(folder: Path):
    """Load a final folder with the project's own loader and one-step engine (torch backend, CPU)."""
    import torch

    from sdxs import SDXSEngine
    from sdxs.loading import load_components

    device = torch.device("cpu")
    return SDXSEngine(load_components(str(folder), device, torch.float32), device, torch.float32)
