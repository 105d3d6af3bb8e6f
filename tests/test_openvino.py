"""The OpenVINO CPU backend gives the same images as the PyTorch reference (within rounding)."""

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdxs import SDXSEngine
from sdxs.engine import resolve_backend
from sdxs.openvino_backend import ir_cache_dir, openvino_available, residual_shapes

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def ov_engine(tiny_model_dir):
    return SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino")


def max_diff(a, b):
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def sketch():
    image = Image.new("L", (512, 512), 255)
    ImageDraw.Draw(image).ellipse([100, 100, 400, 400], outline=0, width=8)
    return image


def test_auto_picks_openvino_on_cpu_only():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "openvino"
    assert resolve_backend("auto", torch.device("cuda"), torch.float16) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", torch.device("cuda"), torch.float16)
    with pytest.raises(ValueError, match="Unknown backend"):
        resolve_backend("tensorrt", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("decoder", ["tiny", "large"])
def test_text_to_image_matches_torch(ov_engine, tiny_engine, decoder):
    ours = ov_engine.text_to_image(["a cat", "a dog"], seed=3, decoder=decoder)
    reference = tiny_engine.text_to_image(["a cat", "a dog"], seed=3, decoder=decoder)
    assert ov_engine.backend == "openvino"
    assert all(max_diff(a, b) <= 2 for a, b in zip(ours.images, reference.images))


def test_sketch_matches_torch_and_strength_still_acts(ov_engine, tiny_engine):
    ours = ov_engine.sketch_to_image(sketch(), "a cat", seed=1, control_strength=1.0).images[0]
    reference = tiny_engine.sketch_to_image(sketch(), "a cat", seed=1, control_strength=1.0).images[0]
    assert max_diff(ours, reference) <= 2
    weak = ov_engine.sketch_to_image(sketch(), "a cat", seed=1, control_strength=0.0).images[0]
    assert max_diff(ours, weak) > 2  # the strength is an input of the converted graph, not a constant


def test_residual_shapes_match_the_controlnet(tiny_engine):
    unet, controlnet = tiny_engine.components.unet, tiny_engine.components.controlnet
    down, mid = controlnet(torch.randn(2, 4, 64, 64), torch.tensor(999), encoder_hidden_states=torch.randn(2, 77, 32),
                           controlnet_cond=torch.rand(2, 3, 512, 512), return_dict=False)
    assert residual_shapes(unet.config, 2, 64, 64) == [tuple(r.shape) for r in [*down, mid]]


def test_batches_run_on_the_batch_one_compiled_models(ov_engine, tiny_engine):
    """A batch of 3 (and a sketch batch, whose ControlNet takes a batch-less scale) compiles nothing new."""
    ov_engine.text_to_image("warm", seed=0)
    ov_engine.sketch_to_image(sketch(), "warm", seed=0)
    nets = [ov_engine.components.text_encoder.net, ov_engine.components.unet.net, ov_engine.components.controlnet.net]
    before = [len(net.compiled) for net in nets]
    got = ov_engine.text_to_image("a dog", seed=4, num_images=3).images
    want = tiny_engine.text_to_image("a dog", seed=4, num_images=3).images
    assert all(max_diff(g, w) <= 1 for g, w in zip(got, want))
    got = ov_engine.sketch_to_image(sketch(), "a dog", seed=4, num_images=2).images
    want = tiny_engine.sketch_to_image(sketch(), "a dog", seed=4, num_images=2).images
    assert all(max_diff(g, w) <= 1 for g, w in zip(got, want))
    assert [len(net.compiled) for net in nets] == before == [1, 1, 1]


def test_converted_models_are_cached_on_disk(ov_engine, tiny_model_dir):
    ov_engine.text_to_image("a cat")
    cache = ir_cache_dir((str(tiny_model_dir),), "f32")
    assert {p.name.split("-ov")[0] for p in cache.glob("*.xml")} >= {"decoder-tiny", "text_encoder", "unet-controlled"}
    # A second engine on the same folder reads the IR instead of tracing again.
    again = SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino")
    assert max_diff(again.text_to_image("a cat", seed=5).images[0], ov_engine.text_to_image("a cat", seed=5).images[0]) == 0


def test_lora_variant_on_openvino(ov_engine, tiny_engine, tiny_lora_dir):
    variant = ov_engine.with_lora(str(tiny_lora_dir))
    reference = tiny_engine.with_lora(str(tiny_lora_dir))
    assert variant.components.text_encoder is ov_engine.components.text_encoder
    assert max_diff(variant.text_to_image("a cat", seed=2).images[0], reference.text_to_image("a cat", seed=2).images[0]) <= 2


def test_auto_falls_back_to_torch_when_openvino_would_not_fit(tiny_model_dir, monkeypatch, caplog):
    import sdxs.openvino_backend as ovb

    monkeypatch.setattr(ovb, "available_memory_bytes", lambda: 1024)
    assert SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="auto").backend == "torch"
    assert "OpenVINO would need about" in caplog.text and "--backend openvino" in caplog.text
    # Asked for by name, OpenVINO is used all the same; with memory to spare, auto picks it.
    assert SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino").backend == "openvino"
    monkeypatch.setattr(ovb, "available_memory_bytes", lambda: 2**40)
    assert SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="auto").backend == "openvino"


def test_warm_up_compiles_every_decoder_and_the_sketch_mode_at_the_native_size(tiny_model_dir, ov_engine, caplog):
    """After the start-up (load, then warm-up, each logged with its time), a visitor's first request in
    either decoder or the sketch mode compiles nothing."""
    ov_engine.text_to_image("a cat")  # the IR is in the cache: this engine only reads and compiles
    caplog.set_level(logging.INFO, logger="sdxs")
    engine = SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino")
    engine.warm_up()
    latents = (1, 4, 64, 64)
    nets = {name: vae.net for name, vae in engine.components.decoders.items()}
    nets.update(unet=engine.components.unet.net, controlnet=engine.components.controlnet.net)
    assert all(len(net.compiled) == 1 for net in nets.values())
    assert list(nets["tiny"].compiled) == list(nets["large"].compiled) == [(latents,)]
    assert next(iter(nets["controlnet"].compiled))[0] == latents
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("sdxs")]
    assert any(re.fullmatch(r"Loaded .* in \d+\.\d s: decoders tiny, large, sketch ControlNet\.", m) for m in messages)
    assert any(re.fullmatch(r"OpenVINO: decoder-large compiled for input \[1, 4, 64, 64\] in \d+\.\d s", m) for m in messages)
    assert any(re.fullmatch(r"Warm-up done in \d+\.\d s\.", m) for m in messages)
    engine.text_to_image("a cat", decoder="large")
    engine.sketch_to_image(sketch(), "a cat", decoder="large")
    assert all(len(net.compiled) == 1 for net in nets.values())


def test_sizes_that_do_not_halve_evenly_in_the_unet_are_refused_before_openvino(ov_engine):
    """520 is a multiple of 8, but its 65 latents do not halve twice: the traced U-Net's skip
    connections would not fit (an OpenVINO shape error inside a server). Refused up front."""
    with pytest.raises(ValueError, match="width must be a multiple of 32"):
        ov_engine.text_to_image("a cat", width=520)
    assert ov_engine.text_to_image("a cat", width=544, height=512).images[0].size == (544, 512)
