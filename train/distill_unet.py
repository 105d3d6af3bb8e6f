#!/usr/bin/env python
"""SDXS stage B (paper Sec. 3.1, Eqs. 6-8): remove U-Net blocks and distil the teacher into the student.

Tiny run on a CPU (seconds; builds a tiny random SD-style teacher in OUT/tiny-teacher):
    python train/distill_unet.py --preset smoke --output_dir outputs/unet-smoke
    python -m sdxs generate --model outputs/unet-smoke/final --decoder large --prompt cat --out cat.png
The same on a tiny SDXL-shaped teacher (OUT/tiny-sdxl-teacher), SDXS-1024's path:
    python train/distill_unet.py --preset smoke-sdxl --output_dir outputs/unet-smoke-sdxl
Paper scale, 8 GPUs (see train/README.md):
    accelerate launch --multi_gpu --num_processes 8 train/distill_unet.py --preset paper \\
        --teacher Lykon/dreamshaper-8 --prompts prompts.txt --output_dir outputs/unet
Resume a killed run: the same command plus `--resume latest`.

What it does:
1. Student architecture (derive_student_config), the SDXS recipe applied to an SD-1.x/SD-2.x-style
   teacher config (others are refused up front: check_teacher_unet): drop the mid block,
   the last down stage and the first up stage, the transformers of the highest-resolution stage, and
   one resnet per stage. SD-1.5 gives exactly the SDXS-512-DreamShaper
   U-Net (315,746,244 parameters), SD-2.1-base 318.7 M (paper Table 3: 319 M). SDXL-style teachers
   (text_time) keep every stage: no mid block, one resnet fewer per stage, the first half of every kept
   transformer's layers; SDXL base gives exactly SDXS-1024's U-Net (752,807,364). An SDXL teacher's
   text conditions come from both its text encoders, with the pooled embedding and the size ids of an
   uncropped RESOLUTION^2 image (common.PromptEncoder), in the cache, the KD steps and the sample grids.
2. Student weights (init_student_from_teacher): every kept block is copied from the teacher with an
   explicit mapping (block_map), BK-SDM style: student down stage i <- teacher down stage i, keeping
   its first resnets/transformers; student up stage j <- teacher up stage j+1, dropping the
   second-to-last resnet/transformer, so e.g. student up_blocks.0.resnets.1 <- teacher
   up_blocks.1.resnets.2; that keeps every skip connection's meaning and shape. Every student tensor
   is copied (a teacher that does not fit is refused); the copied and dropped key sets are asserted.
3. Loss, no denoising (task) loss: L_KD = L_OKD + lambda_F * L_FKD (Eq. 8): output KD, MSE between
   student and teacher eps on the same x_t, t (Eq. 6), plus feature KD, MSE at the output of every
   down/up block, matched by the mapping and read with forward hooks (Eq. 7). x_t: cached teacher
   latents (from the teacher's sampler on prompts, or encoded images) noised at uniform t.
Output: OUTPUT_DIR/final, a pipeline folder in the released SDXS layout (student unet/, the teacher's
text encoder and tokenizer, DEIS scheduler; vae/ = --tiny_decoder with the teacher's AutoencoderKL in
vae_large/, or vae/ = the teacher's AutoencoderKL without one). Stage C (one-step training) starts
from it; until then the student is a multi-step model, so one-step images from it are blurry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from train import common

# Values: [paper] from the SDXS paper; [BK-SDM] from BK-SDM (Kim et al. 2023), which SDXS follows for
# this stage; [ours] our choice (the paper gives none). See train/README.md.
PRESETS = {
    "smoke": dict(
        **common.SMOKE_RUN, lr=1e-3, max_steps=30, checkpoint_every=10,
        lambda_feat=1.0, caption_dropout=0.1, sample_steps=2, sample_guidance=2.0,
    ),
    "mini": dict(  # the emoji teacher (train/reproduce_mini.py); [ours] throughout
        **common.MINI_RUN, batch_size=64, lr=2e-4, ema_decay=0.999, max_steps=800, checkpoint_every=200, sample_every=400,
        lambda_feat=1.0, caption_dropout=0.1, sample_steps=25, sample_guidance=4.0,  # the teacher's own CFG scale
    ),
    "paper": dict(
        resolution=512,  # [paper] SDXS-512
        num_samples=0,  # all prompts given
        sampler_steps=25, guidance_scale=7.5,  # [ours] teacher sampler for the latents
        batch_size=32, grad_accum=4,  # [paper] global batch 1024 (of 1024-2048) = 32 x 4 x 8 GPUs
        lr=5e-5, lr_warmup_steps=500,  # [BK-SDM] lr 5e-5; [ours] warm-up
        mixed_precision="bf16", gradient_checkpointing=True, num_threads=0, ema_decay=0.999,  # [ours]
        max_steps=20_000, checkpoint_every=1000, keep_checkpoints=3, log_every=10, sample_every=500,  # [ours]
        lambda_feat=1.0,  # [BK-SDM] lambda_OutKD = lambda_FeatKD = 1
        caption_dropout=0.1,  # [ours] as in SD training, keeps the unconditional branch alive for CFG
        sample_steps=25, sample_guidance=7.5,  # [ours] sample grids
    ),
}
PRESETS["smoke-sdxl"] = PRESETS["smoke"]  # the same run; resolve_teacher builds the tiny SDXL-shaped teacher
PRESETS["paper-1024"] = dict(  # SDXS-1024 from SDXL base (--teacher stabilityai/stable-diffusion-xl-base-1.0)
    PRESETS["paper"],
    resolution=1024,  # [paper] SDXS-1024
    guidance_scale=5.0, sample_guidance=5.0,  # [ours] SDXL base's own CFG scale
    batch_size=8, grad_accum=16,  # [ours] the same global batch 1024 = 8 x 16 x 8 GPUs, 1024^2 latents are 4x larger
)
LOSSES = ["loss", "loss_out", "loss_feat"]

# --- the SDXS recipe (student config, weight mapping, feature pairs) -------------------------------

# Per-stage settings listed in down-block order; the student keeps the first n-1 stages' values.
_PER_STAGE = ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "num_attention_heads",
              "only_cross_attention", "transformer_layers_per_block", "cross_attention_dim")


SUPPORTED_TEACHERS = (
    "an SD-1.x/SD-2.x-style UNet2DConditionModel (e.g. SD-1.5 / DreamShaper-8, SD-2.1-base): at least 3 down stages of "
    "CrossAttnDownBlock2D/DownBlock2D and as many up stages of CrossAttnUpBlock2D/UpBlock2D, one transformer layer per attention block, and no class or added (e.g. SDXL's text_time) embeddings; "
    "or an SDXL-style one (SDXL base -> SDXS-1024): the same block types, addition_embed_type 'text_time', one transformer depth per stage "
    "(transformer_layers_per_block, e.g. [1, 2, 10]) and no class embeddings")
_DOWN_BLOCKS, _UP_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")
_EXTRA_EMBEDDINGS = ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type")


def is_sdxl_teacher(teacher_config: dict) -> bool:
    """An SDXL-style teacher: SDXL's micro-conditioning (pooled text embedding + size/crop ids) enters the
    U-Net through addition_embed_type "text_time"; its recipe is the SDXL branch (no stage removed)."""
    return dict(teacher_config).get("addition_embed_type") == "text_time"


def unsupported_teacher_features(teacher_config: dict) -> list[str]:
    """What in a teacher U-Net config the recipe does not handle (empty for SD-1.x/SD-2.x-style and
    SDXL-style configs): the block mapping, the feature pairs and the weight copy assume exactly SUPPORTED_TEACHERS."""
    config = dict(teacher_config)
    problems = []
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"_class_name {config['_class_name']}")
    down, up = list(config.get("down_block_types") or ()), list(config.get("up_block_types") or ())
    if len(down) < (2 if is_sdxl_teacher(config) else 3) or len(up) != len(down):
        problems.append(f"{len(down)} down and {len(up)} up stages")
    others = [b for b in down if b not in _DOWN_BLOCKS] + [b for b in up if b not in _UP_BLOCKS]
    if others:
        problems.append(f"block types {', '.join(dict.fromkeys(others))}")
    if down and min(_per_stage(config.get("layers_per_block", 2), len(down))) < 1:
        problems.append(f"layers_per_block {config.get('layers_per_block')}")
    return problems + (_unsupported_sdxl_features(config) if is_sdxl_teacher(config) else _unsupported_sd_features(config))


def _unsupported_sd_features(config: dict) -> list[str]:
    problems = []
    for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        value = config.get(key)
        if value is not None and any(n != 1 for n in _flat(value)):
            problems.append(f"{key} {list(value) if isinstance(value, tuple) else value}")
    return problems + [f"{key} {config[key]!r}" for key in _EXTRA_EMBEDDINGS if config.get(key) is not None]


def _unsupported_sdxl_features(config: dict) -> list[str]:
    """The SDXL branch halves one transformer depth per stage: per-layer depths (nested lists, with
    reverse_transformer_layers_per_block) have no such rule; other added embeddings are not SDXL's."""
    problems = []
    depths = config.get("transformer_layers_per_block", 1)
    if any(isinstance(d, (list, tuple)) for d in _as_list(depths)) or min(_flat(depths), default=0) < 1:
        problems.append(f"transformer_layers_per_block {list(depths) if isinstance(depths, tuple) else depths} (one depth >= 1 per stage expected)")
    if config.get("reverse_transformer_layers_per_block") is not None:
        problems.append(f"reverse_transformer_layers_per_block {config['reverse_transformer_layers_per_block']}")
    return problems + [f"{key} {config[key]!r}" for key in _EXTRA_EMBEDDINGS if key != "addition_embed_type" and config.get(key) is not None]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_teacher_unet(teacher_config: dict, teacher: str = "the teacher") -> None:
    """Refuse, with one message, a teacher U-Net the recipe does not support (before anything is built)."""
    problems = unsupported_teacher_features(teacher_config)
    if problems:
        raise SystemExit(f"error: {teacher}'s U-Net is not one stage B's block-removal recipe supports: it has "
                         f"{'; '.join(problems)}. Supported: {SUPPORTED_TEACHERS}.")


