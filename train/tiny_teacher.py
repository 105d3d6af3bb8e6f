#!/usr/bin/env python
"""A tiny random SD-style TEACHER pipeline, for smoke runs and tests of the training stages.

    python train/tiny_teacher.py outputs/tiny-teacher
    python train/tiny_teacher.py outputs/tiny-sdxl-teacher --family sdxl

It has the structure of SD-1.5 (the family of DreamShaper, the teacher of SDXS-512-DreamShaper), only
narrow: four stages (three CrossAttnDownBlock2D + a final DownBlock2D), a mid block, two resnets per
down stage, attention at the highest-resolution stage, an AutoencoderKL in vae/, a CLIP text encoder
and the real CLIP tokenizer; random weights, so it "generates" noise-like images. The folder is in
diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), the same
layout as a hub teacher, so the training scripts read both with the same code.

`--family sdxl` writes a tiny SDXL-base-shaped teacher instead (SDXS-1024's path): three stages, no
transformers at the highest resolution, two resnets per stage, transformer depths (1, 2, 4), a mid block,
the text_time micro-conditioning, two text encoders of different widths (CLIPTextModel and
CLIPTextModelWithProjection) with tokenizer_2/, SDXL's latent scale and Euler scheduler, in
StableDiffusionXLPipeline's layout.

The reference U-Net configs of the public teachers live here too (SD15_UNET, SD21_BASE_UNET): they are
what `unet/config.json` of those repos holds, written out so tests can derive students from them
without a download.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxs import architectures as arch
from sdxs.build import TINY_SDXL_TEXT, TINY_SDXL_TEXT_2

# --- reference teacher U-Nets (diffusers UNet2DConditionModel kwargs) --------------------------------

# SD-1.5 (stable-diffusion-v1-5, DreamShaper-8 and the rest of the SD-1.x family): 859.5 M parameters.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# SD-2.1-base (the teacher of SDXS-512-0.9): OpenCLIP-H text states, linear projections, per-stage heads.
SD21_BASE_UNET = dict(
    SD15_UNET,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)

# --- the tiny teacher --------------------------------------------------------------------------------

TINY_TEACHER_UNET = dict(
    SD15_UNET,
    sample_size=8,  # 64 px images
    block_out_channels=(16, 32, 32, 32),
    cross_attention_dim=arch.TINY_TEXT["hidden_size"],
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_TEACHER_VAE = dict(arch.TINY_SD_VAE, sample_size=64)
# SD-1.5's own scheduler (PNDM); the training scripts sample with DPM-Solver++ built from its betas.
SD_SCHEDULER = ("PNDMScheduler", dict(arch._SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False))

# The tiny SDXL-shaped teacher: SDXL base's structure (arch.SDXL_UNET) at toy widths; its text encoders
# are those of make-tiny --family sdxl (32 + 48 states, a pooled embedding of 40).
TINY_SDXL_TEACHER_UNET = dict(
    arch.SDXL_UNET,
    sample_size=8,  # 64 px images
    block_out_channels=(16, 32, 32),
    transformer_layers_per_block=(1, 2, 4),  # stage B keeps the first half: (1, 1, 2)
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=TINY_SDXL_TEXT["hidden_size"] + TINY_SDXL_TEXT_2["hidden_size"],
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 6 * 8,
    norm_num_groups=8,
)
TINY_SDXL_TEACHER_VAE = dict(arch.TINY_SD_VAE, sample_size=64, scaling_factor=arch.SDXL_VAE["scaling_factor"], force_upcast=True)
FAMILIES = ("sd", "sdxl")


def make_tiny_teacher(dest: str | Path, *, seed: int = 0, family: str = "sd", image_size: int = 64, vae_factor: int = 8) -> Path:
    """Write the tiny random teacher of `family` ("sd" or "sdxl") to `dest` (a new folder; written whole or not at all),
    for images of `image_size` pixels (a multiple of 64; its VAE makes image_size / vae_factor latents: f=8 as SD's,
    or f=4 (family sd) as the emoji teacher v1's, one VAE stage fewer)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxs.build import save_pipeline_folder
    from sdxs.tokenizer import cached_clip_tokenizer_dir

    if family not in FAMILIES:
        raise ValueError(f"Unknown teacher family '{family}'; choose one of {', '.join(FAMILIES)}.")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder.")
    if image_size % 64:
        raise ValueError(f"image_size must be a multiple of 64; got {image_size}.")
    if vae_factor not in ((8,) if family == "sdxl" else (4, 8)):
        raise ValueError(f"vae_factor must be 8{' or 4' if family == 'sd' else ''} for family {family}; got {vae_factor}.")
    stages = vae_factor.bit_length()  # f = 2^(stages - 1)
    vae_config = {**(TINY_SDXL_TEACHER_VAE if family == "sdxl" else TINY_TEACHER_VAE), "sample_size": image_size}
    vae_config.update({key: tuple(vae_config[key][:stages]) for key in ("block_out_channels", "down_block_types", "up_block_types")})
    torch.manual_seed(seed)
    sdxl = family == "sdxl"
    scheduler_class, scheduler_config = arch.SDXL_EULER_SCHEDULER if sdxl else SD_SCHEDULER
    components = {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**(TINY_SDXL_TEXT if sdxl else arch.TINY_TEXT))).eval(),
        "unet": diffusers.UNet2DConditionModel(**{**(TINY_SDXL_TEACHER_UNET if sdxl else TINY_TEACHER_UNET),
                                                   "sample_size": image_size // vae_factor}).eval(),
        "vae": diffusers.AutoencoderKL(**vae_config).eval(),
        "scheduler": getattr(diffusers, scheduler_class).from_config(scheduler_config),
    }
    if sdxl:
        components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2)).eval()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        save_pipeline_folder(components, cached_clip_tokenizer_dir(), tmp / "teacher")
        (tmp / "teacher" / "README.md").write_text(
            "# Tiny random SDXL-shaped teacher\n\nRandom weights, SDXL base structure (mid block, three stages, transformer depths "
            "(1, 2, 4), two text encoders, AutoencoderKL vae/). Made by `python train/tiny_teacher.py --family sdxl`, for smoke runs and tests.\n"
            if sdxl else
            "# Tiny random SD-style teacher\n\nRandom weights, SD-1.5 structure (mid block, four stages, "
            "AutoencoderKL vae/). Made by `python train/tiny_teacher.py`, for smoke runs and tests.\n"
        )
        if dest.exists():
            dest.rmdir()
        (tmp / "teacher").replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_tiny_teacher(dest: str | Path, *, family: str = "sd") -> Path:
    """The tiny teacher of `family` at `dest`, built there first if it is not there yet."""
    dest = Path(dest)
    if (dest / "model_index.json").is_file():
        return dest
    return make_tiny_teacher(dest, family=family)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", help="new folder to write the tiny teacher pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="sd: SD-1.5-shaped (default); sdxl: SDXL-base-shaped")
    args = parser.parse_args(argv)
    path = make_tiny_teacher(args.dest, seed=args.seed, family=args.family)
    print(f"Tiny random teacher written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
