"""Stage C (train/distill_one_step.py): the score-distillation surrogate's exact gradient and its sign,
the alpha / lambda_FM schedules and the segment split, the feature-matching loss and encoders, the
one-step generator against the `sdxs` engine; the step functions main() runs (online_update,
student_update) on tiny real U-Nets: which loss each sample gets, from which noise, in which direction
the trained model moves; the finite-loss guard; the teacher checks; the smoke command loaded by `sdxs`,
and resume."""

import copy
import dataclasses
import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, offline_env
from safetensors.torch import load_file
from train_helpers import column, make_teacher, one_torch_thread, read_log, run_stage  # noqa: F401

from train import common
from train import distill_one_step as stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers
CPU = torch.device("cpu")


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
    encoder = stage.load_fm_encoder("unet", None, teacher_unet=unet, vae=None, layers=[0, 1, 2], timestep=10, device=CPU)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    features = encoder(latents, torch.randn(2, 77, 32))
    assert [tuple(f.shape) for f in features] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    sum(f.sum() for f in features).backward()
    assert latents.grad.abs().sum() > 0 and all(p.grad is None for p in unet.parameters())  # frozen, but passes gradients
    with pytest.raises(SystemExit, match="fm_encoder_path"):
        stage.load_fm_encoder("dinov2", str(tmp_path / "absent"), teacher_unet=unet, vae=None, layers=[1], timestep=10, device=CPU)
    with pytest.raises(SystemExit, match="vgg16"):
        stage.load_fm_encoder("vgg16", None, teacher_unet=unet, vae=None, layers=[1], timestep=10, device=CPU)


def tiny_dinov2_and_vae(folder):
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from sdxs.architectures import TINY_SD_VAE

    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             patch_size=14, image_size=224)).save_pretrained(folder)
    return AutoencoderKL(**TINY_SD_VAE).eval().requires_grad_(False)


def test_dinov2_image_encoder_lays_patch_tokens_out_as_maps(tmp_path):
    vae = tiny_dinov2_and_vae(tmp_path / "dino")
    encoder = stage.load_fm_encoder("dinov2", str(tmp_path / "dino"), teacher_unet=None, vae=vae, layers=[1, 2], timestep=10,
                                    device=CPU)
    features = encoder(torch.randn(2, 4, 8, 8))
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 16, 16, 16)]


def test_fm_encoders_are_moved_to_the_run_device_with_their_buffers(teacher, tmp_path):
    """load_fm_encoder puts the whole encoder on the accelerator's device: the image network, the VAE it
    decodes with and the ImageNet mean/std buffers (issue 12: on CUDA they stayed on the CPU). The meta
    device stands in for CUDA: any part left behind stays on the CPU."""
    from diffusers import UNet2DConditionModel

    meta = torch.device("meta")
    vae = tiny_dinov2_and_vae(tmp_path / "dino")
    image = stage.load_fm_encoder("dinov2", str(tmp_path / "dino"), teacher_unet=None, vae=vae, layers=[1], timestep=10, device=meta)
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    latent = stage.load_fm_encoder("unet", None, teacher_unet=unet, vae=None, layers=[0, 1], timestep=10, device=meta)
    for encoder in (image, latent):
        tensors = dict(itertools.chain(encoder.named_parameters(), encoder.named_buffers()))
        assert {"mean", "std"} <= set(tensors) or encoder is latent
        assert tensors and all(t.device.type == "meta" for t in tensors.values()), \
            [name for name, t in tensors.items() if t.device.type != "meta"][:5]
        assert not any(t.requires_grad for t in tensors.values()) and not encoder.training


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


