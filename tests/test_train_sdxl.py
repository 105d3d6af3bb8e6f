"""The training stages on SDXL-family teachers (issue 17, SDXS-1024's path): the conditioning they feed
(common.TextCond / PromptEncoder: both text encoders, the pooled embedding, the size ids), the teacher's
latent cache against diffusers' StableDiffusionXLPipeline, stage C's U-Net feature encoder with SDXL's
added embedding, and stages A, B, C run as --preset smoke-sdxl on a tiny SDXL-shaped teacher, killed and
resumed, their final folders served by the engine."""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import column, one_torch_thread, read_log, run_stage, sdxs_engine  # noqa: F401

from train import common
from train import distill_decoder as stage_a
from train import distill_one_step as stage_c
from train import distill_unet as stage_b

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "an emoji of a red apple", "a bowl of ramen"]


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    from train.tiny_teacher import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-teacher", family="sdxl")


@pytest.fixture(scope="module")
def loaded(sdxl_teacher):
    return common.load_teacher(str(sdxl_teacher), CPU, torch.float32)


@pytest.fixture(scope="module")
def sdxl_pipeline(sdxl_teacher):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # the cache's sampler
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the conditioning ------------------------------------------------------------------------------


def test_text_cond_rows_keep_text_pooled_and_size_ids_together():
    states, pooled = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3), torch.arange(4.0).view(4, 1) * 10
    ids = torch.arange(4.0).view(4, 1) * 100 + torch.zeros(4, 6)
    cond = common.TextCond(states, {"text_embeds": pooled, "time_ids": ids})

    def rows(c):  # each part's row numbers: they must agree row by row
        return c.states[:, 0, 0].tolist(), (c.added["text_embeds"][:, 0] / 10).tolist(), (c.added["time_ids"][:, 0] / 100).tolist()

    mask = torch.tensor([True, False, True, True])
    for picked, want in ((cond[mask], [0, 2, 3]), (cond[1:3], [1, 2]), (cond[2], [2]), (cond[-1], [3]),
                         (common.TextCond.cat([cond[3], cond[0]]), [3, 0]), (cond[1].expand(3), [1, 1, 1])):
        assert all(r == want for r in rows(picked)), (rows(picked), want)
    assert len(cond) == 4 and list(cond[2].unet_kwargs()) == ["encoder_hidden_states", "added_cond_kwargs"]
    assert cond.to(torch.float16).added["time_ids"].dtype == torch.float16
    with pytest.raises(IndexError):
        cond[4]
    with pytest.raises(ValueError, match="batch of one"):
        cond.expand(2)
    sd = common.as_cond(states)  # a bare tensor: SD text states, no added conditions
    assert sd.added is None and list(sd.unet_kwargs()) == ["encoder_hidden_states"]


def test_an_sdxl_teacher_loads_both_encoders_and_encodes_as_the_sdxl_pipeline(loaded, sdxl_pipeline):
    assert loaded.is_sdxl and loaded.zeros_for_empty_prompt and len(loaded.text_encoders) == 2
    assert not any(p.requires_grad for e in loaded.text_encoders for p in e.parameters())
    encode = loaded.prompt_encoder(96)
    cond = encode(PROMPTS)
    want_states, want_negative, want_pooled, want_negative_pooled = sdxl_pipeline.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond.states, want_states) and torch.equal(cond.added["text_embeds"], want_pooled)
    want_ids = sdxl_pipeline._get_add_time_ids((96, 96), (0, 0), (96, 96), dtype=torch.float32,
                                               text_encoder_projection_dim=want_pooled.shape[-1])
    assert torch.equal(cond.added["time_ids"], want_ids.expand(3, -1))
    # classifier-free guidance's negative: all zeros for SDXL base (force_zeros_for_empty_prompt), as the pipeline
    uncond = encode.unconditional()
    assert torch.equal(uncond.states, want_negative[:1]) and torch.equal(uncond.added["text_embeds"], want_negative_pooled[:1])
    assert torch.equal(uncond.added["time_ids"], cond.added["time_ids"][:1])
    # and so is an empty prompt in a batch (a dropped caption), row by row
    mixed = encode(["", PROMPTS[0]])
    assert not mixed.states[0].any() and not mixed.added["text_embeds"][0].any()
    assert torch.allclose(mixed.states[1], want_states[0], atol=1e-5) and mixed.added["text_embeds"][1].any()


