"""The shared training base (train/common.py) and the tiny teacher: presets, data sources and the
teacher cache, the step-indexed sampler, checkpoints, the CSV log, EMA, grids and plots."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, offline_env
from train_helpers import make_teacher, one_torch_thread  # noqa: F401

from train import common, distill_decoder, distill_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


@pytest.fixture
def accelerator(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    yield common.make_accelerator(tmp_path, mixed_precision="no", grad_accum=1, report_to="none")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --- arguments -------------------------------------------------------------------------------------


def test_presets_fill_defaults_and_explicit_flags_win():
    args = common.parse_args(distill_unet.build_parser(), distill_unet.PRESETS, ["--preset", "paper", "--output_dir", "o", "--lr", "3e-5"])
    assert args.lr == 3e-5 and args.batch_size == 32 and args.grad_accum == 4 and args.mixed_precision == "bf16"
    args = common.parse_args(distill_unet.build_parser(), distill_unet.PRESETS, ["--preset", "smoke", "--output_dir", "o"])
    assert args.resolution == 64 and args.gradient_checkpointing is False
    args = common.parse_args(distill_decoder.build_parser(), distill_decoder.PRESETS,
                             ["--preset", "smoke", "--output_dir", "o", "--decoder_blocks", "3,3,3,1", "--no-train_encoder"])
    assert args.decoder_blocks == (3, 3, 3, 1) and args.train_encoder is False


@pytest.mark.parametrize("module", [distill_decoder, distill_unet])
def test_every_flag_is_explained_with_both_presets(module):
    parser = module.build_parser()
    common.parse_args(parser, module.PRESETS, ["--preset", "smoke", "--output_dir", "o"])  # annotates the preset flags
    for action in parser._actions:
        assert action.help and len(action.help) > 15, action.dest
        if action.dest in module.PRESETS["smoke"]:
            assert "[preset smoke: " in action.help and "; paper: " in action.help, action.dest


def test_scripts_run_from_the_repo_root(tmp_path):
    for script in ("train/distill_decoder.py", "train/distill_unet.py"):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--resume" in proc.stdout and "--preset smoke" in proc.stdout


# --- teacher and data --------------------------------------------------------------------------------


def test_tiny_teacher_is_sd_shaped_and_loads(teacher):
    t = common.load_teacher(str(teacher), torch.device("cpu"), torch.float32)
    assert t.unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert list(t.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert t.unet.config.layers_per_block == 2 and type(t.vae).__name__ == "AutoencoderKL"
    assert t.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not any(p.requires_grad for p in t.unet.parameters())
    with pytest.raises(FileExistsError):
        from train.tiny_teacher import make_tiny_teacher

        make_tiny_teacher(teacher)


def test_sources_and_teacher_cache(teacher, accelerator, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(3):
        Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    source = common.read_sources(None, str(folder), "text", None, 0)
    assert source.mode == "encode" and source.prompts == ["caption 0", "caption 1", "caption 2"]
    assert common.read_sources(None, str(folder), "text", "sample", 2).mode == "sample"  # captions as prompts
    with pytest.raises(SystemExit, match="caption"):
        common.read_sources(None, str(folder), "caption", None, 0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert common.read_sources(str(prompts), None, "text", None, 0).prompts == ["a cat", "a dog"]

    t = common.load_teacher(str(teacher), accelerator.device, torch.float32)
    for src, with_images in ((source, True), (common.read_sources(str(prompts), None, "text", None, 0), False)):
        kwargs = dict(resolution=64, sampler_steps=2, guidance_scale=2.0, with_images=with_images, seed=0)
        folder = common.cache_folder(tmp_path / "cache", t.root, src, **kwargs)
        common.build_latent_cache(t, src, folder, batch_size=2, accelerator=accelerator, **kwargs)
        assert common.cache_is_complete(folder) and len(list(folder.glob("*.pt"))) == len(src.prompts)
        item = common.CachedSamples(folder)[0]
        assert item["latents"].shape == (4, 8, 8) and item["prompt"] == src.prompts[0]
        assert ("image" in item) == with_images
        if with_images:
            assert item["image"].shape == (3, 64, 64) and -1 <= item["image"].min() <= item["image"].max() <= 1
    assert folder != common.cache_folder(tmp_path / "cache", t.root, src, **{**kwargs, "sampler_steps": 3})  # settings change the cache


def test_step_sampler_resumes_and_shards():
    full = common.StepSampler(10, 4, seed=1, first_micro_step=0)
    batches = [b for b, _ in zip(full, range(8))]
    resumed = common.StepSampler(10, 4, seed=1, first_micro_step=5)
    assert [b for b, _ in zip(resumed, range(3))] == batches[5:8]
    assert sorted([i for batch in batches[:5] for i in batch][:10]) == list(range(10))  # each epoch is a permutation
    ranks = [next(iter(common.StepSampler(10, 2, seed=1, first_micro_step=0, rank=r, world=2))) for r in range(2)]
    assert ranks[0] + ranks[1] == batches[0]  # each process takes its slice of the global batch
    overfit = common.StepSampler(10, 4, seed=1, first_micro_step=7, overfit=True)
    assert [b for b, _ in zip(overfit, range(2))] == [batches[0], batches[0]]


# --- checkpoints, logging, EMA ------------------------------------------------------------------------


def test_checkpoints_are_atomic_keep_the_last_k_and_restore(accelerator, tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(step)
        common.save_checkpoint(accelerator, tmp_path, step, {"lr": 1.0}, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-0000004").mkdir()  # a save killed half-way
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # no meta.json: not a complete checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003", "step-0000009"]
    latest = common.find_checkpoint(tmp_path, "latest")
    assert latest.name == "step-0000003"
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["step"] == 3 and meta["config"] == {"lr": 1.0} and "diffusers" in meta["versions"]
    with torch.no_grad():
        model.weight.zero_()
    assert common.load_checkpoint(accelerator, latest, {"lr": 1.0}) == 3
    assert torch.all(model.weight == 3)
    assert common.find_checkpoint(tmp_path / "elsewhere", "latest") is None
    with pytest.raises(SystemExit, match="--resume latest"):
        common.check_fresh_start(tmp_path, None)


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "final"
    with common.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), common.atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["final"] and [p.name for p in dest.iterdir()] == ["a"]


def test_csv_log_drops_rows_after_the_resumed_step(tmp_path):
    log = common.CsvLog(tmp_path / "log.csv", ["loss"], start_step=0)
    for step in range(1, 9):
        log.write(step, {"loss": 1.0 / step})
    common.CsvLog(tmp_path / "log.csv", ["loss"], start_step=5)
    assert [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().splitlines()] == ["step", "1", "2", "3", "4", "5"]


def test_ema_update():
    model, ema = torch.nn.Linear(2, 2), None
    ema = common.make_ema(model, 0.9)
    assert common.make_ema(model, 0) is None and not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        before = ema.weight.clone()
        model.weight.add_(1.0)
    common.ema_update(ema, model, 0.9, step=1000)  # past the warm-up: the decay itself
    assert torch.allclose(ema.weight, before + 0.1)
    common.ema_update(ema, model, 0.9, step=1)  # warm-up: decay (1 + 1) / (10 + 1), mostly the model
    assert torch.allclose(ema.weight, model.weight - 0.9 * 2 / 11)
    assert common.ema_decay_at(0.999, 10) == pytest.approx(11 / 20) and common.ema_decay_at(0.999, 10**6) == 0.999


def test_image_grid_and_loss_curve(tmp_path):
    from PIL import Image

    grid = common.save_image_grid([torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)], tmp_path / "g.png")
    image = Image.open(grid)
    assert image.size == (24, 16) and image.getpixel((0, 0)) == (128, 128, 128) and image.getpixel((0, 15)) == (255, 255, 255)
    log = common.CsvLog(tmp_path / "log.csv", ["lr", "loss", "loss_d"], start_step=0)
    for step in range(1, 21):
        log.write(step, {"lr": 0.1, "loss": 1 / step, **({"loss_d": 2.0} if step > 10 else {})})
    assert common.plot_loss_curve(tmp_path / "log.csv", tmp_path / "curve.png").stat().st_size > 1000


def test_one_step_scheduler_lands_on_999():
    from train.tiny_teacher import SD_SCHEDULER

    scheduler = common.one_step_scheduler(SD_SCHEDULER[1])
    scheduler.set_timesteps(1)
    assert type(scheduler).__name__ == "DEISMultistepScheduler" and int(scheduler.timesteps[0]) == 999


# --- data checks (issue 12) --------------------------------------------------------------------------


def write_image_folder(folder, n_good, *, start=0):
    """`n_good` decodable 24 px PNGs with captions "caption i" and their metadata lines (returned, not written)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n_good):
        Image.fromarray((torch.rand(24, 24, 3) * 255).byte().numpy()).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"caption {i}"})
    return rows


