"""The one-step engine on a tiny model in the released layout, loaded through the user's loader."""

import numpy as np
import pytest
import torch

from sdxs.engine import MAX_IMAGES


def pixels(image):
    return np.asarray(image).astype(np.int16)


def test_same_seed_same_image(tiny_engine):
    a = tiny_engine.text_to_image("a cat", seed=7).images[0]
    b = tiny_engine.text_to_image("a cat", seed=7).images[0]
    c = tiny_engine.text_to_image("a cat", seed=8).images[0]
    assert a.size == (512, 512) and a.mode == "RGB"
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_prompt_changes_image(tiny_engine):
    a = tiny_engine.text_to_image("a cat", seed=1).images[0]
    b = tiny_engine.text_to_image("a red sports car", seed=1).images[0]
    assert not np.array_equal(pixels(a), pixels(b))


def test_batch_is_one_forward_with_per_image_seeds(tiny_engine):
    batch = tiny_engine.text_to_image("a cat", seed=3, num_images=3)
    assert len(batch.images) == 3 and batch.seeds == [3, 4, 5]
    # Image i of a batch is the image of seed+i generated alone (up to batched-matmul rounding).
    alone = tiny_engine.text_to_image("a cat", seed=5).images[0]
    assert np.abs(pixels(batch.images[2]) - pixels(alone)).max() <= 2


def test_several_prompts(tiny_engine):
    result = tiny_engine.text_to_image(["a cat", "a dog"], seed=0, num_images=2)
    assert result.prompts == ["a cat", "a cat", "a dog", "a dog"] and len(result.images) == 4


@pytest.mark.parametrize("decoder", ["tiny", "large"])
def test_both_decoders_and_sizes(tiny_engine, decoder):
    result = tiny_engine.text_to_image("a cat", decoder=decoder, width=256, height=192)
    assert result.images[0].size == (256, 192)
    assert any("trained at 512" in w for w in result.warnings)
    assert set(result.timings) == {"text_encoder", "unet", "decoder", "total"}


def test_decoders_differ(tiny_engine):
    assert tiny_engine.decoders == ["tiny", "large"]
    tiny = tiny_engine.text_to_image("a cat", decoder="tiny").images[0]
    large = tiny_engine.text_to_image("a cat", decoder="large").images[0]
    assert not np.array_equal(pixels(tiny), pixels(large))


def test_matches_plain_diffusers_one_step_pipeline(tiny_engine, tiny_model_dir):
    """Our engine computes exactly what StableDiffusionPipeline does at 1 step, guidance 0."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    noise = tiny_engine.initial_noise([11], 512, 512)
    reference = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, latents=noise, output_type="np").images[0]
    ours = tiny_engine.text_to_image("a cat", seed=11).images[0]
    assert np.abs(pixels(ours) - np.round(reference * 255)).max() <= 1


def test_long_prompt_is_truncated_with_a_warning(tiny_engine):
    # 75 one-token words fill the 77 slots with the start and end tokens; the rest is dropped.
    result = tiny_engine.text_to_image("word " * 75 + "in the rain")
    assert len(result.warnings) == 1 and "77 tokens" in result.warnings[0]
    assert "ignored the end 'in the rain'" in result.warnings[0]
    assert tiny_engine.text_to_image("a cat").warnings == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=4), "exactly one step"),
        (dict(guidance_scale=7.5), "without classifier-free guidance"),
        (dict(width=500), "multiple of 32"),
        (dict(width=520), "multiple of 32"),  # a multiple of 8 whose 65 latents do not halve twice
        (dict(height=4096), "between 32 and 2048"),
        (dict(width=0), "multiple of 32"),
        (dict(decoder="medium"), "Unknown decoder"),
        (dict(num_images=0), "Number of images"),
        (dict(num_images=MAX_IMAGES + 1), "Number of images"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed must be a whole number from 0 to 4294967295"),  # was an overflow deep in torch
        (dict(seed=2**32), "seed must be a whole number"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(seed=True), "seed must be a whole number"),
    ],
)
def test_invalid_requests_are_refused(tiny_engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.text_to_image("a cat", **kwargs)


@pytest.mark.parametrize("prompt", [[], None, 3, ["ok", 4]])
def test_invalid_prompts(tiny_engine, prompt):
    with pytest.raises(ValueError, match="prompt"):
        tiny_engine.text_to_image(prompt)


def test_engine_does_not_mutate_shared_modules(tiny_engine):
    before = {k: v.clone() for k, v in tiny_engine.components.unet.state_dict().items()}
    tiny_engine.text_to_image("a cat", decoder="large")
    after = tiny_engine.components.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(tiny_engine.components.unet.parameters()).dtype == torch.float32


def test_torch_compile_backend_matches_eager(tiny_model_dir, tiny_engine):
    """The GPU path's backend (channels_last + torch.compile; CUDA graphs on a GPU), run on the CPU."""
    from sdxs import SDXSEngine

    engine = SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch-compile")
    for decoder in ("tiny", "large"):
        got = np.asarray(engine.text_to_image("a red circle", seed=3, decoder=decoder).images[0]).astype(int)
        want = np.asarray(tiny_engine.text_to_image("a red circle", seed=3, decoder=decoder).images[0]).astype(int)
        assert np.abs(got - want).max() <= 1
