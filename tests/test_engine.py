"""The one-step engine on a tiny model in the released layout, loaded through the user's loader."""

import numpy as np
import pytest
import torch

from sdxs.engine import SDXSEngine, one_step_update


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
        (dict(num_images=-2), "Number of images"),
        (dict(num_images=2.0), "Number of images"),
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

    engine = SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch-compile", micro_batch=4)
    for decoder in ("tiny", "large"):
        got = np.asarray(engine.text_to_image("a red circle", seed=3, decoder=decoder).images[0]).astype(int)
        want = np.asarray(tiny_engine.text_to_image("a red circle", seed=3, decoder=decoder).images[0]).astype(int)
        assert np.abs(got - want).max() <= 1
    # 3 images run at the batch bucket 4 (the last row repeated, then dropped); two prompts, two seeds each
    got = engine.text_to_image(["a red circle", "a blue square"], seed=5, num_images=2, width=128, height=128)
    want = tiny_engine.text_to_image(["a red circle", "a blue square"], seed=5, num_images=2, width=128, height=128)
    assert got.seeds == want.seeds == [5, 6, 7, 8] and "unet" not in got.timings and got.timings["total"] > 0
    for a, b in zip(got.images, want.images):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    got3 = engine.text_to_image("a blue square", seed=7, num_images=3, width=128, height=128).images
    assert np.abs(pixels(got3[1]) - pixels(want.images[3])).max() <= 1
    # Whichever thread asks, the compiled regions run on the one compiled thread (CUDA graphs are per thread).
    import threading

    threads, compiled = [], engine.compiled.renders["tiny"]

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return compiled(*args, **kwargs)

    engine.compiled.renders["tiny"] = recording
    caller = threading.Thread(target=lambda: engine.text_to_image("a red circle", seed=3), name="gradio-worker")
    caller.start()
    caller.join()
    engine.text_to_image("a red circle", seed=3)
    assert len(threads) == 2 and all(name.startswith("sdxs-compiled") for name in threads)


def test_compiled_path_batch_buckets():
    from sdxs.engine import batch_bucket

    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert batch_bucket(5, 6) == 6


@pytest.mark.parametrize("scheduler, extra", [
    ("EulerDiscreteScheduler", {}), ("DEISMultistepScheduler", {}), ("DDIMScheduler", {}), ("LCMScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}),
])
def test_one_step_update_is_the_schedulers_step(tiny_model_dir, scheduler, extra):
    """The four numbers stand for the scheduler's own step at t=999, whatever the scheduler."""
    import json

    from sdxs.engine import one_step_scheduler

    config = dict(json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text()), _class_name=scheduler, **extra)
    update = one_step_update(config)
    noise, prediction = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = one_step_scheduler(config)
    t = reference.timesteps[0]
    latents = noise * reference.init_noise_sigma
    model_input = reference.scale_model_input(latents, t)
    want = reference.step(prediction, t, latents).prev_sample
    assert update.timestep == 999
    assert torch.allclose(noise * update.noise_scale * update.input_scale, model_input, atol=1e-6)
    assert torch.allclose(update.clean_latents(noise * update.noise_scale, prediction), want, atol=1e-5)


def test_a_scheduler_whose_step_is_not_linear_is_refused(tiny_model_dir):
    import json

    config = dict(json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text()),
                  _class_name="DDIMScheduler", thresholding=True, sample_max_value=0.5)  # clips x0 by a quantile
    with pytest.raises(ValueError, match="not a linear update"):
        one_step_update(config)


def test_any_number_of_images_runs_in_micro_batches(tiny_engine, tiny_model_dir):
    """No cap by default: 7 images in forwards of 3, each the image of its seed as a single call makes it."""
    engine = SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", micro_batch=3)
    forwards = []
    hook = engine.components.unet.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    try:
        result = engine.text_to_image("a cat", seed=10, num_images=7, width=64, height=64)
    finally:
        hook.remove()
    assert forwards == [3, 3, 1] and result.seeds == list(range(10, 17)) and len(result.images) == 7
    for i in (0, 4, 6):
        alone = tiny_engine.text_to_image("a cat", seed=10 + i, width=64, height=64).images[0]
        assert np.abs(pixels(result.images[i]) - pixels(alone)).max() <= 2
    assert set(result.timings) == {"text_encoder", "unet", "decoder", "total"}


def test_image_cap_is_a_parameter(tiny_engine):
    capped = SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", max_images=2)
    with pytest.raises(ValueError, match="from 1 to 2 in total"):
        capped.text_to_image(["a", "b"], num_images=2)
    assert len(capped.text_to_image(["a", "b"], num_images=1, width=64, height=64).images) == 2
    for bad in (dict(micro_batch=-1), dict(micro_batch=0), dict(micro_batch=2.5), dict(max_images=0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a whole number"):
            SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", **bad)


def test_prompt_cache_encodes_each_prompt_once_and_gives_the_same_image(tiny_engine):
    engine = SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", prompt_cache_size=2)
    encoded = []
    hook = engine.components.text_encoder.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        first = engine.text_to_image("a cat", seed=4, width=64, height=64).images[0]
        again = engine.text_to_image("a cat", seed=4, width=64, height=64).images[0]  # cache hit
        assert encoded == [1]
        engine.text_to_image(["a dog", "a cow", "a dog"], width=64, height=64)  # each new prompt once, alone
        assert encoded == [1, 1, 1]
        engine.text_to_image("a cat", seed=4, width=64, height=64)  # evicted (2 kept): encoded again
        assert encoded == [1, 1, 1, 1]
    finally:
        hook.remove()
    assert np.array_equal(pixels(first), pixels(again))
    fresh = SDXSEngine(tiny_engine.torch_components, tiny_engine.device, tiny_engine.dtype, "torch", prompt_cache_size=0)
    assert np.array_equal(pixels(fresh.text_to_image("a cat", seed=4, width=64, height=64).images[0]), pixels(first))
    # the long-prompt warning comes with a cached embedding too
    for _ in range(2):
        assert sum("77 tokens" in w for w in engine.text_to_image("word " * 80, width=64, height=64).warnings) == 1


@pytest.mark.parametrize("backend", ["openvino", "openvino-bf16"])
def test_openvino_backends_refuse_non_fp32_weights_up_front(backend):
    from sdxs.engine import resolve_backend

    with pytest.raises(ValueError, match="reads fp32 weights"):
        resolve_backend(backend, torch.device("cpu"), torch.bfloat16)
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"
