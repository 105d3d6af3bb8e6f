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

from sdxs.registry import BUILTIN, DEFAULT_MODEL, MODELS

log = logging.getLogger(__name__)

# What a one-step pipeline folder needs; other files in a hub repo (fp16 variants, .ckpt) are skipped.
_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_IGNORE_PATTERNS = ["*.fp16.*", "*.ckpt", "*non_ema*", "*.onnx*", "*.msgpack", "*.h5"]
# A pipeline repo (one with model_index.json) keeps its weights in component folders; safetensors at
# its root are single-file checkpoints of the same model (SDXL base: two of 6.9 GB), never read here.
_PIPELINE_WEIGHT_PATTERNS = ["*.json", "*.txt", "*/*.safetensors"]


class ModelNotFoundError(RuntimeError):
    """A model could not be found locally nor fetched, or its files cannot be read. The message says what to do."""


class UnsupportedModelError(ValueError):
    """A model that exists but is not one this engine runs: a multi-step pipeline, custom code, or
    parts that do not fit together. The message says what it is and what to use instead."""


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


COMPLETE_FOLDER = (
    "A complete one-step pipeline folder holds model_index.json, unet/, text_encoder/, tokenizer/, "
    "scheduler/ and vae/ (AutoencoderTiny or AutoencoderKL), optionally vae_large/ and controlnet/ (an SDXL-family "
    "model also text_encoder_2/ and tokenizer_2/), in diffusers layout, as `python -m sdxs make-tiny DIR` and the train/ stages (OUTPUT_DIR/final) write it."
)


def _how_to_fix(model: str) -> str:
    """What to do when a hub id cannot be fetched; names every repo a LoRA or ControlNet needs."""
    spec = MODELS.get(model)
    if spec is not None and spec.base:
        return (
            f"'{model}' ({spec.kind}) runs on its base pipeline '{spec.base}', so it needs both repos. To run "
            f"offline, download both once where you have network (`hf download {model} --local-dir DIR` and "
            f"`hf download {spec.base} --local-dir BASE`) and pass --model DIR --base BASE."
        )
    return (
        f"To run offline, download it once where you have network "
        f"(`hf download {model} --local-dir DIR`) and pass --model DIR; "
        f"a local folder in diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, "
        f"scheduler/, vae/) works too, e.g. one written by `python -m sdxs make-tiny DIR`."
    )


def resolve_model_dir(model: str | os.PathLike, *, subfolders_with_weights: tuple[str, ...] = ()) -> Path:
    """A local folder holding `model`: a built-in model's folder (its short name, e.g. "mini", wins
    over a folder of that name: pass ./mini for that), the folder itself, or a hub snapshot in the HF cache."""
    if str(model) in BUILTIN:
        return builtin_dir(str(model))
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
        is_pipeline = (Path(snapshot_download(name, allow_patterns=["model_index.json"])) / "model_index.json").is_file()
        patterns = _PIPELINE_WEIGHT_PATTERNS if is_pipeline else _WEIGHT_PATTERNS
        snapshot = Path(snapshot_download(name, allow_patterns=patterns, ignore_patterns=_IGNORE_PATTERNS))
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


def builtin_dir(name: str) -> Path:
    """The folder of the built-in model `name`, shipped with this repository."""
    folder = BUILTIN[name].folder
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"The built-in model '{name}' should be in this repository's models/{folder.name}/, but "
            f"{'that folder has no model_index.json' if folder.is_dir() else 'that folder is missing'}: the checkout is "
            f"incomplete. Restore it (`git checkout -- models/{folder.name}`, or clone the repository again)."
        )
    return folder


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
    # SDXL family: the second text encoder (CLIPTextModelWithProjection, OpenCLIP-bigG) and its
    # tokenizer; None for SD-1.x/2.x models
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None

    @property
    def is_sdxl(self) -> bool:
        """An SDXL-family model: its U-Net reads the pooled text embedding and size numbers (text_time)."""
        return is_sdxl_unet(self.unet.config)


