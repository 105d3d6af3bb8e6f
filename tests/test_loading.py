"""Loading: local folders and hub ids share one path; failures give one clear message."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import offline_env
from sdxs import ModelNotFoundError, SDXSEngine, pick_device_and_dtype
from sdxs.loading import UnsupportedModelError, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]


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


def test_missing_folder_and_incomplete_folder(tmp_path, tiny_model_dir):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="missing text_encoder/, tokenizer/, scheduler/, vae/ \\(or vae_large/\\)"):
        SDXSEngine.from_pretrained(str(tmp_path / "half"), device="cpu", backend="torch")
    # A local folder gets what a complete folder holds, never `hf download <local path>`.
    shutil.copytree(tiny_model_dir, tmp_path / "no-text-encoder", ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(ModelNotFoundError) as missing:
        SDXSEngine.from_pretrained(str(tmp_path / "no-text-encoder"), device="cpu", backend="torch")
    message = str(missing.value)
    assert "is not a complete pipeline folder: missing text_encoder/." in message
    assert "A complete one-step pipeline folder holds model_index.json, unet/, text_encoder/" in message
    assert "hf download" not in message


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


def load(folder) -> SDXSEngine:
    return SDXSEngine.from_pretrained(str(folder), device="cpu", backend="torch")


def copy_without_controlnet(tiny_model_dir, dest) -> Path:
    shutil.copytree(tiny_model_dir, dest, ignore=shutil.ignore_patterns("controlnet"))
    return dest


@pytest.mark.parametrize("part", ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae_large/diffusion_pytorch_model.safetensors"])
def test_truncated_safetensors_are_named_with_what_to_do(tiny_model_dir, tmp_path, part):
    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    path = folder / part
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ModelNotFoundError) as broken:
        load(folder)
    message = str(broken.value)
    assert f"{path} is truncated or corrupt" in message and "download (or copy) it again" in message


def test_a_safetensors_file_that_is_not_one_is_corrupt(tiny_model_dir, tmp_path):
    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>Not found</html>" * 100)
    with pytest.raises(ModelNotFoundError, match="diffusion_pytorch_model.safetensors is truncated or corrupt"):
        load(folder)


def test_a_corrupt_config_is_named(tiny_model_dir, tmp_path):
    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DCondit')
    with pytest.raises(ModelNotFoundError, match=r"unet/config.json is not valid JSON .*truncated or corrupt"):
        load(folder)


class _RunsCode:
    """A pickled object whose loading would run a shell command (touch SENTINEL)."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_a_pickle_with_code_in_unet_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    weights.unlink()
    sentinel = tmp_path / "code-ran"
    torch.save({**state, "payload": _RunsCode(sentinel)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelNotFoundError) as refused:
        load(folder)
    message = str(refused.value)
    assert "Refusing to load" in message and "diffusion_pytorch_model.bin" in message
    assert "GLOBAL posix.system" in message and "arbitrary code" in message and "weights_only=True" in message
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "edit, problem",
    [
        ("unet-class", "unet/config.json names the class EvilUNet"),
        ("model-index-module", "model_index.json loads unet from the module 'evil_unet'"),
        ("auto-map", "text_encoder/config.json has an auto_map"),
        ("scheduler-class", "scheduler/scheduler_config.json names the class EvilScheduler, which is not a diffusers scheduler"),
    ],
)
def test_a_folder_that_needs_custom_code_is_refused_without_running_it(tiny_model_dir, tmp_path, edit, problem):
    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    sentinel = tmp_path / "code-ran"
    code = f"open({str(sentinel)!r}, 'w').close()\n"
    for sub in ("unet", "text_encoder", "scheduler"):
        (folder / sub / "evil_unet.py").write_text(code)
    (folder / "evil_unet.py").write_text(code)

    def edit_json(path, **changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    if edit == "unet-class":
        edit_json(folder / "unet" / "config.json", _class_name="EvilUNet")
    elif edit == "model-index-module":
        edit_json(folder / "model_index.json", unet=["evil_unet", "EvilUNet"])
    elif edit == "auto-map":
        edit_json(folder / "text_encoder" / "config.json", auto_map={"AutoModel": "evil_unet.EvilModel"})
    else:
        edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="EvilScheduler")
    with pytest.raises(UnsupportedModelError) as refused:
        load(folder)
    assert problem in str(refused.value) and "never runs code shipped with a model" in str(refused.value)
    assert not sentinel.exists()


def test_no_loader_passes_trust_remote_code():
    sources = [*ROOT.glob("sdxs/*.py"), *ROOT.glob("train/*.py"), ROOT / "app.py", ROOT / "demo_sketch.py"]
    assert len(sources) > 10
    assert [p.name for p in sources if re.search(r"trust_remote_code\s*=", p.read_text())] == []


