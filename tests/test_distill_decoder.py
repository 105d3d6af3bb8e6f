"""Stage A (train/distill_decoder.py): the student and discriminator, the Eq. 5 losses, what one
decoder / discriminator step computes and what main() feeds it, the finite-loss guard, a smoke run
whose AutoencoderTiny and pipeline `sdxs` load, a falling loss on a fixed batch, and resume."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, mean, one_torch_thread, read_log, run_stage, sdxs_engine  # noqa: F401

from train import common
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


# --- one step (Eq. 5) --------------------------------------------------------------------------------


def down8(images: torch.Tensor) -> torch.Tensor:
    """8x8 block means, written out (not avg_pool2d): what Eq. 5's L1 compares."""
    n, c, h, w = images.shape
    return images.reshape(n, c, h // 8, 8, w // 8, 8).mean(dim=(3, 5))


def gan_problem(seed: int = 0):
    """A tiny student AutoencoderTiny and discriminator, latents z and (stand-in) teacher images x~ of them."""
    torch.manual_seed(seed)
    vae = stage.make_student_vae(channels=8, decoder_blocks=(1, 1, 1), encoder_blocks=(1, 1, 1)).train()
    # eval: spectral norm's power iteration then stays put, so D gives the same logits on every call
    disc = stage.PatchDiscriminator(channels=8, num_layers=2).eval()
    gen = torch.Generator().manual_seed(seed)
    apart = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)  # two clearly different samples: swapping them shows
    z = torch.randn(2, 4, 4, 4, generator=gen) + apart
    with torch.no_grad():  # near G(z) but for pixel noise (which 8x downsampling averages out) and a per-sample shift
        teacher_images = vae.decoder(z) + (torch.rand(2, 3, 16, 16, generator=gen) - 0.5) + 0.2 * apart
    return vae, disc, z, teacher_images


