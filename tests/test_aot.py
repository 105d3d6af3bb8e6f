"""Ahead-of-time compilation (sdxs/aot.py) on the CPU with the tiny model: the AOTInductor path.

The ZeroGPU path (spaces.aoti_compile in a spaces.GPU task) needs ZeroGPU and a CUDA build of torch,
so here only its selection is tested. One compile (tens of seconds on 2 cores) serves the module.
"""

import contextlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs import SDXSEngine
from sdxs.aot import AotDecoder, AotUNet, batch_range, compile_ahead_of_time, on_zero_gpu

BATCHES = (1, 2, 3)  # compiled for batches 1-3: 4 images run eagerly


def fresh_engine(tiny_model_dir) -> SDXSEngine:
    return SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch")


@pytest.fixture(scope="module")
def compiled(tiny_model_dir):
    engine = fresh_engine(tiny_model_dir)
    return engine, compile_ahead_of_time(engine, BATCHES, use_spaces=False)


def max_pixel_difference(a, b) -> int:
    assert len(a.images) == len(b.images)
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a.images, b.images))


@contextlib.contextmanager
def eager_calls(engine):
    """Counts calls of the eager U-Net and of the eager tiny decoder's network."""
    counts = {"unet": 0, "decoder": 0}
    modules = {"unet": engine.torch_components.unet, "decoder": engine.torch_components.decoders["tiny"].decoder}

    def counter(name):
        return lambda *_: counts.__setitem__(name, counts[name] + 1)

    hooks = [module.register_forward_hook(counter(name)) for name, module in modules.items()]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def sdxs_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("sdxs")]


def sketch() -> Image.Image:
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).ellipse([12, 12, 52, 52], outline=0, width=3)
    return image


def test_compiles_the_unet_and_the_default_decoder_and_keeps_the_eager_ones(compiled):
    engine, names = compiled
    assert names == ["unet", "decoder-tiny"]
    assert isinstance(engine.components.unet, AotUNet)
    assert isinstance(engine.components.decoders["tiny"], AotDecoder)
    assert type(engine.components.decoders["large"]).__name__ == "AutoencoderKL"  # only the default decoder
    assert type(engine.torch_components.unet).__name__ == "UNet2DConditionModel"
    assert engine.components.unet.eager is engine.torch_components.unet


@pytest.mark.parametrize("num_images", [1, 3])
def test_text_to_image_runs_the_compiled_networks_and_matches_the_eager_images(compiled, tiny_engine, num_images):
    engine, _ = compiled
    with eager_calls(engine) as counts:
        result = engine.text_to_image("a red circle", seed=3, num_images=num_images)
    assert counts == {"unet": 0, "decoder": 0}  # both ran compiled
    reference = tiny_engine.text_to_image("a red circle", seed=3, num_images=num_images)
    assert max_pixel_difference(result, reference) <= 1
    assert result.seeds == reference.seeds


def test_calls_outside_the_compiled_shapes_run_eagerly(compiled, tiny_engine):
    engine, _ = compiled
    with eager_calls(engine) as counts:
        smaller_size = engine.text_to_image("a red circle", seed=3, width=256, height=256)
    assert counts == {"unet": 1, "decoder": 1}
    assert max_pixel_difference(smaller_size, tiny_engine.text_to_image("a red circle", seed=3, width=256, height=256)) == 0

    unet, vae = engine.torch_components.unet, engine.torch_components.decoders["tiny"]
    with torch.no_grad(), eager_calls(engine) as counts:
        embeddings, _ = engine.encode_prompts(["a red circle"] * 4)
        latents = engine.initial_noise([3, 4, 5, 6], engine.native_size, engine.native_size)  # a batch of 4, above BATCHES
        prediction = engine.components.unet(latents, 999.0, encoder_hidden_states=embeddings).sample
        images = engine.components.decoders["tiny"].decode(latents).sample
        assert counts == {"unet": 1, "decoder": 1}
        torch.testing.assert_close(prediction, unet(latents, 999.0, encoder_hidden_states=embeddings).sample, rtol=0, atol=0)
        torch.testing.assert_close(images, vae.decode(latents).sample, rtol=0, atol=0)


def test_sketch_mode_gives_the_unet_its_residuals_eagerly(compiled, tiny_engine):
    engine, _ = compiled
    with eager_calls(engine) as counts:
        result = engine.sketch_to_image(sketch(), "a red circle", seed=5, num_images=2)
    assert counts == {"unet": 1, "decoder": 0}  # the ControlNet residuals need the eager U-Net
    reference = tiny_engine.sketch_to_image(sketch(), "a red circle", seed=5, num_images=2)
    assert max_pixel_difference(result, reference) <= 1


def test_a_lora_variant_merges_into_the_eager_unet(compiled, tiny_engine, tiny_lora_dir):
    engine, _ = compiled
    variant = engine.with_lora(str(tiny_lora_dir)).text_to_image("a red circle", seed=3)
    reference = tiny_engine.with_lora(str(tiny_lora_dir)).text_to_image("a red circle", seed=3)
    assert max_pixel_difference(variant, reference) == 0
    assert max_pixel_difference(reference, tiny_engine.text_to_image("a red circle", seed=3)) > 0  # the LoRA does change images


