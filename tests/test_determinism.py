"""Same seed, same bytes, on every run of one backend: OpenVINO with a cold cache (converts, then
compiles) and with a warm one (reads the IR) must take the same numerical path."""

import io
import logging
import warnings

import pytest
import torch

from sdxs import SDXSEngine
from sdxs.openvino_backend import openvino_available


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SIZE = 128  # small: fast, and still every network of the model


def outputs(engine: SDXSEngine) -> dict:
    """Every network's float output for one prompt and seed, and the PNG bytes of each decoder's image.
    Floats catch a path difference that rounding to 8 bits hides on the tiny model."""
    with torch.inference_mode():
        embeddings, _ = engine.encode_prompts(["a red circle"])
        latents = engine.denoise(engine.initial_noise([3], SIZE, SIZE), embeddings)
        result = {"text_encoder": embeddings, "unet": latents}
        for name in engine.decoders:
            result[f"decoder-{name}"] = engine.components.decoders[name].decode(latents).sample
            result[f"png-{name}"] = png_bytes(engine.text_to_image("a red circle", seed=3, decoder=name, width=SIZE, height=SIZE).images[0])
    return result


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, f"{key} differs"


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
def test_openvino_cold_and_warm_cache_give_the_same_bytes(tiny_model_dir, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sdxs")
    cache = tmp_path / "openvino-cache"
    monkeypatch.setenv("SDXS_OPENVINO_CACHE", str(cache))  # empty: the first engine converts every network
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cold = outputs(SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino"))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]  # library noise, silenced
    assert {p.name.split("-ov")[0] for p in cache.rglob("*.xml")} == {"text_encoder", "unet-controlled", "decoder-tiny", "decoder-large"}
    assert "OpenVINO: unet-controlled converted from PyTorch and cached in" in caplog.text
    caplog.clear()
    warm = outputs(SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="openvino"))
    assert "converted from PyTorch" not in caplog.text and "OpenVINO: unet-controlled read from the cache in" in caplog.text
    assert_identical(cold, warm)


def test_torch_backend_gives_the_same_bytes_on_a_new_engine(tiny_model_dir, tiny_engine):
    assert_identical(outputs(tiny_engine), outputs(SDXSEngine.from_pretrained(str(tiny_model_dir), device="cpu", backend="torch")))