def is_sdxl_unet(unet_config) -> bool:
    """SDXL's micro-conditioning: the U-Net takes added_cond_kwargs {"text_embeds", "time_ids"}."""
    return dict(unet_config).get("addition_embed_type") == "text_time"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_json(path: Path) -> dict | None:
    """A JSON config, or None when the file is not there; a corrupt file is one clear error."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelNotFoundError(f"{path} is not valid JSON ({_first_line(err)}): the file is truncated or corrupt; download or copy it again.") from None


def _check_folder(root: Path, model: str, local: bool) -> None:
    """Every component folder a one-step call needs is there (an SDXL-family model needs two text
    encoders and two tokenizers)."""
    needed = ["unet", "text_encoder", "tokenizer", "scheduler"]
    if is_sdxl_unet(read_json(root / "unet" / "config.json") or {}):
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [f"{sub}/" for sub in needed if not (root / sub).is_dir()]
    if not ((root / "vae").is_dir() or (root / "vae_large").is_dir()):
        missing.append("vae/ (or vae_large/)")
    if missing:
        if local:  # no download advice for a folder on disk: say what a complete one holds
            where = f"'{model}'"
            fix = f"{COMPLETE_FOLDER} Copy the missing folders from the model it was made from, or pass the complete folder."
        else:
            where, fix = f"'{model}' ({root})", _how_to_fix(model)
        raise ModelNotFoundError(f"{where} is not a complete pipeline folder: missing {', '.join(missing)}. {fix}")


# --- what a folder is: no custom code, a one-step model ----------------------------------------------

# The classes sdxs builds for each component. It imports no code from a model folder: no
# trust_remote_code anywhere, and a folder that names other classes or an auto_map is refused.
_COMPONENT_CONFIGS = {
    "unet": ("config.json", {"UNet2DConditionModel"}),
    "vae": ("config.json", {"AutoencoderTiny", "AutoencoderKL"}),
    "vae_large": ("config.json", {"AutoencoderTiny", "AutoencoderKL"}),
    "controlnet": ("config.json", {"ControlNetModel"}),
    "scheduler": ("scheduler_config.json", None),  # any diffusers scheduler
    "text_encoder": ("config.json", None),  # transformers configs: checked for auto_map only
    "tokenizer": ("tokenizer_config.json", None),
    "text_encoder_2": ("config.json", None),  # SDXL family
    "tokenizer_2": ("tokenizer_config.json", None),
}


def _is_diffusers_scheduler(name: str) -> bool:
    import diffusers

    return name.endswith("Scheduler") and hasattr(diffusers, name)


def check_no_custom_code(root: Path, model: str) -> None:
    """Refuse a folder that would need code of its own: a component sdxs loads whose module is not
    diffusers/transformers (model_index.json), a class sdxs does not build, or an auto_map. Components
    sdxs never loads (e.g. a diffusers `safety_checker` listed under the module "stable_diffusion") are
    not looked at."""
    problems = []
    for key, value in (read_json(root / "model_index.json") or {}).items():
        if key not in _COMPONENT_CONFIGS:
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] not in (None, "diffusers", "transformers"):
            problems.append(f"model_index.json loads {key} from the module '{value[0]}'")
    for sub, (filename, classes) in _COMPONENT_CONFIGS.items():
        config = read_json(root / sub / filename)
        if config is None:
            continue
        if "auto_map" in config:
            problems.append(f"{sub}/{filename} has an auto_map (code to import)")
        name = config.get("_class_name")
        if sub == "scheduler" and name is not None and not _is_diffusers_scheduler(name):
            problems.append(f"{sub}/{filename} names the class {name}, which is not a diffusers scheduler")
        elif classes and name is not None and name not in classes:
            problems.append(f"{sub}/{filename} names the class {name}, where sdxs loads {' or '.join(sorted(classes))}")
    if problems:
        raise UnsupportedModelError(
            f"'{model}' is refused: {'; '.join(problems)}. sdxs never runs code shipped with a model (no "
            "trust_remote_code): it loads only the diffusers and transformers classes of a one-step pipeline "
            "(CLIPTextModel, UNet2DConditionModel, AutoencoderTiny/AutoencoderKL, ControlNetModel, a diffusers scheduler)."
        )


def ships_one_step_scheduler(scheduler_config: dict) -> bool:
    """The schedulers the one-step folders ship: DEIS (IDKiro/sdxs-512-dreamshaper, `make-tiny`, every
    train/ final folder) and Euler with trailing spacing (IDKiro/sdxs-512-0.9)."""
    name = scheduler_config.get("_class_name")
    return name == "DEISMultistepScheduler" or (name == "EulerDiscreteScheduler" and scheduler_config.get("timestep_spacing") == "trailing")


def check_one_step(root: Path, model: str) -> None:
    """Refuse a multi-step pipeline (e.g. models/emoji-teacher): one step at t=999 of a model
    trained to be sampled in many steps with guidance silently gives a blurry blob.

    A folder is a one-step model when its U-Net is the SDXS one, without a mid block (both releases,
    train/ stage B and C students), or when it pairs a tiny decoder in vae/ with the one-step
    scheduler (train/ stage A on a teacher's U-Net: blurry by design, as train/README.md says).
    A U-Net with a mid block and a multi-step sampler is a multi-step pipeline."""
    unet = read_json(root / "unet" / "config.json") or {}
    if "mid_block_type" in unet and unet["mid_block_type"] is None:
        return
    scheduler = read_json(root / "scheduler" / "scheduler_config.json") or {}
    vae = read_json(root / "vae" / "config.json") or {}
    if ships_one_step_scheduler(scheduler) and vae.get("_class_name") == "AutoencoderTiny":
        return
    raise UnsupportedModelError(
        f"'{model}' is a multi-step diffusion pipeline, not a one-step SDXS model: its U-Net has a mid block "
        f"(SDXS removes it) and its scheduler is {scheduler.get('_class_name', 'unknown')}, a many-step sampler. "
        f"A model like it (e.g. a teacher for training) is sampled in about 25 steps with classifier-free guidance; "
        f"one step at t=999 gives a blurry blob. Sample it with diffusers' "
        f"{'StableDiffusionXLPipeline' if is_sdxl_unet(unet) else 'StableDiffusionPipeline'} "
        f"(num_inference_steps=25, guidance_scale above 1), or distil a one-step model from it with train/ "
        f"(stages A-C). For one-step images use an SDXS model: {DEFAULT_MODEL}, a train/ OUTPUT_DIR/final "
        f"folder, or `python -m sdxs make-tiny DIR` for a tiny test model."
    )


# --- weights: safe formats, and a clear word when a file is broken ------------------------------------

def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (its header describes every tensor's byte range, so
    a cut-off file is caught without reading the data), or None when it looks whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, too short for a safetensors header"
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            return f"{size:,} bytes, but its header alone would need {header_size + 8:,}"
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    expected = 8 + header_size + end
    if size != expected:
        return f"{size:,} bytes, but its header describes {expected:,}"
    return None


def refused_pickle_message(path: Path, err: BaseException) -> str:
    reason = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), _first_line(err))
    return (
        f"Refusing to load {path}: it is not a plain tensor file. torch.load(weights_only=True) refused it "
        f"({reason}): besides tensors it holds other objects or code, and a pickle can run arbitrary code when "
        f"it is loaded, so sdxs loads pickles only with weights_only=True. Get a safetensors copy of these "
        f"weights from a source you trust."
    )


def weights_problem(folder: Path) -> str | None:
    """What is wrong with the weight files of `folder`, when loading it failed: a truncated or corrupt
    safetensors file, or a pickle that is more than tensors. None when the files look fine."""
    safetensors_files = sorted(folder.glob("*.safetensors"))
    for path in safetensors_files:
        problem = safetensors_problem(path)
        if problem:
            return (
                f"{path} is truncated or corrupt ({problem}). An interrupted download or copy leaves such "
                f"files: delete it and download (or copy) it again."
            )
    if safetensors_files:
        return None
    import pickle

    for path in sorted(folder.glob("*.bin")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            return refused_pickle_message(path, err)
        except Exception as err:  # a cut-off zip or pickle
            return f"{path} is truncated or corrupt ({_first_line(err)}): delete it and download (or copy) it again."
    return None


def load_part(folder: Path, load):
    """`load()`, with any failure turned into one message about the files of `folder`."""
    try:
        return load()
    except (ModelNotFoundError, UnsupportedModelError):
        raise
    except Exception as err:  # library errors on a user's files (OSError, SafetensorError, ...): say what to do
        problem = weights_problem(folder) if folder.is_dir() else None
        raise ModelNotFoundError(problem or f"Could not load {folder}: {type(err).__name__}: {_first_line(err)}") from None


def load_decoder(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """AutoencoderTiny or AutoencoderKL, whichever the folder's config names."""
    import diffusers

    class_name = (read_json(folder / "config.json") or {}).get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise UnsupportedModelError(f"{folder} holds a {class_name}; expected AutoencoderTiny or AutoencoderKL.")
    return getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=dtype)


