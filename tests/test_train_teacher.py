"""The small teacher (train/train_teacher.py, issue 7): one training step of each component, a smoke run
whose final folder loads with plain StableDiffusionPipeline and samples with guidance, and resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import column, one_torch_thread, read_log, run_stage  # noqa: F401

from train import common
from train import train_teacher as teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def smoke_args(tmp_path_factory):
    return teacher.parse_args(["--preset", "smoke", "--output_dir", str(tmp_path_factory.mktemp("args"))])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, smoke_args):
    folder = teacher.make_synthetic_data(tmp_path_factory.mktemp("data") / "shapes", smoke_args.resolution)
    images, captions, _ = teacher.load_split(folder / "train", "text", smoke_args.resolution)
    return images[:8], captions[:8]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sdxs.tokenizer import cached_clip_tokenizer_dir

    return CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir())


def one_step(model, loss: torch.Tensor) -> float:
    """One AdamW step; returns how far the weights moved (must be > 0)."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    return sum((p.detach() - b).abs().sum().item() for p, b in zip(model.parameters(), before))


def test_one_vae_step(smoke_args, shapes):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**teacher.vae_config(smoke_args.vae_channels, smoke_args.resolution))
    pixels = teacher.to_float(shapes[0])
    side = smoke_args.resolution // 4  # f = 4: three stages
    loss, losses = teacher.vae_loss(vae, pixels, torch.randn(len(pixels), 4, side, side), smoke_args.kl_weight)
    assert math.isfinite(loss.item()) and losses["loss_kl"] >= 0
    assert one_step(vae, loss) > 0


def test_one_clip_step(smoke_args, shapes, tokenizer):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(teacher.clip_config(smoke_args, len(tokenizer)))
    ids = teacher.tokenize(tokenizer, shapes[1])
    assert ids[0, 0].item() == 49406  # the real CLIP tokenizer: <|startoftext|>
    loss, losses = teacher.clip_loss(model, ids, teacher.to_float(shapes[0]))
    assert math.isfinite(loss.item()) and 0 <= losses["acc"] <= 1
    assert loss.item() == pytest.approx(math.log(len(ids)), rel=0.2)  # untrained: about log(batch)
    assert one_step(model, loss) > 0