def test_the_pair_cache_holds_psi_of_each_pairs_own_noise(teacher, tmp_path, accelerator):
    """--pairs cache: every cached pair is (eps_i, psi(eps_i)) of the SAME noise, eps_i depending only on
    (seed, i) (any sharding builds one cache), psi as main() sets it up (Psi), batched or not."""
    parts = common.load_teacher(str(teacher), CPU, torch.float32)
    prompts = ["a photo of a cat", "a red bicycle", "a bowl of ramen"]
    folder = stage.build_pair_cache(parts.unet, parts.prompt_encoder(64), parts.scheduler_config, prompts, tmp_path / "pairs",
                                    psi_scheduler="dpmsolver++", steps=2, guidance_scale=2.0, side=8, seed=3, batch_size=2,
                                    accelerator=accelerator)
    psi = stage.Psi(parts.unet, "dpmsolver++", parts.scheduler_config, 2, 2.0,
                    common.encode_prompts(parts.tokenizer, parts.text_encoder, [""]))
    items = list(stage.Pairs(folder=folder))
    assert [item["prompt"] for item in items] == prompts
    for i, item in enumerate(items):
        assert torch.equal(item["noise"], stage.pair_noise((1, 4, 8, 8), 3, i)[0])
        cond = common.encode_prompts(parts.tokenizer, parts.text_encoder, [prompts[i]])
        assert torch.allclose(item["latents"], psi(item["noise"][None], cond)[0], atol=1e-4), i


# --- the step functions main() runs: online_update, student_update (Alg. 1, Eqs. 10-12) ----------------


@pytest.fixture(scope="module")
def tiny(teacher):
    """The tiny teacher's U-Net (the offline DM), a student derived from it by stage B's recipe, the
    U-Net encoder of L_FM, the scheduler config, and text states (random: no text encoder needed)."""
    from diffusers import UNet2DConditionModel

    from train.distill_unet import init_student_from_teacher

    offline = UNet2DConditionModel.from_pretrained(teacher / "unet").eval().requires_grad_(False)
    student, _ = init_student_from_teacher(offline)
    gen = torch.Generator().manual_seed(11)
    width = offline.config.cross_attention_dim
    return dict(offline=offline, student=student.train(), config=json.loads((teacher / "scheduler" / "scheduler_config.json").read_text()),
                encoder=stage.load_fm_encoder("unet", None, teacher_unet=offline, vae=None, layers=[0, 1, 2], timestep=10, device=CPU),
                states=torch.randn(8, 77, width, generator=gen), uncond=torch.randn(1, 77, width, generator=gen))


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def settings_for(tiny, tmp_path, *flags, **changes) -> "stage.StepSettings":
    """The StepSettings main() builds from the smoke preset (+ flags), with test-specific changes."""
    args = common.parse_args(stage.build_parser(), stage.PRESETS, ["--preset", "smoke", "--output_dir", str(tmp_path), *flags])
    return dataclasses.replace(stage.step_settings(args, tiny["config"], uncond=tiny["uncond"], device=CPU), **changes)


def models_for(tiny, *, online=None, student=None, optimizer=torch.optim.SGD, lr=1e-3):
    student = student if student is not None else copy.deepcopy(tiny["student"])
    online = online if online is not None else copy.deepcopy(tiny["offline"]).requires_grad_(True).train()
    return stage.Models(student=student, online=online, offline=tiny["offline"], encoder=tiny["encoder"],
                        student_optimizer=optimizer(student.parameters(), lr=lr), online_optimizer=optimizer(online.parameters(), lr=lr))


def pairs(n: int, seed: int, states: torch.Tensor) -> "stage.MicroBatch":
    gen = torch.Generator().manual_seed(seed)
    return stage.MicroBatch(noise=torch.randn(n, 4, 8, 8, generator=gen), target=torch.randn(n, 4, 8, 8, generator=gen), states=states[:n])


def shifted_copy(unet, delta: float):
    """A copy of `unet` whose eps is exactly eps + delta everywhere (conv_out's bias shifted)."""
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_out.bias += delta
    return other


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def generate(student, z, states, s):
    with torch.no_grad():
        return stage.one_step_generate(student, z, states, s.coefficients)


