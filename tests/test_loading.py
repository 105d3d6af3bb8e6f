"""Loading: local folders and hub ids share one path; failures give one clear message."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import offline_env
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
        SDXSEngine.from_pretrained(str(tmp_path / "half"), device="cpu", backend="torch")


def test_device_and_dtype_choice():
    device, dtype = pick_device_and_dtype("cpu")
    assert device.type == "cpu" and dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        pick_device_and_dtype("cpu", "fp16")
    with pytest.raises(ValueError, match="Unknown dtype"):
        pick_device_and_dtype("cpu", "int3")


def test_lora_adapter_is_merged_once(tiny_lora_dir, tiny_model_dir, tiny_engine):
    assert (tiny_lora_dir / "adapter_model.bin").is_file()
    assert json.loads((tiny_lora_dir / "adapter_config.json").read_text())["r"] == 4

    styled = SDXSEngine.from_pretrained(str(tiny_lora_dir), device="cpu", base=str(tiny_model_dir), backend="torch")
    assert not any("lora" in name for name in styled.components.unet.state_dict())
    a = np.asarray(styled.text_to_image("a cat", seed=2).images[0])
    b = np.asarray(tiny_engine.text_to_image("a cat", seed=2).images[0])
    assert not np.array_equal(a, b)
    assert styled.name == str(tiny_lora_dir)


def test_with_lora_variant_shares_all_but_the_unet(tiny_lora_dir, tiny_model_dir, tiny_engine):
    variant = tiny_engine.with_lora(str(tiny_lora_dir))
    assert variant.components.text_encoder is tiny_engine.components.text_encoder
    assert variant.components.decoders is tiny_engine.components.decoders
    assert variant.components.unet is not tiny_engine.components.unet
    # The base engine is untouched, and the variant equals loading the adapter from scratch.
    merged = SDXSEngine.from_pretrained(str(tiny_lora_dir), device="cpu", base=str(tiny_model_dir), backend="torch")
    a = np.asarray(variant.text_to_image("a cat", seed=4).images[0]).astype(int)
    b = np.asarray(merged.text_to_image("a cat", seed=4).images[0]).astype(int)
    assert np.abs(a - b).max() <= 1
    assert not any("lora" in name for name in tiny_engine.components.unet.state_dict())


def test_text_encoder_is_saved_with_the_released_weight_names(tiny_model_dir):
    """Older transformers (and optimum-intel, pinned to them) read only "text_model."-prefixed names,
    as in the released checkpoints; with other names they silently build a random text encoder."""
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from sdxs.build import build_components
    from sdxs.registry import TINY

    with safe_open(tiny_model_dir / "text_encoder" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all(name.startswith("text_model.") for name in names)
    loaded = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder").state_dict()
    built = build_components(TINY, seed=0)["text_encoder"].state_dict()
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[k], built[k]) for k in built)
