"""Stage D (train/distill_controlnet.py): the student ControlNet's shape (the released sketch model's at SD
scale) and its residuals against the student U-Net; its weights pruned from the teacher ControlNet; the
feature KD on the decoder blocks only (the only blocks a ControlNet reaches); the one-step triplets (each
control from its own target); the ControlNets inside stage C's steps; each mode's smoke run, its resume,
and its result in `sdxs` / diffusers."""

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from train_helpers import make_teacher, one_torch_thread, run_stage  # noqa: F401

from train import common
from train import distill_controlnet as stage
from train import distill_one_step as stage_c
from train.distill_unet import derive_student_config, init_student_from_teacher
from train.tiny_teacher import SD15_UNET

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def parts(teacher):
    """The tiny teacher, its ControlNet (zero convolutions randomised so residuals matter), and the stage B
    student U-Net with the student ControlNet derived from the teacher's."""
    loaded = common.load_teacher(str(teacher), CPU, torch.float32)
    torch.manual_seed(0)
    teacher_cn = stage.teacher_controlnet_from_unet(loaded.unet, common.vae_factor(loaded.vae.config))
    for conv in [teacher_cn.controlnet_cond_embedding.conv_out, *teacher_cn.controlnet_down_blocks, teacher_cn.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.05)
    student_unet, _ = init_student_from_teacher(loaded.unet)
    student_cn = stage.student_controlnet_from_teacher(teacher_cn, loaded.unet.config, student_unet)
    return loaded, teacher_cn, student_unet.requires_grad_(False), student_cn


def sketches(n: int, side: int = 64) -> torch.Tensor:
    """n different control images (dark strokes on white), (n, 3, side, side) in [0, 1]."""
    images = []
    for k in range(n):
        image = Image.new("RGB", (side, side), "white")
        ImageDraw.Draw(image).line([(4 + 7 * k, 4), (side - 5, side - 5 - 9 * k)], fill="black", width=2)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def inputs(n: int, side: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, side, side, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
            torch.randn(n, 77, 32, generator=gen))


# --- the student ControlNet --------------------------------------------------------------------------


def test_at_sd_scale_the_student_controlnet_is_the_released_sketch_models_architecture():
    from diffusers import ControlNetModel

    from sdxs.architectures import DREAMSHAPER_SKETCH_CONTROLNET

    student_unet = derive_student_config(SD15_UNET)
    with torch.device("meta"):
        accepted = inspect.signature(ControlNetModel.__init__).parameters
        teacher_cn = ControlNetModel(**{k: v for k, v in SD15_UNET.items() if k in accepted})
        config = stage.student_controlnet_config(student_unet, teacher_cn.config)
        student_cn = ControlNetModel(**config)
    for key, value in DREAMSHAPER_SKETCH_CONTROLNET.items():
        assert json.dumps(config[key]) == json.dumps(value), key
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert sum(p.numel() for p in student_cn.parameters()) == 186_551_440  # IDKiro/sdxs-512-dreamshaper-sketch
    assert len(student_cn.controlnet_down_blocks) == 6  # + the mid residual: 7
    # ...and every one of its weights has a teacher ControlNet weight to start from
    plan = stage.plan_student_controlnet(SD15_UNET, {k: v.shape for k, v in teacher_cn.state_dict().items()}, config,
                                         {k: v.shape for k, v in student_cn.state_dict().items()})
    assert set(plan) == set(student_cn.state_dict())
    # SD-1.5 has two resnets per stage, the student one: the residual after the student's first downsampler
    # is the teacher's (index 3: conv_in, resnets 0 and 1, downsampler), not the teacher's index 2
    assert plan["controlnet_down_blocks.2.weight"] == "controlnet_down_blocks.3.weight"
    assert plan["controlnet_down_blocks.3.weight"] == "controlnet_down_blocks.4.weight"
    assert plan["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"


def test_student_controlnet_residuals_match_the_student_unets_down_blocks(parts):
    _, _, student_unet, student_cn = parts
    x, t, states = inputs(2)
    skips = []
    hooks = [student_unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o))]
    hooks += [block.register_forward_hook(lambda m, i, o: skips.extend(o[1])) for block in student_unet.down_blocks]
    deepest = []
    hooks.append(student_unet.down_blocks[-1].register_forward_hook(lambda m, i, o: deepest.append(o[0])))
    with torch.no_grad():
        student_unet(x, t, encoder_hidden_states=states)
        down, mid = student_cn(x, t, encoder_hidden_states=states, controlnet_cond=sketches(2), return_dict=False)
    for hook in hooks:
        hook.remove()
    assert [tuple(r.shape) for r in down] == [tuple(s.shape) for s in skips]
    assert mid.shape == deepest[0].shape  # added where the removed mid block was
    with torch.no_grad():  # and the student U-Net takes them
        student_unet(x, t, encoder_hidden_states=states, down_block_additional_residuals=down, mid_block_additional_residual=mid)


