"""The bundled mini SDXS (models/mini-sdxs, issue 14): the released SDXS layout, the size budget, and a
stage table that is the same in its training record, its card and the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "models" / "mini-sdxs"
sys.path.insert(0, str(ROOT))

from train import evaluate_stages  # noqa: E402

MAX_BYTES = 60 * 1000 * 1000  # the budget: at most 60 MB


def table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def test_the_folder_is_a_one_step_pipeline_in_the_released_layout_with_safetensors_only():
    index = json.loads((MINI / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert json.loads((MINI / "unet" / "config.json").read_text())["mid_block_type"] is None  # the SDXS U-Net
    assert json.loads((MINI / "vae_large" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert json.loads((MINI / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DEISMultistepScheduler"
    weights = [p for p in MINI.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    for config in [*MINI.rglob("*config.json"), MINI / "model_index.json", MINI / "training" / "stages.json"]:
        assert '"/' not in config.read_text(), config  # no machine paths (diffusers' _name_or_path, the stage report)
    size = sum(p.stat().st_size for p in MINI.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{size / 1e6:.1f} MB"


def test_its_unet_is_the_block_removed_student_of_the_bundled_teacher():
    from train.distill_unet import derive_student_config

    teacher = json.loads((ROOT / "models" / "emoji-teacher" / "unet" / "config.json").read_text())
    student = json.loads((MINI / "unet" / "config.json").read_text())
    for key, value in derive_student_config(teacher).items():
        assert student[key] == (list(value) if isinstance(value, tuple) else value), key


def test_the_stage_table_is_the_same_in_the_training_record_the_card_and_the_readme():
    table = table_lines((MINI / "training" / "stages.md").read_text())
    assert len(table) >= 8  # header, rule, teacher, psi, stages, reference
    card = (MINI / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for line in table:
        assert line in card, f"card lacks: {line}"
        assert line in readme, f"README lacks: {line}"


def test_the_reported_targets_follow_from_the_measured_rows():
    report = json.loads((MINI / "training" / "stages.json").read_text())
    assert report["targets"] == evaluate_stages.targets(report["rows"])
    assert evaluate_stages.markdown_table(report) == (MINI / "training" / "stages.md").read_text()
    assert [r["key"] for r in report["rows"]][:2] == ["teacher", "psi"]
    mini = next(r for r in report["rows"] if r["key"] == "mini_sdxs")
    unet = json.loads((MINI / "unet" / "config.json").read_text())
    assert mini["steps"] == 1 and mini["guidance"] == 0.0 and unet["block_out_channels"] == [64, 128]


@pytest.mark.parametrize("prompt", ["grinning face", "red apple"])
def test_the_engine_makes_a_64_px_image_from_a_short_prompt(prompt):
    from sdxs import SDXSEngine
    from sdxs.registry import builtin_model

    engine = SDXSEngine.from_pretrained("mini", device="cpu", backend="torch")
    image = engine.text_to_image(builtin_model("mini").expand_prompt(prompt), seed=0).images[0]
    assert image.size == (64, 64)
    pixels = list(image.convert("L").getdata())
    assert max(pixels) - min(pixels) > 100  # an image with content, not a flat or blank square
