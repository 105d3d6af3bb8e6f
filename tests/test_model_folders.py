"""Every shape of model folder a user may point at, through the path the apps and the CLI use
(`SDXSEngine.from_pretrained`): one-step SDXS with both decoders, only a tiny or only a large one,
another VAE downsampling factor and native size, and a multi-step teacher (refused, with what to use)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs import SDXSEngine
from sdxs import architectures as arch
from sdxs.loading import UnsupportedModelError

TEACHER = Path(__file__).resolve().parents[1] / "models" / "emoji-teacher"


def load(folder) -> SDXSEngine:
    return SDXSEngine.from_pretrained(str(folder), device="cpu", backend="torch")


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def replace_component(folder: Path, module) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    module.save_pretrained(folder)


def f4_decoders():
    """A tiny AutoencoderTiny and AutoencoderKL with three blocks: 4 pixels per latent, as the emoji teacher's VAE."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(**dict(arch.TINY_TAESD, encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                  num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)))
    large = AutoencoderKL(**dict(arch.TINY_SD_VAE, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3))
    return tiny.eval(), large.eval()


@pytest.fixture(scope="module")
def f4_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model (with its ControlNet) on f=4 decoders and a U-Net sample_size of 16: native 64 px."""
    folder = tmp_path_factory.mktemp("folders") / "f4"
    shutil.copytree(tiny_model_dir, folder)
    tiny, large = f4_decoders()
    replace_component(folder / "vae", tiny)
    replace_component(folder / "vae_large", large)
    edit_json(folder / "unet" / "config.json", sample_size=16)
    return folder


@pytest.fixture(scope="module")
def f4_engine(f4_model_dir):
    return load(f4_model_dir)


def sketch(size=64):
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).ellipse([size // 5, size // 5, size * 4 // 5, size * 4 // 5], outline=0, width=3)
    return image


# --- one-step SDXS folders ------------------------------------------------------------------------------


def test_released_layout_geometry(tiny_engine):
    assert tiny_engine.decoders == ["tiny", "large"] and tiny_engine.default_decoder == "tiny"
    assert (tiny_engine.vae_scale_factor, tiny_engine.native_size, tiny_engine.size_multiple) == (8, 512, 32)
    result = tiny_engine.text_to_image("a cat")
    assert result.images[0].size == (512, 512) and result.warnings == []


def test_only_a_tiny_decoder(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("vae_large"))
    engine = load(tmp_path / "m")
    assert engine.decoders == ["tiny"] and engine.default_decoder == "tiny"
    assert engine.text_to_image("a cat").images[0].size == (512, 512)
    with pytest.raises(ValueError, match="Unknown decoder 'large'; this model has: tiny"):
        engine.text_to_image("a cat", decoder="large")


def test_only_an_autoencoder_kl_as_vae_serves_with_the_large_decoder(tiny_model_dir, tiny_engine, tmp_path):
    """Stage B's final folder without a tiny decoder: vae/ is an AutoencoderKL. Warm-up and the
    default call use the large decoder (they asked for the tiny one, and crashed)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("vae", "vae_large"))
    shutil.copytree(tiny_model_dir / "vae_large", folder / "vae")
    engine = load(folder)
    assert engine.decoders == ["large"] and engine.default_decoder == "large"
    engine.warm_up()
    image = engine.text_to_image("a cat", seed=4).images[0]
    # The same U-Net and AutoencoderKL weights as the full tiny model's large decoder: the same image.
    reference = tiny_engine.text_to_image("a cat", seed=4, decoder="large").images[0]
    assert image.size == (512, 512) and np.array_equal(np.asarray(image), np.asarray(reference))
    with pytest.raises(ValueError, match="Unknown decoder 'tiny'; this model has: large"):
        engine.text_to_image("a cat", decoder="tiny")


def test_f4_decoders_set_the_latent_and_native_sizes(f4_engine):
    assert (f4_engine.vae_scale_factor, f4_engine.native_size, f4_engine.size_multiple) == (4, 64, 16)
    assert tuple(f4_engine.initial_noise([0], 64, 96).shape) == (1, 4, 16, 24)
    for decoder in ("tiny", "large"):
        result = f4_engine.text_to_image("a cat", decoder=decoder)
        assert result.images[0].size == (64, 64) and result.warnings == []
    other = f4_engine.text_to_image("a cat", width=96, height=48)
    assert other.images[0].size == (96, 48) and other.warnings == ["This model is trained at 64x64; 96x48 may look worse."]
    with pytest.raises(ValueError, match="width must be a multiple of 16 between 16 and 2048"):
        f4_engine.text_to_image("a cat", width=72)