@pytest.mark.parametrize("delta", [0.5, -0.5])
def test_score_distillation_moves_the_student_toward_the_offline_dm(tiny, tmp_path, accelerator, delta):
    """Known direction: an online ("fake") DM whose eps is the offline one's + delta believes the student's
    samples lie delta*sigma/alpha BELOW where the offline DM puts them (x0 = (x_t - sigma eps)/alpha), so
    one score-distillation step must raise the student's output for delta > 0 and lower it for delta < 0
    (with SGD the output's change is -lr J J^T grad: it follows the gradient's sign). Swapping
    score_difference's arguments at the call site flips it."""
    s = settings_for(tiny, tmp_path, "--real_guidance", "1", "--sd_weighting", "sigma", t_lo=500, t_hi=500, max_grad_norm=0.0)
    models = models_for(tiny, online=shifted_copy(tiny["offline"], delta), lr=1e-2)
    before = copy.deepcopy(models.student)
    info = stage.student_update(models, s, [pairs(4, 0, tiny["states"])], stage.Phase(warmup=False, alpha=1.0, lambda_fm=1.0),
                                torch.Generator().manual_seed(1), step=1, accelerator=accelerator, guard=common.FiniteGuard(0, tmp_path))
    assert info.stepped and info.fed["sd_mask"].all() and "loss_fm" not in info.losses
    z, states = info.fed["z"], tiny["states"][:4]
    moved = generate(models.student, z, states, s) - generate(before, z, states, s)
    assert moved.abs().mean() > 0
    assert torch.sign(moved.mean()) == torch.sign(torch.tensor(delta)), moved.mean()
    assert (torch.sign(moved.flatten(1).mean(1)) == torch.sign(torch.tensor(delta))).all()  # every sample
    assert torch.equal(flat(models.offline), flat(tiny["offline"]))  # the offline DM is frozen


def test_each_sample_gets_the_loss_of_its_segment_from_the_right_noise(tiny, tmp_path, accelerator):
    """Eq. 12 per sample: t <= alpha*T -> score distillation on G(z) of FRESH noise z (DMD2: the cached
    pairs' N noises would pull the teacher's score at N points only); t > alpha*T -> FM on G(eps) of the
    pair's own noise. The cached noise receives gradient exactly where FM used it."""
    s = settings_for(tiny, tmp_path)
    models = models_for(tiny, online=shifted_copy(tiny["offline"], 0.3))
    batch = pairs(8, 2, tiny["states"])
    batch.noise.requires_grad_(True)
    info = stage.student_update(models, s, [batch], stage.Phase(warmup=False, alpha=0.5, lambda_fm=0.5), torch.Generator().manual_seed(3),
                                step=1, accelerator=accelerator, guard=common.FiniteGuard(0, tmp_path))
    t, sd = info.fed["t"], info.fed["sd_mask"]
    assert ((t >= s.t_lo) & (t <= s.t_hi)).all()
    assert torch.equal(sd, t <= 0.5 * s.num_train_timesteps) and 0 < int(sd.sum()) < 8  # both segments in this batch
    fm = ~sd
    z = info.fed["z"]
    assert torch.equal(z[fm], batch.noise[fm].detach())  # FM: G(eps) with the pair's own eps
    assert not torch.isclose(z[sd], batch.noise[sd].detach()).any()  # score distillation: fresh noise
    grad = batch.noise.grad.flatten(1).abs().sum(1)
    assert (grad[fm] > 0).all() and (grad[sd] == 0).all()
    assert info.losses["loss_fm"] > 0 and info.losses["sd_grad"] > 0
    again = stage.student_update(models, s, [batch], stage.Phase(warmup=False, alpha=0.5, lambda_fm=0.5), torch.Generator().manual_seed(4),
                                 step=2, accelerator=accelerator, guard=common.FiniteGuard(0, tmp_path))
    both = again.fed["sd_mask"] & sd
    assert not torch.isclose(again.fed["z"][both], z[both]).any()  # fresh at every step

    warm = stage.student_update(models, s, [batch], stage.Phase(warmup=True, alpha=0.0, lambda_fm=1.0), torch.Generator().manual_seed(3),
                                step=3, accelerator=accelerator, guard=common.FiniteGuard(0, tmp_path))
    assert not warm.fed["sd_mask"].any() and torch.equal(warm.fed["z"], batch.noise.detach())  # warm-up: FM alone
    assert "loss_sd" not in warm.losses


