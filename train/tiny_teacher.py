#!/usr/bin/env python
"""A tiny random SD-style TEACHER pipeline, for smoke runs and tests of the training stages.

    python train/tiny_teacher.py outputs/tiny-teacher

It has the structure of SD-1.5 (the family of DreamShaper, the teacher of SDXS-512-DreamShaper), only
narrow: four stages (three CrossAttnDownBlock2D + a final DownBlock2D), a mid block, two resnets per
down stage, attention at the highest-resolution stage, an AutoencoderKL in vae/, a CLIP text encoder
and the real CLIP tokenizer; random weights, so it "generates" noise-like images. The folder is in
diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), the same
layout as a hub teacher, so the training scripts read both with the same code.

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


def make_tiny_teacher(dest: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny random teacher to `dest` (a new folder; written whole or not at all)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdxs.build import save_pipeline_folder
    from sdxs.tokenizer import cached_clip_tokenizer_dir

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder.")
    torch.manual_seed(seed)
    scheduler_class, scheduler_config = SD_SCHEDULER
    components = {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.TINY_TEXT)).eval(),
        "unet": diffusers.UNet2DConditionModel(**TINY_TEACHER_UNET).eval(),
        "vae": diffusers.AutoencoderKL(**TINY_TEACHER_VAE).eval(),
        "scheduler": getattr(diffusers, scheduler_class).from_config(scheduler_config),
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        save_pipeline_folder(components, cached_clip_tokenizer_dir(), tmp / "teacher")
        (tmp / "teacher" / "README.md").write_text(
            "# Tiny random SD-style teacher\n\nRandom weights, SD-1.5 structure (mid block, four stages, "
            "AutoencoderKL vae/). Made by `python train/tiny_teacher.py`, for smoke runs and tests.\n"
        )
        if dest.exists():
            dest.rmdir()
        (tmp / "teacher").replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_tiny_teacher(dest: str | Path) -> Path:
    """The tiny teacher at `dest`, built there first if it is not there yet."""
    dest = Path(dest)
    if (dest / "model_index.json").is_file():
        return dest
    return make_tiny_teacher(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", help="new folder to write the tiny teacher pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    args = parser.parse_args(argv)
    path = make_tiny_teacher(args.dest, seed=args.seed)
    print(f"Tiny random teacher written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