def test_f4_sketch_mode_sizes_the_control_image_for_the_controlnet(f4_engine):
    """Images at the native 64 px; the ControlNet's embedding takes 8 pixels per latent: a 128 px sketch."""
    result = f4_engine.sketch_to_image(sketch(), "a cat", seed=1, control_strength=1.0)
    assert result.images[0].size == (64, 64) and result.sketch.size == (128, 128)
    weak = f4_engine.sketch_to_image(sketch(), "a cat", seed=1, control_strength=0.0)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(weak.images[0]))


def test_warm_up_runs_every_decoder_and_the_sketch_mode_at_the_native_size(f4_model_dir, monkeypatch):
    engine = load(f4_model_dir)
    calls = []
    for name, vae in engine.components.decoders.items():
        monkeypatch.setattr(vae, "decode", lambda z, _decode=vae.decode, _name=name: calls.append((_name, tuple(z.shape))) or _decode(z))
    controlnet = engine.components.controlnet
    forward = controlnet.forward
    monkeypatch.setattr(controlnet, "forward", lambda *a, **kw: calls.append(("controlnet", tuple(kw["controlnet_cond"].shape))) or forward(*a, **kw))
    engine.warm_up()
    assert {("tiny", (1, 4, 16, 16)), ("large", (1, 4, 16, 16)), ("controlnet", (1, 3, 128, 128))} <= set(calls)


def test_decoders_of_different_scale_factors_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    replace_component(folder / "vae_large", f4_decoders()[1])
    with pytest.raises(ValueError, match=r"pixels per latent differ \(the tiny decoder 8x8, the large decoder 4x4\)"):
        load(folder)


# --- multi-step pipelines ------------------------------------------------------------------------------


def test_the_emoji_teacher_is_refused_with_what_it_is_and_what_to_use():
    with pytest.raises(UnsupportedModelError) as refused:
        load(TEACHER)
    message = str(refused.value)
    assert isinstance(refused.value, ValueError)  # the apps and the CLI turn ValueErrors into one clear line
    assert "is a multi-step diffusion pipeline, not a one-step SDXS model" in message
    assert "DPMSolverMultistepScheduler" in message and "classifier-free guidance" in message
    assert "IDKiro/sdxs-512-dreamshaper" in message and "make-tiny" in message


def test_the_cli_refuses_the_teacher_in_one_line(tmp_path, capsys):
    from sdxs.cli import main

    out = tmp_path / "a.png"
    assert main(["generate", "--model", str(TEACHER), "--prompt", "a cat", "--out", str(out), "--backend", "torch"]) == 2
    assert "multi-step diffusion pipeline" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def mid_block_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with an SD-style U-Net (with a mid block), as train/ stage A writes it on a teacher."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("folders") / "mid-block"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("controlnet"))
    torch.manual_seed(0)
    replace_component(folder / "unet", UNet2DConditionModel(**dict(arch.TINY_UNET, mid_block_type="UNetMidBlock2DCrossAttn")).eval())
    return folder


def test_stage_a_layout_on_a_teacher_unet_is_accepted(mid_block_model_dir):
    """A tiny decoder in vae/ and the one-step DEIS scheduler: a train/ final folder, one step on purpose."""
    engine = load(mid_block_model_dir)
    assert engine.text_to_image("a cat").images[0].size == (512, 512)


@pytest.mark.parametrize(
    "change",
    [
        "pndm-scheduler",  # SD-1.5's own sampler: a plain multi-step pipeline
        "kl-vae",  # an AutoencoderKL in vae/ (no tiny decoder) beside the DEIS scheduler: the teacher's own layout
    ],
)
def test_a_mid_block_unet_without_the_one_step_layout_is_refused(mid_block_model_dir, tmp_path, change):
    folder = tmp_path / "m"
    shutil.copytree(mid_block_model_dir, folder, ignore=shutil.ignore_patterns("vae", "vae_large"))
    shutil.copytree(mid_block_model_dir / ("vae" if change == "pndm-scheduler" else "vae_large"), folder / "vae")
    if change == "pndm-scheduler":
        edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler")
    with pytest.raises(UnsupportedModelError, match="multi-step diffusion pipeline"):
        load(folder)


def test_an_sdxs_unet_with_another_scheduler_is_one_step(tiny_model_dir, tmp_path):
    """No mid block: the SDXS U-Net, whatever scheduler was saved with it (the engine sets it to t=999)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("controlnet"))
    edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler", timestep_spacing="leading")
    assert load(folder).text_to_image("a cat").images[0].size == (512, 512)