def reference_student_loss(student, online, s, tiny, batch, fed, phase):
    """Eq. 12 written out independently of student_loss, from what the step says it fed (t, noise, z)."""
    n = len(batch.noise)
    x0 = stage.one_step_generate(student, fed["z"], batch.states, s.coefficients)
    sd = fed["sd_mask"]
    loss = x0.new_zeros(())
    if (~sd).any():
        fm = stage.feature_matching_loss(tiny["encoder"](x0[~sd], batch.states[~sd]),
                                         [f.detach() for f in tiny["encoder"](batch.target[~sd], batch.states[~sd])],
                                         list(s.fm_weights), s.fm_ssim_window)
        loss = loss + phase.lambda_fm * fm.sum() / n
    if sd.any():
        t, abar = fed["t"][sd], s.abar[fed["t"][sd]]
        a, sig = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0[sd] + sig * fed["noise"][sd]
        with torch.no_grad():
            eps_online = online(x_t, t, encoder_hidden_states=batch.states[sd]).sample
            cond = tiny["offline"](x_t, t, encoder_hidden_states=batch.states[sd]).sample
            uncond = tiny["offline"](x_t, t, encoder_hidden_states=s.uncond.expand(int(sd.sum()), -1, -1)).sample
            eps_offline = uncond + s.real_guidance * (cond - uncond)
            grad = (eps_offline - eps_online) / sig  # s_online - s_offline, s = -eps/sigma
            x0_offline = (x_t - sig * eps_offline) / a
            w = (sig**2 / a**2) / (x0[sd] - x0_offline).abs().mean(dim=(1, 2, 3), keepdim=True)  # DMD2
        loss = loss + 0.5 * (w * (x_t - (x_t - grad).detach()) ** 2).sum() / x0[0].numel() / n  # d/dx_t = w * grad
    return loss


def test_student_update_is_eq_12_of_what_it_fed_each_loss(tiny, tmp_path, accelerator):
    """The student's update, over 2 accumulated micro-batches with both segments, CFG on the offline eps
    and lambda_FM = 0.3, equals the gradient of Eq. 12 written out here: FM against the SAME sample's
    psi target, the score term through x_t with w(t) (s_online - s_offline), the offline eps guided and
    the online eps not. (With SGD, lr = 1: the weights move by exactly minus the gradient.)"""
    s = settings_for(tiny, tmp_path, "--real_guidance", "1.75", "--sd_weighting", "dmd2", max_grad_norm=0.0)
    online = shifted_copy(tiny["offline"], 0.2)
    with torch.no_grad():
        online.conv_out.weight.mul_(1.1)
    models = models_for(tiny, online=online, lr=1.0)
    before = copy.deepcopy(models.student)
    batches = [pairs(4, 5, tiny["states"]), pairs(4, 6, tiny["states"][4:])]
    phase = stage.Phase(warmup=False, alpha=0.5, lambda_fm=0.3)
    info = stage.student_update(models, s, batches, phase, torch.Generator().manual_seed(7), step=1, accelerator=accelerator,
                                guard=common.FiniteGuard(0, tmp_path))
    sd = info.fed["sd_mask"]
    assert 0 < int(sd.sum()) < 8 and info.stepped
    reference = copy.deepcopy(before)
    total = 0.0
    for k, batch in enumerate(batches):
        fed = {key: value[4 * k : 4 * k + 4] for key, value in info.fed.items()}
        loss = reference_student_loss(reference, online, s, tiny, batch, fed, phase) / len(batches)
        loss.backward()
        total += loss.item()
    assert info.losses["loss"] == pytest.approx(total, rel=1e-4)
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    applied = flat(before) - flat(models.student)  # SGD, lr 1: -(gradient)
    assert expected.abs().max() > 0
    assert torch.allclose(applied, expected, rtol=1e-3, atol=1e-6 * expected.abs().max().item()), \
        (applied - expected).abs().max()