def test_student_controlnet_starts_from_the_teacher_controlnets_weights(parts):
    _, teacher_cn, _, student_cn = parts
    teacher_state, student_state = teacher_cn.state_dict(), student_cn.state_dict()
    for key in ("controlnet_cond_embedding.conv_in.weight", "mid_block.resnets.0.conv1.weight", "controlnet_mid_block.weight",
                "down_blocks.0.resnets.0.conv1.weight", "controlnet_down_blocks.1.weight"):
        assert torch.equal(student_state[key], teacher_state[key]), key
    # the tiny teacher has two resnets per stage: the student's residual 3 (stage 1's resnet) is the teacher's 4
    assert torch.equal(student_state["controlnet_down_blocks.3.weight"], teacher_state["controlnet_down_blocks.4.weight"])
    assert len(student_cn.controlnet_down_blocks) < len(teacher_cn.controlnet_down_blocks)


def test_a_controlnet_for_another_unet_or_scale_is_refused(parts):
    loaded, teacher_cn, student_unet, _ = parts
    with pytest.raises(SystemExit, match="does not fit"):
        stage.check_controlnet_fits(teacher_cn, student_unet, 8, "--teacher_controlnet")
    with pytest.raises(SystemExit, match="controls 8x the latent side, the VAE makes 4x"):
        stage.check_controlnet_fits(teacher_cn, loaded.unet, 4, "--teacher_controlnet")
    assert stage.conditioning_channels(4) == (16, 32, 96) and stage.conditioning_channels(8) == (16, 32, 96, 256)
    assert stage.conditioning_channels(8, 64) == (16, 32, 64, 64)  # never wider than the U-Net it feeds (emoji v2)
    width = loaded.unet.config.block_out_channels[0]  # mode teacher's ControlNet is built so from the teacher U-Net
    assert tuple(teacher_cn.config.conditioning_embedding_out_channels) == stage.conditioning_channels(common.vae_factor(loaded.vae.config), width)
    assert max(teacher_cn.config.conditioning_embedding_out_channels) <= width < 96


# --- mode distill: decoder feature KD ----------------------------------------------------------------


def test_feature_kd_pairs_are_the_decoder_blocks():
    pairs = stage.decoder_pairs(SD15_UNET)
    assert [(s, t) for s, t, _ in pairs] == [("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3")]


def test_feature_kd_trains_the_student_controlnet(parts):
    """The ControlNet's residuals enter the U-Net through its skip connections and after its mid stage,
    so only the decoder blocks' outputs depend on it: the feature term must move the ControlNet."""
    loaded, teacher_cn, student_unet, student_cn = parts
    student = stage.ControlledUNet(student_unet, student_cn)
    teacher_side = stage.ControlledUNet(loaded.unet, teacher_cn)
    hooks = stage.DecoderHooks(student_unet, loaded.unet)
    x, t, states = inputs(2)
    student_cn.zero_grad()
    losses = stage.controlnet_kd_step(student, teacher_side, hooks, x, t, states, sketches(2), lambda_feat=1.0)
    losses["loss_feat"].backward()
    grads = [p.grad.abs().sum() for p in student_cn.parameters() if p.grad is not None]
    student_cn.zero_grad()
    assert losses["loss_feat"].item() > 0 and grads and sum(grads) > 0
    assert not any(p.grad is not None for p in teacher_cn.parameters())  # the teacher side is frozen


# --- mode one_step: triplets, and the ControlNets inside stage C's steps ---------------------------------


def test_each_triplet_control_is_extracted_from_its_own_target(parts, tmp_path):
    loaded = parts[0]
    s = stage_c.step_settings(_one_step_args(), loaded.scheduler_config, uncond=torch.zeros(1, 77, 32), device=CPU, vae_factor=8)
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 4, 8, 8, generator=gen) * 2
    batch = {"noise": torch.randn(3, 4, 8, 8, generator=gen), "latents": targets, "prompt": ["a", "b", "c"]}
    micro = stage.one_step_micro_batch(batch, torch.zeros(3, 77, 32), gen, s, None, loaded.vae, "sketch", None, 0.0)
    for i in range(3):
        own = stage.triplet_controls(targets[i : i + 1], loaded.vae, "sketch")
        assert torch.equal(micro.control[i : i + 1], own)
    assert not torch.equal(micro.control[0], micro.control[1])
    assert torch.equal(micro.noise, batch["noise"]) and torch.equal(micro.target, targets)  # r = 0: eps untouched


