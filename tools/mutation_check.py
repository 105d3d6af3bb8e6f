#!/usr/bin/env python
"""Apply deliberate bugs to the training code, one at a time, and report which ones the tests catch.

    python tools/mutation_check.py                  # every mutation; prints a markdown table
    python tools/mutation_check.py --only swap_score_difference_args
    python tools/mutation_check.py --list

Each mutation replaces one exact piece of source text (it must occur exactly once) in a temporary copy
of the repository's tracked files, then runs the test files named for it there. A mutation is "caught"
when those tests fail. One that survives means a plausible wiring bug would ship unnoticed: add a test.
The latest output is kept in train/README.md ("Tests that catch mis-wired losses").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path relative to the repository root
    old: str  # exact source text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids) that must go red
    why: str  # the bug it stands for, in a few words


STAGE_A = ("tests/test_distill_decoder.py",)
STAGE_B = ("tests/test_distill_unet.py",)
STAGE_C = ("tests/test_distill_one_step.py",)
COMMON = ("tests/test_train_common.py",)
TEACHER = ("tests/test_train_teacher.py",)

MUTATIONS: list[Mutation] = [
    # --- shared base (train/common.py) ---------------------------------------------------------------
    Mutation("guarded_update_without_guard", "train/common.py",
             "take = guard.check(step, terms, grad_norm if scaler is None else None, model=model, accelerator=accelerator)",
             "take = True",
             ("tests/test_train_common.py::test_guarded_update_skips_a_non_finite_gradient_norm_even_with_a_finite_loss",),
             "every stage steps its optimizers without the finite-loss guard (NaN weights reach the model)"),
    Mutation("guarded_update_ignores_grad_norm", "train/common.py",
             "take = guard.check(step, terms, grad_norm if scaler is None else None, model=model, accelerator=accelerator)",
             "take = guard.check(step, terms, None, model=model, accelerator=accelerator)",
             ("tests/test_train_common.py::test_guarded_update_skips_a_non_finite_gradient_norm_even_with_a_finite_loss",),
             "the shared update helper shows the guard the losses but not the gradient norm"),
    Mutation("guarded_update_skip_still_steps", "train/common.py",
             "    if take:\n        optimizer.step()\n    elif scaler is not None:",
             "    optimizer.step()\n    if not take and scaler is not None:",
             ("tests/test_train_common.py::test_guarded_update_skips_a_non_finite_gradient_norm_even_with_a_finite_loss",),
             "a skipped (non-finite) update still steps the optimizer"),
    Mutation("guard_check_inverted", "train/common.py",
             'for name, value in values.items() if not math.isfinite(value)]',
             'for name, value in values.items() if math.isfinite(value)]',
             (f"{COMMON[0]}::test_finite_guard_skips_then_stops_naming_the_step_and_term",),
             "FiniteGuard flags the finite terms instead of the non-finite ones"),
    Mutation("guard_ignores_grad_norm", "train/common.py",
             '        if grad_norm is not None:\n            values["gradient norm"] = float(grad_norm)\n',
             '',
             (f"{COMMON[0]}::test_finite_guard_skips_then_stops_naming_the_step_and_term",),
             "FiniteGuard checks the losses but not the gradient norm"),
    Mutation("guard_skips_one_too_many", "train/common.py",
             'if self.skipped < self.max_skips:',
             'if self.skipped <= self.max_skips:',
             (f"{COMMON[0]}::test_finite_guard_skips_then_stops_naming_the_step_and_term",),
             "--skip_nonfinite N skips N + 1 bad steps"),
    Mutation("checkpoint_of_nonfinite_weights_written", "train/common.py",
             '    refuse_nonfinite_weights(accelerator, output_dir, step)\n',
             '',
             (f"{COMMON[0]}::test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_good_ones",),
             "save_checkpoint writes NaN weights (and rotates a good checkpoint out)"),
    Mutation("nonfinite_check_skips_registered_modules", "train/common.py",
             '    modules.update({f"{type(m).__name__}#registered{i}": m for i, m in enumerate(accelerator._custom_objects)\n'
             '                    if isinstance(m, torch.nn.Module)})\n',
             '',
             (f"{COMMON[0]}::test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_good_ones",),
             "the non-finite check of save_checkpoint misses the EMA"),
    Mutation("keep_k_deletes_the_newest", "train/common.py",
             'for old in _complete_checkpoints(output_dir)[:-keep]',
             'for old in _complete_checkpoints(output_dir)[::-1][:-keep]',
             (f"{COMMON[0]}::test_checkpoints_are_atomic_keep_the_last_k_and_restore",),
             "checkpoint rotation deletes the newest checkpoints instead of the oldest"),
    Mutation("resume_compares_the_wrong_config", "train/common.py",
             'check_resume_settings(meta["config"], config,',
             'check_resume_settings(config, config,',
             (f"{COMMON[0]}::test_resume_with_a_changed_batch_size_is_refused_unless_allowed",),
             "load_checkpoint compares the run's settings with themselves: a changed batch size mixes two runs"),
    Mutation("resume_ignores_allow_changed", "train/common.py",
             'refused = [k for k in changed if k not in allowed]',
             'refused = list(changed)',
             (f"{COMMON[0]}::test_resume_with_a_changed_batch_size_is_refused_unless_allowed",),
             "--allow_changed has no effect"),
    Mutation("resume_allows_every_change", "train/common.py",
             'refused = [k for k in changed if k not in allowed]',
             'refused = []',
             (f"{COMMON[0]}::test_check_resume_settings_rules",),
             "resume only warns about changed settings (the old behaviour)"),
    Mutation("step_sampler_rank_offset", "train/common.py",
             '+ self.rank * self.batch_size',
             '+ self.rank',
             (f"{COMMON[0]}::test_step_sampler_resumes_and_shards",),
             "processes read overlapping slices of the global batch"),
    Mutation("ema_warmup_inverted", "train/common.py",
             'return min(decay, (1 + step) / (10 + step))',
             'return max(decay, (1 + step) / (10 + step))',
             (f"{COMMON[0]}::test_ema_update",),
             "EMA decay warm-up takes the larger decay (the EMA barely moves)"),
    Mutation("bad_records_undercounted", "train/common.py",
             'return len(self.undecodable) + len(self.no_caption)',
             'return len(self.undecodable)',
             (f"{COMMON[0]}::test_image_folder_skips_counts_and_names_each_kind_of_bad_record",),
             "records without a caption are dropped but not counted against --max_bad_fraction"),
    Mutation("bad_fraction_limit_exclusive", "train/common.py",
             'report.skipped <= max_bad_fraction * report.examined',
             'report.skipped < max_bad_fraction * report.examined',
             (f"{COMMON[0]}::test_image_folder_refuses_above_max_bad_fraction",),
             "a folder exactly at --max_bad_fraction is refused"),
    Mutation("empty_caption_accepted", "train/common.py",
             'if not isinstance(caption, str) or not caption.strip():',
             'if not isinstance(caption, str):',
             (f"{COMMON[0]}::test_image_folder_skips_counts_and_names_each_kind_of_bad_record",),
             "an empty caption is accepted as a record"),
    Mutation("image_check_without_decoding", "train/common.py",
             '        with Image.open(path) as image:  # verify() leaves the image unusable: open it again to decode\n'
             '            image.load()\n',
             '',
             (f"{COMMON[0]}::test_check_image_catches_cut_files_of_both_formats",),
             "images are only verify()'d: a truncated JPEG passes the check and crashes the run later"),
    Mutation("unlisted_images_ignored", "train/common.py",
             'if os.path.normpath(path) not in seen:',
             'if False:',
             (f"{COMMON[0]}::test_image_folder_skips_counts_and_names_each_kind_of_bad_record",),
             "an image with no metadata line is silently ignored"),
    Mutation("data_summary_not_printed", "train/common.py",
             '        print(report.summary(), file=sys.stderr)\n',
             '',
             (f"{COMMON[0]}::test_stage_run_on_a_folder_with_bad_records_skips_and_reports_them",),
             "skipped records are not reported"),
    Mutation("data_report_not_in_cache_meta", "train/common.py",
             'json.dumps({**settings, "data_report": source.report}, indent=2)',
             'json.dumps(settings, indent=2)',
             (f"{COMMON[0]}::test_stage_run_on_a_folder_with_bad_records_skips_and_reports_them",),
             "the skipped-record counts are missing from the cache's meta.json"),
    Mutation("fingerprint_ignores_weights", "train/common.py",
             '            digest.update(_safetensors_sample(path))\n',
             '            pass\n',
             (f"{COMMON[0]}::test_model_fingerprint_follows_the_weights_not_the_path",),
             "a teacher retrained at the same path reuses the stale cache"),
    Mutation("fingerprint_header_only", "train/common.py",
             '                    sample.append(f.read(min(64, end - offset)))\n',
             '                    pass\n',
             (f"{COMMON[0]}::test_model_fingerprint_follows_the_weights_not_the_path",),
             "the fingerprint hashes the safetensors header only (same shapes: same fingerprint)"),
    Mutation("cache_key_without_teacher_content", "train/common.py",
             'teacher_content=model_fingerprint(teacher_root), ',
             '',
             (f"{COMMON[0]}::test_model_fingerprint_follows_the_weights_not_the_path",),
             "the teacher cache is keyed by the teacher's path only"),
    Mutation("model_error_says_model", "train/common.py",
             'str(err).replace("--model", flag)',
             'str(err)',
             (f"{COMMON[0]}::test_model_errors_name_the_training_flag",),
             "a missing teacher is reported as 'pass --model DIR' (not a flag of train/)"),
    # --- stage A (train/distill_decoder.py) ---------------------------------------------------------
    Mutation("decoder_l1_full_resolution", "train/distill_decoder.py",
             'losses = {"loss_l1": l1_downsampled(fake, teacher_images, factor)}',
             'losses = {"loss_l1": F.l1_loss(fake, teacher_images)}',
             (f"{STAGE_A[0]}::test_decoder_step_is_eq5_against_the_teacher_image_of_the_same_latents",),
             "Eq. 5's L1 on full-resolution images instead of 8x-downsampled ones"),
    Mutation("l1_downsampling_factor_1", "train/distill_decoder.py",
             "def l1_downsampled(fake: torch.Tensor, target: torch.Tensor, factor: int = 8)",
             "def l1_downsampled(fake: torch.Tensor, target: torch.Tensor, factor: int = 1)",
             STAGE_A[:1],
             "l1_downsampled's default factor 1 (no downsampling)"),
    Mutation("decoder_target_from_another_sample", "train/distill_decoder.py",
             'teacher_images = batch["image"].to(accelerator.device)',
             'teacher_images = batch["image"].roll(1, 0).to(accelerator.device)',
             (f"{STAGE_A[0]}::test_main_feeds_the_teacher_image_of_the_same_latents_gan_after_its_start_and_one_lr_step",),
             "main() pairs G(z_i) with the teacher image of another sample"),
    Mutation("disc_real_fake_swapped", "train/distill_decoder.py",
             "gan_discriminator_loss(disc(teacher_images), disc(fake.detach()))",
             "gan_discriminator_loss(disc(fake.detach()), disc(teacher_images))",
             STAGE_A[:1],
             "D learns the student's images as real and the teacher's as fake"),
    Mutation("disc_step_fake_not_detached", "train/distill_decoder.py",
             "disc(fake.detach()))",
             "disc(fake))",
             STAGE_A[:1],
             "D's step back-propagates into the decoder (G(z) not detached)"),
    Mutation("disc_not_frozen_in_decoder_step", "train/distill_decoder.py",
             "        disc.requires_grad_(False)  # G's step must not touch D\n",
             "",
             (f"{STAGE_A[0]}::test_decoder_step_leaves_d_alone_and_discriminator_step_leaves_the_decoder_alone",),
             "the generator's GAN term leaves gradients in D"),
    Mutation("gan_start_step_ignored", "train/distill_decoder.py",
             "return lambda_gan if step > gan_start_step else 0.0",
             "return lambda_gan",
             STAGE_A[:1],
             "the GAN term (and D's training) runs from step 1, ignoring --gan_start_step"),
    Mutation("gan_start_step_off_by_one", "train/distill_decoder.py",
             "return lambda_gan if step > gan_start_step else 0.0",
             "return lambda_gan if step >= gan_start_step else 0.0",
             (f"{STAGE_A[0]}::test_gan_term_starts_after_gan_start_step",),
             "the GAN term starts one step early"),
    Mutation("lambda_gan_ignored", "train/distill_decoder.py",
             'loss = loss + lambda_gan * losses["loss_gan_g"]',
             'loss = loss + losses["loss_gan_g"]',
             STAGE_A[:1],
             "the generator's GAN term added with weight 1 instead of lambda_GAN"),
    Mutation("generator_gan_term_on_teacher_images", "train/distill_decoder.py",
             'losses["loss_gan_g"] = gan_generator_loss(disc(fake))',
             'losses["loss_gan_g"] = gan_generator_loss(disc(teacher_images))',
             STAGE_A[:1],
             "the generator's GAN loss judges the teacher's images, not G(z) (no gradient to G)"),
    Mutation("generator_gan_sign_flipped", "train/distill_decoder.py",
             "return -fake_logits.float().mean()",
             "return fake_logits.float().mean()",
             STAGE_A[:1],
             "the generator's GAN term pushes G(z) toward 'fake'"),
    Mutation("encoder_weight_ignored", "train/distill_decoder.py",
             'loss = loss + encoder_weight * losses["loss_enc"]',
             'loss = loss + losses["loss_enc"]',
             STAGE_A[:1],
             "--encoder_weight has no effect"),
    Mutation("decoder_update_unguarded", "train/distill_decoder.py",
             "decoder_updated = common.guarded_update(accelerator, optimizer, trained, guard, step,",
             "decoder_updated = common.guarded_update(accelerator, optimizer, trained, common.FiniteGuard(10**9, output_dir), step,",
             (f"{STAGE_A[0]}::test_lr_1e6_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint",),
             "stage A's decoder update gets a guard that never stops: NaN weights are trained on"),
    Mutation("disc_update_unguarded", "train/distill_decoder.py",
             "disc_updated = common.guarded_update(accelerator, disc_optimizer, disc.parameters(), disc_guard, step,",
             "disc_updated = common.guarded_update(accelerator, disc_optimizer, disc.parameters(), common.FiniteGuard(10**9, output_dir), step,",
             (f"{STAGE_A[0]}::test_a_non_finite_discriminator_loss_stops_naming_the_discriminator_and_its_lr_flag",),
             "a NaN discriminator loss is skipped forever instead of stopping the run"),
    Mutation("decoder_lr_schedule_double_step", "train/distill_decoder.py",
             "            lr_schedules[0].step()\n",
             "            lr_schedules[0].step()\n            lr_schedules[0].step()\n",
             STAGE_A[:1],
             "stage A's decoder LR schedule stepped twice per step"),
    Mutation("decoder_max_bad_fraction_ignored", "train/distill_decoder.py",
             "common.SMOKE_PROMPTS if args.preset == \"smoke\" else None, max_bad_fraction=args.max_bad_fraction)",
             "common.SMOKE_PROMPTS if args.preset == \"smoke\" else None)",
             (f"{STAGE_A[0]}::test_model_and_data_flags_reach_main",),
             "stage A ignores --max_bad_fraction (always the default 5%)"),
    # --- stage B (train/distill_unet.py) -------------------------------------------------------------
    Mutation("kd_update_unguarded", "train/distill_unet.py",
             "optimizer, student.parameters(), guard, step, sums,",
             "optimizer, student.parameters(), common.FiniteGuard(10**9, output_dir), step, sums,",
             (f"{STAGE_B[0]}::test_lr_1e6_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint",),
             "stage B's update gets a guard that never stops: NaN weights are trained on"),
    Mutation("kd_lr_schedule_double_step", "train/distill_unet.py",
             "            lr_schedule.step()\n",
             "            lr_schedule.step()\n            lr_schedule.step()\n",
             (f"{STAGE_B[0]}::test_main_feeds_kd_step_and_steps_the_lr_schedule_once_per_optimizer_step",),
             "stage B's LR scheduler stepped twice per step (invisible without warm-up)"),
    Mutation("kd_lr_schedule_on_skipped_updates", "train/distill_unet.py",
             "        if updated:  # once per optimizer step",
             "        if True:  # once per optimizer step",
             (f"{STAGE_B[0]}::test_skip_nonfinite_skips_the_update_and_its_schedule_step_then_stops",),
             "a skipped (non-finite) update still steps the LR schedule and the EMA"),
    Mutation("kd_feature_pairs_shifted", "train/distill_unet.py",
             'pairs + [(f"up_blocks.{j}", f"up_blocks.{j + 1}", "out") for j in range(n - 1)]',
             'pairs + [(f"up_blocks.{j}", f"up_blocks.{min(j + 2, n - 1)}", "out") for j in range(n - 1)]',
             STAGE_B[:1],
             "feature KD compares student up blocks with the wrong teacher up blocks"),
    Mutation("kd_pre_downsample_state_after_downsampler", "train/distill_unet.py",
             'output[1][-2] if take == "pre_downsample"',
             'output[0] if take == "pre_downsample"',
             STAGE_B[:1],
             "the last student down block compared with its teacher block after the downsampler"),
    Mutation("kd_output_other_sample", "train/distill_unet.py",
             "loss_out = output_kd_loss(student_eps, teacher_eps)",
             "loss_out = output_kd_loss(student_eps, teacher_eps.roll(1, 0))",
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "output KD against another sample's teacher eps"),
    Mutation("kd_teacher_other_timestep", "train/distill_unet.py",
             "teacher_unet(x_t.to(teacher_unet.dtype), t, encoder_hidden_states=states)",
             "teacher_unet(x_t.to(teacher_unet.dtype), t.flip(0), encoder_hidden_states=states)",
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "the teacher sees other timesteps than the student"),
    Mutation("kd_student_other_states", "train/distill_unet.py",
             "student_eps = student(x_t, t, encoder_hidden_states=states).sample",
             "student_eps = student(x_t, t, encoder_hidden_states=states.roll(1, 0)).sample",
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "the student conditioned on another sample's caption"),
    Mutation("kd_teacher_without_no_grad", "train/distill_unet.py",
             "with torch.no_grad(), hooks.teacher.capture():",
             "with hooks.teacher.capture():",
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "the teacher runs with gradients (trained if its weights require them)"),
    Mutation("kd_detach_on_the_student", "train/distill_unet.py",
             "loss_out = output_kd_loss(student_eps, teacher_eps)",
             "loss_out = output_kd_loss(student_eps.detach(), teacher_eps)",
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "the output KD's detach on the student's side: no output-KD gradient"),
    Mutation("kd_lambda_feat_ignored", "train/distill_unet.py",
             '"loss": loss_out + lambda_feat * loss_feat',
             '"loss": loss_out + loss_feat',
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "--lambda_feat has no effect"),
    Mutation("kd_denoising_loss_added", "train/distill_unet.py",
             '"loss": loss_out + lambda_feat * loss_feat',
             '"loss": loss_out + lambda_feat * loss_feat + F.mse_loss(student_eps.float(), torch.randn_like(student_eps.float()))',
             (f"{STAGE_B[0]}::test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block",),
             "a denoising (task) loss added to Eq. 8 (the paper has none)"),
    Mutation("kd_caption_dropout_inverted", "train/distill_unet.py",
             "drop = torch.rand(len(z0), generator=gen) < caption_dropout",
             "drop = torch.rand(len(z0), generator=gen) > caption_dropout",
             STAGE_B[:1],
             "caption dropout keeps the captions it should drop"),
    Mutation("kd_caption_dropout_not_passed", "train/distill_unet.py",
             "caption_dropout=args.caption_dropout, device=device)",
             "caption_dropout=0.0, device=device)",
             (f"{STAGE_B[0]}::test_main_feeds_kd_step_and_steps_the_lr_schedule_once_per_optimizer_step",),
             "main() never feeds the unconditional state"),
    Mutation("kd_add_noise_swapped", "train/distill_unet.py",
             "x_t = noise_scheduler.add_noise(z0, noise, t)",
             "x_t = noise_scheduler.add_noise(noise, z0, t)",
             (f"{STAGE_B[0]}::test_kd_inputs_noise_the_latents_with_the_teachers_schedule_at_uniform_t_and_drop_captions",),
             "x_t built with latents and noise swapped"),
    Mutation("kd_t_half_range", "train/distill_unet.py",
             "t = torch.randint(0, noise_scheduler.config.num_train_timesteps, ",
             "t = torch.randint(0, noise_scheduler.config.num_train_timesteps // 2, ",
             (f"{STAGE_B[0]}::test_kd_inputs_noise_the_latents_with_the_teachers_schedule_at_uniform_t_and_drop_captions",),
             "t drawn from the lower half of the schedule only"),
    Mutation("teacher_check_misses_transformer_depth", "train/distill_unet.py",
             'for key in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):',
             'for key in ():',
             STAGE_B[:1],
             "an SDXL-style teacher (transformer depths [1, 2, 10]) passes the check"),
    Mutation("teacher_check_misses_added_embeddings", "train/distill_unet.py",
             '_EXTRA_EMBEDDINGS = ("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim_type")',
             '_EXTRA_EMBEDDINGS = ()',
             STAGE_B[:1],
             "a text_time (SDXL) or class-embedding teacher passes the check"),
    Mutation("teacher_checked_after_loading", "train/distill_unet.py",
             "        check_teacher_unet(json.loads((teacher_root / \"unet\" / \"config.json\").read_text()), f\"Teacher '{teacher_id}'\")\n",
             "        pass\n",
             (f"{STAGE_B[0]}::test_run_refuses_an_sdxl_shaped_teacher_before_loading_it",),
             "main() loads an unsupported teacher before refusing it (a traceback deep in diffusers)"),
    Mutation("mismatched_student_weight_initialised_fresh", "train/distill_unet.py",
             "    if unmatched:\n",
             "    if False:\n",
             (f"{STAGE_B[0]}::test_a_student_weight_without_a_same_shaped_teacher_weight_is_refused_not_initialised_fresh",),
             "a student weight whose teacher weight has another shape is silently left at its random init"),
    Mutation("kd_max_bad_fraction_ignored", "train/distill_unet.py",
             "common.SMOKE_PROMPTS if args.preset == \"smoke\" else None, max_bad_fraction=args.max_bad_fraction)",
             "common.SMOKE_PROMPTS if args.preset == \"smoke\" else None)",
             (f"{STAGE_B[0]}::test_model_and_data_flags_reach_main",),
             "stage B ignores --max_bad_fraction (always the default 5%)"),
    # --- stage C (train/distill_one_step.py) ---------------------------------------------------------
    Mutation("swap_score_difference_args", "train/distill_one_step.py",
             "g = score_difference(eps_on, eps_off, s_t)",
             "g = score_difference(eps_off, eps_on, s_t)",
             (f"{STAGE_C[0]}::test_score_distillation_moves_the_student_toward_the_offline_dm",),
             "score_difference's arguments swapped at its call site: the score-distillation gradient flips sign"),
    Mutation("segment_split_inverted", "train/distill_one_step.py",
             "        split_by_segment(t, phase.alpha, s.num_train_timesteps)\n",
             "        ~split_by_segment(t, phase.alpha, s.num_train_timesteps)\n",
             (f"{STAGE_C[0]}::test_each_sample_gets_the_loss_of_its_segment_from_the_right_noise",),
             "score distillation for t > alpha*T and FM below (Eq. 12 inverted)"),
    Mutation("online_update_without_no_grad", "train/distill_one_step.py",
             "        with torch.no_grad(), accelerator.autocast():\n            x0 = one_step_generate(student,",
             "        with accelerator.autocast():\n            x0 = one_step_generate(student,",
             (f"{STAGE_C[0]}::test_online_update_trains_the_online_dm_alone_on_the_students_samples",),
             "the online DM trained on the student's output without no_grad: gradients leak into the student"),
    Mutation("fm_target_from_another_sample", "train/distill_one_step.py",
             "batch.target[fm_mask]",
             "batch.target.roll(1, 0)[fm_mask]",
             (f"{STAGE_C[0]}::test_fm_warmup_moves_each_sample_toward_psi_of_its_own_noise",),
             "L_FM compares G(eps_i) with psi(eps_j) of another sample"),
    Mutation("real_guidance_on_online_eps", "train/distill_one_step.py",
             "eps_on = online(x_in.to(s.weight_dtype), t, encoder_hidden_states=states).sample.float()",
             "eps_on = offline_eps(online, x_in, t, states, s.uncond, s.real_guidance)",
             (f"{STAGE_C[0]}::test_real_guidance_applies_to_the_offline_eps_only",),
             "--real_guidance also applied to the online (fake) eps"),
    Mutation("cfg_direction_swapped", "train/distill_one_step.py",
             "return eps_u + real_guidance * (eps_c - eps_u)",
             "return eps_c + real_guidance * (eps_u - eps_c)",
             (f"{STAGE_C[0]}::test_real_guidance_applies_to_the_offline_eps_only",),
             "the offline eps guided away from the prompt"),
    Mutation("surrogate_without_detach", "train/distill_one_step.py",
             "(x - grad.to(x.dtype)).detach()",
             "(x - grad.to(x.dtype))",
             (f"{STAGE_C[0]}::test_surrogate_gradient_is_exactly_the_weighted_score_difference",),
             "the surrogate's target not detached: no score-distillation gradient at all"),
    Mutation("surrogate_on_x0_not_x_t", "train/distill_one_step.py",
             "score_distillation_surrogate(x_t.float(), g, w)",
             "score_distillation_surrogate(x0.float(), g, w)",
             (f"{STAGE_C[0]}::test_student_update_is_eq_12_of_what_it_fed_each_loss",),
             "the score gradient applied to x0 instead of x_t (drops alpha_t)"),
    Mutation("dmd2_weight_from_online_x0", "train/distill_one_step.py",
             "x0_off = (x_in - s_t.view(-1, 1, 1, 1) * eps_off)",
             "x0_off = (x_in - s_t.view(-1, 1, 1, 1) * eps_on)",
             (f"{STAGE_C[0]}::test_student_update_is_eq_12_of_what_it_fed_each_loss",),
             "DMD2's normaliser from the online DM's x0 instead of the offline one's"),
    Mutation("lambda_fm_not_applied", "train/distill_one_step.py",
             "loss = loss + phase.lambda_fm * per_sample.sum() / len(x0)",
             "loss = loss + per_sample.sum() / len(x0)",
             (f"{STAGE_C[0]}::test_student_update_is_eq_12_of_what_it_fed_each_loss",),
             "lambda_FM not applied to the FM segment (Eq. 12)"),
    Mutation("micro_batches_not_averaged", "train/distill_one_step.py",
             "accelerator.backward(loss / len(batches))",
             "accelerator.backward(loss)",
             (f"{STAGE_C[0]}::test_student_update_is_eq_12_of_what_it_fed_each_loss",),
             "the student's gradient summed over micro-batches instead of averaged"),
    Mutation("cached_noise_in_sd_segment", "train/distill_one_step.py",
             "z = torch.where(sd_mask.view(-1, 1, 1, 1), fresh, batch.noise)",
             "z = batch.noise",
             (f"{STAGE_C[0]}::test_each_sample_gets_the_loss_of_its_segment_from_the_right_noise",),
             "--pairs cache: score distillation sees only the N cached noises (DMD2 uses fresh noise)"),
    Mutation("online_target_x0", "train/distill_one_step.py",
             "denoising_loss(models.online(x_t, t, encoder_hidden_states=states).sample, n)",
             "denoising_loss(models.online(x_t, t, encoder_hidden_states=states).sample, x0)",
             (f"{STAGE_C[0]}::test_online_update_trains_the_online_dm_alone_on_the_students_samples",),
             "the online DM's loss targets x0 instead of the noise"),
    Mutation("timesteps_outside_t_range", "train/distill_one_step.py",
             "return torch.randint(s.t_lo, s.t_hi + 1, (n,), generator=gen).to(device)",
             "return torch.randint(0, s.num_train_timesteps, (n,), generator=gen).to(device)",
             (f"{STAGE_C[0]}::test_online_update_trains_the_online_dm_alone_on_the_students_samples",),
             "t drawn from [0, T) instead of --t_range"),
    Mutation("student_at_wrong_timestep", "train/distill_one_step.py",
             "t = torch.full((len(noise),), last, device",
             "t = torch.full((len(noise),), last // 2, device",
             (f"{STAGE_C[0]}::test_one_step_generator_is_what_the_sdxs_engine_computes",),
             "the one-step student runs at another timestep than the engine's t=999"),
    Mutation("T_not_from_scheduler", "train/distill_one_step.py",
             'T = int(scheduler_config.get("num_train_timesteps", 1000))',
             "T = 1000",
             (f"{STAGE_C[0]}::test_T_is_the_teacher_schedulers_num_train_timesteps",),
             "T fixed (or read from the U-Net config) instead of the teacher scheduler's"),
    Mutation("alpha_schedule_reversed", "train/distill_one_step.py",
             "start=s.alpha[0], end=s.alpha[1]",
             "start=s.alpha[1], end=s.alpha[0]",
             (f"{STAGE_C[0]}::test_phase_follows_the_alpha_and_lambda_schedules_after_the_warmup",),
             "alpha rises from --alpha_end to --alpha_start"),
    Mutation("warmup_one_step_short", "train/distill_one_step.py",
             "if step <= s.fm_warmup_steps:",
             "if step < s.fm_warmup_steps:",
             (f"{STAGE_C[0]}::test_phase_follows_the_alpha_and_lambda_schedules_after_the_warmup",),
             "the FM warm-up ends a step early"),
    Mutation("ema_of_the_online_dm", "train/distill_one_step.py",
             "common.ema_update(ema, raw_student, args.ema_decay, step)",
             "common.ema_update(ema, accelerator.unwrap_model(online), args.ema_decay, step)",
             (f"{STAGE_C[0]}::test_killed_run_resumes_from_its_last_checkpoint_exactly",),
             "the EMA follows the online DM instead of the student"),
    Mutation("student_update_unguarded", "train/distill_one_step.py",
             "models.student.parameters(), guard, step, losses,",
             "models.student.parameters(), common.FiniteGuard(10**9, \".\"), step, losses,",
             (f"{STAGE_C[0]}::test_lr_1e6_stops_the_run_and_keeps_the_last_good_checkpoint",),
             "stage C's student update gets a guard that never stops: a NaN update reaches the weights"),
    Mutation("ssim_under_autocast", "train/distill_one_step.py",
             "    with torch.autocast(device_type=x.device.type, enabled=False):\n        return 1 - ssim(",
             "    if True:\n        return 1 - ssim(",
             (f"{STAGE_C[0]}::test_ssim_distance_is_computed_in_fp32_under_mixed_precision",),
             "L_FM's SSIM computed in bf16/fp16 under mixed precision (NaN with VGG-16 features on a GPU)"),
    Mutation("lr_and_ema_step_on_skipped_steps", "train/distill_one_step.py",
             "if info.stepped:",
             "if True:",
             (f"{STAGE_C[0]}::test_skip_nonfinite_skips_the_bad_steps_and_holds_the_lr_schedule",),
             "a skipped (non-finite) step still advances the LR schedule and the EMA"),
    Mutation("fm_encoder_left_on_cpu", "train/distill_one_step.py",
             "return encoder.to(device).eval()",
             "return encoder.eval()",
             (f"{STAGE_C[0]}::test_fm_encoders_are_moved_to_the_run_device_with_their_buffers",),
             "the FM encoder (and its mean/std buffers) stay on the CPU"),
    Mutation("v_prediction_teacher_accepted", "train/distill_one_step.py",
             '    require_epsilon_prediction(teacher.scheduler_config, "--teacher", teacher_id)\n',
             "",
             (f"{STAGE_C[0]}::test_a_v_prediction_teacher_is_refused_with_a_clear_message",),
             "a v-prediction teacher trains silently wrong"),
    Mutation("pair_cache_target_of_another_noise", "train/distill_one_step.py",
             '"latents": latents[k].float().cpu()',
             '"latents": latents[(k + 1) % len(ids)].float().cpu()',
             (f"{STAGE_C[0]}::test_the_pair_cache_holds_psi_of_each_pairs_own_noise",),
             "a cached pair holds psi of another pair's noise"),
    Mutation("psi_warning_not_printed", "train/distill_one_step.py",
             "if warning and main_process:",
             "if warning and not main_process:",
             (f"{STAGE_C[0]}::test_online_pairs_lcm_psi_accumulation_and_fm_falls_on_a_fixed_batch",),
             "no warning when psi runs LCM steps on a plain teacher"),
    # --- teacher (train/train_teacher.py) ------------------------------------------------------------
    Mutation("teacher_loss_target_x0", "train/train_teacher.py",
             'F.mse_loss(unet(x_t, t, encoder_hidden_states=states).sample, noise)',
             'F.mse_loss(unet(x_t, t, encoder_hidden_states=states).sample, x0)',
             (f"{TEACHER[0]}::test_diffusion_loss_is_ddpm_eq14",),
             "the teacher U-Net regresses x0 instead of the noise (DDPM Eq. 14)"),
    Mutation("teacher_add_noise_swapped", "train/train_teacher.py",
             'x_t = scheduler.add_noise(x0, noise, t)',
             'x_t = scheduler.add_noise(noise, x0, t)',
             (f"{TEACHER[0]}::test_diffusion_loss_is_ddpm_eq14",),
             "x_t built with the clean latents and the noise swapped"),
    Mutation("teacher_guard_result_ignored", "train/train_teacher.py",
             '    if take:\n        optimizer.step()',
             '    if True:\n        optimizer.step()',
             (f"{TEACHER[0]}::test_a_non_finite_step_is_skipped_without_touching_the_weights",),
             "a step the guard skips is applied anyway (--skip_nonfinite lets NaN into the weights)"),
    Mutation("teacher_skipped_step_keeps_its_gradients", "train/train_teacher.py",
             '        schedule.step()\n    optimizer.zero_grad(set_to_none=True)\n    return take',
             '        schedule.step()\n        optimizer.zero_grad(set_to_none=True)\n    return take',
             (f"{TEACHER[0]}::test_a_non_finite_step_is_skipped_without_touching_the_weights",),
             "a skipped step's NaN gradients are left to add into the next step's"),
    Mutation("teacher_guard_removed_vae", "train/train_teacher.py",
             '        clip_grad_and_step(phase, step, vae, optimizer, schedule, loss, losses)\n',
             '        loss.backward()\n        optimizer.step()\n        optimizer.zero_grad(set_to_none=True)\n        schedule.step()\n',
             (f"{TEACHER[0]}::test_a_blown_up_phase_stops_and_keeps_its_last_good_checkpoint",),
             "the VAE phase steps without the finite-loss guard (NaN weights, exit 0)"),
    Mutation("teacher_guard_removed_clip", "train/train_teacher.py",
             '        clip_grad_and_step(phase, step, model, optimizer, schedule, loss, losses)\n',
             '        loss.backward()\n        optimizer.step()\n        optimizer.zero_grad(set_to_none=True)\n        schedule.step()\n',
             (f"{TEACHER[0]}::test_a_blown_up_phase_stops_and_keeps_its_last_good_checkpoint",),
             "the CLIP phase steps without the finite-loss guard"),
    Mutation("teacher_guard_removed_unet", "train/train_teacher.py",
             '        if clip_grad_and_step(phase, step, unet, optimizer, schedule, loss, {}) and ema is not None:\n',
             '        loss.backward()\n        optimizer.step()\n        optimizer.zero_grad(set_to_none=True)\n        schedule.step()\n'
             '        if ema is not None:\n',
             (f"{TEACHER[0]}::test_a_blown_up_phase_stops_and_keeps_its_last_good_checkpoint",),
             "the U-Net phase steps without the finite-loss guard"),
    Mutation("teacher_resume_ignores_finished_phases", "train/train_teacher.py",
             'if args.resume and (output_dir / "config.json").is_file():',
             'if False:',
             (f"{TEACHER[0]}::test_teacher_resume_refuses_changed_settings_of_any_phase",),
             "a resumed teacher run changes a finished phase's settings unnoticed"),
    Mutation("teacher_phase_checkpoint_unchecked", "train/train_teacher.py",
             'common.load_checkpoint(self.accelerator, checkpoint, self.config, may_change=MAY_CHANGE)',
             'common.load_checkpoint(self.accelerator, checkpoint, self.config, may_change=tuple(self.config))',
             (f"{TEACHER[0]}::test_teacher_resume_refuses_changed_settings_of_any_phase",),
             "a phase resumes from a checkpoint trained with other settings"),
    Mutation("teacher_max_bad_fraction_ignored", "train/train_teacher.py",
             'common.read_sources(None, str(folder), caption_column, None, 0, max_bad_fraction=max_bad_fraction)',
             'common.read_sources(None, str(folder), caption_column, None, 0)',
             (f"{TEACHER[0]}::test_teacher_skips_bad_records_and_refuses_a_mostly_bad_folder",),
             "the teacher's --max_bad_fraction has no effect"),
    Mutation("teacher_data_report_not_written", "train/train_teacher.py",
             '    common.write_data_report(output_dir, {"train": train_report, "val": val_report})\n',
             '',
             (f"{TEACHER[0]}::test_teacher_skips_bad_records_and_refuses_a_mostly_bad_folder",),
             "the skipped-record counts are not recorded in the run folder"),
    Mutation("teacher_unet_cache_never_rebuilt", "train/train_teacher.py",
             '        if cache.get("key") == key:\n',
             '        if True:\n',
             (f"{TEACHER[0]}::test_unet_cache_is_rebuilt_when_what_it_was_built_from_changes",),
             "the U-Net cache of another VAE / data set is reused"),
]


def copy_repo(dest: Path) -> None:
    """The tracked files of the repository, as they are in the working tree (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its text occurs {count} times in {mutation.file} (must be once); "
                         f"update the mutation to match the code:\n{mutation.old}")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, float]:
    """(caught, seconds): caught when pytest fails (or times out) on the mutated copy."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                                env=env, capture_output=True, timeout=timeout)
        caught = result.returncode != 0
    except subprocess.TimeoutExpired:
        caught = True
    return caught, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation's test run (default 900)")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file}: {m.why}")
        return 0

    rows, survived = [], []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="sdxs-mutant-") as tmp:
            root = Path(tmp)
            copy_repo(root)
            apply(m, root)
            caught, seconds = run_tests(root, m.tests, args.timeout)
        rows.append(f"| `{m.name}` | {m.file} | {m.why} | {'caught' if caught else '**SURVIVED**'} | {seconds:.0f} s |")
        print(rows[-1], flush=True)
        if not caught:
            survived.append(m.name)
    print("\n| mutation | file | bug | result | test time |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught." + (f" Survived: {', '.join(survived)}." if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