def test_without_a_compiler_one_warning_and_the_engine_stays_eager(tiny_model_dir, tiny_engine, caplog):
    engine = fresh_engine(tiny_model_dir)
    before = engine.components
    with caplog.at_level(logging.WARNING, logger="sdxs"), torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        assert compile_ahead_of_time(engine, use_spaces=False) == []
    warnings = sdxs_warnings(caplog)
    assert len(warnings) == 1 and "AOTInductor" in warnings[0] and "InvalidCxxCompiler" in warnings[0]
    assert engine.components is before
    result = engine.text_to_image("a red circle", seed=3, num_images=2)
    assert max_pixel_difference(result, tiny_engine.text_to_image("a red circle", seed=3, num_images=2)) == 0


def test_a_part_that_cannot_be_exported_warns_and_stays_eager(tiny_model_dir, caplog):
    # Attention slicing and decoder slicing loop over the batch in Python: torch.export cannot
    # keep such a batch dynamic. Each part fails on its own, with its own warning.
    engine = fresh_engine(tiny_model_dir)
    engine.torch_components.unet.set_attention_slice(1)
    engine.torch_components.decoders["tiny"].enable_slicing()
    before = engine.components
    with caplog.at_level(logging.WARNING, logger="sdxs"):
        assert compile_ahead_of_time(engine, BATCHES, use_spaces=False) == []
    unet, decoder = sdxs_warnings(caplog)
    assert "the unet" in unet and "the decoder-tiny" in decoder
    assert all("torch.export failed" in w and "Constraints violated (batch)" in w for w in (unet, decoder))
    assert engine.components is before


def test_the_compiled_unet_takes_any_timestep_form_and_leaves_other_inputs_to_the_eager_one(compiled):
    engine, _ = compiled
    unet, eager = engine.components.unet, engine.torch_components.unet
    with torch.no_grad():
        embeddings, _ = engine.encode_prompts(["a red circle", "a blue square"])
        sample = engine.initial_noise([3, 4], engine.native_size, engine.native_size)
        expected = eager(sample, 999, encoder_hidden_states=embeddings).sample
        for t in (999.0, torch.tensor(999)):  # the engine's float; an int64 tensor, as DEIS gives
            torch.testing.assert_close(unet(sample, t, encoder_hidden_states=embeddings).sample, expected, atol=1e-4, rtol=1e-4)
        with eager_calls(engine) as counts:
            shorter_text = unet(sample, 999, encoder_hidden_states=embeddings[:, :20]).sample  # compiled for 77 tokens
        assert counts["unet"] == 1
        torch.testing.assert_close(shorter_text, eager(sample, 999, encoder_hidden_states=embeddings[:, :20]).sample)


def test_the_compiled_decoder_leaves_another_dtype_to_the_eager_one(compiled):
    engine, _ = compiled
    latents = engine.initial_noise([3], engine.native_size, engine.native_size)
    with torch.no_grad(), pytest.raises(RuntimeError):  # the eager fp32 decoder refuses fp64; the compiled one would misread it
        engine.components.decoders["tiny"].decode(latents.double())


def test_the_zero_gpu_path_is_picked_on_zero_gpu(tiny_model_dir, monkeypatch, caplog):
    # No compiler, so that each call stops at once and its warning names the path it took.
    engine = fresh_engine(tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="sdxs"), torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        monkeypatch.setenv("SPACES_ZERO_GPU", "true")
        assert compile_ahead_of_time(engine) == []
        monkeypatch.delenv("SPACES_ZERO_GPU")
        assert compile_ahead_of_time(engine) == []
    first, second = sdxs_warnings(caplog)
    assert "spaces.aoti_compile on ZeroGPU" in first and "AOTInductor" in second


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("True", True), ("false", False), ("", False)])
def test_zero_gpu_is_detected_as_the_spaces_package_does(monkeypatch, value, expected):
    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert on_zero_gpu() is expected


def test_another_backend_is_left_as_it_is(tiny_model_dir, caplog):
    engine = SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch-compile")
    before = engine.components
    with caplog.at_level(logging.WARNING, logger="sdxs"):
        assert compile_ahead_of_time(engine, use_spaces=False) == []
    assert engine.components is before
    assert len(sdxs_warnings(caplog)) == 1 and "torch-compile" in sdxs_warnings(caplog)[0]


@pytest.mark.parametrize("batch_sizes", [(), (0, 2), (1, -3), (1.5,), (True,)])
def test_impossible_batch_sizes_are_refused_before_anything_changes(tiny_model_dir, batch_sizes):
    engine = fresh_engine(tiny_model_dir)
    before = engine.components
    with pytest.raises(ValueError, match="batch_sizes must be whole numbers of at least 1"):
        compile_ahead_of_time(engine, batch_sizes, use_spaces=False)
    assert engine.components is before


def test_batch_range_spans_the_smallest_to_the_largest_batch():
    assert batch_range([3, 1, 2]) == (1, 3)
    assert batch_range((4,)) == (4, 4)