def test_noise_reinit_keeps_unit_variance_and_part_of_the_noise():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 32, 32, generator=gen)
    assert torch.equal(stage.reinit_noise(noise, 0.0, gen), noise)
    half = stage.reinit_noise(noise, 0.5, gen)
    assert abs(half.std().item() - 1) < 0.05
    corr = torch.corrcoef(torch.stack([half.flatten(), noise.flatten()]))[0, 1].item()
    assert abs(corr - 0.5**0.5) < 0.05


def test_offline_score_sees_the_control_in_both_cfg_branches(parts):
    loaded, teacher_cn, _, _ = parts
    offline = stage.ControlledUNet(loaded.unet, teacher_cn)
    x, t, states = inputs(2)
    uncond, control = torch.zeros(1, 77, 32), sketches(2)
    eps = stage_c.offline_eps(offline, x, t, states, uncond, 3.0, control)
    with torch.no_grad():
        eps_u = offline(x, t, uncond.expand(2, -1, -1), control).sample
        eps_c = offline(x, t, states, control).sample
    torch.testing.assert_close(eps, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_controls_change_the_controlled_unets_output_per_sample(parts):
    loaded, teacher_cn, _, _ = parts
    model = stage.ControlledUNet(loaded.unet, teacher_cn)
    x, t, states = inputs(2)
    control = sketches(2)
    with torch.no_grad():
        both = model(x, t, states, control).sample
        swapped = model(x, t, states, control.flip(0)).sample
        first = model(x[:1], t[:1], states[:1], control[:1]).sample
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both, swapped)


def _one_step_args():
    args = stage.parse(["--mode", "one_step", "--preset", "smoke", "--output_dir", "unused"])
    return args


# --- the modes end to end ------------------------------------------------------------------------------