def test_sketch_model_offline_names_every_repo_it_needs(tmp_path, tiny_model_dir):
    """Neither repo in the cache, then the ControlNet alone: each message names the sketch repo and its base."""
    hf_home = tmp_path / "hf-home"
    snapshot = hf_home / "hub" / "models--IDKiro--sdxs-512-dreamshaper-sketch" / "snapshots" / ("0" * 40)
    code = (
        "import sys, torch\n"
        "from sdxs.loading import ModelNotFoundError, load_components\n"
        "try:\n"
        "    load_components('IDKiro/sdxs-512-dreamshaper-sketch', torch.device('cpu'), torch.float32)\n"
        "except ModelNotFoundError as err:\n"
        "    print(err)\n"
    )
    env = offline_env(tmp_path)
    messages = []
    for cached in (False, True):
        if cached:  # the ControlNet repo is in the cache, its base is not
            shutil.copytree(tiny_model_dir / "controlnet", snapshot)
            (snapshot.parents[1] / "refs").mkdir()
            (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        messages.append(proc.stdout)
    neither, controlnet_only = messages
    assert "IDKiro/sdxs-512-dreamshaper-sketch" in neither and "`hf download IDKiro/sdxs-512-dreamshaper --local-dir BASE`" in neither
    assert "--model DIR --base BASE" in neither
    assert "'IDKiro/sdxs-512-dreamshaper-sketch' runs on the base pipeline 'IDKiro/sdxs-512-dreamshaper', which could not be loaded" in controlnet_only


def test_components_sdxs_never_loads_are_not_taken_for_custom_code(tiny_model_dir, tmp_path):
    """diffusers' save_pretrained lists an SD pipeline's safety checker under the module "stable_diffusion":
    sdxs never loads it, so the folder runs (only the components sdxs loads are checked for code)."""
    from sdxs import SDXSEngine

    folder = copy_without_controlnet(tiny_model_dir, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    engine = SDXSEngine.from_pretrained(str(folder), device="cpu", backend="torch")
    assert engine.text_to_image("a cat", seed=0).images[0].size == (engine.native_size, engine.native_size)


def fake_hub(monkeypatch, tmp_path, repos: dict):
    """huggingface_hub.snapshot_download over local folders ({repo id: folder}), with the hub's pattern
    semantics (huggingface_hub.utils.filter_repo_objects): each call copies the files it allows into a
    snapshot folder and returns it; the calls' patterns are recorded."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        remote = repos[repo_id]
        snapshot = tmp_path / "snapshots" / repo_id.replace("/", "--")
        files = [p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(remote / name, snapshot / name)
        snapshot.mkdir(parents=True, exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_pipeline_repo_is_fetched_without_its_root_single_file_checkpoints(tmp_path, monkeypatch):
    """SDXL base's repo holds, next to its component folders, two single-file checkpoints of 6.9 GB each at
    its root: a pipeline repo (model_index.json) is fetched without root safetensors (and fp16 variants);
    a repo without model_index.json (a TAESD decoder, a LoRA) keeps its root weights."""
    from sdxs.build import make_tiny

    pipeline = make_tiny(tmp_path / "remote-sdxl", family="sdxl")
    (pipeline / "sd_xl_base_1.0.safetensors").write_bytes(b"single-file checkpoint")
    (pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"fp16 variant")
    decoder = tmp_path / "remote-taesd"
    shutil.copytree(pipeline / "vae", decoder)
    calls = fake_hub(monkeypatch, tmp_path, {"org/sdxl-like": pipeline, "org/taesd-like": decoder})

    snapshot = resolve_model_dir("org/sdxl-like")
    assert not (snapshot / "sd_xl_base_1.0.safetensors").exists() and not (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    for sub in ("unet", "vae", "vae_large", "text_encoder", "text_encoder_2"):
        assert (snapshot / sub / "config.json").is_file() and list((snapshot / sub).glob("*.safetensors")), sub
    assert (snapshot / "tokenizer_2" / "vocab.json").is_file()
    SDXSEngine.from_pretrained(str(snapshot), device="cpu", backend="torch")  # whole: it loads

    snapshot = resolve_model_dir("org/taesd-like", subfolders_with_weights=("",))
    assert list(snapshot.glob("*.safetensors")) and (snapshot / "config.json").is_file()
    assert [patterns for _, patterns in calls if "model_index.json" not in patterns] == [
        ["*.json", "*.txt", "*/*.safetensors"], ["*.json", "*.txt", "*.safetensors"]]