def _flat(value) -> list:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]


def derive_student_config(teacher_config: dict) -> dict:
    """The SDXS student U-Net config of an SD-style teacher config (UNet2DConditionModel kwargs):
    no mid block, the last down stage and the first up stage removed, plain (transformer-free) blocks
    at the highest resolution, and one resnet fewer per stage where a stage has two or more (a small
    teacher's single-resnet stages keep theirs). Refuses unsupported teachers (check_teacher_unet)."""
    check_teacher_unet(teacher_config)
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    if is_sdxl_teacher(config):
        return _derive_sdxl_student_config(config)
    n = len(config["down_block_types"])
    for key in _PER_STAGE:
        if isinstance(config.get(key), (list, tuple)):
            config[key] = tuple(config[key])[: n - 1]
    config["up_block_types"] = tuple(config["up_block_types"])[1:]
    if config.get("reverse_transformer_layers_per_block") is not None:  # listed in up-block order
        config["reverse_transformer_layers_per_block"] = tuple(config["reverse_transformer_layers_per_block"])[1:]
    layers = config.get("layers_per_block", 2)
    config["layers_per_block"] = tuple(_kept_resnets(k) for k in layers) if isinstance(layers, tuple) else _kept_resnets(layers)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    down[0], up[-1] = down[0].replace("CrossAttn", ""), up[-1].replace("CrossAttn", "")  # highest resolution: no transformers
    config["down_block_types"], config["up_block_types"] = tuple(down), tuple(up)
    config["mid_block_type"] = None
    return config