def test_one_unet_step(smoke_args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    side = smoke_args.resolution // 4
    unet = UNet2DConditionModel(**teacher.unet_config(smoke_args, side))
    x0, states = torch.randn(4, 4, side, side), torch.randn(4, 77, smoke_args.text_width)
    loss = teacher.diffusion_loss(unet, x0, states, torch.randn_like(x0), torch.tensor([0, 300, 600, 999]),
                                  DDPMScheduler(**teacher.SD_BETAS))
    assert math.isfinite(loss.item())
    assert one_step(unet, loss) > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert run_stage(teacher, out) == 0
    return out


def test_smoke_run_writes_every_phase_and_a_pipeline_that_samples_with_guidance(smoke_run):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    for phase in teacher.PHASES:
        assert (smoke_run / phase / "final" / "done.json").is_file()
        assert (smoke_run / phase / "loss_curve.png").is_file()
        assert column(read_log(smoke_run / phase), "loss")
    assert sorted(p.name for p in (smoke_run / "unet" / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    assert sorted(p.name for p in (smoke_run / "vae" / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    quality = json.loads((smoke_run / "vae" / "final" / "done.json").read_text())
    assert quality["downsampling_factor"] == 4 and math.isfinite(quality["val_psnr_db"])
    assert {p.name for p in (smoke_run / "final").iterdir()} == {"model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "vae",
                                                                 "eval_tower"}
    CLIPModel.from_pretrained(smoke_run / "final" / "eval_tower")  # the evaluation network travels with the teacher
    assert {t.dtype for t in load_file(smoke_run / "final" / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}

    pipe = StableDiffusionPipeline.from_pretrained(smoke_run / "final")  # no torch_dtype: every part must come up fp32
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.vae_scale_factor == 4 and pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    pipe.set_progress_bar_config(disable=True)
    images = pipe("an emoji of a red circle, large", num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("stop_phase", ["vae", "unet"])
def test_killed_run_resumes_to_the_same_teacher(smoke_run, tmp_path, stop_phase, capsys):
    killed = tmp_path / "killed"
    assert run_stage(teacher, killed, "--stop_after_step", "3", "--stop_phase", stop_phase) == 0
    assert not (killed / "final").exists() and not (killed / stop_phase / "final").exists()
    with pytest.raises(SystemExit, match="--resume latest"):  # never silently restarts on top of a run
        run_stage(teacher, killed)
    assert run_stage(teacher, killed, "--resume", "latest") == 0
    assert f"[{stop_phase}] resumed from" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_log(killed / stop_phase) if r["loss"]] == [1, 2, 3, 4]
    # the resumed run's teacher is the uninterrupted run's, weight for weight
    for part in ("unet", "vae", "text_encoder"):
        a = load_file(next((killed / "final" / part).glob("*.safetensors")))
        b = load_file(next((smoke_run / "final" / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part


def test_unet_cache_aligns_every_caption_with_its_text_states(smoke_args, tokenizer, tmp_path):
    """More distinct captions than one encoding batch (128): row caption_index[i] must hold caption i's states."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from train import common

    torch.manual_seed(0)
    vae = AutoencoderKL(**teacher.vae_config(smoke_args.vae_channels, smoke_args.resolution)).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=77)).eval()
    captions = [f"an emoji number {i}" for i in range(300)] * 2
    images = torch.zeros(len(captions), 3, smoke_args.resolution, smoke_args.resolution, dtype=torch.uint8)
    cache = teacher.build_unet_cache(tmp_path / "cache.pt", vae, text_encoder, tokenizer, {"train_images": images, "train_captions": captions})
    assert cache["states"].shape[0] == 301  # the empty caption + 300 distinct ones
    with torch.no_grad():
        for i in (0, 127, 128, 299, 450, 599):
            expected = common.encode_prompts(tokenizer, text_encoder, [captions[i]])[0].half()
            assert torch.allclose(cache["states"][cache["caption_index"][i]].float(), expected.float(), atol=2e-3), i
        empty = common.encode_prompts(tokenizer, text_encoder, [""])[0].half()
        assert torch.allclose(cache["states"][0].float(), empty.float(), atol=2e-3)


# --- issue 12: the loss's wiring, the finite-loss guard, data checks, resume with changed settings ------


def test_diffusion_loss_is_ddpm_eq14(smoke_args):
    """||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||^2, computed here by hand."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    side = smoke_args.resolution // 4
    unet = UNet2DConditionModel(**teacher.unet_config(smoke_args, side)).eval()
    scheduler = DDPMScheduler(**teacher.SD_BETAS)
    x0, noise, states = torch.randn(3, 4, side, side), torch.randn(3, 4, side, side), torch.randn(3, 77, smoke_args.text_width)
    t = torch.tensor([10, 500, 990])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        expected = ((unet(x_t, t, encoder_hidden_states=states).sample - noise) ** 2).mean()
        assert teacher.diffusion_loss(unet, x0, states, noise, t, scheduler).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_non_finite_step_is_skipped_without_touching_the_weights(smoke_args, tmp_path):
    """clip_grad_and_step (every phase's step): with --skip_nonfinite 1 a NaN loss is skipped (no optimizer
    or LR step, gradients cleared), the next one stops the run."""
    from accelerate.state import AcceleratorState, GradientState

    args = teacher.parse_args(["--preset", "smoke", "--output_dir", str(tmp_path), "--skip_nonfinite", "1"])
    model = torch.nn.Linear(3, 1)
    optimizer, schedule = teacher.adamw(model, 1e-2, 4, 0)
    try:
        phase = teacher.Phase(args, "vae", 4, ["loss"], [model, optimizer], [schedule])
        model, optimizer = phase.prepared
        before = model.weight.detach().clone()
        nan_loss = model(torch.full((2, 3), float("nan"))).mean()
        assert not teacher.clip_grad_and_step(phase, 1, model, optimizer, schedule, nan_loss, {})
        assert torch.equal(model.weight, before) and model.weight.grad is None and schedule.last_epoch == 0
        assert teacher.clip_grad_and_step(phase, 2, model, optimizer, schedule, model(torch.ones(2, 3)).mean(), {})
        assert not torch.equal(model.weight, before) and schedule.last_epoch == 1
        with pytest.raises(common.NonFiniteLossError, match="step 3: non-finite loss = nan.*--vae_lr"):
            teacher.clip_grad_and_step(phase, 3, model, optimizer, schedule, model(torch.full((2, 3), float("nan"))).mean(), {})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.mark.parametrize("phase", teacher.PHASES)
def test_a_blown_up_phase_stops_and_keeps_its_last_good_checkpoint(tmp_path, phase):
    """Acceptance (issue 12): --<phase>_lr 1e6 goes NaN at step 2; the run stops with a message naming the
    step and the phase, exits non-zero, and its last checkpoint (step 1) holds finite weights."""
    out = tmp_path / "run"
    with pytest.raises(common.NonFiniteLossError) as stopped:
        run_stage(teacher, out, f"--{phase}_lr", "1e6", "--checkpoint_every", "1")
    assert stopped.value.code != 0 and f"step 2: non-finite" in str(stopped.value) and f"({phase})" in str(stopped.value)
    assert [p.name for p in (out / phase / "checkpoints").iterdir()] == ["step-0000001"]
    assert not (out / phase / "final").exists() and not (out / "final").exists()
    weights = load_file(out / phase / "checkpoints" / "step-0000001" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def corrupt_split(folder, *, n_bad_images: int, n_no_caption: int) -> None:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:n_bad_images]:
        data = (folder / row["file_name"]).read_bytes()
        (folder / row["file_name"]).write_bytes(data[: len(data) // 2])
    for row in rows[n_bad_images : n_bad_images + n_no_caption]:
        del row["text"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_teacher_skips_bad_records_and_refuses_a_mostly_bad_folder(smoke_args, tmp_path, capsys):
    data = teacher.make_synthetic_data(tmp_path / "data", smoke_args.resolution)
    corrupt_split(data / "train", n_bad_images=1, n_no_caption=1)
    out = tmp_path / "run"
    assert run_stage(teacher, out, "--data", str(data), "--stop_after_step", "1") == 0
    assert "data: skipped 2 of 64 records" in capsys.readouterr().err
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["kept"] == 62 and report["train"]["skipped"] == 2 and report["val"]["skipped"] == 0

    corrupt_split(data / "val", n_bad_images=1, n_no_caption=0)  # 1 of 8 val records: above 5%
    with pytest.raises(SystemExit, match="00000.png") as refused:
        run_stage(teacher, tmp_path / "refused", "--data", str(data))
    assert "--max_bad_fraction" in str(refused.value)
    assert run_stage(teacher, tmp_path / "lenient", "--data", str(data), "--max_bad_fraction", "0.2", "--stop_after_step", "1") == 0


def test_teacher_resume_refuses_changed_settings_of_any_phase(tmp_path, capsys):
    out = tmp_path / "run"
    # vae finished, clip killed at step 1 before its first checkpoint: only the run's config.json can tell
    assert run_stage(teacher, out, "--stop_after_step", "1", "--stop_phase", "clip") == 0
    assert not (out / "clip" / "checkpoints").exists()
    with pytest.raises(SystemExit, match="vae_lr: 0.001 -> 0.002"):  # a finished phase's settings
        run_stage(teacher, out, "--resume", "latest", "--vae_lr", "2e-3")
    assert run_stage(teacher, out, "--resume", "latest", "--stop_after_step", "2", "--stop_phase", "clip") == 0  # checkpoint 2
    capsys.readouterr()
    assert run_stage(teacher, out, "--resume", "latest", "--clip_batch_size", "4", "--allow_changed", "clip_batch_size",
                     "--clip_steps", "3", "--stop_after_step", "3", "--stop_phase", "clip") == 0  # killed before checkpointing
    assert "[clip] resumed from" in capsys.readouterr().err
    recorded = (out / "resume_changes.log").read_text()
    assert "clip_batch_size 8 -> 4" in recorded and "clip_steps" not in recorded  # *_steps may always change
    # config.json now says 4, the newest clip checkpoint was trained with 8: the checkpoint's own check refuses
    with pytest.raises(SystemExit, match=r"step-0000002.*\n.*clip_batch_size: 8 -> 4"):
        run_stage(teacher, out, "--resume", "latest", "--clip_batch_size", "4")


def test_unet_cache_is_rebuilt_when_what_it_was_built_from_changes(smoke_args, tokenizer, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(**teacher.vae_config(smoke_args.vae_channels, smoke_args.resolution)).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=77)).eval()
    images = torch.zeros(2, 3, smoke_args.resolution, smoke_args.resolution, dtype=torch.uint8)
    first = {"train_images": images, "train_captions": ["a", "b"]}
    vae.save_pretrained(tmp_path / "vae" / "final")
    text_encoder.save_pretrained(tmp_path / "clip" / "final" / "text_encoder")
    key = teacher.unet_cache_key(tmp_path, first)
    teacher.build_unet_cache(tmp_path / "cache.pt", vae, text_encoder, tokenizer, first, key)
    second = {"train_images": images, "train_captions": ["c", "d", "e"]}
    assert teacher.unet_cache_key(tmp_path, second) != key
    assert len(teacher.build_unet_cache(tmp_path / "cache.pt", vae, text_encoder, tokenizer, second, key)["caption_index"]) == 2
    rebuilt = teacher.build_unet_cache(tmp_path / "cache.pt", vae, text_encoder, tokenizer, second, teacher.unet_cache_key(tmp_path, second))
    assert len(rebuilt["caption_index"]) == 3
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # a retrained VAE in the same folder
    vae.save_pretrained(tmp_path / "vae" / "final")
    assert teacher.unet_cache_key(tmp_path, second) != rebuilt["key"]


# --- issue 18: teacher v2 (128 px, f=8 VAE) ----------------------------------------------------------


def test_v2_preset_is_an_f8_teacher_on_16x16_latents_whose_final_folder_fits_60_mb(tokenizer, tmp_path):
    """The v2 preset's models as train/README.md "Teacher v2" lists them (f=8: 128 px -> 16x16x4 latents,
    the full preset's U-Net and text tower), built by the script's own config functions and saved by the
    function main() saves with: the weights of the final folder stay within the teacher's 60 MB."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel

    from sdxs.tokenizer import cached_clip_tokenizer_dir

    args = teacher.parse_args(["--preset", "v2", "--data", str(tmp_path / "unused"), "--output_dir", str(tmp_path / "run")])
    full = teacher.parse_args(["--preset", "full", "--data", str(tmp_path / "unused"), "--output_dir", str(tmp_path / "run")])
    assert args.resolution == 128 and args.vae_channels == (16, 32, 48, 64) and teacher.latent_side(args) == 16
    assert teacher.latent_side(full) == 16 and (args.unet_channels, args.text_width) == (full.unet_channels, full.text_width)
    torch.manual_seed(0)
    vae = AutoencoderKL(**teacher.vae_config(args.vae_channels, args.resolution)).eval()
    clip = CLIPModel(teacher.clip_config(args, len(tokenizer))).eval()
    unet = UNet2DConditionModel(**teacher.unet_config(args, teacher.latent_side(args))).eval()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              {"vae": vae, "unet": unet, "clip": clip, "text": clip.text_model, "vision": clip.vision_model}.items()}
    assert counts == {"vae": 858_583, "unet": 6_715_588, "clip": 8_060_545, "text": 7_127_424, "vision": 900_352}  # README table
    assert clip.vision_model.embeddings.num_patches == 64  # patch 16 at 128 px: full's 8x8 tokens
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean.shape == (1, 4, 16, 16)

    final = tmp_path / "final"
    teacher.save_final_folder(final, teacher.text_encoder_of(clip), unet, vae, clip, cached_clip_tokenizer_dir(), args.save_dtype)
    weights = sorted(final.glob("*/*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "eval_tower"}
    assert sum(p.stat().st_size for p in weights) <= 60_000_000  # the bundled teacher's budget (tests/test_emoji_teacher.py)
    pipe = StableDiffusionPipeline.from_pretrained(final)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 16
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert {t.dtype for t in load_file(final / "eval_tower" / "model.safetensors").values()} == {torch.float16}


def test_lr_schedule_warms_up_holds_then_decays_linearly_over_the_last_steps():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = common.warmup_stable_decay(optimizer, warmup_steps=4, total_steps=20, decay_steps=8)
    used = []  # the LR each optimizer step 1..20 runs with
    for _ in range(20):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert used[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert used[4:12] == pytest.approx([1.0] * 8)  # steps 5-12 constant
    assert used[12:] == pytest.approx([1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])  # the last 8 fall towards 0
    plain = common.warmup_stable_decay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4, 20, 0)
    assert [plain.lr_lambdas[0](k) for k in (0, 10, 19, 25)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_each_phase_runs_with_its_own_decay(tmp_path):
    """main() wires --PHASE_decay_steps of each phase into that phase's schedule: log.csv's lr column (the LR
    after each step's schedule step) follows warm-up (50) and decay of that phase's steps, not another's."""
    out = tmp_path / "run"
    plan = {"vae": (58, 10), "clip": (56, 8), "unet": (54, 5)}  # steps, decay steps: past the warm-up, so the decay shows
    flags = [f for phase, (steps, decay) in plan.items() for f in (f"--{phase}_steps", str(steps), f"--{phase}_decay_steps", str(decay))]
    assert run_stage(teacher, out, *flags, "--checkpoint_every", "100", "--sample_every", "0") == 0
    for phase, (steps, decay) in plan.items():
        lr = teacher.PRESETS["smoke"][f"{phase}_lr"]
        logged = [float(r["lr"]) for r in read_log(out / phase) if r["lr"]]
        expected = [lr * min((k + 1) / 50, min(1.0, (steps - k) / decay)) for k in range(1, steps + 1)]
        assert logged == pytest.approx(expected), phase
        assert json.loads((out / phase / "final" / "done.json").read_text())["steps"] == steps


def test_a_finished_phase_extended_before_the_unet_trains_equals_a_run_planned_that_long(tmp_path, capsys):
    short, planned = tmp_path / "short", tmp_path / "planned"
    stop_in_clip = ("--stop_phase", "clip", "--stop_after_step", "1")
    assert run_stage(teacher, planned, "--vae_steps", "6", "--vae_decay_steps", "2", *stop_in_clip) == 0
    assert run_stage(teacher, short, *stop_in_clip) == 0  # vae finished at 4 steps, constant LR
    assert json.loads((short / "vae" / "final" / "done.json").read_text())["steps"] == 4
    with pytest.raises(SystemExit, match="vae_decay_steps: 0 -> 2"):  # the decay is a setting like any other
        run_stage(teacher, short, "--resume", "latest", "--vae_steps", "6", "--vae_decay_steps", "2", *stop_in_clip)
    capsys.readouterr()
    assert run_stage(teacher, short, "--resume", "latest", "--vae_steps", "6", "--vae_decay_steps", "2",
                     "--allow_changed", "vae_decay_steps", *stop_in_clip) == 0
    err = capsys.readouterr().err
    assert "[vae] reopening the finished phase: 4 -> 6 steps." in err and "[vae] resumed from" in err
    assert json.loads((short / "vae" / "final" / "done.json").read_text())["steps"] == 6
    assert [int(r["step"]) for r in read_log(short / "vae") if r["loss"]] == [1, 2, 3, 4, 5, 6]
    a = load_file(short / "vae" / "final" / "diffusion_pytorch_model.safetensors")
    b = load_file(planned / "vae" / "final" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_phase_is_not_extended_under_a_trained_unet_or_without_its_checkpoint(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for phase in ("vae", "clip"):
        with pytest.raises(SystemExit, match=f"finished {phase} phase \\(4 steps\\), but the U-Net phase has already trained"):
            run_stage(teacher, run, "--resume", "latest", f"--{phase}_steps", "6")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, config.json included
    shutil.rmtree(run / "unet")
    shutil.rmtree(run / "vae" / "checkpoints")
    with pytest.raises(SystemExit, match="checkpoint of its last step is gone"):
        run_stage(teacher, run, "--resume", "latest", "--vae_steps", "6")
    assert run_stage(teacher, run, "--resume", "latest", "--vae_steps", "3", "--stop_phase", "unet", "--stop_after_step", "1") == 0
    assert json.loads((run / "vae" / "final" / "done.json").read_text())["steps"] == 4  # fewer steps: kept as it is
