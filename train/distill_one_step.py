#!/usr/bin/env python
"""SDXS stage C (paper Sec. 3.2, Eqs. 10-12): turn a multi-step student into a one-step generator.

Tiny run on a CPU (seconds; builds a tiny random teacher in OUT/tiny-teacher and derives the student
from it with stage B's recipe):
    python train/distill_one_step.py --preset smoke --output_dir outputs/one-step-smoke
    python -m sdxs generate --model outputs/one-step-smoke/final --decoder large --prompt cat --width 64 --height 64
The same on a tiny SDXL-shaped teacher (SDXS-1024's path; SDXL conditioning: two text encoders, the
pooled embedding and the size ids of a RESOLUTION^2 image, common.PromptEncoder):
    python train/distill_one_step.py --preset smoke-sdxl --output_dir outputs/one-step-smoke-sdxl
Paper scale, 8 GPUs (see train/README.md):
    accelerate launch --multi_gpu --num_processes 8 train/distill_one_step.py --preset paper \\
        --teacher Lykon/dreamshaper-8 --student outputs/unet/final --prompts prompts.txt --output_dir outputs/one-step
Resume a killed run: the same command plus `--resume latest`.

What it does, per optimizer step of the student G (the one-step generator x0 = G(eps, c), one U-Net
call at t=999, exactly the update the `sdxs` engine runs):
1. Teacher trajectories: psi(eps) = a few-step ODE sampler of the teacher (--psi_scheduler,
   --sampler_steps, --guidance_scale; an LCM/Turbo-style straightened teacher via --psi_teacher) run
   from the SAME noise eps as the student. Pairs (eps, psi(eps)) are cached once (--pairs cache) or
   computed each step (--pairs online).
2. Feature-matching warm-up (Eq. 10): for --fm_warmup_steps steps the student's loss is L_FM alone:
   sum_l w_l * (1 - SSIM(f_l(G(eps)), f_l(psi(eps)))) over layers l of a frozen encoder f (--fm_encoder:
   the teacher U-Net's own down blocks on latents (default, no download), VGG-16 or DINOv2 on decoded
   images when their weights are given locally).
3. Segmented score distillation (Eqs. 11-12): an online ("fake score") U-Net, initialised from the
   offline (frozen teacher) U-Net, learns the student's output distribution with the standard denoising
   loss (--online_updates_per_step updates per student update: Diff-Instruct 1, DMD2 10). Each student
   sample draws a t; for t <= alpha*T it gets the gradient w(t) * (s_online(x_t) - s_offline(x_t)) through
   x_t (a surrogate loss) as G(z) of FRESH noise z (DMD2; the cached pairs serve FM), for t > alpha*T the
   gradient lambda_FM * dL_FM of its pair. alpha and lambda_FM decrease linearly from --alpha_start /
   --lambda_fm_start to --alpha_end / --lambda_fm_end.
Refused up front: a teacher whose scheduler does not predict epsilon. A NaN/inf loss or gradient norm of
either trained model stops the run before the update (common.FiniteGuard; --skip_nonfinite N skips N).
Not implemented: the paper's optional last phase (a short GAN finetune through a very-low-rank LoRA).
Output: OUTPUT_DIR/final, a pipeline folder in the released SDXS layout that `sdxs` runs in one step at
t=999 (the student's unet/; text encoder, tokenizer and decoders of the --student folder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from train import common

# Values: [paper] the SDXS paper; [DMD2] Yin et al. 2024, the public scheme the SDXS authors call
# identical to theirs; [Diff-Instruct] Luo et al. 2023; [ours] our choice (the paper gives none).
PRESETS = {
    "smoke": dict(
        **common.SMOKE_RUN, lr=1e-4, max_steps=20, checkpoint_every=5,
        psi_scheduler="dpmsolver++", pairs="cache", fm_encoder="unet", fm_layers="0,1,2", fm_weights="1,1,1",
        fm_timestep=10, fm_ssim_window=7, fm_warmup_steps=4,
        online_lr=1e-4, online_updates_per_step=1, real_guidance=1.75, t_range="0.02,0.98", sd_weighting="dmd2",
        alpha_start=0.9, alpha_end=0.5, lambda_fm_start=1.0, lambda_fm_end=0.25, schedule_steps=10,
    ),
    "mini": dict(  # the emoji teacher and stage B's student (train/reproduce_mini.py); [ours] unless marked
        **{**common.MINI_RUN, "sampler_steps": 10, "num_samples": 2048},  # 2,048 (noise, psi) pairs
        batch_size=32, lr=1e-4, ema_decay=0.999, max_steps=2000,
        checkpoint_every=100, sample_every=200,
        psi_scheduler="dpmsolver++",  # psi: 10 DPM-Solver++ steps of the teacher with its CFG 4 (no straightened teacher exists)
        pairs="cache", fm_encoder="unet", fm_layers="0,1,2", fm_weights="1,1,1", fm_timestep=10, fm_ssim_window=7,
        fm_warmup_steps=250, online_lr=1e-4, online_updates_per_step=1,  # Alg. 1: one online update per student update
        real_guidance=4.0, t_range="0.02,0.98", sd_weighting="dmd2",  # the teacher's own CFG scale
        alpha_start=0.95, alpha_end=0.75, lambda_fm_start=1.0, lambda_fm_end=0.25, schedule_steps=500,
    ),
    "paper": dict(
        resolution=512,  # [paper] SDXS-512
        num_samples=0,  # all prompts given
        sampler_steps=4, guidance_scale=1.0,  # [ours] psi: 4 steps of a straightened (LCM) teacher, which needs no CFG
        batch_size=32, grad_accum=4,  # [paper] global batch 1024 (of 1024-2048) = 32 x 4 x 8 GPUs
        lr=1e-5, lr_warmup_steps=500,  # [DMD2] generator lr 1e-5 (SD-1.5); [ours] warm-up
        mixed_precision="bf16", gradient_checkpointing=True, num_threads=0, ema_decay=0.999,  # [ours]
        max_steps=20_000, checkpoint_every=500, keep_checkpoints=3, log_every=10, sample_every=500,  # [ours]
        psi_scheduler="lcm",  # [paper] a trajectory-straightened teacher (pass an LCM-merged --psi_teacher)
        pairs="cache",  # [DMD2] a fixed set of noise/image pairs, generated once
        fm_encoder="unet", fm_layers="0,1,2", fm_weights="1,1,1",  # [paper] U-Net encoder "works"; [ours] layers, weights
        fm_timestep=10, fm_ssim_window=7,  # [ours]
        fm_warmup_steps=1000,  # [ours] "a short warmup"
        online_lr=1e-5,  # [DMD2] fake-score lr 1e-5
        online_updates_per_step=10,  # [DMD2] 10 fake-score updates per generator update ([Diff-Instruct] / Alg. 1: 1)
        real_guidance=1.75, t_range="0.02,0.98", sd_weighting="dmd2",  # [DMD2]
        alpha_start=0.95, alpha_end=0.75,  # [paper] start near 1, then lower; [ours] values
        lambda_fm_start=1.0, lambda_fm_end=0.25,  # [paper] start high, then lower; [ours] values (end = DMD's lambda_reg)
        schedule_steps=10_000,  # [ours] linear decay after the warm-up
    ),
}
PRESETS["smoke-sdxl"] = PRESETS["smoke"]  # the same run; resolve_teacher builds the tiny SDXL-shaped teacher
PRESETS["paper-1024"] = dict(  # SDXS-1024: --teacher stabilityai/stable-diffusion-xl-base-1.0, --student stage B's paper-1024 final
    PRESETS["paper"],
    resolution=1024,  # [paper] SDXS-1024
    batch_size=4, grad_accum=32,  # [ours] the same global batch 1024 = 4 x 32 x 8 GPUs
    real_guidance=5.0,  # [ours] SDXL base's own CFG scale for the offline score
)
LOSSES = ["loss", "loss_fm", "loss_sd", "loss_online"]
PSI_SCHEDULERS = {"dpmsolver++": "DPMSolverMultistepScheduler", "lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
                  "ddim": "DDIMScheduler"}
VGG16_LAYERS = (3, 8, 15, 22, 29)  # torchvision vgg16().features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --- the one-step generator and the teacher's trajectories -----------------------------------------


def one_step_coefficients(scheduler_config: dict) -> tuple[float, float, int]:
    """(a, b, T) such that the `sdxs` engine's single step is x0 = a*z - b*eps(z, T), T = 999: read off
    (by two probes, the update is linear in z and eps) the very scheduler the final folder ships
    (common.one_step_scheduler, DEIS) as the engine sets it up (sdxs.engine.one_step_scheduler). For SD
    betas a = 14.642591, b = 14.579279: DEIS's first-order step from t=999 to t=0, slightly off the
    exact x0 prediction (14.648819, 14.614647), so the student is trained as it will run."""
    from sdxs.engine import one_step_scheduler as engine_scheduler

    config = dict(common.one_step_scheduler(scheduler_config).config, _class_name="DEISMultistepScheduler")

    def probe(z: float, eps: float) -> float:
        scheduler = engine_scheduler(config)  # fresh: schedulers keep state between steps
        if float(scheduler.init_noise_sigma) != 1.0:
            raise ValueError("expected a one-step scheduler whose noise enters unscaled (init_noise_sigma 1).")
        t = scheduler.timesteps[0]
        return float(scheduler.step(torch.full((1, 1, 1, 1), eps), t, torch.full((1, 1, 1, 1), z)).prev_sample.flatten()[0])

    return probe(1.0, 0.0), -probe(0.0, 1.0), int(engine_scheduler(config).timesteps[0])


def unet_eps(unet, x: torch.Tensor, t: torch.Tensor, states: common.TextCond | torch.Tensor,
             control: torch.Tensor | None = None) -> torch.Tensor:
    """eps of a U-Net conditioned on `states` (common.TextCond: for SDXL also the pooled embedding and size
    ids; a bare tensor is SD text states); with `control` (control images of the same samples, stage D) `unet`
    is a U-Net with its ControlNet attached (train/distill_controlnet.py ControlledUNet), which takes them as `control`."""
    kwargs = {} if control is None else {"control": control}
    return unet(x, t, **common.as_cond(states).unet_kwargs(), **kwargs).sample


def one_step_generate(unet, noise: torch.Tensor, states: common.TextCond | torch.Tensor, coefficients: tuple[float, float, int],
                      control: torch.Tensor | None = None) -> torch.Tensor:
    """The student as a one-step generator, exactly what the `sdxs` engine computes: x0 = a*z - b*eps(z, T)
    with (a, b, T) = one_step_coefficients(...) (about (z - sqrt(1 - abar_T) eps) / sqrt(abar_T), T = 999).
    `control`: the control images of a student with a ControlNet (stage D)."""
    a, b, last = coefficients
    t = torch.full((len(noise),), last, device=noise.device, dtype=torch.long)
    return a * noise - b * unet_eps(unet, noise, t, states, control).float()


def make_psi_scheduler(name: str, scheduler_config: dict):
    """The scheduler of psi on the teacher's betas. Every choice starts at t = T-1 (999), so psi and the
    student start from the same noise: Euler/DDIM use "trailing" spacing, DDIM without x0 clipping."""
    import diffusers

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    keep = {k: keep[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                                 "steps_offset", "trained_betas") if k in keep}
    extra = {"euler": {"timestep_spacing": "trailing"}, "ddim": {"timestep_spacing": "trailing", "clip_sample": False},
             "dpmsolver++": {"algorithm_type": "dpmsolver++"}}.get(name, {})
    return getattr(diffusers, PSI_SCHEDULERS[name]).from_config({**keep, **extra})


@torch.no_grad()
def psi_sample(unet, scheduler, steps: int, noise: torch.Tensor, cond: common.TextCond | torch.Tensor,
               uncond: common.TextCond | torch.Tensor | None,
               guidance_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """psi(eps) of Eq. 10: the teacher's few-step ODE sampler from the noise `noise` (the student's own),
    classifier-free guided when guidance_scale > 1. Returns clean latents in U-Net space."""
    scheduler.set_timesteps(steps, device=noise.device)
    last = scheduler.config.num_train_timesteps - 1
    if int(scheduler.timesteps[0]) != last:
        raise ValueError(f"psi must start at t={last}, where the student starts; {type(scheduler).__name__} starts at "
                         f"{int(scheduler.timesteps[0])}.")
    latents = noise * scheduler.init_noise_sigma
    guided = guidance_scale > 1 and uncond is not None
    states = common.TextCond.cat([common.as_cond(uncond), common.as_cond(cond)]) if guided else common.as_cond(cond)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        eps = unet(x.to(unet.dtype), t, **states.unet_kwargs()).sample.float()
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents


def pair_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The noise of cached pair `index`: depends only on (seed, index), so any sharding builds one cache."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def build_pair_cache(teacher_unet, encode, scheduler_config: dict, prompts: list[str], folder: Path, *,
                     psi_scheduler: str, steps: int, guidance_scale: float, side: int, seed: int, batch_size: int,
                     accelerator) -> Path:
    """Cache the (noise, psi(noise)) pairs, one .pt file per prompt {"noise", "latents": fp32 (4, side, side),
    "prompt"}; written file by file atomically and sharded over processes; meta.json marks it complete.
    `encode`: the teacher's common.PromptEncoder (its unconditional() is CFG's negative)."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    device = accelerator.device
    todo = [i for i in range(len(prompts)) if i % accelerator.num_processes == accelerator.process_index
            and not (folder / f"{i:07d}.pt").is_file()]
    uncond = encode.unconditional()
    for start in range(0, len(todo), batch_size):
        ids = todo[start : start + batch_size]
        noise = torch.cat([pair_noise((1, 4, side, side), seed, i) for i in ids]).to(device)
        cond = encode([prompts[i] for i in ids])
        latents = psi_sample(teacher_unet, make_psi_scheduler(psi_scheduler, scheduler_config), steps, noise, cond,
                             uncond.expand(len(ids)), guidance_scale, torch.Generator().manual_seed(seed + ids[0]))
        for k, i in enumerate(ids):
            item = {"noise": noise[k].float().cpu(), "latents": latents[k].float().cpu(), "prompt": prompts[i]}
            torch.save(item, folder / f".{i:07d}.tmp")
            os.replace(folder / f".{i:07d}.tmp", folder / f"{i:07d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / "meta.json").write_text(json.dumps({"n": len(prompts), "psi": [psi_scheduler, steps, guidance_scale]}) + "\n")
    accelerator.wait_for_everyone()
    return folder


class Pairs(torch.utils.data.Dataset):
    """Cached pairs {"noise", "latents", "prompt"} (a cache folder), or prompts alone (--pairs online)."""

    def __init__(self, folder: Path | None = None, prompts: list[str] | None = None):
        self.files = sorted(Path(folder).glob("*.pt")) if folder else None
        self.prompts = prompts
        if not (self.files or self.prompts):
            raise SystemExit(f"No training pairs in {folder}.")

    def __len__(self) -> int:
        return len(self.files) if self.files else len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return torch.load(self.files[index], weights_only=True) if self.files else {"prompt": self.prompts[index]}


def collate_pairs(items: list[dict]) -> dict:
    batch = {"prompt": [item["prompt"] for item in items]}
    for key in ("noise", "latents"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


# --- the frozen feature encoders of L_FM ------------------------------------------------------------


def parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in str(text).split(",") if v.strip()]


class UNetEncoder(torch.nn.Module):
    """The diffusion U-Net's own encoder as f_l of Eq. 10: the output of each down stage, read before
    its downsampler (the stage's own resolution), of the frozen teacher U-Net run on the latents as
    they are at a fixed small timestep `timestep`, conditioned on the prompt (an SDXL U-Net's timestep
    embedding also takes the pooled embedding and size ids, as in its forward). Works on latents: no
    decoder and no download. Stops after the deepest layer asked for."""

    def __init__(self, unet, layers: list[int], timestep: int):
        super().__init__()
        if (unet.config.get("class_embed_type") or unet.config.get("num_class_embeds") or unet.config.get("encoder_hid_dim_type")
                or unet.config.get("addition_embed_type") not in (None, "text_time")):
            raise ValueError("--fm_encoder unet supports SD-style and SDXL-style U-Nets (no class embeddings, no added "
                             "embeddings but SDXL's text_time).")
        if max(layers) >= len(unet.down_blocks):
            raise ValueError(f"--fm_layers {layers}: the U-Net has {len(unet.down_blocks)} down stages (0..{len(unet.down_blocks) - 1}).")
        self.unet, self.layers, self.timestep = unet, layers, timestep

    def forward(self, latents: torch.Tensor, cond: common.TextCond | torch.Tensor) -> list[torch.Tensor]:
        unet, cond = self.unet, common.as_cond(cond)
        x = latents.to(unet.dtype)
        t = torch.full((len(x),), self.timestep, device=x.device, dtype=torch.long)
        emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
        if cond.added is not None:  # SDXL: + add_embedding(pooled, size ids), as UNet2DConditionModel.forward
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.states, added_cond_kwargs=cond.added)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h, features = unet.conv_in(x), {}
        for i, block in enumerate(unet.down_blocks[: max(self.layers) + 1]):
            if getattr(block, "has_cross_attention", False):
                h, states_out = block(h, temb=emb, encoder_hidden_states=cond.states.to(x.dtype))
            else:
                h, states_out = block(h, temb=emb)
            features[i] = states_out[-2] if block.downsamplers is not None else h
        return [features[i].float() for i in self.layers]


