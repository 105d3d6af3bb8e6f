"""The mini reproduction (issue 14): train/reproduce_mini.py --smoke runs every stage with --preset mini on
the bundled emoji teacher, then train/evaluate_stages.py; and the pieces that make an f=4 teacher work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import common, distill_decoder, distill_one_step, evaluate_stages, reproduce_mini  # noqa: E402

TEACHER = ROOT / "models" / "emoji-teacher"
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "cyan", "magenta", "brown"]


def emoji_like_folder(root: Path) -> Path:
    """An imagefolder with train/ and val/ in the emoji data's layout: 64 px images on white, captions in
    its template. Content is irrelevant here: the smoke run tests the wiring, not quality."""
    from PIL import Image, ImageDraw

    for split, count in (("train", 10), ("val", 8)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(count):
            colour = COLOURS[(i + (split == "val")) % len(COLOURS)]
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse((8 + i, 8, 56, 56 - i), fill=colour)
            image.save(folder / f"{i}.png")
            style = "google" if i % 2 == 0 else "twitter"
            rows.append({"file_name": f"{i}.png", "text": f"an emoji of {colour} circle {i}, {colour}, category symbols, {style} style",
                         "name": f"{colour.upper()} CIRCLE {i}", "style": style, "skin_tone": None})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `reproduce_mini.py --smoke` run (the CI variant), as a user runs it: its stderr and folder."""
    root = tmp_path_factory.mktemp("mini")
    data = emoji_like_folder(root / "data")
    out = root / "run"
    # --jobs 2: stages at once where their inputs allow (as on a GPU); the 128 px run below runs them in turn
    result = subprocess.run([sys.executable, "train/reproduce_mini.py", "--output_dir", str(out), "--data", str(data), "--smoke",
                             "--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data, result.stderr


def test_smoke_run_trains_every_stage_through_the_mini_preset_and_writes_the_table(smoke_run):
    out, _, log = smoke_run
    for name in ("decoder", "unet", "one-step", "one-step-warmup", "one-step-no-warmup", "controlnet-teacher", "controlnet-distill",
                 "controlnet-one-step"):
        assert (out / name / "final" / "model_index.json").is_file(), name
    for name in ("controlnet-teacher", "controlnet-distill", "controlnet-one-step"):
        assert (out / name / "final" / "controlnet" / "config.json").is_file(), name
    assert (out / "eval-controlnet" / "controlnet.json").is_file() and (out / "eval-controlnet" / "controlnet.md").is_file()
    report = json.loads((out / "eval" / "stages.json").read_text())
    keys = [r["key"] for r in report["rows"]]
    assert keys == ["teacher", "psi", "teacher_tiny_decoder", "student_multi_step", "one_step_fm_only", "mini_sdxs",
                    "ablation_no_fm_warmup"]
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["psi"]["steps"] == 2 and "psi" in rows["psi"]["label"]  # stage C's --sampler_steps (2 under --smoke)
    # cumulative rows: the tiny decoder replaces the teacher's, the student U-Net is the block-removed one
    assert rows["teacher_tiny_decoder"]["parameters"]["decoder"] < rows["teacher"]["parameters"]["decoder"]
    assert rows["teacher_tiny_decoder"]["parameters"]["unet"] == rows["teacher"]["parameters"]["unet"] == 6_715_588
    assert rows["student_multi_step"]["parameters"]["unet"] == rows["mini_sdxs"]["parameters"]["unet"] == 2_963_780
    assert rows["mini_sdxs"]["steps"] == 1 and rows["teacher"]["steps"] == 2 and rows["teacher"]["guidance"] == 4.0
    assert len(report["targets"]) == 3 and report["settings"]["n_val"] == 8
    shown = [r["folder"] for r in report["rows"]] + [r["decoder"] for r in report["rows"]] + [report["settings"]["run"]]
    assert not any(Path(p).is_absolute() for p in shown), shown  # reports carry no machine paths
    for name in ("stages.md", "stages.png", "grid.png"):
        assert (out / "eval" / name).stat().st_size > 0
    assert "| + score distillation: mini SDXS (stage C) | 1 |" in (out / "eval" / "stages.md").read_text()
    # stage C's (noise, psi) pairs live in the teacher's latent space: 128 px / f=8 -> 16x16x4 (SD at 64 px: 8x8)
    pairs = sorted((out / "cache").glob("pairs-*/*.pt"))
    assert pairs and all(torch.load(f)["noise"].shape == torch.load(f)["latents"].shape == (4, 16, 16) for f in pairs[:4])


def test_stages_are_wired_to_each_other(smoke_run):
    """Stage B and C ship stage A's decoder, stage C starts from stage B's student, the ablation has no
    FM warm-up while the main run has one, and the warm-up-only run stops at the end of the warm-up."""
    out, _, _ = smoke_run
    config = {name: json.loads((out / name / "checkpoints").glob("step-*/meta.json").__next__().read_text())["config"]
              for name in ("unet", "one-step", "one-step-warmup", "one-step-no-warmup")}
    tiny = str(out / "decoder" / "final" / "vae")
    assert all(config[name]["tiny_decoder"] == tiny for name in config)
    assert all(config[name]["student"] == str(out / "unet" / "final") for name in ("one-step", "one-step-warmup", "one-step-no-warmup"))
    assert config["one-step"]["fm_warmup_steps"] == 1 and config["one-step-no-warmup"]["fm_warmup_steps"] == 0
    assert config["one-step-warmup"]["max_steps"] == config["one-step"]["fm_warmup_steps"]
    assert all(config[name]["preset"] == "mini" for name in config)
    final = json.loads((out / "one-step" / "final" / "model_index.json").read_text())
    assert final["vae"] == ["diffusers", "AutoencoderTiny"]
    # stage D: the teacher ControlNet drives the distillation against stage B's student, whose result starts
    # the one-step ControlNet with stage C's one-step U-Net
    cn = {name: json.loads((out / name / "checkpoints").glob("step-*/meta.json").__next__().read_text())["config"]
          for name in ("controlnet-teacher", "controlnet-distill", "controlnet-one-step")}
    assert [cn[name]["mode"] for name in cn] == ["teacher", "distill", "one_step"]
    assert cn["controlnet-distill"]["teacher_controlnet"] == cn["controlnet-one-step"]["teacher_controlnet"] == str(out / "controlnet-teacher" / "final")
    assert cn["controlnet-distill"]["student"] == str(out / "unet" / "final")
    assert cn["controlnet-one-step"]["student"] == str(out / "one-step" / "final")
    assert cn["controlnet-one-step"]["student_controlnet"] == str(out / "controlnet-distill" / "final")
    assert all(c["preset"] == "mini" and c["control"] == "sketch" for c in cn.values())


def test_the_final_folder_runs_in_the_sdxs_engine_at_the_teachers_128_px(smoke_run):
    from sdxs import SDXSEngine

    out, _, _ = smoke_run  # the bundled teacher v2 (the data's 64 px images are resized to its side)
    engine = SDXSEngine.from_pretrained(str(out / "one-step" / "final"), device="cpu", backend="torch")
    assert engine.native_size == 128
    result = engine.text_to_image("an emoji of red apple, google style", seed=0, num_images=1)
    assert result.images[0].size == (128, 128)


def test_a_second_run_skips_finished_stages(smoke_run):
    out, data, _ = smoke_run
    result = subprocess.run([sys.executable, "train/reproduce_mini.py", "--output_dir", str(out), "--data", str(data), "--smoke",
                             "--no_eval"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("skipped") == 8 and "python train/" not in result.stderr  # A, B, C, warm-up, 3 of D, ablation


def teacher_v1_geometry(folder: Path) -> Path:
    """Teacher v1's geometry (64 px, f=4) as its two configs, which are all geometry_flags and data_side read."""
    for sub, config in (("unet", {"sample_size": 16}), ("vae", {"block_out_channels": [32, 64, 64]})):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(config))
    return folder


def test_missing_data_says_how_to_build_it_at_the_teachers_side(tmp_path):
    nothing = tmp_path / "nothing"
    with pytest.raises(SystemExit, match=rf"python train/emoji_data.py --out {nothing} --image_size 128$"):  # teacher v2
        reproduce_mini.main(["--output_dir", str(tmp_path / "out"), "--data", str(nothing)])
    with pytest.raises(SystemExit, match=rf"python train/emoji_data.py --out {nothing} --image_size 128$"):
        evaluate_stages.main(["--run", str(tmp_path / "out"), "--data", str(nothing)])
    v1 = teacher_v1_geometry(tmp_path / "v1")  # the 64 px set, the script's default size
    (v1 / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match=rf"python train/emoji_data.py --out {nothing}$"):
        reproduce_mini.main(["--output_dir", str(tmp_path / "out"), "--data", str(nothing), "--teacher", str(v1)])
    assert not (tmp_path / "out").exists()


def test_under_jobs_each_stage_writes_its_own_log(smoke_run):
    out, _, log = smoke_run
    assert "Tiny decoder saved" in (out / "decoder.log").read_text()
    assert "Pipeline with the one_step ControlNet saved" in (out / "controlnet-one-step.log").read_text()
    assert f"(output: {out / 'unet.log'})" in log


def test_each_stage_waits_for_the_stages_whose_final_folders_it_reads():
    out = Path("/runs/mini")
    commands = reproduce_mini.stage_commands(out, Path("/data"), TEACHER, smoke=False, ablation=True)
    assert reproduce_mini.stage_inputs(commands, out) == {
        "decoder": [], "unet": ["decoder"], "one-step": ["decoder", "unet"], "one-step-warmup": ["decoder", "unet"],
        "controlnet-teacher": [], "controlnet-distill": ["unet", "controlnet-teacher"],
        "controlnet-one-step": ["one-step", "controlnet-teacher", "controlnet-distill"], "one-step-no-warmup": ["decoder", "unet"]}


FAKE_STAGE = ("import json, pathlib, sys, time; out, name, seconds, code = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), "
              "int(sys.argv[4]); start = time.time(); time.sleep(seconds); print(name, 'ran'); "
              "(out / f'{name}.times').write_text(json.dumps([start, time.time()])); code and sys.exit(code); "
              "(out / name / 'final').mkdir(parents=True); (out / name / 'final' / 'model_index.json').write_text('{}')")


def fake_stage(out: Path, name: str, seconds: float, *reads: str, exit_code: int = 0) -> tuple[str, list[str]]:
    """A stage that sleeps, records when it ran and writes its final/ (unless it fails); it reads `reads`."""
    return name, ["-c", FAKE_STAGE, str(out), name, str(seconds), str(exit_code), *[str(out / r / "final") for r in reads]]


def test_with_jobs_stages_overlap_but_none_starts_before_its_inputs_are_final(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    commands = [fake_stage(out, "a", 1.0), fake_stage(out, "b", 0.2, "a"), fake_stage(out, "c", 0.6),
                fake_stage(out, "d", 0.2, "b", "c")]
    reproduce_mini.run_stages(commands, out, jobs=2)
    times = {name: json.loads((out / f"{name}.times").read_text()) for name in "abcd"}
    assert times["c"][0] < times["a"][1]  # independent stages ran at once
    assert times["b"][0] >= times["a"][1] and times["d"][0] >= max(times["b"][1], times["c"][1])
    assert (out / "a.log").read_text() == "a ran\n"


def test_with_jobs_a_failed_stage_lets_the_running_ones_finish_and_starts_none_after_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    commands = [fake_stage(out, "a", 0.1, exit_code=3), fake_stage(out, "b", 0.1, "a"), fake_stage(out, "c", 0.8)]
    with pytest.raises(SystemExit, match=rf"a stopped with exit code 3; its output is in {out / 'a.log'}\. .*run the same command again"):
        reproduce_mini.run_stages(commands, out, jobs=2)
    assert reproduce_mini.is_final(out, "c") and not (out / "b.times").exists()


def test_jobs_below_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        reproduce_mini.main(["--output_dir", str(tmp_path / "out"), "--jobs", "0"])
    assert stop.value.code == 2 and "--jobs must be at least 1; got 0" in capsys.readouterr().err


def test_a_failing_stage_stops_the_run_and_says_how_to_resume(tmp_path):
    data = emoji_like_folder(tmp_path / "data")
    broken_teacher = tmp_path / "teacher"
    broken_teacher.mkdir()
    (broken_teacher / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"decoder stopped with exit code .* run the same command again"):
        reproduce_mini.main(["--output_dir", str(tmp_path / "out"), "--data", str(data), "--teacher", str(broken_teacher), "--smoke"])


# --- the VAE factor: latents are resolution / f ------------------------------------------------------


def test_vae_factor_of_the_emoji_teacher_v2_is_8_as_sd_and_of_v1_4():
    assert common.teacher_vae_factor(TEACHER) == 8  # v2: 128 px -> 16x16 latents
    assert common.vae_factor({"block_out_channels": [32, 64, 64]}) == 4  # v1's VAE: 64 px -> 16x16
    assert common.vae_factor({"block_out_channels": [128, 256, 512, 512]}) == 8


def test_stage_c_latent_shape_follows_the_vae_factor():
    args = common.parse_args(distill_one_step.build_parser(), distill_one_step.PRESETS,
                             ["--preset", "mini", "--output_dir", "unused"])
    config = json.loads((TEACHER / "scheduler" / "scheduler_config.json").read_text())
    s4 = distill_one_step.step_settings(args, config, uncond=torch.zeros(1), device=torch.device("cpu"), vae_factor=4)
    s8 = distill_one_step.step_settings(args, config, uncond=torch.zeros(1), device=torch.device("cpu"), vae_factor=8)
    assert args.resolution == 128  # the mini preset: teacher v2's side
    assert s8.latent_shape == (4, 16, 16) and s4.latent_shape == (4, 32, 32)


def test_stage_a_l1_is_taken_at_the_latent_resolution_of_the_teacher_vae():
    vae = distill_decoder.make_student_vae(channels=8, decoder_blocks=(1, 1, 1), encoder_blocks=(1, 1, 1))
    z, x = torch.randn(2, 4, 16, 16), torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        losses, fake = distill_decoder.decoder_step(vae.decoder, None, None, z, x, lambda_gan=0.0, encoder_weight=0.0, factor=4)
    expected = (torch.nn.functional.avg_pool2d(fake, 4) - torch.nn.functional.avg_pool2d(x, 4)).abs().mean()
    assert fake.shape == x.shape and losses["loss_l1"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_stage_a_refuses_a_decoder_whose_upscaling_differs_from_the_teacher_vae(tmp_path):
    with pytest.raises(SystemExit, match=r"works at 8x .* needs 4 decoder and encoder stages; got --decoder_blocks 3,3,1"):
        distill_decoder.main(["--preset", "mini", "--output_dir", str(tmp_path / "out"), "--decoder_blocks", "3,3,1",
                              "--encoder_blocks", "1,3,3", "--image_folder", str(tmp_path / "none")])


def test_mini_preset_defaults_to_the_bundled_teacher():
    assert common.resolve_teacher(None, "mini", Path("unused"), None) == str(TEACHER)


# --- the targets ------------------------------------------------------------------------------------


def _row(key, fd, top1, ms):
    return {"key": key, "fd": fd, "top1": top1, "latency": {"median_ms": ms}}


def test_targets_compare_the_final_model_with_the_teacher():
    met = evaluate_stages.targets([_row("teacher", 10.0, 0.40, 300.0), _row("one_step_fm_only", 99.0, 0.0, 1.0),
                                   _row("mini_sdxs", 15.0, 0.32, 12.0)])
    assert [t["met"] for t in met] == [True, True, True]
    assert "1.50x" in met[0]["measured"] and "80%" in met[1]["measured"] and "25.0x lower" in met[2]["measured"]
    missed = evaluate_stages.targets([_row("teacher", 10.0, 0.40, 300.0), _row("mini_sdxs", 15.1, 0.31, 12.1)])
    assert [t["met"] for t in missed] == [False, False, False]
    assert evaluate_stages.targets([_row("mini_sdxs", 1.0, 1.0, 1.0)]) == []


def test_a_row_needs_its_decoder_too_and_the_table_says_so_before_sampling(tmp_path, capsys):
    """A run folder with stage C's final but no stage A decoder (e.g. one stage copied alone): every row on the
    tiny decoder is left out and named with the decoder's folder, and the table refuses to start, rather
    than sampling the teacher rows for minutes and then stopping on a traceback."""
    run = tmp_path / "run"
    for name in ("unet", "one-step"):
        (run / name / "final").mkdir(parents=True)
    rows, missing = evaluate_stages.stage_rows(run, TEACHER, teacher_steps=25, guidance=4.0, psi_steps=10)
    assert [r.key for r in rows] == ["teacher", "psi"]
    assert [m.rsplit(" (", 1)[1] for m in missing] == ["final/vae)", "final/vae)", "one-step-warmup/final)", "final/vae)",
                                                       "one-step-no-warmup/final)"], missing
    assert missing[3].startswith("+ score distillation: mini SDXS")
    (run / "decoder" / "final" / "vae").mkdir(parents=True)
    rows, _ = evaluate_stages.stage_rows(run, TEACHER, teacher_steps=25, guidance=4.0, psi_steps=0)
    assert [r.key for r in rows] == ["teacher", "teacher_tiny_decoder", "student_multi_step", "mini_sdxs"]
    # stage C's psi steps unknown (its checkpoints deleted, or a run copied without them): said, not dropped
    rows, missing = evaluate_stages.stage_rows(run, TEACHER, teacher_steps=25, guidance=4.0,
                                               psi_steps=evaluate_stages.psi_steps_of(run))
    assert "psi" not in [r.key for r in rows] and missing[0].startswith("reference: psi (stage C's sampler steps")
    assert "--psi_steps N adds the row" in missing[0]
    (run / "decoder" / "final" / "vae").rmdir()
    with pytest.raises(SystemExit, match=r"stage A's decoder .*decoder/final/vae is missing"):
        evaluate_stages.main(["--run", str(run), "--data", str(emoji_like_folder(tmp_path / "data"))])
    assert not (run / "eval").exists()


def test_export_copies_the_model_and_figures_and_keeps_an_existing_card(smoke_run, tmp_path):
    out, data, _ = smoke_run
    dest, figures = tmp_path / "mini-sdxs", tmp_path / "figures"
    dest.mkdir()
    start, end = reproduce_mini.TABLE_START, reproduce_mini.TABLE_END
    sketch_start, sketch_end = reproduce_mini.CONTROLNET_TABLE_START, reproduce_mini.CONTROLNET_TABLE_END
    (dest / "README.md").write_text(f"the card\n{start}\nold table\n{end}\nmore text\n{sketch_start}\nold\n{sketch_end}\n")
    for stale in ("unet/diffusion_pytorch_model.bin", "vae_old/config.json"):  # a former model's files
        (dest / stale).parent.mkdir(parents=True, exist_ok=True)
        (dest / stale).write_text("old")
    reproduce_mini.export(out, dest, figures, data)
    assert not (dest / "unet" / "diffusion_pytorch_model.bin").exists() and not (dest / "vae_old").exists()
    table = (out / "eval" / "stages.md").read_text().strip()
    sketch_table = (out / "eval-controlnet" / "controlnet.md").read_text().strip()
    assert json.loads((dest / "captions.json").read_text()) == reproduce_mini.caption_table(data)
    for config in dest.rglob("config.json"):  # no machine paths in a bundled folder
        assert not Path(json.loads(config.read_text()).get("_name_or_path", "x")).is_absolute(), config
    assert (dest / "README.md").read_text() == f"the card\n{start}\n{table}\n{end}\nmore text\n{sketch_start}\n{sketch_table}\n{sketch_end}\n"
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae_large/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json", "training/stages.md",
                 "controlnet/diffusion_pytorch_model.safetensors", "training/controlnet.md", "training/controlnet.json"):
        assert (dest / part).is_file(), part
    assert json.loads((dest / "training" / "stages.json").read_text()) == json.loads((out / "eval" / "stages.json").read_text())
    assert sorted(p.name for p in figures.iterdir()) == ["controlnet-grid.png", "loss-controlnet-distill.png", "loss-controlnet-one-step.png",
                                                         "loss-controlnet-teacher.png", "loss-decoder.png", "loss-one-step.png",
                                                         "loss-unet.png", "stages-grid.png", "stages-quality-latency.png"]
    exported = load_file(dest / "controlnet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / "controlnet-one-step" / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)  # the one-step ControlNet, not the distilled one
    from sdxs import SDXSEngine

    engine = SDXSEngine.from_pretrained(str(dest), device="cpu", backend="torch")
    assert engine.native_size == 128 and engine.components.controlnet is not None


def test_the_caption_table_takes_cldr_names_below_names_and_short_names(tmp_path):
    rows = [{"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "text": "an emoji of heavy black heart, heart, category c, noto style"},
            {"name": "BLACK SUN WITH RAYS", "unified": "2600-FE0F", "text": "an emoji of black sun with rays, sunny, category c, noto style"},
            {"name": "SUN", "unified": "1F31E", "text": "an emoji of sun, category c, noto style"}]
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "metadata.jsonl").write_text("".join(json.dumps({**r, "style": "noto", "skin_tone": None}) + "\n"
                                                                 for r in rows))
    (tmp_path / "cldr_names.json").write_text(json.dumps({"2764-FE0F": "Red  Heart", "2600-FE0F": "sun", "1F31E": "heart"}))
    table = reproduce_mini.caption_table(tmp_path)
    assert table["red heart"] == rows[0]["text"]  # a CLDR name alone finds its emoji
    assert table["sun"] == rows[2]["text"]  # an emoji's name beats another's CLDR name
    assert table["heart"] == rows[0]["text"]  # a short name too


def test_a_failed_export_leaves_the_former_model_as_it_was(smoke_run, tmp_path, monkeypatch):
    out, data, _ = smoke_run
    dest = tmp_path / "mini-sdxs"
    for part in ("README.md", "unet/diffusion_pytorch_model.bin", "training/stages.md", "captions.json"):  # the former model
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        (dest / part).write_text(f"old {part}")
    before = {p.relative_to(dest): p.read_text() for p in dest.rglob("*") if p.is_file()}
    copy = reproduce_mini.copy_model_files

    def copy_then_fail_on_the_controlnet(src, target):
        if src.name == "controlnet":
            raise OSError("disk full")
        copy(src, target)

    monkeypatch.setattr(reproduce_mini, "copy_model_files", copy_then_fail_on_the_controlnet)
    with pytest.raises(OSError, match="disk full"):
        reproduce_mini.export(out, dest, tmp_path / "figures", data)
    assert {p.relative_to(dest): p.read_text() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini-sdxs"]  # no staging folder left behind


def test_the_caption_table_maps_names_and_short_names_of_one_style_to_training_captions(tmp_path):
    data = emoji_like_folder(tmp_path / "data")
    table = reproduce_mini.caption_table(data)
    assert table["red circle 0"] == "an emoji of red circle 0, red, category symbols, google style"
    assert table["red"] == table["red circle 0"]  # a short name, first one wins
    assert "green circle 1" not in table  # twitter style in this folder: not the google table's
    assert reproduce_mini.caption_table(data, "twitter")["green circle 1"].endswith("twitter style")


# --- teacher v2's geometry (issue 18: 128 px, an f=8 VAE) ---------------------------------------------


def test_geometry_flags_follow_the_teachers_image_side_and_vae_factor(tmp_path):
    from train.tiny_teacher import make_tiny_teacher

    assert reproduce_mini.geometry_flags(TEACHER) == ([], [])  # the bundled teacher v2: what the mini presets are made for
    f8_128 = make_tiny_teacher(tmp_path / "f8-128", image_size=128)  # teacher v2's geometry
    assert common.teacher_native_size(f8_128) == 128 and reproduce_mini.geometry_flags(f8_128) == ([], [])
    f8_64 = make_tiny_teacher(tmp_path / "f8-64")  # f=8 at 64 px: every stage at 64 px, stage A's decoder unchanged
    assert reproduce_mini.geometry_flags(f8_64) == (["--resolution", "64"], [])
    v1 = teacher_v1_geometry(tmp_path / "v1")
    assert common.teacher_native_size(v1) == 64
    assert reproduce_mini.geometry_flags(v1) == (["--resolution", "64"], ["--decoder_blocks", "3,3,1", "--encoder_blocks", "1,3,3"])
    commands = dict(reproduce_mini.stage_commands(tmp_path / "run", tmp_path / "data", v1, smoke=False, ablation=True))
    for name, argv in commands.items():
        assert argv[argv.index("--resolution") + 1] == "64", name  # every stage at the teacher's side
        assert ("--decoder_blocks" in argv) == (name == "decoder"), name


@pytest.fixture(scope="module")
def smoke_run_128(tmp_path_factory):
    """`reproduce_mini.py --smoke` on a teacher of teacher v2's geometry (a tiny random one at 128 px with
    an f=8 VAE, and the bundled teacher's evaluation tower), evaluation and sketch chain included."""
    import shutil

    from train.tiny_teacher import make_tiny_teacher

    root = tmp_path_factory.mktemp("mini128")
    data = emoji_like_folder(root / "data")
    teacher = make_tiny_teacher(root / "teacher", image_size=128)
    shutil.copytree(TEACHER / "eval_tower", teacher / "eval_tower")
    out = root / "run"
    result = subprocess.run([sys.executable, "train/reproduce_mini.py", "--output_dir", str(out), "--data", str(data), "--teacher",
                             str(teacher), "--smoke", "--no_ablation"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, teacher


def test_a_128_px_f8_teacher_runs_through_every_stage_and_the_tables(smoke_run_128):
    from sdxs import SDXSEngine

    out, teacher = smoke_run_128
    decoder = json.loads((out / "decoder" / "final" / "vae" / "config.json").read_text())
    assert list(decoder["num_decoder_blocks"]) == [3, 3, 3, 1]  # one stage per 2x of the f=8 VAE
    engine = SDXSEngine.from_pretrained(str(out / "one-step" / "final"), device="cpu", backend="torch")
    assert engine.native_size == 128 and engine.text_to_image("red circle", seed=0).images[0].size == (128, 128)
    sketch = SDXSEngine.from_pretrained(str(out / "controlnet-one-step" / "final"), device="cpu", backend="torch")
    assert sketch.native_size == 128 and sketch.components.controlnet is not None
    stages = json.loads((out / "eval" / "stages.json").read_text())
    assert {row["key"] for row in stages["rows"]} >= {"teacher", "mini_sdxs"} and stages["settings"]["n_val"] == 8
    assert (out / "eval-controlnet" / "controlnet.json").is_file()
    from PIL import Image

    with Image.open(out / "eval" / "grid.png") as grid:  # 128 px tiles as they are (64 px ones are enlarged 2x)
        assert grid.height % (128 + 2) == 0 and grid.height // (128 + 2) >= 3  # real images + at least two models
