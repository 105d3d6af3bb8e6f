"""Shared fixtures: a tiny model in the released checkpoints' exact folder layout, built locally."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdxs.build import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from sdxs import SDXSEngine

    return SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu")


def offline_env(tmp_path) -> dict:
    """Environment for a subprocess that must not touch the network nor a user's HF cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    return env
