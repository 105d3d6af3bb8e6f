"""Stage B (train/distill_unet.py): the block-removal recipe at full scale (meta device, no download),
the weight mapping, the teacher check (SDXL-shaped teachers accepted; the SDXL recipe's tests are in
test_distill_unet_sdxl.py, its runs in test_train_sdxl.py), what kd_step compares (Eqs. 6-8) and what main()
feeds it, the finite-loss guard, a smoke run loaded by `sdxs`, a falling loss on a fixed batch, and resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, mean, one_torch_thread, read_log, run_stage, sdxs_engine  # noqa: F401

from train import common
from train import distill_unet as stage
from train.tiny_teacher import SD15_UNET, SD21_BASE_UNET, TINY_TEACHER_UNET

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def meta_unet(config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


def normalised(config) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items() if not k.startswith("_")}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def plan_for(teacher_config):
    teacher = meta_unet(teacher_config)
    student = meta_unet(stage.derive_student_config(teacher.config))
    plan = stage.plan_student_init(teacher.config, {k: v.shape for k, v in teacher.state_dict().items()},
                                   {k: v.shape for k, v in student.state_dict().items()})
    return teacher, student, plan


def test_recipe_on_sd15_is_exactly_the_dreamshaper_unet():
    from sdxs.architectures import DREAMSHAPER_UNET

    teacher, student, plan = plan_for(SD15_UNET)
    assert n_params(teacher) == 859_520_964
    assert n_params(student) == 315_746_244
    assert normalised(student.config) == normalised(meta_unet(DREAMSHAPER_UNET).config)
    # every student weight comes from the teacher; the removed blocks are exactly dropped
    assert set(plan.copied) == set(student.state_dict())
    assert plan.copied["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert plan.copied["up_blocks.1.attentions.1.proj_in.weight"] == "up_blocks.2.attentions.2.proj_in.weight"
    assert plan.copied["up_blocks.2.resnets.0.conv1.weight"] == "up_blocks.3.resnets.0.conv1.weight"
    assert plan.copied["down_blocks.1.attentions.0.proj_in.weight"] == "down_blocks.1.attentions.0.proj_in.weight"
    assert plan.copied["conv_in.weight"] == "conv_in.weight"
    dropped_blocks = {".".join(k.split(".")[:4]) if k.startswith(("down_blocks", "up_blocks")) else k.split(".")[0] for k in plan.dropped}
    assert dropped_blocks == {
        "mid_block",
        "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.0.resnets.1",
        "down_blocks.1.attentions.1", "down_blocks.1.resnets.1",
        "down_blocks.2.attentions.1", "down_blocks.2.resnets.1", "down_blocks.2.downsamplers.0",
        "down_blocks.3.resnets.0", "down_blocks.3.resnets.1",
        "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
        "up_blocks.3.resnets.1", "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
    }


def test_recipe_on_sd21_base_gives_the_papers_319m():
    teacher, student, plan = plan_for(SD21_BASE_UNET)
    assert n_params(teacher) == 865_910_724
    assert n_params(student) == 318_695_364  # paper Table 3: 319 M
    assert student.config.attention_head_dim == (5, 10, 20) and student.config.cross_attention_dim == 1024
    assert set(plan.copied) == set(student.state_dict())


def test_student_copies_teacher_weights_and_feature_pairs_match(teacher):
    from diffusers import UNet2DConditionModel

    teacher_unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    student, plan = stage.init_student_from_teacher(teacher_unet)
    teacher_state = teacher_unet.state_dict()
    for s_key, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[plan.copied[s_key]]), s_key
    pairs = stage.feature_pairs(teacher_unet.config)
    s_hooks = stage.BlockOutputs(student, [(s, "out") for s, _, _ in pairs])
    t_hooks = stage.BlockOutputs(teacher_unet, [(t, take) for _, t, take in pairs])
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad(), s_hooks.capture() as s_feats, t_hooks.capture() as t_feats:
        assert student(x, t, encoder_hidden_states=states).sample.shape == x.shape
        teacher_unet(x, t, encoder_hidden_states=states)
    assert len(pairs) == 6 and all(s_feats[s].shape == t_feats[t].shape for s, t, _ in pairs)


# --- the teacher check (issue 12, item 8) ----------------------------------------------------------

# SDXL's U-Net shape, tiny: three stages, transformer depths (1, 2, 10), the text_time added embedding.
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), cross_attention_dim=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)


def test_sd_and_sdxl_teachers_pass_the_recipes_check():
    from diffusers import UNet2DConditionModel

    for config in (SD15_UNET, SD21_BASE_UNET, TINY_TEACHER_UNET):
        assert stage.unsupported_teacher_features(config) == []
        stage.check_teacher_unet(config)
    sdxl = dict(UNet2DConditionModel.from_config(TINY_SDXL_UNET).config)  # a config diffusers builds
    assert stage.unsupported_teacher_features(sdxl) == [] and stage.derive_student_config(sdxl)["mid_block_type"] is None
    stage.check_teacher_unet(sdxl, "Teacher 'x'")


@pytest.mark.parametrize("change, named", [
    (dict(transformer_layers_per_block=2), "transformer_layers_per_block 2"),
    (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D",) + TINY_TEACHER_UNET["down_block_types"][1:]), "SimpleCrossAttnDownBlock2D"),
    (dict(layers_per_block=0), "layers_per_block 0"),
    (dict(up_block_types=TINY_TEACHER_UNET["up_block_types"][1:]), "4 down and 3 up stages"),
])
def test_each_unsupported_feature_is_named(change, named):
    problems = stage.unsupported_teacher_features({**TINY_TEACHER_UNET, **change})
    assert len(problems) == 1 and named in problems[0], problems


@pytest.mark.parametrize("change, refusal", [
    (dict(class_embed_type="timestep"), r"U-Net is not one stage B's .* class_embed_type 'timestep'.* Supported: an SD-1.x"),
    (dict(transformer_layers_per_block=(0, 2, 4)), r"U-Net is not one stage B's .*transformer_layers_per_block \[0, 2, 4\] \(one depth >= 1 per stage expected\)"),
])
def test_run_refuses_an_unsupported_sdxl_shaped_teacher_before_loading_it(teacher, tmp_path, change, refusal):
    sdxl = tmp_path / "sdxl-teacher"
    shutil.copytree(teacher, sdxl)  # an SD teacher's weights under an SDXL-shaped config: loading it would fail in diffusers
    (sdxl / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY_SDXL_UNET, **change}))
    with pytest.raises(SystemExit, match=refusal):
        run_stage(stage, tmp_path / "out", teacher=sdxl)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_bundled_emoji_teacher_single_resnet_stages_keep_their_resnet_and_every_weight_is_copied_or_removed():
    """The mini reproduction's teacher (3 stages, 1 resnet each, mid block): the student drops the mid
    block and the last stage, keeps one resnet per stage, and starts as the teacher's kept weights."""
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(Path(__file__).resolve().parents[1] / "models" / "emoji-teacher" / "unet")
    config = stage.derive_student_config(teacher.config)
    assert config["layers_per_block"] == 1 and config["mid_block_type"] is None
    assert config["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert config["up_block_types"] == ("CrossAttnUpBlock2D", "UpBlock2D")
    student, plan = stage.init_student_from_teacher(teacher)
    assert sum(p.numel() for p in student.parameters()) == 2_963_780  # of the teacher's 6,715,588
    # the up block that takes the skip from the stage below keeps both resnets, in order
    assert plan.copied["up_blocks.0.resnets.1.conv1.weight"] == "up_blocks.1.resnets.1.conv1.weight"
    assert plan.copied["up_blocks.1.resnets.0.conv1.weight"] == "up_blocks.2.resnets.0.conv1.weight"
    assert plan.copied["down_blocks.1.attentions.0.proj_in.weight"] == "down_blocks.1.attentions.0.proj_in.weight"
    assert not any(t.startswith(("mid_block.", "down_blocks.2.", "up_blocks.0.")) for t in plan.copied.values())
    x, t, states = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 128)
    with torch.no_grad():
        assert student(x, t, encoder_hidden_states=states).sample.shape == x.shape


