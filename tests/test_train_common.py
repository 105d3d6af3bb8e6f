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
