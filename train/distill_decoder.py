#!/usr/bin/env python
"""SDXS stage A (paper Sec. 3.1, Eq. 5): distil the teacher's VAE decoder into a tiny decoder.

Tiny run on a CPU (seconds; builds a tiny random teacher in OUT/tiny-teacher):
    python train/distill_decoder.py --preset smoke --output_dir outputs/decoder-smoke
The same for SDXL's latent space (a tiny SDXL-shaped teacher in OUT/tiny-sdxl-teacher; its latents
come from its sampler with SDXL's conditioning):
    python train/distill_decoder.py --preset smoke-sdxl --output_dir outputs/decoder-smoke-sdxl
Paper scale, 8 GPUs (see train/README.md):
    accelerate launch --multi_gpu --num_processes 8 train/distill_decoder.py --preset paper \\
        --teacher Lykon/dreamshaper-8 --prompts prompts.txt --output_dir outputs/decoder
Resume a killed run: the same command plus `--resume latest`.

What it does:
1. Latents z come from the teacher's own sampler on the prompts (DPM-Solver++ with CFG: the paper's
   "almost data-free" setting) or, faster, from encoding an image folder with the teacher VAE
   (--image_folder, --latents encode). The teacher's VAE decoder turns each z into its image x~.
   Both are cached to disk once (OUTPUT_DIR/cache or --cache_dir).
2. The student is a TAESD-shaped AutoencoderTiny: its decoder G is residual blocks + nearest
   upsampling, no attention, no normalisation (1.22 M parameters at the paper preset). It reads U-Net
   latents directly (scaling_factor 1.0), as the released SDXS vae/ does.
3. Loss (Eq. 5): L1 between 8x-downsampled G(z) and x~, plus lambda_GAN x a GAN loss. The paper gives
   neither the discriminator nor lambda_GAN; ours: a PatchGAN discriminator with spectral norm and
   hinge loss on full-resolution images (it supplies the high frequencies the 8x-downsampled L1 cannot
   see), switched on after --gan_start_step.
4. Optionally (--train_encoder) the tiny encoder learns to map x~ back to z (MSE), so the saved
   AutoencoderTiny is complete; without it the saved encoder is untrained (SDXS only decodes).
Output: OUTPUT_DIR/final/vae (an AutoencoderTiny folder) inside OUTPUT_DIR/final, a pipeline folder in
the released SDXS layout (--pipeline_base's parts + the new vae/), so
`python -m sdxs generate --model OUTPUT_DIR/final ...` runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from train import common

# Values: [paper] taken from the SDXS paper; [released] from the released SDXS vae/config.json;
# [ours] our choice (the paper gives none). See train/README.md.
PRESETS = {
    "smoke": dict(
        **common.SMOKE_RUN, lr=1e-3, max_steps=30, checkpoint_every=10,
        vae_channels=16, decoder_blocks=(1, 1, 1, 1), encoder_blocks=(1, 1, 1, 1), train_encoder=True,
        lambda_gan=0.1, gan_start_step=10, disc_channels=16, disc_layers=2, disc_lr=1e-3,
    ),
    "mini": dict(  # the emoji teacher v2's f=8 VAE (train/reproduce_mini.py); [ours] throughout
        **common.MINI_RUN, batch_size=32, lr=1e-3, ema_decay=0.999, max_steps=800, checkpoint_every=200, sample_every=400,
        vae_channels=32, decoder_blocks=(3, 3, 3, 1), encoder_blocks=(1, 3, 3, 3),  # TAESD's pattern at 32 channels: 0.31 M decoder
        train_encoder=True, lambda_gan=0.1, gan_start_step=400, disc_channels=32, disc_layers=2, disc_lr=2e-4,
    ),
    "paper": dict(
        resolution=512,  # [paper] SDXS-512
        num_samples=0,  # all prompts given
        sampler_steps=25, guidance_scale=7.5,  # [ours] teacher sampler for the latents
        batch_size=16, grad_accum=1,  # [ours] x 8 GPUs = 128 images per step
        lr=1e-4, lr_warmup_steps=500,  # [ours]
        mixed_precision="bf16", gradient_checkpointing=False, num_threads=0, ema_decay=0.999,  # [ours]
        max_steps=100_000, checkpoint_every=2000, keep_checkpoints=3, log_every=20, sample_every=1000,  # [ours]
        vae_channels=64, decoder_blocks=(3, 3, 3, 1), encoder_blocks=(1, 3, 3, 3),  # [released] TAESD shape, 1.22 M decoder
        train_encoder=True,  # [ours]
        lambda_gan=0.1, gan_start_step=10_000,  # [ours] (Eq. 5 leaves lambda_GAN open)
        disc_channels=64, disc_layers=3, disc_lr=1e-4,  # [ours]
    ),
}
PRESETS["smoke-sdxl"] = PRESETS["smoke"]  # the same run on the tiny SDXL-shaped teacher's latent space
PRESETS["paper-1024"] = dict(  # a TAESDXL-shaped decoder for SDXL's latent space (--teacher stabilityai/stable-diffusion-xl-base-1.0)
    PRESETS["paper"],
    resolution=1024,  # [paper] SDXS-1024
    guidance_scale=5.0,  # [ours] SDXL base's own CFG scale
    batch_size=4,  # [ours] x 8 GPUs = 32 images of 1024^2 per step
)
LOSSES = ["loss", "loss_l1", "loss_gan_g", "loss_d", "loss_enc"]


# --- models --------------------------------------------------------------------------------------


def make_student_vae(*, channels: int, decoder_blocks: tuple[int, ...], encoder_blocks: tuple[int, ...], init_from: str | None = None):
    """The student: a TAESD-shaped AutoencoderTiny (residual conv blocks + upsampling; no attention, no
    normalisation), scaling_factor 1.0 so it decodes U-Net latents as they are. `init_from` starts from
    an existing AutoencoderTiny (hub id or folder) instead of random weights."""
    from diffusers import AutoencoderTiny

    from sdxs import architectures as arch

    if init_from:
        return AutoencoderTiny.from_pretrained(common.resolve_model(init_from, "--init_vae", subfolders_with_weights=("",)))
    return AutoencoderTiny(**dict(arch.TAESD, encoder_block_out_channels=(channels,) * len(encoder_blocks),
                                  decoder_block_out_channels=(channels,) * len(decoder_blocks),
                                  num_encoder_blocks=tuple(encoder_blocks), num_decoder_blocks=tuple(decoder_blocks)))


class PatchDiscriminator(nn.Module):
    """D of Eq. 5 (our choice): a PatchGAN (Isola et al. 2017) of strided 4x4 convolutions with
    spectral normalisation (Miyato et al. 2018) and LeakyReLU, no normalisation layers; it gives one
    real/fake logit per overlapping patch of the full-resolution image."""

    def __init__(self, channels: int = 64, num_layers: int = 3):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, c_in = [], 3
        for i in range(num_layers):
            c_out = channels * min(2**i, 8)
            layers += [sn(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers.append(sn(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


# --- losses --------------------------------------------------------------------------------------


def l1_downsampled(fake: torch.Tensor, target: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Eq. 5, first term: || down8(G(z)) - down8(x~) ||_1 (area downsampling to the latent resolution:
    `factor` is the VAE's, 8 for SD)."""
    return F.l1_loss(F.avg_pool2d(fake.float(), factor), F.avg_pool2d(target.float(), factor))


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5, L_GAN for G (hinge form): -E[D(G(z))]."""
    return -fake_logits.float().mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 5, L_GAN for D (hinge form): E[relu(1 - D(x~))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def encoder_loss(pred_latents: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Not in the paper: MSE of the tiny encoder's E(x~) to the teacher latents z (completes the AutoencoderTiny)."""
    return F.mse_loss(pred_latents.float(), latents.float())


