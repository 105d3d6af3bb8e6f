"""Find a model (hub id or local folder), then load its components once, on one device and dtype.

Hub ids go through `huggingface_hub.snapshot_download`, so the Hugging Face cache, HF_HOME and
HF_HUB_OFFLINE are respected; afterwards hub ids and local folders share one loading path.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxs.registry import DEFAULT_MODEL, MODELS

log = logging.getLogger(__name__)

# What a one-step pipeline folder needs; other files in a hub repo (fp16 variants, .ckpt) are skipped.
_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_IGNORE_PATTERNS = ["*.fp16.*", "*.ckpt", "*non_ema*", "*.onnx*", "*.msgpack", "*.h5"]


class ModelNotFoundError(RuntimeError):
    """A model could not be found locally nor fetched. The message says what to do."""


def pick_device_and_dtype(device: str | None = None, dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + fp16 when available, else CPU + fp32; either can be overridden."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu.")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                 "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"Unknown dtype '{dtype}'; use one of fp32, fp16, bf16.")
        dtype = names[dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("fp16 is not supported on the CPU (many kernels are missing); use fp32 there.")
    return device, dtype


def _how_to_fix(model: str) -> str:
    return (
        f"To run offline, download it once where you have network "
        f"(`hf download {model} --local-dir DIR`) and pass --model DIR; "
        f"a local folder in diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, "
        f"scheduler/, vae/) works too, e.g. one written by `python -m sdxs make-tiny DIR`."
    )


def resolve_model_dir(model: str | os.PathLike, *, subfolders_with_weights: tuple[str, ...] = ()) -> Path:
    """A local folder holding `model`: the folder itself, or a hub snapshot in the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1) or name.count("/") != 1
    if looks_like_path:
        known = ", ".join(MODELS)
        raise ModelNotFoundError(f"Model folder '{name}' does not exist. Pass an existing folder or a hub id ({known}).")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, allow_patterns=_WEIGHT_PATTERNS, ignore_patterns=_IGNORE_PATTERNS))
        # Components released only as pickles (.bin) are fetched only where no safetensors exist.
        missing = [sub for sub in subfolders_with_weights if not list((snapshot / sub).glob("*.safetensors"))]
        if missing:
            patterns = [f"{sub}/*.bin" if sub else "*.bin" for sub in missing]
            snapshot = Path(snapshot_download(name, allow_patterns=patterns, ignore_patterns=_IGNORE_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo, network down: one clear message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ModelNotFoundError(
            f"Could not find or download model '{name}'{offline}: {type(err).__name__}: {reason}\n{_how_to_fix(name)}"
        ) from None
    return snapshot


@dataclass
class Components:
    """Everything a one-step call needs, loaded once."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict
    decoders: dict[str, torch.nn.Module]  # "tiny" (vae/, AutoencoderTiny) and/or "large" (AutoencoderKL)
    source: str
    controlnet: torch.nn.Module | None = None  # sketch mode
    folders: tuple[str, ...] = ()  # the local folders the weights came from (key on-disk caches)


def _check_folder(root: Path, model: str) -> None:
    required = ["unet", "text_encoder", "tokenizer", "scheduler"]
    missing = [sub for sub in required if not (root / sub).is_dir()]
    if missing or not ((root / "vae").is_dir() or (root / "vae_large").is_dir()):
        raise ModelNotFoundError(
            f"'{model}' ({root}) is not a pipeline folder in diffusers layout: missing "
            f"{', '.join(missing) or 'vae/ or vae_large/'}. {_how_to_fix(model)}"
        )


def load_decoder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """AutoencoderTiny or AutoencoderKL, whichever the folder's config names."""
    import diffusers

    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise ModelNotFoundError(f"{folder} holds a {class_name}; expected AutoencoderTiny or AutoencoderKL.")
    return getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=dtype)


_PIPELINE_WEIGHTS = ("unet", "text_encoder", "vae", "vae_large")


def load_components(model: str | os.PathLike, device: torch.device, dtype: torch.dtype, *, base: str | None = None) -> Components:
    """Load a one-step text-to-image model (hub id or folder); for a PEFT LoRA adapter (a folder
    with adapter_config.json), load its base model (`base`, the registry's, or the adapter's own
    base_model_name_or_path) and merge the LoRA into the U-Net once."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = MODELS.get(str(model))
    is_adapter_repo = spec is not None and spec.kind in ("lora", "controlnet")
    root = resolve_model_dir(model, subfolders_with_weights=("",) if is_adapter_repo else _PIPELINE_WEIGHTS)
    if (root / "adapter_config.json").is_file():
        base = base or (spec.base if spec else None) or json.loads((root / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelNotFoundError(f"LoRA '{model}' names no base model; pass the base pipeline with --base.")
        components = load_components(base, device, dtype)
        components.unet = merge_lora(components.unet, root)
        components.source, components.folders = str(model), (*components.folders, str(root))
        return components
    if _class_name(root) == "ControlNetModel":  # a bare ControlNet repo: attach it to its base pipeline
        components = load_components(base or (spec.base if spec else None) or DEFAULT_MODEL, device, dtype)
        components.controlnet = load_controlnet(root, dtype).to(device)
        components.source, components.folders = str(model), (*components.folders, str(root))
        return components

    _check_folder(root, str(model))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        decoders = {}
        for sub in ("vae", "vae_large"):
            if (root / sub).is_dir():
                vae = load_decoder(root / sub, dtype)
                decoders["tiny" if type(vae).__name__ == "AutoencoderTiny" else "large"] = vae
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        controlnet = load_controlnet(root / "controlnet", dtype) if (root / "controlnet").is_dir() else None
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"Could not load '{model}' from {root}: {err}") from None
    for module in [text_encoder, unet, *decoders.values(), controlnet]:
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return Components(tokenizer, text_encoder, unet, scheduler_config, decoders, source=str(model), controlnet=controlnet, folders=(str(root),))


def _class_name(folder: Path) -> str | None:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def load_state_dict_safely(folder: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, else from a pickle .bin read with weights_only=True: tensors only,
    never code (the released sketch ControlNet exists only as a .bin)."""
    from safetensors.torch import load_file

    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        return load_file(safetensors_files[0])
    bins = sorted(folder.glob("*.bin"))
    if not bins:
        raise OSError(f"No weights (*.safetensors or *.bin) in {folder}.")
    try:
        return torch.load(bins[0], map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything that is not plain tensors
        raise ModelNotFoundError(f"Refusing to load {bins[0].name}: it is not a plain tensor file ({type(err).__name__}).") from None


def load_controlnet(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """ControlNetModel from its config, with weights loaded safely and every key checked."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_config(ControlNetModel.load_config(folder))
    controlnet.load_state_dict(load_state_dict_safely(folder), strict=True)
    if dtype != torch.float32:
        controlnet = controlnet.to(dtype=dtype)
    return controlnet.eval().requires_grad_(False)


def merge_lora(unet: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """A PEFT LoRA merged into `unet` once, at load time (never toggled per request).
    Modifies and returns `unet`; pass a copy to keep the original."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(unet, adapter_dir).merge_and_unload()
    return merged.eval().requires_grad_(False)