def test_the_latent_cache_of_an_sdxl_teacher_equals_the_sdxl_pipelines_latents(loaded, sdxl_pipeline, tmp_path):
    """The cache's sampler (DPM-Solver++ with CFG) on an SDXL teacher: the same latents as
    StableDiffusionXLPipeline from the same noise (both encoders, pooled embedding, size ids, zero negative)."""
    from accelerate import Accelerator

    source = common.Source(prompts=PROMPTS, images=None, mode="sample", fingerprint="test")
    folder = common.build_latent_cache(loaded, source, tmp_path / "cache", resolution=64, sampler_steps=3, guidance_scale=3.0,
                                       with_images=False, seed=5, batch_size=2, accelerator=Accelerator(cpu=True))
    cached = common.CachedSamples(folder)
    noise = torch.cat([common._sample_noise((1, 4, 8, 8), 5, i) for i in range(3)])
    want = sdxl_pipeline(PROMPTS, latents=noise, num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
                         output_type="latent").images
    for i in range(3):
        assert cached[i]["prompt"] == PROMPTS[i]
        assert torch.allclose(cached[i]["latents"], want[i], rtol=1e-3, atol=1e-3), (i, (cached[i]["latents"] - want[i]).abs().max())  # stored in fp16
    # the check can tell: another resolution's size ids give other latents
    other = sdxl_pipeline(PROMPTS[:1], latents=noise[:1], num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
                          original_size=(128, 128), target_size=(128, 128), output_type="latent").images
    assert (cached[0]["latents"] - other[0]).abs().max() > 0.05


def test_stage_c_unet_feature_encoder_reads_an_sdxl_unets_own_down_blocks(loaded):
    """Eq. 10's f_l on an SDXL U-Net: each down stage's output as the U-Net's own forward computes it,
    with the pooled embedding and size ids in the timestep embedding."""
    unet = loaded.unet
    encoder = stage_c.UNetEncoder(unet, [0, 1, 2], timestep=10)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = loaded.prompt_encoder(64)(PROMPTS)
    seen = {}
    hooks = [block.register_forward_hook(lambda m, i, out, k=k: seen.__setitem__(k, out)) for k, block in enumerate(unet.down_blocks)]
    try:
        with torch.no_grad():
            unet(latents, torch.full((3,), 10), **cond.unet_kwargs())
            features = encoder(latents, cond)
    finally:
        for hook in hooks:
            hook.remove()
    for k, feature in enumerate(features):
        h, residuals = seen[k]
        want = residuals[-2] if unet.down_blocks[k].downsamplers is not None else h
        assert torch.allclose(feature, want, atol=1e-5), k
    other = common.TextCond(cond.states, {**cond.added, "text_embeds": cond.added["text_embeds"].roll(1, 0)})
    with torch.no_grad():
        assert not torch.allclose(encoder(latents, other)[0], features[0], atol=1e-5)  # the pooled embedding acts


# --- the stages as --preset smoke-sdxl runs, killed and resumed ----------------------------------------


