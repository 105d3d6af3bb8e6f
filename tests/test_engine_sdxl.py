"""The SDXL family (issue 17): a tiny SDXS-1024-shaped folder from `make-tiny --family sdxl` runs
through the engine, the CLI and the app, and equals diffusers' StableDiffusionXLPipeline at one step."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from sdxs.cli import main

sys.path.insert(0, str(ROOT))
import app  # noqa: E402

NATIVE = 128  # the tiny SDXL model: 16x16 latents, 8 pixels per latent


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from sdxs.build import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def sdxl_engine(sdxl_dir):
    from sdxs import SDXSEngine

    return SDXSEngine.from_pretrained(str(sdxl_dir), device="cpu", backend="torch")


def pipeline_images(folder, engine, prompts, seeds, vae, height=NATIVE, width=NATIVE) -> np.ndarray:
    """diffusers' StableDiffusionXLPipeline from the folder, one step without guidance, on the engine's noise; uint8."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    noise = engine.initial_noise(seeds, height, width)
    out = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=noise, height=height, width=width, output_type="np").images
    return (out * 255).round().astype(np.uint8)


def engine_images(engine, prompts, seeds, decoder, height=NATIVE, width=NATIVE) -> np.ndarray:
    with torch.inference_mode():
        result = engine._generate(prompts, seeds, decoder, width, height)
    return np.stack([np.asarray(image) for image in result.images])


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_make_tiny_sdxl_through_main_writes_the_sdxl_pipeline_layout(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "xl"), "--family", "sdxl"]) == 0
    folder = tmp_path / "xl"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"] and index["tokenizer_2"][1] == "CLIPTokenizer"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    text_1 = json.loads((folder / "text_encoder" / "config.json").read_text())
    text_2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["mid_block_type"] is None
    assert unet["cross_attention_dim"] == text_1["hidden_size"] + text_2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == text_2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert unet["sample_size"] * 8 == NATIVE
    assert json.loads((folder / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"  # as SDXL's tokenizer_2
    assert json.loads((folder / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler" and scheduler["timestep_spacing"] == "trailing"
    assert json.loads((folder / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    large = json.loads((folder / "vae_large" / "config.json").read_text())
    assert large["_class_name"] == "AutoencoderKL" and large["force_upcast"] is True and large["scaling_factor"] == 0.13025
    with pytest.raises(SystemExit) as exit_info:  # argparse: an unknown family is a usage error
        main(["make-tiny", str(tmp_path / "bad"), "--family", "sd3"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()


def test_loads_both_text_encoders_and_the_native_size(sdxl_engine):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    components = sdxl_engine.components
    assert components.is_sdxl
    assert type(components.text_encoder) is CLIPTextModel and type(components.text_encoder_2) is CLIPTextModelWithProjection
    assert components.tokenizer_2.pad_token == "!" and components.tokenizer.pad_token == "<|endoftext|>"
    assert sdxl_engine.native_size == NATIVE and sdxl_engine.decoders == ["tiny", "large"]


def test_sd_models_load_without_a_second_text_encoder(tiny_engine):
    assert not tiny_engine.components.is_sdxl
    assert tiny_engine.components.text_encoder_2 is None and tiny_engine.components.tokenizer_2 is None


def test_a_folder_without_its_second_text_encoder_is_refused_clearly(sdxl_dir, tmp_path):
    import shutil

    from sdxs.loading import ModelNotFoundError, load_components

    broken = shutil.copytree(sdxl_dir, tmp_path / "no-te2")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelNotFoundError, match="missing text_encoder_2/"):
        load_components(str(broken), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("decoder", ["large", "tiny"])
def test_engine_equals_the_diffusers_sdxl_pipeline_at_one_step(sdxl_dir, sdxl_engine, decoder):
    """Same noise, one step, no guidance: the engine and StableDiffusionXLPipeline (its text
    encoders, pooled embedding, time ids, scheduler and VAE) give the same pixels within 1/255.
    Two prompts of different lengths and two seeds: each image must use its own prompt and noise."""
    prompts, seeds = ["a red circle on a blue square", "cat"], [3, 8]
    ours = engine_images(sdxl_engine, prompts, seeds, decoder)
    theirs = pipeline_images(sdxl_dir, sdxl_engine, prompts, seeds, sdxl_engine.components.decoders[decoder])
    assert ours.shape == theirs.shape == (2, NATIVE, NATIVE, 3)
    assert max_difference(ours, theirs) <= 1
    assert max_difference(ours[0], ours[1]) > 10  # the images differ: the comparison can see a mixed-up prompt or seed


def test_engine_equals_the_pipeline_away_from_the_native_size(sdxl_dir, sdxl_engine):
    """The size numbers follow the requested size (time ids (H, W, 0, 0, H, W)), not the native one."""
    ours = engine_images(sdxl_engine, ["a cat"], [5], "large", height=64, width=96)
    theirs = pipeline_images(sdxl_dir, sdxl_engine, ["a cat"], [5], sdxl_engine.components.decoders["large"], height=64, width=96)
    assert ours.shape == theirs.shape == (1, 64, 96, 3)
    assert max_difference(ours, theirs) <= 1


def test_every_sdxl_condition_changes_the_image(sdxl_engine):
    """The equality test can see each condition: the text order, the pooled embedding and the time
    ids each change the tiny model's pixels by far more than 1/255."""
    from sdxs.engine import decode_to_pixels

    engine = sdxl_engine
    with torch.inference_mode():
        embeddings, pooled, _ = engine.text_conditioning(["a red circle"])
        noise = engine.initial_noise([2], NATIVE, NATIVE)
        added = engine.added_conditioning(pooled, NATIVE, NATIVE)
        vae = engine.components.decoders["large"]

        def pixels(text, cond):
            return decode_to_pixels(vae, engine.denoise(noise, text, added_cond=cond)).numpy()

        reference = pixels(embeddings, added)
        width_1 = engine.components.text_encoder.config.hidden_size
        swapped = torch.cat([embeddings[..., width_1:], embeddings[..., :width_1]], dim=-1)
        assert max_difference(reference, pixels(swapped, added)) > 5
        assert max_difference(reference, pixels(embeddings, {**added, "text_embeds": torch.zeros_like(pooled)})) > 5
        assert max_difference(reference, pixels(embeddings, engine.added_conditioning(pooled, 64, 64))) > 5


def test_prompt_cache_keeps_the_pooled_embedding(sdxl_engine):
    engine = sdxl_engine
    engine.clear_prompt_cache()
    calls = []
    hook = engine.components.text_encoder_2.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        first = engine.text_to_image("a green triangle", seed=4)
        second = engine.text_to_image("a green triangle", seed=4)
    finally:
        hook.remove()
    assert len(calls) == 1  # the second call read both embeddings from the cache
    embedding, pooled, _ = engine.encode_prompt("a green triangle")
    assert pooled.shape == (1, engine.components.text_encoder_2.config.projection_dim)
    assert first.images[0].tobytes() == second.images[0].tobytes()


def test_micro_batches_give_the_images_of_single_calls(sdxl_dir, sdxl_engine):
    from sdxs import SDXSEngine

    small = SDXSEngine(sdxl_engine.torch_components, sdxl_engine.device, sdxl_engine.dtype, "torch", micro_batch=1)
    together = sdxl_engine.text_to_image(["a cat", "a dog"], seed=7)
    apart = small.text_to_image(["a cat", "a dog"], seed=7)
    assert [i.tobytes() for i in together.images] == [i.tobytes() for i in apart.images]


def test_cli_generates_at_the_native_size(sdxl_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "xl.png"
    assert main(["generate", "--model", str(sdxl_dir), "--prompt", "a cat", "--seed", "2", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (NATIVE, NATIVE)
    reference = engine_images(_engine(sdxl_dir), ["a cat"], [2], "tiny")[0]
    assert max_difference(np.asarray(image.convert("RGB")), reference) == 0


def _engine(folder):
    from sdxs import SDXSEngine

    return SDXSEngine.from_pretrained(str(folder), device="cpu", backend="torch")


def test_app_serves_it_at_its_native_size(sdxl_engine):
    generate = app.make_generate(sdxl_engine)
    images, seed, status = generate("a cat", 11, False, 2, "tiny")
    assert seed == 11 and len(images) == 2 and "2 image(s)" in status
    assert all(image.size == (NATIVE, NATIVE) for image in images)
    expected = engine_images(sdxl_engine, ["a cat", "a cat"], [11, 12], "tiny")
    assert max_difference(np.stack([np.asarray(i) for i in images]), expected) == 0


def test_sketch_mode_and_openvino_are_refused_clearly(sdxl_engine):
    from PIL import Image

    from sdxs import SDXSEngine

    with pytest.raises(ValueError, match="SDXL-family model; sketch mode"):
        sdxl_engine.sketch_to_image(Image.new("L", (64, 64), 0), "a cat")
    pytest.importorskip("openvino")
    with pytest.raises(ValueError, match="SD-1.x/2.x models only"):
        SDXSEngine(sdxl_engine.torch_components, torch.device("cpu"), torch.float32, "openvino")
    assert SDXSEngine(sdxl_engine.torch_components, torch.device("cpu"), torch.float32, "auto").backend == "torch"


def test_compiled_backend_equals_eager(sdxl_dir, sdxl_engine):
    """torch-compile (CPU here): the compiled text encoders and one-step region take the added
    conditions too; two prompts at batch 2 (a bucket of 2) and one at batch 1."""
    from sdxs import SDXSEngine

    compiled = SDXSEngine.from_pretrained(str(sdxl_dir), device="cpu", backend="torch-compile", micro_batch=2)
    for prompts, seeds in ((["a cat", "a dog"], [1, 2]), (["a dog"], [6])):
        ours = engine_images(compiled, prompts, seeds, "tiny")
        eager = engine_images(sdxl_engine, prompts, seeds, "tiny")
        assert max_difference(ours, eager) <= 1


def test_sdxl_vae_runs_in_fp32_in_an_fp16_model_as_the_pipeline_upcasts_it(sdxl_engine):
    """SDXL's AutoencoderKL overflows in fp16 (force_upcast): it is loaded in fp32 there, and
    decode_to_pixels casts the fp16 latents to it. SD models and tiny decoders keep the model's dtype."""
    from sdxs.engine import decode_to_pixels
    from sdxs.loading import decoder_dtype

    kl = {"_class_name": "AutoencoderKL", "force_upcast": True}
    assert decoder_dtype(kl, torch.float16, sdxl=True) == torch.float32
    assert decoder_dtype(kl, torch.float16, sdxl=False) == torch.float16  # StableDiffusionPipeline never upcasts
    assert decoder_dtype({**kl, "force_upcast": False}, torch.float16, sdxl=True) == torch.float16  # e.g. an fp16-fixed VAE
    assert decoder_dtype({"_class_name": "AutoencoderTiny"}, torch.float16, sdxl=True) == torch.float16
    assert decoder_dtype(kl, torch.bfloat16, sdxl=True) == torch.bfloat16
    vae = sdxl_engine.components.decoders["large"]  # fp32
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = decode_to_pixels(vae, latents)
        from_half = decode_to_pixels(vae, latents.to(torch.bfloat16))
    assert from_half.dtype == torch.uint8 and max_difference(full.numpy(), from_half.numpy()) <= 8
