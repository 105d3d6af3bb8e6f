"""Stage A (train/distill_decoder.py): the student and discriminator, the Eq. 5 losses, a smoke run
whose AutoencoderTiny and pipeline `sdxs` load, a falling loss on a fixed batch, and resume."""

import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, mean, one_torch_thread, read_log, run_stage, sdxs_engine  # noqa: F401

from train import distill_decoder as stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_paper_student_is_taesd_shaped():
    from sdxs.architectures import TAESD

    paper = stage.PRESETS["paper"]
    vae = stage.make_student_vae(channels=paper["vae_channels"], decoder_blocks=paper["decoder_blocks"], encoder_blocks=paper["encoder_blocks"])
    as_tuples = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in vae.config.items()}
    assert {k: as_tuples[k] for k in TAESD} == TAESD  # the released vae/ config
    assert sum(p.numel() for p in vae.decoder.parameters()) == pytest.approx(1.2225e6, rel=1e-3)
    names = {type(m).__name__ for m in vae.decoder.modules()}
    assert not any("Norm" in n or "Attention" in n for n in names)  # no attention, no normalisation


def test_eq5_losses_and_discriminator():
    fake, real = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert stage.l1_downsampled(fake, real) == pytest.approx((F.avg_pool2d(fake, 8) - F.avg_pool2d(real, 8)).abs().mean().item())
    assert stage.l1_downsampled(real, real) == 0
    disc = stage.PatchDiscriminator(channels=8, num_layers=3)
    assert disc(real).shape == (2, 1, 8, 8)  # one logit per patch
    assert stage.gan_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert stage.gan_discriminator_loss(torch.zeros(4), torch.zeros(4)) == 2
    assert stage.gan_generator_loss(torch.tensor([1.0, 3.0])) == -2


def test_smoke_command_writes_a_decoder_and_a_pipeline_sdxs_loads(tmp_path):
    """The acceptance command exactly as a user types it (builds its own tiny teacher), under 60 s."""
    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train/distill_decoder.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, elapsed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]
    assert (out / "loss_curve.png").is_file() and (out / "samples" / "step-0000030.png").is_file()
    assert len(column(read_log(out), "loss_d")) == 20  # the GAN term ran after its 10-step warm-up

    from sdxs.loading import load_decoder

    assert type(load_decoder(out / "final" / "vae", torch.float32)).__name__ == "AutoencoderTiny"
    engine = sdxs_engine(out / "final")
    assert engine.decoders == ["tiny", "large"]
    assert engine.text_to_image("cat", width=64, height=64, decoder="tiny").images[0].size == (64, 64)


def test_loss_falls_on_a_fixed_batch(teacher, cache_dir, tmp_path):
    out = tmp_path / "out"
    assert run_stage(stage, out, "--overfit_batch", "--max_steps", "30", "--gan_start_step", "20", "--sample_every", "0",
                     "--checkpoint_every", "100", "--ema_decay", "0", "--pipeline_base", "none",
                     teacher=teacher, cache_dir=cache_dir) == 0
    rows = read_log(out)
    l1, enc = column(rows, "loss_l1"), column(rows, "loss_enc")
    assert mean(l1[-5:]) < 0.6 * mean(l1[:5]), l1
    assert mean(enc[-5:]) < mean(enc[:5]), enc
    assert len(column(rows, "loss_gan_g")) == len(column(rows, "loss_d")) == 10
    assert sorted(p.name for p in (out / "final").iterdir()) == ["vae"]


def test_killed_run_resumes_from_its_last_checkpoint_exactly(teacher, cache_dir, tmp_path, capsys):
    args = ("--max_steps", "12", "--checkpoint_every", "5", "--sample_every", "0", "--pipeline_base", "none")
    assert run_stage(stage, tmp_path / "straight", *args, teacher=teacher, cache_dir=cache_dir) == 0

    killed = tmp_path / "killed"
    assert run_stage(stage, killed, *args, "--stop_after_step", "8", teacher=teacher, cache_dir=cache_dir) == 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000005"] and not (killed / "final").exists()
    assert run_stage(stage, killed, *args, "--resume", "latest", teacher=teacher, cache_dir=cache_dir) == 0
    assert "at step 5" in capsys.readouterr().err

    assert [int(r["step"]) for r in read_log(killed)] == list(range(1, 13))
    assert column(read_log(killed), "loss") == column(read_log(tmp_path / "straight"), "loss")
    a = load_file(tmp_path / "straight" / "final" / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "final" / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
