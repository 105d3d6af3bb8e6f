#!/usr/bin/env python
"""SDXS stage D (paper Sec. 3.1 and 3.3): image conditions through a ControlNet, in three modes.

Tiny runs on a CPU (seconds each; a tiny random teacher is built in OUT/tiny-teacher):
    python train/distill_controlnet.py --mode teacher  --preset smoke --output_dir outputs/cn-teacher-smoke
    python train/distill_controlnet.py --mode distill  --preset smoke --output_dir outputs/cn-distill-smoke
    python train/distill_controlnet.py --mode one_step --preset smoke --output_dir outputs/cn-one-step-smoke
    python -m sdxs generate --model outputs/cn-one-step-smoke/final --sketch sketch.png --prompt cat --decoder large
The mini chain on the emoji teacher: train/reproduce_mini.py. Paper scale: train/README.md.
Resume a killed run: the same command plus `--resume latest`.

The modes (--mode), each a full run with its own OUTPUT_DIR:
1. teacher: a ControlNet for the multi-step teacher U-Net, initialised from the teacher's encoder
   (ControlNetModel.from_unet), trained with the standard denoising loss on (control, image, caption)
   triplets, the control extracted from each image (--control: sketch, canny or depth). Real users start
   from a pretrained ControlNet instead (--teacher_controlnet of the next modes); this mode exists so the
   whole chain can be reproduced where none is available.
2. distill: the student ControlNet, shaped like the block-removed student U-Net's encoder plus a mid block
   (as the released sketch model: one residual per skip connection + one after the missing mid block),
   its weights the teacher ControlNet's pruned by stage B's recipe. Only it trains, from teacher ControlNet
   + teacher U-Net, with output KD plus feature KD on the U-Net DECODER blocks only (Eqs. 6-8 with
   L_FKD over up blocks): the encoder blocks do not see the ControlNet.
3. one_step: only the student ControlNet trains; the one-step U-Net (stage C) is frozen. Stage C's step
   functions run unchanged with the ControlNets attached: noise eps, target psi(eps) (the teacher's
   few-step sampler) and the control extracted from the TEACHER's image of psi(eps) form a triplet; the
   teacher ControlNet is attached, frozen, to both the online and the offline DM of the score
   distillation (Eqs. 10-12); --noise_reinit re-initialises part of the student's input noise.
Output: OUTPUT_DIR/final, a pipeline folder in the SDXS layout plus controlnet/: the teacher pipeline (1),
the block-removed student (2) or the one-step student (3) with the ControlNet trained here. The `sdxs`
package's sketch mode loads it (`python -m sdxs generate --model OUTPUT_DIR/final --sketch FILE`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from train import common
from train import distill_one_step as stage_c
from train import distill_unet as stage_b

MODES = ("teacher", "distill", "one_step")

# Values: [paper] SDXS; [ControlNet] Zhang et al. 2023; [ours] our choice (the paper gives none for stage D).
_STAGE_D = {
    "smoke": dict(control="sketch", conditioning_scale=1.0, lambda_feat=1.0, noise_reinit=0.0, sample_steps=2, sample_guidance=2.0),
    "mini": dict(control="sketch", conditioning_scale=1.0, lambda_feat=1.0, sample_steps=25, sample_guidance=4.0,
                 noise_reinit=0.5),  # [paper] option, [ours] value; measured: F1 0.560 vs 0.565 without (train/README.md)
    "paper": dict(control="canny", conditioning_scale=1.0, lambda_feat=1.0, noise_reinit=0.0,  # [ours]; [BK-SDM] lambda_F = 1
                  sample_steps=25, sample_guidance=7.5),
}
# Per mode: stage C's presets (the one_step mode runs its step functions) with the mode's own values.
_MODE = {
    "teacher": {
        "smoke": dict(lr=1e-3, max_steps=6, checkpoint_every=3, caption_dropout=0.5),
        "mini": dict(batch_size=16, lr=5e-4, ema_decay=0.0, max_steps=800, checkpoint_every=100, sample_every=100,
                     caption_dropout=0.5, num_samples=0, sampler_steps=25),  # [ControlNet] 50% empty prompts: learn from the control
        "paper": dict(lr=1e-5, max_steps=50_000, caption_dropout=0.5, ema_decay=0.0),  # [ControlNet] lr 1e-5
    },
    "distill": {
        "smoke": dict(lr=1e-3, max_steps=6, checkpoint_every=3, caption_dropout=0.1),
        "mini": dict(batch_size=16, lr=2e-4, ema_decay=0.99, max_steps=400, checkpoint_every=100, sample_every=200,
                     caption_dropout=0.1, num_samples=0, sampler_steps=25),
        "paper": dict(lr=1e-5, max_steps=20_000, caption_dropout=0.1),
    },
    "one_step": {
        "smoke": dict(max_steps=6, checkpoint_every=3, fm_warmup_steps=2, schedule_steps=3, caption_dropout=0.0),
        "mini": dict(batch_size=16, lr=1e-4, ema_decay=0.99, max_steps=500, checkpoint_every=100, sample_every=100,
                     fm_warmup_steps=100, schedule_steps=250, caption_dropout=0.0),  # the mini stage C's 2,048 pairs and psi
        "paper": dict(lr=1e-5, max_steps=10_000, fm_warmup_steps=500, schedule_steps=5000, caption_dropout=0.0),
    },
}
PRESETS = {mode: {p: {**stage_c.PRESETS[p], **_STAGE_D[p], **_MODE[mode][p]} for p in ("smoke", "mini", "paper")} for mode in MODES}
LOSSES = {"teacher": ["loss"], "distill": ["loss", "loss_out", "loss_feat"], "one_step": stage_c.LOSSES}


# --- controls ----------------------------------------------------------------------------------------


def image_controls(images: torch.Tensor, kind: str, depth_estimator=None) -> torch.Tensor:
    """The control images of images (N, 3, H, W) in [-1, 1], each extracted from its own image
    (train/controls.py): (N, 3, H, W) in [0, 1] on the images' device, what a ControlNet reads."""
    from train import controls

    pictures = controls.to_pil_images(images.detach().float().cpu())
    return controls.control_tensor(controls.extract(kind, pictures, depth_estimator=depth_estimator)).to(images.device)


