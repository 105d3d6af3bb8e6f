"""Stage B (train/distill_unet.py): the block-removal recipe at full scale (meta device, no download),
the weight mapping, a smoke run loaded by `sdxs`, a falling loss on a fixed batch, and resume."""

import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, mean, one_torch_thread, read_log, run_stage, sdxs_engine  # noqa: F401

from train import distill_unet as stage
from train.tiny_teacher import SD15_UNET, SD21_BASE_UNET

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
    # every student weight comes from the teacher, none is new; the removed blocks are exactly dropped
    assert plan.new == set() and set(plan.copied) == set(student.state_dict())
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
    assert plan.new == set() and set(plan.copied) == set(student.state_dict())


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


def test_smoke_command_writes_checkpoints_and_a_pipeline_sdxs_loads(tmp_path):
    """The acceptance command exactly as a user types it (builds its own tiny teacher), under 60 s."""
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train/distill_unet.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, elapsed
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