def test_decoder_step_is_eq5_against_the_teacher_image_of_the_same_latents():
    vae, disc, z, x = gan_problem()
    losses, fake = stage.decoder_step(vae.decoder, vae.encoder, disc, z, x, lambda_gan=0.3, encoder_weight=2.0)
    with torch.no_grad():
        assert torch.equal(fake, vae.decoder(z))
        l1 = (down8(vae.decoder(z)) - down8(x)).abs().mean()  # on 8x-downsampled images, per sample
        gan_g = -disc(vae.decoder(z)).mean()  # D judges the student's image
        enc = F.mse_loss(vae.encoder(x), z)
    assert losses["loss_l1"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert losses["loss_gan_g"].item() == pytest.approx(gan_g.item(), rel=1e-5)
    assert losses["loss_enc"].item() == pytest.approx(enc.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(l1.item() + 0.3 * gan_g.item() + 2.0 * enc.item(), rel=1e-5)
    # the checks can tell: full-resolution L1, or another sample's teacher image, give other values
    assert F.l1_loss(fake, x).item() != pytest.approx(l1.item(), rel=1e-3)
    assert (down8(fake) - down8(x.roll(1, 0))).abs().mean().item() != pytest.approx(l1.item(), rel=1e-3)

    before_gan, _ = stage.decoder_step(vae.decoder, None, disc, z, x, lambda_gan=0.0, encoder_weight=2.0)
    assert set(before_gan) == {"loss", "loss_l1"} and before_gan["loss"].item() == pytest.approx(l1.item(), rel=1e-5)


def test_gan_term_starts_after_gan_start_step():
    assert [stage.gan_weight(step, 0.1, 3) for step in (1, 2, 3, 4, 5)] == [0.0, 0.0, 0.0, 0.1, 0.1]


def test_decoder_step_leaves_d_alone_and_discriminator_step_leaves_the_decoder_alone():
    vae, disc, z, x = gan_problem()
    losses, fake = stage.decoder_step(vae.decoder, vae.encoder, disc, z, x, lambda_gan=0.3, encoder_weight=1.0)
    losses["loss"].backward()
    assert all(p.grad is None for p in disc.parameters())  # D is frozen while it judges G(z) ...
    assert all(p.requires_grad for p in disc.parameters())  # ... and trainable again afterwards
    assert all(p.grad is not None for p in vae.decoder.parameters())
    vae.zero_grad(set_to_none=True)

    _, fake = stage.decoder_step(vae.decoder, vae.encoder, disc, z, x, lambda_gan=0.3, encoder_weight=1.0)
    loss_d = stage.discriminator_step(disc, x, fake)
    with torch.no_grad():  # real = the teacher's images x~, fake = the student's G(z) (hinge)
        expected = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(fake)).mean()
        swapped = F.relu(1 - disc(fake)).mean() + F.relu(1 + disc(x)).mean()
    assert loss_d.item() == pytest.approx(expected.item(), rel=1e-5)
    assert swapped.item() != pytest.approx(expected.item(), rel=1e-3)
    loss_d.backward()
    assert all(p.grad is None for p in vae.parameters())  # G(z) detached: D's step does not reach the decoder
    assert all(p.grad is not None for p in disc.parameters())


def test_d_steps_learn_teacher_images_as_real_and_g_steps_move_toward_real():
    vae, disc, z, x = gan_problem()

    def margin() -> float:
        with torch.no_grad():
            return (disc(x).mean() - disc(vae.decoder(z)).mean()).item()

    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    start = margin()
    for _ in range(10):
        _, fake = stage.decoder_step(vae.decoder, None, disc, z, x, lambda_gan=1.0, encoder_weight=0.0)
        stage.discriminator_step(disc, x, fake).backward()
        d_opt.step()
        d_opt.zero_grad()
        vae.zero_grad()
    assert margin() > start + 0.1  # D(real = x~) rises above D(fake = G(z)) (swapped roles: it falls)

    g_opt = torch.optim.Adam(vae.decoder.parameters(), lr=1e-3)
    with torch.no_grad():
        judged = disc(vae.decoder(z)).mean().item()
    for _ in range(10):  # lambda_GAN large: the GAN term dominates the L1 term
        losses, _ = stage.decoder_step(vae.decoder, None, disc, z, x, lambda_gan=100.0, encoder_weight=0.0)
        losses["loss"].backward()
        g_opt.step()
        g_opt.zero_grad()
    with torch.no_grad():
        assert disc(vae.decoder(z)).mean().item() > judged + 0.5  # G(z) now looks more "real" to D


# --- what main() does with it -----------------------------------------------------------------------


def test_main_feeds_the_teacher_image_of_the_same_latents_gan_after_its_start_and_one_lr_step(teacher, cache_dir, tmp_path,
                                                                                              monkeypatch):
    from diffusers import AutoencoderKL

    g_calls, d_calls = [], []
    decoder_step, discriminator_step = stage.decoder_step, stage.discriminator_step

    def g_spy(decoder, encoder, disc, latents, teacher_images, **kwargs):
        g_calls.append(dict(latents=latents, teacher_images=teacher_images, **kwargs))
        return decoder_step(decoder, encoder, disc, latents, teacher_images, **kwargs)

    def d_spy(disc, teacher_images, fake):
        d_calls.append(teacher_images)
        return discriminator_step(disc, teacher_images, fake)

    monkeypatch.setattr(stage, "decoder_step", g_spy)
    monkeypatch.setattr(stage, "discriminator_step", d_spy)
    out = tmp_path / "out"
    assert run_stage(stage, out, "--max_steps", "4", "--gan_start_step", "2", "--lambda_gan", "0.25", "--encoder_weight", "0.5",
                     "--lr_warmup_steps", "4", "--checkpoint_every", "100", "--sample_every", "0", "--ema_decay", "0",
                     "--pipeline_base", "none", teacher=teacher, cache_dir=cache_dir) == 0
    assert [c["lambda_gan"] for c in g_calls] == [0.0, 0.0, 0.25, 0.25] and all(c["encoder_weight"] == 0.5 for c in g_calls)
    assert len(d_calls) == 2 and all(a is c["teacher_images"] for a, c in zip(d_calls, g_calls[2:]))  # D: from the GAN start
    vae = AutoencoderKL.from_pretrained(teacher / "vae")
    with torch.no_grad():
        for c in g_calls:  # x~ is the teacher decoder's image of these very latents (up to uint8 rounding)
            decoded = vae.decode(c["latents"] / vae.config.scaling_factor).sample.clamp(-1, 1)
            assert (decoded - c["teacher_images"]).abs().max() < 0.02
            assert (decoded - c["teacher_images"].roll(1, 0)).abs().max() > 0.2  # another sample's image is far off
    rows = read_log(out)
    assert column(rows, "lr") == pytest.approx([1e-3 * min(1.0, (s + 1) / 4) for s in (1, 2, 3, 4)])  # once per step
    assert [r["loss_d"] != "" for r in rows] == [False, False, True, True]


def test_lr_1e6_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(teacher, cache_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(common.NonFiniteLossError) as err:
        run_stage(stage, out, "--lr", "1e6", "--checkpoint_every", "1", "--sample_every", "0", "--pipeline_base", "none",
                  teacher=teacher, cache_dir=cache_dir)
    message = str(err.value.code)
    assert message.startswith("error: step 2: non-finite loss_l1 = nan") and "(decoder)" in message, message
    assert "step-0000001" in message and "--resume latest" in message and "--lr" in message
    # nothing written after the bad step: the good checkpoint is not rotated out, no final folder
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"] and not (out / "final").exists()
    files = sorted((out / "checkpoints" / "step-0000001").glob("model*.safetensors"))
    assert len(files) == 3  # decoder, encoder, discriminator
    assert all(torch.isfinite(v).all() for f in files for v in load_file(f).values())


def test_a_non_finite_discriminator_loss_stops_naming_the_discriminator_and_its_lr_flag(teacher, cache_dir, tmp_path, monkeypatch):
    discriminator_step, calls = stage.discriminator_step, []

    def nan_at_second_call(disc, teacher_images, fake):  # D's loss turns NaN at step 3 (GAN on from step 2)
        calls.append(1)
        loss = discriminator_step(disc, teacher_images, fake)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(stage, "discriminator_step", nan_at_second_call)
    out = tmp_path / "out"
    with pytest.raises(common.NonFiniteLossError) as err:
        run_stage(stage, out, "--gan_start_step", "1", "--checkpoint_every", "1", "--sample_every", "0", "--pipeline_base", "none",
                  teacher=teacher, cache_dir=cache_dir)
    message = str(err.value.code)
    assert message.startswith("error: step 3: non-finite loss_d = nan") and "(discriminator)" in message and "--disc_lr" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert not (out / "final").exists()

def small_image_folder(folder):
    """Three 64 px images with captions and one file that is no image: 1 of 4 records unusable."""
    import json

    from PIL import Image

    folder.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {colour} square"})
    (folder / "bad.png").write_bytes(b"not a png")
    rows.append({"file_name": "bad.png", "text": "broken"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_model_and_data_flags_reach_main(teacher, tmp_path, capsys):
    """--max_bad_fraction lets a folder with 25% bad records through (the default 5% refuses it), and a
    missing --pipeline_base is reported under its own flag, before any work."""
    folder = small_image_folder(tmp_path / "images")
    assert run_stage(stage, tmp_path / "out", "--image_folder", str(folder), "--max_bad_fraction", "0.3", "--max_steps", "1",
                     "--sample_every", "0", "--pipeline_base", "none", teacher=teacher) == 0
    assert "data: skipped 1 of 4 records" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--pipeline_base") as err:
        run_stage(stage, tmp_path / "out2", "--pipeline_base", str(tmp_path / "nowhere"), teacher=teacher)
    assert "--model" not in str(err.value.code) and not (tmp_path / "out2" / "cache").exists()



def test_smoke_command_writes_a_decoder_and_a_pipeline_sdxs_loads(tmp_path):
    """The acceptance command exactly as a user types it (builds its own tiny teacher). Its time
    is measured by the README's table, never asserted here (shared CPUs are noisy)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train/distill_decoder.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
