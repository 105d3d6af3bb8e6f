#!/usr/bin/env python
"""A small SD-style TEACHER trained from scratch on an image-caption folder (issue 7), in three phases.

Tiny run on a CPU (seconds; builds a synthetic coloured-shapes data set in OUT/synthetic-data):
    python train/train_teacher.py --preset smoke --output_dir outputs/teacher-smoke
The emoji teacher (2-core CPU budget: 90 minutes; see train/README.md "Small teacher (issue 7)"):
    python train/emoji_data.py --out data/emoji
    python train/train_teacher.py --preset full --data data/emoji --output_dir outputs/teacher
Teacher v2 at 128 px, f=8 VAE (~11.5 h on one CPU thread, in the background; train/README.md "Teacher v2"):
    python train/emoji_data.py --out data/emoji128 --image_size 128
    python train/train_teacher.py --preset v2 --data data/emoji128 --output_dir outputs/teacher-v2
Resume a killed run: the same command plus `--resume latest` (finished phases are skipped, the current
one continues from its last checkpoint; changed settings are refused unless --allow_changed names them).
Records with an undecodable image or no caption are skipped and counted (OUTPUT_DIR/data_report.json;
more than --max_bad_fraction of a split stops the run), and a NaN/inf loss or gradient norm stops the run
before it reaches the weights (--skip_nonfinite N skips up to N such steps per phase first).

Phases, each in OUTPUT_DIR/<phase>/ with its own checkpoints/, log.csv, samples/, loss_curve.png, final/:
1. vae:  an AutoencoderKL (f = 2^(len(--vae_channels)-1); 4 in the full preset, 8 in v2), loss = L1 + MSE
   reconstruction + kl_weight * KL(q(z|x) || N(0, I)) (the LDM autoencoder without its perceptual and
   GAN terms). Its scaling_factor is set to 1/std of the training latents at the end (as SD's 0.18215).
2. clip: a CLIPModel (small text + vision towers) trained with the symmetric InfoNCE loss of CLIP
   (Radford et al. 2021, Eq. in Fig. 3) on the captions, with the real CLIP tokenizer. Its text tower
   becomes text_encoder/; the whole CLIPModel is kept in OUTPUT_DIR/eval_tower (the evaluation network:
   CLIP score, retrieval).
3. unet: an epsilon-prediction UNet2DConditionModel on cached VAE latents and cached text states, loss
   ||eps - eps_theta(x_t, t, c)||^2 (DDPM, Ho et al. 2020, Eq. 14) on SD's noise schedule, with caption
   dropout (the empty caption) so classifier-free guidance works (Ho & Salimans 2022, Eq. 6).
Output: OUTPUT_DIR/final, a StableDiffusionPipeline folder (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/ (DPM-Solver++ on SD's betas), vae/): `StableDiffusionPipeline.from_pretrained`,
U-Net and VAE stored in --save_dtype (fp16 by default; diffusers loads them as fp32 unless told otherwise),
plus eval_tower/ (the evaluation network, which diffusers ignores). Score it with train/evaluate.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from train import common, evaluate

PHASES = ("vae", "clip", "unet")
# Settings a resumed teacher run may change besides common.RESUME_MAY_CHANGE: each phase's length (the LR is
# constant after its warm-up) and the sample grids' sampler.
MAY_CHANGE = ("vae_steps", "clip_steps", "unet_steps", "sample_steps", "sample_guidance")
# SD's noise schedule (training) and the sampler the final folder ships.
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "steps_offset": 1}

# [ours] all values; the full preset is sized from timing probes on a 2-core CPU (train/README.md).
PRESETS = {
    "smoke": {
        "resolution": 32, "num_threads": 1, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, "sample_every": 2,
        "vae_channels": (8, 16, 16), "vae_steps": 4, "vae_batch_size": 8, "vae_lr": 1e-3, "vae_decay_steps": 0, "kl_weight": 1e-6,
        "text_width": 32, "text_layers": 2, "vision_width": 32, "vision_layers": 2, "patch_size": 8, "projection_dim": 32,
        "clip_steps": 4, "clip_batch_size": 8, "clip_lr": 1e-3, "clip_decay_steps": 0,
        "unet_channels": (16, 32), "unet_layers": 1, "unet_steps": 4, "unet_batch_size": 8, "unet_lr": 1e-3, "unet_decay_steps": 0,
        "ema_decay": 0.9,
        "caption_dropout": 0.1, "sample_steps": 4, "sample_guidance": 3.0, "save_dtype": "fp16",
    },
    # full: steps sized from timing probes on the idle 2-core CPU, 2 threads (train/README.md): VAE 0.95 M params
    # 1.29 s/step, CLIP 8.0 M (6.3 M of it the token table) 0.63 s/step, U-Net 6.7 M 1.01 s/step -> 79 min of steps
    # + ~2-3 min of caching, grids and checkpoints, < 90 min. Another job on the cores makes 2 threads 2-4x slower.
    "full": {
        "resolution": 64, "num_threads": 2, "checkpoint_every": 200, "keep_checkpoints": 2, "log_every": 10, "sample_every": 500,
        "vae_channels": (32, 64, 64), "vae_steps": 1000, "vae_batch_size": 32, "vae_lr": 1e-3, "vae_decay_steps": 0, "kl_weight": 1e-6,
        "text_width": 128, "text_layers": 4, "vision_width": 128, "vision_layers": 4, "patch_size": 8, "projection_dim": 128,
        "clip_steps": 1000, "clip_batch_size": 128, "clip_lr": 5e-4, "clip_decay_steps": 0,
        "unet_channels": (64, 128, 128), "unet_layers": 1, "unet_steps": 2800, "unet_batch_size": 64, "unet_lr": 5e-4, "unet_decay_steps": 0,
        "ema_decay": 0.999,
        "caption_dropout": 0.1, "sample_steps": 25, "sample_guidance": 4.0, "save_dtype": "fp16",
    },
    # v2 (issue 18): 128 px with an f=8 VAE, so the U-Net keeps full's 16x16x4 latents and its widths. Sized from
    # 20-step timing probes on one thread of the shared 2-core CPU (train/README.md "Teacher v2"): VAE (16, 32, 48, 64)
    # 0.86 M params 1.8 s/step at batch 16, CLIP with patch 16 (8x8 tokens at 128 px, as full's patch 8 at 64 px)
    # 1.3 s/step, U-Net 6.7 M 1.7 s/step -> ~5.2 h + 0.7 h + 5.6 h. The VAE is the widest f=8 one that keeps the
    # final folder's weights under 60 MB beside full's text encoder and U-Net. A checkpoint every 250 steps is
    # 5-8 minutes of CPU time, so a killed session loses little. Each phase ends with a linear LR decay (*_decay_steps):
    # the VAE's first 8,000 constant-LR steps reached 26.67 dB val PSNR with a flat loss; 3,000 decay steps more, 28.09 dB.
    "v2": {
        "resolution": 128, "num_threads": 1, "checkpoint_every": 250, "keep_checkpoints": 2, "log_every": 50, "sample_every": 1000,
        "vae_channels": (16, 32, 48, 64), "vae_steps": 11000, "vae_batch_size": 16, "vae_lr": 1e-3, "vae_decay_steps": 3000,
        "kl_weight": 1e-6,
        "text_width": 128, "text_layers": 4, "vision_width": 128, "vision_layers": 4, "patch_size": 16, "projection_dim": 128,
        "clip_steps": 2000, "clip_batch_size": 128, "clip_lr": 5e-4, "clip_decay_steps": 500,
        "unet_channels": (64, 128, 128), "unet_layers": 1, "unet_steps": 12000, "unet_batch_size": 64, "unet_lr": 5e-4, "unet_decay_steps": 2000,
        "ema_decay": 0.9995,
        "caption_dropout": 0.1, "sample_steps": 25, "sample_guidance": 4.0, "save_dtype": "fp16",
    },
}


# --- arguments -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train/train_teacher.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(","))

    run = parser.add_argument_group("run")
    run.add_argument("--preset", required=True, choices=list(PRESETS), help="smoke: tiny models, seconds (what the tests run); "
                     "full: the emoji teacher, ~90 min on 2 CPU cores; v2: the 128 px teacher (f=8 VAE), ~11.5 h on 1 CPU thread. "
                     "Flags showing [preset ...] take the preset's value unless given.")
    run.add_argument("--output_dir", required=True, help="run folder: vae/, clip/, unet/ (one per phase), eval_tower/, final/")
    run.add_argument("--data", default=None, help="image-caption folder with train/ and val/ imagefolders (images + metadata.jsonl "
                     "with file_name and text), e.g. train/emoji_data.py's output. With --preset smoke and none given, a synthetic "
                     "coloured-shapes set is built in OUTPUT_DIR/synthetic-data")
    run.add_argument("--caption_column", default="text", help="caption key in metadata.jsonl (default 'text')")
    run.add_argument("--max_bad_fraction", type=float, default=common.MAX_BAD_FRACTION,
                     help="records with an undecodable image or no caption (empty captions included: the U-Net learns the "
                          "unconditional case from --caption_dropout) are skipped and counted; above this fraction of a split "
                          f"the run is refused (default {common.MAX_BAD_FRACTION})")
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise (default 0)")
    run.add_argument("--resume", default=None, help="'latest': skip finished phases, continue the current one from its newest checkpoint")
    run.add_argument("--allow_changed", default="", help="KEY,...: settings (flag names without --) --resume may continue with "
                     "changed values; any other change from the run's saved settings is refused (default: none)")
    run.add_argument("--skip_nonfinite", type=int, default=0, help="skip up to N optimizer steps (per phase) whose loss or "
                     "gradient norm is NaN/inf before stopping the run; 0 = stop at the first (default 0)")
    run.add_argument("--stop_after_step", type=int, default=None, help="testing aid: exit after this step of --stop_phase, as a killed run would")
    run.add_argument("--stop_phase", choices=PHASES, default="vae", help="the phase --stop_after_step counts in (default vae)")
    run.add_argument("--resolution", type=int, help="image side in pixels (preset)")
    run.add_argument("--num_threads", type=int, help="torch CPU threads, 0 = torch's default (preset)")
    run.add_argument("--save_dtype", choices=("fp16", "fp32"), help="stored weights of the final U-Net, VAE and eval_tower (the text "
                     "encoder stays fp32); fp16 halves them, and diffusers still loads them as fp32 by default (preset)")

    log = parser.add_argument_group("checkpoints and logging (every phase)")
    log.add_argument("--checkpoint_every", type=int, help="resumable checkpoint every N steps (preset)")
    log.add_argument("--keep_checkpoints", type=int, help="keep the last K checkpoints per phase (preset)")
    log.add_argument("--log_every", type=int, help="log.csv row every N steps (preset)")
    log.add_argument("--sample_every", type=int, help="sample grid every N steps, 0 = only at the end (preset)")
    log.add_argument("--num_sample_images", type=int, default=6, help="images per row of the sample grids (default 6)")

    vae = parser.add_argument_group("phase 1: AutoencoderKL")
    vae.add_argument("--vae_channels", type=ints, help="block_out_channels; downsampling factor 2^(n-1) (preset)")
    vae.add_argument("--vae_steps", type=int, help="optimizer steps (preset)")
    vae.add_argument("--vae_batch_size", type=int, help="(preset)")
    vae.add_argument("--vae_lr", type=float, help="AdamW learning rate (preset)")
    vae.add_argument("--vae_decay_steps", type=int, help="linear LR decay to 0 over the last N steps, 0 = constant to the end (preset)")
    vae.add_argument("--kl_weight", type=float, help="weight of the KL term (preset)")

    clip = parser.add_argument_group("phase 2: CLIP text encoder + image tower")
    clip.add_argument("--text_width", type=int, help="text hidden size = the U-Net's cross-attention dim (preset)")
    clip.add_argument("--text_layers", type=int, help="text transformer layers (preset)")
    clip.add_argument("--vision_width", type=int, help="image tower (ViT) hidden size (preset)")
    clip.add_argument("--vision_layers", type=int, help="image tower layers (preset)")
    clip.add_argument("--patch_size", type=int, help="image tower patch size (preset)")
    clip.add_argument("--projection_dim", type=int, help="shared embedding size (preset)")
    clip.add_argument("--clip_steps", type=int, help="optimizer steps (preset)")
    clip.add_argument("--clip_batch_size", type=int, help="pairs per step (the contrastive negatives) (preset)")
    clip.add_argument("--clip_lr", type=float, help="AdamW learning rate (preset)")
    clip.add_argument("--clip_decay_steps", type=int, help="linear LR decay to 0 over the last N steps, 0 = constant to the end (preset)")

    unet = parser.add_argument_group("phase 3: epsilon-prediction U-Net")
    unet.add_argument("--unet_channels", type=ints, help="block_out_channels; cross-attention at every stage but the first (preset)")
    unet.add_argument("--unet_layers", type=int, help="resnets per stage (preset)")
    unet.add_argument("--unet_steps", type=int, help="optimizer steps (preset)")
    unet.add_argument("--unet_batch_size", type=int, help="(preset)")
    unet.add_argument("--unet_lr", type=float, help="AdamW learning rate (preset)")
    unet.add_argument("--unet_decay_steps", type=int, help="linear LR decay to 0 over the last N steps, 0 = constant to the end (preset)")
    unet.add_argument("--ema_decay", type=float, help="EMA of the U-Net; the final U-Net is the EMA when > 0 (preset)")
    unet.add_argument("--caption_dropout", type=float, help="probability of the empty caption, for classifier-free guidance (preset)")
    unet.add_argument("--sample_steps", type=int, help="DPM-Solver++ steps of the sample grids (preset)")
    unet.add_argument("--sample_guidance", type=float, help="guidance scale of the sample grids (preset)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like common.parse_args: every default the preset names comes from it, explicit flags win."""
    parser = build_parser()
    keys = set(PRESETS["smoke"])
    for action in parser._actions:
        if action.dest in keys:
            shown = "; ".join(f"{n}: {common._flag_text(p[action.dest])}" for n, p in PRESETS.items())
            action.help = f"{(action.help or '').replace(' (preset)', '').replace('(preset)', '')} [preset {shown}]"
    known, _ = parser.parse_known_args(argv)
    if known.preset in PRESETS:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    factor = 2 ** (len(args.vae_channels) - 1) * 2 ** (len(args.unet_channels) - 1)
    if args.resolution % factor:
        parser.error(f"--resolution must be a multiple of {factor} (the VAE's and the U-Net's downsampling); got {args.resolution}.")
    for name in ("vae_steps", "clip_steps", "unet_steps", "vae_batch_size", "clip_batch_size", "unet_batch_size",
                 "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}.")
    for name in PHASES:
        if not 0 <= getattr(args, f"{name}_decay_steps") <= getattr(args, f"{name}_steps"):
            parser.error(f"--{name}_decay_steps must be between 0 and --{name}_steps ({getattr(args, f'{name}_steps')}); "
                         f"got {getattr(args, f'{name}_decay_steps')}.")
    if args.clip_batch_size < 2:
        parser.error("--clip_batch_size must be at least 2 (the other pairs of the batch are the negatives).")
    if not 0 <= args.max_bad_fraction <= 1:
        parser.error(f"--max_bad_fraction must be between 0 and 1; got {args.max_bad_fraction}.")
    if args.data is None and args.preset != "smoke":
        parser.error(f"--data is required with --preset {args.preset}: the folder `python train/emoji_data.py --out data/emoji` "
                     "writes (64 px; for v2 add `--image_size 128` and write it to data/emoji128).")
    return args


