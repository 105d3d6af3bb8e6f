"""Build architectures with random weights, no download: for tests, benchmarks and `make-tiny`."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from sdxs import architectures as arch
from sdxs.registry import TINY, Architecture, get_spec

FAMILIES = ("sd", "sdxl")

# A tiny SDXS-1024-shaped model (make-tiny --family sdxl): the student U-Net's structure (no mid block,
# one resnet per down stage, text_time micro-conditioning) at toy widths, two text encoders of
# different widths (as CLIP-L 768 and OpenCLIP-bigG 1280 differ: a swapped order changes every
# value), a projection width of its own, the one-step Euler (trailing) scheduler, a TAESDXL-shaped
# vae/ and an AutoencoderKL vae_large/ with SDXL's latent scale. 16x16 latents: 128x128 images.
TINY_SDXL_TEXT = dict(arch.TINY_TEXT, hidden_size=32, num_hidden_layers=3)
TINY_SDXL_TEXT_2 = dict(arch.OPENCLIP_BIGG_TEXT, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, projection_dim=40)
_TINY_TIME_EMBED_DIM = 8
TINY_SDXL = Architecture(
    text_encoder=TINY_SDXL_TEXT,
    text_encoder_2=TINY_SDXL_TEXT_2,
    unet=dict(
        arch.SDXS_1024_UNET,
        sample_size=16,
        block_out_channels=(16, 32, 32),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=TINY_SDXL_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
        addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
        # the pooled embedding and six size/crop numbers, each embedded in addition_time_embed_dim
        projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * _TINY_TIME_EMBED_DIM,
        norm_num_groups=8,
    ),
    scheduler=arch.EULER_TRAILING_SCHEDULER,
    vae=arch.TINY_TAESD,  # TAESDXL has TAESD's shape and config
    vae_large=dict(arch.TINY_SD_VAE, scaling_factor=arch.SDXL_VAE["scaling_factor"], force_upcast=True, sample_size=128),
)


def build_components(architecture: Architecture, *, seed: int = 0, empty: bool = False) -> dict:
    """Instantiate every component of `architecture` with seeded random weights.

    `empty=True` builds on the meta device (no memory, no init): enough to count parameters.
    """
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    scheduler_class, scheduler_config = architecture.scheduler
    with init_empty_weights() if empty else contextlib.nullcontext():
        components = {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**architecture.text_encoder)),
            "unet": diffusers.UNet2DConditionModel(**architecture.unet),
        }
        if architecture.vae is not None:  # a teacher may have no tiny decoder
            components["vae"] = diffusers.AutoencoderTiny(**architecture.vae)
        components["vae_large"] = diffusers.AutoencoderKL(**architecture.vae_large)
        if architecture.text_encoder_2 is not None:  # SDXL family
            components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoder_2))
        if architecture.controlnet is not None:
            components["controlnet"] = diffusers.ControlNetModel(**architecture.controlnet)
    components["scheduler"] = getattr(diffusers, scheduler_class).from_config(scheduler_config)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def count_parameters(model_id: str) -> dict[str, int]:
    """Parameter counts per component of a known model's exact architecture (built on the meta device).

    vae_decoder/vae_encoder: the tiny decoder (AutoencoderTiny) and its encoder; vae_large: the whole
    AutoencoderKL. one_step_total: what one image costs a one-step model: the text encoder(s), the
    U-Net, the tiny decoder (and the ControlNet). A multi-step teacher (no tiny decoder) gets
    `total`, every network of its pipeline, instead."""
    spec = get_spec(model_id)
    components = build_components(spec.architecture, empty=True)

    def n(module):
        return sum(p.numel() for p in module.parameters())

    counts = {"text_encoder": n(components["text_encoder"])}
    if "text_encoder_2" in components:
        counts["text_encoder_2"] = n(components["text_encoder_2"])
    counts["unet"] = n(components["unet"])
    if "vae" in components:
        counts["vae_decoder"] = n(components["vae"].decoder)
        counts["vae_encoder"] = n(components["vae"].encoder)
    counts["vae_large"] = n(components["vae_large"])
    if spec.kind == "controlnet":
        counts["controlnet"] = n(components["controlnet"])
    text_encoders = counts["text_encoder"] + counts.get("text_encoder_2", 0)
    if spec.kind == "teacher":
        counts["total"] = text_encoders + counts["unet"] + counts["vae_large"]
    else:
        counts["one_step_total"] = text_encoders + counts["unet"] + counts["vae_decoder"] + counts.get("controlnet", 0)
    return counts


def save_pipeline_folder(components: dict, tokenizer_dir: str | Path, dest: str | Path, *, tokenizer_2_dir: str | Path | None = None) -> Path:
    """Save components in the folder layout of the released checkpoints: model_index.json,
    scheduler/, text_encoder/, tokenizer/, unet/, vae/ (tiny), vae_large/, and controlnet/ when
    there is one. model_index.json is what StableDiffusionPipeline.from_pretrained reads (with a
    text_encoder_2: StableDiffusionXLPipeline, which also reads text_encoder_2/ and tokenizer_2/:
    a copy of `tokenizer_2_dir`, or made from tokenizer_dir by write_sdxl_tokenizer_2)."""
    import diffusers

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if "text_encoder_2" in components:
        index = _sdxl_model_index(components)
    else:
        index = _sd_model_index(components)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in ["scheduler", "unet", "vae", "vae_large", "controlnet"]:
        if name in components:
            components[name].save_pretrained(dest / name)
    save_text_encoder(components["text_encoder"], dest / "text_encoder")
    shutil.copytree(tokenizer_dir, dest / "tokenizer")
    if "text_encoder_2" in components:
        save_text_encoder(components["text_encoder_2"], dest / "text_encoder_2")
        if tokenizer_2_dir is not None:
            shutil.copytree(tokenizer_2_dir, dest / "tokenizer_2")
        else:
            write_sdxl_tokenizer_2(tokenizer_dir, dest / "tokenizer_2")
    return dest


def _sd_model_index(components: dict) -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(components["scheduler"]).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(components["vae"]).__name__],
    }


def _sdxl_model_index(components: dict) -> dict:
    """model_index.json as StableDiffusionXLPipeline.save_pretrained writes it."""
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", type(components["scheduler"]).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(components["vae"]).__name__],
    }


def write_sdxl_tokenizer_2(tokenizer_dir: str | Path, dest: str | Path) -> Path:
    """SDXL's tokenizer_2/: the same CLIP BPE vocabulary as tokenizer/, but it pads with "!" (id 0),
    as OpenCLIP does, where tokenizer/ pads with <|endoftext|>. The pooled embedding is read at the
    end-of-text token, so the padding token matters."""
    dest = Path(shutil.copytree(tokenizer_dir, dest))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((dest / name).read_text(encoding="utf-8"))
        config["pad_token"] = "!"
        (dest / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dest


def save_text_encoder(text_encoder, dest: str | Path) -> Path:
    """`CLIPTextModel.save_pretrained`, with the weight names of the released checkpoints
    ("text_model.encoder...."). transformers 5.23 writes them without the "text_model." prefix, which
    it reads back, but older transformers (and tools pinned to them, like optimum-intel) silently
    load such a file as a randomly initialised text encoder."""
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_encoder.state_dict().items()}
    text_encoder.save_pretrained(dest, state_dict=state)
    return Path(dest)


def make_tiny(dest: str | Path, *, seed: int = 0, controlnet: bool = True, family: str = "sd") -> Path:
    """Write a tiny random model (a few MB) in the exact layout of the released checkpoints,
    with the real CLIP tokenizer. family "sd": the structure of SDXS-512-DreamShaper (no mid block,
    three stages, one resnet per stage, DEIS scheduler, TAESD-shaped vae/, an AutoencoderKL
    vae_large/, a sketch ControlNet unless `controlnet=False`). family "sdxl": an SDXS-1024-shaped
    model (TINY_SDXL) in StableDiffusionXLPipeline's layout, 128x128 images, no ControlNet."""
    from sdxs.tokenizer import cached_clip_tokenizer_dir

    if family not in FAMILIES:
        raise ValueError(f"Unknown model family '{family}'; choose one of {', '.join(FAMILIES)}.")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder.")
    if family == "sdxl":
        architecture = TINY_SDXL
    else:
        architecture = TINY if controlnet else Architecture(**{**TINY.__dict__, "controlnet": None})
    components = build_components(architecture, seed=seed)
    if "controlnet" in components:
        _randomise_zero_convs(components["controlnet"])
    if family == "sdxl":
        _strengthen_added_conditioning(components["unet"])
    save_pipeline_folder(components, cached_clip_tokenizer_dir(), dest)
    (dest / "README.md").write_text(
        "# Tiny random SDXS-layout model\n\nRandom weights, for tests, demos and bug reports: "
        f"made by `python -m sdxs make-tiny{' --family sdxl' if family == 'sdxl' else ''}`. It generates noise-like images.\n"
    )
    return dest


def _strengthen_added_conditioning(unet: torch.nn.Module, factor: float = 4.0) -> None:
    """At default init the tiny U-Net's text_time input (pooled embedding + six size numbers) moves its
    pixels by only a few levels, so a wrong size or pooled embedding would hide within 1/255 of a
    right one; scale its first layer so that tests can see each condition act (~13 levels per size number)."""
    with torch.no_grad():
        unet.add_embedding.linear_1.weight.mul_(factor)


def _randomise_zero_convs(controlnet: torch.nn.Module, std: float = 0.05) -> None:
    """A fresh ControlNet's sketch-embedding and output convolutions are zero-initialised, so it would
    change nothing; give the tiny one small random weights so tests and demos can see the sketch act."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        zero_convs = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