def test_real_guidance_applies_to_the_offline_eps_only(tiny, tmp_path, accelerator):
    """With the online DM equal to the offline one, the score term vanishes without CFG and appears with
    --real_guidance > 1, because only the offline eps is guided [DMD2]; offline_eps is eps_u + g (eps_c - eps_u)."""
    x_t, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(8)), torch.tensor([100, 500, 900])
    states, uncond = tiny["states"][:3], tiny["uncond"]
    with torch.no_grad():
        cond = tiny["offline"](x_t, t, encoder_hidden_states=states).sample
        free = tiny["offline"](x_t, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
    assert torch.allclose(stage.offline_eps(tiny["offline"], x_t, t, states, uncond, 3.0), free + 3.0 * (cond - free), atol=1e-5)
    assert torch.allclose(stage.offline_eps(tiny["offline"], x_t, t, states, uncond, 1.0), cond, atol=1e-6)

    grads = {}
    for scale in (1.0, 3.0):
        s = settings_for(tiny, tmp_path, "--real_guidance", str(scale))
        models = models_for(tiny)
        info = stage.student_update(models, s, [pairs(4, 9, tiny["states"])], stage.Phase(warmup=False, alpha=1.0, lambda_fm=1.0),
                                    torch.Generator().manual_seed(10), step=1, accelerator=accelerator,
                                    guard=common.FiniteGuard(0, tmp_path))
        grads[scale] = info.losses["sd_grad"]
    assert grads[1.0] == 0 and grads[3.0] > 0, grads


def test_online_update_trains_the_online_dm_alone_on_the_students_samples(tiny, tmp_path, accelerator):
    """Alg. 1: the online DM's denoising loss ||eps_online(x_t, t) - n||^2 falls on a fixed batch; x_t is
    made of the student's one-step samples G(z) (not psi's targets), t in t_range; the student runs under
    no_grad (no gradient reaches it, its weights stay) and the offline DM is untouched."""
    s = settings_for(tiny, tmp_path, t_lo=300, t_hi=400)
    models = models_for(tiny, optimizer=torch.optim.Adam, lr=1e-3)
    student_before, online_before = flat(models.student), copy.deepcopy(models.online)
    states = [tiny["states"][:4], tiny["states"][4:]]
    infos = [stage.online_update(models, s, states, torch.Generator().manual_seed(12), step=k + 1, accelerator=accelerator,
                                 guard=common.FiniteGuard(0, tmp_path)) for k in range(6)]
    assert all(info.stepped for info in infos)
    assert all(p.grad is None for p in models.student.parameters())  # nothing leaked into the student
    assert torch.equal(flat(models.student), student_before) and torch.equal(flat(models.offline), flat(tiny["offline"]))
    fed = infos[0].fed
    assert ((fed["t"] >= 300) & (fed["t"] <= 400)).all() and len(set(fed["t"].tolist())) > 1
    assert torch.allclose(fed["x0"], generate(models.student, fed["z"], torch.cat(states), s), atol=1e-5)  # G's samples

    def denoising_loss(online):  # on the same (fixed-seed) batch, written out: the target is the noise n
        a, sig = s.abar[fed["t"]].sqrt().view(-1, 1, 1, 1), (1 - s.abar[fed["t"]]).sqrt().view(-1, 1, 1, 1)
        with torch.no_grad():
            eps = online(a * fed["x0"] + sig * fed["noise"], fed["t"], encoder_hidden_states=torch.cat(states)).sample
        return ((eps - fed["noise"]) ** 2).mean().item()

    first = denoising_loss(online_before)
    assert infos[0].losses["loss_online"] == pytest.approx(first, rel=1e-4)  # what it reports is that loss
    assert denoising_loss(models.online) < 0.95 * first, (first, denoising_loss(models.online))


def test_fm_warmup_moves_each_sample_toward_psi_of_its_own_noise(tiny, tmp_path, accelerator):
    """Eq. 10 in the warm-up: the reported L_FM is each G(eps_i) against psi(eps_i) of the same i (a target
    from another sample gives another value), and a few updates lower it."""
    s = settings_for(tiny, tmp_path)
    models = models_for(tiny, optimizer=torch.optim.Adam, lr=1e-3)
    batch, phase = pairs(4, 13, tiny["states"]), stage.Phase(warmup=True, alpha=0.0, lambda_fm=1.0)

    def own_target_loss(student, target):
        x0 = generate(student, batch.noise, batch.states, s)
        with torch.no_grad():
            return stage.feature_matching_loss(tiny["encoder"](x0, batch.states), tiny["encoder"](target, batch.states),
                                               list(s.fm_weights), s.fm_ssim_window)

    first = own_target_loss(models.student, batch.target)
    other = own_target_loss(models.student, batch.target.roll(1, 0))
    assert not torch.allclose(first, other, rtol=1e-3)  # the check below can tell the samples' targets apart
    losses = [stage.student_update(models, s, [batch], phase, torch.Generator().manual_seed(14), step=k + 1, accelerator=accelerator,
                                   guard=common.FiniteGuard(0, tmp_path)).losses for k in range(8)]
    assert losses[0]["loss_fm"] == pytest.approx(first.mean().item(), rel=1e-4)
    assert losses[0]["loss"] == pytest.approx(first.mean().item(), rel=1e-4)  # lambda_FM = 1 in the warm-up
    assert (own_target_loss(models.student, batch.target) < first).all()


def test_phase_follows_the_alpha_and_lambda_schedules_after_the_warmup(tiny, tmp_path):
    s = settings_for(tiny, tmp_path, "--fm_warmup_steps", "3", "--schedule_steps", "4", "--alpha_start", "0.9", "--alpha_end", "0.5",
                     "--lambda_fm_start", "1.0", "--lambda_fm_end", "0.2")
    phases = [stage.phase_at(step, s) for step in range(1, 10)]
    assert [p.warmup for p in phases] == [True] * 3 + [False] * 6
    assert all(p.alpha == 0.0 and p.lambda_fm == 1.0 for p in phases[:3])  # warm-up: FM alone, weight 1
    assert [round(p.alpha, 6) for p in phases[3:]] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.5]
    assert [round(p.lambda_fm, 6) for p in phases[3:]] == [1.0, 0.8, 0.6, 0.4, 0.2, 0.2]


