"""The small teacher (train/train_teacher.py, issue 7): one training step of each component, a smoke run
whose final folder loads with plain StableDiffusionPipeline and samples with guidance, and resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import column, one_torch_thread, read_log, run_stage  # noqa: F401

from train import train_teacher as teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture imported from train_helpers


@pytest.fixture(scope="module")
def smoke_args(tmp_path_factory):
    return teacher.parse_args(["--preset", "smoke", "--output_dir", str(tmp_path_factory.mktemp("args"))])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, smoke_args):
    folder = teacher.make_synthetic_data(tmp_path_factory.mktemp("data") / "shapes", smoke_args.resolution)
    images, captions = teacher.load_split(folder / "train", "text", smoke_args.resolution)
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
