"""Loading: local folders and hub ids share one path; failures give one clear message."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, offline_env
from sdxs import ModelNotFoundError, SDXSEngine, pick_device_and_dtype
from sdxs.loading import resolve_model_dir


def test_hub_id_offline_gives_one_clear_error(tmp_path):
    code = "from sdxs.loading import resolve_model_dir; resolve_model_dir('IDKiro/sdxs-512-dreamshaper')"
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ModelNotFoundError" in proc.stderr and "IDKiro/sdxs-512-dreamshaper" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr and "--model DIR" in proc.stderr


def test_hub_cache_is_used_offline(tmp_path, tiny_model_dir):
    """A snapshot already in the HF cache loads with HF_HUB_OFFLINE=1, through the hub id."""
    hf_home = tmp_path / "hf-home"
    snapshot = hf_home / "hub" / "models--someone--tiny-sdxs" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    import shutil

    shutil.copytree(tiny_model_dir, snapshot)
    code = "from sdxs.loading import resolve_model_dir; print(resolve_model_dir('someone/tiny-sdxs'))"
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(snapshot)


def test_missing_folder_and_incomplete_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="missing text_encoder"):
        SDXSEngine.from_pretrained(str(tmp_path / "half"), device="cpu")


def test_device_and_dtype_choice():
    device, dtype = pick_device_and_dtype("cpu")
    assert device.type == "cpu" and dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        pick_device_and_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_device_and_dtype("cpu", "int3")


def test_lora_adapter_is_merged_once(tmp_path, tiny_model_dir, tiny_engine):
    """A PEFT adapter saved as the anime LoRA is (adapter_config.json + adapter_model.bin)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    get_peft_model(unet, config).save_pretrained(tmp_path / "lora", safe_serialization=False)
    assert (tmp_path / "lora" / "adapter_model.bin").is_file()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4

    styled = SDXSEngine.from_pretrained(str(tmp_path / "lora"), device="cpu", base=str(tiny_model_dir))
    assert not any("lora" in name for name in styled.components.unet.state_dict())
    a = np.asarray(styled.text_to_image("a cat", seed=2).images[0])
    b = np.asarray(tiny_engine.text_to_image("a cat", seed=2).images[0])
    assert not np.array_equal(a, b)
    assert styled.name == str(tmp_path / "lora")
