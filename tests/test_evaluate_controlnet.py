"""train/evaluate_controlnet.py (issue 15): the sketch table of the mini chain, on tiny local models in stage D's
folder layout: a tiny teacher + its ControlNet, SDXS-layout students with controlnet/, a tiny evaluation network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from train_helpers import one_torch_thread  # noqa: F401

from train import controls
from train import evaluate_controlnet as evc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = ["circle", "blank", "square", "triangle", "cross"]  # val order; "blank" has no strokes, so it is left out


def shape_image(shape: str, offset: int = 0) -> Image.Image:
    """A 64 px black shape on white paper: distinct outlines, so each image's sketch is its own."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((10 + offset, 10, 50, 50), fill="black")
    elif shape == "square":
        draw.rectangle((14, 14 + offset, 46, 46), fill="black")
    elif shape == "triangle":
        draw.polygon([(32, 6 + offset), (58, 56), (6, 56)], fill="black")
    elif shape == "cross":
        draw.rectangle((28, 4, 36, 60), fill="black")
        draw.rectangle((4, 28 + offset, 60, 36), fill="black")
    return image


def image_folder(root: Path) -> Path:
    """An imagefolder in the emoji data's layout (train/ and val/ with metadata.jsonl captions)."""
    for split, shapes in (("train", ["cross", "circle", "square", "triangle"]), ("val", SHAPES)):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i, shape in enumerate(shapes):
            shape_image(shape, offset=2 * (split == "train")).save(folder / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"an emoji of a black {shape}"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def eval_tower(dest: Path) -> Path:
    """A tiny random CLIPModel in the evaluation network's role (64 px images, CLIP tokenizer vocabulary)."""
    from transformers import CLIPConfig, CLIPModel

    from sdxs import architectures as arch

    torch.manual_seed(0)
    vision = dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=dict(arch.TINY_TEXT, num_hidden_layers=1), vision_config=vision, projection_dim=16)).save_pretrained(dest)
    return dest