def _cn_weights(folder):
    return load_file(folder / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_teacher_mode_smoke_resumes_to_the_same_controlnet_and_samples_with_diffusers(teacher, tmp_path):
    cache = tmp_path / "cache"
    assert run_stage(stage, tmp_path / "full", "--mode", "teacher", teacher=teacher, cache_dir=cache) == 0
    assert run_stage(stage, tmp_path / "cut", "--mode", "teacher", "--stop_after_step", "3", teacher=teacher, cache_dir=cache) == 0
    assert not (tmp_path / "cut" / "final").exists()
    assert run_stage(stage, tmp_path / "cut", "--mode", "teacher", "--resume", "latest", teacher=teacher, cache_dir=cache) == 0
    full, cut = _cn_weights(tmp_path / "full"), _cn_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    start = stage.teacher_controlnet_from_unet(common.load_teacher(str(teacher), CPU, torch.float32).unet, 8).state_dict()
    assert any(not torch.equal(full[k], start[k]) for k in full)  # it trained

    from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    final = tmp_path / "full" / "final"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(teacher, controlnet=ControlNetModel.from_pretrained(final / "controlnet"),
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    image = pipe("a cat", image=Image.new("RGB", (64, 64), "white"), num_inference_steps=2, height=64, width=64,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_distill_and_one_step_smoke_results_run_in_sdxs_sketch_mode(teacher, tmp_path):
    from sdxs import SDXSEngine

    cache = tmp_path / "cache"
    assert run_stage(stage, tmp_path / "teacher", "--mode", "teacher", "--max_steps", "2", teacher=teacher, cache_dir=cache) == 0
    cn = str(tmp_path / "teacher" / "final")
    assert run_stage(stage, tmp_path / "distill", "--mode", "distill", "--teacher_controlnet", cn, teacher=teacher, cache_dir=cache) == 0
    rows = (tmp_path / "distill" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[-3:] == ["loss", "loss_out", "loss_feat"] and len(rows) == 7
    one = tmp_path / "one-step"
    assert run_stage(stage, one, "--mode", "one_step", "--teacher_controlnet", cn, "--student_controlnet",
                     str(tmp_path / "distill" / "final"), teacher=teacher, cache_dir=cache) == 0
    assert (one / "samples").is_dir() and (one / "loss_curve.png").is_file()
    for folder in (tmp_path / "distill" / "final", one / "final"):
        engine = SDXSEngine.from_pretrained(str(folder), device="cpu", backend="torch")
        assert engine.components.controlnet is not None
        line = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(line).line([(5, 32), (58, 32)], fill="black", width=3)
        result = engine.sketch_to_image(line, "a cat", seed=1)
        drawn = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(drawn).ellipse((10, 10, 54, 54), outline="black", width=3)
        assert result.images[0].size == (64, 64)
        # the sketch steers it: sketch_to_image's own control tensors, compared before the 8-bit rounding (a
        # ControlNet a few smoke steps away from its zero convolutions moves the pixels by about one level)
        noise, embeddings = engine.initial_noise([1], 64, 64), engine.text_conditioning(["a cat"])[0]
        controls = [engine.prepare_sketch_request(sketch, "a cat", 1, 0.8, None, 1, 0.0)[1] for sketch in (line, drawn)]
        latents = [engine.denoise(noise, embeddings, control, 0.8) for control in controls]
        assert not torch.equal(*controls) and not torch.equal(*latents)
        assert torch.equal(engine.denoise(noise, embeddings, controls[0], 0.0), engine.denoise(noise, embeddings, controls[1], 0.0))
    # one_step trained only the ControlNet: its U-Net is the start's, bit for bit
    start = tmp_path / "distill" / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    end = one / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    a, b = load_file(start), load_file(end)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distill_mode_resumes_to_the_same_controlnet(teacher, tmp_path):
    cache = tmp_path / "cache"  # --preset smoke without --teacher_controlnet: an untrained teacher ControlNet
    args = ["--mode", "distill", "--max_steps", "4", "--checkpoint_every", "2"]
    assert run_stage(stage, tmp_path / "full", *args, teacher=teacher, cache_dir=cache) == 0
    assert run_stage(stage, tmp_path / "cut", *args, "--stop_after_step", "2", teacher=teacher, cache_dir=cache) == 0
    assert run_stage(stage, tmp_path / "cut", *args, "--resume", "latest", teacher=teacher, cache_dir=cache) == 0
    full, cut = _cn_weights(tmp_path / "full"), _cn_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_one_step_mode_resumes_to_the_same_controlnet(teacher, tmp_path):
    cache = tmp_path / "cache"
    args = ["--mode", "one_step", "--max_steps", "4", "--fm_warmup_steps", "1", "--checkpoint_every", "2"]
    assert run_stage(stage, tmp_path / "full", *args, teacher=teacher, cache_dir=cache) == 0
    assert run_stage(stage, tmp_path / "cut", *args, "--stop_after_step", "2", teacher=teacher, cache_dir=cache) == 0
    assert run_stage(stage, tmp_path / "cut", *args, "--resume", "latest", teacher=teacher, cache_dir=cache) == 0
    full, cut = _cn_weights(tmp_path / "full"), _cn_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_bad_flags_are_refused_with_what_to_do(teacher, tmp_path, capsys):
    with pytest.raises(SystemExit):
        stage.parse(["--mode", "teacher", "--preset", "smoke", "--output_dir", str(tmp_path), "--control", "depth"])
    assert "--depth_estimator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage.parse(["--mode", "distill", "--preset", "mini", "--output_dir", str(tmp_path), "--student", "x"])
    assert "--teacher_controlnet" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no ControlNet there"):
        stage.load_controlnet(str(teacher), "--teacher_controlnet")  # a pipeline without controlnet/
    with pytest.raises(SystemExit, match="not stage B's student"):
        loaded = common.load_teacher(str(teacher), CPU, torch.float32)
        stage.check_stage_b_student(loaded.unet, loaded.unet, "--student")


def test_each_training_control_is_extracted_from_its_own_image(parts):
    """Modes teacher and distill: the control of sample i comes from sample i's cached image, and x_t from
    its latents (stage B's kd_inputs)."""
    from diffusers import DDPMScheduler

    loaded = parts[0]
    images = sketches(3) * 2 - 1  # three different pictures in [-1, 1]
    batch = {"latents": torch.randn(3, 4, 8, 8), "image": images, "prompt": ["a", "b", "c"]}
    x_t, t, states, noise, control = stage.controlled_inputs(
        batch, torch.Generator().manual_seed(0), noise_scheduler=DDPMScheduler.from_config(loaded.scheduler_config),
        tokenizer=loaded.tokenizer, text_encoder=loaded.text_encoder, caption_dropout=0.0, kind="sketch",
        depth_estimator=None, device=CPU)
    for i in range(3):
        assert torch.equal(control[i : i + 1], stage.image_controls(images[i : i + 1], "sketch"))
    assert not torch.equal(control[0], control[1])
    abar = DDPMScheduler.from_config(loaded.scheduler_config).alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * batch["latents"] + (1 - abar).sqrt() * noise)