# --- the finite-loss guard on both optimizers ---------------------------------------------------------


def test_a_non_finite_online_loss_is_stopped_or_skipped_before_it_reaches_the_weights(tiny, tmp_path, accelerator):
    s = settings_for(tiny, tmp_path)
    broken = copy.deepcopy(tiny["student"])
    with torch.no_grad():
        broken.conv_out.bias.fill_(float("inf"))  # its samples are not finite
    models = models_for(tiny, student=broken)
    online_before = flat(models.online)
    with pytest.raises(common.NonFiniteLossError, match="step 7: non-finite loss_online") as err:
        stage.online_update(models, s, [tiny["states"][:2]], torch.Generator().manual_seed(0), step=7, accelerator=accelerator,
                            guard=common.FiniteGuard(0, tmp_path))
    assert "online DM" in str(err.value.code) and torch.equal(flat(models.online), online_before)
    models.online_optimizer.zero_grad(set_to_none=True)
    info = stage.online_update(models, s, [tiny["states"][:2]], torch.Generator().manual_seed(0), step=8, accelerator=accelerator,
                               guard=common.FiniteGuard(1, tmp_path))
    assert not info.stepped and torch.equal(flat(models.online), online_before)
    assert all(p.grad is None for p in models.online.parameters())  # the bad gradients are dropped


def test_a_non_finite_student_loss_is_skipped_without_moving_the_student(tiny, tmp_path, accelerator):
    s = settings_for(tiny, tmp_path)
    models = models_for(tiny)
    batch = pairs(2, 15, tiny["states"])
    batch.target[0, 0, 0, 0] = float("nan")  # bad data in one pair
    before = flat(models.student)
    info = stage.student_update(models, s, [batch], stage.Phase(warmup=True, alpha=0.0, lambda_fm=1.0), torch.Generator().manual_seed(0),
                                step=3, accelerator=accelerator, guard=common.FiniteGuard(1, tmp_path))
    assert not info.stepped and torch.equal(flat(models.student), before)
    assert all(p.grad is None for p in models.student.parameters())
    with pytest.raises(common.NonFiniteLossError, match=r"step 4: non-finite loss = nan, loss_fm = nan.*\(student\)"):
        stage.student_update(models, s, [batch], stage.Phase(warmup=True, alpha=0.0, lambda_fm=1.0), torch.Generator().manual_seed(0),
                             step=4, accelerator=accelerator, guard=common.FiniteGuard(0, tmp_path))