def wake_zero_convs(controlnet) -> None:
    """A fresh ControlNet's zero convolutions make it do nothing; random weights make controls act."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))


def sdxs_folder(dest: Path, seed: int, vae: Path | None = None) -> Path:
    """A 64 px one-step folder in the SDXS layout (no mid block, DEIS, tiny vae/) with its controlnet/. A
    random tiny decoder's images hardly depend on the latents; `vae` (an AutoencoderKL folder) replaces it
    where a test must see the control act on the images."""
    import dataclasses

    from sdxs import architectures as arch
    from sdxs.build import build_components, save_pipeline_folder
    from sdxs.registry import TINY
    from sdxs.tokenizer import cached_clip_tokenizer_dir

    components = build_components(dataclasses.replace(TINY, unet=dict(arch.TINY_UNET, sample_size=8)), seed=seed)
    wake_zero_convs(components["controlnet"])
    save_pipeline_folder(components, cached_clip_tokenizer_dir(), dest)
    if vae is not None:  # then the only decoder (vae_large/ would be another "large" one)
        shutil.rmtree(dest / "vae")
        shutil.rmtree(dest / "vae_large")
        shutil.copytree(vae, dest / "vae")
        index = json.loads((dest / "model_index.json").read_text())
        (dest / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")
    return dest


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(run, teacher, data, tower): the three stage D folders under run/, each final/ with its controlnet/."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from train.tiny_teacher import ensure_tiny_teacher

    root = tmp_path_factory.mktemp("controlnet-eval")
    teacher = ensure_tiny_teacher(root / "teacher")
    run = root / "run"
    shutil.copytree(teacher, run / "controlnet-teacher" / "final")
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(teacher / "unet"))  # 64 px controls -> 8x8 latents
    wake_zero_convs(controlnet)
    controlnet.save_pretrained(run / "controlnet-teacher" / "final" / "controlnet")
    sdxs_folder(run / "controlnet-distill" / "final", seed=1)
    sdxs_folder(run / "controlnet-one-step" / "final", seed=2, vae=teacher / "vae")
    return run, teacher, image_folder(root / "data"), eval_tower(root / "eval_tower")


def run_main(run: Path, teacher: Path, data: Path, tower: Path, out: Path, *extra: str) -> dict:
    assert evc.main(["--run", str(run), "--teacher", str(teacher), "--data", str(data), "--eval_tower", str(tower), "--out", str(out),
                     "--num_images", "5", "--teacher_steps", "2", "--latency_runs", "2", *extra]) == 0
    return json.loads((out / "controlnet.json").read_text())


@pytest.fixture(scope="module")
def report(chain, tmp_path_factory):
    run, teacher, data, tower = chain
    out = tmp_path_factory.mktemp("eval") / "eval-controlnet"
    return run_main(run, teacher, data, tower, out), out


def val_inputs(data: Path):
    """The val images with strokes, their captions and their sketches, as main() reads them."""
    from train import evaluate as ev

    val, captions, _ = ev.load_split(data / "val", "text", 64)
    keep = [i for i, shape in enumerate(SHAPES) if shape != "blank"]
    return val[keep], [captions[i] for i in keep], controls.extract("sketch", controls.to_pil_images(val[keep]))


# --- the table main() writes ---------------------------------------------------------------------


def test_main_writes_one_row_per_stage_d_folder_with_every_column(report):
    report, out = report
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["sketch_teacher", "sketch_student_multi_step", "sketch_sdxs"]
    assert (rows["sketch_teacher"]["steps"], rows["sketch_teacher"]["guidance"]) == (2, 4.0)
    assert (rows["sketch_student_multi_step"]["steps"], rows["sketch_student_multi_step"]["guidance"]) == (2, 4.0)
    assert (rows["sketch_sdxs"]["steps"], rows["sketch_sdxs"]["guidance"], rows["sketch_sdxs"]["backend"]) == (1, 0.0, "sdxs engine")
    # the student rows decode with their folders' tiny decoder, the teacher with its AutoencoderKL
    assert rows["sketch_student_multi_step"]["decoder"].endswith("final/vae") and rows["sketch_teacher"]["decoder"].endswith("teacher/vae")
    for r in rows.values():
        assert r["fd"] >= 0 and 0 <= r["top1"] <= r["top5"] <= 1 and 0 <= r["edge_f1"] <= 1
        assert r["latency"]["runs"] == 2 and r["latency"]["median_ms"] > 0 and r["parameters"]["controlnet"] > 0
    # the teacher's ControlNet is a copy of its U-Net's encoder; the students' ControlNets are smaller
    assert rows["sketch_sdxs"]["parameters"]["controlnet"] < rows["sketch_teacher"]["parameters"]["controlnet"]
    assert report["missing"] == [] and report["settings"]["n_val"] == 4 and report["settings"]["skipped_empty_controls"] == 1
    # the real images' own sketches are the controls: fidelity 1 exactly when references and images stay paired
    assert report["reference"]["real"]["edge_f1"] == 1.0 and report["reference"]["real"]["chamfer_px"] == 0.0
    table = (out / "controlnet.md").read_text()
    assert "| one-step sketch SDXS (mini) | 1 |" in table and "| sketch teacher (2 steps + CFG) | 2 + CFG 4 |" in table
    assert "edge F1" in table and "Chamfer" in table and "Not evaluated" not in table
    shown = [r[k] for r in report["rows"] for k in ("folder", "controlnet", "decoder")] + [report["settings"]["run"]]
    assert not any(Path(p).is_absolute() for p in shown), shown  # reports carry no machine paths
    grid = Image.open(out / "grid.png")
    assert grid.height >= 5 * 128  # real images, controls, three rows, at 2x


def test_main_reports_the_fidelity_of_each_output_to_its_own_control(chain, report):
    """Regenerate two rows outside main() (same seeds and controls) and score them: the report's numbers
    must be these, so main() pairs output i with control i and seed + i."""
    run, teacher, data, _ = chain
    report, _ = report
    _, captions, sketches = val_inputs(data)
    rows, _ = evc.controlnet_rows(run, teacher, teacher_steps=2)
    by_key = {r["key"]: r for r in report["rows"]}
    for row in (rows[0], rows[2]):  # the teacher through diffusers, the one-step row through the engine
        model = evc.build_engine(row) if row.engine else evc.build_controlnet_pipeline(row, teacher)
        images = evc.generate(row, model, sketches, captions, seed=0, control_scale=1.0)
        expected = evc.fidelity(sketches, controls.to_pil_images(images))
        shuffled = evc.fidelity(sketches, controls.to_pil_images(images.roll(1, dims=0)))
        assert expected["edge_f1"] > 0 and expected["edge_f1"] != shuffled["edge_f1"], row.key  # the check tells pairings apart
        assert (by_key[row.key]["edge_f1"], by_key[row.key]["chamfer_px"]) == (expected["edge_f1"], expected["chamfer_px"]), row.key


def test_a_missing_stage_folder_is_a_note_in_the_table_not_a_crash(chain, tmp_path):
    run, teacher, data, tower = chain
    partial = tmp_path / "run"
    for name in ("controlnet-teacher", "controlnet-one-step"):  # no controlnet-distill/
        (partial / name).mkdir(parents=True)
        (partial / name / "final").symlink_to(run / name / "final", target_is_directory=True)
    report = run_main(partial, teacher, data, tower, tmp_path / "out", "--latency_runs", "1")
    assert [r["key"] for r in report["rows"]] == ["sketch_teacher", "sketch_sdxs"]
    assert len(report["missing"]) == 1 and report["missing"][0].startswith("+ distilled student ControlNet")
    assert report["missing"][0].endswith("run/controlnet-distill/final/controlnet)")  # says which folder to make
    assert "Not evaluated (folder missing): + distilled student ControlNet" in (tmp_path / "out" / "controlnet.md").read_text()


def test_a_run_without_any_stage_d_folder_says_which_command_makes_them(chain, tmp_path):
    _, teacher, data, tower = chain
    with pytest.raises(SystemExit, match="distill_controlnet.py"):
        evc.main(["--run", str(tmp_path), "--teacher", str(teacher), "--data", str(data), "--eval_tower", str(tower)])


@pytest.mark.parametrize("flag, value, message", [("--control_scale", "1.5", "between 0 and 1"), ("--latency_runs", "0", "at least 1"),
                                                 ("--control", "depth", "--depth_estimator")])
def test_bad_settings_are_refused_before_any_model_loads(chain, tmp_path, flag, value, message):
    run, teacher, data, tower = chain
    with pytest.raises(SystemExit, match=message):
        evc.main(["--run", str(run), "--teacher", str(teacher), "--data", str(data), "--eval_tower", str(tower), flag, value])


# --- the pieces ----------------------------------------------------------------------------------


def test_fidelity_scores_each_image_against_its_own_control():
    images = [shape_image(shape) for shape in ("circle", "square", "triangle", "cross")]
    sketches = controls.extract("sketch", images)
    matched = evc.fidelity(sketches, images)
    assert matched == {"edge_f1": 1.0, "chamfer_px": 0.0, "chamfer_undefined": 0}
    shuffled = evc.fidelity(sketches[1:] + sketches[:1], images)  # every image against another image's control
    assert shuffled["edge_f1"] < 0.6 and shuffled["chamfer_px"] > 2
    # a blank output follows nothing: F1 0 for that pair, and no Chamfer distance to average in
    blank = evc.fidelity(sketches, images[:3] + [Image.new("RGB", (64, 64), "white")])
    assert blank["edge_f1"] == 0.75 and blank["chamfer_px"] == 0.0 and blank["chamfer_undefined"] == 1
    with pytest.raises(ValueError, match="one reference sketch per image"):
        evc.fidelity(sketches[:3], images)


def test_each_row_draws_image_i_from_control_i_and_seed_i(chain):
    """Image i depends on control i (not a neighbour's) and seed + i, whatever its position in the batch."""
    run, teacher, data, _ = chain
    _, captions, sketches = val_inputs(data)
    rows, _ = evc.controlnet_rows(run, teacher, teacher_steps=2)
    for row in (rows[0], rows[2]):  # the teacher through diffusers, the one-step row through the engine
        model = evc.build_engine(row) if row.engine else evc.build_controlnet_pipeline(row, teacher)
        draw = lambda sketches, captions, seed: evc.generate(row, model, sketches, captions, seed=seed, control_scale=1.0)
        images = draw(sketches, captions, 0)
        torch.testing.assert_close(draw(sketches[2:], captions[2:], 2), images[2:], atol=1e-5, rtol=0)
        swapped = draw(sketches[1:2], captions[:1], 0)  # caption and seed of image 0, control of image 1
        # random tiny decoders respond weakly to their latents, but far above float noise (the 1e-5 above)
        assert (swapped - images[:1]).abs().max() > 1e-4, row.key


def test_the_one_step_row_through_the_engine_matches_diffusers_with_the_same_noise(chain):
    """The engine (what demo_sketch.py runs) and diffusers' ControlNet pipeline with the folder's one-step
    scheduler give the same images for the same seed: the rows share their initial noise."""
    run, teacher, data, _ = chain
    _, captions, sketches = val_inputs(data)
    engine_row = evc.controlnet_rows(run, teacher)[0][2]
    diffusers_row = evc.controlnet_rows(run, teacher, control="canny")[0][2]  # not a sketch: the diffusers path
    assert engine_row.engine and not diffusers_row.engine and engine_row.controlnet == diffusers_row.controlnet
    by_engine = evc.generate(engine_row, evc.build_engine(engine_row), sketches, captions, seed=3, control_scale=0.7)
    by_diffusers = evc.generate(diffusers_row, evc.build_controlnet_pipeline(diffusers_row, teacher), sketches, captions, seed=3, control_scale=0.7)
    assert (by_engine - by_diffusers).abs().max() <= 2 / 255  # the engine rounds to 8-bit, diffusers returns floats


def test_student_rows_decode_with_their_folders_tiny_decoder(tmp_path):
    folder, run = tmp_path / "controlnet-distill" / "final", tmp_path
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert evc.student_decoder(folder, run) is None  # no tiny decoder anywhere: the teacher's AutoencoderKL
    (run / "decoder" / "final" / "vae").mkdir(parents=True)
    assert evc.student_decoder(folder, run) == run / "decoder" / "final" / "vae"  # stage A's
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    assert evc.student_decoder(folder, run) == folder / "vae"


def test_empty_controls_are_recognised_per_kind():
    white, black = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "black")
    assert evc.is_empty_control("sketch", white) and not evc.is_empty_control("sketch", controls.sketch(shape_image("circle")))
    assert evc.is_empty_control("canny", black) and not evc.is_empty_control("canny", controls.canny(shape_image("circle")))