def _derive_sdxl_student_config(config: dict) -> dict:
    """The SDXL branch (sdxs/architectures.py SDXS_1024_REMOVAL, train/README.md "SDXS-1024's U-Net"):
    SDXL has no lowest-resolution stage to drop and no transformers at the highest, so every stage stays;
    (1) no mid block, (2) one resnet (and its transformer) fewer per stage, never none, (5) every kept
    transformer keeps its first half of layers (depth // 2, never none). SDXL base gives SDXS_1024_UNET."""
    layers, depths = config.get("layers_per_block", 2), config.get("transformer_layers_per_block", 1)
    return dict(
        config,
        mid_block_type=None,
        layers_per_block=tuple(_kept_resnets(k) for k in layers) if isinstance(layers, (list, tuple)) else _kept_resnets(layers),
        transformer_layers_per_block=tuple(_kept_layers(d) for d in depths) if isinstance(depths, (list, tuple)) else _kept_layers(depths),
    )


def _kept_layers(teacher_depth: int) -> int:
    """Transformer layers an SDXL student block keeps: the first half (SSD-1B/Vega/KOALA-style), never none."""
    return max(teacher_depth // 2, 1)


def _per_stage(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _kept_resnets(teacher_resnets: int) -> int:
    """Resnets the student keeps in a down stage: one fewer (BK-SDM / SDXS), but never none."""
    return max(teacher_resnets - 1, 1)


def _kept_stages(teacher_config: dict) -> tuple[int, int]:
    """(student stages, up offset): SD-style teachers lose their lowest-resolution stage, so the student's
    up stage j is the teacher's j + 1; SDXL-style teachers keep all their stages under the same names."""
    n = len(teacher_config["down_block_types"])
    return (n, 0) if is_sdxl_teacher(teacher_config) else (n - 1, 1)


def block_map(teacher_config: dict) -> dict[str, str]:
    """Student module -> teacher module, for every block the student keeps (n = teacher stages, L_i its
    resnets per down stage i, K_i = max(L_i - 1, 1) the student's; an up stage has one resnet more than
    its down stage; s = the student's stages and o = the up offset, (n - 1, 1) for SD, (n, 0) for SDXL):
      down_blocks.i.{resnets,attentions}.k  <- teacher down_blocks.i.{..}.k       for k < K_i
      down_blocks.i.downsamplers.0          <- teacher down_blocks.i.downsamplers.0   (i < s - 1)
      up_blocks.j.{resnets,attentions}.k    <- teacher up_blocks.(j+o).{..}.k      for k < K
      up_blocks.j.{resnets,attentions}.K    <- teacher up_blocks.(j+o).{..}.L      (skip from the stage below)
      up_blocks.j.upsamplers.0              <- teacher up_blocks.(j+o).upsamplers.0   (j < s - 1)
    Modules outside the blocks (conv_in, time_embedding, add_embedding, conv_norm_out, conv_out, ...) keep
    their names, and so do the first layers of a kept transformer (SDXL: attentions.k.transformer_blocks.l)."""
    n = len(teacher_config["down_block_types"])
    layers = _per_stage(teacher_config.get("layers_per_block", 2), n)
    student = derive_student_config(teacher_config)
    stages, offset = _kept_stages(teacher_config)
    mapping = {}
    for i in range(stages):
        kinds = ["resnets", "attentions"] if "CrossAttn" in student["down_block_types"][i] else ["resnets"]
        for kind in kinds:
            for k in range(_kept_resnets(layers[i])):
                mapping[f"down_blocks.{i}.{kind}.{k}"] = f"down_blocks.{i}.{kind}.{k}"
        if i < stages - 1:
            mapping[f"down_blocks.{i}.downsamplers.0"] = f"down_blocks.{i}.downsamplers.0"
    for j in range(stages):
        teacher_resnets = layers[n - 1 - offset - j]  # the teacher's up block j + offset has this + 1 resnets
        kept = _kept_resnets(teacher_resnets)  # the student's up block j has kept + 1
        kinds = ["resnets", "attentions"] if "CrossAttn" in student["up_block_types"][j] else ["resnets"]
        for kind in kinds:
            for k in range(kept + 1):
                mapping[f"up_blocks.{j}.{kind}.{k}"] = f"up_blocks.{j + offset}.{kind}.{k if k < kept else teacher_resnets}"
        if j < stages - 1:
            mapping[f"up_blocks.{j}.upsamplers.0"] = f"up_blocks.{j + offset}.upsamplers.0"
    return mapping


def removed_prefixes(teacher_config: dict) -> list[str]:
    """Teacher modules the recipe removes, by name prefix: what must NOT be copied."""
    if is_sdxl_teacher(teacher_config):
        return _removed_sdxl_prefixes(teacher_config)
    n = len(teacher_config["down_block_types"])
    layers = _per_stage(teacher_config.get("layers_per_block", 2), n)
    removed = ["mid_block.", f"down_blocks.{n - 1}.", "up_blocks.0.", f"down_blocks.{n - 2}.downsamplers.",
               "down_blocks.0.attentions.", f"up_blocks.{n - 1}.attentions."]
    for i in range(n - 1):
        if layers[i] > 1:  # a single-resnet stage keeps its resnet (_kept_resnets)
            removed += [f"down_blocks.{i}.resnets.{layers[i] - 1}.", f"down_blocks.{i}.attentions.{layers[i] - 1}."]
        m = layers[n - 2 - i]
        if m > 1:
            removed += [f"up_blocks.{i + 1}.resnets.{m - 1}.", f"up_blocks.{i + 1}.attentions.{m - 1}."]
    return removed


def _removed_sdxl_prefixes(teacher_config: dict) -> list[str]:
    """SDXL branch: the mid block, each stage's second-to-last resnet/transformer (down: the last; up: the
    middle one, as for SD), and the second half of the layers of every transformer the student keeps."""
    n = len(teacher_config["down_block_types"])
    layers = _per_stage(teacher_config.get("layers_per_block", 2), n)
    depths = _per_stage(teacher_config.get("transformer_layers_per_block", 1), n)  # in down-stage order
    removed = ["mid_block."]
    for i in range(n):
        if layers[i] > 1:  # a single-resnet stage keeps its resnet (_kept_resnets)
            removed += [f"down_blocks.{i}.resnets.{layers[i] - 1}.", f"down_blocks.{i}.attentions.{layers[i] - 1}.",
                        f"up_blocks.{n - 1 - i}.resnets.{layers[i] - 1}.", f"up_blocks.{n - 1 - i}.attentions.{layers[i] - 1}."]
    for teacher_block in block_map(teacher_config).values():
        stage_kind, stage, kind = teacher_block.split(".")[:3]
        if kind == "attentions":
            depth = depths[int(stage) if stage_kind == "down_blocks" else n - 1 - int(stage)]
            removed += [f"{teacher_block}.transformer_blocks.{layer}." for layer in range(_kept_layers(depth), depth)]
    return removed


@dataclass
class StudentInit:
    """How the student's weights are set: every one copied from the teacher; the rest of the teacher dropped."""

    copied: dict[str, str]  # student key -> teacher key
    dropped: set[str]  # teacher keys the recipe removes


def plan_student_init(teacher_config: dict, teacher_shapes: dict[str, torch.Size], student_shapes: dict[str, torch.Size]) -> StudentInit:
    """Map every student weight to its teacher weight by block_map; assert that each teacher weight is
    either copied or removed by the recipe (never both, never neither). A student weight without a
    teacher weight of its shape is refused (ValueError): for the supported teachers there is none, and a
    freshly initialised block would silently break the distillation. Works on shapes alone, so the
    full-size check runs on meta-device models."""
    prefixes = block_map(teacher_config)
    copied, unmatched = {}, []
    for key, shape in student_shapes.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            prefix = ".".join(parts[:4])
            teacher_key = f"{prefixes[prefix]}.{'.'.join(parts[4:])}" if prefix in prefixes else None
        else:
            teacher_key = key
        if teacher_key in teacher_shapes and teacher_shapes[teacher_key] == shape:
            copied[key] = teacher_key
        else:
            unmatched.append(f"{key} {tuple(shape)} <- {teacher_key} {tuple(teacher_shapes[teacher_key]) if teacher_key in teacher_shapes else '(none)'}")
    if unmatched:
        raise ValueError(f"{len(unmatched)} student weight(s) have no teacher weight of the same shape to copy, e.g. "
                         f"{'; '.join(unmatched[:3])}. The recipe copies every student weight; supported: {SUPPORTED_TEACHERS}.")
    dropped = set(teacher_shapes) - set(copied.values())
    removed = tuple(removed_prefixes(teacher_config))
    assert len(set(copied.values())) == len(copied), "two student weights copied from one teacher weight"
    wrongly_copied = sorted(k for k in copied.values() if k.startswith(removed))
    assert not wrongly_copied, f"copied weights of blocks the recipe removes: {wrongly_copied[:5]}"
    unexplained = sorted(k for k in dropped if not k.startswith(removed))
    assert not unexplained, f"teacher weights neither copied nor removed by the recipe: {unexplained[:5]}"
    return StudentInit(copied, dropped)


def init_student_from_teacher(teacher_unet):
    """Build the student U-Net from the teacher's config and copy the teacher's weights into it
    (plan_student_init); the strict load asserts that every student weight was copied. Returns (student, plan)."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel(**derive_student_config(teacher_unet.config))
    teacher_state = teacher_unet.state_dict()
    plan = plan_student_init(teacher_unet.config, {k: v.shape for k, v in teacher_state.items()},
                             {k: v.shape for k, v in student.state_dict().items()})
    student.load_state_dict({s: teacher_state[t] for s, t in plan.copied.items()}, strict=True)
    return student, plan


def feature_pairs(teacher_config: dict) -> list[tuple[str, str, str]]:
    """(student block, teacher block, what to read from the teacher block) for feature KD: every down and
    up block of the student. A block's output is its hidden state; the student's last down stage has no
    downsampler while its teacher stage has one, so there the teacher's state BEFORE its downsampler is
    read ("pre_downsample") to match resolution and meaning (SD-style teachers; an SDXL-style teacher keeps
    every stage, so its pairs are the blocks of the same names)."""
    n = len(teacher_config["down_block_types"])
    if is_sdxl_teacher(teacher_config):  # every stage kept under its name; the last has no downsampler in either U-Net
        return [(f"{kind}.{i}", f"{kind}.{i}", "out") for kind in ("down_blocks", "up_blocks") for i in range(n)]
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}", "pre_downsample" if i == n - 2 else "out") for i in range(n - 1)]
    return pairs + [(f"up_blocks.{j}", f"up_blocks.{j + 1}", "out") for j in range(n - 1)]


class BlockOutputs:
    """Forward hooks that record named blocks' outputs, only inside `capture()`."""

    def __init__(self, model: torch.nn.Module, blocks: list[tuple[str, str]]):
        self.features: dict[str, torch.Tensor] = {}
        self._active = False
        for name, take in blocks:
            model.get_submodule(name).register_forward_hook(partial(self._record, name, take))

    def _record(self, name, take, module, inputs, output):
        if self._active:
            # down blocks return (hidden, output_states); output_states[-2] precedes the downsampler
            self.features[name] = output[1][-2] if take == "pre_downsample" else output[0] if isinstance(output, tuple) else output

    @contextlib.contextmanager
    def capture(self):
        self.features, self._active = {}, True
        try:
            yield self.features
        finally:
            self._active = False


# --- losses --------------------------------------------------------------------------------------


def output_kd_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """Eq. 6, L_OKD: || eps_student(x_t, t) - eps_teacher(x_t, t) ||^2 (mean squared error)."""
    return F.mse_loss(student_eps.float(), teacher_eps.float())


def feature_kd_loss(student_features: dict, teacher_features: dict, pairs: list[tuple[str, str, str]]) -> torch.Tensor:
    """Eq. 7, L_FKD: sum over every down/up block l of || f_l^student - f_l^teacher ||^2 (MSE each)."""
    return sum(F.mse_loss(student_features[s].float(), teacher_features[t].float()) for s, t, _ in pairs)


# --- one optimisation step -----------------------------------------------------------------------


class FeatureHooks:
    """Eq. 7's block pairs (feature_pairs) and the forward hooks that read them from student and teacher."""

    def __init__(self, student: torch.nn.Module, teacher_unet: torch.nn.Module):
        self.pairs = feature_pairs(teacher_unet.config)
        self.student = BlockOutputs(student, [(s, "out") for s, _, _ in self.pairs])
        self.teacher = BlockOutputs(teacher_unet, [(t, take) for _, t, take in self.pairs])


def kd_inputs(batch: dict, gen: torch.Generator, *, noise_scheduler, encode, caption_dropout: float,
              device: torch.device, return_noise: bool = False) -> tuple:
    """What one micro-batch feeds kd_step: x_t = add_noise(z0, eps, t) with the teacher's betas, t uniform in
    [0, T), z0 the cached teacher latents; and the captions' text conditions, `encode(prompts)` (the teacher's
    common.PromptEncoder: SD text states, or SDXL's two encoders' states with the pooled embedding and size
    ids), each caption replaced by the empty prompt with probability `caption_dropout`. Draws come from `gen`
    (seeded per step). Returns (x_t, t, cond), and eps last with `return_noise` (a denoising loss needs it:
    stage D's teacher ControlNet)."""
    z0 = batch["latents"].to(device)
    drop = torch.rand(len(z0), generator=gen) < caption_dropout
    prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
    noise = torch.randn(z0.shape, generator=gen).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z0),), generator=gen).to(device)  # uniform t
    x_t = noise_scheduler.add_noise(z0, noise, t)
    cond = encode(prompts)
    return (x_t, t, cond, noise) if return_noise else (x_t, t, cond)


