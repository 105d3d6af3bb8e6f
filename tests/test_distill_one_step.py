"""Stage C (train/distill_one_step.py): the score-distillation surrogate's exact gradient and its sign,
the alpha / lambda_FM schedules and the segment split, the feature-matching loss and encoders, the
one-step generator against the `sdxs` engine, the smoke command loaded by `sdxs`, and resume."""

import itertools
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, one_torch_thread, read_log, run_stage  # noqa: F401

from train import distill_one_step as stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# --- Eq. 11: the surrogate gives exactly w(t) * (s_online - s_offline) on x_t --------------------------


def test_surrogate_gradient_is_exactly_the_weighted_score_difference():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    abar = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64)
    alpha_t, sigma_t = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha_t.view(-1, 1, 1, 1) * x0 + sigma_t.view(-1, 1, 1, 1) * n
    x_t.retain_grad()
    eps_online = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    eps_offline = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    weight = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)

    g = stage.score_difference(eps_online, eps_offline, sigma_t)
    stage.score_distillation_surrogate(x_t, g, weight).backward()

    # explicit formula: scores s = -eps / sigma_t, intended gradient on x_t = w(t) (s_online - s_offline)
    s_online = -eps_online / sigma_t.view(-1, 1, 1, 1)
    s_offline = -eps_offline / sigma_t.view(-1, 1, 1, 1)
    intended = weight.view(-1, 1, 1, 1) * (s_online - s_offline)
    # equal up to float64 rounding of x - (x - g) (about 1e-16 * |x|)
    assert torch.allclose(x_t.grad, intended, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(x_t.grad, -intended)  # the sign matters (checked on Gaussians below)
    # and through x_t = alpha_t x0 + sigma_t n, the student's output receives alpha_t times it
    assert torch.allclose(x0.grad, alpha_t.view(-1, 1, 1, 1) * intended, rtol=1e-12, atol=1e-14)


def test_score_distillation_descent_moves_the_fake_distribution_toward_the_real_one():
    """Sign check with exact Gaussian scores: real N(0, 1), fake N(m, 1) in 1-D. At noise level t,
    p_t = N(alpha m, alpha^2 + sigma^2), eps = -sigma * score. A gradient step on the fake samples must
    pull their mean toward 0, for both weightings."""
    m, lr = 2.0, 0.1
    x0 = m + torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    for kind in ("sigma", "dmd2"):
        x = x0.clone().requires_grad_(True)
        abar = torch.full((len(x),), 0.6)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * n
        var = a**2 + s**2
        eps_fake = -s.view(-1, 1, 1, 1) * (-(x_t - a.view(-1, 1, 1, 1) * m) / var.view(-1, 1, 1, 1))
        eps_real = -s.view(-1, 1, 1, 1) * (-x_t / var.view(-1, 1, 1, 1))
        x0_real = (x_t - s.view(-1, 1, 1, 1) * eps_real) / a.view(-1, 1, 1, 1)
        w = stage.score_weight(kind, a, s, x.detach(), x0_real.detach())
        stage.score_distillation_surrogate(x_t, stage.score_difference(eps_fake, eps_real, s), w).backward()
        moved = x.detach() - lr * x.grad
        assert 0 < moved.mean() < x0.mean() - 0.01, (kind, moved.mean())


def test_dmd2_weighting_gives_dmd2s_normalised_x0_gradient():
    gen = torch.Generator().manual_seed(3)
    x0, n = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True), torch.randn(2, 4, 3, 3, generator=gen)
    abar = torch.tensor([0.7, 0.2])
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * n
    eps_fake, eps_real = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    x0_fake, x0_real = (x_t - s * eps_fake) / a, (x_t - s * eps_real) / a
    w = stage.score_weight("dmd2", a.flatten(), s.flatten(), x0.detach(), x0_real.detach())
    stage.score_distillation_surrogate(x_t, stage.score_difference(eps_fake, eps_real, s.flatten()), w).backward()
    # DMD2: grad = (p_real - p_fake) / mean|p_real|, p = x0 - x0_pred  ==  (x0_fake - x0_real) / mean|x0 - x0_real|
    dmd2 = (x0_fake - x0_real) / (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x0.grad, dmd2.detach(), rtol=1e-4, atol=1e-5)


# --- Eqs. 11-12: schedules and the segment split ---------------------------------------------------