def test_a_student_weight_without_a_same_shaped_teacher_weight_is_refused_not_initialised_fresh():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        teacher, student = UNet2DConditionModel(**TINY_TEACHER_UNET), UNet2DConditionModel(**stage.derive_student_config(TINY_TEACHER_UNET))
    teacher_shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    teacher_shapes["up_blocks.1.resnets.2.conv1.weight"] = torch.Size([1, 1, 3, 3])
    with pytest.raises(ValueError, match=r"up_blocks.0.resnets.1.conv1.weight .* <- up_blocks.1.resnets.2.conv1.weight \(1, 1, 3, 3\)"):
        stage.plan_student_init(TINY_TEACHER_UNET, teacher_shapes, {k: v.shape for k, v in student.state_dict().items()})


# --- one KD step (Eqs. 6-8) -----------------------------------------------------------------------

# Student block -> its teacher block (block_map): the student's up stage j is the teacher's up stage j+1;
# the student's last down stage has no downsampler, so its teacher stage is read before the downsampler.
TINY_PAIRS = [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"), ("down_blocks.2", "down_blocks.2.downsamplers.0"),
              ("up_blocks.0", "up_blocks.1"), ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3")]


def test_feature_pairs_map_each_student_block_to_its_teacher_block():
    assert stage.feature_pairs(TINY_TEACHER_UNET) == [
        ("down_blocks.0", "down_blocks.0", "out"), ("down_blocks.1", "down_blocks.1", "out"),
        ("down_blocks.2", "down_blocks.2", "pre_downsample"),
        ("up_blocks.0", "up_blocks.1", "out"), ("up_blocks.1", "up_blocks.2", "out"), ("up_blocks.2", "up_blocks.3", "out")]


def kd_problem(teacher):
    """A tiny KD problem: the teacher U-Net (left trainable on purpose: kd_step alone must keep gradients
    out of it), its student, and three different samples at three different timesteps."""
    from diffusers import UNet2DConditionModel

    teacher_unet = UNet2DConditionModel.from_pretrained(teacher / "unet").requires_grad_(True)
    student, _ = stage.init_student_from_teacher(teacher_unet)
    gen = torch.Generator().manual_seed(0)
    x_t, states = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 32, generator=gen)
    return teacher_unet, student.train(), x_t, torch.tensor([50, 500, 950]), states