class ImageEncoder(torch.nn.Module):
    """VGG-16 or DINOv2 as f_l of Eq. 10, on images: the latents are decoded by the frozen teacher VAE,
    resized to 224 px and ImageNet-normalised. VGG-16 layers index relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3; DINOv2 layers index its hidden states (0 = embeddings), whose patch tokens are laid out as
    (C, 16, 16) maps."""

    def __init__(self, kind: str, network, vae, layers: list[int]):
        super().__init__()
        self.kind, self.network, self.vae, self.layers = kind, network, vae, layers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, latents: torch.Tensor, states: torch.Tensor | None = None) -> list[torch.Tensor]:
        images = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
        images = F.interpolate((images.clamp(-1, 1) + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False)
        x = (images - self.mean) / self.std
        if self.kind == "vgg16":
            features, wanted = [], [VGG16_LAYERS[i] for i in self.layers]
            for index, module in enumerate(self.network.features[: max(wanted) + 1]):
                x = module(x)
                if index in wanted:
                    features.append(x)
            return [f.float() for f in features]
        hidden = self.network(pixel_values=x, output_hidden_states=True).hidden_states
        skip = 1 + getattr(self.network.config, "num_register_tokens", 0)  # CLS (+ registers) before the patches
        side = x.shape[-1] // self.network.config.patch_size
        return [hidden[i][:, skip:].transpose(1, 2).reshape(len(x), -1, side, side).float() for i in self.layers]


def load_fm_encoder(kind: str, path: str | None, *, teacher_unet, vae, layers: list[int], timestep: int,
                    device: torch.device) -> torch.nn.Module:
    """The frozen encoder of L_FM named by --fm_encoder, on `device` (the network, the VAE it decodes with
    and its ImageNet mean/std buffers: a CUDA step must not meet CPU tensors); VGG-16 and DINOv2 read local
    weights only. Their weights stay fp32: under --mixed_precision autocast runs them in half precision."""
    if kind == "unet":
        encoder = UNetEncoder(teacher_unet, layers, timestep)
    elif kind == "vgg16":
        try:
            import torchvision
        except ImportError:
            raise SystemExit("--fm_encoder vgg16 needs torchvision (pip install torchvision) and --fm_encoder_path, a torchvision "
                             "VGG-16 state dict (e.g. vgg16-397923af.pth). Or use --fm_encoder unet (no download).") from None
        if not path or not Path(path).is_file():
            raise SystemExit(f"--fm_encoder vgg16 needs --fm_encoder_path: a local torchvision VGG-16 state dict file "
                             f"(e.g. vgg16-397923af.pth); got {path!r}. Or use --fm_encoder unet (no download).")
        network = torchvision.models.vgg16()
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        encoder = ImageEncoder(kind, network, vae, layers)
    elif kind == "dinov2":
        from transformers import Dinov2Model

        if not path or not Path(path).is_dir():
            raise SystemExit(f"--fm_encoder dinov2 needs --fm_encoder_path: a local folder of a transformers DINOv2 model "
                             f"(e.g. a download of facebook/dinov2-small); got {path!r}. Or use --fm_encoder unet (no download).")
        network = Dinov2Model.from_pretrained(path)
        if max(layers) > network.config.num_hidden_layers:
            raise SystemExit(f"--fm_layers {layers}: this DINOv2 has hidden states 0..{network.config.num_hidden_layers}.")
        encoder = ImageEncoder(kind, network, vae, layers)
    else:
        raise ValueError(f"unknown --fm_encoder {kind}")
    return encoder.to(device).eval().requires_grad_(False)


# --- losses and schedules ---------------------------------------------------------------------------


def ssim_distance(x: torch.Tensor, y: torch.Tensor, window: int) -> torch.Tensor:
    """Per-sample 1 - SSIM between feature maps (N, C, H, W) of any channel count (pytorch_msssim, a
    Gaussian window of size min(window, the largest odd number <= min(H, W)), so small maps are
    compared too). Features have no fixed range: data_range, which sets SSIM's stabilising constants,
    is the target's (y) value range, detached. Always computed in fp32, also under mixed precision: SSIM's
    variances are differences of large moments (E[x^2] - E[x]^2), which bf16/fp16 convolutions cancel to
    garbage; on a GPU, VGG-16 features in bf16 gave NaN at the 7th step."""
    from pytorch_msssim import ssim

    side = min(x.shape[-2:])
    if side < 2:
        raise ValueError(f"feature maps of {tuple(x.shape[-2:])} are too small for SSIM; choose shallower --fm_layers.")
    window = min(window, side if side % 2 else side - 1)
    data_range = float((y.max() - y.min()).detach().clamp_min(1e-6))
    with torch.autocast(device_type=x.device.type, enabled=False):
        return 1 - ssim(x.float(), y.float(), data_range=data_range, size_average=False, win_size=window)


def feature_matching_loss(student_features: list[torch.Tensor], target_features: list[torch.Tensor],
                          weights: list[float], window: int) -> torch.Tensor:
    """Eq. 10, L_FM = sum_l w_l * SSIM-loss(f_l(G(eps)), f_l(psi(eps))), per sample (shape (N,))."""
    return sum(w * ssim_distance(s, t, window) for w, s, t in zip(weights, student_features, target_features))


def linear_schedule(step: int, start_step: int, steps: int, start: float, end: float) -> float:
    """start until start_step, then linearly to end over `steps` steps, then end."""
    if steps <= 0:
        return end if step > start_step else start
    return start + (end - start) * min(max(step - start_step, 0) / steps, 1.0)


def alpha_schedule(step: int, *, warmup_steps: int, decay_steps: int, start: float, end: float) -> float:
    """alpha of Eqs. 11-12 at `step`: `start` (near 1) at the first step of score distillation (the one
    after the FM warm-up), then linearly down to `end` over `decay_steps`, then constant (the paper:
    start alpha near 1, then lower it)."""
    return linear_schedule(step, warmup_steps + 1, decay_steps, start, end)


def lambda_fm_schedule(step: int, *, warmup_steps: int, decay_steps: int, start: float, end: float) -> float:
    """lambda_FM of Eq. 12 at `step`: `start` (high) at the first step of score distillation, then
    linearly down to `end` over `decay_steps`, then constant. (During the warm-up L_FM runs alone, weight 1.)"""
    return linear_schedule(step, warmup_steps + 1, decay_steps, start, end)


def split_by_segment(t: torch.Tensor, alpha: float, num_train_timesteps: int) -> torch.Tensor:
    """Eqs. 11-12: True where t <= alpha*T (the sample gets the score-distillation gradient), False where
    t > alpha*T (it gets lambda_FM times the FM gradient)."""
    return t.float() <= alpha * num_train_timesteps


def score_difference(eps_online: torch.Tensor, eps_offline: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """s_online(x_t, t) - s_offline(x_t, t) in the SCORE convention, s = grad log p_t = -eps / sigma_t:
    = (eps_offline - eps_online) / sigma_t. This is the gradient of KL(p_student || p_teacher) w.r.t.
    the sample (Diff-Instruct/DMD: s_fake - s_real), i.e. eps_real - eps_fake up to a positive weight;
    gradient DESCENT then moves x_t toward the teacher's distribution. `sigma`: (N,) sqrt(1 - abar_t)."""
    eps_offline, eps_online = _at_least_fp32(eps_offline), _at_least_fp32(eps_online)
    return (eps_offline - eps_online) / sigma.view(-1, *[1] * (eps_online.dim() - 1)).to(eps_online.dtype)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def score_distillation_surrogate(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 11's gradient as a loss: 0.5 * sum_i w_i * ||x_i - (x_i - g_i).detach()||^2, summed over all
    elements, so that d loss / d x_i = w_i * g_i exactly (x = x_t, g = s_online - s_offline, w = w(t))."""
    weight = weight.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    return 0.5 * (weight * (x - (x - grad.to(x.dtype)).detach()) ** 2).sum()


def score_weight(kind: str, alpha_t: torch.Tensor, sigma_t: torch.Tensor, x0: torch.Tensor | None = None,
                 x0_offline: torch.Tensor | None = None) -> torch.Tensor:
    """w(t) of Eq. 11, per sample. "sigma" [ours]: w = sigma_t, so w * g = eps_offline - eps_online (unit
    scale at every t). "dmd2" [DMD2]: w = sigma_t^2 / alpha_t^2 / mean|x0 - x0_offline| per sample, so that
    the gradient reaching x0 (x_t = alpha_t x0 + sigma_t n) is DMD2's (x0_online - x0_offline) /
    mean|x0 - x0_offline|: the per-sample normalisation of DMD2."""
    if kind == "sigma":
        return _at_least_fp32(sigma_t)
    if kind == "dmd2":
        norm = (_at_least_fp32(x0) - _at_least_fp32(x0_offline)).abs().flatten(1).mean(1).clamp_min(1e-6)
        return (_at_least_fp32(sigma_t) ** 2 / _at_least_fp32(alpha_t) ** 2) / norm
    raise ValueError(f"unknown --sd_weighting {kind}")


def denoising_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The online DM's standard denoising (epsilon-prediction) loss on the student's samples (Eq. 11's
    s_phi is trained with it, Alg. 1): || eps_phi(x_t, t) - n ||^2."""
    return F.mse_loss(eps_pred.float(), noise.float())


# --- what stage C supports, said up front ----------------------------------------------------------


FEW_PSI_STEPS = 8  # [ours] at or below this, an ODE solver on a plain (not straightened) teacher gives coarse targets


def require_epsilon_prediction(scheduler_config: dict, flag: str, model: str) -> None:
    """Stage C reads scores off epsilon predictions (s = -eps/sigma_t in Eq. 11; the online DM's loss
    targets the noise; the one-step generator is x0 = a*z - b*eps): a v- or x0-predicting teacher would
    train without complaint and silently wrong, so it is refused."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise SystemExit(f"error: {flag} {model}: its scheduler's prediction_type is '{kind}'; stage C supports "
                         f"epsilon-prediction teachers only (SD-1.5 family, SD-2.1-base), because its score distillation "
                         f"reads scores as -eps/sigma_t. Use an epsilon-prediction model as {flag}.")


def psi_warning(psi_scheduler: str, steps: int, straightened: bool) -> str | None:
    """A one-line warning when psi (Eq. 10's FM targets) is not what the paper uses, a few-step sampler of a
    trajectory-STRAIGHTENED teacher (LCM/Turbo, passed as --psi_teacher): LCMScheduler on a plain teacher,
    or few steps of any solver on one, gives blurred targets, and FM teaches the student exactly those."""
    if straightened:
        return None
    fix = "pass a straightened --psi_teacher (e.g. the teacher with an LCM-LoRA merged in)"
    if psi_scheduler == "lcm":
        return (f"warning: psi runs {steps} LCM step(s) on the plain --teacher, which is not trajectory-straightened: "
                f"LCMScheduler expects an LCM-distilled U-Net, so the FM targets psi(eps) will be blurred; {fix}, or use "
                f"--psi_scheduler dpmsolver++ with more --sampler_steps.")
    if steps <= FEW_PSI_STEPS:
        return (f"warning: psi runs only {steps} {psi_scheduler} step(s) on the plain --teacher, which is not "
                f"trajectory-straightened: the FM targets psi(eps) will be coarse; {fix}, or raise --sampler_steps.")
    return None


# --- one training step (what main() and the tests both call) ---------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """What a training step reads besides the models: the flags of Eqs. 10-12 and the teacher's
    noise schedule. Built once by step_settings(); the step functions never see the argparse Namespace."""

    num_train_timesteps: int  # T of Eqs. 11-12
    t_lo: int  # t ~ U{t_lo..t_hi} (--t_range) for the student's terms and the online DM's loss
    t_hi: int
    latent_shape: tuple[int, int, int]  # (C, H, W) of the student's noise
    abar: torch.Tensor  # the teacher's alphas_cumprod (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n), on the device
    coefficients: tuple[float, float, int]  # the one-step generator's (a, b, T_last): one_step_coefficients
    uncond: common.TextCond | torch.Tensor  # the conditions of "" (CFG of the offline eps; PromptEncoder.unconditional)
    weight_dtype: torch.dtype  # the dtype frozen parts run in (--mixed_precision)
    real_guidance: float
    sd_weighting: str
    fm_weights: tuple[float, ...]
    fm_ssim_window: int
    max_grad_norm: float
    fm_warmup_steps: int  # Eq. 10 alone for the first N steps, then Eqs. 11-12
    schedule_steps: int  # alpha and lambda_FM fall linearly over N steps after the warm-up
    alpha: tuple[float, float]  # (start, end)
    lambda_fm: tuple[float, float]  # (start, end)


def step_settings(args: argparse.Namespace, scheduler_config: dict, *, uncond: common.TextCond | torch.Tensor, device: torch.device,
                  vae_factor: int = 8) -> StepSettings:
    """The StepSettings of a run: its flags, and the teacher's noise schedule from its SCHEDULER config
    (T included: a U-Net config has no num_train_timesteps; 1000 is diffusers' default when it is unset).
    `vae_factor`: pixels per latent side of the teacher's VAE (common.vae_factor)."""
    from diffusers import DDPMScheduler

    T = int(scheduler_config.get("num_train_timesteps", 1000))
    t_lo, t_hi = (round(v * (T - 1)) for v in parse_list(args.t_range))
    side = args.resolution // vae_factor
    return StepSettings(
        num_train_timesteps=T, t_lo=t_lo, t_hi=t_hi, latent_shape=(4, side, side),
        abar=DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(device),  # the teacher's betas, for x_t
        coefficients=one_step_coefficients(scheduler_config), uncond=uncond,
        weight_dtype=common.weight_dtype(args.mixed_precision), real_guidance=args.real_guidance,
        sd_weighting=args.sd_weighting, fm_weights=tuple(parse_list(args.fm_weights)), fm_ssim_window=args.fm_ssim_window,
        max_grad_norm=args.max_grad_norm, fm_warmup_steps=args.fm_warmup_steps, schedule_steps=args.schedule_steps,
        alpha=(args.alpha_start, args.alpha_end), lambda_fm=(args.lambda_fm_start, args.lambda_fm_end))


@dataclass(frozen=True)
class Phase:
    """Where step `step` stands: the FM warm-up (Eq. 10 alone, every sample, weight 1), or segmented
    score distillation (Eqs. 11-12) with its alpha (t <= alpha*T: score distillation) and lambda_FM
    (the FM weight for t > alpha*T)."""

    warmup: bool
    alpha: float
    lambda_fm: float


def phase_at(step: int, s: StepSettings) -> Phase:
    """The Phase of optimizer step `step` (1-based): alpha_schedule and lambda_fm_schedule after the warm-up."""
    if step <= s.fm_warmup_steps:
        return Phase(warmup=True, alpha=0.0, lambda_fm=1.0)
    when = {"warmup_steps": s.fm_warmup_steps, "decay_steps": s.schedule_steps}
    return Phase(warmup=False, alpha=alpha_schedule(step, **when, start=s.alpha[0], end=s.alpha[1]),
                 lambda_fm=lambda_fm_schedule(step, **when, start=s.lambda_fm[0], end=s.lambda_fm[1]))


@dataclass
class Models:
    """The networks of stage C and the optimizers of the two trained ones (as accelerate prepared them)."""

    student: torch.nn.Module  # G, the one-step generator (trained)
    online: torch.nn.Module  # the online "fake score" DM (trained), initialised from the offline DM
    offline: torch.nn.Module  # the offline DM: the frozen teacher U-Net
    encoder: torch.nn.Module  # f of Eq. 10, frozen
    student_optimizer: torch.optim.Optimizer
    online_optimizer: torch.optim.Optimizer


@dataclass
class MicroBatch:
    """One micro-batch of pairs: the noise eps, its psi(eps) (latents, U-Net space) and the prompts' text
    conditions (common.TextCond, or SD text states); in stage D also the control images extracted from
    psi(eps)'s images (the triplet's third part)."""

    noise: torch.Tensor
    target: torch.Tensor
    states: common.TextCond | torch.Tensor
    control: torch.Tensor | None = None


@dataclass
class UpdateInfo:
    """What one update did: its loss terms (for the log and the finite guard), whether the optimizer step
    was taken (False: skipped by the guard), and what it fed its losses (per sample, for the tests)."""

    losses: dict[str, float]
    stepped: bool
    fed: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Psi:
    """psi of Eq. 10 as a run sets it up: the teacher's few-step ODE sampler (psi_sample) of `unet` with
    the scheduler `scheduler` on `scheduler_config`'s betas, `steps` steps, CFG `guidance_scale`."""

    unet: torch.nn.Module
    scheduler: str
    scheduler_config: dict
    steps: int
    guidance_scale: float
    uncond: common.TextCond | torch.Tensor  # the conditions of "" (PromptEncoder.unconditional)

    def __call__(self, noise: torch.Tensor, cond: common.TextCond | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return psi_sample(self.unet, make_psi_scheduler(self.scheduler, self.scheduler_config), self.steps, noise, cond,
                          common.as_cond(self.uncond).expand(len(noise)), self.guidance_scale, generator)


def training_pairs(batch: dict, states: common.TextCond | torch.Tensor, gen: torch.Generator, s: StepSettings, psi: Psi | None) -> MicroBatch:
    """A loader batch as (eps, psi(eps), states): cached pairs (--pairs cache), or step-seeded noise
    sampled by psi now (--pairs online)."""
    device = states.device
    if "noise" in batch:
        return MicroBatch(batch["noise"].to(device), batch["latents"].to(device), states)
    noise = torch.randn(len(states), *s.latent_shape, generator=gen).to(device)
    return MicroBatch(noise, psi(noise, states, gen), states)


def draw_timesteps(n: int, s: StepSettings, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """t ~ U{t_lo..t_hi} (--t_range), one per sample."""
    return torch.randint(s.t_lo, s.t_hi + 1, (n,), generator=gen).to(device)


def noisy(abar: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, alpha_t, sigma_t): x_t = alpha_t x0 + sigma_t n, differentiable in x0; alpha_t, sigma_t of shape (N,)."""
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    return a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * noise, a, s


@torch.no_grad()
def offline_eps(unet, x_t: torch.Tensor, t: torch.Tensor, states: common.TextCond | torch.Tensor, uncond: common.TextCond | torch.Tensor,
                real_guidance: float, control: torch.Tensor | None = None) -> torch.Tensor:
    """eps of the offline (teacher) DM, s_offline = -eps/sigma_t in Eq. 11, classifier-free guided by
    --real_guidance [DMD2]: eps_u + g (eps_c - eps_u). The online DM's eps is never guided. With a ControlNet
    (stage D) both branches see the control: guidance is on the text only."""
    x = x_t.to(unet.dtype)
    if real_guidance > 1:
        both = None if control is None else torch.cat([control, control])
        eps_u, eps_c = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]),
                                common.TextCond.cat([common.as_cond(uncond).expand(len(x)), common.as_cond(states)]), both).float().chunk(2)
        return eps_u + real_guidance * (eps_c - eps_u)
    return unet_eps(unet, x, t, states, control).float()


def online_update(models: Models, s: StepSettings, micro_states: list[common.TextCond | torch.Tensor], gen: torch.Generator, *, step: int,
                  accelerator, guard: common.FiniteGuard, micro_controls: list[torch.Tensor | None] | None = None) -> UpdateInfo:
    """One update of the online DM (Alg. 1; s_online of Eq. 11): the standard denoising loss
    ||eps_online(x_t, t) - n||^2 on the student's CURRENT one-step samples x0 = G(z), z fresh noise,
    t ~ U[t_range]. The student runs under no_grad: this update trains the online DM only, toward the
    student's distribution (never toward psi's targets). One optimizer step over the micro-batches.
    Stage D: `micro_controls` are the micro-batches' control images; student and online DM both see them."""
    student = accelerator.unwrap_model(models.student)
    loss_sum, fed = 0.0, {"z": [], "noise": [], "t": [], "x0": []}
    controls = micro_controls or [None] * len(micro_states)
    for k, (states, control) in enumerate(zip(micro_states, controls)):
        z = torch.randn(len(states), *s.latent_shape, generator=gen).to(states.device)  # fresh noise: G's distribution
        n = torch.randn(z.shape, generator=gen).to(states.device)
        t = draw_timesteps(len(z), s, gen, states.device)
        with torch.no_grad(), accelerator.autocast():
            x0 = one_step_generate(student, z, states, s.coefficients, control).float()
        x_t, _, _ = noisy(s.abar, x0, n, t)
        sync = k == len(micro_states) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(models.online), accelerator.autocast():
            loss = denoising_loss(unet_eps(models.online, x_t, t, states, control), n)
            accelerator.backward(loss / len(micro_states))
        loss_sum += loss.item() / len(micro_states)
        for key, value in (("z", z), ("noise", n), ("t", t), ("x0", x0)):
            fed[key].append(value.detach())
    losses = {"loss_online": loss_sum}
    stepped = common.guarded_update(accelerator, models.online_optimizer, models.online.parameters(), guard, step, losses,
                                    s.max_grad_norm, "online DM")
    return UpdateInfo(losses, stepped, {key: torch.cat(values) for key, values in fed.items()})


def fm_loss(encoder, x0: torch.Tensor, target: torch.Tensor, states: common.TextCond | torch.Tensor, s: StepSettings) -> torch.Tensor:
    """Eq. 10 per sample: sum_l w_l (1 - SSIM(f_l(G(eps)), f_l(psi(eps)))); the target's features carry no gradient."""
    with torch.no_grad():
        target_features = encoder(target, states)
    return feature_matching_loss(encoder(x0, states), target_features, list(s.fm_weights), s.fm_ssim_window)


def score_distillation_loss(online, offline, s: StepSettings, x0: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
                            states: common.TextCond | torch.Tensor, control: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11 for the student's samples x0 in the segment t <= alpha*T: x_t = alpha_t x0 + sigma_t n, and a
    surrogate whose gradient on x_t is w(t) (s_online(x_t) - s_offline(x_t)), summed over the samples,
    averaged over each sample's elements (as DMD2's 0.5*MSE). Returns (loss, |w g| per element).
    `control`: the samples' control images (stage D), seen by both DMs."""
    x_t, a_t, s_t = noisy(s.abar, x0, n, t)
    with torch.no_grad():
        x_in = x_t.detach()
        eps_on = unet_eps(online, x_in.to(s.weight_dtype), t, states, control).float()
        eps_off = offline_eps(offline, x_in, t, states, s.uncond, s.real_guidance, control)
        g = score_difference(eps_on, eps_off, s_t)
        x0_off = (x_in - s_t.view(-1, 1, 1, 1) * eps_off) / a_t.view(-1, 1, 1, 1)
        w = score_weight(s.sd_weighting, a_t, s_t, x0.detach(), x0_off)
    loss = score_distillation_surrogate(x_t.float(), g, w) / x0[0].numel()
    return loss, (w.view(-1, 1, 1, 1) * g).abs()


def student_loss(models: Models, s: StepSettings, batch: MicroBatch, phase: Phase, gen: torch.Generator, *,
                 online) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """The student's loss on one micro-batch (Eq. 12): every sample draws t ~ U[t_range]; where t > alpha*T
    (every sample in the warm-up) it gets lambda_FM * L_FM (Eq. 10) between G(eps) and psi(eps) of the
    SAME noise eps; where t <= alpha*T, the score-distillation term of Eq. 11 on G(z) of fresh noise z (see
    below). Both are summed per sample and averaged over the batch. Returns (loss, terms for the log, what
    each sample was fed: its input noise z, the noise n of x_t, t, and whether it fell in the score segment)."""
    device = batch.noise.device
    n = torch.randn(batch.noise.shape, generator=gen).to(device)  # the noise of x_t (Eq. 11)
    t = draw_timesteps(len(n), s, gen, device)
    fresh = torch.randn(batch.noise.shape, generator=gen).to(device)
    sd_mask = torch.zeros(len(t), dtype=torch.bool, device=device) if phase.warmup else \
        split_by_segment(t, phase.alpha, s.num_train_timesteps)
    fm_mask = ~sd_mask
    # The student's input: FM compares G(eps) with psi(eps), so an FM sample must start from the pair's own
    # noise eps. Score distillation matches distributions: its gradient is an expectation over p_G, i.e.
    # over G(z) with z ~ N(0, I), the distribution the online DM is trained on (fresh z in online_update).
    # With --pairs cache the pairs hold a fixed set of N noises; feeding those to Eq. 11 would pull the
    # teacher's score only at those N points. So, as DMD2 does (regression on the cached pairs,
    # distribution matching on fresh noise), an SD-segment sample starts from fresh noise z.
    z = torch.where(sd_mask.view(-1, 1, 1, 1), fresh, batch.noise)
    x0 = one_step_generate(models.student, z, batch.states, s.coefficients, batch.control)
    loss, terms = x0.new_zeros(()), {}
    if fm_mask.any():
        per_sample = fm_loss(models.encoder, x0[fm_mask], batch.target[fm_mask], batch.states[fm_mask], s)
        loss = loss + phase.lambda_fm * per_sample.sum() / len(x0)  # Eq. 12, t > alpha*T: lambda_FM * L_FM
        terms["loss_fm"] = per_sample.mean().item()
    if sd_mask.any():
        control = None if batch.control is None else batch.control[sd_mask]
        loss_sd, wg = score_distillation_loss(online, models.offline, s, x0[sd_mask], n[sd_mask], t[sd_mask],
                                              batch.states[sd_mask], control)
        loss = loss + loss_sd / len(x0)  # Eq. 12, t <= alpha*T: the score-distillation gradient of Eq. 11
        terms["loss_sd"], terms["sd_grad"] = loss_sd.item() / len(x0), wg.mean().item()
    terms["loss"] = loss.item()
    return loss, terms, {"z": z.detach(), "noise": n, "t": t, "sd_mask": sd_mask}


def student_update(models: Models, s: StepSettings, batches: list[MicroBatch], phase: Phase, gen: torch.Generator, *,
                   step: int, accelerator, guard: common.FiniteGuard) -> UpdateInfo:
    """One optimizer step of the student G (Eqs. 10-12: student_loss), accumulated over the micro-batches.
    The LR schedule and the EMA follow only a step that was taken (UpdateInfo.stepped)."""
    online = accelerator.unwrap_model(models.online)
    sums, fed = {}, []
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(models.student), accelerator.autocast():
            loss, terms, record = student_loss(models, s, batch, phase, gen, online=online)
            accelerator.backward(loss / len(batches))
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value / len(batches)
        fed.append(record)
    losses = {key: sums[key] for key in ("loss", "loss_fm", "loss_sd") if key in sums}
    stepped = common.guarded_update(accelerator, models.student_optimizer, models.student.parameters(), guard, step, losses,
                                    s.max_grad_norm, "student")
    return UpdateInfo(sums, stepped, {key: torch.cat([r[key] for r in fed]) for key in fed[0]})


# --- arguments ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/distill_one_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)
    retitle = {
        "sampler_steps": "psi: teacher sampler steps from the student's noise (--psi_scheduler) (preset)",
        "guidance_scale": "psi: classifier-free guidance of the teacher sampler, 1 = off (an LCM teacher needs none) (preset)",
        "latents": "not used by this stage (pairs are always sampled from prompts; an --image_folder gives its captions)",
        "prompts": "text file, one prompt per line: each prompt gets one (noise, psi(noise)) pair. With --preset smoke and "
                   "no data given, 8 built-in prompts are used",
        "image_folder": "image-caption folder (images + metadata.jsonl): only its captions are used, as prompts",
        "cache_dir": "where the (noise, psi(noise)) pairs are cached with --pairs cache (default OUTPUT_DIR/cache); reused "
                     "by later runs with the same settings",
        "cache_batch_size": "batch size of psi while building the pair cache (default 8)",
        "lr": "AdamW learning rate of the student (preset)",
    }
    for action in parser._actions:
        if action.dest in retitle:
            action.help = retitle[action.dest]

    model = parser.add_argument_group("student and teachers")
    model.add_argument("--student", default=None,
                       help="the multi-step student: stage B's OUTPUT_DIR/final (a pipeline folder or hub id with unet/). "
                            "With --preset smoke and none given, stage B's recipe is applied to the teacher's U-Net")
    model.add_argument("--psi_teacher", default=None,
                       help="pipeline folder or hub id whose U-Net psi samples with (e.g. the teacher with an LCM-LoRA "
                            "merged in, the paper's straightened teacher); default: --teacher")
    model.add_argument("--psi_scheduler", choices=sorted(PSI_SCHEDULERS),
                       help="psi's ODE sampler on the teacher's betas, starting at t=999 like the student (preset)")
    model.add_argument("--pairs", choices=["cache", "online"],
                       help="cache: one (noise, psi(noise)) pair per prompt, computed once into --cache_dir; online: fresh "
                            "noise and psi every step (sampler_steps teacher calls per sample) (preset)")
    model.add_argument("--tiny_decoder", default=None,
                       help="an AutoencoderTiny folder to ship as vae/ in the final pipeline (default: the --student "
                            "folder's decoders; the teacher's AutoencoderKL when the student was derived here)")

    fm = parser.add_argument_group("feature matching (Eq. 10)")
    fm.add_argument("--fm_encoder", choices=["unet", "vgg16", "dinov2"],
                    help="frozen encoder f: 'unet' the teacher U-Net's down stages on latents (offline); 'vgg16' (needs "
                         "torchvision + --fm_encoder_path) or 'dinov2' (--fm_encoder_path) on teacher-VAE-decoded images (preset)")
    fm.add_argument("--fm_encoder_path", default=None,
                    help="local weights of the VGG-16 (torchvision state-dict file) or DINOv2 (transformers folder) encoder")
    fm.add_argument("--fm_layers", help="comma-separated layers l: U-Net down stages (0 = highest resolution), VGG-16 "
                                        "relu{1_2,2_2,3_3,4_3,5_3} as 0..4, or DINOv2 hidden states (preset)")
    fm.add_argument("--fm_weights", help="comma-separated w_l, one per --fm_layers entry (preset)")
    fm.add_argument("--fm_timestep", type=int, help="the fixed small t at which the U-Net encoder reads latents (preset)")
    fm.add_argument("--fm_ssim_window", type=int, help="SSIM Gaussian window (odd); smaller maps use the largest odd size that fits (preset)")
    fm.add_argument("--fm_warmup_steps", type=int, help="first N student steps use L_FM alone (no score distillation, no online DM updates) (preset)")

    sd = parser.add_argument_group("segmented score distillation (Eqs. 11-12)")
    sd.add_argument("--online_lr", type=float, help="AdamW learning rate of the online (fake-score) U-Net (preset)")
    sd.add_argument("--online_updates_per_step", type=int,
                    help="online DM updates before each student update after the warm-up: 1 as Diff-Instruct / Alg. 1, 10 as DMD2 (preset)")
    sd.add_argument("--real_guidance", type=float, help="CFG scale of the offline (teacher) score; the online score has none (preset)")
    sd.add_argument("--t_range", help="'lo,hi': t ~ U[lo*T, hi*T] for the student's score terms and the online DM's loss (preset)")
    sd.add_argument("--sd_weighting", choices=["sigma", "dmd2"],
                    help="w(t): 'sigma' (w*g = eps_offline - eps_online) or 'dmd2' (DMD2's per-sample normalised x0 gradient) (preset)")
    sd.add_argument("--alpha_start", type=float, help="alpha when score distillation begins: t <= alpha*T gets score gradients (preset)")
    sd.add_argument("--alpha_end", type=float, help="alpha after --schedule_steps (preset)")
    sd.add_argument("--lambda_fm_start", type=float, help="lambda_FM, weight of the FM gradient for t > alpha*T, when score distillation begins (preset)")
    sd.add_argument("--lambda_fm_end", type=float, help="lambda_FM after --schedule_steps (preset)")
    sd.add_argument("--schedule_steps", type=int, help="steps after the warm-up over which alpha and lambda_FM fall linearly (preset)")
    return parser


def validate(parser, args) -> None:
    layers, weights = parse_list(args.fm_layers, int), parse_list(args.fm_weights)
    if not layers or len(layers) != len(weights):
        parser.error(f"--fm_layers and --fm_weights need the same number of entries; got {args.fm_layers!r} and {args.fm_weights!r}.")
    lo_hi = parse_list(args.t_range)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
        parser.error(f"--t_range must be 'lo,hi' with 0 <= lo < hi <= 1; got {args.t_range!r}.")
    if args.fm_ssim_window < 1 or args.fm_ssim_window % 2 == 0:
        parser.error(f"--fm_ssim_window must be odd; got {args.fm_ssim_window}.")
    if args.online_updates_per_step < 1:
        parser.error(f"--online_updates_per_step must be at least 1; got {args.online_updates_per_step}.")
    if args.latents == "encode":
        parser.error("stage C samples its pairs from prompts: --latents encode does not apply.")
    if args.student is None and not common.is_smoke(args.preset):
        parser.error("--student is required with --preset paper: stage B's OUTPUT_DIR/final (a pipeline folder with unet/).")


# --- training ----------------------------------------------------------------------------------------


def load_student(student: str | None, teacher: common.Teacher, device: torch.device):
    """(student U-Net, its pipeline folder): stage B's output (--student), or under --preset smoke stage B's
    recipe applied to the (tiny) teacher, untrained."""
    from diffusers import UNet2DConditionModel

    if student:
        root = common.resolve_model(student, "--student", subfolders_with_weights=("unet",))
        if not (root / "unet").is_dir():
            raise SystemExit(f"--student {student}: {root} has no unet/ (expected stage B's OUTPUT_DIR/final).")
        if (root / "scheduler" / "scheduler_config.json").is_file():  # the final folder ships this scheduler
            require_epsilon_prediction(json.loads((root / "scheduler" / "scheduler_config.json").read_text()), "--student", student)
        return UNet2DConditionModel.from_pretrained(root / "unet").to(device), root
    from train.distill_unet import init_student_from_teacher

    unet, _ = init_student_from_teacher(teacher.unet)
    return unet.to(device), teacher.root


def pair_dataset(args, psi: Psi, psi_root: Path, teacher: common.Teacher, source: common.Source, output_dir: Path,
                 accelerator) -> Pairs:
    """--pairs cache: the (noise, psi(noise)) pairs, built once into --cache_dir/pairs-<hash of what they
    depend on: psi's model (path and content), data, sampler, resolution, seed>; --pairs online: the
    prompts alone (psi runs at every step)."""
    if args.pairs != "cache":
        return Pairs(prompts=source.prompts)
    settings = {"psi": str(args.psi_teacher or teacher.root), "psi_content": common.model_fingerprint(psi_root),
                "source": source.fingerprint, "n": len(source.prompts),
                "scheduler": args.psi_scheduler, "steps": args.sampler_steps, "guidance": args.guidance_scale,
                "resolution": args.resolution, "seed": args.seed}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.cache_dir or output_dir / "cache") / f"pairs-{digest}"
    build_pair_cache(psi.unet, teacher.prompt_encoder(args.resolution), psi.scheduler_config, source.prompts, folder,
                     psi_scheduler=psi.scheduler, steps=psi.steps, guidance_scale=psi.guidance_scale,
                     side=args.resolution // common.vae_factor(teacher.vae.config), seed=args.seed, batch_size=args.cache_batch_size, accelerator=accelerator)
    return Pairs(folder=folder)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = common.parse_args(parser, PRESETS, argv)
    validate(parser, args)
    # Accumulation is done here by hand (grad_accum=1 to accelerate): two models take turns, and
    # accelerate's accumulate() counts micro-steps globally.
    output_dir, accelerator, config = common.start_run(args, grad_accum=1)
    main_process, device = accelerator.is_main_process, accelerator.device

    # --- teacher (offline DM), student, online DM, psi, encoder, data ---------------------------------
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    tiny_dir = common.resolve_model(args.tiny_decoder, "--tiny_decoder", subfolders_with_weights=("",)) if args.tiny_decoder else None
    teacher_id = common.resolve_teacher(args.teacher, args.preset, output_dir, accelerator)
    teacher = common.load_teacher(teacher_id, device, torch.float32)
    require_epsilon_prediction(teacher.scheduler_config, "--teacher", teacher_id)
    warning = psi_warning(args.psi_scheduler, args.sampler_steps, straightened=bool(args.psi_teacher))
    if warning and main_process:
        print(warning, file=sys.stderr)
    student, student_root = load_student(args.student, teacher, device)
    online = copy.deepcopy(teacher.unet).requires_grad_(True).train()  # Eq. 11: initialised from the offline DM
    dtype = common.weight_dtype(args.mixed_precision)
    teacher.unet.to(dtype)
    for text_encoder in teacher.text_encoders:
        text_encoder.to(dtype)
    states_of = teacher.prompt_encoder(args.resolution)  # SD: text states; SDXL: + pooled embedding and size ids
    uncond = states_of.unconditional()
    psi = Psi(teacher.unet, args.psi_scheduler, teacher.scheduler_config, args.sampler_steps, args.guidance_scale, uncond)
    psi_root = teacher.root
    if args.psi_teacher:
        psi_root = common.resolve_model(args.psi_teacher, "--psi_teacher", subfolders_with_weights=("unet",))
        psi.unet = UNet2DConditionModel.from_pretrained(psi_root / "unet", torch_dtype=dtype).to(device).eval().requires_grad_(False)
        psi.scheduler_config = json.loads((psi_root / "scheduler" / "scheduler_config.json").read_text())
    encoder = load_fm_encoder(args.fm_encoder, args.fm_encoder_path, teacher_unet=teacher.unet, vae=teacher.vae,
                              layers=parse_list(args.fm_layers, int), timestep=args.fm_timestep, device=device)
    if main_process:
        print(f"Student U-Net {sum(p.numel() for p in student.parameters()):,} parameters (from {student_root}); online "
              f"U-Net {sum(p.numel() for p in online.parameters()):,} (= the offline teacher's).", file=sys.stderr)
    source = common.read_sources(args.prompts, args.image_folder, args.caption_column, None, args.num_samples,
                                 common.SMOKE_PROMPTS if common.is_smoke(args.preset) else None, max_bad_fraction=args.max_bad_fraction)
    if main_process and source.report is not None:
        common.write_data_report(output_dir, {"data": source.report})
    dataset = pair_dataset(args, psi, psi_root, teacher, source, output_dir, accelerator)
    settings = step_settings(args, teacher.scheduler_config, uncond=uncond, device=device, vae_factor=common.vae_factor(teacher.vae.config))

    # --- optimizers, accelerate ------------------------------------------------------------------------
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        online.enable_gradient_checkpointing()
    student.train()
    ema = common.make_ema(student, args.ema_decay)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    online_optimizer = torch.optim.AdamW(online.parameters(), lr=args.online_lr, weight_decay=args.weight_decay)
    lr_schedule = common.warmup_then_constant(optimizer, args.lr_warmup_steps)
    student, online, optimizer, online_optimizer = accelerator.prepare(student, online, optimizer, online_optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
        ema.to(device)
    raw_student = accelerator.unwrap_model(student)
    models = Models(student, online, teacher.unet, encoder, optimizer, online_optimizer)
    guard = common.FiniteGuard(args.skip_nonfinite, output_dir, lr_flag="--lr or --online_lr")  # one for both models

    start_step = common.resume_step(accelerator, output_dir, args.resume, config)

    sampler = common.StepSampler(len(dataset), args.batch_size, seed=args.seed, first_micro_step=start_step * args.grad_accum,
                                 rank=accelerator.process_index, world=accelerator.num_processes, overfit=args.overfit_batch)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=args.num_workers))
    columns = ["lr", "samples_per_s", "alpha", "lambda_fm", "fm_fraction", "sd_grad", *LOSSES]
    log = common.CsvLog(output_dir / "log.csv", columns, start_step, enabled=main_process)
    if args.report_to != "none":
        accelerator.init_trackers("distill_one_step", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    progress = common.Progress(args.max_steps, start_step, "stage C one-step", enabled=accelerator.is_local_main_process)

    val_prompts = [source.prompts[i % len(source.prompts)] for i in range(args.num_sample_images)]
    val_noise = torch.randn(len(val_prompts), *settings.latent_shape, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    psi_row = []

    @torch.no_grad()
    def sample_grid(step: int) -> None:
        """Rows: psi (the teacher's few-step sampler) and the student in ONE step (EMA when on), same noise."""
        cond, sf = states_of(val_prompts), teacher.vae.config.scaling_factor
        if not psi_row:
            psi_row.append(teacher.vae.decode(psi(val_noise, cond, torch.Generator().manual_seed(args.seed)).float() / sf).sample)
        model = ema if ema is not None else raw_student
        model.eval()
        with accelerator.autocast():
            z = one_step_generate(model, val_noise, cond, settings.coefficients)
        model.train()
        common.save_image_grid([psi_row[0], teacher.vae.decode(z.float() / sf).sample], output_dir / "samples" / f"step-{step:07d}.png")

    # --- loop: online DM updates, then one student update (Algorithm 1) -----------------------------------
    tick, seen = time.perf_counter(), 0
    for step in range(start_step + 1, args.max_steps + 1):
        phase = phase_at(step, settings)
        gen = common.step_generator(args.seed, 0 if args.overfit_batch else step, accelerator.process_index)
        micro_batches = [training_pairs(batch, states_of(batch["prompt"]), gen, settings, psi)
                         for batch in (next(batches) for _ in range(args.grad_accum))]
        online_losses = []
        if not phase.warmup:  # 1. the online DM learns the student's current distribution (Alg. 1)
            for _ in range(args.online_updates_per_step):
                info = online_update(models, settings, [b.states for b in micro_batches], gen, step=step,
                                     accelerator=accelerator, guard=guard)
                online_losses.append(info.losses["loss_online"])
        # 2. the student: FM for t > alpha*T (every sample in the warm-up), score distillation for t <= alpha*T
        info = student_update(models, settings, micro_batches, phase, gen, step=step, accelerator=accelerator, guard=guard)
        if info.stepped:  # a skipped (non-finite) step moves neither the LR schedule nor the EMA
            lr_schedule.step()
            if ema is not None:
                common.ema_update(ema, raw_student, args.ema_decay, step)
        seen += len(info.fed["t"]) * accelerator.num_processes

        sums = {"loss_fm": 0.0, "loss_sd": 0.0, "sd_grad": 0.0, **info.losses,
                "loss_online": sum(online_losses) / len(online_losses) if online_losses else 0.0}
        progress.update({"loss": sums["loss"], "fm": sums["loss_fm"], "sd": sums["loss_sd"], "online": sums["loss_online"]})
        if step % args.log_every == 0 or step == args.max_steps:
            fm_count, total = int((~info.fed["sd_mask"]).sum()), len(info.fed["sd_mask"])
            values = common.process_mean(accelerator, sums)
            elapsed = time.perf_counter() - tick
            row = {"lr": lr_schedule.get_last_lr()[0], "samples_per_s": seen / max(elapsed, 1e-9), "alpha": phase.alpha,
                   "lambda_fm": phase.lambda_fm, "fm_fraction": fm_count / max(total, 1), **values}
            if fm_count == 0:  # no sample of this step fell in the FM segment: no L_FM value (blank, not 0)
                row["loss_fm"] = ""
            common.log_row(accelerator, log, step, row, args.report_to)
            tick, seen = time.perf_counter(), 0
        if common.end_of_step(accelerator, args, step, output_dir, config, progress, sample_grid, main_process):
            return 0
    progress.close()

    # --- final save ------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main_process:
        sample_grid(args.max_steps)
        common.plot_loss_curve(output_dir / "log.csv", output_dir / "loss_curve.png")
        unet = (ema if ema is not None else raw_student).to("cpu").eval()
        tiny = AutoencoderTiny.from_pretrained(tiny_dir) if tiny_dir else None
        common.save_sdxs_pipeline(output_dir / "final", student_root, unet=unet, tiny_vae=tiny)
        print(f"One-step pipeline saved to {output_dir / 'final'}", file=sys.stderr)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