@torch.no_grad()
def triplet_controls(latents: torch.Tensor, vae, kind: str, depth_estimator=None) -> torch.Tensor:
    """The third part of stage D's one-step triplets: controls extracted from the TEACHER's images of the
    targets psi(eps) (latents in U-Net space, decoded by the teacher VAE), one per target."""
    images = vae.decode(latents.float().to(vae.device) / vae.config.scaling_factor).sample
    return image_controls(images.clamp(-1, 1), kind, depth_estimator).to(latents.device)


# --- the ControlNets -----------------------------------------------------------------------------------


class ControlledUNet(torch.nn.Module):
    """A U-Net with a ControlNet attached: the ControlNet reads (x_t, t, text, control) and adds its
    residuals to the U-Net's skip connections and after its mid stage, scaled by `conditioning_scale`.
    Called like a U-Net plus `control` (stage C's unet_eps passes it)."""

    def __init__(self, unet, controlnet, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.conditioning_scale = unet, controlnet, conditioning_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample, timestep, encoder_hidden_states, control):
        if len(control) != len(sample):  # a CFG batch (uncond + cond) reads each sample's control twice
            control = control.repeat(len(sample) // len(control), 1, 1, 1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=control.to(sample.dtype), conditioning_scale=self.conditioning_scale,
                                    return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)


class WithControl:
    """A ControlledUNet with its controls fixed, called like a plain U-Net (for the multi-step samplers)."""

    def __init__(self, controlled: ControlledUNet, control: torch.Tensor):
        self.controlled, self.control, self.dtype = controlled, control, controlled.dtype

    def __call__(self, sample, timestep, encoder_hidden_states):
        return self.controlled(sample, timestep, encoder_hidden_states, self.control)


def conditioning_channels(vae_factor: int, unet_width: int = 320) -> tuple[int, ...]:
    """The ControlNet conditioning embedding's channels for controls `vae_factor` times the latent side:
    diffusers' default (16, 32, 96, 256) halves three times (SD, f=8); one stage fewer per halving fewer.
    No stage is wider than the U-Net's first block (`unet_width`, SD's 320), which its output feeds: for
    the emoji U-Net (64) at 128 px, (16, 32, 64, 64) costs 0.34 GFLOP where the default costs 0.62."""
    stages = vae_factor.bit_length()  # 8 -> 4 stages, 4 -> 3
    if 2 ** (stages - 1) != vae_factor or stages > 4:
        raise ValueError(f"A VAE factor of {vae_factor} is not supported (1, 2, 4 or 8 pixels per latent).")
    return tuple(min(width, unet_width) for width in (16, 32, 96, 256)[:stages])


