"""The released SDXS checkpoints and what their one-step call needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdxs import architectures as arch

DEFAULT_MODEL = "IDKiro/sdxs-512-dreamshaper"
SKETCH_MODEL = "IDKiro/sdxs-512-dreamshaper-sketch"
ANIME_LORA = "IDKiro/sdxs-512-dreamshaper-anime"


@dataclass(frozen=True)
class Architecture:
    """Constructor kwargs of every component of a one-step text-to-image model."""

    text_encoder: dict
    unet: dict
    scheduler: tuple[str, dict]
    vae: dict  # tiny decoder (AutoencoderTiny), vae/
    vae_large: dict  # SD AutoencoderKL, vae_large/
    controlnet: dict | None = None


@dataclass(frozen=True)
class ModelSpec:
    id: str
    title: str
    kind: str  # "pipeline": a full diffusers folder; "lora": PEFT adapter; "controlnet": a ControlNet
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

TINY = Architecture(
    text_encoder=arch.TINY_TEXT,
    unet=arch.TINY_UNET,
    scheduler=arch.DEIS_SCHEDULER,
    vae=arch.TINY_TAESD,
    vae_large=arch.TINY_SD_VAE,
    controlnet=arch.TINY_CONTROLNET,
)


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        known = ", ".join(MODELS)
        raise ValueError(f"Unknown model '{model_id}'. Known models: {known}.") from None