def decoder_dtype(vae_config: dict, dtype: torch.dtype, sdxl: bool) -> torch.dtype:
    """The dtype a decoder runs in: the model's, except SDXL's AutoencoderKL in fp16, which overflows
    there (NaN, black images) and says so with force_upcast: fp32, as StableDiffusionXLPipeline
    upcasts it. SD pipelines never upcast (their VAE is fine in fp16), so neither does sdxs."""
    upcast = sdxl and dtype == torch.float16 and vae_config.get("_class_name") == "AutoencoderKL" and vae_config.get("force_upcast", True)
    return torch.float32 if upcast else dtype


_PIPELINE_WEIGHTS = ("unet", "text_encoder", "text_encoder_2", "vae", "vae_large")


def load_components(model: str | os.PathLike, device: torch.device, dtype: torch.dtype, *, base: str | None = None) -> Components:
    """Load a one-step text-to-image model (hub id or folder); for a PEFT LoRA adapter (a folder
    with adapter_config.json), load its base model (`base`, the registry's, or the adapter's own
    base_model_name_or_path) and merge the LoRA into the U-Net once. Refuses (UnsupportedModelError)
    a multi-step pipeline and a folder that needs custom code."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec = MODELS.get(str(model))
    is_adapter_repo = spec is not None and spec.kind in ("lora", "controlnet")
    local = Path(model).expanduser().is_dir() or str(model) in BUILTIN  # a folder on this disk
    root = resolve_model_dir(model, subfolders_with_weights=("",) if is_adapter_repo else _PIPELINE_WEIGHTS)
    if (root / "adapter_config.json").is_file():
        base = base or (spec.base if spec else None) or (read_json(root / "adapter_config.json") or {}).get("base_model_name_or_path")
        if not base:
            raise ModelNotFoundError(f"LoRA '{model}' names no base model; pass the base pipeline with --base.")
        components = _load_base(base, model, device, dtype)
        components.unet = load_part(root, lambda: merge_lora(components.unet, root))
        components.source, components.folders = str(model), (*components.folders, str(root))
        return components
    if _class_name(root) == "ControlNetModel":  # a bare ControlNet repo: attach it to its base pipeline
        components = _load_base(base or (spec.base if spec else None) or DEFAULT_MODEL, model, device, dtype)
        components.controlnet = load_part(root, lambda: load_controlnet(root, dtype)).to(device)
        components.source, components.folders = str(model), (*components.folders, str(root))
        return components

    _check_folder(root, str(model), local)
    check_no_custom_code(root, str(model))
    check_one_step(root, str(model))
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    if scheduler_config is None:
        raise ModelNotFoundError(f"'{model}' ({root}): scheduler/ has no scheduler_config.json. {COMPLETE_FOLDER}")
    tokenizer = load_part(root / "tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
    text_encoder = load_part(root / "text_encoder", lambda: CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype))
    unet = load_part(root / "unet", lambda: UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype))
    decoders = {}
    sdxl = is_sdxl_unet(unet.config)
    for sub in ("vae", "vae_large"):
        if (root / sub).is_dir():
            vae_dtype = decoder_dtype(read_json(root / sub / "config.json") or {}, dtype, sdxl)
            vae = load_part(root / sub, lambda: load_decoder(root / sub, vae_dtype))
            decoders["tiny" if type(vae).__name__ == "AutoencoderTiny" else "large"] = vae
    controlnet = load_part(root / "controlnet", lambda: load_controlnet(root / "controlnet", dtype)) if (root / "controlnet").is_dir() else None
    tokenizer_2 = text_encoder_2 = None
    if sdxl:  # SDXL family: the second text encoder gives the pooled embedding too
        tokenizer_2 = load_part(root / "tokenizer_2", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer_2"))
        text_encoder_2 = load_part(root / "text_encoder_2",
                                   lambda: CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", torch_dtype=dtype))
    for module in [text_encoder, text_encoder_2, unet, *decoders.values(), controlnet]:
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return Components(tokenizer, text_encoder, unet, scheduler_config, decoders, source=str(model), controlnet=controlnet,
                      folders=(str(root),), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def _load_base(base: str, model: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> Components:
    """The base pipeline of a LoRA or ControlNet; a failure names both."""
    try:
        return load_components(base, device, dtype)
    except (ModelNotFoundError, UnsupportedModelError) as err:
        raise type(err)(f"'{model}' runs on the base pipeline '{base}', which could not be loaded: {err}") from None


def _class_name(folder: Path) -> str | None:
    return (read_json(folder / "config.json") or {}).get("_class_name")


def load_state_dict_safely(folder: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, else from a pickle .bin read with weights_only=True: tensors only,
    never code (the released sketch ControlNet exists only as a .bin)."""
    import pickle

    from safetensors.torch import load_file

    safetensors_files = sorted(folder.glob("*.safetensors"))
    if safetensors_files:
        return load_file(safetensors_files[0])
    bins = sorted(folder.glob("*.bin"))
    if not bins:
        raise OSError(f"No weights (*.safetensors or *.bin) in {folder}.")
    try:
        return torch.load(bins[0], map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # anything that is not plain tensors
        raise ModelNotFoundError(refused_pickle_message(bins[0], err)) from None


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
