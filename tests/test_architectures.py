"""Parameter counts of the exact architectures against what the released files hold (SPEC.md)."""

import pytest

from sdxs.build import count_parameters
from sdxs.registry import DEFAULT_MODEL, MODELS, get_spec


def test_dreamshaper_counts():
    counts = count_parameters("IDKiro/sdxs-512-dreamshaper")
    assert counts["unet"] == 315_746_244
    assert counts["text_encoder"] == pytest.approx(123.06e6, rel=1e-3)
    assert counts["vae_decoder"] == pytest.approx(1.2225e6, rel=1e-3)
    assert counts["vae_large"] == pytest.approx(83.65e6, rel=1e-3)
    assert "controlnet" not in counts


def test_sdxs_09_counts():
    counts = count_parameters("IDKiro/sdxs-512-0.9")
    assert counts["unet"] == pytest.approx(328.18e6, rel=1e-4)
    assert counts["vae_decoder"] == pytest.approx(1.2225e6, rel=1e-3)


def test_sketch_controlnet_count():
    assert count_parameters("IDKiro/sdxs-512-dreamshaper-sketch")["controlnet"] == 186_551_440


def test_registry():
    assert DEFAULT_MODEL == "IDKiro/sdxs-512-dreamshaper"
    assert {spec.kind for spec in MODELS.values()} == {"pipeline", "lora", "controlnet"}
    assert get_spec("IDKiro/sdxs-512-dreamshaper-anime").base == DEFAULT_MODEL
    with pytest.raises(ValueError, match="Known models"):
        get_spec("IDKiro/sdxs-1024")