def test_alpha_and_lambda_schedules_start_high_and_fall_linearly_after_the_warmup():
    kw = {"warmup_steps": 100, "decay_steps": 1000}
    alpha = [stage.alpha_schedule(s, **kw, start=0.95, end=0.75) for s in (1, 100, 101, 102, 601, 1101, 5000)]
    assert alpha[0] == alpha[1] == 0.95  # held through the warm-up (where it is not used)
    assert alpha[2] == 0.95  # the first score-distillation step starts at alpha_start
    assert alpha[3] == pytest.approx(0.95 - 0.2 / 1000)
    assert alpha[4] == pytest.approx(0.85) and alpha[5] == pytest.approx(0.75) and alpha[6] == pytest.approx(0.75)
    lam = [stage.lambda_fm_schedule(s, **kw, start=1.0, end=0.25) for s in range(1, 3000, 37)]
    assert lam[0] == 1.0 and lam[-1] == 0.25 and all(b <= a for a, b in itertools.pairwise(lam))
    assert stage.lambda_fm_schedule(601, **kw, start=1.0, end=0.25) == pytest.approx(0.625)
    assert stage.alpha_schedule(6, warmup_steps=4, decay_steps=0, start=0.9, end=0.5) == 0.5  # no decay: end at once


def test_split_by_segment_sends_t_le_alpha_T_to_score_distillation():
    t = torch.tensor([0, 20, 699, 700, 701, 980, 999])
    assert stage.split_by_segment(t, 0.7, 1000).tolist() == [True, True, True, True, False, False, False]
    assert stage.split_by_segment(t, 1.0, 1000).all()  # alpha = 1: score distillation everywhere
    assert not stage.split_by_segment(t[1:], 0.0, 1000).any()  # alpha = 0: FM everywhere but t = 0


# --- Eq. 10: feature matching --------------------------------------------------------------------------


def test_feature_matching_loss_per_sample_any_channel_count_and_differentiable():
    gen = torch.Generator().manual_seed(4)
    target = [torch.randn(3, 7, 8, 8, generator=gen), torch.randn(3, 130, 4, 4, generator=gen), torch.randn(3, 5, 2, 2, generator=gen)]
    same = stage.feature_matching_loss([f.clone() for f in target], target, [1.0, 0.5, 2.0], window=7)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-5)
    student = [f + 0.5 * torch.randn(f.shape, generator=gen) for f in target]
    student = [f.requires_grad_(True) for f in student]
    loss = stage.feature_matching_loss(student, target, [1.0, 0.5, 2.0], window=7)
    assert (loss > 0.05).all()
    loss.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student)
    with pytest.raises(ValueError, match="too small"):
        stage.ssim_distance(torch.zeros(1, 3, 1, 1), torch.zeros(1, 3, 1, 1), 7)


def test_unet_encoder_features_and_image_encoder_errors(teacher, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval().requires_grad_(False)
    encoder = stage.load_fm_encoder("unet", None, teacher_unet=unet, vae=None, layers=[0, 1, 2], timestep=10)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    features = encoder(latents, torch.randn(2, 77, 32))
    assert [tuple(f.shape) for f in features] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    sum(f.sum() for f in features).backward()
    assert latents.grad.abs().sum() > 0 and all(p.grad is None for p in unet.parameters())  # frozen, but passes gradients
    with pytest.raises(SystemExit, match="fm_encoder_path"):
        stage.load_fm_encoder("dinov2", str(tmp_path / "absent"), teacher_unet=unet, vae=None, layers=[1], timestep=10)
    with pytest.raises(SystemExit, match="vgg16"):
        stage.load_fm_encoder("vgg16", None, teacher_unet=unet, vae=None, layers=[1], timestep=10)


def test_dinov2_image_encoder_lays_patch_tokens_out_as_maps(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from sdxs.architectures import TINY_SD_VAE

    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             patch_size=14, image_size=224)).save_pretrained(tmp_path / "dino")
    vae = AutoencoderKL(**TINY_SD_VAE).eval().requires_grad_(False)
    encoder = stage.load_fm_encoder("dinov2", str(tmp_path / "dino"), teacher_unet=None, vae=vae, layers=[1, 2], timestep=10)
    features = encoder(torch.randn(2, 4, 8, 8))
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 16, 16, 16)]


# --- the generator and psi --------------------------------------------------------------------------


def test_one_step_generator_is_what_the_sdxs_engine_computes(tiny_engine):
    components = tiny_engine.torch_components
    coefficients = stage.one_step_coefficients(components.scheduler_config)
    assert coefficients == (pytest.approx(14.642591, abs=2e-5), pytest.approx(14.579279, abs=2e-5), 999)  # SPEC section 1
    noise, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, components.unet.config.cross_attention_dim)
    with torch.no_grad():
        ours = stage.one_step_generate(components.unet, noise, states, coefficients)
        engine = tiny_engine.denoise(noise, states)
    assert torch.allclose(ours, engine, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(stage.PSI_SCHEDULERS))
