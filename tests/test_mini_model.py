"""The bundled mini SDXS (models/mini-sdxs, issues 14 and 15): the released SDXS layout, the size budget,
stage and sketch tables that are the same in its training record, its card and the README, and its
sketch ControlNet (the student ControlNet of its U-Net, drawing what the sketch shows)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "models" / "mini-sdxs"
sys.path.insert(0, str(ROOT))

from train import evaluate_stages  # noqa: E402

MAX_BYTES = 80 * 1000 * 1000  # issue 15's budget for the folder with its sketch ControlNet: under 80 MB


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
    assert image.size == (128, 128)
    pixels = list(image.convert("L").getdata())
    assert max(pixels) - min(pixels) > 100  # an image with content, not a flat or blank square


def test_the_sketch_table_is_the_same_in_the_training_record_the_card_and_the_readme():
    table = table_lines((MINI / "training" / "controlnet.md").read_text())
    assert len(table) >= 5  # header, rule, sketch teacher, distilled student, one-step
    card, readme = (MINI / "README.md").read_text(), (ROOT / "README.md").read_text()
    for line in table:
        assert line in card, f"card lacks: {line}"
        assert line in readme, f"README lacks: {line}"


def test_the_sketch_controlnet_is_the_student_controlnet_of_its_unet():
    """The shape of the released sketch model, at emoji scale: the U-Net's encoder plus a mid block, its
    residuals one per skip connection of the U-Net, controls at 128 px (8x the 16x16 latents)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from train.distill_controlnet import controlnet_residual_names

    controlnet = ControlNetModel.from_pretrained(MINI / "controlnet")
    unet = UNet2DConditionModel.from_pretrained(MINI / "unet")
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim", "attention_head_dim"):
        assert json.dumps(controlnet.config[key]) == json.dumps(unet.config[key]), key
    assert controlnet.config.mid_block_type == "UNetMidBlock2DCrossAttn" and unet.config.mid_block_type is None
    assert len(controlnet.controlnet_down_blocks) == len(controlnet_residual_names(unet.config)) == 4
    assert 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1) == 8


def _circle(box) -> "Image.Image":
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (512, 512), "white")  # as drawn on the demo's canvas, its 6 px brush
    ImageDraw.Draw(canvas).ellipse(box, outline="black", width=6)
    return canvas


def test_a_drawn_circle_gives_an_emoji_that_follows_it():
    """The issue's check, measured with the demo's inputs (a circle on the 512 px canvas, "grinning face",
    the built-in strength 1.0): the output's own sketch (train/controls.py) lies closer to the circle than
    the output for a wide ellipse does. An ignored sketch gives equal distances. (A wide ellipse itself is
    not followed as well: models/mini-sdxs/README.md.)"""
    from sdxs import SDXSEngine
    from sdxs.registry import builtin_model
    from sdxs.sketch import prepare_sketch
    from train import controls

    engine = SDXSEngine.from_pretrained("mini", device="cpu", backend="torch")
    prompt = builtin_model("mini").expand_prompt("grinning face")
    circle, ellipse = _circle((96, 96, 416, 416)), _circle((24, 150, 488, 362))
    outputs = {name: engine.sketch_to_image(sketch, prompt, seed=0, control_strength=1.0).images[0]
               for name, sketch in (("circle", circle), ("ellipse", ellipse))}
    seen = prepare_sketch(circle, 128)
    distance = {name: controls.chamfer_distance(seen, controls.sketch(image)) for name, image in outputs.items()}
    f1 = {name: controls.edge_f1(seen, controls.sketch(image)) for name, image in outputs.items()}
    assert distance["circle"] < distance["ellipse"] and f1["circle"] > f1["ellipse"], (distance, f1)