def read_blocks(model, names: list[str], *args, **kwargs):
    """(eps, {name: block output}) of one forward pass; a name ending in 'downsamplers.0' gives that
    downsampler's INPUT (its block's state before downsampling)."""
    found, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        if name.endswith("downsamplers.0"):
            handles.append(module.register_forward_pre_hook(lambda m, inputs, name=name: found.__setitem__(name, inputs[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: found.__setitem__(name, out[0] if isinstance(out, tuple) else out)))
    try:
        return model(*args, **kwargs).sample, found
    finally:
        for h in handles:
            h.remove()


def test_kd_step_compares_student_and_teacher_on_the_same_inputs_block_by_block(teacher):
    teacher_unet, student, x_t, t, states = kd_problem(teacher)
    hooks = stage.FeatureHooks(student, teacher_unet)
    losses = stage.kd_step(student, teacher_unet, hooks, x_t, t, states, lambda_feat=0.5)

    with torch.no_grad():
        t_eps, t_feats = read_blocks(teacher_unet, [b for _, b in TINY_PAIRS], x_t, t, encoder_hidden_states=states)
        s_eps, s_feats = read_blocks(student, [b for b, _ in TINY_PAIRS], x_t, t, encoder_hidden_states=states)
    out = F.mse_loss(s_eps, t_eps)  # Eq. 6: the same x_t, t and text states for both
    feat = sum(F.mse_loss(s_feats[s], t_feats[b]) for s, b in TINY_PAIRS)  # Eq. 7
    assert losses["loss_out"].item() == pytest.approx(out.item(), rel=1e-5)
    assert losses["loss_feat"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(out.item() + 0.5 * feat.item(), rel=1e-5)  # Eq. 8, no denoising term
    # the checks can tell: another sample's or another timestep's teacher output gives a loss off by far more
    # than their tolerance (a random tiny U-Net depends only weakly on t: 0.1% here)
    with torch.no_grad():
        other_t, _ = read_blocks(teacher_unet, [], x_t, t.flip(0), encoder_hidden_states=states)
    assert F.mse_loss(s_eps, t_eps.roll(1, 0)).item() > 1.2 * out.item()
    assert F.mse_loss(s_eps, other_t).item() != pytest.approx(out.item(), rel=1e-4)

    # both terms train the student; nothing reaches the teacher (even with its requires_grad on)
    assert torch.autograd.grad(losses["loss_out"], student.conv_out.weight, retain_graph=True)[0].abs().sum() > 0
    assert torch.autograd.grad(losses["loss_feat"], student.down_blocks[0].resnets[0].conv1.weight, retain_graph=True)[0].abs().sum() > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher_unet.parameters())


def test_a_few_kd_steps_move_the_student_toward_the_teacher_and_leave_the_teacher(teacher):
    teacher_unet, student, x_t, t, states = kd_problem(teacher)
    before = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
    hooks = stage.FeatureHooks(student, teacher_unet)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    values = []
    for _ in range(8):
        losses = stage.kd_step(student, teacher_unet, hooks, x_t, t, states, lambda_feat=1.0)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append({k: v.item() for k, v in losses.items()})
    for name in ("loss_out", "loss_feat"):
        assert values[-1][name] < 0.8 * values[0][name], [v[name] for v in values]
    assert all(torch.equal(before[k], v) for k, v in teacher_unet.state_dict().items())


def kd_batch_inputs(teacher, n: int, caption_dropout: float, latents: float = 0.0, seed: int = 0):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer, text_encoder = CLIPTokenizer.from_pretrained(teacher / "tokenizer"), CLIPTextModel.from_pretrained(teacher / "text_encoder")
    scheduler = DDPMScheduler.from_pretrained(teacher / "scheduler")
    batch = {"latents": torch.full((n, 4, 8, 8), latents), "prompt": ["a photo of a cat"] * n}
    encode = common.PromptEncoder((tokenizer,), (text_encoder,), 64)
    x_t, t, cond = stage.kd_inputs(batch, torch.Generator().manual_seed(seed), noise_scheduler=scheduler, encode=encode,
                                   caption_dropout=caption_dropout, device=torch.device("cpu"))
    states = cond.states
    uncond, cond = common.encode_prompts(tokenizer, text_encoder, ["", "a photo of a cat"])
    return x_t, t, states, scheduler.alphas_cumprod, uncond, cond


def test_kd_inputs_noise_the_latents_with_the_teachers_schedule_at_uniform_t_and_drop_captions(teacher):
    x0, t, states, alphas_cumprod, uncond, cond = kd_batch_inputs(teacher, 200, 0.3, latents=0.0)
    x1, t1, _, _, _, _ = kd_batch_inputs(teacher, 200, 0.3, latents=1.0)  # same draws, z0 = 1 instead of 0
    assert torch.equal(t, t1) and 0 <= t.min() < 40 and 960 < t.max() < 1000  # uniform over [0, 1000)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    # x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps: linear in z0 with slope sqrt(abar_t), eps ~ N(0, 1)
    assert torch.allclose(x1 - x0, a.sqrt().expand_as(x0), atol=1e-5)
    assert (x0 / (1 - a).sqrt()).std().item() == pytest.approx(1.0, abs=0.05)
    dropped = [torch.equal(s, uncond) for s in states]
    assert all(d or torch.equal(s, cond) for s, d in zip(states, dropped))
    assert 0.2 < sum(dropped) / len(dropped) < 0.4  # caption_dropout 0.3: the empty prompt's states instead
    assert all(torch.equal(s, uncond) for s in kd_batch_inputs(teacher, 8, 1.0)[2])
    assert all(torch.equal(s, cond) for s in kd_batch_inputs(teacher, 8, 0.0)[2])


# --- what main() does with it -----------------------------------------------------------------------


def test_main_feeds_kd_step_and_steps_the_lr_schedule_once_per_optimizer_step(teacher, cache_dir, tmp_path, monkeypatch):
    """4 warm-up steps, 2 micro-steps each, every caption dropped: the logged lr climbs by 1/4 per
    optimizer step (a schedule stepped twice, or per micro-step, climbs faster), every kd_step call
    gets the empty prompt's states, and the frozen teacher ends as it was on disk."""
    from diffusers import UNet2DConditionModel

    calls = []

    def spy(student, teacher_unet, hooks, x_t, t, states, *, lambda_feat):
        calls.append(dict(teacher_unet=teacher_unet, t=t, states=states, lambda_feat=lambda_feat))
        return kd_step(student, teacher_unet, hooks, x_t, t, states, lambda_feat=lambda_feat)

    kd_step = stage.kd_step
    monkeypatch.setattr(stage, "kd_step", spy)
    out = tmp_path / "out"
    assert run_stage(stage, out, "--max_steps", "3", "--grad_accum", "2", "--lr_warmup_steps", "4", "--caption_dropout", "1",
                     "--lambda_feat", "0.25", "--checkpoint_every", "100", "--sample_every", "0", "--ema_decay", "0",
                     teacher=teacher, cache_dir=cache_dir) == 0
    assert column(read_log(out), "lr") == pytest.approx([1e-3 * min(1.0, (s + 1) / 4) for s in (1, 2, 3)])
    assert len(calls) == 6 and all(c["lambda_feat"] == 0.25 for c in calls)
    from transformers import CLIPTextModel, CLIPTokenizer

    uncond = common.encode_prompts(CLIPTokenizer.from_pretrained(teacher / "tokenizer"),
                                   CLIPTextModel.from_pretrained(teacher / "text_encoder"), [""])[0]
    assert all(torch.equal(s, uncond) for c in calls for s in c["states"].states)
    assert all(c["t"].min() >= 0 and c["t"].max() < 1000 for c in calls)
    used = calls[0]["teacher_unet"]
    assert all(c["teacher_unet"] is used for c in calls) and not any(p.requires_grad for p in used.parameters())
    on_disk = UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict()
    assert all(torch.equal(on_disk[k], v) for k, v in used.state_dict().items())


def checkpoint_weights(folder):
    """Every tensor of a checkpoint's model files (accelerate's model*.safetensors)."""
    files = sorted(folder.glob("model*.safetensors"))
    assert files, sorted(p.name for p in folder.iterdir())
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def test_lr_1e6_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(teacher, cache_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(common.NonFiniteLossError) as err:
        run_stage(stage, out, "--lr", "1e6", "--checkpoint_every", "1", "--sample_every", "0", teacher=teacher, cache_dir=cache_dir)
    message = str(err.value.code)
    assert message.startswith("error: step 2: non-finite loss = nan, loss_out = nan") and "(student)" in message, message
    assert "step-0000001" in message and "--resume latest" in message and "--lr" in message
    # nothing written after the bad step: the good checkpoint is not rotated out, no final folder
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"] and not (out / "final").exists()
    weights = checkpoint_weights(out / "checkpoints" / "step-0000001")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_skip_nonfinite_skips_the_update_and_its_schedule_step_then_stops(teacher, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(common.NonFiniteLossError, match="^error: step 4: non-finite"):
        run_stage(stage, out, "--lr", "1e6", "--skip_nonfinite", "2", "--lr_warmup_steps", "10", "--checkpoint_every", "1",
                  "--keep_checkpoints", "5", "--sample_every", "0", teacher=teacher, cache_dir=cache_dir)
    err = capsys.readouterr().err
    assert "warning: step 2: non-finite" in err and "warning: step 3: non-finite" in err
    # steps 2 and 3 were skipped: no weight, EMA or schedule change after step 1
    first, last = (checkpoint_weights(out / "checkpoints" / f"step-000000{s}") for s in (1, 3))
    assert all(torch.equal(first[k], last[k]) for k in first)
    assert column(read_log(out), "lr") == pytest.approx([2e5] * 3)  # the warm-up's 2nd value, three times


def test_model_and_data_flags_reach_main(teacher, tmp_path, capsys):
    """--max_bad_fraction lets a folder with 25% bad records through (the default 5% refuses it), and a
    missing --tiny_decoder is reported under its own flag, before any work."""
    import json

    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    rows = [{"file_name": f"{i}.png", "text": f"a {c} square"} for i, c in enumerate(["red", "green", "blue"])]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"file_name": "bad.png", "text": "x"}]))
    assert run_stage(stage, tmp_path / "out", "--image_folder", str(folder), "--max_bad_fraction", "0.3", "--max_steps", "1",
                     "--sample_every", "0", teacher=teacher) == 0
    assert "data: skipped 1 of 4 records" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--tiny_decoder") as err:
        run_stage(stage, tmp_path / "out2", "--tiny_decoder", str(tmp_path / "nowhere"), teacher=teacher)
    assert "--model" not in str(err.value.code) and not (tmp_path / "out2" / "cache").exists()