def test_psi_samplers_start_at_999_from_the_students_noise(name, teacher):
    import json

    config = json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())
    scheduler = stage.make_psi_scheduler(name, config)
    scheduler.set_timesteps(2)
    assert int(scheduler.timesteps[0]) == 999


# --- the smoke command, resume ------------------------------------------------------------------------


def test_smoke_command_writes_a_one_step_pipeline_sdxs_runs(tmp_path):
    """The acceptance command exactly as a user types it (tiny teacher, student derived with stage B's
    recipe, warm-up then segmented score distillation), under 90 s, loaded by SDXSEngine."""
    from sdxs.engine import SDXSEngine

    out = tmp_path / "out"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train/distill_one_step.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 90, elapsed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015", "step-0000020"]
    assert (out / "loss_curve.png").is_file() and (out / "samples" / "step-0000020.png").is_file()
    rows = read_log(out)
    assert len(column(rows, "loss")) == 20
    fm_fraction = column(rows, "fm_fraction")
    assert fm_fraction[:4] == [1.0] * 4 and min(fm_fraction[4:]) < 1.0  # warm-up: FM alone; then score distillation
    assert max(column(rows, "loss_online")[4:]) > 0 and max(column(rows, "sd_grad")[4:]) > 0

    engine = SDXSEngine.from_pretrained(str(out / "final"), device="cpu", backend="torch")
    result = engine.text_to_image("a photo of a cat", width=64, height=64, decoder="large", seed=3)
    assert result.images[0].size == (64, 64)


def test_killed_run_resumes_from_its_last_checkpoint_exactly(teacher, cache_dir, tmp_path, capsys):
    args = ("--max_steps", "8", "--checkpoint_every", "3", "--sample_every", "0", "--fm_warmup_steps", "2",
            "--schedule_steps", "4")
    assert run_stage(stage, tmp_path / "straight", *args, teacher=teacher, cache_dir=cache_dir) == 0
    killed = tmp_path / "killed"
    assert run_stage(stage, killed, *args, "--stop_after_step", "5", teacher=teacher, cache_dir=cache_dir) == 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000003"] and not (killed / "final").exists()
    with pytest.raises(SystemExit, match="--resume latest"):
        run_stage(stage, killed, *args, teacher=teacher, cache_dir=cache_dir)
    assert run_stage(stage, killed, *args, "--resume", "latest", teacher=teacher, cache_dir=cache_dir) == 0
    assert "at step 3" in capsys.readouterr().err

    assert [int(r["step"]) for r in read_log(killed)] == list(range(1, 9))
    for name in ("loss", "loss_online", "loss_sd"):
        assert column(read_log(killed), name) == column(read_log(tmp_path / "straight"), name), name
    a = load_file(tmp_path / "straight" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_pairs_lcm_psi_accumulation_and_fm_falls_on_a_fixed_batch(teacher, tmp_path):
    """Other branches in one short run: pairs computed each step (LCM psi), gradient accumulation, two
    online updates per student update, the 'sigma' weighting; then the FM warm-up alone on one fixed
    batch must lower L_FM."""
    out = tmp_path / "online"
    assert run_stage(stage, out, "--pairs", "online", "--psi_scheduler", "lcm", "--grad_accum", "2", "--batch_size", "2",
                     "--online_updates_per_step", "2", "--sd_weighting", "sigma", "--max_steps", "5", "--fm_warmup_steps", "2",
                     "--alpha_start", "0.6", "--checkpoint_every", "100", "--sample_every", "0", "--ema_decay", "0",
                     teacher=teacher) == 0
    rows = read_log(out)
    assert len(column(rows, "loss")) == 5 and min(column(rows, "loss_online")[2:]) > 0
    assert not (out / "cache").exists()  # nothing cached with --pairs online

    fixed = tmp_path / "fixed"
    assert run_stage(stage, fixed, "--overfit_batch", "--max_steps", "15", "--fm_warmup_steps", "15", "--lr", "1e-3",
                     "--checkpoint_every", "100", "--sample_every", "0", "--ema_decay", "0", teacher=teacher,
                     cache_dir=tmp_path / "cache") == 0
    fm = column(read_log(fixed), "loss_fm")
    assert sum(fm[-3:]) / 3 < 0.8 * sum(fm[:3]) / 3, fm


def test_help_explains_every_flag():
    parser = stage.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 15, action.dest
    text = subprocess.run([sys.executable, "train/distill_one_step.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--student", "--psi_scheduler", "--fm_encoder", "--online_updates_per_step", "--alpha_start", "--lambda_fm_end",
                 "--sd_weighting", "--t_range", "--real_guidance", "--fm_warmup_steps", "--pairs"):
        assert flag in text
