"""train/evaluate_coco.py (the paper's COCO FID / CLIP score protocol) and train/fid_inception.py, on a tiny
COCO-like folder made here, a random FID Inception saved as the weights file, a tiny CLIP and the tiny SDXS model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, offline_env
from PIL import Image

from train import evaluate_coco, fid_inception
from train.evaluate import frechet_distance
from train.fid_inception import WEIGHTS_URL, FIDInceptionV3, InceptionWeightsError, load_fid_inception, resize_bilinear_tf1

# image id -> (width, height); listed out of id order, as nothing promises COCO's order
IMAGES = {724: (48, 36), 139: (40, 56), 632: (60, 44), 285: (36, 36), 900: (32, 48)}
# (annotation id, image id, caption): an image's first caption is its lowest annotation id, wherever it stands
ANNOTATIONS = [
    (51, 724, "a stop sign on a street corner"), (12, 724, "  A red  stop sign\n"),
    (30, 139, "a woman in a kitchen"), (31, 139, "a kitchen with a stove"),
    (77, 632, "a bedroom with a bed"), (7, 632, "a bed next to a window"),
    (5, 285, "a brown bear in the grass"),
    (90, 900, "a plate of food"),
    (3, 999, "a caption of an image that is not in the list"),
]
# sorted by image id, first caption each (whitespace normalised)
EXPECTED = [(139, "a woman in a kitchen"), (285, "a brown bear in the grass"), (632, "a bed next to a window"),
            (724, "A red stop sign"), (900, "a plate of food")]


def make_coco(folder):
    rng = np.random.default_rng(0)
    (folder / "val2017").mkdir(parents=True)
    (folder / "annotations").mkdir()
    images = []
    for image_id, (w, h) in IMAGES.items():
        name = f"{image_id:012d}.jpg"
        base = rng.integers(0, 256, 3)  # a colour per image plus noise: distinct Inception features
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "val2017" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    notes = [{"id": i, "image_id": image, "caption": caption} for i, image, caption in ANNOTATIONS]
    (folder / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": notes}))
    return folder


@pytest.fixture(scope="module", autouse=True)
def small_inception_input():
    """The FID network resizes every image to 299 px; here to 75 px (the least its layers take), 16x less
    work, so the tests stay fast on a CPU. test_the_network_runs_at_299_px checks the real size."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid_inception, "INPUT_SIZE", 75)
        yield


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco") / "coco")


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random FID Inception with batch-norm statistics taken from a batch of images (with the default
    statistics every image gives nearly the same features), saved as the weights file."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    network.train()(torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with the real CLIP tokenizer and a 32 px image processor, in a hub folder's layout."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from sdxs.tokenizer import cached_clip_tokenizer_dir

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(cached_clip_tokenizer_dir()).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_model(tiny_model_dir, tmp_path_factory):
    """The tiny SDXS model with a 64 px native size (U-Net sample_size 8 x 8 pixels per latent) instead of
    512: the same network, 64x fewer pixels to generate and decode."""
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("small") / "tiny-64px")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sample_size": 8}))
    return folder


def arguments(model, coco, out, inception_weights, clip_dir, *extra):
    return ["--model", str(model), "--coco", str(coco), "--out", str(out), "--inception_weights", str(inception_weights),
            "--clip", str(clip_dir), "--device", "cpu", "--backend", "torch", *extra]


# --- the FID network -------------------------------------------------------------------------------


def test_tf1_resize_samples_at_i_times_in_over_out_without_half_pixel_offset():
    row = torch.tensor([0.0, 10.0, 20.0, 30.0])
    image = (row.view(1, 1, 1, 4) + 100 * row.view(1, 1, 4, 1)).expand(1, 3, 4, 4)  # width: +10 per column, height: +1000 per row
    down = resize_bilinear_tf1(image, 2)  # samples at 0 and 2 (torch's half-pixel bilinear would give 5 and 25)
    assert down[0, 0].tolist() == [[0.0, 20.0], [2000.0, 2020.0]]
    up = resize_bilinear_tf1(image, 8)  # samples at 0, 0.5, ..., 3.5; beyond the last pixel it repeats it
    assert up[0, 1, 0].tolist() == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 30.0]
    assert up[0, 2, :, 0].tolist() == [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 3000.0]


def test_the_network_runs_at_299_px_has_the_standard_parameters_and_takes_uint8_of_any_size(monkeypatch):
    monkeypatch.setattr(fid_inception, "INPUT_SIZE", 299)
    network = FIDInceptionV3().eval()
    # torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (what torchmetrics' FID runs): 23,850,960 parameters, 566 tensors
    assert sum(p.numel() for p in network.parameters()) == 23_850_960
    assert len(network.state_dict()) == 566
    seen = []
    network.Conv2d_1a_3x3.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    assert network(torch.zeros(1, 3, 75, 90, dtype=torch.uint8)).shape == (1, 2048)
    assert seen == [(1, 3, 299, 299)]
    with pytest.raises(ValueError, match="uint8"):
        network(torch.zeros(1, 3, 64, 64))