def test_ablation_rows_appear_only_when_their_folders_exist_and_pair_the_right_parts(chain, tmp_path):
    run, teacher, _, _ = chain
    rows, missing = evc.controlnet_rows(run, teacher)
    assert not any("ablation" in row.label for row in rows) and not any("ablation" in m for m in missing)
    ablated = tmp_path / "run"
    for name in ("controlnet-teacher", "controlnet-distill", "controlnet-one-step"):
        shutil.copytree(run / name, ablated / name)
    shutil.copytree(run / "controlnet-one-step" / "final", ablated / "one-step" / "final", ignore=shutil.ignore_patterns("controlnet"))
    shutil.copytree(run / "controlnet-one-step" / "final", ablated / "controlnet-one-step-no-reinit" / "final")
    rows, _ = evc.controlnet_rows(ablated, teacher)
    by_key = {row.key: row for row in rows}
    distilled_only = by_key["sketch_sdxs_distilled_only"]
    assert distilled_only.controlnet == ablated / "controlnet-distill" / "final" / "controlnet"
    assert distilled_only.stage.unet == ablated / "one-step" / "final" and distilled_only.stage.steps == 1
    assert by_key["sketch_sdxs_no_noise_reinit"].controlnet == ablated / "controlnet-one-step-no-reinit" / "final" / "controlnet"
    engine = evc.build_engine(distilled_only)  # the distilled ControlNet on the one-step folder's pipeline
    distilled = load_file(ablated / "controlnet-distill" / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
    key = next(iter(distilled))
    assert torch.equal(engine.components.controlnet.state_dict()[key], distilled[key])