def weights(folder):
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def killed_and_resumed(stage, tmp_path, args, **kwargs):
    """A straight run and one killed after step 3 then resumed: (straight dir, resumed dir)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_stage(stage, straight, *args, preset="smoke-sdxl", **kwargs) == 0
    assert run_stage(stage, killed, *args, "--stop_after_step", "3", preset="smoke-sdxl", **kwargs) == 0
    assert not (killed / "final").exists()
    assert run_stage(stage, killed, *args, "--resume", "latest", preset="smoke-sdxl", **kwargs) == 0
    assert column(read_log(killed), "loss") == column(read_log(straight), "loss")
    return straight, killed


def assert_sdxl_layout(final, teacher):
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert weights(final / "text_encoder_2").keys() == weights(teacher / "text_encoder_2").keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(final / "text_encoder_2").values(), weights(teacher / "text_encoder_2").values()))
    assert (final / "tokenizer_2" / "special_tokens_map.json").read_text() == (teacher / "tokenizer_2" / "special_tokens_map.json").read_text()


def test_stage_b_smoke_sdxl_builds_its_teacher_resumes_exactly_and_saves_an_sdxl_student(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    args = ("--max_steps", "6", "--checkpoint_every", "3", "--sample_every", "0")
    straight, killed = killed_and_resumed(stage_b, tmp_path, args)  # no --teacher: OUT/tiny-sdxl-teacher
    teacher = straight / "tiny-sdxl-teacher"
    assert (teacher / "text_encoder_2").is_dir() and not (straight / "tiny-teacher").exists()
    a, b = weights(straight / "final" / "unet"), weights(killed / "final" / "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    final = straight / "final"
    assert_sdxl_layout(final, teacher)
    student = json.loads((final / "unet" / "config.json").read_text())
    assert student["mid_block_type"] is None and student["layers_per_block"] == 1
    assert student["transformer_layers_per_block"] == [1, 1, 2] and student["addition_embed_type"] == "text_time"
    engine = sdxs_engine(final)
    assert engine.components.is_sdxl and engine.text_to_image("cat", width=64, height=64, decoder="large").images[0].size == (64, 64)
    StableDiffusionXLPipeline.from_pretrained(final)  # diffusers reads it too


def test_stage_c_smoke_sdxl_resumes_exactly_and_its_one_step_student_runs_in_the_engine(sdxl_teacher, tmp_path):
    args = ("--max_steps", "6", "--checkpoint_every", "3", "--fm_warmup_steps", "2", "--sample_every", "0")
    straight, killed = killed_and_resumed(stage_c, tmp_path, args, teacher=sdxl_teacher)
    rows = read_log(straight)
    assert len(column(rows, "loss_online")) == 6 and max(column(rows, "loss_online")) > 0  # the SD segment ran
    a, b = weights(straight / "final" / "unet"), weights(killed / "final" / "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_sdxl_layout(straight / "final", sdxl_teacher)
    engine = sdxs_engine(straight / "final")
    assert engine.text_to_image("cat", width=64, height=64, decoder="large").images[0].size == (64, 64)


def test_stage_a_smoke_sdxl_resumes_exactly_and_ships_its_decoder_in_an_sdxl_folder(sdxl_teacher, tmp_path):
    args = ("--max_steps", "6", "--checkpoint_every", "3", "--gan_start_step", "2", "--sample_every", "0")
    straight, killed = killed_and_resumed(stage_a, tmp_path, args, teacher=sdxl_teacher)
    a, b = weights(straight / "final" / "vae"), weights(killed / "final" / "vae")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_sdxl_layout(straight / "final", sdxl_teacher)
    engine = sdxs_engine(straight / "final")
    assert engine.decoders == ["tiny", "large"]
    assert engine.text_to_image("cat", width=64, height=64, decoder="tiny").images[0].size == (64, 64)


# --- what main() feeds its steps on an SDXL teacher ----------------------------------------------------


def test_stage_b_main_feeds_kd_step_the_sdxl_conditions_of_its_resolution(sdxl_teacher, loaded, tmp_path, monkeypatch):
    """Every caption dropped: each kd_step call gets the unconditional input the sample grids guide against
    (SDXL base: all-zero text states and pooled embedding) and the size ids of an uncropped --resolution image."""
    calls, kd_step = [], stage_b.kd_step

    def spy(student, teacher_unet, hooks, x_t, t, cond, *, lambda_feat):
        calls.append(cond)
        return kd_step(student, teacher_unet, hooks, x_t, t, cond, lambda_feat=lambda_feat)

    monkeypatch.setattr(stage_b, "kd_step", spy)
    assert run_stage(stage_b, tmp_path / "out", "--max_steps", "2", "--caption_dropout", "1", "--sample_every", "0",
                     "--checkpoint_every", "100", preset="smoke-sdxl", teacher=sdxl_teacher) == 0
    assert len(calls) == 2
    for cond in calls:
        assert not cond.states.any() and not cond.added["text_embeds"].any()
        assert cond.added["time_ids"].tolist() == [[64.0, 64, 0, 0, 64, 64]] * len(cond)
    calls.clear()  # and the captions themselves when none is dropped
    assert run_stage(stage_b, tmp_path / "kept", "--max_steps", "1", "--caption_dropout", "0", "--sample_every", "0",
                     "--checkpoint_every", "100", preset="smoke-sdxl", teacher=sdxl_teacher) == 0
    assert all(cond.states.abs().sum(dim=(1, 2)).min() > 0 for cond in calls)


def test_stage_c_main_pairs_each_prompt_with_its_sdxl_conditions_and_guides_with_zeros(sdxl_teacher, loaded, tmp_path, monkeypatch):
    calls, training_pairs = [], stage_c.training_pairs

    def spy(batch, states, gen, s, psi):
        calls.append((list(batch["prompt"]), states, s.uncond))
        return training_pairs(batch, states, gen, s, psi)

    monkeypatch.setattr(stage_c, "training_pairs", spy)
    assert run_stage(stage_c, tmp_path / "out", "--max_steps", "2", "--sample_every", "0", "--checkpoint_every", "100",
                     preset="smoke-sdxl", teacher=sdxl_teacher) == 0
    encode = loaded.prompt_encoder(64)
    assert len(calls) == 2
    for prompts, cond, uncond in calls:
        want = encode(prompts)
        assert torch.equal(cond.states, want.states) and torch.equal(cond.added["text_embeds"], want.added["text_embeds"])
        assert torch.equal(cond.added["time_ids"], want.added["time_ids"])
        assert not uncond.states.any() and not uncond.added["text_embeds"].any()  # the offline score's CFG negative


def test_paper_1024_defaults_to_sdxl_base_and_says_how_to_get_it_when_it_is_not_here(tmp_path):
    """`--preset paper-1024` without --teacher means SDXL base; offline and not in the HF cache, the run stops
    before anything is written, naming the flag and the hub id."""
    import subprocess
    import sys

    from conftest import ROOT, offline_env

    (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "train/distill_unet.py", "--preset", "paper-1024", "--prompts", str(tmp_path / "prompts.txt"),
                           "--mixed_precision", "no", "--output_dir", str(out)], cwd=ROOT, env=offline_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "teacher stabilityai/stable-diffusion-xl-base-1.0" in proc.stderr
    assert "error: --teacher stabilityai/stable-diffusion-xl-base-1.0" in proc.stderr
    assert not (out / "checkpoints").exists()
