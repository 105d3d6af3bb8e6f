"""Shared fixtures: a tiny model in the released checkpoints' exact folder layout, built locally."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session", autouse=True)
def _private_openvino_cache(tmp_path_factory):
    """Converted OpenVINO models of test runs go to a temporary folder, not the user's cache."""
    os.environ["SDXS_OPENVINO_CACHE"] = str(tmp_path_factory.mktemp("openvino-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sdxs.build import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from sdxs import SDXSEngine

    return SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch")  # the reference path


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A PEFT LoRA for the tiny U-Net, saved as the anime LoRA is (adapter_config.json + adapter_model.bin)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    dest = tmp_path_factory.mktemp("loras") / "tiny-lora"
    get_peft_model(unet, config).save_pretrained(dest, safe_serialization=False)
    return dest


def offline_env(tmp_path) -> dict:
    """Environment for a subprocess that must not touch the network nor a user's HF cache."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT))
    return env