def kd_step(student, teacher_unet, hooks: FeatureHooks, x_t: torch.Tensor, t: torch.Tensor, cond: common.TextCond | torch.Tensor, *,
            lambda_feat: float) -> dict[str, torch.Tensor]:
    """The KD loss on one micro-batch, Eq. 8: L_KD = L_OKD + lambda_F * L_FKD, and no denoising (task) loss.
    Teacher and student see the same x_t, t and text conditions (common.TextCond: for an SDXL-style pair
    also the same pooled embedding and size ids); the teacher runs without gradients."""
    kwargs = common.as_cond(cond).unet_kwargs()
    with torch.no_grad(), hooks.teacher.capture():
        teacher_eps = teacher_unet(x_t.to(teacher_unet.dtype), t, **kwargs).sample
    with hooks.student.capture():
        student_eps = student(x_t, t, **kwargs).sample
    loss_out = output_kd_loss(student_eps, teacher_eps)  # Eq. 6
    loss_feat = feature_kd_loss(hooks.student.features, hooks.teacher.features, hooks.pairs)  # Eq. 7
    return {"loss": loss_out + lambda_feat * loss_feat, "loss_out": loss_out, "loss_feat": loss_feat}  # Eq. 8



# --- arguments -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/distill_unet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)

    kd = parser.add_argument_group("knowledge distillation (Eqs. 6-8)")
    kd.add_argument("--lambda_feat", type=float, help="lambda_F, weight of the feature KD loss (Eq. 8) (preset)")
    kd.add_argument("--caption_dropout", type=float, help="probability of training on the empty prompt instead of the caption (preset)")

    out = parser.add_argument_group("samples and output")
    out.add_argument("--sample_steps", type=int, help="sampler steps (DPM-Solver++) of the teacher/student sample grids (preset)")
    out.add_argument("--sample_guidance", type=float, help="CFG scale of the sample grids (preset)")
    out.add_argument("--tiny_decoder", default=None,
                     help="an AutoencoderTiny folder (e.g. stage A's OUTPUT_DIR/final/vae) to ship as vae/ in the final pipeline, "
                          "with the teacher's AutoencoderKL in vae_large/ (default: vae/ is the teacher's AutoencoderKL; generate "
                          "with --decoder large)")
    return parser