# --- one optimisation step -----------------------------------------------------------------------


def gan_weight(step: int, lambda_gan: float, gan_start_step: int) -> float:
    """lambda_GAN of Eq. 5 at optimizer step `step` (1-based): 0 up to --gan_start_step (the decoder first
    learns the coarse image from the L1 term alone; D does not train either), --lambda_gan after it."""
    return lambda_gan if step > gan_start_step else 0.0


def decoder_step(decoder, encoder, disc, latents: torch.Tensor, teacher_images: torch.Tensor, *, lambda_gan: float,
                 encoder_weight: float, factor: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The decoder's loss on one micro-batch, Eq. 5: L1(down8(G(z)), down8(x~)) + lambda_GAN * L_GAN(D(G(z))),
    x~ = the teacher decoder's image of the same latents z; plus, with an encoder, encoder_weight * MSE(E(x~), z).
    `disc` (the unwrapped D) is frozen while it judges G(z): its own update is discriminator_step's.
    Returns (the loss terms and their total "loss", G(z) for D's step)."""
    fake = decoder(latents)
    losses = {"loss_l1": l1_downsampled(fake, teacher_images, factor)}  # Eq. 5, L1 term
    loss = losses["loss_l1"]
    if lambda_gan > 0:
        disc.requires_grad_(False)  # G's step must not touch D
        losses["loss_gan_g"] = gan_generator_loss(disc(fake))
        disc.requires_grad_(True)
        loss = loss + lambda_gan * losses["loss_gan_g"]  # Eq. 5, + lambda_GAN * L_GAN
    if encoder is not None:
        losses["loss_enc"] = encoder_loss(encoder(teacher_images), latents)
        loss = loss + encoder_weight * losses["loss_enc"]
    losses["loss"] = loss
    return losses, fake


def discriminator_step(disc, teacher_images: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss on one micro-batch (Eq. 5, hinge): the teacher decoder's images x~ are real, the student's
    G(z) fake. G(z) is detached: D's step must not reach the decoder."""
    return gan_discriminator_loss(disc(teacher_images), disc(fake.detach()))



def add_mean(sums: dict[str, float], losses: dict[str, torch.Tensor], grad_accum: int) -> None:
    """Add one micro-step's loss values to the step's running means (what the log and the guard see)."""
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + v.detach().float().item() / grad_accum


# --- arguments -----------------------------------------------------------------------------------


def int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train/distill_decoder.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser)

    student = parser.add_argument_group("student decoder (AutoencoderTiny)")
    student.add_argument("--vae_channels", type=int, help="channels of every encoder/decoder stage (preset)")
    student.add_argument("--decoder_blocks", type=int_tuple, help="residual blocks per decoder stage, comma-separated (preset)")
    student.add_argument("--encoder_blocks", type=int_tuple, help="residual blocks per encoder stage, comma-separated (preset)")
    student.add_argument("--init_vae", default=None,
                         help="start from this AutoencoderTiny (hub id or folder, e.g. madebyollin/taesd) instead of random weights; "
                              "its shape then overrides --vae_channels/--*_blocks")
    student.add_argument("--train_encoder", action=argparse.BooleanOptionalAction,
                         help="also train the tiny encoder (MSE to the teacher latents) so the saved AutoencoderTiny is complete (preset)")
    student.add_argument("--encoder_weight", type=float, default=1.0, help="weight of the encoder MSE in the loss (default 1.0)")

    gan = parser.add_argument_group("GAN term of Eq. 5")
    gan.add_argument("--lambda_gan", type=float, help="lambda_GAN, weight of the generator's GAN loss; 0 = L1 only (preset)")
    gan.add_argument("--gan_start_step", type=int, help="the GAN term (and D's training) starts after this step (preset)")
    gan.add_argument("--disc_channels", type=int, help="channels of the discriminator's first layer (doubling per layer) (preset)")
    gan.add_argument("--disc_layers", type=int, help="strided layers of the discriminator (preset)")
    gan.add_argument("--disc_lr", type=float, help="AdamW learning rate of the discriminator (preset)")

    out = parser.add_argument_group("output")
    out.add_argument("--pipeline_base", default="teacher",
                     help="write OUTPUT_DIR/final as a full pipeline: this pipeline's text encoder, tokenizer and U-Net plus the new "
                          "vae/ (its AutoencoderKL goes to vae_large/). 'teacher' (default), a hub id or folder (e.g. a stage-B "
                          "output or IDKiro/sdxs-512-dreamshaper), or 'none' for OUTPUT_DIR/final/vae alone")
    return parser


# --- training ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args(build_parser(), PRESETS, argv)
    output_dir, accelerator, config = common.start_run(args)
    main_process = accelerator.is_main_process

    # --- data: teacher latents and the teacher decoder's images, cached once -------------------
    teacher_id = common.resolve_teacher(args.teacher, args.preset, output_dir, accelerator)
    teacher_root = common.resolve_model(teacher_id, "--teacher", subfolders_with_weights=("unet", "text_encoder", "vae"))
    # resolved now, to fail early rather than after training
    pipeline_base = (None if args.pipeline_base == "none" else teacher_root if args.pipeline_base == "teacher"
                     else common.resolve_model(args.pipeline_base, "--pipeline_base", subfolders_with_weights=("unet", "text_encoder", "vae")))
    factor = common.teacher_vae_factor(teacher_root)  # the student decodes the teacher's latents: same upscaling
    stages = factor.bit_length()  # a TAESD-shaped decoder upsamples 2x between stages: factor = 2 ** (stages - 1)
    if args.init_vae is None and (len(args.decoder_blocks), len(args.encoder_blocks)) != (stages, stages):
        raise SystemExit(f"error: the teacher's VAE works at {factor}x ({args.resolution} px images, {args.resolution // factor} px "
                         f"latents), so the student needs {stages} decoder and encoder stages; got --decoder_blocks "
                         f"{','.join(map(str, args.decoder_blocks))} and --encoder_blocks {','.join(map(str, args.encoder_blocks))}. "
                         f"Give e.g. --decoder_blocks {','.join(['3'] * (stages - 1) + ['1'])} --encoder_blocks {','.join(['1'] + ['3'] * (stages - 1))}.")
    source = common.read_sources(args.prompts, args.image_folder, args.caption_column, args.latents, args.num_samples,
                                 common.SMOKE_PROMPTS if common.is_smoke(args.preset) else None, max_bad_fraction=args.max_bad_fraction)
    cache = common.cache_folder(args.cache_dir or output_dir / "cache", teacher_root, source, resolution=args.resolution,
                                sampler_steps=args.sampler_steps, guidance_scale=args.guidance_scale, with_images=True, seed=args.seed)
    if not common.cache_is_complete(cache):
        teacher = common.load_teacher(str(teacher_root), accelerator.device, common.weight_dtype(args.mixed_precision),
                                      unet=source.mode == "sample")
        common.build_latent_cache(teacher, source, cache, resolution=args.resolution, sampler_steps=args.sampler_steps,
                                  guidance_scale=args.guidance_scale, with_images=True, seed=args.seed,
                                  batch_size=args.cache_batch_size, accelerator=accelerator)
        del teacher  # training needs only the cache
    dataset = common.CachedSamples(cache)

    # --- models, optimizers, accelerate ----------------------------------------------------------
    vae = make_student_vae(channels=args.vae_channels, decoder_blocks=args.decoder_blocks, encoder_blocks=args.encoder_blocks,
                           init_from=args.init_vae).train()
    if args.gradient_checkpointing:
        # decoder only: diffusers' EncoderTiny skips its [-1,1] -> [0,1] input scaling under checkpointing
        vae.enable_gradient_checkpointing()
        vae.encoder.gradient_checkpointing = False
    disc = PatchDiscriminator(args.disc_channels, args.disc_layers).train()
    ema = common.make_ema(vae, args.ema_decay)
    trained = list(vae.decoder.parameters()) + (list(vae.encoder.parameters()) if args.train_encoder else [])
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.999))
    lr_schedules = [common.warmup_then_constant(optimizer, args.lr_warmup_steps), common.warmup_then_constant(disc_optimizer, args.lr_warmup_steps)]
    # The decoder and encoder are prepared as separate modules: an unused encoder would stall DDP.
    models = [vae.decoder, vae.encoder] if args.train_encoder else [vae.decoder]
    *models, disc, optimizer, disc_optimizer = accelerator.prepare(*models, disc, optimizer, disc_optimizer)
    decoder, encoder = models[0], models[1] if args.train_encoder else None
    for obj in [*lr_schedules, *([ema] if ema is not None else [])]:
        accelerator.register_for_checkpointing(obj)
    if ema is not None:
        ema.to(accelerator.device)

    start_step = common.resume_step(accelerator, output_dir, args.resume, config)

    batches = common.make_loader(dataset, args.batch_size, seed=args.seed, first_micro_step=start_step * args.grad_accum,
                                 accelerator=accelerator, num_workers=args.num_workers, overfit=args.overfit_batch)
    val = common.collate([dataset[i % len(dataset)] for i in range(args.num_sample_images)])
    log = common.CsvLog(output_dir / "log.csv", ["lr", "samples_per_s", *LOSSES], start_step, enabled=main_process)
    if args.report_to != "none":
        accelerator.init_trackers("distill_decoder", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})
    progress = common.Progress(args.max_steps, start_step, "stage A decoder", enabled=accelerator.is_local_main_process)
    raw_disc = accelerator.unwrap_model(disc)

    def sample_grid(step: int) -> None:
        """Rows: teacher decoder images x~, student G(z) (EMA when on), and student decode(encode(x~))."""
        student = ema if ema is not None else vae
        student.eval()
        with torch.no_grad():
            rows = [val["image"], student.decoder(val["latents"].to(accelerator.device))]
            if args.train_encoder:
                rows.append(student.decoder(student.encoder(val["image"].to(accelerator.device))))
        student.train()
        common.save_image_grid(rows, output_dir / "samples" / f"step-{step:07d}.png")

    # --- loop --------------------------------------------------------------------------------------
    # one guard per optimizer: each may skip --skip_nonfinite updates, and each stop message names its LR flag
    guard, disc_guard = common.FiniteGuard(args.skip_nonfinite, output_dir), common.FiniteGuard(args.skip_nonfinite, output_dir, "--disc_lr")
    tick, seen = time.perf_counter(), 0
    for step in range(start_step + 1, args.max_steps + 1):
        lambda_gan = gan_weight(step, args.lambda_gan, args.gan_start_step)
        sums, decoder_updated, disc_updated = {}, False, False
        for _ in range(args.grad_accum):
            batch = next(batches)
            z = batch["latents"].to(accelerator.device)
            teacher_images = batch["image"].to(accelerator.device)  # x~: the teacher decoder's image of these z (cached)
            with accelerator.accumulate(*models, disc):
                losses, fake = decoder_step(decoder, encoder, raw_disc, z, teacher_images, lambda_gan=lambda_gan,
                                            encoder_weight=args.encoder_weight, factor=factor)
                accelerator.backward(losses["loss"])
                add_mean(sums, losses, args.grad_accum)
                if accelerator.sync_gradients:
                    decoder_updated = common.guarded_update(accelerator, optimizer, trained, guard, step, {k: sums[k] for k in losses},
                                                            args.max_grad_norm, "decoder")
                if lambda_gan > 0:  # D trains from the GAN start on
                    loss_d = discriminator_step(disc, teacher_images, fake)
                    accelerator.backward(loss_d)
                    add_mean(sums, {"loss_d": loss_d}, args.grad_accum)
                    if accelerator.sync_gradients:  # D's gradients are not clipped (max_grad_norm 0: the norm only)
                        disc_updated = common.guarded_update(accelerator, disc_optimizer, disc.parameters(), disc_guard, step,
                                                            {"loss_d": sums["loss_d"]}, 0.0, "discriminator")
            seen += len(z) * accelerator.num_processes
        if decoder_updated:  # a skipped update (--skip_nonfinite) steps neither the schedule nor the EMA
            lr_schedules[0].step()
            if ema is not None:
                common.ema_update(ema, vae, args.ema_decay, step)
        if disc_updated:  # D's warm-up counts from the GAN start
            lr_schedules[1].step()

        progress.update({k.removeprefix("loss_") if k != "loss" else k: v for k, v in sums.items()})
        if step % args.log_every == 0 or step == args.max_steps:
            values = common.process_mean(accelerator, sums)
            elapsed = time.perf_counter() - tick
            row = {"lr": lr_schedules[0].get_last_lr()[0], "samples_per_s": seen / max(elapsed, 1e-9), **values}
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
        student = (ema if ema is not None else vae).to("cpu").eval()
        final = output_dir / "final"
        if pipeline_base is None:
            with common.atomic_dir(final) as tmp:
                student.save_pretrained(tmp / "vae")
        else:
            common.save_sdxs_pipeline(final, pipeline_base, tiny_vae=student)
        print(f"Tiny decoder saved to {final / 'vae'}" + (f" (pipeline folder: {final})" if args.pipeline_base != "none" else ""),
              file=sys.stderr)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    from sdxs.loading import ModelNotFoundError

    try:
        sys.exit(main())
    except ModelNotFoundError as err:  # a teacher/decoder that is neither a folder nor fetchable: say what to do
        sys.exit(f"error: {err}")