def teacher_controlnet_from_unet(unet, vae_factor: int):
    """Mode teacher's start: a ControlNet initialised from the teacher U-Net's encoder (conv_in, time
    embedding, down blocks and mid block copied), zero-initialised output convolutions [ControlNet]."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(
        vae_factor, unet.config.block_out_channels[0]))


def load_controlnet(model: str, flag: str):
    """A ControlNetModel from a pipeline folder with controlnet/ (this script's final/), a bare ControlNet
    folder, or a hub id."""
    from diffusers import ControlNetModel

    root = common.resolve_model(model, flag)
    folder = root / "controlnet" if (root / "controlnet" / "config.json").is_file() else root
    if not (folder / "config.json").is_file() or json.loads((folder / "config.json").read_text()).get("_class_name") != "ControlNetModel":
        raise SystemExit(f"error: {flag} {model}: no ControlNet there (expected a ControlNetModel folder, or a pipeline "
                         f"folder with controlnet/ such as this script's OUTPUT_DIR/final).")
    return ControlNetModel.from_pretrained(folder)


def check_controlnet_fits(controlnet, unet, vae_factor: int, what: str) -> None:
    """Refuse a ControlNet that cannot drive `unet`: other down stages, or controls at another scale."""
    keys = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "in_channels")
    wrong = [k for k in keys if json.dumps(controlnet.config.get(k)) != json.dumps(unet.config.get(k))]
    factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if wrong or factor != vae_factor:
        raise SystemExit(f"error: {what} does not fit its U-Net: "
                         + (f"{', '.join(wrong)} differ" if wrong else f"it reads controls {factor}x the latent side, the VAE makes {vae_factor}x")
                         + ". Use a ControlNet made for this U-Net (--mode teacher makes one).")


def controlnet_residual_names(config) -> list[str]:
    """The block output behind each ControlNet residual, in order: conv_in, then per down stage its
    resnets and (all but the last stage) its downsampler. The U-Net's skip connections are the same list."""
    n = len(config["down_block_types"])
    layers = stage_b._per_stage(config["layers_per_block"], n)
    names = ["conv_in"]
    for i in range(n):
        names += [f"down_blocks.{i}.resnets.{k}" for k in range(layers[i])]
        names += [f"down_blocks.{i}.downsamplers.0"] if i < n - 1 else []
    return names


def student_controlnet_config(student_unet_config, teacher_controlnet_config) -> dict:
    """The student ControlNet: the student U-Net's encoder (its down stages, no dropped block) plus a mid
    block, as the released sketch model (6 skip residuals + 1 after the missing mid block at SD scale),
    reading controls like the teacher ControlNet."""
    import inspect

    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in dict(student_unet_config).items() if k in accepted and not k.startswith("_")}
    config.update(mid_block_type="UNetMidBlock2DCrossAttn",
                  conditioning_embedding_out_channels=tuple(teacher_controlnet_config.conditioning_embedding_out_channels),
                  controlnet_conditioning_channel_order=teacher_controlnet_config.controlnet_conditioning_channel_order)
    return config


def plan_student_controlnet(teacher_unet_config, teacher_shapes: dict, student_config, student_shapes: dict) -> dict[str, str]:
    """student ControlNet key -> teacher ControlNet key: the trunk pruned by stage B's block_map (the same
    blocks the student U-Net kept), each residual's output convolution from the teacher residual of the
    same block, conditioning embedding and mid block as they are. Every student weight must be mapped to
    a teacher weight of its shape (ValueError otherwise)."""
    blocks = stage_b.block_map(teacher_unet_config)
    teacher_residuals = controlnet_residual_names(teacher_unet_config)
    residuals = {f"controlnet_down_blocks.{j}": f"controlnet_down_blocks.{teacher_residuals.index(blocks.get(name, name))}"
                 for j, name in enumerate(controlnet_residual_names(student_config))}
    plan, unmatched = {}, []
    for key, shape in student_shapes.items():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            source = f"{blocks['.'.join(parts[:4])]}.{'.'.join(parts[4:])}"
        elif parts[0] == "controlnet_down_blocks":
            source = f"{residuals['.'.join(parts[:2])]}.{'.'.join(parts[2:])}"
        else:
            source = key
        if teacher_shapes.get(source) != shape:
            unmatched.append(f"{key} <- {source}")
        plan[key] = source
    if unmatched:
        raise ValueError(f"{len(unmatched)} student ControlNet weight(s) have no teacher weight of their shape, e.g. "
                         f"{'; '.join(unmatched[:3])}. The teacher ControlNet must be made for the teacher U-Net.")
    return plan


def student_controlnet_from_teacher(teacher_controlnet, teacher_unet_config, student_unet):
    """Mode distill's start: the student ControlNet (student_controlnet_config) with the teacher
    ControlNet's weights (plan_student_controlnet); the strict load asserts every weight is set."""
    from diffusers import ControlNetModel

    config = student_controlnet_config(student_unet.config, teacher_controlnet.config)
    student = ControlNetModel(**config)
    teacher_state = teacher_controlnet.state_dict()
    plan = plan_student_controlnet(teacher_unet_config, {k: v.shape for k, v in teacher_state.items()}, config,
                                   {k: v.shape for k, v in student.state_dict().items()})
    student.load_state_dict({k: teacher_state[v] for k, v in plan.items()}, strict=True)
    return student