@pytest.mark.parametrize("warmup, where", [("4", "loss_fm = nan"), ("0", "loss_online")])
def test_lr_1e6_stops_the_run_and_keeps_the_last_good_checkpoint(teacher, cache_dir, tmp_path, warmup, where):
    """The issue's acceptance run: --lr 1e6 on the smoke preset stops at the first non-finite update (the
    student's in the FM warm-up; the online DM's when it trains on the blown-up student's samples) with a
    message naming the step and the loss term; exit code 1; the newest checkpoint is the step before,
    loads, and holds finite weights; nothing is written after the bad step."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        run_stage(stage, out, "--lr", "1e6", "--fm_warmup_steps", warmup, "--checkpoint_every", "1", "--max_steps", "8",
                  "--sample_every", "0", teacher=teacher, cache_dir=cache_dir)
    message = str(err.value.code)
    assert isinstance(err.value, common.NonFiniteLossError) and message.startswith("error: step ")  # sys.exit(str): code 1
    bad_step = int(message.split()[2].rstrip(":"))
    assert where in message and "--skip_nonfinite" in message and "lower --lr or --online_lr" in message
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints][-1] == f"step-{bad_step - 1:07d}" and str(checkpoints[-1]) in message
    for file in checkpoints[-1].glob("*.safetensors"):
        weights = load_file(file)
        assert weights and all(torch.isfinite(w).all() for w in weights.values()), file
    assert not (out / "final").exists()
    assert [int(r["step"]) for r in read_log(out)] == list(range(1, bad_step))


def test_skip_nonfinite_skips_the_bad_steps_and_holds_the_lr_schedule(teacher, cache_dir, tmp_path):
    """--skip_nonfinite: skipped steps move neither the student, nor the LR schedule (its warm-up stops
    advancing), nor the EMA; the run ends with finite weights."""
    out = tmp_path / "run"
    assert run_stage(stage, out, "--lr", "1e6", "--skip_nonfinite", "20", "--lr_warmup_steps", "10", "--max_steps", "5",
                     "--checkpoint_every", "100", "--sample_every", "0", teacher=teacher, cache_dir=cache_dir) == 0
    lrs = [float(r["lr"]) for r in read_log(out)]
    assert lrs[0] == pytest.approx(2e5) and lrs == [lrs[0]] * 5, lrs  # step 1 taken, steps 2-5 skipped
    weights = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- what stage C supports -------------------------------------------------------------------------


def test_a_v_prediction_teacher_is_refused_with_a_clear_message(teacher, tmp_path):
    v_teacher = tmp_path / "v-teacher"
    shutil.copytree(teacher, v_teacher)
    config_file = v_teacher / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(SystemExit, match="prediction_type is 'v_prediction'.*epsilon-prediction"):
        run_stage(stage, tmp_path / "out", teacher=v_teacher)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_T_is_the_teacher_schedulers_num_train_timesteps(tiny, tmp_path):
    """T of Eqs. 11-12 (the segment split, t_range, the noise schedule, the one-step timestep) comes from
    the scheduler config: a U-Net config has no num_train_timesteps."""
    args = common.parse_args(stage.build_parser(), stage.PRESETS, ["--preset", "smoke", "--output_dir", str(tmp_path)])
    s = stage.step_settings(args, {**tiny["config"], "num_train_timesteps": 500}, uncond=tiny["uncond"], device=CPU)
    assert s.num_train_timesteps == 500 and len(s.abar) == 500 and s.coefficients[2] == 499
    assert (s.t_lo, s.t_hi) == (round(0.02 * 499), round(0.98 * 499))
    assert stage.step_settings(args, tiny["config"], uncond=tiny["uncond"], device=CPU).num_train_timesteps == 1000


def test_psi_on_a_plain_teacher_with_lcm_or_few_steps_warns():
    lcm = stage.psi_warning("lcm", 4, straightened=False)
    assert lcm.startswith("warning: psi runs 4 LCM step(s) on the plain --teacher") and "--psi_teacher" in lcm and "\n" not in lcm
    assert "--psi_teacher" in stage.psi_warning("dpmsolver++", 4, straightened=False)
    assert stage.psi_warning("lcm", 4, straightened=True) is None
    assert stage.psi_warning("dpmsolver++", 25, straightened=False) is None


# --- the smoke command, resume ------------------------------------------------------------------------


def test_smoke_command_writes_a_one_step_pipeline_sdxs_runs(tmp_path):
    """The acceptance command exactly as a user types it (tiny teacher, student derived with stage B's
    recipe, warm-up then segmented score distillation), loaded by SDXSEngine; the log's alpha and
    lambda_FM are the schedules' (phase_at), the warning about psi on a plain teacher is printed once."""
    from sdxs.engine import SDXSEngine

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train/distill_one_step.py", "--preset", "smoke", "--output_dir", str(out)],
                          cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("warning: psi runs only 2 dpmsolver++ step(s) on the plain --teacher") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000015", "step-0000020"]
    assert (out / "loss_curve.png").is_file() and (out / "samples" / "step-0000020.png").is_file()
    rows = read_log(out)
    assert len(column(rows, "loss")) == 20
    fm_fraction = column(rows, "fm_fraction")
    assert fm_fraction[:4] == [1.0] * 4 and min(fm_fraction[4:]) < 1.0  # warm-up: FM alone; then score distillation
    assert max(column(rows, "loss_online")[4:]) > 0 and max(column(rows, "sd_grad")[4:]) > 0
    args = common.parse_args(stage.build_parser(), stage.PRESETS, ["--preset", "smoke", "--output_dir", str(out)])
    config = json.loads((out / "tiny-teacher" / "scheduler" / "scheduler_config.json").read_text())
    settings = stage.step_settings(args, config, uncond=torch.zeros(1), device=CPU)
    phases = [stage.phase_at(step, settings) for step in range(1, 21)]
    assert column(rows, "alpha") == pytest.approx([p.alpha for p in phases])
    assert column(rows, "lambda_fm") == pytest.approx([p.lambda_fm for p in phases])
    assert column(rows, "alpha")[4] == 0.9 and column(rows, "alpha")[-1] == 0.5  # smoke preset: 0.9 -> 0.5

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