# --- training ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(build_parser(), PRESETS, argv)
    output_dir, accelerator, config = common.start_run(args)
    main_process, device = accelerator.is_main_process, accelerator.device

    # --- teacher, student, data ----------------------------------------------------------------------
    from diffusers import AutoencoderTiny, DDPMScheduler

    tiny_dir = common.resolve_model(args.tiny_decoder, "--tiny_decoder", subfolders_with_weights=("",)) if args.tiny_decoder else None  # fail early
    teacher_id = common.resolve_teacher(args.teacher, args.preset, output_dir, accelerator)
    teacher_root = common.resolve_model(teacher_id, "--teacher", subfolders_with_weights=("unet", "text_encoder", "vae"))
    if (teacher_root / "unet" / "config.json").is_file():  # refuse an unsupported U-Net before loading it
        check_teacher_unet(json.loads((teacher_root / "unet" / "config.json").read_text()), f"Teacher '{teacher_id}'")
    teacher = common.load_teacher(teacher_id, device, torch.float32)  # fp32 first: the student copies exact weights
    student, plan = init_student_from_teacher(teacher.unet)
    if main_process:
        n_params = sum(p.numel() for p in student.parameters())
        print(f"Student U-Net: {n_params:,} parameters, all {len(plan.copied)} tensors copied from the teacher; "
              f"{len(plan.dropped)} teacher tensors dropped.", file=sys.stderr)
    dtype = common.weight_dtype(args.mixed_precision)
    teacher.unet.to(dtype)
    for text_encoder in teacher.text_encoders:
        text_encoder.to(dtype)
    encode = teacher.prompt_encoder(args.resolution)  # SD: text states; SDXL: + pooled embedding and size ids
    source = common.read_sources(args.prompts, args.image_folder, args.caption_column, args.latents, args.num_samples,
                                 common.SMOKE_PROMPTS if common.is_smoke(args.preset) else None, max_bad_fraction=args.max_bad_fraction)
    cache = common.cache_folder(args.cache_dir or output_dir / "cache", teacher.root, source, resolution=args.resolution,
                                sampler_steps=args.sampler_steps, guidance_scale=args.guidance_scale, with_images=False, seed=args.seed)
    common.build_latent_cache(teacher, source, cache, resolution=args.resolution, sampler_steps=args.sampler_steps,
                              guidance_scale=args.guidance_scale, with_images=False, seed=args.seed,
                              batch_size=args.cache_batch_size, accelerator=accelerator)
    dataset = common.CachedSamples(cache)
    noise_scheduler = DDPMScheduler.from_config(teacher.scheduler_config)  # the teacher's betas, for x_t

    # --- optimizer, accelerate, hooks ------------------------------------------------------------
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    ema = common.make_ema(student, args.ema_decay)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_schedule = common.warmup_then_constant(optimizer, args.lr_warmup_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
        ema.to(device)
    raw_student = accelerator.unwrap_model(student)
    hooks = FeatureHooks(raw_student, teacher.unet)

    start_step = common.resume_step(accelerator, output_dir, args.resume, config)

    batches = common.make_loader(dataset, args.batch_size, seed=args.seed, first_micro_step=start_step * args.grad_accum,
                                 accelerator=accelerator, num_workers=args.num_workers, overfit=args.overfit_batch)
    log = common.CsvLog(output_dir / "log.csv", ["lr", "samples_per_s", *LOSSES], start_step, enabled=main_process)
    if args.report_to != "none":
        accelerator.init_trackers("distill_unet", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    progress = common.Progress(args.max_steps, start_step, "stage B U-Net", enabled=accelerator.is_local_main_process)

    val_prompts = [dataset[i % len(dataset)]["prompt"] for i in range(args.num_sample_images)]
    side = args.resolution // common.vae_factor(teacher.vae.config)
    val_noise = torch.randn(len(val_prompts), 4, side, side, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    teacher_row = []  # the teacher's samples never change: computed once

    @torch.no_grad()
    def sample_grid(step: int) -> None:
        """Rows: teacher samples, student samples (EMA when on): same prompts, noise and sampler."""
        cond, uncond = encode(val_prompts), encode.unconditional().expand(len(val_prompts))
        sf = teacher.vae.config.scaling_factor

        def images(unet):
            with accelerator.autocast():
                latents = common.sample_latents(unet, teacher.scheduler_config, cond, uncond, val_noise, args.sample_steps, args.sample_guidance)
            return teacher.vae.decode(latents.float() / sf).sample

        if not teacher_row:
            teacher_row.append(images(teacher.unet))
        model = ema if ema is not None else raw_student
        model.eval()
        rows = [teacher_row[0], images(model)]
        model.train()
        common.save_image_grid(rows, output_dir / "samples" / f"step-{step:07d}.png")

    # --- loop --------------------------------------------------------------------------------------
    guard = common.FiniteGuard(args.skip_nonfinite, output_dir)
    tick, seen = time.perf_counter(), 0
    for step in range(start_step + 1, args.max_steps + 1):
        sums, updated = dict.fromkeys(LOSSES, 0.0), False
        for micro in range(args.grad_accum):
            gen = common.step_generator(args.seed, 0 if args.overfit_batch else step * args.grad_accum + micro, accelerator.process_index)
            x_t, t, cond = kd_inputs(next(batches), gen, noise_scheduler=noise_scheduler, encode=encode,
                                     caption_dropout=args.caption_dropout, device=device)
            with accelerator.accumulate(student):
                losses = kd_step(student, teacher.unet, hooks, x_t, t, cond, lambda_feat=args.lambda_feat)
                accelerator.backward(losses["loss"])
                for k in LOSSES:
                    sums[k] += losses[k].detach().float().item() / args.grad_accum
                if accelerator.sync_gradients:
                    updated = common.guarded_update(accelerator, optimizer, student.parameters(), guard, step, sums, args.max_grad_norm, "student")
            seen += len(x_t) * accelerator.num_processes
        if updated:  # once per optimizer step; a skipped update (--skip_nonfinite) steps neither the schedule nor the EMA
            lr_schedule.step()
            if ema is not None:
                common.ema_update(ema, raw_student, args.ema_decay, step)

        progress.update({"loss": sums["loss"], "out": sums["loss_out"], "feat": sums["loss_feat"]})
        if step % args.log_every == 0 or step == args.max_steps:
            values = common.process_mean(accelerator, sums)
            elapsed = time.perf_counter() - tick
            row = {"lr": lr_schedule.get_last_lr()[0], "samples_per_s": seen / max(elapsed, 1e-9), **values}
            common.log_row(accelerator, log, step, row, args.report_to)
            tick, seen = time.perf_counter(), 0
        if common.end_of_step(accelerator, args, step, output_dir, config, progress, sample_grid, main_process):
            return 0
    progress.close()

    # --- final save ----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main_process:
        sample_grid(args.max_steps)
        common.plot_loss_curve(output_dir / "log.csv", output_dir / "loss_curve.png")
        unet = (ema if ema is not None else raw_student).to("cpu").eval()
        tiny = AutoencoderTiny.from_pretrained(tiny_dir) if tiny_dir else None
        common.save_sdxs_pipeline(output_dir / "final", teacher.root, unet=unet, tiny_vae=tiny)
        print(f"Student pipeline saved to {output_dir / 'final'}", file=sys.stderr)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    from sdxs.loading import ModelNotFoundError

    try:
        sys.exit(main())
    except ModelNotFoundError as err:  # a teacher/decoder that is neither a folder nor fetchable: say what to do
        sys.exit(f"error: {err}")