def check_stage_b_student(student_unet, teacher_unet, flag: str) -> None:
    """Mode distill pairs the student's up blocks with the teacher's by stage B's recipe: refuse a U-Net
    that is not the recipe's student of this teacher."""
    expected = stage_b.derive_student_config(teacher_unet.config)
    keys = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block")
    if any(json.dumps(student_unet.config.get(k)) != json.dumps(expected.get(k)) for k in keys):
        raise SystemExit(f"error: {flag}: its U-Net is not stage B's student of this teacher (train/distill_unet.py "
                         "makes it); mode distill pairs their decoder blocks by that recipe.")


# --- losses and steps --------------------------------------------------------------------------------


def decoder_pairs(teacher_unet_config) -> list[tuple[str, str, str]]:
    """Feature KD pairs of stage D: stage B's block pairs restricted to the U-Net DECODER (up) blocks, the
    only blocks a ControlNet's residuals reach (they enter through the skip connections)."""
    return [pair for pair in stage_b.feature_pairs(teacher_unet_config) if pair[0].startswith("up_blocks.")]


class DecoderHooks:
    """Forward hooks reading the decoder_pairs' block outputs from student and teacher U-Nets."""

    def __init__(self, student_unet, teacher_unet):
        self.pairs = decoder_pairs(teacher_unet.config)
        self.student = stage_b.BlockOutputs(student_unet, [(s, "out") for s, _, _ in self.pairs])
        self.teacher = stage_b.BlockOutputs(teacher_unet, [(t, take) for _, t, take in self.pairs])


def controlnet_denoising_step(model: ControlledUNet, x_t, t, states, control, noise) -> dict[str, torch.Tensor]:
    """Mode teacher: the standard denoising loss ||eps(x_t, t, c, control) - eps||^2 of the teacher U-Net
    with the trained ControlNet attached [ControlNet]."""
    return {"loss": F.mse_loss(model(x_t, t, states, control).sample.float(), noise.float())}


def controlnet_kd_step(student: ControlledUNet, teacher: ControlledUNet, hooks: DecoderHooks, x_t, t, states, control, *,
                       lambda_feat: float) -> dict[str, torch.Tensor]:
    """Mode distill: L = L_OKD + lambda_F * L_FKD (Eqs. 6-8) between the student U-Net + student ControlNet
    and the teacher U-Net + teacher ControlNet on the same x_t, t, text and control; L_FKD over the decoder
    blocks only. The teacher side runs without gradients; of the student only the ControlNet trains."""
    with torch.no_grad(), hooks.teacher.capture():
        teacher_eps = teacher(x_t.to(teacher.dtype), t, states, control).sample
    with hooks.student.capture():
        student_eps = student(x_t, t, states, control).sample
    loss_out = stage_b.output_kd_loss(student_eps, teacher_eps)  # Eq. 6
    loss_feat = stage_b.feature_kd_loss(hooks.student.features, hooks.teacher.features, hooks.pairs)  # Eq. 7, decoder only
    return {"loss": loss_out + lambda_feat * loss_feat, "loss_out": loss_out, "loss_feat": loss_feat}