def write_metadata(folder, rows):
    (folder / "metadata.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def truncated_copy(src, dest, keep=0.5):
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])


def test_check_image_catches_cut_files_of_both_formats(tmp_path):
    from PIL import Image

    pixels = (torch.rand(64, 64, 3) * 255).byte().numpy()
    for suffix in ("png", "jpg"):
        Image.fromarray(pixels).save(tmp_path / f"good.{suffix}")
        assert common.check_image(tmp_path / f"good.{suffix}") is None
        truncated_copy(tmp_path / f"good.{suffix}", tmp_path / f"cut.{suffix}")
        assert "truncated" in common.check_image(tmp_path / f"cut.{suffix}").lower()
    # a PNG missing only its last bytes still decodes its pixels: only verify()'s checksum walk sees it
    (tmp_path / "tail.png").write_bytes((tmp_path / "good.png").read_bytes()[:-20])
    assert common.check_image(tmp_path / "tail.png") is not None
    (tmp_path / "text.png").write_text("not an image")
    assert "UnidentifiedImageError" in common.check_image(tmp_path / "text.png")
    assert common.check_image(tmp_path / "gone.png") == "missing"


def test_image_folder_skips_counts_and_names_each_kind_of_bad_record(tmp_path, capsys):
    folder = tmp_path / "images"
    rows = write_image_folder(folder, 20)
    truncated_copy(folder / "003.png", folder / "003.png")  # a corrupt image
    (folder / "notes.png").write_text("not an image")  # a non-image file
    (folder / "stray.png").write_bytes((folder / "000.png").read_bytes())  # an image no metadata line names
    rows[5] = {"file_name": "005.png"}  # no caption key
    rows[7] = {"file_name": "007.png", "text": "  "}  # an empty caption
    rows += [{"file_name": "notes.png", "text": "x"}, {"file_name": "missing.png", "text": "y"}, {"text": "no file"}, "{broken"]
    write_metadata(folder, rows)
    source = common.read_sources(None, str(folder), "text", None, 0, max_bad_fraction=0.5)

    # 24 lines + 1 stray image = 25 records; kept: the 17 good ones of the first 20, in metadata order
    assert source.prompts == [f"caption {i}" for i in range(20) if i not in (3, 5, 7)]
    assert [p.name for p in source.images] == [f"{i:03d}.png" for i in range(20) if i not in (3, 5, 7)]
    assert source.records[2] == {"file_name": "002.png", "text": "caption 2"} and len(source.records) == 17
    report = source.report
    assert (report["examined"], report["kept"], report["skipped"]) == (25, 17, 8)
    assert [u.split(":")[0] for u in report["undecodable"]] == ["003.png", "notes.png", "missing.png", "line 23"]
    assert [u.split(":")[0] for u in report["without_caption"]] == ["line 6 (005.png)", "line 8 (007.png)", "line 24", "stray.png"]
    assert "missing.png: missing" in report["undecodable"] and "stray.png: no metadata line" in report["without_caption"]
    err = capsys.readouterr().err
    assert f"data: skipped 8 of 25 records in {folder} (4 undecodable images: 003.png, notes.png, missing.png, ...; " \
           "4 without a caption: line 6 (005.png), line 8 (007.png), line 24, ...)" in err

    # --num_samples N: N usable records, the same each time, in metadata order, spread over the folder
    subset = common.read_sources(None, str(folder), "text", None, 4, max_bad_fraction=0.5)
    assert len(subset.prompts) == 4 and set(subset.prompts) <= set(source.prompts)
    assert [p.name for p in subset.images] == [r["file_name"] for r in subset.records]  # each image with its own caption
    assert subset.prompts == [r["text"] for r in subset.records]
    numbers = [int(p.split()[1]) for p in subset.prompts]
    assert numbers == sorted(numbers) and numbers != [0, 1, 2, 4]
    assert common.read_sources(None, str(folder), "text", None, 4, max_bad_fraction=0.5).prompts == subset.prompts
    # fixing a bad image changes what is kept, and the cache key
    (folder / "003.png").write_bytes((folder / "000.png").read_bytes())
    fixed = common.read_sources(None, str(folder), "text", None, 0, max_bad_fraction=0.5)
    assert "caption 3" in fixed.prompts and fixed.fingerprint != source.fingerprint