def test_online_pairs_lcm_psi_accumulation_and_fm_falls_on_a_fixed_batch(teacher, tmp_path, capsys):
    """Other branches in one short run: pairs computed each step (LCM psi on the plain teacher: warned),
    gradient accumulation, two online updates per student update, the 'sigma' weighting; then the FM
    warm-up alone on one fixed batch must lower L_FM."""
    out = tmp_path / "online"
    assert run_stage(stage, out, "--pairs", "online", "--psi_scheduler", "lcm", "--grad_accum", "2", "--batch_size", "2",
                     "--online_updates_per_step", "2", "--sd_weighting", "sigma", "--max_steps", "5", "--fm_warmup_steps", "2",
                     "--alpha_start", "0.6", "--checkpoint_every", "100", "--sample_every", "0", "--ema_decay", "0",
                     teacher=teacher) == 0
    rows = read_log(out)
    assert len(column(rows, "loss")) == 5 and min(column(rows, "loss_online")[2:]) > 0
    assert not (out / "cache").exists()  # nothing cached with --pairs online
    assert capsys.readouterr().err.count("warning: psi runs 2 LCM step(s) on the plain --teacher") == 1

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


def test_ssim_distance_is_computed_in_fp32_under_mixed_precision():
    """Under bf16 autocast (what --mixed_precision bf16 runs) SSIM's moment differences must stay fp32: feature
    maps with a large offset (as deep VGG features have) otherwise cancel to garbage (NaN on a GPU)."""
    gen = torch.Generator().manual_seed(0)
    x = 300 + torch.randn(2, 8, 16, 16, generator=gen)
    y = 300 + torch.randn(2, 8, 16, 16, generator=gen)
    exact = stage.ssim_distance(x, y, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = stage.ssim_distance(x, y, 7)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, atol=1e-5)


def test_psi_pairs_live_in_an_f4_teachers_latent_space(tmp_path):
    """Stage C's (noise, psi) pairs take the teacher's VAE factor: 64 px on an f=4 teacher (emoji teacher
    v1's geometry) is 16x16x4 latents, not SD's 8x8x4; the U-Net trains and the run finishes on them."""
    from train.tiny_teacher import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "f4-teacher", vae_factor=4)
    assert common.teacher_vae_factor(teacher) == 4 and common.teacher_native_size(teacher) == 64
    assert run_stage(stage, tmp_path / "out", "--max_steps", "2", "--fm_warmup_steps", "1", "--sample_every", "0",
                     teacher=teacher, cache_dir=tmp_path / "cache") == 0
    pairs = sorted((tmp_path / "cache").glob("pairs-*/*.pt"))
    assert pairs and all(torch.load(f)["noise"].shape == torch.load(f)["latents"].shape == (4, 16, 16) for f in pairs)
    assert (tmp_path / "out" / "final" / "model_index.json").is_file()