def controlled_inputs(batch: dict, gen: torch.Generator, *, noise_scheduler, tokenizer, text_encoder, caption_dropout: float,
                      kind: str, depth_estimator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """What one micro-batch of modes teacher and distill feeds its step: stage B's (x_t, t, text states,
    noise) of the cached latents, and each sample's control extracted from its OWN cached image."""
    x_t, t, states, noise = stage_b.kd_inputs(batch, gen, noise_scheduler=noise_scheduler,
                                              encode=partial(common.encode_prompts, tokenizer, text_encoder),
                                              caption_dropout=caption_dropout, device=device, return_noise=True)
    return x_t, t, states, noise, image_controls(batch["image"].to(device), kind, depth_estimator)


def reinit_noise(noise: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """--noise_reinit: the student's input noise partly re-drawn, sqrt(1 - r) eps + sqrt(r) eps' (still unit
    variance) so that the target's layout must come from the control, not from the noise alone [ours: the
    paper names the option without its form]."""
    if fraction <= 0:
        return noise
    fresh = torch.randn(noise.shape, generator=gen).to(noise.device)
    return (1 - fraction) ** 0.5 * noise + fraction**0.5 * fresh


def one_step_micro_batch(batch: dict, states: torch.Tensor, gen: torch.Generator, s: stage_c.StepSettings, psi, vae,
                         kind: str, depth_estimator, noise_reinit: float) -> stage_c.MicroBatch:
    """Stage C's training pair (eps, psi(eps)) with its control extracted from the teacher's image of
    psi(eps): the triplet of mode one_step; the student's copy of eps partly re-drawn (--noise_reinit)."""
    pair = stage_c.training_pairs(batch, states, gen, s, psi)
    control = triplet_controls(pair.target, vae, kind, depth_estimator)
    return stage_c.MicroBatch(reinit_noise(pair.noise, noise_reinit, gen), pair.target, pair.states, control)


# --- arguments ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = stage_c.build_parser()  # common flags + stage C's (mode one_step runs its steps)
    parser.prog, parser.description = "train/distill_controlnet.py", __doc__
    retitle = {
        "student": "mode distill: stage B's OUTPUT_DIR/final (the block-removed multi-step student); mode one_step: stage C's "
                   "OUTPUT_DIR/final (the one-step student). With --preset smoke and none given, stage B's recipe is "
                   "applied to the teacher's U-Net",
        "latents": "modes teacher and distill: 'encode' the --image_folder's images (default) or 'sample' them from the "
                   "prompts; the controls are extracted from the images",
        "lr": "AdamW learning rate of the ControlNet being trained (preset)",
        "ema_decay": "EMA of the trained ControlNet's weights, 0 = off; the final ControlNet is the EMA when on (preset)",
        "tiny_decoder": "an AutoencoderTiny folder to ship as vae/ in the final pipeline (default: the base folder's decoders)",
    }
    for action in parser._actions:
        if action.dest in retitle:
            action.help = retitle[action.dest]
    group = parser.add_argument_group("stage D: ControlNet")
    group.add_argument("--mode", required=True, choices=MODES,
                       help="teacher: train a ControlNet for the teacher; distill: distil it into the student ControlNet; "
                            "one_step: train the student ControlNet with the one-step U-Net")
    group.add_argument("--control", choices=["sketch", "canny", "depth"],
                       help="the control extracted from each image (train/controls.py) (preset)")
    group.add_argument("--depth_estimator", default=None,
                       help="--control depth: a local transformers depth-estimation model folder")
    group.add_argument("--teacher_controlnet", default=None,
                       help="modes distill and one_step: the teacher's ControlNet (mode teacher's OUTPUT_DIR/final, a bare "
                            "ControlNet folder or hub id). With --preset smoke and none given, an untrained one")
    group.add_argument("--student_controlnet", default=None,
                       help="mode one_step: the student ControlNet to start from (mode distill's OUTPUT_DIR/final). With none "
                            "given it is derived from --teacher_controlnet as mode distill starts")
    group.add_argument("--conditioning_scale", type=float, help="ControlNet residual scale while training (preset)")
    group.add_argument("--caption_dropout", type=float, help="probability of the empty prompt instead of the caption (preset)")
    group.add_argument("--lambda_feat", type=float, help="mode distill: lambda_F of the decoder feature KD (Eq. 8) (preset)")
    group.add_argument("--noise_reinit", type=float,
                       help="mode one_step: share r of the student's input noise re-drawn, sqrt(1-r) eps + sqrt(r) eps' (preset)")
    group.add_argument("--sample_steps", type=int, help="sampler steps of the multi-step sample grids (preset)")
    group.add_argument("--sample_guidance", type=float, help="CFG scale of the multi-step sample grids (preset)")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    mode_parser = argparse.ArgumentParser(add_help=False)
    mode_parser.add_argument("--mode", choices=MODES)
    mode = mode_parser.parse_known_args(argv)[0].mode
    parser = build_parser()
    if mode is None:  # --help, or the missing --mode: argparse says so
        return parser.parse_args(argv)
    args = common.parse_args(parser, PRESETS[mode], argv)
    if mode == "one_step":
        stage_c.validate(parser, args)
    if args.control == "depth" and not args.depth_estimator:
        parser.error("--control depth needs --depth_estimator: a local transformers depth-estimation model folder.")
    if args.preset != "smoke":
        if mode != "teacher" and not args.teacher_controlnet:
            parser.error(f"--mode {mode} needs --teacher_controlnet: mode teacher's OUTPUT_DIR/final or a pretrained ControlNet.")
        if mode != "teacher" and not args.student:
            parser.error(f"--mode {mode} needs --student (see --help).")
    if not 0 <= args.noise_reinit <= 1:
        parser.error(f"--noise_reinit must be between 0 and 1; got {args.noise_reinit}.")
    if not 0 <= args.caption_dropout <= 1:
        parser.error(f"--caption_dropout must be between 0 and 1; got {args.caption_dropout}.")
    return args


# --- training ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = args.mode
    output_dir, accelerator, config = common.start_run(args, grad_accum=1 if mode == "one_step" else None)
    main_process, device = accelerator.is_main_process, accelerator.device
    from diffusers import AutoencoderTiny, DDPMScheduler

    # --- teacher, ControlNets, U-Nets, data --------------------------------------------------------------
    tiny_dir = common.resolve_model(args.tiny_decoder, "--tiny_decoder", subfolders_with_weights=("",)) if args.tiny_decoder else None
    teacher_id = common.resolve_teacher(args.teacher, args.preset, output_dir, accelerator)
    if (common.resolve_model(teacher_id, "--teacher") / "text_encoder_2").is_dir():  # before loading GBs of it
        raise SystemExit(f"error: --teacher {teacher_id} is an SDXL-family pipeline; the ControlNet stage trains SD-1.x/SD-2.x "
                         "teachers only (SDXS-1024 has no sketch ControlNet: train/README.md, \"SDXS-1024\"). Use an SD-style teacher.")
    teacher = common.load_teacher(teacher_id, device, torch.float32)
    factor = common.vae_factor(teacher.vae.config)
    depth_estimator = None
    if args.control == "depth":
        from train.controls import load_depth_estimator

        depth_estimator = load_depth_estimator(args.depth_estimator)

    if args.teacher_controlnet:
        teacher_cn = load_controlnet(args.teacher_controlnet, "--teacher_controlnet")
    else:  # mode teacher's start, or under --preset smoke an untrained one
        teacher_cn = teacher_controlnet_from_unet(teacher.unet, factor)
    check_controlnet_fits(teacher_cn, teacher.unet, factor, "--teacher_controlnet" if args.teacher_controlnet else "the ControlNet")
    teacher_cn.to(device)
    base_root = teacher.root
    if mode == "teacher":
        trained_cn, frozen_unet = teacher_cn, teacher.unet
    else:
        student_unet, base_root = stage_c.load_student(args.student, teacher, device)
        student_unet.requires_grad_(False).eval()
        if mode == "distill":
            check_stage_b_student(student_unet, teacher.unet, "--student")
        if args.student_controlnet:
            trained_cn = load_controlnet(args.student_controlnet, "--student_controlnet")
        else:
            trained_cn = student_controlnet_from_teacher(teacher_cn, teacher.unet.config, student_unet)
        check_controlnet_fits(trained_cn, student_unet, factor, "--student_controlnet" if args.student_controlnet else "the student ControlNet")
        frozen_unet = student_unet
        teacher_cn.requires_grad_(False).eval()
    trained_cn.to(device).train().requires_grad_(True)
    dtype = common.weight_dtype(args.mixed_precision)
    teacher.unet.to(dtype)
    teacher.text_encoder.to(dtype)
    if main_process:
        print(f"Trained ControlNet: {sum(p.numel() for p in trained_cn.parameters()):,} parameters, "
              f"{len(trained_cn.controlnet_down_blocks) + 1} residuals; controls: {args.control}, "
              f"{args.resolution}x{args.resolution}.", file=sys.stderr)

    source = common.read_sources(args.prompts, args.image_folder, args.caption_column, args.latents if mode != "one_step" else None,
                                 args.num_samples, common.SMOKE_PROMPTS if common.is_smoke(args.preset) else None,
                                 max_bad_fraction=args.max_bad_fraction)
    if main_process and source.report is not None:
        common.write_data_report(output_dir, {"data": source.report})
    uncond = common.encode_prompts(teacher.tokenizer, teacher.text_encoder, [""])
    if mode == "one_step":
        psi = stage_c.Psi(teacher.unet, args.psi_scheduler, teacher.scheduler_config, args.sampler_steps, args.guidance_scale, uncond)
        dataset = stage_c.pair_dataset(args, psi, teacher.root, teacher, source, output_dir, accelerator)
        settings = stage_c.step_settings(args, teacher.scheduler_config, uncond=uncond, device=device, vae_factor=factor)
    else:
        cache = common.cache_folder(args.cache_dir or output_dir / "cache", teacher.root, source, resolution=args.resolution,
                                    sampler_steps=args.sampler_steps, guidance_scale=args.guidance_scale, with_images=True, seed=args.seed)
        common.build_latent_cache(teacher, source, cache, resolution=args.resolution, sampler_steps=args.sampler_steps,
                                  guidance_scale=args.guidance_scale, with_images=True, seed=args.seed,
                                  batch_size=args.cache_batch_size, accelerator=accelerator)
        dataset = common.CachedSamples(cache)
        noise_scheduler = DDPMScheduler.from_config(teacher.scheduler_config)

    def states_of(prompts):
        return common.encode_prompts(teacher.tokenizer, teacher.text_encoder, prompts)

    # --- models, optimizers, accelerate --------------------------------------------------------------------
    trained = ControlledUNet(frozen_unet, trained_cn, args.conditioning_scale)  # only trained_cn has gradients
    teacher_side = ControlledUNet(teacher.unet, teacher_cn, args.conditioning_scale)
    ema = common.make_ema(trained_cn, args.ema_decay)
    optimizer = torch.optim.AdamW(trained_cn.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_schedule = common.warmup_then_constant(optimizer, args.lr_warmup_steps)
    if mode == "one_step":
        online = ControlledUNet(copy.deepcopy(teacher.unet).float().requires_grad_(True).train(), teacher_cn, args.conditioning_scale)
        online_optimizer = torch.optim.AdamW(online.unet.parameters(), lr=args.online_lr, weight_decay=args.weight_decay)
        trained, online, optimizer, online_optimizer = accelerator.prepare(trained, online, optimizer, online_optimizer)
        encoder = stage_c.load_fm_encoder(args.fm_encoder, args.fm_encoder_path, teacher_unet=teacher.unet, vae=teacher.vae,
                                          layers=stage_c.parse_list(args.fm_layers, int), timestep=args.fm_timestep, device=device)
        models = stage_c.Models(trained, online, teacher_side, encoder, optimizer, online_optimizer)
    else:
        trained, optimizer = accelerator.prepare(trained, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
        ema.to(device)
    raw_cn = accelerator.unwrap_model(trained).controlnet
    hooks = DecoderHooks(frozen_unet, teacher.unet) if mode == "distill" else None
    guard = common.FiniteGuard(args.skip_nonfinite, output_dir, **({"lr_flag": "--lr or --online_lr"} if mode == "one_step" else {}))

    start_step = common.resume_step(accelerator, output_dir, args.resume, config)

    micro_per_step = args.grad_accum
    if mode == "one_step":
        sampler = common.StepSampler(len(dataset), args.batch_size, seed=args.seed, first_micro_step=start_step * micro_per_step,
                                     rank=accelerator.process_index, world=accelerator.num_processes, overfit=args.overfit_batch)
        batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=stage_c.collate_pairs,
                                                   num_workers=args.num_workers))
    else:
        batches = common.make_loader(dataset, args.batch_size, seed=args.seed, first_micro_step=start_step * micro_per_step,
                                     accelerator=accelerator, num_workers=args.num_workers, overfit=args.overfit_batch)
    extra = ["alpha", "lambda_fm", "fm_fraction", "sd_grad"] if mode == "one_step" else []
    log = common.CsvLog(output_dir / "log.csv", ["lr", "samples_per_s", *extra, *LOSSES[mode]], start_step, enabled=main_process)
    if args.report_to != "none":
        accelerator.init_trackers("distill_controlnet", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    progress = common.Progress(args.max_steps, start_step, f"stage D {mode}", enabled=accelerator.is_local_main_process)

    # --- sample grid: controls from the first samples' images, same noise every time --------------------------
    side = args.resolution // factor
    n_val = min(args.num_sample_images, len(dataset))
    val_items = [dataset[i] for i in range(n_val)]
    val_prompts = [item["prompt"] for item in val_items]
    if mode == "one_step":
        val_targets = torch.stack([item["latents"] for item in val_items]).to(device)
        val_control = triplet_controls(val_targets, teacher.vae, args.control, depth_estimator)
    else:
        val_control = image_controls(torch.stack([item["image"] for item in val_items]).to(device), args.control, depth_estimator)
    val_noise = torch.randn(n_val, 4, side, side, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    fixed_rows = []

    @torch.no_grad()
    def sample_grid(step: int) -> None:
        """Rows: the controls; the teacher with its ControlNet (multi-step + CFG); the model trained here with
        the trained ControlNet (EMA when on): multi-step for modes teacher/distill, ONE step for one_step."""
        cond, sf = states_of(val_prompts), teacher.vae.config.scaling_factor
        uncond_n = uncond.expand(n_val, -1, -1)

        def decode(latents):
            return teacher.vae.decode(latents.float() / sf).sample

        def multi_step(controlled):
            return decode(common.sample_latents(WithControl(controlled, val_control), teacher.scheduler_config, cond, uncond_n,
                                                val_noise, args.sample_steps, args.sample_guidance))

        if not fixed_rows:
            fixed_rows.append(val_control * 2 - 1)
            if mode != "teacher":
                fixed_rows.append(multi_step(teacher_side))
        cn = ema if ema is not None else raw_cn
        was_training = cn.training
        cn.eval()
        current = ControlledUNet(frozen_unet, cn, args.conditioning_scale)
        if mode == "one_step":
            row = decode(stage_c.one_step_generate(current, val_noise, cond, settings.coefficients, val_control))
        else:
            row = multi_step(current)
        cn.train(was_training)
        common.save_image_grid([*fixed_rows, row], output_dir / "samples" / f"step-{step:07d}.png")

    # --- loop ----------------------------------------------------------------------------------------------
    tick, seen = time.perf_counter(), 0
    for step in range(start_step + 1, args.max_steps + 1):
        gen = common.step_generator(args.seed, 0 if args.overfit_batch else step, accelerator.process_index)
        if mode == "one_step":
            phase = stage_c.phase_at(step, settings)
            micro = [one_step_micro_batch(batch, states_of(batch["prompt"]), gen, settings, psi, teacher.vae, args.control,
                                          depth_estimator, args.noise_reinit)
                     for batch in (next(batches) for _ in range(micro_per_step))]
            online_losses = []
            if not phase.warmup:  # 1. the online DM (with the frozen teacher ControlNet) learns the student's samples
                for _ in range(args.online_updates_per_step):
                    info = stage_c.online_update(models, settings, [b.states for b in micro], gen, step=step, accelerator=accelerator,
                                                 guard=guard, micro_controls=[b.control for b in micro])
                    online_losses.append(info.losses["loss_online"])
            # 2. the student ControlNet: FM for t > alpha*T, score distillation for t <= alpha*T (stage C's step)
            info = stage_c.student_update(models, settings, micro, phase, gen, step=step, accelerator=accelerator, guard=guard)
            updated, n_seen = info.stepped, len(info.fed["t"])
            sums = {"loss_fm": 0.0, "loss_sd": 0.0, "sd_grad": 0.0, **info.losses,
                    "loss_online": sum(online_losses) / len(online_losses) if online_losses else 0.0}
            row_extra = {"alpha": phase.alpha, "lambda_fm": phase.lambda_fm,
                         "fm_fraction": float((~info.fed["sd_mask"]).float().mean())}
        else:
            sums, updated, n_seen, row_extra = dict.fromkeys(LOSSES[mode], 0.0), False, 0, {}
            for k in range(micro_per_step):
                micro_gen = common.step_generator(args.seed, 0 if args.overfit_batch else step * micro_per_step + k, accelerator.process_index)
                x_t, t, states, noise, control = controlled_inputs(
                    next(batches), micro_gen, noise_scheduler=noise_scheduler, tokenizer=teacher.tokenizer,
                    text_encoder=teacher.text_encoder, caption_dropout=args.caption_dropout, kind=args.control,
                    depth_estimator=depth_estimator, device=device)
                with accelerator.accumulate(trained):
                    if mode == "teacher":
                        losses = controlnet_denoising_step(trained, x_t, t, states, control, noise)
                    else:
                        losses = controlnet_kd_step(trained, teacher_side, hooks, x_t, t, states, control, lambda_feat=args.lambda_feat)
                    accelerator.backward(losses["loss"])
                    for key in LOSSES[mode]:
                        sums[key] += losses[key].detach().float().item() / micro_per_step
                    if accelerator.sync_gradients:
                        updated = common.guarded_update(accelerator, optimizer, trained_cn.parameters(), guard, step, sums,
                                                        args.max_grad_norm, "ControlNet")
                n_seen += len(x_t)
        if updated:  # a skipped (non-finite) step moves neither the LR schedule nor the EMA
            lr_schedule.step()
            if ema is not None:
                common.ema_update(ema, raw_cn, args.ema_decay, step)
        seen += n_seen * accelerator.num_processes

        progress.update({k.replace("loss_", ""): sums[k] for k in LOSSES[mode]})
        if step % args.log_every == 0 or step == args.max_steps:
            values = common.process_mean(accelerator, sums)
            elapsed = time.perf_counter() - tick
            row = {"lr": lr_schedule.get_last_lr()[0], "samples_per_s": seen / max(elapsed, 1e-9), **row_extra, **values}
            if row.get("fm_fraction") == 0:  # as stage C: no sample in the FM segment, no L_FM value (blank, not 0)
                row["loss_fm"] = ""
            common.log_row(accelerator, log, step, row, args.report_to)
            tick, seen = time.perf_counter(), 0
        if common.end_of_step(accelerator, args, step, output_dir, config, progress, sample_grid, main_process):
            return 0
    progress.close()

    # --- final save ----------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main_process:
        sample_grid(args.max_steps)
        common.plot_loss_curve(output_dir / "log.csv", output_dir / "loss_curve.png")
        controlnet = copy.deepcopy(ema if ema is not None else raw_cn).to("cpu").eval()
        unet = None if mode == "teacher" or args.student else frozen_unet.to("cpu")  # smoke: the derived student
        tiny = AutoencoderTiny.from_pretrained(tiny_dir) if tiny_dir else None
        common.save_sdxs_pipeline(output_dir / "final", base_root, unet=unet, tiny_vae=tiny, controlnet=controlnet)
        print(f"Pipeline with the {mode} ControlNet saved to {output_dir / 'final'}", file=sys.stderr)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    from sdxs.loading import ModelNotFoundError

    try:
        sys.exit(main())
    except ModelNotFoundError as err:
        sys.exit(f"error: {err}")
