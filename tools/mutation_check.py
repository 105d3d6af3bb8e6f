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
    # --- stage B (train/distill_unet.py) -------------------------------------------------------------
    # --- stage C (train/distill_one_step.py) ---------------------------------------------------------
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