# --- data ----------------------------------------------------------------------------------------


SHAPES, COLOURS = ("circle", "square", "triangle", "diamond"), {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30),
    "purple": (140, 60, 180), "orange": (245, 130, 20), "black": (20, 20, 20), "pink": (240, 120, 170)}


def make_synthetic_data(dest: Path, resolution: int = 64, *, n_train: int = 64, n_val: int = 8, seed: int = 0) -> Path:
    """A tiny image-caption set in the emoji layout (DEST/train, DEST/val: PNGs + metadata.jsonl): coloured
    shapes on white, captioned "an emoji of a red circle, large". CI needs no npm this way."""
    import random

    from PIL import Image, ImageDraw

    dest = Path(dest)
    if (dest / "val" / "metadata.jsonl").is_file():
        return dest
    rng = random.Random(seed)
    with common.atomic_dir(dest) as tmp:
        for split, n in (("train", n_train), ("val", n_val)):
            (tmp / split).mkdir()
            rows = []
            for i in range(n):
                shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(("small", "large"))
                image = Image.new("RGB", (resolution, resolution), "white")
                r = resolution * (0.22 if size == "small" else 0.4)
                cx, cy = resolution / 2 + rng.uniform(-3, 3), resolution / 2 + rng.uniform(-3, 3)
                box = (cx - r, cy - r, cx + r, cy + r)
                draw = ImageDraw.Draw(image)
                if shape == "circle":
                    draw.ellipse(box, fill=COLOURS[colour])
                elif shape == "square":
                    draw.rectangle(box, fill=COLOURS[colour])
                elif shape == "triangle":
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
                else:
                    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=COLOURS[colour])
                name = f"{i:05d}.png"
                image.save(tmp / split / name)
                rows.append({"file_name": name, "text": f"an emoji of a {colour} {shape}, {size}"})
            (tmp / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def load_split(folder: Path, caption_column: str, resolution: int, max_bad_fraction: float = common.MAX_BAD_FRACTION
               ) -> tuple[torch.Tensor, list[str], dict]:
    """The usable images of an imagefolder as one uint8 (N, 3, R, R) tensor (emoji sets fit in memory), their
    captions, and what was skipped (common.read_sources: undecodable images and records without a caption)."""
    source = common.read_sources(None, str(folder), caption_column, None, 0, max_bad_fraction=max_bad_fraction)
    images = torch.stack([common.to_uint8(common.load_image(p, resolution)) for p in source.images])
    return images, source.prompts, source.report


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def latent_side(args) -> int:
    """The U-Net's latent side: --resolution over the VAE's downsampling 2^(len(--vae_channels)-1)."""
    return args.resolution // 2 ** (len(args.vae_channels) - 1)


# --- phase plumbing ------------------------------------------------------------------------------


def phase_done(output_dir: Path, phase: str) -> bool:
    return (output_dir / phase / "final" / "done.json").is_file()


def phase_finished(output_dir: Path, phase: str, steps: int) -> bool:
    """Whether `phase` is finished for `steps` optimizer steps (its final/done.json records at least as many).
    A phase finished with fewer (its --PHASE_steps raised since) is reopened: it continues from the checkpoint of
    its last step, with the schedule of the longer run. Refused once the U-Net phase has trained on its output."""
    done = output_dir / phase / "final" / "done.json"
    if not done.is_file():
        return False
    trained = json.loads(done.read_text()).get("steps", steps)  # done.json before it recorded steps: finished as it is
    if trained >= steps:
        return True
    unet_dir = output_dir / "unet"
    if phase != "unet" and ((unet_dir / "final").exists() or common.find_checkpoint(unet_dir, "latest") is not None):
        raise SystemExit(f"--{phase}_steps {steps} would extend the finished {phase} phase ({trained} steps), but the U-Net phase "
                         f"has already trained on its output in {unet_dir}: keep --{phase}_steps {trained}, or start a new --output_dir.")
    latest = common.find_checkpoint(output_dir / phase, "latest")  # step `trained`'s, or a newer one of the longer run
    if latest is None or json.loads((latest / "meta.json").read_text())["step"] < trained:
        raise SystemExit(f"--{phase}_steps {steps} would extend the finished {phase} phase ({trained} steps), but the checkpoint "
                         f"of its last step is gone from {output_dir / phase}: keep --{phase}_steps {trained}, or start a new --output_dir.")
    print(f"[{phase}] reopening the finished phase: {trained} -> {steps} steps.", file=sys.stderr)
    return False


def mark_done(final_dir: Path, info: dict) -> None:
    (final_dir / "done.json").write_text(json.dumps(info, indent=2) + "\n")


class Phase:
    """One phase's run plumbing from train/common.py: its own accelerator (so its checkpoints hold only
    its own model/optimizer), resume, log.csv, progress bar, and the per-step end (samples, checkpoint, stop)."""

    def __init__(self, args, name: str, steps: int, columns: list[str], models: list, others: list):
        self.args, self.name, self.steps = args, name, steps
        self.dir = Path(args.output_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            common.check_fresh_start(self.dir, None)
        self.accelerator = common.make_accelerator(self.dir, mixed_precision="no", grad_accum=1, report_to="none")
        self.prepared = self.accelerator.prepare(*models)
        for obj in others:
            self.accelerator.register_for_checkpointing(obj)
        self.config = {**common.run_config(args), "phase": name}
        self.start = 0
        checkpoint = common.find_checkpoint(self.dir, args.resume)
        if checkpoint is not None:
            self.start = common.load_checkpoint(self.accelerator, checkpoint, self.config, may_change=MAY_CHANGE)
            print(f"[{name}] resumed from {checkpoint} at step {self.start}.", file=sys.stderr)
        self.log = common.CsvLog(self.dir / "log.csv", ["lr", "samples_per_s", *columns], self.start)
        self.progress = common.Progress(steps, self.start, f"teacher {name}", enabled=True)
        self.step_args = SimpleNamespace(sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                                         keep_checkpoints=args.keep_checkpoints,
                                         stop_after_step=args.stop_after_step if args.stop_phase == name else None)
        self.tick, self.seen = time.perf_counter(), 0
        self.guard = common.FiniteGuard(args.skip_nonfinite, self.dir, lr_flag=f"--{name}_lr")

    def batches(self, n: int, batch_size: int):
        return iter(common.StepSampler(n, batch_size, seed=self.args.seed, first_micro_step=self.start))

    def end_step(self, step: int, losses: dict, lr: float, batch_size: int, sample_grid) -> bool:
        """Progress, log row, then common.end_of_step; True when --stop_after_step says stop."""
        self.seen += batch_size
        self.progress.update(losses)
        if step % self.args.log_every == 0 or step == self.steps:
            elapsed = time.perf_counter() - self.tick
            common.log_row(self.accelerator, self.log, step, {"lr": lr, "samples_per_s": self.seen / max(elapsed, 1e-9), **losses}, "none")
            self.tick, self.seen = time.perf_counter(), 0
        return common.end_of_step(self.accelerator, self.step_args, step, self.dir, self.config, self.progress, sample_grid, True)

    def finish(self, sample_grid) -> None:
        self.progress.close()
        sample_grid(self.steps)
        common.plot_loss_curve(self.dir / "log.csv", self.dir / "loss_curve.png")


def adamw(model, lr: float, steps: int, decay_steps: int):
    """AdamW and its schedule: 50 warm-up steps, constant, a linear decay over the last `decay_steps`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return optimizer, common.warmup_stable_decay(optimizer, 50, steps, decay_steps)


def clip_grad_and_step(phase: Phase, step: int, model, optimizer, schedule, loss, losses: dict) -> bool:
    """Backward, clip to norm 1, then the finite-loss guard: the optimizer and LR steps only when the loss
    terms and the gradient norm are finite (common.FiniteGuard: skipped up to --skip_nonfinite times, then
    the run stops). Returns whether the step was taken (the EMA follows only then)."""
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    take = phase.guard.check(step, {"loss": loss, **losses}, grad_norm, model=phase.name)
    if take:
        optimizer.step()
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return take


# --- phase 1: AutoencoderKL ----------------------------------------------------------------------


def vae_config(channels: tuple[int, ...], resolution: int) -> dict:
    n = len(channels)
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
                "block_out_channels": tuple(channels), "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": min(32, channels[0]),
                "sample_size": resolution}


def vae_loss(vae, pixels: torch.Tensor, noise: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 + MSE reconstruction of a posterior sample + kl_weight * KL(q(z|x) || N(0, I)) (LDM autoencoder, no LPIPS/GAN)."""
    posterior = vae.encode(pixels).latent_dist
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample
    l1, mse = F.l1_loss(recon, pixels), F.mse_loss(recon, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel value, so kl_weight is independent of the size
    loss = l1 + mse + kl_weight * kl
    return loss, {"loss": loss.item(), "loss_l1": l1.item(), "loss_kl": kl.item()}


def train_vae(args, data) -> tuple[object, dict]:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args.vae_channels, args.resolution)).train()  # channels_last: measured no faster here
    optimizer, schedule = adamw(vae, args.vae_lr, args.vae_steps, args.vae_decay_steps)
    phase = Phase(args, "vae", args.vae_steps, ["loss", "loss_l1", "loss_kl"], [vae, optimizer], [schedule])
    vae, optimizer = phase.prepared
    f = 2 ** (len(args.vae_channels) - 1)
    print(f"[vae] AutoencoderKL f={f}: {sum(p.numel() for p in vae.parameters()):,} parameters", file=sys.stderr)
    val = to_float(data["val_images"][: args.num_sample_images])

    @torch.no_grad()
    def sample_grid(step):
        vae.eval()
        recon = vae.decode(vae.encode(val).latent_dist.mean).sample
        vae.train()
        common.save_image_grid([val, recon], phase.dir / "samples" / f"step-{step:07d}.png")

    side = latent_side(args)
    batches = phase.batches(len(data["train_images"]), args.vae_batch_size)
    for step in range(phase.start + 1, args.vae_steps + 1):
        pixels = to_float(data["train_images"][next(batches)])
        gen = common.step_generator(args.seed, step)
        noise = torch.randn(len(pixels), 4, side, side, generator=gen)
        loss, losses = vae_loss(vae, pixels, noise, args.kl_weight)
        clip_grad_and_step(phase, step, vae, optimizer, schedule, loss, losses)
        if phase.end_step(step, losses, schedule.get_last_lr()[0], len(pixels), sample_grid):
            return None, {}
    phase.finish(sample_grid)

    # scaling_factor = 1 / std of the training latents, so the U-Net sees unit-variance inputs (SD: 0.18215)
    vae.eval()
    with torch.no_grad():
        sample = to_float(data["train_images"][: 512])
        z = torch.cat([vae.encode(sample[i : i + 64]).latent_dist.mean for i in range(0, len(sample), 64)])
        val_all = to_float(data["val_images"])
        recon = evaluate.reconstruct(vae, val_all)
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    quality = {"steps": args.vae_steps, "val_psnr_db": round(evaluate.psnr_db(recon, val_all), 2), "val_l1": round(F.l1_loss(recon.clamp(-1, 1), val_all).item(), 4),
               "scaling_factor": vae.config.scaling_factor, "downsampling_factor": f, "n_val": len(val_all)}
    print(f"[vae] validation reconstruction: {quality}", file=sys.stderr)
    with common.atomic_dir(phase.dir / "final") as tmp:
        vae.save_pretrained(tmp)
        mark_done(tmp, quality)
    return vae, quality


# --- phase 2: CLIP text encoder + image tower ----------------------------------------------------


def clip_config(args, vocab_size: int):
    from transformers import CLIPConfig

    text = {"vocab_size": vocab_size, "hidden_size": args.text_width, "intermediate_size": 4 * args.text_width,
                "num_hidden_layers": args.text_layers, "num_attention_heads": max(1, args.text_width // 32),
                "max_position_embeddings": 77, "projection_dim": args.projection_dim, "bos_token_id": 49406, "eos_token_id": 49407,
                "pad_token_id": 49407}
    vision = {"hidden_size": args.vision_width, "intermediate_size": 4 * args.vision_width, "num_hidden_layers": args.vision_layers,
                  "num_attention_heads": max(1, args.vision_width // 32), "image_size": args.resolution, "patch_size": args.patch_size,
                  "projection_dim": args.projection_dim}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)


def tokenize(tokenizer, captions: list[str], padding="longest") -> torch.Tensor:
    return tokenizer(captions, padding=padding, max_length=77, truncation=True, return_tensors="pt").input_ids


def clip_loss(model, input_ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """CLIP's symmetric InfoNCE: cross-entropy of the image->text and text->image logits (scaled cosine
    similarities) against the diagonal (Radford et al. 2021, Fig. 3)."""
    out = model(input_ids=input_ids, pixel_values=pixels, return_loss=True)
    acc = (out.logits_per_image.argmax(1) == torch.arange(len(pixels))).float().mean()
    return out.loss, {"loss": out.loss.item(), "acc": acc.item()}


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """Top-1 image->caption retrieval of uint8 images over their captions (train/evaluate.py's metric)."""
    model.eval()
    text = evaluate.text_embeddings(model, tokenizer, captions)
    accuracy = evaluate.retrieval_accuracy(evaluate.image_embeddings(model, to_float(images)), text, captions)
    model.train()
    return accuracy


def text_encoder_of(model):
    """The text tower of a CLIPModel as a standalone CLIPTextModel (the pipeline's text_encoder/)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(model.config.text_config)
    text_encoder.load_state_dict(model.text_model.state_dict(), strict=True)  # transformers 5: CLIPModel.text_model is a CLIPTextModel
    return text_encoder


def train_clip(args, data, tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(args.seed)
    model = CLIPModel(clip_config(args, len(tokenizer))).train()
    optimizer, schedule = adamw(model, args.clip_lr, args.clip_steps, args.clip_decay_steps)
    phase = Phase(args, "clip", args.clip_steps, ["loss", "acc", "val_top1"], [model, optimizer], [schedule])
    model, optimizer = phase.prepared
    print(f"[clip] text tower {sum(p.numel() for p in model.text_model.parameters()):,}, image tower "
          f"{sum(p.numel() for p in model.vision_model.parameters()):,} parameters", file=sys.stderr)
    n_val = min(len(data["val_captions"]), 256)
    val_images, val_captions = data["val_images"][:n_val], data["val_captions"][:n_val]
    train_ids = tokenize(tokenizer, data["train_captions"], padding="max_length")

    def sample_grid(step):  # the text phase's "sample": validation retrieval, written to log.csv
        acc = retrieval_accuracy(model, tokenizer, val_images, val_captions)
        phase.log.write(step, {"val_top1": acc})
        print(f"[clip] step {step}: val top-1 image->caption retrieval {acc:.3f} over {n_val} (chance {1 / n_val:.3f})", file=sys.stderr)

    batches = phase.batches(len(train_ids), args.clip_batch_size)
    for step in range(phase.start + 1, args.clip_steps + 1):
        idx = next(batches)
        ids = train_ids[idx]
        ids = ids[:, : int((ids != tokenizer.pad_token_id).sum(1).max()) + 1]  # trim the shared padding (causal mask: same states)
        loss, losses = clip_loss(model, ids, to_float(data["train_images"][idx]))
        clip_grad_and_step(phase, step, model, optimizer, schedule, loss, losses)
        if phase.end_step(step, losses, schedule.get_last_lr()[0], len(idx), sample_grid):
            return None
    phase.finish(sample_grid)
    model.eval()
    text_encoder = text_encoder_of(model)
    info = {"steps": args.clip_steps, "val_top1": retrieval_accuracy(model, tokenizer, val_images, val_captions), "n_val": n_val}
    with common.atomic_dir(phase.dir / "final") as tmp:
        text_encoder.save_pretrained(tmp / "text_encoder")
        model.save_pretrained(tmp / "eval_tower")
        mark_done(tmp, info)
    with common.atomic_dir(Path(args.output_dir) / "eval_tower") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return text_encoder.eval().requires_grad_(False)


# --- phase 3: epsilon-prediction U-Net -----------------------------------------------------------


def unet_config(args, latent_side: int) -> dict:
    n = len(args.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)  # no attention at the highest resolution
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return {"sample_size": latent_side, "in_channels": 4, "out_channels": 4, "down_block_types": down, "up_block_types": up,
                "block_out_channels": tuple(args.unet_channels), "layers_per_block": args.unet_layers, "cross_attention_dim": args.text_width,
                "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
                "norm_num_groups": min(32, args.unet_channels[0])}


def unet_cache_key(output_dir: Path, data: dict) -> str:
    """What the U-Net cache is computed from: the finished VAE and text encoder (by content,
    common.model_fingerprint) and the training images and captions."""
    digest = hashlib.sha1()
    for folder in (output_dir / "vae" / "final", output_dir / "clip" / "final" / "text_encoder"):
        digest.update(common.model_fingerprint(folder).encode())
    digest.update(data["train_images"].numpy().tobytes())
    digest.update("\n".join(data["train_captions"]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def build_unet_cache(path: Path, vae, text_encoder, tokenizer, data, key: str = "") -> dict:
    """Posterior mean/std of every training image (fp16) and the text states of every distinct caption plus
    the empty one (fp16, (77, width)), saved once with `key` (unet_cache_key); a resumed run loads it when
    the key matches, and builds it again when the VAE, text encoder or data changed."""
    if path.is_file():
        cache = torch.load(path, weights_only=True)
        if cache.get("key") == key:
            return cache
        print(f"[unet] {path} was built from another VAE, text encoder or data set: building it again.", file=sys.stderr)
    mean, std = [], []
    images = data["train_images"]
    for i in range(0, len(images), 64):
        posterior = vae.encode(to_float(images[i : i + 64])).latent_dist
        mean.append(posterior.mean.half())
        std.append(posterior.std.half())
    captions = sorted(set(data["train_captions"]))
    index = {c: i + 1 for i, c in enumerate(captions)}  # row 0: the empty caption
    texts = [""] + captions
    states = [common.encode_prompts(tokenizer, text_encoder, texts[i : i + 128]) for i in range(0, len(texts), 128)]
    cache = {"mean": torch.cat(mean), "std": torch.cat(std), "states": torch.cat(states).half(),
             "caption_index": torch.tensor([index[c] for c in data["train_captions"]]), "key": key}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, tmp)
    os.replace(tmp, path)
    return cache


def diffusion_loss(unet, x0: torch.Tensor, states: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """DDPM simple loss ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2 (Ho et al. 2020, Eq. 14)."""
    x_t = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(unet(x_t, t, encoder_hidden_states=states).sample, noise)


def train_unet(args, data, vae, text_encoder, tokenizer):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    side = latent_side(args)
    cache = build_unet_cache(Path(args.output_dir) / "unet" / "cache.pt", vae, text_encoder, tokenizer, data,
                             unet_cache_key(Path(args.output_dir), data))
    sf = vae.config.scaling_factor
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**unet_config(args, side)).train()  # channels_last: measured no faster here
    ema = common.make_ema(unet, args.ema_decay)
    optimizer, schedule = adamw(unet, args.unet_lr, args.unet_steps, args.unet_decay_steps)
    phase = Phase(args, "unet", args.unet_steps, ["loss"], [unet, optimizer], [schedule] + ([ema] if ema is not None else []))
    unet, optimizer = phase.prepared
    print(f"[unet] UNet2DConditionModel on {side}x{side}x4 latents: {sum(p.numel() for p in unet.parameters()):,} parameters", file=sys.stderr)
    noise_scheduler = DDPMScheduler(**SD_BETAS)

    k = args.num_sample_images
    val_captions, val_images = data["val_captions"][:k], to_float(data["val_images"][:k])
    val_noise = torch.randn(k, 4, side, side, generator=torch.Generator().manual_seed(args.seed + 1))
    cond = common.encode_prompts(tokenizer, text_encoder, val_captions)
    uncond = common.encode_prompts(tokenizer, text_encoder, [""]).expand(k, -1, -1)

    @torch.no_grad()
    def sample_grid(step):
        """Rows: real val images; teacher samples for their captions (--sample_steps DPM-Solver++, --sample_guidance)."""
        model = ema if ema is not None else unet
        model.eval()
        latents = common.sample_latents(model, SD_BETAS, cond, uncond, val_noise, args.sample_steps, args.sample_guidance)
        model.train()
        common.save_image_grid([val_images, vae.decode(latents / sf).sample], phase.dir / "samples" / f"step-{step:07d}.png")

    batches = phase.batches(len(cache["mean"]), args.unet_batch_size)
    for step in range(phase.start + 1, args.unet_steps + 1):
        idx = torch.tensor(next(batches))
        gen = common.step_generator(args.seed, step)
        x0 = (cache["mean"][idx].float() + cache["std"][idx].float() * torch.randn(cache["mean"][idx].shape, generator=gen)) * sf
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout
        states = cache["states"][torch.where(drop, 0, cache["caption_index"][idx])].float()
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        loss = diffusion_loss(unet, x0, states, noise, t, noise_scheduler)
        if clip_grad_and_step(phase, step, unet, optimizer, schedule, loss, {}) and ema is not None:
            common.ema_update(ema, unet, args.ema_decay, step)
        if phase.end_step(step, {"loss": loss.item()}, schedule.get_last_lr()[0], len(idx), sample_grid):
            return None
    phase.finish(sample_grid)
    final = (ema if ema is not None else unet).eval()
    with common.atomic_dir(phase.dir / "final") as tmp:
        final.save_pretrained(tmp)
        mark_done(tmp, {"steps": args.unet_steps})
    return final


# --- the whole teacher ---------------------------------------------------------------------------


def final_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2)


def save_final_folder(dest: Path, text_encoder, unet, vae, eval_tower, tokenizer_dir, save_dtype: str) -> None:
    """The final folder: the pipeline, plus the evaluation network in eval_tower/ (diffusers ignores it).
    save_dtype applies to the U-Net, the VAE and eval_tower/. The text encoder stays fp32: diffusers
    loads fp16 files as fp32 unless told otherwise, transformers keeps the stored dtype, and a fp16 text
    encoder beside a fp32 U-Net breaks a plain `StableDiffusionPipeline.from_pretrained(folder)`."""
    from sdxs.build import save_pipeline_folder

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[save_dtype]
    components = {"scheduler": final_scheduler(), "text_encoder": text_encoder.float(), "unet": unet.to(dtype), "vae": vae.to(dtype)}
    save_pipeline_folder(components, tokenizer_dir, dest)
    eval_tower.to(dtype).save_pretrained(Path(dest) / "eval_tower")  # its tokenizer is the pipeline's tokenizer/


def main(argv: list[str] | None = None) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from sdxs.tokenizer import cached_clip_tokenizer_dir

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume and any(phase_done(output_dir, p) for p in PHASES):
        raise SystemExit(f"{output_dir} already holds finished phases of a run: pass --resume latest to continue it, or choose a new --output_dir.")
    common.quiet_libraries()
    common.set_cpu_threads(args.num_threads)
    config = common.run_config(args)
    if args.resume and (output_dir / "config.json").is_file():  # covers finished phases too, which have no checkpoint left to compare
        common.check_resume_settings(json.loads((output_dir / "config.json").read_text()), config, f"the run {output_dir}",
                                     output_dir, may_change=MAY_CHANGE)
    finished = {phase: phase_finished(output_dir, phase, getattr(args, f"{phase}_steps")) for phase in PHASES}  # refusals come first
    (output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    data_dir = Path(args.data) if args.data else make_synthetic_data(output_dir / "synthetic-data", args.resolution, seed=args.seed)
    for split in ("train", "val"):
        if not (data_dir / split / "metadata.jsonl").is_file():
            raise SystemExit(f"{data_dir / split} is not an imagefolder (no metadata.jsonl): --data takes the folder "
                             f"`python train/emoji_data.py --out DIR` writes, with train/ and val/.")
    train_images, train_captions, train_report = load_split(data_dir / "train", args.caption_column, args.resolution, args.max_bad_fraction)
    val_images, val_captions, val_report = load_split(data_dir / "val", args.caption_column, args.resolution, args.max_bad_fraction)
    data = {"train_images": train_images, "train_captions": train_captions, "val_images": val_images, "val_captions": val_captions}
    common.write_data_report(output_dir, {"train": train_report, "val": val_report})
    print(f"data: {len(train_captions)} train / {len(val_captions)} val images from {data_dir}", file=sys.stderr)
    tokenizer_dir = cached_clip_tokenizer_dir()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    if finished["vae"]:
        vae = AutoencoderKL.from_pretrained(output_dir / "vae" / "final")
    else:
        vae, _ = train_vae(args, data)
        if vae is None:
            return 0
    vae.eval().requires_grad_(False)
    if finished["clip"]:
        text_encoder = CLIPTextModel.from_pretrained(output_dir / "clip" / "final" / "text_encoder").eval()
    else:
        text_encoder = train_clip(args, data, tokenizer)
        if text_encoder is None:
            return 0
    if finished["unet"]:
        unet = UNet2DConditionModel.from_pretrained(output_dir / "unet" / "final")
    else:
        unet = train_unet(args, data, vae, text_encoder, tokenizer)
        if unet is None:
            return 0

    eval_tower = CLIPModel.from_pretrained(output_dir / "eval_tower")
    with common.atomic_dir(output_dir / "final") as tmp:
        save_final_folder(tmp, text_encoder, unet, vae, eval_tower, tokenizer_dir, args.save_dtype)
    print(f"Teacher pipeline saved to {output_dir / 'final'} (StableDiffusionPipeline.from_pretrained)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