def test_num_samples_spreads_over_a_folder_sorted_by_kind(tmp_path):
    """Emoji data is sorted by style and category: the first N records would be one style of one category."""
    folder = tmp_path / "images"
    write_metadata(folder, write_image_folder(folder, 40))
    subset = common.read_sources(None, str(folder), "text", None, 8)
    numbers = [int(p.split()[1]) for p in subset.prompts]
    assert len(numbers) == 8 and {n // 10 for n in numbers} == {0, 1, 2, 3}  # every quarter of the folder
    assert [int(p.name[:3]) for p in subset.images] == numbers


def test_image_folder_refuses_above_max_bad_fraction(tmp_path):
    folder = tmp_path / "images"
    rows = write_image_folder(folder, 40)
    rows[0] = {"file_name": "000.png"}
    rows[1] = {"file_name": "001.png", "text": ""}
    write_metadata(folder, rows)
    # 2 of 40 = 5%: at the limit, the run goes on
    assert len(common.read_sources(None, str(folder), "text", None, 0, max_bad_fraction=0.05).prompts) == 38
    truncated_copy(folder / "002.png", folder / "002.png")
    with pytest.raises(SystemExit) as refused:  # 3 of 40: refused, naming the files and what to do
        common.read_sources(None, str(folder), "text", None, 0, max_bad_fraction=0.05)
    message = str(refused.value)
    assert "skipped 3 of 40 records" in message and "002.png" in message and "line 1 (000.png)" in message
    assert "--max_bad_fraction" in message and "metadata.jsonl" in message
    assert len(common.read_sources(None, str(folder), "text", None, 0, max_bad_fraction=0.1).prompts) == 37
    write_metadata(folder, [{"file_name": "000.png", "caption": "c"}])
    with pytest.raises(SystemExit, match="--caption_column"):  # a wrong caption key is said as such
        common.read_sources(None, str(folder), "text", None, 0)


def test_load_image_says_which_file_is_bad(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(SystemExit, match="bad.png"):
        common.load_image(tmp_path / "bad.png", 64)


def mixed_folder(folder, n_good):
    """`n_good` good records plus one corrupt PNG and one record without a caption."""
    rows = write_image_folder(folder, n_good + 2)
    truncated_copy(folder / "000.png", folder / "000.png")
    rows[1] = {"file_name": "001.png"}
    write_metadata(folder, rows)
    return folder


def test_stage_run_on_a_folder_with_bad_records_skips_and_reports_them(teacher, tmp_path, capsys):
    """Acceptance (issue 12): a corrupt image and a record without a caption; the run finishes, reports
    "skipped 2 of N", and records the counts in the cache's meta.json; a mostly bad folder is refused."""
    from train_helpers import run_stage

    folder = mixed_folder(tmp_path / "images", 40)
    out = tmp_path / "run"
    assert run_stage(distill_decoder, out, "--image_folder", str(folder), "--num_samples", "0", "--max_steps", "1",
                     "--sample_every", "0", "--no-train_encoder", teacher=teacher) == 0
    assert "data: skipped 2 of 42 records" in capsys.readouterr().err
    meta = json.loads(next((out / "cache").glob("*/meta.json")).read_text())
    assert meta["data_report"]["skipped"] == 2 and meta["data_report"]["kept"] == 40 and meta["n"] == 40
    assert (out / "final" / "vae").is_dir()

    bad = mixed_folder(tmp_path / "bad", 4)  # 2 of 6 bad
    with pytest.raises(SystemExit, match="000.png"):
        run_stage(distill_decoder, tmp_path / "refused", "--image_folder", str(bad), "--num_samples", "0", teacher=teacher)
    assert not (tmp_path / "refused" / "cache").exists()


# --- resume with changed settings (issue 12) ---------------------------------------------------------


def test_resume_with_a_changed_batch_size_is_refused_unless_allowed(teacher, tmp_path):
    """Acceptance (issue 12): stage A's main() stopped at step 2, resumed with another batch size."""
    from train_helpers import run_stage

    out, cache = tmp_path / "run", tmp_path / "cache"
    run = ("--max_steps", "3", "--checkpoint_every", "2", "--sample_every", "0", "--no-train_encoder")
    assert run_stage(distill_decoder, out, *run, "--stop_after_step", "2", teacher=teacher, cache_dir=cache) == 0
    log_before = (out / "log.csv").read_text()
    with pytest.raises(SystemExit) as refused:
        run_stage(distill_decoder, out, *run, "--resume", "latest", "--batch_size", "2", "--lr", "5e-4", teacher=teacher, cache_dir=cache)
    message = str(refused.value)
    assert "batch_size: 4 -> 2" in message and "lr: 0.001 -> 0.0005" in message and "--allow_changed batch_size,lr" in message
    assert "max_steps" not in message  # a setting any resume may change
    assert (out / "log.csv").read_text() == log_before and not (out / "resume_changes.log").exists()
    with pytest.raises(SystemExit, match="batch_size: 4 -> 2"):  # allowing one change leaves the other refused
        run_stage(distill_decoder, out, *run, "--resume", "latest", "--batch_size", "2", "--lr", "5e-4", "--allow_changed", "lr",
                  teacher=teacher, cache_dir=cache)

    assert run_stage(distill_decoder, out, *run, "--resume", "latest", "--batch_size", "2", "--allow_changed", "batch_size",
                     teacher=teacher, cache_dir=cache) == 0
    recorded = (out / "resume_changes.log").read_text()
    assert "step-0000002" in recorded and "batch_size 4 -> 2" in recorded and "lr" not in recorded.split("):")[-1]


def test_check_resume_settings_rules(accelerator, tmp_path, capsys):
    saved = {"lr": 1.0, "batch_size": 4, "max_steps": 10, "allow_changed": "", "channels": [1, 2]}
    assert common.check_resume_settings(saved, {**saved, "max_steps": 20, "checkpoint_every": 5}, "ckpt", tmp_path) == {}
    assert "does not record checkpoint_every" not in capsys.readouterr().err  # always free to change, not "added since"
    assert common.check_resume_settings(saved, {**saved, "new_flag": 1}, "ckpt", tmp_path) == {}
    assert "does not record new_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"channels: \[1, 2\] -> \[1, 3\]"):
        common.check_resume_settings(saved, {**saved, "channels": (1, 3)}, "ckpt", tmp_path)
    assert common.check_resume_settings(saved, {**saved, "channels": (1, 2)}, "ckpt", tmp_path) == {}  # a tuple is its JSON list
    with pytest.raises(SystemExit, match="batchsize"):  # a misspelt key is named, not silently ignored
        common.check_resume_settings(saved, {**saved, "allow_changed": "batchsize"}, "ckpt", tmp_path)
    changed = common.check_resume_settings(saved, {**saved, "lr": 2.0, "allow_changed": "--lr"}, "ckpt", tmp_path)
    assert changed == {"lr": (1.0, 2.0)} and "lr 1.0 -> 2.0" in (tmp_path / "resume_changes.log").read_text()
    with pytest.raises(SystemExit, match="step-x"):  # load_checkpoint refuses before restoring anything
        (tmp_path / "step-x").mkdir()
        (tmp_path / "step-x" / "meta.json").write_text(json.dumps({"step": 1, "config": saved}))
        common.load_checkpoint(accelerator, tmp_path / "step-x", {**saved, "lr": 3.0})


def test_resume_takes_one_folder_written_another_way_as_the_same_setting(tmp_path, monkeypatch):
    (tmp_path / "teacher").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"teacher": "teacher", "prompts": "p.txt"}
    assert common.check_resume_settings(saved, {**saved, "teacher": str(tmp_path / "teacher")}, "ckpt", None) == {}
    with pytest.raises(SystemExit, match="teacher"):  # another folder is another setting
        (tmp_path / "other").mkdir()
        common.check_resume_settings(saved, {**saved, "teacher": str(tmp_path / "other")}, "ckpt", None)
    with pytest.raises(SystemExit, match="prompts"):  # strings that are not existing paths compare as text
        common.check_resume_settings(saved, {**saved, "prompts": "./p.txt"}, "ckpt", None)


# --- finite weights and losses (issue 12) ------------------------------------------------------------


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_good_ones(accelerator, tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = common.make_ema(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(ema)
    for step in (1, 2):
        common.save_checkpoint(accelerator, tmp_path, step, {}, keep=2)
    for broken in (model.weight, ema.bias):  # the trained model, then a registered module (the EMA)
        with torch.no_grad():
            saved = broken.clone()
            broken[0] = float("nan")
        with pytest.raises(common.NonFiniteLossError, match="step 3") as refused:
            common.save_checkpoint(accelerator, tmp_path, 3, {}, keep=2)
        assert "step-0000002" in str(refused.value) and refused.value.code != 0
        with torch.no_grad():
            broken.copy_(saved)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]  # no rotation, no temp
    common.save_checkpoint(accelerator, tmp_path, 3, {}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_finite_guard_skips_then_stops_naming_the_step_and_term(tmp_path, capsys):
    guard = common.FiniteGuard(max_skips=1, output_dir=tmp_path, lr_flag="--vae_lr")
    assert guard.check(1, {"loss": torch.tensor(0.5), "loss_l1": 0.1}, grad_norm=2.0)
    assert not guard.check(2, {"loss": torch.tensor(float("nan"), requires_grad=True)}, grad_norm=1.0, model="vae")
    assert "step 2: non-finite loss = nan (vae); skipped" in capsys.readouterr().err
    (tmp_path / "checkpoints" / "step-0000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000001" / "meta.json").write_text('{"step": 1}')
    with pytest.raises(common.NonFiniteLossError) as stopped:
        guard.check(3, {"loss": 0.5, "loss_kl": 0.2}, grad_norm=float("inf"), model="vae")
    message = str(stopped.value)
    assert "step 3: non-finite gradient norm = inf (vae)" in message and "loss_kl" not in message
    assert "step-0000001" in message and "--vae_lr" in message and "--skip_nonfinite" in message
    assert common.FiniteGuard(0, tmp_path).check(1, {"loss": 1.0}, grad_norm=None)


# --- caches keyed by content, flags in messages (issue 12) ------------------------------------------


def test_model_fingerprint_follows_the_weights_not_the_path(teacher, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(teacher, copy)
    (copy / "README.md").write_text("a model card changes no output")
    assert common.model_fingerprint(copy) == common.model_fingerprint(teacher)  # same content elsewhere: same fingerprint
    source = common.read_sources(None, None, "text", None, 0, ["a cat"])
    kwargs = dict(resolution=64, sampler_steps=2, guidance_scale=2.0, with_images=False, seed=0)
    before = common.cache_folder(tmp_path / "cache", copy, source, **kwargs)
    assert common.cache_folder(tmp_path / "cache", copy, source, **kwargs) == before

    weights = next((copy / "unet").glob("*.safetensors"))  # "retrained": same configs and shapes, other values
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert common.model_fingerprint(copy) != common.model_fingerprint(teacher)
    assert common.cache_folder(tmp_path / "cache", copy, source, **kwargs) != before


def test_model_errors_name_the_training_flag(teacher, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub id that is not cached: the loader's hint
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(SystemExit) as missing:
        common.resolve_model("nobody/no-such-teacher", "--psi_teacher")
    assert "--psi_teacher DIR" in str(missing.value) and "--model" not in str(missing.value)
    with pytest.raises(SystemExit, match="--teacher .*does not exist") as missing:
        common.load_teacher(str(tmp_path / "nowhere"), torch.device("cpu"), torch.float32)
    assert "IDKiro" not in str(missing.value)  # the released one-step models are no teachers
    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit, match="--student .*missing tokenizer"):
        common.load_teacher(str(tmp_path / "half"), torch.device("cpu"), torch.float32, flag="--student")

def test_guarded_update_skips_a_non_finite_gradient_norm_even_with_a_finite_loss(tmp_path, capsys):
    """The update helper every stage's main() calls: gradients zeroed and weights untouched on a skip; the
    gradient norm is checked, not only the loss."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator = common.make_accelerator(tmp_path, mixed_precision="no", grad_accum=1, report_to="none")
    try:
        linear = torch.nn.Linear(3, 1)
        model, optimizer = accelerator.prepare(linear, torch.optim.SGD(linear.parameters(), lr=0.1))
        guard = common.FiniteGuard(1, tmp_path)
        update = lambda step: common.guarded_update(accelerator, optimizer, model.parameters(), guard, step, {"loss": 0.5}, 1.0, "decoder")

        before = [p.detach().clone() for p in model.parameters()]
        model(torch.ones(1, 3)).sum().backward()
        model.weight.grad[0, 0] = float("inf")
        assert update(5) is False
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and all(p.grad is None for p in model.parameters())
        assert "step 5: non-finite gradient norm = " in capsys.readouterr().err
        model(torch.ones(1, 3)).sum().backward()
        assert update(6) is True and not torch.equal(before[0], model.weight)  # a finite step is taken
        model(torch.ones(1, 3)).sum().backward()
        model.weight.grad[0, 0] = float("nan")
        with pytest.raises(common.NonFiniteLossError, match=r"step 7: non-finite gradient norm = nan \(decoder\)"):
            update(7)  # the one allowed skip is spent
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