def test_inception_weights_that_are_missing_or_another_file_say_how_to_get_the_right_one(tmp_path):
    with pytest.raises(InceptionWeightsError, match="not found") as missing:
        load_fid_inception(tmp_path / "none.pth")
    assert WEIGHTS_URL in str(missing.value) and "--inception_weights" in str(missing.value)
    other = tmp_path / "inception_v3_google.pth"  # e.g. torchvision's ImageNet Inception: other tensors
    torch.save({"AuxLogits.fc.weight": torch.zeros(1000, 768), "fc.weight": torch.zeros(1000, 2048)}, other)
    with pytest.raises(InceptionWeightsError, match="is not the FID Inception weights file") as wrong:
        load_fid_inception(other)
    assert WEIGHTS_URL in str(wrong.value)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(InceptionWeightsError, match="could not be read"):
        load_fid_inception(truncated)


def test_the_test_weights_load_strictly_and_tell_images_apart(inception_weights):
    network = load_fid_inception(inception_weights)  # strict: every tensor of the file has its place
    features = network(torch.randint(0, 256, (3, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    assert features.std(0).mean() > 1e-3  # the features depend on the image, so the FID below can tell sets apart


# --- captions, metrics ---------------------------------------------------------------------------


def test_coco_captions_are_the_first_per_image_in_image_id_order(coco):
    items = evaluate_coco.read_coco_val(coco, 5)
    assert [(item.image_id, item.caption) for item in items] == EXPECTED
    assert items[0].path == coco / "val2017" / "000000000139.jpg"
    assert [item.image_id for item in evaluate_coco.read_coco_val(coco, 2)] == [139, 285]


def test_coco_problems_say_what_is_missing(coco, tmp_path):
    with pytest.raises(evaluate_coco.MissingInput, match="has 5 captioned images.*Use at most 5"):
        evaluate_coco.read_coco_val(coco, 6)
    broken = make_coco(tmp_path / "broken")
    (broken / "val2017" / "000000000285.jpg").unlink()
    with pytest.raises(evaluate_coco.MissingInput, match=r"1 of the 3 images are missing .*000000000285\.jpg.*val2017\.zip"):
        evaluate_coco.read_coco_val(broken, 3)
    (broken / "annotations" / "captions_val2017.json").write_text('{"images": [')
    with pytest.raises(evaluate_coco.MissingInput, match="not a COCO captions file"):
        evaluate_coco.read_coco_val(broken, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate_coco.MissingInput, match=r"lacks .*captions_val2017\.json and .*val2017/\..*annotations_trainval2017\.zip"):
        evaluate_coco.read_coco_val(tmp_path / "empty", 3)


def test_clip_score_is_100_times_the_mean_cosine_clamped_at_zero():
    assert evaluate_coco.clip_score(torch.tensor([0.3, 0.1])) == pytest.approx(20.0)
    assert evaluate_coco.clip_score(torch.tensor([0.3, -0.1])) == pytest.approx(10.0)  # a negative pair counts as negative
    assert evaluate_coco.clip_score(torch.tensor([-0.5, 0.2])) == 0.0  # torchmetrics clamps the mean, not each pair


def test_real_images_are_centre_cropped_then_resized(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white centre square between black side bands
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = np.asarray(evaluate_coco.real_image(tmp_path / "wide.png", 8))
    assert image.shape == (8, 8, 3) and image.min() == 255  # the side bands are cropped away, not squeezed in


# --- the command --------------------------------------------------------------------------------


def fid_of_few_samples(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID through the samples' Gram matrix instead of the 2048 x 2048 covariances: with centred features A
    (n x D), B (m x D), tr((S_a^1/2 S_b S_a^1/2)^1/2) is the sum of the singular values of A B^T divided by
    sqrt((n-1)(m-1)) (S_a S_b and (A B^T)(A B^T)^T share their non-zero eigenvalues). Exact, and fast for few
    samples: another route to the same number than the script's."""
    a_centred, b_centred = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    cross = torch.linalg.svdvals(a_centred @ b_centred.T).sum() / math.sqrt((n - 1) * (m - 1))
    traces = a_centred.square().sum() / (n - 1) + b_centred.square().sum() / (m - 1)
    return float((a.mean(0) - b.mean(0)).square().sum() + traces - 2 * cross)


def test_the_few_samples_fid_of_the_test_agrees_with_the_script_formula():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=generator, dtype=torch.float64), torch.randn(4, 40, generator=generator, dtype=torch.float64) + 0.3
    assert fid_of_few_samples(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)


def independent_metrics(coco, image_dir, items, inception_weights, clip_dir, size):
    """FID and CLIP score recomputed here from the saved images, the COCO files and the tiny networks."""
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    def uint8(images):
        return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])

    def square(path):
        image = Image.open(path).convert("RGB")
        side = min(image.size)
        box = ((image.width - side) // 2, (image.height - side) // 2)
        return image.crop((*box, box[0] + side, box[1] + side)).resize((size, size), Image.BICUBIC)

    generated = [Image.open(image_dir / f"{image_id:012d}.png").convert("RGB") for image_id, _ in items]
    real = [square(coco / "val2017" / f"{image_id:012d}.jpg") for image_id, _ in items]
    network = load_fid_inception(inception_weights)
    fid = fid_of_few_samples(network(uint8(generated)).double(), network(uint8(real)).double())

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(clip_dir)([caption for _, caption in items], padding=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(clip_dir)(images=generated, return_tensors="pt").pixel_values
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=pixels)
        text_emb = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    image_emb, text_emb = (getattr(e, "pooler_output", e) for e in (image_emb, text_emb))
    cosines = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    rotated = torch.nn.functional.cosine_similarity(image_emb, text_emb.roll(1, 0), dim=-1)  # captions of other images
    return fid, max(0.0, 100 * cosines.mean().item()), max(0.0, 100 * rotated.mean().item())


def test_command_generates_one_seeded_image_per_caption_and_scores_them(small_model, coco, inception_weights, clip_dir, tmp_path):
    from sdxs import SDXSEngine

    out = tmp_path / "eval"
    # 3 captions in batches of 2: the second batch starts at caption 2, seed 5 + 2
    assert evaluate_coco.main(arguments(small_model, coco, out, inception_weights, clip_dir,
                                        "--num_images", "3", "--batch_size", "2", "--seed", "5", "--save_images")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    engine = SDXSEngine.from_pretrained(str(small_model), device="cpu", backend="torch")
    size = engine.native_size
    assert metrics["num_images"] == 3 and metrics["image_size"] == size == 64 and metrics["decoder"] == "tiny"

    items = EXPECTED[:3]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{image_id:012d}.png" for image_id, _ in items]
    # each image is its caption's with seed 5 + its index: as one engine call of all three makes them (up to
    # float rounding: a batch of 3 runs other kernels than batches of 2 and 1), and unlike any other of them
    expected = [np.asarray(image, dtype=np.float64) for image in engine.text_to_image([c for _, c in items], seed=5).images]
    for i, (image_id, caption) in enumerate(items):
        saved = np.asarray(Image.open(out / "images" / f"{image_id:012d}.png"), dtype=np.float64)
        distances = [np.abs(saved - other).mean() for other in expected]
        assert distances[i] < 0.05 and np.abs(saved - expected[i]).max() <= 2, (caption, distances)
        assert min(d for j, d in enumerate(distances) if j != i) > 20 * max(distances[i], 0.01), (caption, distances)

    fid, clip, clip_of_wrong_pairs = independent_metrics(coco, out / "images", items, inception_weights, clip_dir, size)
    assert metrics["fid"] > 1e-3 and metrics["fid"] == pytest.approx(fid, rel=1e-5)
    assert metrics["clip_score"] == pytest.approx(clip, rel=1e-5)
    assert abs(clip_of_wrong_pairs - clip) > 1e-4 * clip  # images scored against other captions would fail the check above
    row = (out / "metrics.md").read_text().splitlines()[-1]
    assert row == f"| {small_model} | tiny | {size} | 3 | {metrics['fid']:.2f} | {metrics['clip_score']:.2f} |"


def test_a_multi_step_teacher_is_refused_as_the_engine_refuses_it(coco, inception_weights, clip_dir, tmp_path):
    teacher = ROOT / "models" / "emoji-teacher"
    with pytest.raises(SystemExit, match="1 of the evaluation's inputs .*\n- model: .*multi-step"):
        evaluate_coco.main(arguments(teacher, coco, tmp_path / "eval", inception_weights, clip_dir, "--num_images", "2"))
    assert not (tmp_path / "eval").exists()


def test_bad_settings_are_refused_before_loading(coco, tmp_path):
    base = ["--coco", str(coco), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none")]
    for extra, message in [(["--num_images", "1"], "at least 2"), (["--batch_size", "17"], "from 1 to 16"), (["--batch_size", "0"], "from 1 to 16")]:
        with pytest.raises(SystemExit, match=message):
            evaluate_coco.main(base + extra)


def test_offline_with_nothing_present_lists_every_missing_input_and_where_to_get_it(tmp_path):
    """The command as users run it, offline, on a machine with no COCO, no Inception weights and nothing cached."""
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train" / "evaluate_coco.py"), "--coco", str(tmp_path / "coco"), "--out", str(out),
         "--inception_weights", str(tmp_path / "inception.pth"), "--device", "cpu"],
        capture_output=True, text=True, env=offline_env(tmp_path), timeout=300,
    )
    assert result.returncode != 0
    message = result.stderr
    assert "4 of the evaluation's inputs are missing" in message and "nothing was generated" in message
    assert "COCO folder" in message and "val2017.zip" in message and "annotations_trainval2017.zip" in message
    assert WEIGHTS_URL in message and str(tmp_path / "inception.pth") in message
    assert "CLIP model 'openai/clip-vit-large-patch14'" in message and "--clip DIR" in message
    assert "IDKiro/sdxs-512-dreamshaper" in message and "hf download IDKiro/sdxs-512-dreamshaper" in message
    assert not out.exists()