def test_smoke_command_writes_checkpoints_and_a_pipeline_sdxs_loads(tmp_path):
    """The acceptance command exactly as a user types it (builds its own tiny teacher). Its time
    is measured by the README's table, never asserted here (shared CPUs are noisy)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train/distill_unet.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]  # keep the last 2
    assert (out / "loss_curve.png").is_file() and (out / "samples" / "step-0000030.png").is_file()
    assert len(column(read_log(out), "loss")) == 30

    engine = sdxs_engine(out / "final")
    assert engine.decoders == ["large"]  # no --tiny_decoder: vae/ is the teacher's AutoencoderKL
    assert engine.text_to_image("cat", width=64, height=64, decoder="large").images[0].size == (64, 64)


def test_loss_falls_on_a_fixed_batch_and_tiny_decoder_ships_as_vae(teacher, cache_dir, tmp_path):
    from diffusers import AutoencoderTiny

    from sdxs.architectures import TINY_TAESD

    AutoencoderTiny(**TINY_TAESD).save_pretrained(tmp_path / "tiny-vae")
    out = tmp_path / "out"
    assert run_stage(stage, out, "--overfit_batch", "--max_steps", "30", "--caption_dropout", "0", "--sample_every", "0",
                     "--checkpoint_every", "100", "--ema_decay", "0", "--tiny_decoder", str(tmp_path / "tiny-vae"),
                     teacher=teacher, cache_dir=cache_dir) == 0
    rows = read_log(out)
    for name in ("loss", "loss_out", "loss_feat"):
        values = column(rows, name)
        assert mean(values[-5:]) < 0.6 * mean(values[:5]), (name, values)
    engine = sdxs_engine(out / "final")
    assert engine.decoders == ["tiny", "large"]  # vae/ is the tiny decoder, vae_large/ the teacher's AutoencoderKL
    assert len(engine.text_to_image("cat", width=64, height=64).images) == 1


def test_killed_run_resumes_from_its_last_checkpoint_exactly(teacher, cache_dir, tmp_path, capsys):
    args = ("--max_steps", "12", "--checkpoint_every", "5", "--sample_every", "0")
    assert run_stage(stage, tmp_path / "straight", *args, teacher=teacher, cache_dir=cache_dir) == 0

    killed = tmp_path / "killed"
    assert run_stage(stage, killed, *args, "--stop_after_step", "8", teacher=teacher, cache_dir=cache_dir) == 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000005"] and not (killed / "final").exists()
    with pytest.raises(SystemExit, match="--resume latest"):  # never silently restarts on top of a run
        run_stage(stage, killed, *args, teacher=teacher, cache_dir=cache_dir)
    assert run_stage(stage, killed, *args, "--resume", "latest", teacher=teacher, cache_dir=cache_dir) == 0
    assert "at step 5" in capsys.readouterr().err

    assert [int(r["step"]) for r in read_log(killed)] == list(range(1, 13))  # steps 6-8 of the killed run redone once
    assert column(read_log(killed), "loss") == column(read_log(tmp_path / "straight"), "loss")
    a = load_file(tmp_path / "straight" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
