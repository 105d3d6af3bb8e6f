"""The released SDXS checkpoints and what their one-step call needs; the SDXL family by architecture only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sdxs import architectures as arch

DEFAULT_MODEL = "IDKiro/sdxs-512-dreamshaper"
SKETCH_MODEL = "IDKiro/sdxs-512-dreamshaper-sketch"
ANIME_LORA = "IDKiro/sdxs-512-dreamshaper-anime"


@dataclass(frozen=True)
class Architecture:
    """Constructor kwargs of every component of a text-to-image model (one-step unless its spec says
    otherwise)."""

    text_encoder: dict
    unet: dict
    scheduler: tuple[str, dict]
    vae: dict | None  # tiny decoder (AutoencoderTiny), vae/; None for a teacher that has none
    vae_large: dict  # the AutoencoderKL: vae_large/ of the SDXS releases, vae/ of SD and SDXL base models
    controlnet: dict | None = None
    text_encoder_2: dict | None = None  # SDXL family: OpenCLIP-bigG with projection (CLIPTextModelWithProjection)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    title: str
    kind: str  # "pipeline": a full diffusers folder; "lora": PEFT adapter; "controlnet": a ControlNet;
    # "teacher": a multi-step base model (REFERENCE_MODELS only)
    description: str
    architecture: Architecture
    base: str | None = None  # the pipeline a LoRA or ControlNet attaches to
    tags: tuple[str, ...] = field(default_factory=tuple)


_DREAMSHAPER = Architecture(
    text_encoder=arch.CLIP_L_TEXT,
    unet=arch.DREAMSHAPER_UNET,
    scheduler=arch.DEIS_SCHEDULER,
    vae=arch.TAESD,
    vae_large=arch.SD_VAE,
)

MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in [
        ModelSpec(
            id="IDKiro/sdxs-512-dreamshaper",
            title="SDXS-512-DreamShaper",
            kind="pipeline",
            description="One-step 512x512 text-to-image, distilled from DreamShaper (SD-1.5 family).",
            architecture=_DREAMSHAPER,
        ),
        ModelSpec(
            id="IDKiro/sdxs-512-0.9",
            title="SDXS-512-0.9",
            kind="pipeline",
            description="The older release, distilled from SD-2.1-base (OpenCLIP-H text encoder).",
            architecture=Architecture(
                text_encoder=arch.OPENCLIP_H_TEXT,
                unet=arch.SDXS_09_UNET,
                scheduler=arch.EULER_TRAILING_SCHEDULER,
                vae=arch.TAESD,
                vae_large=arch.SD_VAE,
            ),
        ),
        ModelSpec(
            id="IDKiro/sdxs-512-dreamshaper-anime",
            title="SDXS-512-DreamShaper Anime",
            kind="lora",
            description="Anime style: a PEFT LoRA merged once into the DreamShaper U-Net.",
            architecture=_DREAMSHAPER,
            base="IDKiro/sdxs-512-dreamshaper",
        ),
        ModelSpec(
            id="IDKiro/sdxs-512-dreamshaper-sketch",
            title="SDXS-512-DreamShaper Sketch",
            kind="controlnet",
            description="Sketch-to-image ControlNet for the DreamShaper U-Net (7 residuals, no mid block).",
            architecture=Architecture(
                text_encoder=arch.CLIP_L_TEXT,
                unet=arch.DREAMSHAPER_UNET,
                scheduler=arch.DEIS_SCHEDULER,
                vae=arch.TAESD,
                vae_large=arch.SD_VAE,
                controlnet=arch.DREAMSHAPER_SKETCH_CONTROLNET,
            ),
            base="IDKiro/sdxs-512-dreamshaper",
        ),
    ]
}

# --- known by their exact architecture only ---------------------------------------------------------
# `sdxs arch` counts them and tests build them with random weights, but they are no one-step models this
# package loads: the engine, the apps and the training scripts' lists use MODELS, not these. The bench
# builds sdxs-1024 with random weights (`python -m sdxs.bench --model sdxs-1024`) and counts SDXL base's FLOPs.

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXS_1024 = "sdxs-1024"

REFERENCE_MODELS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in [
        ModelSpec(
            id=SDXL_BASE,
            title="SDXL base 1.0",
            kind="teacher",
            description="SDXS-1024's teacher: a multi-step 1024x1024 model (25-50 steps with guidance), two text "
                        "encoders (CLIP ViT-L, OpenCLIP ViT-bigG), no tiny decoder.",
            architecture=Architecture(
                text_encoder=arch.CLIP_L_TEXT,
                text_encoder_2=arch.OPENCLIP_BIGG_TEXT,
                unet=arch.SDXL_UNET,
                scheduler=arch.SDXL_EULER_SCHEDULER,
                vae=None,
                vae_large=arch.SDXL_VAE,
            ),
            tags=("sdxl",),
        ),
        ModelSpec(
            id=SDXS_1024,
            title="SDXS-1024",
            kind="pipeline",
            description=f"The paper's one-step 1024x1024 model, distilled from {SDXL_BASE}: its weights and code were never "
                        "released (upstream issue 2), so this is the architecture only: SDXL's text encoders, "
                        "SDXL with blocks removed as the U-Net (our removal, 0.75 B; the paper: 0.74 B), a "
                        "TAESD-shaped tiny decoder for SDXL's latents, SDXL's VAE as the large decoder.",
            architecture=Architecture(
                text_encoder=arch.CLIP_L_TEXT,
                text_encoder_2=arch.OPENCLIP_BIGG_TEXT,
                unet=arch.SDXS_1024_UNET,
                scheduler=arch.EULER_TRAILING_SCHEDULER,  # ours (unreleased): one Euler step lands on t=999
                vae=arch.TAESDXL,
                vae_large=arch.SDXL_VAE,
            ),
            tags=("sdxl", "unreleased"),
        ),
    ]
}

TINY = Architecture(
    text_encoder=arch.TINY_TEXT,
    unet=arch.TINY_UNET,
    scheduler=arch.DEIS_SCHEDULER,
    vae=arch.TINY_TAESD,
    vae_large=arch.TINY_SD_VAE,
    controlnet=arch.TINY_CONTROLNET,
)


# --- the built-in model: shipped in this repository, run when the hub is out of reach ------------------


@dataclass(frozen=True)
class BuiltinModel:
    """A one-step model folder in this repository's models/, picked by a short name (--model mini).

    A short prompt becomes the caption form the model was trained on: the training caption of that
    name when the folder's `captions_file` has one (name or short name -> caption), else
    `prompt_template`. `native_size` is what the folder's configs give (checked by a test), stated
    here so the registry can say what the model makes without loading it."""

    name: str
    title: str
    folder: Path
    native_size: int
    prompt_template: str  # "{prompt}" is replaced by the user's prompt
    description: str
    examples: tuple[str, ...] = ()
    captions_file: str | None = None  # JSON {name: caption} in `folder`

    def captions(self) -> dict[str, str]:
        """The folder's caption table ({} when it has none)."""
        return _read_captions(self.folder / self.captions_file) if self.captions_file else {}

    @property
    def prompt_prefix(self) -> str:
        """What every expanded prompt starts with ("an emoji of")."""
        return self.prompt_template.split("{prompt}")[0].strip()

    def expand_prompt(self, prompt: str) -> str:
        """The prompt the model reads: "Red apple" -> its training caption "an emoji of red apple, apple,
        category food & drink, subcategory food-fruit, noto style" when the caption table knows the
        name, else the template's "an emoji of red apple, noto style" (lower case, single spaces, as
        the training captions). A prompt already in the caption form (starting with the template's
        prefix, any case) and an empty prompt are kept as written."""
        if not prompt.strip() or prompt.strip().lower().startswith(self.prompt_prefix.lower()):
            return prompt
        name = " ".join(prompt.lower().split())
        return self.captions().get(name) or self.prompt_template.format(prompt=name)


MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # the repository's models/, as train/common.py's EMOJI_TEACHER
BUILTIN_MODEL = "mini"
BUILTIN: dict[str, BuiltinModel] = {
    BUILTIN_MODEL: BuiltinModel(
        name=BUILTIN_MODEL,
        title="Mini SDXS (128 px emoji)",
        folder=MODELS_DIR / "mini-sdxs",
        native_size=128,
        # The emoji captions (train/emoji_data.py build_caption) read "an emoji of <name>, <short names>,
        # category ..., subcategory ..., <style> style" (v2's styles: noto, twemoji, fluent color, ...): a short
        # prompt gets the two parts every caption has, the opening and one style (noto, Google's Noto Emoji).
        prompt_template="an emoji of {prompt}, noto style",
        # the noto-style training captions by emoji name, short name and CLDR name (reproduce_mini.py --export):
        # the model draws "grinning face" far better from its full caption (category, subcategory)
        captions_file="captions.json",
        description="One-step 128x128 emoji, distilled from models/emoji-teacher (v2) by train/ stages A-D; runs on any CPU.",
        examples=("grinning face", "red apple", "smiling face with sunglasses", "slice of pizza", "rocket", "ghost"),
    ),
}


@lru_cache(maxsize=4)
def _read_captions(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no table (or a broken one): the template still gives a caption-shaped prompt
    return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model a short name (or an engine's name) stands for, else None."""
    return BUILTIN.get(str(name))


def get_spec(model_id: str) -> ModelSpec:
    """The spec of a released model (MODELS) or of an architecture-only one (REFERENCE_MODELS)."""
    spec = MODELS.get(model_id) or REFERENCE_MODELS.get(model_id)
    if spec is None:
        known = ", ".join([*MODELS, *REFERENCE_MODELS])
        raise ValueError(f"Unknown model '{model_id}'. Known models: {known}.")
    return spec
